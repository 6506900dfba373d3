//! Who is connected: user → devices → connection handles, sharded by user so that no single lock
//! serializes the server. Also the multi-device rollup: a user is ONLINE while any
//! device is connected and OFFLINE (with `last_seen`) when the last one goes.
//!
//! Locks here are `std::sync::Mutex`es held only for map updates and non-blocking `try_send`s,
//! never across an `.await`.

use bimip_proto::{
    codec::{Codec, Encoded},
    v1::Frame,
};
use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
};
use tokio::sync::{Notify, broadcast, mpsc};

const SHARDS: usize = 64;

/// A frame on its way to one or more connections, encoded at most once per codec no matter how
/// many connections it goes to.
pub struct Outbound {
    pub frame: Frame,
    binary: OnceLock<Encoded>,
    json: OnceLock<Encoded>,
    size: OnceLock<usize>,
}

impl Outbound {
    pub fn new(frame: Frame) -> Arc<Outbound> {
        Arc::new(Outbound {
            frame,
            binary: OnceLock::new(),
            json: OnceLock::new(),
            size: OnceLock::new(),
        })
    }

    /// Encoded (protobuf) size, what the frame costs in an outbound buffer.
    pub fn size(&self) -> usize {
        *self
            .size
            .get_or_init(|| prost::Message::encoded_len(&self.frame))
    }

    pub fn encoded(&self, codec: Codec) -> &Encoded {
        let cell = match codec {
            Codec::Binary => &self.binary,
            Codec::Json => &self.json,
        };
        cell.get_or_init(|| codec.encode(&self.frame))
    }
}

/// Why the server ends a connection; each maps to a WebSocket close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// Server shutting down (1001).
    Shutdown,
    /// The outbound buffer filled up: the device could not keep up (1013).
    Slow,
    /// Kicked by the backend (4502: do not reconnect on your own).
    Kicked,
    /// The user's tokens were revoked by the backend (4501: do not reconnect).
    Revoked,
}

/// Application close codes. 4000–4499: get a fresh token, then reconnect; 4500–4999: do not
/// reconnect. Distinct codes, because browsers cannot read why an upgrade was refused and
/// clients should not have to match reason texts.
pub mod close {
    /// The token's `exp` (plus the leeway) passed, at the upgrade or while connected.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// The backend revoked the user's tokens.
    pub const REVOKED: u16 = 4501;
    /// The backend kicked the device.
    pub const KICKED: u16 = 4502;
}

impl Disconnect {
    pub fn code(self) -> u16 {
        match self {
            Disconnect::Shutdown => 1001,
            Disconnect::Slow => 1013,
            Disconnect::Kicked => close::KICKED,
            Disconnect::Revoked => close::REVOKED,
        }
    }
    pub fn reason(self) -> &'static str {
        match self {
            Disconnect::Shutdown => "server shutting down",
            Disconnect::Slow => "slow consumer: outbound buffer full, RESUME to catch up",
            Disconnect::Kicked => "kicked",
            Disconnect::Revoked => "revoked",
        }
    }
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Disconnect::Shutdown => "shutdown",
            Disconnect::Slow => "slow",
            Disconnect::Kicked => "kicked",
            Disconnect::Revoked => "revoked",
        }
    }
    pub fn index(self) -> u8 {
        match self {
            Disconnect::Shutdown => 1,
            Disconnect::Slow => 2,
            Disconnect::Kicked => 3,
            Disconnect::Revoked => 4,
        }
    }
    pub fn from_index(i: u8) -> Option<Disconnect> {
        match i {
            1 => Some(Disconnect::Shutdown),
            2 => Some(Disconnect::Slow),
            3 => Some(Disconnect::Kicked),
            4 => Some(Disconnect::Revoked),
            _ => None,
        }
    }
}

/// State a connection shares with the registry: a way to be told to close, and the bytes
/// waiting in its outbound buffer.
#[derive(Default)]
pub struct ConnSignal {
    notify: Notify,
    reason: AtomicU8,
    queued_bytes: AtomicUsize,
    /// Most bytes that may wait in the outbound buffer (0 = no byte limit).
    max_bytes: usize,
}

