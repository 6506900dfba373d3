//! `bimip serve`: settings from flags > `BIMIP_*` env > TOML file > defaults, logging, signals.

use anyhow::Context;
use bimip_server::{Config, config::FsyncMode};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TOML settings file (keys as in `bimip serve --print-config`).
    #[arg(long, env = "BIMIP_CONFIG")]
    config: Option<PathBuf>,
    /// Address for HTTP and WebSocket [default: 127.0.0.1:8080].
    #[arg(long, env = "BIMIP_LISTEN")]
    listen: Option<String>,
    /// Data directory of the embedded store [default: ./data].
    #[arg(long, env = "BIMIP_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// HS256 secret for client tokens (at least 16 bytes).
    #[arg(long, env = "BIMIP_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// PEM public key for RS256 or ES256 client tokens.
    #[arg(long, env = "BIMIP_JWT_PUBLIC_KEY")]
    jwt_public_key: Option<PathBuf>,
    /// JWKS file with RS256/ES256 keys (chosen by `kid`).
    #[arg(long, env = "BIMIP_JWT_JWKS")]
    jwt_jwks: Option<PathBuf>,
    /// Required token issuer (`iss`).
    #[arg(long, env = "BIMIP_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Required token audience (`aud`).
    #[arg(long, env = "BIMIP_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// API key for the backend HTTP API (without one the backend API is off).
    #[arg(long, env = "BIMIP_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Durability: always | batch (group commit) | never [default: batch].
    #[arg(long, env = "BIMIP_FSYNC")]
    fsync: Option<FsyncMode>,
    /// Node name reported in Welcome, unique among the nodes sharing a Redis [default: bimip-1;
    /// with --redis: <host name>-<port>].
    #[arg(long = "node-id", alias = "node", env = "BIMIP_NODE_ID")]
    node: Option<String>,
    /// Run as one of several nodes sharing this Redis (7.0+): redis://[user:password@]host:port[/db]
    /// or rediss://… The queue, cursors, profiles, push state and presence live there.
    #[arg(long, env = "BIMIP_REDIS", hide_env_values = true)]
    redis: Option<String>,
    /// Prefix of bimip's Redis keys and channels [default: bimip].
    #[arg(long, env = "BIMIP_REDIS_PREFIX")]
    redis_prefix: Option<String>,
    /// How often a node renews its lease in Redis, in ms [default: 5000].
    #[arg(long, env = "BIMIP_NODE_HEARTBEAT_MS")]
    node_heartbeat_ms: Option<u64>,
    /// A node that did not renew its lease for this long is taken for dead, in ms [default: 15000].
    #[arg(long, env = "BIMIP_NODE_LEASE_MS")]
    node_lease_ms: Option<u64>,
    /// A Redis command taking longer fails (UNAVAILABLE), in ms [default: 5000].
    #[arg(long, env = "BIMIP_REDIS_TIMEOUT_MS")]
    redis_timeout_ms: Option<u64>,
    /// Server ping interval in ms; silent for two intervals = gone [default: 20000].
    #[arg(long, env = "BIMIP_HEARTBEAT_MS")]
    heartbeat_ms: Option<u32>,
    /// Largest WebSocket frame in bytes [default: 65536].
    #[arg(long, env = "BIMIP_MAX_FRAME_BYTES")]
    max_frame_bytes: Option<u32>,
    /// Largest message payload in bytes [default: 32768].
    #[arg(long, env = "BIMIP_MAX_PAYLOAD_BYTES")]
    max_payload_bytes: Option<u32>,
    /// Who sees whose awareness: contacts | open [default: contacts].
    #[arg(long, env = "BIMIP_PRESENCE_POLICY")]
    presence_policy: Option<bimip_server::config::PresencePolicy>,
    /// Let users add contacts with their own token, which lets them see the presence of whoever
    /// they add (on by default only with --dev; otherwise only the API key may add contacts).
    #[arg(long, env = "BIMIP_USER_CONTACTS", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    user_contacts: Option<bool>,
    /// Delay before a user whose last device left is announced OFFLINE, in ms [default: 2000].
    #[arg(long, env = "BIMIP_PRESENCE_GRACE_MS")]
    presence_grace_ms: Option<u64>,
    /// TLS certificate chain (PEM); with --tls-key the server speaks HTTPS and WSS only.
    #[arg(long, env = "BIMIP_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM, PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "BIMIP_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Frames one connection may send per second; more get RATE_LIMITED [default: 10000].
    #[arg(long, env = "BIMIP_MAX_FRAMES_PER_SECOND")]
    max_frames_per_second: Option<u32>,
    /// Burst of frames allowed above the per-second rate [default: 20000].
    #[arg(long, env = "BIMIP_FRAMES_BURST")]
    frames_burst: Option<u32>,
    /// Rate-limited frames within one second that close the connection (1008) [default: 1000].
    #[arg(long, env = "BIMIP_FLOOD_REFUSALS")]
    flood_refusals: Option<u32>,
    /// Connections one user may hold; more are refused with 429 [default: 16].
    #[arg(long, env = "BIMIP_MAX_CONNECTIONS_PER_USER")]
    max_connections_per_user: Option<u32>,
    /// Connections the server holds; more are refused with 503 [default: 100000].
    #[arg(long, env = "BIMIP_MAX_CONNECTIONS")]
    max_connections: Option<u32>,
    /// Frames waiting for one connection before it is closed as slow (1013) [default: 256].
    #[arg(long, env = "BIMIP_OUTBOX_FRAMES")]
    outbox_frames: Option<usize>,
    /// Bytes waiting for one connection before it is closed as slow (1013) [default: 1048576].
    #[arg(long, env = "BIMIP_OUTBOX_BYTES")]
    outbox_bytes: Option<usize>,
    /// A socket write stuck this long closes the connection, in ms [default: 10000].
    #[arg(long, env = "BIMIP_WRITE_TIMEOUT_MS")]
    write_timeout_ms: Option<u64>,
    /// HTTP requests taking longer are answered 503, in ms [default: 30000].
    #[arg(long, env = "BIMIP_HTTP_TIMEOUT_MS")]
    http_timeout_ms: Option<u64>,
    /// Largest HTTP request body in bytes [default: 262144].
    #[arg(long, env = "BIMIP_MAX_HTTP_BODY_BYTES")]
    max_http_body_bytes: Option<usize>,
    /// Clock skew tolerated on token expiry, in seconds [default: 30].
    #[arg(long, env = "BIMIP_JWT_LEEWAY_SECS")]
    jwt_leeway_secs: Option<u64>,
    /// SO_SNDBUF of accepted sockets in bytes (0 = kernel autotuning) [default: 0].
    #[arg(long, env = "BIMIP_SOCKET_SEND_BUFFER")]
    socket_send_buffer: Option<usize>,
    /// FCM service-account JSON file (project_id, client_email, private_key, token_uri).
    #[arg(long, env = "BIMIP_PUSH_FCM_CREDENTIALS")]
    push_fcm_credentials: Option<PathBuf>,
    /// FCM base URL [default: https://fcm.googleapis.com].
    #[arg(long, env = "BIMIP_PUSH_FCM_ENDPOINT")]
    push_fcm_endpoint: Option<String>,
    /// APNs signing key (.p8).
    #[arg(long, env = "BIMIP_PUSH_APNS_KEY")]
    push_apns_key: Option<PathBuf>,
    /// APNs Key ID (10 characters).
    #[arg(long, env = "BIMIP_PUSH_APNS_KEY_ID")]
    push_apns_key_id: Option<String>,
    /// APNs Team ID (10 characters).
    #[arg(long, env = "BIMIP_PUSH_APNS_TEAM_ID")]
    push_apns_team_id: Option<String>,
    /// APNs topic: the app's bundle id.
    #[arg(long, env = "BIMIP_PUSH_APNS_TOPIC")]
    push_apns_topic: Option<String>,
    /// APNs endpoint (HTTP/2; http:// = HTTP/2 over plain TCP) [default: https://api.push.apple.com].
    #[arg(long, env = "BIMIP_PUSH_APNS_ENDPOINT")]
    push_apns_endpoint: Option<String>,
    /// APNs endpoint for sandbox tokens [default: https://api.sandbox.push.apple.com].
    #[arg(long, env = "BIMIP_PUSH_APNS_SANDBOX_ENDPOINT")]
    push_apns_sandbox_endpoint: Option<String>,
    /// The app's own push service: one signed JSON document per push is POSTed here.
    #[arg(long, env = "BIMIP_PUSH_WEBHOOK_URL")]
    push_webhook_url: Option<String>,
    /// Secret signing those documents (whsec_<base64>, Standard Webhooks).
    #[arg(long, env = "BIMIP_PUSH_WEBHOOK_SECRET", hide_env_values = true)]
    push_webhook_secret: Option<String>,
    /// A chat push waits this long for another device to acknowledge the message [default: 10000].
    #[arg(long, env = "BIMIP_PUSH_GRACE_MS")]
    push_grace_ms: Option<u64>,
    /// At most one chat push per device and sender in this window, in ms [default: 30000].
    #[arg(long, env = "BIMIP_PUSH_COLLAPSE_MS")]
    push_collapse_ms: Option<u64>,
    /// Put the message text into chat pushes (off by default: no text leaves the server).
    #[arg(long, env = "BIMIP_PUSH_PREVIEW")]
    push_preview: bool,
    /// First retry delay in ms, doubled per attempt with full jitter [default: 1000].
    #[arg(long, env = "BIMIP_PUSH_RETRY_BASE_MS")]
    push_retry_base_ms: Option<u64>,
    /// Attempts before a push is dead-lettered [default: 10].
    #[arg(long, env = "BIMIP_PUSH_MAX_ATTEMPTS")]
    push_max_attempts: Option<u32>,
    /// Age after which an unsent push is dead-lettered (e.g. 1h, 30m) [default: 1h].
    #[arg(long, env = "BIMIP_PUSH_MAX_AGE", value_parser = parse_duration_secs)]
    push_max_age: Option<u64>,
    /// Pushes sent concurrently [default: 256].
    #[arg(long, env = "BIMIP_PUSH_WORKERS")]
    push_workers: Option<usize>,
    /// How long a provider with a credential or configuration error is paused, in ms
    /// [default: 60000].
    #[arg(long, env = "BIMIP_PUSH_PAUSE_MS")]
    push_pause_ms: Option<u64>,
    /// Extra CA certificates (PEM) trusted for the push providers' and webhooks' HTTPS.
    #[arg(long, env = "BIMIP_PUSH_CA_FILE")]
    push_ca_file: Option<PathBuf>,
    /// Event webhook URL: presence and message events are POSTed here, signed.
    #[arg(long, env = "BIMIP_WEBHOOK_URL")]
    webhook_url: Option<String>,
    /// Secret signing the events (whsec_<base64>, Standard Webhooks).
    #[arg(long, env = "BIMIP_WEBHOOK_SECRET", hide_env_values = true)]
    webhook_secret: Option<String>,
    /// Events to send, comma-separated: presence.changed, message.stored, message.delivered,
    /// message.read [default: all].
    #[arg(long, env = "BIMIP_WEBHOOK_EVENTS", value_delimiter = ',')]
    webhook_events: Option<Vec<String>>,
    /// Log format.
    #[arg(long, env = "BIMIP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Log filter (tracing env-filter syntax, e.g. `info` or `bimip_server=debug`).
    #[arg(long, env = "BIMIP_LOG", default_value = "info")]
    log: String,
    /// Development mode: make up (and keep in the data dir) a JWT secret and an API key when none
    /// is given, print a ready token and client command, serve the web demo at `/` and mint
    /// tokens for loopback callers at `POST /dev/token`.
    #[arg(long)]
    dev: bool,
    /// Serve the web demo at `/` (on by default only with --dev; `--web=false` turns it off).
    #[arg(long, env = "BIMIP_WEB", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    web: Option<bool>,
    /// Repair mid-file store corruption at start-up (originals are kept aside).
    #[arg(long)]
    repair: bool,
    /// Drop acknowledged items older than this (e.g. 7d, 12h, 30m, 3600s; 0 = keep forever)
    /// [default: 7d].
    #[arg(long, env = "BIMIP_RETENTION", value_parser = parse_duration_secs)]
    retention: Option<u64>,
    /// Most items kept per user queue, the oldest dropped first (0 = no limit) [default: 100000].
    #[arg(long, env = "BIMIP_MAX_QUEUE_ITEMS")]
    max_queue_items: Option<usize>,
    /// Store writer threads (users are spread over them by hash) [default: half the cores, 1–8].
    #[arg(long, env = "BIMIP_STORE_SHARDS")]
    store_shards: Option<usize>,
    /// Commit through a per-shard commit log (one append + one fdatasync per commit);
    /// `--commit-log=false` syncs the user files themselves [default: true].
    #[arg(long, env = "BIMIP_COMMIT_LOG", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    commit_log: Option<bool>,
    /// Print the effective settings as TOML (secrets redacted) and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format, &args.log)?;
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str::<Config>(&text)
                .with_context(|| format!("{}: invalid settings", path.display()))?
        }
        None => Config::default(),
    };
    apply_flags(&args, &mut config);
    if args.dev {
        dev_defaults(&mut config)?;
    }
    if args.print_config {
        let mut shown = config.clone();
        if shown.jwt.secret.is_some() {
            shown.jwt.secret = Some("<redacted>".into());
        }
        if shown.api_key.is_some() {
            shown.api_key = Some("<redacted>".into());
        }
        if shown.push.webhook_secret.is_some() {
            shown.push.webhook_secret = Some("<redacted>".into());
        }
        if shown.webhooks.secret.is_some() {
            shown.webhooks.secret = Some("<redacted>".into());
        }
        print!("{}", toml::to_string_pretty(&shown)?);
        return Ok(());
    }
    config.validate()?;
    fit_open_files(&mut config);
    let listener = bind(&config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    // Scripts and tests read this line to find the port (also with --listen 127.0.0.1:0).
    if config.tls.cert.is_some() {
        println!("bimip listening on https://{addr} (WebSocket: wss://{addr}/ws)");
    } else {
        println!("bimip listening on http://{addr} (WebSocket: ws://{addr}/ws)");
    }
    if args.dev {
        print_dev_help(&config, addr)?;
    }
    if config.web_enabled() {
        let scheme = if config.tls.cert.is_some() {
            "https"
        } else {
            "http"
        };
        let at = browsable(addr);
        if config.dev {
            println!(
                "web demo: open {scheme}://{at}/ in two browser windows and sign in as two users"
            );
        } else {
            println!("web demo: {scheme}://{at}/");
        }
    }
    bimip_server::run(listener, config, shutdown_signal()).await?;
    Ok(())
}

