//! The push decision, made once per stored item where the hub delivered it
//! ([`Hub::deliver_stored`](crate::hub::Hub::deliver_stored)): every device of the recipient with
//! a registered token and no open connection gets a job, unless the push is suppressed.
//!
//! - Chat: suppressed by the recipient's DND intent, a mute or a block of the sender; one job per
//!   (recipient, device, sender) at a time, due after the grace period (a device acknowledging the
//!   message meanwhile cancels it, checked when it is due); after a push was sent, more messages
//!   of the same sender inside the collapse window send nothing.
//! - Notifications (`POST /v1/notifications`): due at once. Normal priority: suppressed by DND
//!   and a mute of the sender, folded into a pending job of the same sender. High priority (OTP,
//!   alerts): never suppressed or folded.

use super::{Push, content::NotificationContent, outbox::Coalesced};
use crate::hub::{MissedDelivery, StoredItem};
use bimip_proto::v1::Partition;
use bimip_store::{
    PushStore, QueueStore, StoreError,
    push::{DeviceToken, Job, OutboxJob, PushJob, PushKind},
};
use futures_util::future::{BoxFuture, join_all};
use std::sync::Arc;

/// The hub's missed-delivery sink.
pub struct PushSink(pub Arc<Push>);

impl MissedDelivery for PushSink {
    fn missed<'a>(&'a self, item: StoredItem<'a>, reached: &'a [Arc<str>]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let push = &self.0;
            if !matches!(item.partition, Partition::Chat | Partition::Notification)
                || item.from == item.to
                || !match item.has_tokens {
                    Some(known) => known,
                    None => push.store.has_device_tokens(item.to).await,
                }
            {
                return;
            }
            if let Err(e) = push.missed(item, reached).await {
                tracing::warn!(user = %item.to, error = %e, "push job not created");
                push.metrics.push_outcome("none", "error", "store");
            }
        })
    }

    fn lost(&self, user: Arc<str>, device: Arc<str>, since_offset: u64) {
        let push = self.0.clone();
        self.0.tasks.spawn(async move {
            if let Err(e) = push.lost(&user, &device, since_offset).await {
                tracing::warn!(user = %user, error = %e, "push jobs for a lost connection not created");
            }
        });
    }
}

/// The coalesce key of chat pushes from `from` to one device.
pub fn chat_key(user: &str, device: &str, from: &str) -> String {
    format!("c\u{0}{user}\u{0}{device}\u{0}{from}")
}

/// The coalesce key of normal-priority notifications from `from` to one device.
pub fn notification_key(user: &str, device: &str, from: &str) -> String {
    format!("n\u{0}{user}\u{0}{device}\u{0}{from}")
}

