//! The hub: who is connected where and how to reach them. It owns the session registry
//! ([`Sessions`]) and the presence subscriptions ([`Subscriptions`]), and it is the one place
//! that decides how a stored item reaches its recipient: over the open connections of the
//! devices that have one, and for every other device through the [`MissedDelivery`] sink (the
//! push pipeline), which is called from [`Hub::deliver_stored`] and nowhere else.

use crate::{
    sessions::{
        ConnHandle, Delivered, Disconnect, Outbound, PresenceEvent, PresenceSnapshot, Sessions,
    },
    subscriptions::Subscriptions,
};
use bimip_proto::v1::Partition;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use std::sync::{Arc, OnceLock};
use tokio::sync::broadcast;

/// A queue item that was just made durable, on its way to its recipient's devices.
#[derive(Debug, Clone, Copy)]
pub struct StoredItem<'a> {
    /// The recipient (whose queue holds the item).
    pub to: &'a str,
    pub from: &'a str,
    pub message_id: &'a str,
    /// The item's offset in the recipient's queue.
    pub offset: u64,
    pub partition: Partition,
    pub payload: &'a Bytes,
}

/// Where the devices that did not get a stored item in real time are handled (push).
pub trait MissedDelivery: Send + Sync {
    /// `item` was offered to the open connections of the devices in `reached`; the recipient's
    /// other devices did not get it. Resolves once whatever must survive a crash (a push job)
    /// is durable, so the sender's Ack can wait for it.
    fn missed<'a>(&'a self, item: StoredItem<'a>, reached: &'a [Arc<str>]) -> BoxFuture<'a, ()>;

    /// The connection of `device` ended without a clean close (heartbeat timeout, reset, write
    /// timeout, slow consumer): chat items routed to it in real time from `since_offset` on may
    /// never have reached the device. Runs in the background.
    fn lost(&self, user: Arc<str>, device: Arc<str>, since_offset: u64);
}

#[derive(Default)]
pub struct Hub {
    sessions: Sessions,
    subs: Subscriptions,
    missed: OnceLock<Arc<dyn MissedDelivery>>,
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    /// Installs the sink for devices a stored item did not reach (once, at start).
    pub fn set_missed(&self, sink: Arc<dyn MissedDelivery>) {
        if self.missed.set(sink).is_err() {
            tracing::warn!("the missed-delivery sink was set twice; the first one stays");
        }
    }

    // --- The registry -------------------------------------------------------------------

    /// Adds a connection. Returns true when it is the user's first device.
    pub fn register(&self, user: &Arc<str>, conn: ConnHandle) -> bool {
        self.sessions.register(user, conn)
    }

    /// Removes a connection. Returns `Some(last_seen)` when it was the user's last device.
    pub fn unregister(&self, user: &Arc<str>, conn_id: u64) -> Option<i64> {
        self.sessions.unregister(user, conn_id)
    }

    pub fn announce_online(&self, user: &Arc<str>) -> bool {
        self.sessions.announce_online(user)
    }

    pub fn announce_offline(&self, user: &Arc<str>, grace_ms: i64) -> Option<i64> {
        self.sessions.announce_offline(user, grace_ms)
    }

    /// Announced presence changes (ONLINE, and OFFLINE after the grace period).
    pub fn presence_events(&self) -> broadcast::Receiver<PresenceEvent> {
        self.sessions.subscribe_events()
    }

    pub fn snapshot(&self, user: &str) -> PresenceSnapshot {
        self.sessions.snapshot(user)
    }

    pub fn is_online(&self, user: &str) -> bool {
        self.sessions.is_online(user)
    }

    pub fn device_online(&self, user: &str, device: &str) -> bool {
        self.sessions.device_online(user, device)
    }

    /// The device ids of the user's open connections.
    pub fn devices(&self, user: &str) -> Vec<Arc<str>> {
        self.sessions.devices(user)
    }

    pub fn kick(&self, user: &str, device: Option<&str>, why: Disconnect) -> usize {
        self.sessions.kick(user, device, why)
    }

    pub fn close_all(&self, why: Disconnect) {
        self.sessions.close_all(why)
    }

    // --- Delivery -----------------------------------------------------------------------

    /// Offers a frame that is not a stored item (awareness, typing, a receipt, a copy for the
    /// sender's own devices) to every connection of `user` except `except`. Nothing else
    /// happens for devices without a connection.
    pub fn deliver(&self, user: &str, frame: &Arc<Outbound>, except: Option<u64>) -> Delivered {
        self.sessions.deliver(user, frame, except)
    }

    /// Whether `user` has an open connection other than `except`.
    pub fn has_other(&self, user: &str, except: Option<u64>) -> bool {
        self.sessions.has_other(user, except)
    }

    /// Delivers a stored item (its frame is `frame`) to its recipient: offered to every open
    /// connection (except `except`), and the recipient's other devices are handed to the
    /// missed-delivery sink. Resolves once the sink made what it decided durable.
    pub async fn deliver_stored(
        &self,
        item: StoredItem<'_>,
        frame: &Arc<Outbound>,
        except: Option<u64>,
    ) -> Delivered {
        let Some(sink) = self.missed.get() else {
            return self.sessions.deliver(item.to, frame, except);
        };
        let mut reached = Vec::new();
        let d = self
            .sessions
            .deliver_to(item.to, frame, except, Some(&mut reached));
        sink.missed(item, &reached).await;
        d
    }

    /// A connection ended without a clean close; see [`MissedDelivery::lost`].
    pub fn connection_lost(&self, user: &Arc<str>, device: &Arc<str>, since_offset: u64) {
        if let Some(sink) = self.missed.get() {
            sink.lost(user.clone(), device.clone(), since_offset);
        }
    }

    // --- Subscriptions (open presence policy) ---------------------------------------------

    pub fn subscribe(&self, target: &str, subscriber: &Arc<str>, conn: &ConnHandle) {
        self.subs.add(target, subscriber, conn);
    }

    pub fn unsubscribe(&self, target: &str, conn_id: u64) {
        self.subs.remove(target, conn_id);
    }

    pub fn subscribers(&self, target: &str) -> Vec<(Arc<str>, ConnHandle)> {
        self.subs.subscribers(target)
    }
}