impl ConnSignal {
    pub fn with_max_bytes(max_bytes: usize) -> ConnSignal {
        ConnSignal {
            max_bytes,
            ..Default::default()
        }
    }
    /// Asks the connection to close; the first reason wins.
    pub fn close(&self, why: Disconnect) {
        if self
            .reason
            .compare_exchange(0, why.index(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.notify.notify_waiters();
        }
    }
    /// Resolves when `close` was called; returns why. Any number of waiters may wait.
    pub async fn closed(&self) -> Disconnect {
        loop {
            // Created before the check: a `notify_waiters` after it is not missed.
            let notified = self.notify.notified();
            if let Some(d) = Disconnect::from_index(self.reason.load(Ordering::Acquire)) {
                return d;
            }
            notified.await;
        }
    }
    /// Reserves room for `size` bytes; false when the byte limit would be passed. A frame
    /// always fits into an empty buffer.
    fn reserve(&self, size: usize) -> bool {
        let prev = self.queued_bytes.fetch_add(size, Ordering::AcqRel);
        if self.max_bytes > 0 && prev > 0 && prev + size > self.max_bytes {
            self.release(size);
            return false;
        }
        true
    }
    /// The connection took `size` bytes out of its buffer.
    pub fn release(&self, size: usize) {
        self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
    }
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Acquire)
    }
}

/// The registry's handle on one connection.
#[derive(Clone)]
pub struct ConnHandle {
    pub id: u64,
    pub device: Arc<str>,
    pub tx: mpsc::Sender<Arc<Outbound>>,
    pub signal: Arc<ConnSignal>,
}

impl ConnHandle {
    /// Queues a frame for this connection without waiting. A full buffer means the device cannot
    /// keep up: it is told to close (1013) and will catch up with RESUME. Returns true if queued.
    pub fn offer(&self, frame: &Arc<Outbound>) -> bool {
        let size = frame.size();
        if self.tx.is_closed() {
            return false;
        }
        if !self.signal.reserve(size) {
            self.signal.close(Disconnect::Slow);
            return false;
        }
        match self.tx.try_send(frame.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.signal.release(size);
                self.signal.close(Disconnect::Slow);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.signal.release(size);
                false
            }
        }
    }
}

#[derive(Default)]
struct UserEntry {
    conns: Vec<ConnHandle>,
    /// Unix ms when the last device went away (0 = never seen since start).
    last_seen: i64,
    /// Whether watchers were last told ONLINE. Broadcasts follow this, not the raw device count,
    /// so a quick reconnect within the grace period produces no OFFLINE/ONLINE flap.
    announced: bool,
}

/// A change of a user's device-state rollup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEvent {
    pub user: Arc<str>,
    pub online: bool,
    /// When it happened (unix ms); for OFFLINE this is the user's `last_seen`.
    pub at: i64,
}

/// Current rollup of one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceSnapshot {
    pub online: bool,
    pub devices: usize,
    pub last_seen: i64,
}

type Shard = Mutex<HashMap<Arc<str>, UserEntry>>;

pub struct Sessions {
    shards: Box<[Shard]>,
    hasher: RandomState,
    events: broadcast::Sender<PresenceEvent>,
}

/// Result of delivering a frame to a user's devices.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub devices: usize,
    /// Devices whose buffer was full; they are being disconnected and will RESUME.
    pub slow: usize,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::new()
    }
}

impl Sessions {
    pub fn new() -> Sessions {
        Sessions {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            events: broadcast::channel(4096).0,
        }
    }

