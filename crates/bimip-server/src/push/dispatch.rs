//! The dispatcher takes due jobs from the outbox and runs each in a worker task, at most
//! `push.workers` pushes and `webhooks.workers` events at a time; a worker makes one attempt and
//! reports how it ended. The push attempt ([`Push::attempt`]) re-checks everything that may have
//! changed since the job was created (token, open connection, acknowledgement, DND, mute), then
//! maps the provider's [`Outcome`] to the next step: sent (never sent again), retry with backoff,
//! token deleted (compare-and-delete), dead letter, or provider paused without burning attempts.

use super::{
    Push,
    content::{self, preview_text},
    outbox::{Completion, Outbox},
};
use crate::{tasks::Tasks, webhooks::Events};
use bimip_proto::v1::Partition;
use bimip_push::{Kind, Outcome, Platform, PushMessage};
use bimip_store::{
    PushStore, QueueStore, ReadRequest, TokenMatch,
    push::{DeadLetter, Job, OutboxJob, PushJob, PushKind},
};
use rand::Rng;
use std::{sync::Arc, time::Duration};
use tokio::sync::Semaphore;

/// Longest preview text, in characters.
const PREVIEW_CHARS: usize = 160;
/// How often the outbox gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the dispatcher until shutdown (a tracked task).
pub fn start(outbox: Arc<Outbox>, push: Arc<Push>, events: Arc<Events>, tasks: Tasks) {
    let t = tasks.clone();
    tasks.spawn(dispatch(outbox.clone(), push.clone(), events, t));
    let cancelled = tasks.cancelled();
    tasks.spawn(async move {
        tokio::pin!(cancelled);
        loop {
            let (n, oldest) = outbox.depth();
            let age = oldest.map_or(0.0, |o| (bimip_proto::now_ms() - o).max(0) as f64 / 1000.0);
            push.metrics.push_outbox(n as i64, age);
            tokio::select! {
                _ = &mut cancelled => return,
                _ = tokio::time::sleep(GAUGE_INTERVAL) => {}
            }
        }
    });
}

async fn dispatch(outbox: Arc<Outbox>, push: Arc<Push>, events: Arc<Events>, tasks: Tasks) {
    let push_slots = Arc::new(Semaphore::new(push.settings.workers));
    let event_slots = Arc::new(Semaphore::new(events.workers()));
    let cancelled = tasks.cancelled();
    tokio::pin!(cancelled);
    loop {
        let (push_free, event_free) = (
            push_slots.available_permits(),
            event_slots.available_permits(),
        );
        let now = bimip_proto::now_ms();
        let (jobs, next) = outbox.take_due(now, push_free, event_free);
        for job in jobs {
            // Each job was taken against a free slot of its kind: acquiring it does not wait.
            let slots = match &job.job {
                Some(Job::Event(_)) => &event_slots,
                _ => &push_slots,
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                let _ = outbox
                    .complete(job.id, Completion::Park { due_at: now })
                    .await;
                continue;
            };
            match &job.job {
                Some(Job::Push(_)) => {
                    let (push, outbox) = (push.clone(), outbox.clone());
                    tasks.spawn(async move {
                        let id = job.id;
                        let how = Box::pin(push.attempt(&job)).await;
                        // The slot bounds provider requests in flight; recording the outcome
                        // (a durable write) does not need it.
                        drop(permit);
                        outbox.wake.notify_one();
                        if let Err(e) = Box::pin(outbox.complete(id, how)).await {
                            tracing::warn!(job = id, error = %e, "recording a push attempt");
                        }
                    });
                }
                Some(Job::Event(_)) => {
                    let (events, outbox) = (events.clone(), outbox.clone());
                    tasks.spawn(async move {
                        let id = job.id;
                        let how = Box::pin(events.attempt(&job)).await;
                        drop(permit);
                        outbox.wake.notify_one();
                        if let Err(e) = Box::pin(outbox.complete(id, how)).await {
                            tracing::warn!(job = id, error = %e, "recording a webhook attempt");
                        }
                    });
                }
                None => {
                    drop(permit);
                    let _ = outbox.complete(job.id, Completion::Remove).await;
                }
            }
        }
        // Sleep until the next job is due, a job arrives or a worker frees a slot (both wake
        // `outbox.wake`), at most a second.
        let wait = next.map_or(1000, |at| (at - now).clamp(0, 1000)) as u64;
        tokio::select! {
            _ = &mut cancelled => return,
            _ = outbox.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
        }
    }
}

/// Full-jitter exponential backoff for the `attempt`-th retry (1-based).
pub fn backoff(base_ms: u64, max_ms: u64, attempt: u32) -> Duration {
    let cap = base_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(32))
        .min(max_ms)
        .max(1);
    Duration::from_millis(rand::rng().random_range(0..=cap))
}

