//! The bimip server as a library: [`run`] serves the HTTP API and the WebSocket gateway on a
//! listener the caller bound (tests bind `127.0.0.1:0`), until `shutdown` resolves.

pub mod api;
pub mod auth;
pub mod awareness;
pub mod config;
pub mod conn;
pub mod delivery;
pub mod fanout;
pub mod gateway;
pub mod metrics;
pub mod sessions;
pub mod state;

pub use config::Config;

use bimip_store::{FileStore, QueueStore, Store, StoreConfig};
use std::{future::Future, sync::Arc, sync::atomic::Ordering, time::Duration};
use tokio::net::TcpListener;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("store: {0}")]
    Store(#[from] bimip_store::StoreError),
    #[error("serving HTTP: {0}")]
    Io(#[from] std::io::Error),
}

/// How long shutdown waits for connections to close before it flushes the store anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Opens the store (recovering it), then serves until `shutdown` resolves: stops accepting,
/// closes every connection with 1001, flushes and fsyncs the store.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    config.validate()?;
    let verifier = auth::Verifier::from_config(&config.jwt)?;
    let metrics = Arc::new(metrics::Metrics::new());
    let store_cfg = StoreConfig {
        data_dir: config.data_dir.clone(),
        fsync: config.fsync,
        shards: config.store.shards,
        max_open_files: config.store.max_open_files,
        cache_users: config.store.cache_users,
        repair: config.repair,
        retention: Duration::from_secs(config.store.retention_secs),
        max_queue_items: config.store.max_queue_items,
        observer: Some(Arc::new(metrics::StoreMetrics(metrics.clone()))),
    };
    let started = std::time::Instant::now();
    let (file_store, report) = tokio::task::spawn_blocking(move || FileStore::open(store_cfg))
        .await
        .map_err(|e| std::io::Error::other(format!("store open task: {e}")))??;
    tracing::info!(
        users = report.users,
        records = report.records,
        truncated = report.truncated.len(),
        repaired = report.repaired.len(),
        took_ms = started.elapsed().as_millis() as u64,
        data_dir = %config.data_dir.display(),
        fsync = ?config.fsync,
        "store opened"
    );
    let state = Arc::new(state::AppState::new(
        config,
        Store::File(file_store),
        metrics,
        verifier,
    ));
    let app = api::router(state.clone());
    let stopping = state.clone();
    let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        stopping.accepting.store(false, Ordering::Release);
        stopping.sessions.close_all(sessions::Disconnect::Shutdown);
    });
    serve.await?;
    // Upgraded WebSockets are not tracked by the HTTP server: wait for them to finish closing.
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    while state.metrics.connections.get() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    state.store.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}