    fn shard(&self, user: &str) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, UserEntry>> {
        let i = self.hasher.hash_one(user) as usize % SHARDS;
        // A poisoned shard only means another thread panicked mid-update of plain data.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Announced presence changes (ONLINE / OFFLINE after the grace period), for webhooks.
    pub fn subscribe_events(&self) -> broadcast::Receiver<PresenceEvent> {
        self.events.subscribe()
    }

    /// Adds a connection. Returns true when it is the user's first device.
    pub fn register(&self, user: &Arc<str>, conn: ConnHandle) -> bool {
        let mut shard = self.shard(user);
        let entry = shard.entry(user.clone()).or_default();
        entry.conns.push(conn);
        entry.conns.len() == 1
    }

    /// Marks the user as announced ONLINE if it is connected and was not announced yet. Returns
    /// true when the caller must broadcast ONLINE (false: already announced, e.g. a reconnect
    /// within the grace period).
    pub fn announce_online(&self, user: &Arc<str>) -> bool {
        let changed = {
            let mut shard = self.shard(user);
            match shard.get_mut(user) {
                Some(e) if !e.conns.is_empty() && !e.announced => {
                    e.announced = true;
                    true
                }
                _ => false,
            }
        };
        if changed {
            let _ = self.events.send(PresenceEvent {
                user: user.clone(),
                online: true,
                at: bimip_proto::now_ms(),
            });
        }
        changed
    }

    /// After the grace period: if the user still has no device and was announced ONLINE, forgets
    /// it and returns its `last_seen` (the caller broadcasts OFFLINE). None: it came back, or was
    /// never announced.
    /// `grace_ms`: how long the user must have been gone; a timer of an earlier disconnect that
    /// fires before that (the user came back and left again) announces nothing.
    pub fn announce_offline(&self, user: &Arc<str>, grace_ms: i64) -> Option<i64> {
        let last_seen = {
            let mut shard = self.shard(user);
            let e = shard.get(user)?;
            if !e.conns.is_empty() || bimip_proto::now_ms() - e.last_seen < grace_ms {
                return None;
            }
            let (announced, last_seen) = (e.announced, e.last_seen);
            shard.remove(user);
            announced.then_some(last_seen)?
        };
        let _ = self.events.send(PresenceEvent {
            user: user.clone(),
            online: false,
            at: last_seen,
        });
        Some(last_seen)
    }

    /// Removes a connection. Returns `Some(last_seen)` when it was the user's last device.
    pub fn unregister(&self, user: &Arc<str>, conn_id: u64) -> Option<i64> {
        let now = bimip_proto::now_ms();
        let last = {
            let mut shard = self.shard(user);
            let entry = shard.get_mut(user)?;
            let before = entry.conns.len();
            entry.conns.retain(|c| c.id != conn_id);
            if before > 0 && entry.conns.is_empty() {
                entry.last_seen = now;
                true
            } else {
                false
            }
        };
        last.then_some(now)
    }

    /// Sends `frame` to every connection of `user` except `except` (a connection id). A
    /// connection whose buffer is full is told to close as slow: its items stay queued in the
    /// store for RESUME, so nothing is lost.
    pub fn deliver(&self, user: &str, frame: &Arc<Outbound>, except: Option<u64>) -> Delivered {
        self.deliver_to(user, frame, except, None)
    }

    /// [`Self::deliver`], also collecting into `reached` the device id of every connection
    /// that took the frame. A connection whose outbox was full is being closed as slow: it did
    /// not get the frame, so its device is not counted as reached (it gets a push if it has a
    /// token, and catches up when it reconnects).
    pub fn deliver_to(
        &self,
        user: &str,
        frame: &Arc<Outbound>,
        except: Option<u64>,
        mut reached: Option<&mut Vec<Arc<str>>>,
    ) -> Delivered {
        let mut d = Delivered::default();
        let shard = self.shard(user);
        let Some(entry) = shard.get(user) else {
            return d;
        };
        for conn in entry.conns.iter().filter(|c| Some(c.id) != except) {
            let offered = conn.offer(frame);
            if offered {
                d.devices += 1;
            } else if !conn.tx.is_closed() {
                d.slow += 1;
            }
            if offered && let Some(r) = reached.as_deref_mut() {
                r.push(conn.device.clone());
            }
        }
        d
    }

    /// Whether `device` of `user` has an open connection.
    pub fn device_online(&self, user: &str, device: &str) -> bool {
        self.shard(user)
            .get(user)
            .is_some_and(|e| e.conns.iter().any(|c| &*c.device == device))
    }

    /// The device ids of the user's open connections (a device with two connections once).
    pub fn devices(&self, user: &str) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = self
            .shard(user)
            .get(user)
            .map(|e| e.conns.iter().map(|c| c.device.clone()).collect())
            .unwrap_or_default();
        out.sort();
        out.dedup();
        out
    }

    /// Whether `user` has an online connection other than `except` (a frame for it is only
    /// built when there is someone to deliver it to).
    pub fn has_other(&self, user: &str, except: Option<u64>) -> bool {
        self.shard(user)
            .get(user)
            .is_some_and(|e| e.conns.iter().any(|c| Some(c.id) != except))
    }

    pub fn snapshot(&self, user: &str) -> PresenceSnapshot {
        let shard = self.shard(user);
        match shard.get(user) {
            Some(e) => PresenceSnapshot {
                online: !e.conns.is_empty(),
                devices: e.conns.len(),
                last_seen: e.last_seen,
            },
            None => PresenceSnapshot {
                online: false,
                devices: 0,
                last_seen: 0,
            },
        }
    }

    pub fn is_online(&self, user: &str) -> bool {
        self.shard(user)
            .get(user)
            .is_some_and(|e| !e.conns.is_empty())
    }