impl Push {
    /// Why a chat push from `from` to `user` is suppressed now, if it is: the label also used in
    /// metrics.
    pub(crate) async fn chat_suppressed(
        &self,
        user: &str,
        from: &str,
    ) -> Result<Option<&'static str>, StoreError> {
        let profile = self.profiles.get(&self.store, user).await?;
        if profile.dnd {
            return Ok(Some("dnd"));
        }
        if profile.blocks.contains(from) {
            return Ok(Some("blocked"));
        }
        if self.store.is_muted(user, from).await {
            return Ok(Some("muted"));
        }
        Ok(None)
    }

    /// Devices of `user` with a token, minus those that got the item (`reached`).
    async fn offline_devices(
        &self,
        user: &str,
        reached: &[Arc<str>],
    ) -> Result<Vec<DeviceToken>, StoreError> {
        let mut devices = self.store.device_tokens(user).await?;
        devices.retain(|d| !reached.iter().any(|r| **r == *d.device));
        Ok(devices)
    }

    async fn missed(&self, item: StoredItem<'_>, reached: &[Arc<str>]) -> Result<(), StoreError> {
        let targets = self.offline_devices(item.to, reached).await?;
        if targets.is_empty() {
            return Ok(());
        }
        let now = bimip_proto::now_ms();
        match item.partition {
            Partition::Chat => {
                if let Some(why) = self.chat_suppressed(item.to, item.from).await? {
                    for d in &targets {
                        self.metrics
                            .push_outcome(platform_label(d), "suppressed", why);
                    }
                    return Ok(());
                }
                let due = now + self.settings.grace_ms as i64;
                let jobs = targets.iter().map(|d| {
                    let job = PushJob {
                        user: item.to.to_string(),
                        device: d.device.clone(),
                        kind: PushKind::Chat as i32,
                        from: item.from.to_string(),
                        message_id: item.message_id.to_string(),
                        offset: item.offset,
                        first_offset: item.offset,
                        count: 1,
                        coalesce_key: chat_key(item.to, &d.device, item.from),
                        ..Default::default()
                    };
                    self.queue_coalesced(job, platform_label(d), now, due, true)
                });
                first_error(join_all(jobs).await)
            }
            Partition::Notification => {
                let n = NotificationContent::parse(item.payload);
                if !n.high_priority
                    && let Some(why) = self.notification_suppressed(item.to, item.from).await?
                {
                    for d in &targets {
                        self.metrics
                            .push_outcome(platform_label(d), "suppressed", why);
                    }
                    return Ok(());
                }
                let jobs = targets.iter().map(|d| {
                    let job = PushJob {
                        user: item.to.to_string(),
                        device: d.device.clone(),
                        kind: PushKind::Notification as i32,
                        from: item.from.to_string(),
                        message_id: item.message_id.to_string(),
                        offset: item.offset,
                        first_offset: item.offset,
                        count: 1,
                        title: n.title.clone(),
                        body: n.body.clone(),
                        data: n.data.clone().into_iter().collect(),
                        high_priority: n.high_priority,
                        coalesce_key: if n.high_priority {
                            String::new()
                        } else {
                            notification_key(item.to, &d.device, item.from)
                        },
                    };
                    let label = platform_label(d);
                    async move {
                        if job.high_priority {
                            self.queue_new(job, label, now).await
                        } else {
                            self.queue_coalesced(job, label, now, now, false).await
                        }
                    }
                });
                first_error(join_all(jobs).await)
            }
            _ => Ok(()),
        }
    }

    async fn notification_suppressed(
        &self,
        user: &str,
        from: &str,
    ) -> Result<Option<&'static str>, StoreError> {
        if self.profiles.get(&self.store, user).await?.dnd {
            return Ok(Some("dnd"));
        }
        if self.store.is_muted(user, from).await {
            return Ok(Some("muted"));
        }
        Ok(None)
    }

    pub(crate) async fn queue_coalesced(
        &self,
        job: PushJob,
        platform: &'static str,
        now: i64,
        due: i64,
        window: bool,
    ) -> Result<(), StoreError> {
        let outcome = self.outbox.coalesce(job, now, due, window).await?;
        let (what, why) = match outcome {
            Coalesced::Created => ("queued", "new"),
            Coalesced::Merged => ("queued", "coalesced"),
            Coalesced::InWindow => ("suppressed", "collapse_window"),
        };
        self.metrics.push_outcome(platform, what, why);
        Ok(())
    }

    pub(crate) async fn queue_new(
        &self,
        job: PushJob,
        platform: &'static str,
        now: i64,
    ) -> Result<(), StoreError> {
        self.outbox
            .add(OutboxJob {
                created_at: now,
                due_at: now,
                job: Some(Job::Push(job)),
                ..Default::default()
            })
            .await?;
        self.metrics.push_outcome(platform, "queued", "new");
        Ok(())
    }

    /// A device's connection was lost: chat delivered to it in real time from `since` on that no
    /// device has acknowledged gets the push it would have got had the device been offline.
    async fn lost(&self, user: &str, device: &str, since: u64) -> Result<(), StoreError> {
        let Some(token) = self
            .store
            .device_tokens(user)
            .await?
            .into_iter()
            .find(|d| d.device == device)
        else {
            return Ok(());
        };
        if self.device_online(user, device) {
            return Ok(());
        }
        let unread = self.store.unread(user).await?;
        let now = bimip_proto::now_ms();
        let due = now + self.settings.grace_ms as i64;
        for s in unread.senders.iter().filter(|s| s.last_offset >= since) {
            if let Some(why) = self.chat_suppressed(user, &s.from).await? {
                self.metrics
                    .push_outcome(platform_label(&token), "suppressed", why);
                continue;
            }
            let job = PushJob {
                user: user.to_string(),
                device: device.to_string(),
                kind: PushKind::Chat as i32,
                from: s.from.clone(),
                offset: s.last_offset,
                first_offset: s.first_offset.max(since),
                count: u32::try_from(s.unread).unwrap_or(u32::MAX),
                coalesce_key: chat_key(user, device, &s.from),
                ..Default::default()
            };
            self.queue_coalesced(job, platform_label(&token), now, due, true)
                .await?;
        }
        Ok(())
    }
}

/// The provider label of a device token (metrics).
pub(crate) fn platform_label(d: &DeviceToken) -> &'static str {
    super::platform_of(d.platform).map_or("none", |p| p.name())
}

fn first_error(results: Vec<Result<(), StoreError>>) -> Result<(), StoreError> {
    results.into_iter().collect()
}
