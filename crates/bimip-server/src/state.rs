//! The server's shared state: one `Arc<AppState>` cloned into every connection and handler.

use crate::{
    auth::Verifier, awareness::Presence, config::Config, metrics::Metrics, sessions::Sessions,
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
    pub metrics: Arc<Metrics>,
    pub verifier: Verifier,
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
    ) -> AppState {
        AppState {
            config,
            store,
            sessions: Sessions::new(),
            presence: Presence::default(),
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