    /// Every connection, with its user.
    pub fn all(&self) -> Vec<(Arc<str>, ConnHandle)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for (user, entry) in shard.iter() {
                out.extend(entry.conns.iter().map(|c| (user.clone(), c.clone())));
            }
        }
        out
    }

    /// Asks every connection to close (shutdown).
    pub fn close_all(&self, why: Disconnect) {
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for entry in shard.values() {
                for c in &entry.conns {
                    c.signal.close(why);
                }
            }
        }
    }

    /// Asks the connections of one user (optionally one device) to close.
    pub fn kick(&self, user: &str, device: Option<&str>, why: Disconnect) -> usize {
        let shard = self.shard(user);
        let Some(entry) = shard.get(user) else {
            return 0;
        };
        let mut n = 0;
        for c in entry
            .conns
            .iter()
            .filter(|c| device.is_none_or(|d| &*c.device == d))
        {
            c.signal.close(why);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(id: u64, cap: usize) -> (ConnHandle, mpsc::Receiver<Arc<Outbound>>) {
        let (tx, rx) = mpsc::channel(cap);
        (
            ConnHandle {
                id,
                device: format!("d{id}").into(),
                tx,
                signal: Arc::default(),
            },
            rx,
        )
    }

    #[tokio::test]
    async fn rollup_online_offline_with_many_devices() {
        let s = Sessions::new();
        let mut events = s.subscribe_events();
        let alice: Arc<str> = "alice".into();
        let (h1, _r1) = handle(1, 8);
        let (h2, _r2) = handle(2, 8);
        assert!(s.register(&alice, h1));
        assert!(!s.register(&alice, h2));
        assert!(s.announce_online(&alice));
        assert!(!s.announce_online(&alice), "announced once");
        assert_eq!(s.snapshot("alice").devices, 2);
        assert_eq!(s.unregister(&alice, 1), None);
        assert!(s.is_online("alice"));
        let last = s.unregister(&alice, 2).expect("last device");
        assert!(!s.is_online("alice"));
        assert_eq!(s.snapshot("alice").last_seen, last);
        assert_eq!(s.announce_offline(&alice, 0), Some(last));
        assert_eq!(s.announce_offline(&alice, 0), None, "announced once");
        let e1 = events.recv().await.expect("online");
        assert!(e1.online);
        let e2 = events.recv().await.expect("offline");
        assert!(!e2.online);
        assert_eq!(e2.at, last);
        assert!(events.try_recv().is_err(), "no event for the second device");
    }

    #[test]
    fn a_reconnect_within_the_grace_period_is_not_announced() {
        let s = Sessions::new();
        let u: Arc<str> = "u".into();
        let (h1, _r1) = handle(1, 8);
        s.register(&u, h1);
        assert!(s.announce_online(&u));
        s.unregister(&u, 1).expect("last");
        let (h2, _r2) = handle(2, 8);
        s.register(&u, h2);
        // The grace timer fires while the user is back: nothing to announce either way.
        assert_eq!(s.announce_offline(&u, 0), None);
        assert!(!s.announce_online(&u));
    }

    #[tokio::test]
    async fn full_buffer_closes_the_connection_as_slow() {
        let s = Sessions::new();
        let bob: Arc<str> = "bob".into();
        let (h, _rx) = handle(7, 1);
        let signal = h.signal.clone();
        s.register(&bob, h);
        let f = Outbound::new(Frame::default());
        assert_eq!(s.deliver("bob", &f, None).devices, 1);
        assert_eq!(s.deliver("bob", &f, None).slow, 1);
        assert_eq!(signal.closed().await, Disconnect::Slow);
    }

    #[tokio::test]
    async fn the_byte_limit_closes_before_the_frame_limit() {
        let (tx, mut rx) = mpsc::channel(100);
        let h = ConnHandle {
            id: 1,
            device: "d".into(),
            tx,
            signal: Arc::new(ConnSignal::with_max_bytes(100)),
        };
        let big = Outbound::new(Frame {
            r#ref: 1,
            body: Some(bimip_proto::Body::Ping(bimip_proto::v1::Ping {
                timestamp: 1,
            })),
        });
        let size = big.size();
        let fit = 100 / size;
        for _ in 0..fit {
            assert!(h.offer(&big));
        }
        assert!(!h.offer(&big), "over the byte limit");
        assert_eq!(h.signal.closed().await, Disconnect::Slow);
        assert_eq!(h.signal.queued_bytes(), fit * size);
        let out = rx.recv().await.expect("queued");
        h.signal.release(out.size());
        assert_eq!(h.signal.queued_bytes(), (fit - 1) * size);
    }
}