/// Descriptors kept free for listeners, HTTP clients, compaction and profile temp files, syncfs.
const SPARE_FILES: u64 = 1024;

/// Raises the open-files soft limit to the hard limit (the soft default, often 1024, is far too
/// low for a server holding one descriptor per connection), then makes the store's handle cache
/// fit in it: at most a quarter of the limit, so connections keep the rest. Warns when the limit
/// cannot hold `max_connections` as well.
fn fit_open_files(config: &mut Config) {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "could not read or raise the open-files limit");
            return;
        }
    };
    let store = &mut config.store;
    let cap = usize::try_from(limit / 4)
        .unwrap_or(usize::MAX)
        .max(2 * store.shards);
    if store.max_open_files > cap {
        tracing::warn!(
            limit,
            configured = store.max_open_files,
            used = cap,
            "store.max_open_files lowered to a quarter of the open-files limit (raise LimitNOFILE / ulimit -n)"
        );
        store.max_open_files = cap;
    }
    let needed = u64::from(config.limits.max_connections)
        .saturating_add(store.max_open_files as u64)
        .saturating_add(SPARE_FILES);
    if limit < needed {
        let connections = limit.saturating_sub(store.max_open_files as u64 + SPARE_FILES);
        tracing::info!(
            limit,
            connections,
            max_connections = config.limits.max_connections,
            "the open-files limit holds about this many connections, fewer than max_connections (docs/OPERATIONS.md §13)"
        );
    } else {
        tracing::debug!(limit, "open-files limit");
    }
}