impl Push {
    /// Dead-letters a job (recorded durably, counted); the job is then removed.
    pub(crate) async fn dead_letter(
        &self,
        job: &OutboxJob,
        provider: &str,
        reason: &'static str,
        detail: &str,
    ) -> Completion {
        let mut job = job.clone();
        if !detail.is_empty() {
            job.last_error = detail.to_string();
        }
        let dead = DeadLetter {
            job: Some(job),
            at: bimip_proto::now_ms(),
            reason: reason.to_string(),
            provider: provider.to_string(),
        };
        if let Err(e) = self.store.add_dead_letter(dead).await {
            tracing::warn!(error = %e, "storing a dead letter");
        }
        tracing::warn!(provider, reason, detail, "push dead-lettered");
        self.metrics.push_dead_letter(provider, reason);
        Completion::Remove
    }

    /// One attempt of a push job.
    pub(crate) async fn attempt(&self, job: &OutboxJob) -> Completion {
        let Some(Job::Push(p)) = &job.job else {
            return Completion::Remove;
        };
        let now = bimip_proto::now_ms();
        let max_age_ms = (self.settings.max_age_secs as i64).saturating_mul(1000);
        let kind = PushKind::try_from(p.kind).unwrap_or(PushKind::Chat);
        let tokens = match self.store.device_tokens(&p.user).await {
            Ok(t) => t,
            Err(e) => return self.again(now, false, format!("reading tokens: {e}")),
        };
        let Some(token) = tokens.into_iter().find(|d| d.device == p.device) else {
            self.metrics.push_outcome("none", "skipped", "no_token");
            return Completion::Remove;
        };
        let label = super::decide::platform_label(&token);
        if now - job.created_at > max_age_ms {
            return self.dead_letter(job, label, "max_age", "").await;
        }
        if kind != PushKind::Test && self.device_online(&p.user, &p.device) {
            self.metrics.push_outcome(label, "skipped", "online");
            return Completion::Remove;
        }
        let unread = match self.store.unread(&p.user).await {
            Ok(u) => u,
            Err(e) => return self.again(now, false, format!("reading unread counts: {e}")),
        };
        if kind == PushKind::Chat {
            if unread.acknowledged(&p.from, p.offset) {
                self.metrics.push_outcome(label, "skipped", "acknowledged");
                return Completion::Remove;
            }
            match self.chat_suppressed(&p.user, &p.from).await {
                Ok(Some(why)) => {
                    self.metrics.push_outcome(label, "suppressed", why);
                    return Completion::Remove;
                }
                Ok(None) => {}
                Err(e) => return self.again(now, false, format!("reading the profile: {e}")),
            }
        }
        let Some(platform) = super::platform_of(token.platform) else {
            return self
                .dead_letter(job, label, "invalid", "token has no platform")
                .await;
        };
        let Some(provider) = self.providers.get(platform).cloned() else {
            return self
                .dead_letter(job, platform.name(), "provider_disabled", "")
                .await;
        };
        if let Some(until) = self.paused_until(platform, now) {
            return Completion::Park { due_at: until };
        }
        let target = content::Target {
            job_id: job.id,
            token: &token,
            platform,
            expires_at: (job.created_at + max_age_ms) / 1000,
        };
        let msg = match kind {
            PushKind::Chat => {
                let count = unread
                    .senders
                    .iter()
                    .find(|s| s.from == p.from)
                    .map_or(u64::from(p.count), |s| s.unread);
                let preview = if self.settings.preview {
                    self.preview(p).await
                } else {
                    None
                };
                content::chat(target, p, count, unread.total, preview)
            }
            PushKind::Notification | PushKind::Test => {
                let mut m = content::notification(target, p, unread.total);
                if kind == PushKind::Test {
                    m.kind = Kind::Test;
                }
                m
            }
        };
        let sent_at = bimip_proto::now_ms();
        self.metrics
            .push_dispatch_delay_seconds
            .observe((sent_at - job.due_at).max(0) as f64 / 1000.0);
        let started = std::time::Instant::now();
        let outcome = provider.send(&msg).await;
        self.metrics
            .push_request_seconds
            .observe(started.elapsed().as_secs_f64());
        self.outcome(job, p, &token, platform, outcome, sent_at)
            .await
    }

    fn again(&self, now: i64, attempted: bool, error: String) -> Completion {
        Completion::Again {
            due_at: now + self.settings.retry_base_ms as i64,
            attempted,
            error,
        }
    }

    /// The newest message's text for a preview.
    async fn preview(&self, p: &PushJob) -> Option<String> {
        let req = ReadRequest {
            device: p.device.clone(),
            partition: Partition::Chat,
            peer: Some(p.from.clone()),
            start: Some(p.offset),
            limit: 1,
            ..Default::default()
        };
        let page = self.store.read(&p.user, req).await.ok()?;
        let item = page.items.into_iter().find(|i| i.offset == p.offset)?;
        preview_text(&item.payload, PREVIEW_CHARS)
    }

