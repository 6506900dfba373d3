//! Several nodes on one Redis: the cluster-wide presence registry with node leases, and
//! routing of frames to the nodes that hold a user's other connections.
//!
//! - **Registry.** `P:{user}:pres` holds the user's connections on every node
//!   (`c:<incarnation>:<conn>` → device), their count `n`, whether ONLINE was announced (`a`) and
//!   the last seen time (`ls`); `P:node:<incarnation>:conns` indexes a node's connections so a
//!   dead node can be cleaned up. Connect and disconnect are one script each, so exactly one
//!   node announces ONLINE, and exactly one announces OFFLINE (the claim in `offline.lua`).
//! - **Leases.** Each node process runs as an *incarnation* (`<name>/<random>`) holding a lease
//!   in `P:nodes` (deadline from Redis's clock), renewed every heartbeat. Every node looks for
//!   lapsed leases and reaps them: one node takes `P:reap:<incarnation>`, runs the disconnect
//!   script for each of the dead incarnation's connections (so its users become due for OFFLINE
//!   after the grace period) and deletes its index. No keyspace notifications are used.
//! - **Routing.** A frame for a user goes to each other node holding one of its connections with
//!   one PUBLISH per node (`route.lua`), never one per device; awareness changes are one PUBLISH
//!   to every node carrying the watcher list. Pub/sub may drop: the queue is the truth, and a
//!   node whose subscription broke re-sends its connections their fan-out when it is back.
//! - **Redis unavailable.** Calls fail fast; the node falls back to its local registry and,
//!   once Redis answers again, registers all its connections under a new incarnation and reaps
//!   its old one ([`Cluster::resync_needed`]).

pub mod envelope;
mod serve;

pub use serve::{leave, start};

use crate::sessions::Outbound;
use bimip_store::{RedisStore, StoreError, redis::Keys};
use redis::{Script, aio::ConnectionManager};
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::Duration,
};

use envelope::Envelope;

/// How the cluster layer is tuned.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// This node's name (`Welcome.node`); unique among the live nodes.
    pub node: String,
    /// Lease renewal interval.
    pub heartbeat: Duration,
    /// How long a lease lasts without renewal; a node silent this long is reaped.
    pub lease: Duration,
    /// How long a user whose last connection went away stays ONLINE.
    pub grace: Duration,
}

struct Scripts {
    connect: Script,
    disconnect: Script,
    offline: Script,
    route: Script,
    lease: Script,
    due: Script,
    job_tags: Script,
}

pub struct Cluster {
    settings: ClusterSettings,
    conn: ConnectionManager,
    store: RedisStore,
    keys: Keys,
    scripts: Scripts,
    /// The current incarnation (`<name>/<random>`): changes when the node re-registers.
    incarnation: Mutex<Arc<str>>,
    /// Some call to Redis failed since the last re-registration: register again once it answers.
    resync: AtomicBool,
    /// When the node last (re)gained a working link to Redis (unix ms, local clock); reaping
    /// waits one lease after it, so peers that could not renew during an outage are not reaped.
    linked_since: AtomicI64,
    /// When this node last saw its own probe on its subscription (unix ms).
    last_probe: AtomicI64,
}

fn new_incarnation(name: &str) -> Arc<str> {
    format!("{name}/{:08x}", rand::random::<u32>()).into()
}

impl Cluster {
    /// Takes a lease for a new incarnation of this node.
    pub async fn join(store: RedisStore, settings: ClusterSettings) -> Result<Cluster, StoreError> {
        let c = Cluster {
            conn: store.connection(),
            keys: store.keys().clone(),
            store,
            scripts: Scripts {
                connect: Script::new(include_str!("lua/connect.lua")),
                disconnect: Script::new(include_str!("lua/disconnect.lua")),
                offline: Script::new(include_str!("lua/offline.lua")),
                route: Script::new(include_str!("lua/route.lua")),
                lease: Script::new(include_str!("lua/lease.lua")),
                due: Script::new(include_str!("lua/due.lua")),
                job_tags: Script::new(include_str!("lua/job_tags.lua")),
            },
            incarnation: Mutex::new(new_incarnation(&settings.node)),
            settings,
            resync: AtomicBool::new(false),
            linked_since: AtomicI64::new(bimip_proto::now_ms()),
            last_probe: AtomicI64::new(bimip_proto::now_ms()),
        };
        c.load_scripts().await?;
        c.take_lease().await?;
        Ok(c)
    }

