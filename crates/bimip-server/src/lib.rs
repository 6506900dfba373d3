//! The bimip server as a library: [`run`] serves the HTTP API and the WebSocket gateway on a
//! listener the caller bound (tests bind `127.0.0.1:0`), until `shutdown` resolves.

pub mod api;
pub mod auth;
pub mod awareness;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod delivery;
pub mod error;
pub mod fanout;
pub mod gateway;
mod handlers;
pub mod history;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod profile_cache;
pub mod push;
pub mod revocations;
pub mod sessions;
pub mod state;
pub mod subscriptions;
pub mod tasks;
pub mod tls;
pub mod web;
pub mod webhooks;

pub use config::Config;

use bimip_store::{FileStore, QueueStore, RedisConfig, RedisStore, Store, StoreConfig};
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

/// Opens (recovering) the embedded file store.
async fn open_file_store(
    config: &Config,
    metrics: &Arc<metrics::Metrics>,
) -> Result<FileStore, ServerError> {
    let store_cfg = StoreConfig {
        data_dir: config.data_dir.clone(),
        fsync: config.fsync,
        shards: config.store.shards,
        max_open_files: config.store.max_open_files,
        cache_users: config.store.cache_users,
        repair: config.repair,
        retention: Duration::from_secs(config.store.retention_secs),
        max_queue_items: config.store.max_queue_items,
        commit_log: config.store.commit_log,
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
        commit_log = config.store.commit_log && config.fsync != bimip_store::FsyncMode::Never,
        commit_log_written_back = report.log.missing,
        "store opened"
    );
    Ok(file_store)
}

