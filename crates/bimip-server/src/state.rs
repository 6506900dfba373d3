//! The server's shared state: one `Arc<AppState>` cloned into every connection and handler.

use crate::{
    auth::Verifier, awareness::Presence, config::Config, limits::ConnLimits, metrics::Metrics,
    revocations::Revocations, sessions::Sessions,
};
use bimip_store::Store;
use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

pub struct AppState {
    pub config: Config,
    pub store: Store,
    pub sessions: Sessions,
    pub presence: Presence,
    pub blocks: crate::blocks::BlockCache,
    pub metrics: Arc<Metrics>,
    pub verifier: Verifier,
    /// Connections per user and in total (checked before the upgrade).
    pub conn_limits: Arc<ConnLimits>,
    /// Per-user `not_before` of revoked tokens.
    pub revocations: Revocations,
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
            sessions: Sessions::new(),
            presence: Presence::default(),
            blocks: Default::default(),
            metrics,
            verifier,
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