    pub fn node(&self) -> &str {
        &self.settings.node
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    pub fn store(&self) -> &RedisStore {
        &self.store
    }

    pub fn incarnation(&self) -> Arc<str> {
        self.incarnation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Loads the store's and the cluster's scripts into Redis (at start, and after Redis came
    /// back: a restarted Redis has an empty script cache).
    pub async fn load_scripts(&self) -> Result<(), StoreError> {
        let s = &self.scripts;
        let mine = [
            &s.connect,
            &s.disconnect,
            &s.offline,
            &s.route,
            &s.lease,
            &s.due,
            &s.job_tags,
        ];
        let r = self.store.load_scripts(&mine).await;
        if let Err(e) = &r {
            self.failed(e);
        }
        r
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn grace_ms(&self) -> u64 {
        self.settings.grace.as_millis() as u64
    }

    /// Marks that Redis failed a call: the registry may now disagree with this node's
    /// connections, so they are registered again once Redis answers.
    pub fn failed(&self, e: &StoreError) {
        if !self.resync.swap(true, Ordering::AcqRel) {
            tracing::warn!(error = %e, "redis unavailable: presence is node-local until it is back");
        }
    }

    pub fn resync_needed(&self) -> bool {
        self.resync.load(Ordering::Acquire)
    }

    fn check<T>(&self, r: redis::RedisResult<T>) -> Result<T, StoreError> {
        r.map_err(|e| {
            let e = map_redis(e);
            self.failed(&e);
            e
        })
    }

    async fn take_lease(&self) -> Result<(), StoreError> {
        let inc = self.incarnation();
        let r: redis::RedisResult<i64> = self
            .scripts
            .lease
            .key(self.keys.nodes())
            .arg(&*inc)
            .arg(self.settings.lease.as_millis() as u64)
            .arg("1")
            .invoke_async(&mut self.conn())
            .await;
        self.check(r)?;
        Ok(())
    }

    /// Renews the lease; `Ok(false)` when it was gone (the node was reaped).
    async fn renew_lease(&self) -> Result<bool, StoreError> {
        let inc = self.incarnation();
        let r: redis::RedisResult<i64> = self
            .scripts
            .lease
            .key(self.keys.nodes())
            .arg(&*inc)
            .arg(self.settings.lease.as_millis() as u64)
            .arg("0")
            .invoke_async(&mut self.conn())
            .await;
        Ok(self.check(r)? >= 0)
    }

    async fn connect_as(
        &self,
        inc: &str,
        user: &str,
        conn_id: u64,
        device: &str,
    ) -> Result<bool, StoreError> {
        let r: redis::RedisResult<i64> = self
            .scripts
            .connect
            .key(self.keys.presence(user))
            .key(self.keys.node_conns(inc))
            .key(self.keys.offline_due())
            .arg(inc)
            .arg(conn_id)
            .arg(device)
            .arg(user)
            .invoke_async(&mut self.conn())
            .await;
        Ok(self.check(r)? == 1)
    }

    /// A connection of `user` opened on this node. Returns true when the user was not
    /// announced ONLINE anywhere yet: the caller announces it.
    pub async fn connected(
        &self,
        user: &str,
        conn_id: u64,
        device: &str,
    ) -> Result<bool, StoreError> {
        let inc = self.incarnation();
        self.connect_as(&inc, user, conn_id, device).await
    }

    async fn disconnect_as(
        &self,
        inc: &str,
        user: &str,
        conn_id: &str,
    ) -> Result<(i64, i64), StoreError> {
        let r: redis::RedisResult<(i64, i64)> = self
            .scripts
            .disconnect
            .key(self.keys.presence(user))
            .key(self.keys.node_conns(inc))
            .key(self.keys.offline_due())
            .arg(inc)
            .arg(conn_id)
            .arg(user)
            .arg(self.grace_ms())
            .invoke_async(&mut self.conn())
            .await;
        self.check(r)
    }

    /// A connection of `user` on this node closed. Returns `Some(last_seen)` when it was the
    /// user's last connection on any node.
    pub async fn disconnected(&self, user: &str, conn_id: u64) -> Result<Option<i64>, StoreError> {
        let inc = self.incarnation();
        let (left, now) = self.disconnect_as(&inc, user, &conn_id.to_string()).await?;
        Ok((left == 0).then_some(now))
    }

    /// After the grace period: claims the OFFLINE announcement of `user`. `Some(last_seen)`
    /// for exactly one caller when the user is still gone and was announced ONLINE.
    pub async fn claim_offline(&self, user: &str) -> Result<Option<i64>, StoreError> {
        let r: redis::RedisResult<Option<i64>> = self
            .scripts
            .offline
            .key(self.keys.presence(user))
            .key(self.keys.offline_due())
            .arg(user)
            .invoke_async(&mut self.conn())
            .await;
        self.check(r)
    }

    /// Publishes `env` to the other nodes holding a connection of `user`; returns the devices
    /// connected there.
    pub async fn route(&self, user: &str, env: &Envelope) -> Result<Vec<String>, StoreError> {
        Ok(self.route_with_tokens(user, env).await?.devices)
    }

    /// [`Self::route`], also telling whether the user has a push token.
    pub async fn route_with_tokens(
        &self,
        user: &str,
        env: &Envelope,
    ) -> Result<Routed, StoreError> {
        let r: redis::RedisResult<Vec<redis::Value>> = self
            .scripts
            .route
            .key(self.keys.presence(user))
            .key(self.keys.nodes())
            .key(self.keys.tokens(user))
            .arg(self.node())
            .arg(self.keys.node_channel(""))
            .arg(env.to_bytes())
            .invoke_async(&mut self.conn())
            .await;
        let mut values = self.check(r)?.into_iter();
        let has_tokens = matches!(values.next(), Some(redis::Value::Int(1)));
        let devices = values
            .filter_map(|v| redis::from_redis_value::<String>(v).ok())
            .collect();
        Ok(Routed {
            devices,
            has_tokens,
        })
    }

    /// Offers `frame` to `user`'s connections on the other nodes; returns how many devices
    /// are connected there.
    pub async fn deliver_remote(&self, user: &str, frame: &Outbound) -> Result<usize, StoreError> {
        Ok(self
            .deliver_remote_devices(user, frame)
            .await?
            .devices
            .len())
    }

    /// [`Self::deliver_remote`], returning the devices (one entry per connection) and whether
    /// the user has a push token.
    pub async fn deliver_remote_devices(
        &self,
        user: &str,
        frame: &Outbound,
    ) -> Result<Routed, StoreError> {
        let mut env = Envelope::new(self.node(), envelope::DELIVER).with_frame(&frame.frame);
        env.users.push(user.to_string());
        self.route_with_tokens(user, &env).await
    }

    /// Publishes `env` to every node (this one included; it skips its own).
    pub async fn publish_all(&self, env: &Envelope) -> Result<(), StoreError> {
        let r: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(self.keys.all_channel())
            .arg(env.to_bytes())
            .query_async(&mut self.conn())
            .await;
        self.check(r).map(drop)
    }

    /// The user's presence across the cluster: (connections, device ids, announced, last seen).
    pub async fn presence(&self, user: &str) -> Result<ClusterPresence, StoreError> {
        let r: redis::RedisResult<Vec<(String, String)>> = redis::cmd("HGETALL")
            .arg(self.keys.presence(user))
            .query_async(&mut self.conn())
            .await;
        let mut p = ClusterPresence::default();
        for (k, v) in self.check(r)? {
            match k.as_str() {
                "a" => p.announced = v == "1",
                "ls" => p.last_seen = v.parse().unwrap_or(0),
                _ if k.starts_with("c:") => p.devices.push(v),
                _ => {}
            }
        }
        p.devices.sort();
        p.connections = p.devices.len();
        p.devices.dedup();
        Ok(p)
    }
}

impl Cluster {
    /// A new push-job tag for this node (the top bits of the job ids it makes), and the tags of
    /// its own previous runs and of dead nodes, which it takes over.
    pub async fn job_tags_at_start(&self) -> Result<(u64, Vec<u64>), StoreError> {
        // 12 bits of tag; 0 is the file store's.
        let tag = self.store.reserve_job_ids(1).await? % 4095 + 1;
        let taken = self.take_job_tags(Some(tag), true).await?;
        Ok((tag, taken))
    }

    /// Tags of dead nodes taken over now (their jobs are to be adopted).
    pub async fn take_orphan_job_tags(&self) -> Result<Vec<u64>, StoreError> {
        self.take_job_tags(None, false).await
    }

    async fn take_job_tags(&self, new: Option<u64>, own: bool) -> Result<Vec<u64>, StoreError> {
        let r: redis::RedisResult<Vec<u64>> = self
            .scripts
            .job_tags
            .key(self.keys.global("push:job_tags"))
            .key(self.keys.nodes())
            .arg(self.node())
            .arg(new.map(|t| t.to_string()).unwrap_or_default())
            .arg(if own { "1" } else { "0" })
            .invoke_async(&mut self.conn())
            .await;
        self.check(r)
    }
}

/// What routing a frame found.
#[derive(Debug, Default)]
pub struct Routed {
    /// Devices on the other nodes that were sent the frame (one entry per connection).
    pub devices: Vec<String>,
    /// Whether the user has a push token (so the push decision may skip its own lookup).
    pub has_tokens: bool,
}

/// A user's presence as the registry has it.
#[derive(Debug, Default, Clone)]
pub struct ClusterPresence {
    pub connections: usize,
    /// Distinct device ids, sorted.
    pub devices: Vec<String>,
    pub announced: bool,
    pub last_seen: i64,
}

use bimip_store::redis::map_err as map_redis;