/// Pending connections the kernel queues before `accept` (capped by `net.core.somaxconn`): a
/// reconnect storm after a restart must not lose SYNs (each lost one costs the client a 1 s
/// retransmit).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the first address `listen` resolves to, with [`LISTEN_BACKLOG`].
async fn bind(listen: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = tokio::net::lookup_host(listen)
        .await?
        .next()
        .with_context(|| format!("{listen} resolves to no address"))?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket.listen(LISTEN_BACKLOG)?)
}

fn apply_flags(a: &ServeArgs, c: &mut Config) {
    fn set<T: Clone>(dst: &mut T, v: &Option<T>) {
        if let Some(v) = v {
            *dst = v.clone();
        }
    }
    fn set_opt<T: Clone>(dst: &mut Option<T>, v: &Option<T>) {
        if v.is_some() {
            *dst = v.clone();
        }
    }
    set(&mut c.listen, &a.listen);
    set(&mut c.data_dir, &a.data_dir);
    set(&mut c.fsync, &a.fsync);
    set(&mut c.store.shards, &a.store_shards);
    set(&mut c.store.commit_log, &a.commit_log);
    set(&mut c.node, &a.node);
    set_opt(&mut c.redis.url, &a.redis);
    set(&mut c.redis.prefix, &a.redis_prefix);
    set(&mut c.redis.heartbeat_ms, &a.node_heartbeat_ms);
    set(&mut c.redis.lease_ms, &a.node_lease_ms);
    set(&mut c.redis.timeout_ms, &a.redis_timeout_ms);
    set(&mut c.heartbeat_ms, &a.heartbeat_ms);
    set(&mut c.max_frame_bytes, &a.max_frame_bytes);
    set(&mut c.max_payload_bytes, &a.max_payload_bytes);
    set(&mut c.presence.policy, &a.presence_policy);
    set(&mut c.presence.grace_ms, &a.presence_grace_ms);
    set_opt(&mut c.presence.user_contacts, &a.user_contacts);
    set_opt(&mut c.tls.cert, &a.tls_cert);
    set_opt(&mut c.tls.key, &a.tls_key);
    set(&mut c.limits.frames_per_second, &a.max_frames_per_second);
    set(&mut c.limits.frames_burst, &a.frames_burst);
    set(&mut c.limits.flood_refusals, &a.flood_refusals);
    set(
        &mut c.limits.max_connections_per_user,
        &a.max_connections_per_user,
    );
    set(&mut c.limits.max_connections, &a.max_connections);
    set(&mut c.outbox_frames, &a.outbox_frames);
    set(&mut c.limits.outbox_bytes, &a.outbox_bytes);
    set(&mut c.limits.write_timeout_ms, &a.write_timeout_ms);
    set(&mut c.limits.http_timeout_ms, &a.http_timeout_ms);
    set(&mut c.max_http_body_bytes, &a.max_http_body_bytes);
    set(&mut c.jwt.leeway_secs, &a.jwt_leeway_secs);
    set(&mut c.limits.socket_send_buffer, &a.socket_send_buffer);
    set(&mut c.store.retention_secs, &a.retention);
    set(&mut c.store.max_queue_items, &a.max_queue_items);
    let p = &mut c.push;
    set_opt(&mut p.fcm_credentials, &a.push_fcm_credentials);
    set(&mut p.fcm_endpoint, &a.push_fcm_endpoint);
    set_opt(&mut p.apns_key, &a.push_apns_key);
    set_opt(&mut p.apns_key_id, &a.push_apns_key_id);
    set_opt(&mut p.apns_team_id, &a.push_apns_team_id);
    set_opt(&mut p.apns_topic, &a.push_apns_topic);
    set(&mut p.apns_endpoint, &a.push_apns_endpoint);
    set(&mut p.apns_sandbox_endpoint, &a.push_apns_sandbox_endpoint);
    set_opt(&mut p.webhook_url, &a.push_webhook_url);
    set_opt(&mut p.webhook_secret, &a.push_webhook_secret);
    set(&mut p.grace_ms, &a.push_grace_ms);
    set(&mut p.collapse_ms, &a.push_collapse_ms);
    p.preview |= a.push_preview;
    set(&mut p.retry_base_ms, &a.push_retry_base_ms);
    set(&mut p.max_attempts, &a.push_max_attempts);
    set(&mut p.max_age_secs, &a.push_max_age);
    set(&mut p.workers, &a.push_workers);
    set(&mut p.pause_ms, &a.push_pause_ms);
    set_opt(&mut p.ca_file, &a.push_ca_file);
    let w = &mut c.webhooks;
    set_opt(&mut w.url, &a.webhook_url);
    set_opt(&mut w.secret, &a.webhook_secret);
    set(&mut w.events, &a.webhook_events);
    // A key source given on the command line replaces the file's, it does not add to it.
    if a.jwt_secret.is_some() || a.jwt_public_key.is_some() || a.jwt_jwks.is_some() {
        c.jwt.secret = a.jwt_secret.clone();
        c.jwt.public_key = a.jwt_public_key.clone();
        c.jwt.jwks = a.jwt_jwks.clone();
    }
    set_opt(&mut c.jwt.issuer, &a.jwt_issuer);
    set_opt(&mut c.jwt.audience, &a.jwt_audience);
    set_opt(&mut c.api_key, &a.api_key);
    set_opt(&mut c.web, &a.web);
    c.repair |= a.repair;
    c.dev = a.dev;
}

