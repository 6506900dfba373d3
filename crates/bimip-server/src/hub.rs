//! The hub: who is connected where and how to reach them. It owns the session registry
//! ([`Sessions`]) and the presence subscriptions ([`Subscriptions`]), and it is the one place
//! that decides how a stored item reaches its recipient: over the open connections of the
//! devices that have one, and for every other device through the [`MissedDelivery`] sink (the
//! push pipeline), which is called from [`Hub::deliver_stored`] and nowhere else.

use crate::{
    cluster::{Cluster, envelope},
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
    /// Whether the recipient has a push token, when already known (a cluster's routing tells);
    /// None: the push decision looks it up.
    pub has_tokens: Option<bool>,
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
    /// Set when several nodes share Redis: frames for users with connections elsewhere are
    /// routed there.
    cluster: OnceLock<Arc<Cluster>>,
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

    /// Joins the hub to a cluster (once, at start).
    pub fn set_cluster(&self, cluster: Arc<Cluster>) {
        if self.cluster.set(cluster).is_err() {
            tracing::warn!("the cluster was set twice; the first one stays");
        }
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
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

    /// Closes this node's connections of `user` (only `device`'s when given).
    pub fn kick(&self, user: &str, device: Option<&str>, why: Disconnect) -> usize {
        self.sessions.kick(user, device, why)
    }

    /// [`Self::kick`] on every node; returns how many connections were told to close.
    pub async fn kick_everywhere(
        &self,
        user: &str,
        device: Option<&str>,
        why: Disconnect,
    ) -> usize {
        let mut n = self.sessions.kick(user, device, why);
        if let Some(c) = self.cluster.get() {
            let mut env = envelope::Envelope::new(c.node(), envelope::KICK);
            env.users.push(user.to_string());
            env.device = device.unwrap_or_default().to_string();
            env.why = u32::from(why.index());
            match c.route(user, &env).await {
                Ok(devices) => {
                    n += devices
                        .iter()
                        .filter(|d| device.is_none_or(|want| want == d.as_str()))
                        .count()
                }
                Err(e) => tracing::warn!(user, error = %e, "kick not sent to the other nodes"),
            }
        }
        n
    }

    /// Every connection on this node, with its user.
    pub fn local_connections(&self) -> Vec<(Arc<str>, ConnHandle)> {
        self.sessions.all()
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

    /// [`Self::deliver`] on every node: this node's connections, then one publish to each
    /// other node holding a connection of `user`. Remote devices count as delivered to.
    pub async fn deliver_everywhere(
        &self,
        user: &str,
        frame: &Arc<Outbound>,
        except: Option<u64>,
    ) -> Delivered {
        let mut d = self.sessions.deliver(user, frame, except);
        if let Some(c) = self.cluster.get() {
            match c.deliver_remote(user, frame).await {
                Ok(n) => d.devices += n,
                Err(e) => tracing::debug!(user, error = %e, "frame not routed to other nodes"),
            }
        }
        d
    }

    /// Whether `user` may have an open connection other than `except` (in a cluster: always
    /// maybe, the routing finds out).
    pub fn has_other(&self, user: &str, except: Option<u64>) -> bool {
        self.cluster.get().is_some() || self.sessions.has_other(user, except)
    }

    /// Delivers a stored item (its frame is `frame`) to its recipient: offered to every open
    /// connection (except `except`), and the recipient's other devices are handed to the
    /// missed-delivery sink. Resolves once the sink made what it decided durable.
    pub async fn deliver_stored(
        &self,
        mut item: StoredItem<'_>,
        frame: &Arc<Outbound>,
        except: Option<u64>,
    ) -> Delivered {
        let mut reached = Vec::new();
        let mut d = self
            .sessions
            .deliver_to(item.to, frame, except, Some(&mut reached));
        if let Some(c) = self.cluster.get() {
            match c.deliver_remote_devices(item.to, frame).await {
                Ok(routed) => {
                    d.devices += routed.devices.len();
                    reached.extend(routed.devices.into_iter().map(Arc::from));
                    item.has_tokens = Some(routed.has_tokens);
                }
                // The item is stored: the devices there catch up (fan-out or RESUME), and the
                // push pipeline below treats them as not reached.
                Err(e) => {
                    tracing::debug!(user = item.to, error = %e, "item not routed to other nodes")
                }
            }
        }
        if let Some(sink) = self.missed.get() {
            sink.missed(item, &reached).await;
        }
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