    /// What the outbox does after the provider answered.
    async fn outcome(
        &self,
        job: &OutboxJob,
        p: &PushJob,
        token: &bimip_store::push::DeviceToken,
        platform: Platform,
        outcome: Outcome,
        sent_at: i64,
    ) -> Completion {
        let name = platform.name();
        let now = bimip_proto::now_ms();
        match outcome {
            Outcome::Sent { .. } => {
                self.unpause(platform);
                self.metrics.push_outcome(name, "sent", kind_label(p));
                self.store.note_pushed(&p.user, &p.device, now).await;
                if p.kind == PushKind::Chat as i32 {
                    Completion::SentWindow {
                        window_until: now + self.settings.collapse_ms as i64,
                    }
                } else {
                    Completion::Remove
                }
            }
            Outcome::Retry { after, reason } => {
                self.metrics.push_outcome(name, "retry", "provider");
                let attempts = job.attempts + 1;
                if attempts >= self.settings.max_attempts {
                    return self.dead_letter(job, name, "max_attempts", &reason).await;
                }
                let delay = backoff(
                    self.settings.retry_base_ms,
                    self.settings.retry_max_ms,
                    attempts,
                )
                .max(after.unwrap_or_default());
                Completion::Again {
                    due_at: now + delay.as_millis() as i64,
                    attempted: true,
                    error: reason,
                }
            }
            Outcome::DropToken { reason, at_ms } => {
                // Only the token that was found dead, and only if it was registered before the
                // provider learned that (a device that registered it again meanwhile keeps it).
                let registered_before = at_ms.map_or(sent_at, |t| t.min(sent_at));
                let only_if = TokenMatch {
                    token: token.token.clone(),
                    registered_at: registered_before,
                };
                match self
                    .store
                    .remove_device_token(&p.user, &p.device, Some(only_if))
                    .await
                {
                    Ok(removed) => {
                        tracing::info!(
                            user = %p.user, device = %p.device, provider = name, reason = %reason, removed,
                            "push token reported dead by the provider"
                        );
                    }
                    Err(e) => tracing::warn!(error = %e, "removing a dead push token"),
                }
                self.metrics.push_outcome(name, "token_removed", "provider");
                Completion::Remove
            }
            Outcome::Invalid { reason } => self.dead_letter(job, name, "invalid", &reason).await,
            Outcome::ProviderConfig { reason } => {
                let until = now + self.settings.pause_ms as i64;
                self.pause(platform, until, &reason);
                self.metrics.push_outcome(name, "paused", "provider_config");
                Completion::Park { due_at: until }
            }
        }
    }

    /// `bimip push test`: one attempt to each of the user's devices (or one), at once, outside
    /// the outbox; returns (device, platform, outcome) for each.
    pub async fn test(
        &self,
        user: &str,
        device: Option<&str>,
    ) -> Result<Vec<(String, String, Outcome)>, bimip_store::StoreError> {
        let tokens = self.store.device_tokens(user).await?;
        let unread = self.store.unread(user).await?;
        let mut out = Vec::new();
        for token in tokens
            .into_iter()
            .filter(|t| device.is_none_or(|d| d == t.device))
        {
            let Some(platform) = super::platform_of(token.platform) else {
                continue;
            };
            let job = PushJob {
                user: user.to_string(),
                device: token.device.clone(),
                kind: PushKind::Test as i32,
                from: crate::delivery::SYSTEM_SENDER.to_string(),
                message_id: format!("test-{:016x}", rand::random::<u64>()),
                title: "bimip test push".into(),
                body: format!("A test push to {} ({})", token.device, platform.name()),
                high_priority: true,
                ..Default::default()
            };
            let outcome = match self.providers.get(platform) {
                None => Outcome::ProviderConfig {
                    reason: format!("provider {} is not configured", platform.name()),
                },
                Some(provider) => {
                    let target = content::Target {
                        job_id: rand::random::<u64>() >> 1,
                        token: &token,
                        platform,
                        expires_at: 0,
                    };
                    let mut msg: PushMessage = content::notification(target, &job, unread.total);
                    msg.kind = Kind::Test;
                    provider.send(&msg).await
                }
            };
            self.metrics
                .push_outcome(platform.name(), outcome.label(), "test");
            out.push((token.device.clone(), platform.name().to_string(), outcome));
        }
        Ok(out)
    }
}

fn kind_label(p: &PushJob) -> &'static str {
    match PushKind::try_from(p.kind) {
        Ok(PushKind::Chat) => "chat",
        Ok(PushKind::Notification) => "notification",
        Ok(PushKind::Test) => "test",
        Err(_) => "unknown",
    }
}
