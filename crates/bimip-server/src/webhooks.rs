//! Outgoing event webhooks: `presence.changed`, `message.stored`, `message.delivered` and
//! `message.read`, each one signed POST (Standard Webhooks) of
//! `{"type":…,"timestamp":…,"data":{…}}` to the configured URL.
//!
//! An event is a job in the durable outbox (the same one pushes use) before the action that
//! caused it is confirmed, so it is delivered at least once: retried with backoff until a 2xx,
//! with the same `webhook-id` every time (receivers deduplicate on it). A 410 answer disables the
//! endpoint until the server restarts; events wait in the outbox meanwhile.

use crate::{
    config::WebhookSettings,
    metrics::Metrics,
    push::{
        dispatch::backoff,
        outbox::{Completion, Outbox},
    },
};
use bimip_push::{Outcome, http::HttpOptions, webhook::EventSender};
use bimip_store::{
    PushStore, Store,
    push::{DeadLetter, EventJob, Job, OutboxJob},
};
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

/// The kinds of event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    PresenceChanged,
    MessageStored,
    MessageDelivered,
    MessageRead,
}

impl EventType {
    pub fn name(self) -> &'static str {
        match self {
            EventType::PresenceChanged => "presence.changed",
            EventType::MessageStored => "message.stored",
            EventType::MessageDelivered => "message.delivered",
            EventType::MessageRead => "message.read",
        }
    }

    fn index(self) -> usize {
        match self {
            EventType::PresenceChanged => 0,
            EventType::MessageStored => 1,
            EventType::MessageDelivered => 2,
            EventType::MessageRead => 3,
        }
    }
}

/// How often a parked event (endpoint gone, or no endpoint configured) is looked at again.
const PARKED_MS: i64 = 3_600_000;

pub struct Events {
    sender: Option<EventSender>,
    /// Which event types are sent, by [`EventType::index`].
    enabled: [bool; 4],
    outbox: Arc<Outbox>,
    store: Store,
    /// The endpoint answered 410: nothing is sent until restart.
    gone: AtomicBool,
    settings: WebhookSettings,
    retry_base_ms: u64,
    retry_max_ms: u64,
    metrics: Arc<Metrics>,
}

impl Events {
    pub fn new(
        settings: &WebhookSettings,
        http: &HttpOptions,
        outbox: Arc<Outbox>,
        store: Store,
        retry: (u64, u64),
        metrics: Arc<Metrics>,
    ) -> Result<Events, crate::config::ConfigError> {
        let sender = match (&settings.url, &settings.secret) {
            (Some(url), Some(secret)) => {
                let s = EventSender::new(url, secret, http).map_err(|e| {
                    crate::config::ConfigError::Invalid(format!("event webhook: {e}"))
                })?;
                tracing::info!(endpoint = %crate::push::url_origin(url), events = ?settings.events, "event webhooks: on");
                Some(s)
            }
            _ => {
                tracing::info!("event webhooks: off (no --webhook-url)");
                None
            }
        };
        let mut enabled = [false; 4];
        for t in [
            EventType::PresenceChanged,
            EventType::MessageStored,
            EventType::MessageDelivered,
            EventType::MessageRead,
        ] {
            enabled[t.index()] = sender.is_some() && settings.events.iter().any(|e| e == t.name());
        }
        Ok(Events {
            sender,
            enabled,
            outbox,
            store,
            gone: AtomicBool::new(false),
            settings: settings.clone(),
            retry_base_ms: retry.0,
            retry_max_ms: retry.1,
            metrics,
        })
    }

    /// Events sent concurrently.
    pub fn workers(&self) -> usize {
        self.settings.workers
    }

    /// Whether events of this type are sent (callers skip building the data otherwise).
    pub fn wants(&self, t: EventType) -> bool {
        self.enabled[t.index()]
    }

