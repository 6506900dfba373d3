//! The Redis backend: the same queue, cursor, profile and push contract as the file store, kept
//! in one Redis (7.0 or later) so that several bimip nodes share one user base.
//!
//! Every store operation is one Lua script (EVALSHA, loaded again after a `NOSCRIPT`), so it is
//! atomic and costs one round trip. Keys of one user share the hash tag `{user}`
//! (see [`Keys`]); user ids cannot contain `{`, `}` or `:`. A reply from Redis means the write
//! is as durable as Redis's own settings make it: with `appendonly yes` and
//! `appendfsync always` it was fsynced before the reply was sent (docs/OPERATIONS.md), so
//! [`crate::Pending`] results are handed out ready.

mod check;
mod keys;
mod profile;
mod push;
mod queue;
mod revocations;
pub mod test_server;

use std::{
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use redis::{
    AsyncConnectionConfig, Client, RedisError,
    aio::{ConnectionManager, ConnectionManagerConfig},
};

pub use check::{
    RawValue, RedisCheckReport, RedisProblem, RedisStreamEntry, RedisUserDump, check_redis,
    inspect_redis_user,
};
pub use keys::Keys;
pub use push::JOB_TOMBSTONE_TTL;

use crate::StoreError;

/// Requests queued in the client before they are written to Redis.
const PIPELINE_BUFFER: usize = 4096;

/// How a Redis backend connects and what it keeps.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://…` (TLS).
    pub url: String,
    /// Prefix of every key and channel (default `bimip`).
    pub prefix: String,
    /// How long one command may take before it fails with [`StoreError::Unavailable`]. Longer
    /// than a slow `appendfsync always` fsync.
    pub response_timeout: Duration,
    /// Acknowledged items older than this are dropped; zero keeps them forever.
    pub retention: Duration,
    /// Most items kept per user queue; 0 = no limit.
    pub max_queue_items: usize,
}

impl RedisConfig {
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            prefix: "bimip".into(),
            response_timeout: Duration::from_secs(5),
            retention: crate::DEFAULT_RETENTION,
            max_queue_items: crate::DEFAULT_MAX_QUEUE_ITEMS,
        }
    }
}

/// The Redis backend. Cheap to clone: one multiplexed connection (reconnected in the
/// background) is shared by every clone and every task.
#[derive(Clone)]
pub struct RedisStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) client: Client,
    pub(crate) conn: ConnectionManager,
    pub(crate) keys: Keys,
    pub(crate) cfg: RedisConfig,
    /// Set by `shutdown`: later queue calls answer [`StoreError::Closed`].
    pub(crate) closed: AtomicBool,
}