/// Connects to Redis and warns when its settings promise less than "no acknowledged message
/// lost" (docs/OPERATIONS.md, "Redis").
async fn open_redis_store(config: &Config, url: String) -> Result<RedisStore, ServerError> {
    let shown = bimip_store::redis::redact(&url);
    let store = RedisStore::connect(RedisConfig {
        url,
        prefix: config.redis.prefix.clone(),
        response_timeout: Duration::from_millis(config.redis.timeout_ms),
        retention: Duration::from_secs(config.store.retention_secs),
        max_queue_items: config.store.max_queue_items,
    })
    .await?;
    for w in store.durability_warnings().await? {
        tracing::warn!("redis {shown}: {w}");
    }
    tracing::info!(redis = %shown, prefix = %config.redis.prefix, "store: redis");
    Ok(store)
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
    let mut config = config;
    config.node = config.node_name(listener.local_addr()?.port());
    let verifier = auth::Verifier::from_config(&config.jwt)?;
    let metrics = Arc::new(metrics::Metrics::new());
    let store = match config.redis.url.clone() {
        None => Store::File(open_file_store(&config, &metrics).await?),
        Some(url) => Store::Redis(open_redis_store(&config, url).await?),
    };
    let revocations = match &store {
        Store::Redis(rs) => revocations::Revocations::load_redis(rs.clone()).await?,
        Store::File(_) => revocations::Revocations::load(&config.data_dir)?,
    };
    let tls = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => Some(tls::server_config(cert, key)?),
        _ => None,
    };
    let hub = Arc::new(hub::Hub::new());
    let cluster = match &store {
        Store::Redis(rs) => {
            let settings = cluster::ClusterSettings {
                node: config.node.clone(),
                heartbeat: Duration::from_millis(config.redis.heartbeat_ms),
                lease: Duration::from_millis(config.redis.lease_ms),
                grace: Duration::from_millis(config.presence.grace_ms),
            };
            let c = Arc::new(cluster::Cluster::join(rs.clone(), settings).await?);
            tracing::info!(node = %c.incarnation(), "joined the cluster");
            hub.set_cluster(c.clone());
            Some(c)
        }
        Store::File(_) => None,
    };
    let outbox = Arc::new(match &cluster {
        None => push::outbox::Outbox::load(store.clone()).await?,
        Some(c) => {
            let (tag, tags) = c.job_tags_at_start().await?;
            let shift = push::outbox::ID_TAG_SHIFT;
            push::outbox::Outbox::load_owned(store.clone(), tag << shift, move |id| {
                tags.contains(&(id >> shift))
            })
            .await?
        }
    });
    let (waiting, _) = outbox.depth();
    if waiting > 0 {
        tracing::info!(jobs = waiting, "push and event jobs waiting in the outbox");
    }
    bimip_push::http::install_crypto_provider();
    let providers = push::Providers::from_settings(&config.push)?;
    let tasks = tasks::Tasks::new();

    let profiles = Arc::new(profile_cache::ProfileCache::default());
    let push = Arc::new(push::Push::new(
        config.push.clone(),
        push::Deps {
            store: store.clone(),
            hub: Arc::downgrade(&hub),
            outbox: outbox.clone(),
            providers,
            profiles: profiles.clone(),
            metrics: metrics.clone(),
            tasks: tasks.clone(),
        },
    ));
    hub.set_missed(Arc::new(push::decide::PushSink(push.clone())));
    let events = Arc::new(webhooks::Events::new(
        &config.webhooks,
        &push::http_options(&config.push),
        outbox.clone(),
        store.clone(),
        (config.push.retry_base_ms, config.push.retry_max_ms),
        metrics.clone(),
    )?);
    push::dispatch::start(outbox.clone(), push.clone(), events.clone(), tasks.clone());
    let state = Arc::new(state::AppState::new(state::Parts {
        config,
        store,
        metrics,
        verifier,
        revocations,
        hub,
        push,
        events,
        outbox,
        profiles,
        tasks,
    }));
    if let Some(c) = &cluster {
        cluster::start(&state, c.clone());
    }
    let app = api::router(state.clone());
    let stopping = state.clone();
    let stopped = Arc::new(tokio::sync::Notify::new());
    let stop = {
        let stopped = stopped.clone();
        async move {
            shutdown.await;
            stopping.accepting.store(false, Ordering::Release);
            stopping.hub.close_all(sessions::Disconnect::Shutdown);
            stopped.notify_one();
        }
    };
    // HTTP requests still running this long after the shutdown signal are abandoned.
    let limit = Duration::from_millis(state.config.limits.shutdown_timeout_ms);
    match tls {
        None => {
            use axum::serve::ListenerExt;
            let sndbuf = state.config.limits.socket_send_buffer;
            let listener = listener.tap_io(move |tcp| {
                if sndbuf > 0
                    && let Err(e) = socket2::SockRef::from(&*tcp).set_send_buffer_size(sndbuf)
                {
                    tracing::debug!(error = %e, "setting SO_SNDBUF");
                }
            });
            // The peer address is needed by `POST /dev/token` (loopback callers only).
            let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
            let serve = axum::serve(listener, app).with_graceful_shutdown(stop);
            tokio::select! {
                r = serve => r?,
                _ = async { stopped.notified().await; tokio::time::sleep(limit).await } => {
                    tracing::warn!("HTTP requests still running at the shutdown limit; abandoned");
                }
            }
        }
        Some(tls) => {
            let handle = axum_server::Handle::new();
            let h = handle.clone();
            tokio::spawn(async move {
                stop.await;
                h.graceful_shutdown(Some(limit));
            });
            axum_server::from_tcp_rustls(
                listener.into_std()?,
                axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls)),
            )?
            .handle(handle)
            .serve(app.into_make_service_with_connect_info::<std::net::SocketAddr>())
            .await?;
        }
    }
    // Upgraded WebSockets are not tracked by the HTTP server: wait for their tasks to end, then
    // for the background tasks (which the connections' ends may have started), then close the
    // store they all write to.
    state.connections.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, state.connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = state.connections.len(),
            "connections still closing at the shutdown limit"
        );
    }
    if let Some(c) = &cluster {
        cluster::leave(c).await;
    }
    if !state.tasks.shutdown(SHUTDOWN_GRACE).await {
        tracing::warn!(
            left = state.tasks.len(),
            "background tasks still running at the shutdown limit; abandoned"
        );
    }
    state.store.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}