/// A duration in whole seconds from `<n>[s|m|h|d]` (no unit = seconds).
fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with an optional unit s, m, h or d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use s, m, h or d)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?}: too large"))
}

/// Loads or creates the dev secret and API key in `<data_dir>/dev.toml`, so tokens minted for a
/// dev server keep working across its restarts.
fn dev_defaults(c: &mut Config) -> anyhow::Result<()> {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Dev {
        jwt_secret: String,
        api_key: String,
    }
    let path = c.data_dir.join("dev.toml");
    let dev = match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str::<Dev>(&text)
            .with_context(|| format!("{}: invalid dev settings", path.display()))?,
        Err(_) => {
            let dev = Dev {
                jwt_secret: random_hex(32),
                api_key: random_hex(24),
            };
            std::fs::create_dir_all(&c.data_dir)
                .with_context(|| format!("creating {}", c.data_dir.display()))?;
            write_private(&path, &toml::to_string(&dev)?)?;
            dev
        }
    };
    if c.jwt.secret.is_none() && c.jwt.public_key.is_none() && c.jwt.jwks.is_none() {
        c.jwt.secret = Some(dev.jwt_secret);
    }
    if c.api_key.is_none() {
        c.api_key = Some(dev.api_key);
    }
    Ok(())
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

fn print_dev_help(c: &Config, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let Some(secret) = &c.jwt.secret else {
        return Ok(());
    };
    let ttl = std::time::Duration::from_secs(24 * 3600);
    let alice = bimip_client::token::mint_hs256(secret.as_bytes(), "alice", None, ttl)?;
    let url = format!("ws://{addr}/ws");
    // The path of this binary, so the printed commands work without it on PATH.
    let bin = std::env::current_exe()
        .ok()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "bimip".into());
    println!();
    println!(
        "dev mode: JWT secret and API key are kept in {}",
        c.data_dir.join("dev.toml").display()
    );
    println!("  a token for alice (24 h):\n    {alice}");
    println!("  chat as alice:   {bin} client --url {url} --user alice --secret {secret}");
    println!("  chat as bob:     {bin} client --url {url} --user bob --secret {secret}");
    if let Some(key) = &c.api_key {
        println!(
            "  backend API:     curl -H 'Authorization: Bearer {key}' http://{addr}/v1/users/alice/presence"
        );
    }
    println!("  dev token:       curl -X POST -d '{{\"user\":\"bob\"}}' http://{addr}/dev/token");
    println!();
    Ok(())
}

/// The address to type into a browser: a wildcard bind is reachable on loopback.
fn browsable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            (std::net::Ipv4Addr::LOCALHOST, addr.port()).into()
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            (std::net::Ipv6Addr::LOCALHOST, addr.port()).into()
        }
        _ => addr,
    }
}

fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("invalid --log filter {filter:?}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown requested");
}
