//! The server's shared state: one `Arc<AppState>` cloned into every connection and handler. It
//! only wires the parts together; each part owns its own state (the hub its registry, the store
//! its files, the block cache its entries).

use crate::{
    auth::Verifier,
    config::Config,
    hub::Hub,
    limits::ConnLimits,
    metrics::Metrics,
    profile_cache::ProfileCache,
    push::{Push, outbox::Outbox},
    revocations::Revocations,
    tasks::Tasks,
    webhooks::Events,
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
    pub hub: Arc<Hub>,
    /// Push notifications (the hub's missed-delivery sink).
    pub push: Arc<Push>,
    /// Outgoing event webhooks.
    pub events: Arc<Events>,
    /// The durable outbox of push and event jobs.
    pub outbox: Arc<Outbox>,
    /// Blocks and DND of users, read through from the store.
    pub profiles: Arc<ProfileCache>,
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

/// The parts `AppState` wires together, built by [`crate::run`].
pub struct Parts {
    pub config: Config,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub verifier: Verifier,
    pub revocations: Revocations,
    pub hub: Arc<Hub>,
    pub push: Arc<Push>,
    pub events: Arc<Events>,
    pub outbox: Arc<Outbox>,
    pub profiles: Arc<ProfileCache>,
    pub tasks: Tasks,
}

impl AppState {
    pub fn new(p: Parts) -> AppState {
        AppState {
            conn_limits: Arc::new(ConnLimits::new(
                p.config.limits.max_connections_per_user,
                p.config.limits.max_connections,
            )),
            revocations: p.revocations,
            config: p.config,
            store: p.store,
            hub: p.hub,
            push: p.push,
            events: p.events,
            outbox: p.outbox,
            profiles: p.profiles,
            metrics: p.metrics,
            verifier: p.verifier,
            tasks: p.tasks,
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