    /// Queues an event; returns once it is durable in the outbox. A failure is logged and
    /// counted, never passed on: the action that caused the event stands.
    pub async fn emit(&self, t: EventType, data: serde_json::Value) {
        if !self.wants(t) {
            return;
        }
        let now = bimip_proto::now_ms();
        let body = serde_json::json!({ "type": t.name(), "timestamp": now, "data": data });
        let job = OutboxJob {
            created_at: now,
            due_at: now,
            job: Some(Job::Event(EventJob {
                // Filled in below once the outbox gave the job its id.
                webhook_id: String::new(),
                r#type: t.name().to_string(),
                body: serde_json::to_vec(&body).unwrap_or_default().into(),
            })),
            ..Default::default()
        };
        match self.outbox.add(job).await {
            Ok(_) => self.metrics.webhook_event(t.name(), "queued"),
            Err(e) => {
                tracing::warn!(event = t.name(), error = %e, "event not queued");
                self.metrics.webhook_event(t.name(), "error");
            }
        }
    }

    /// One attempt of an event job.
    pub async fn attempt(&self, job: &OutboxJob) -> Completion {
        let Some(Job::Event(ev)) = &job.job else {
            return Completion::Remove;
        };
        let now = bimip_proto::now_ms();
        let Some(sender) = &self.sender else {
            return self.dead_letter(job, "provider_disabled", "").await;
        };
        if self.gone.load(Ordering::Acquire) {
            return Completion::Park {
                due_at: now + PARKED_MS,
            };
        }
        if now - job.created_at > (self.settings.max_age_secs as i64).saturating_mul(1000) {
            return self.dead_letter(job, "max_age", &job.last_error).await;
        }
        let id = webhook_id(job, ev);
        match sender.post(&id, &ev.body).await {
            Outcome::Sent { .. } => {
                self.metrics.webhook_event(&ev.r#type, "sent");
                Completion::Remove
            }
            // Any other answer than a 2xx or a 410 is retried until the event is too old: a
            // receiver that answers 401 or 404 is most likely misconfigured for a while (a
            // wrong secret, a deploy), and dropping its events at once would lose them all.
            Outcome::Retry { after, reason } => self.retry(job, &ev.r#type, now, after, reason),
            Outcome::Invalid { reason } | Outcome::ProviderConfig { reason } => {
                self.retry(job, &ev.r#type, now, None, reason)
            }
            Outcome::DropToken { reason, .. } => {
                if !self.gone.swap(true, Ordering::AcqRel) {
                    tracing::error!(
                        reason = %reason,
                        "the event webhook endpoint answered 410 Gone: event webhooks are disabled until restart; events wait in the outbox"
                    );
                }
                self.metrics.webhook_event(&ev.r#type, "gone");
                Completion::Park {
                    due_at: now + PARKED_MS,
                }
            }
        }
    }

    fn retry(
        &self,
        job: &OutboxJob,
        event: &str,
        now: i64,
        after: Option<std::time::Duration>,
        reason: String,
    ) -> Completion {
        self.metrics.webhook_event(event, "retry");
        let delay = backoff(self.retry_base_ms, self.retry_max_ms, job.attempts + 1)
            .max(after.unwrap_or_default());
        Completion::Again {
            due_at: now + delay.as_millis() as i64,
            attempted: true,
            error: reason,
        }
    }

    async fn dead_letter(&self, job: &OutboxJob, reason: &'static str, detail: &str) -> Completion {
        let mut job = job.clone();
        job.last_error = detail.to_string();
        let t = match &job.job {
            Some(Job::Event(ev)) => ev.r#type.clone(),
            _ => String::new(),
        };
        let dead = DeadLetter {
            job: Some(job),
            at: bimip_proto::now_ms(),
            reason: reason.to_string(),
            provider: "events".into(),
        };
        if let Err(e) = self.store.add_dead_letter(dead).await {
            tracing::warn!(error = %e, "storing a dead letter");
        }
        tracing::warn!(event = %t, reason, detail, "event dead-lettered");
        self.metrics.webhook_event(&t, "dead_letter");
        self.metrics.push_dead_letter("events", reason);
        Completion::Remove
    }
}

/// The event's `webhook-id`: fixed by the job's id, so every retry (and a retry after a restart)
/// carries the same one.
fn webhook_id(job: &OutboxJob, ev: &EventJob) -> String {
    if ev.webhook_id.is_empty() {
        format!("evt_{}", job.id)
    } else {
        ev.webhook_id.clone()
    }
}
