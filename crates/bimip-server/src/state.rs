//! The server's shared state: one `Arc<AppState>` cloned into every connection and handler. It
//! only wires the parts together; each part owns its own state (the hub its registry, the store
//! its files, the block cache its entries).

use crate::{
    auth::Verifier, blocks::BlockCache, config::Config, hub::Hub, limits::ConnLimits,
    metrics::Metrics, revocations::Revocations, tasks::Tasks,
};
use bimip_store::Store;
use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};
use tokio_util::task::TaskTracker;

pub struct AppState {
    pub config: Config,
    pub store: Store,
    /// Who is connected where; the delivery decision.
    pub hub: Hub,
    pub blocks: BlockCache,
    pub metrics: Arc<Metrics>,
    pub verifier: Verifier,
    /// Connections per user and in total (checked before the upgrade).
    pub conn_limits: Arc<ConnLimits>,
    /// Per-user `not_before` of revoked tokens.
    pub revocations: Revocations,
    /// Background tasks (grace timers, workers), drained at shutdown after the connections.
    pub tasks: Tasks,
    /// Connection tasks, waited for at shutdown before the background tasks.
    pub connections: TaskTracker,
    /// False once shutdown began: new upgrades are refused and `/readyz` says so.
    pub accepting: AtomicBool,
    next_conn_id: AtomicU64,
}

pub type Shared = Arc<AppState>;

impl AppState {
    pub fn new(
        config: Config,
        store: Store,
        metrics: Arc<Metrics>,
        verifier: Verifier,
        revocations: Revocations,
    ) -> AppState {
        AppState {
            conn_limits: Arc::new(ConnLimits::new(
                config.limits.max_connections_per_user,
                config.limits.max_connections,
            )),
            revocations,
            config,
            store,
            hub: Hub::new(),
            blocks: BlockCache::default(),
            metrics,
            verifier,
            tasks: Tasks::new(),
            connections: TaskTracker::new(),
            accepting: AtomicBool::new(true),
            next_conn_id: AtomicU64::new(1),
        }
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }
}