impl RedisStore {
    /// Connects (failing with [`StoreError::Unavailable`] when Redis does not answer) and checks
    /// the server is Redis 7.0 or later.
    pub async fn connect(cfg: RedisConfig) -> Result<RedisStore, StoreError> {
        let client = Client::open(cfg.url.as_str())
            .map_err(|e| StoreError::Invalid(format!("redis url {:?}: {e}", redact(&cfg.url))))?;
        let mcfg = ConnectionManagerConfig::new()
            .set_response_timeout(Some(cfg.response_timeout))
            .set_connection_timeout(Some(cfg.response_timeout))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(2))
            // The client's queue of requests not yet written. With its default (50) and about
            // 1,600 requests waiting on it, the connection was seen to stop sending altogether
            // (bench chat, 200 pairs × 8 in flight); with this size it keeps going.
            .set_pipeline_buffer_size(PIPELINE_BUFFER);
        let conn = client
            .get_connection_manager_with_config(mcfg)
            .await
            .map_err(unavailable)?;
        let store = RedisStore {
            inner: Arc::new(Inner {
                client,
                conn,
                keys: Keys::new(&cfg.prefix),
                cfg,
                closed: AtomicBool::new(false),
            }),
        };
        let version = store.server_version().await?;
        if version >= (7, 0) {
            store.load_scripts(&[]).await?;
        }
        if version < (7, 0) {
            return Err(StoreError::Invalid(format!(
                "redis {}.{} is too old: bimip needs 7.0 or later",
                version.0, version.1
            )));
        }
        Ok(store)
    }

    /// Loads the store's scripts, and `extra`, into Redis's script cache. Done at
    /// start and after Redis was restarted (its cache is empty then): otherwise every request in
    /// flight would find its script missing at once and load it again, each load compiling the
    /// same script, which under load delays everything behind it past the timeout.
    pub async fn load_scripts(&self, extra: &[&redis::Script]) -> Result<(), StoreError> {
        let all = queue::scripts()
            .into_iter()
            .chain(profile::scripts())
            .chain(push::scripts())
            .chain(revocations::scripts())
            .chain(extra.iter().copied());
        let mut conn = self.connection();
        for s in all {
            s.load_async(&mut conn).await.map_err(map_err)?;
        }
        Ok(())
    }

    /// The key names this store uses.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    pub fn config(&self) -> &RedisConfig {
        &self.inner.cfg
    }

    /// A handle on the shared command connection (for the server's node registry and routing).
    pub fn connection(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    /// A new dedicated connection (for pub/sub), with the store's timeouts.
    pub async fn dedicated_connection(
        &self,
        config: AsyncConnectionConfig,
    ) -> Result<redis::aio::MultiplexedConnection, StoreError> {
        self.inner
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(unavailable)
    }

    /// The client (to open pub/sub connections).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    async fn server_version(&self) -> Result<(u32, u32), StoreError> {
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut self.connection())
            .await
            .map_err(map_err)?;
        let v = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("0.0");
        let mut parts = v.trim().split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        Ok((parts.next().unwrap_or(0), parts.next().unwrap_or(0)))
    }

    /// What this Redis's settings promise less than "no acknowledged message is lost": one
    /// line per weaker setting (empty when `appendonly yes`, `appendfsync always`,
    /// `maxmemory-policy noeviction` and no replicas). Servers that refuse `CONFIG GET`
    /// (managed offerings) get one line saying the settings could not be checked.
    pub async fn durability_warnings(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.connection();
        let mut out = Vec::new();
        let got: Result<Vec<String>, RedisError> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("appendonly")
            .arg("appendfsync")
            .arg("maxmemory-policy")
            .arg("no-appendfsync-on-rewrite")
            .query_async(&mut conn)
            .await;
        let pairs = match got {
            Ok(v) => v,
            Err(e) if is_unavailable(&e) => return Err(unavailable(e)),
            Err(e) => {
                out.push(format!(
                    "cannot read the Redis settings (CONFIG GET: {e}); make sure appendonly=yes, \
                     appendfsync=always and maxmemory-policy=noeviction"
                ));
                return Ok(out);
            }
        };
        let get = |k: &str| {
            pairs
                .chunks(2)
                .find(|c| c.first().map(String::as_str) == Some(k))
                .and_then(|c| c.get(1))
                .map(String::as_str)
                .unwrap_or("")
        };
        if get("appendonly") != "yes" {
            out.push(format!(
                "appendonly={}: without the append-only file a Redis restart loses everything since \
                 the last snapshot (set appendonly yes)",
                get("appendonly")
            ));
        } else if get("appendfsync") != "always" {
            out.push(format!(
                "appendfsync={}: a crash of Redis or its machine can lose about the last {} of \
                 acknowledged messages (set appendfsync always)",
                get("appendfsync"),
                if get("appendfsync") == "everysec" {
                    "2 s"
                } else {
                    "30 s or more"
                }
            ));
        }
        if get("no-appendfsync-on-rewrite") == "yes" {
            out.push(
                "no-appendfsync-on-rewrite=yes: writes during an AOF rewrite are not fsynced \
                 (set it to no)"
                    .into(),
            );
        }
        if get("maxmemory-policy") != "noeviction" {
            out.push(format!(
                "maxmemory-policy={}: Redis may evict queue keys when memory runs out (set \
                 maxmemory-policy noeviction)",
                get("maxmemory-policy")
            ));
        }
        let repl: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        let replicas = repl
            .lines()
            .find_map(|l| l.strip_prefix("connected_slaves:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0);
        if replicas > 0 {
            out.push(format!(
                "{replicas} replica(s): replication is asynchronous, a failover can lose \
                 acknowledged messages"
            ));
        }
        Ok(out)
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// Whether an error means "Redis could not be reached or did not answer" (the command may or
/// may not have run) rather than "Redis refused or failed the command".
pub(crate) fn is_unavailable(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.code(),
            Some("LOADING" | "BUSY" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN" | "READONLY")
        )
}

pub(crate) fn unavailable(e: RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Maps a Redis error to the store's: unreachable → [`StoreError::Unavailable`]; out of memory
/// (`maxmemory` with `noeviction`) and a failing disk (`MISCONF`) too, since retrying later
/// may work; anything else (a script error, a wrong type) → [`StoreError::Internal`].
pub fn map_err(e: RedisError) -> StoreError {
    if is_unavailable(&e) || matches!(e.code(), Some("OOM" | "MISCONF" | "NOREPLICAS")) {
        return unavailable(e);
    }
    StoreError::Internal(e.to_string())
}
