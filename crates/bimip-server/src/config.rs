//! Server settings. The CLI fills them from flags, `BIMIP_*` env vars and an optional TOML file
//! (in that order of precedence); every field has a default so `bimip serve` runs with none.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub use bimip_store::FsyncMode;

/// Everything `run` needs besides the listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (HTTP and WebSocket share it).
    pub listen: String,
    /// Root of the embedded file store.
    pub data_dir: PathBuf,
    /// Name of this node, reported in `Welcome` (`--node-id`); unique among the nodes sharing a
    /// Redis. Empty: `bimip-1` with the file store, `<host name>-<port>` with Redis.
    pub node: String,
    pub jwt: JwtConfig,
    /// API key for the backend HTTP routes; without one those routes answer 403.
    pub api_key: Option<String>,
    pub fsync: FsyncMode,
    /// Server WebSocket ping interval; a connection silent for two intervals is closed.
    pub heartbeat_ms: u32,
    /// Largest WebSocket frame accepted; bigger ones close the connection with 1009.
    pub max_frame_bytes: u32,
    /// Largest message payload accepted.
    pub max_payload_bytes: u32,
    /// Frames that may wait in one connection's outbound buffer before it is closed as slow (1013).
    pub outbox_frames: usize,
    /// Requests of one connection processed concurrently (pipelined sends).
    pub max_inflight: usize,
    /// Largest HTTP request body accepted.
    pub max_http_body_bytes: usize,
    pub store: StoreSettings,
    pub presence: PresenceSettings,
    /// Abuse limits: frame rate, connections, write and request timeouts.
    pub limits: LimitSettings,
    /// Serve HTTPS/WSS with these PEM files (both or neither).
    pub tls: TlsSettings,
    /// Push notifications: providers and the outbox's timing.
    pub push: PushSettings,
    /// Outgoing event webhooks (presence changed, message stored/delivered/read).
    pub webhooks: WebhookSettings,
    /// Several nodes on one Redis (`--redis`): the store and the presence registry live there.
    pub redis: RedisSettings,
    /// Repair mid-file store corruption at start-up instead of refusing to start.
    pub repair: bool,
    /// Serve the web demo at `/` and `/assets/*`. Unset: on in development mode only.
    pub web: Option<bool>,
    /// Development mode (`bimip serve --dev`, never from a file): adds `POST /dev/token`, which
    /// mints tokens for loopback callers, and turns the web demo on unless `web = false`.
    #[serde(skip)]
    pub dev: bool,
}

/// A node name as the cluster registry can carry it (no `/` or `:`).
pub fn valid_node_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Config {
    /// The node name: the configured one, or `bimip-1` (file store) / `<host>-<port>` (Redis).
    pub fn node_name(&self, port: u16) -> String {
        if !self.node.is_empty() {
            return self.node.clone();
        }
        if self.redis.url.is_none() {
            return "bimip-1".into();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| {
                h.trim()
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                    .take(56)
                    .collect::<String>()
            })
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "bimip".into());
        format!("{host}-{port}")
    }

    /// Whether the web demo is served.
    pub fn web_enabled(&self) -> bool {
        self.web.unwrap_or(self.dev)
    }

    /// Whether users may add contacts with their own token.
    pub fn user_contacts_enabled(&self) -> bool {
        self.presence.user_contacts.unwrap_or(self.dev)
    }
}

/// How tokens are verified. Exactly one key source must be set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// HS256 shared secret.
    pub secret: Option<String>,
    /// PEM file with an RSA (RS256) or EC P-256 (ES256) public key.
    pub public_key: Option<PathBuf>,
    /// JWKS file (RS256/ES256 keys, chosen by `kid`).
    pub jwks: Option<PathBuf>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` (seconds). A connection is closed (4001 "token expired")
    /// once `exp` + leeway has passed.
    pub leeway_secs: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            secret: None,
            public_key: None,
            jwks: None,
            issuer: None,
            audience: None,
            leeway_secs: 30,
        }
    }
}

/// Limits that keep one client (or many) from taking the server down.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    /// Frames one connection may send per second (token bucket refill rate).
    pub frames_per_second: u32,
    /// Frames one connection may send in a burst (token bucket size).
    pub frames_burst: u32,
    /// Frames refused for the rate limit within one second that close the connection with
    /// 1008 "rate limit" (sustained flooding).
    pub flood_refusals: u32,
    /// Connections one user may hold at once; more are refused with HTTP 429.
    pub max_connections_per_user: u32,
    /// Connections the server holds at once; more are refused with HTTP 503.
    pub max_connections: u32,
    /// Bytes of frames that may wait in one connection's outbound buffer (besides
    /// `outbox_frames`) before it is closed as slow (1013).
    pub outbox_bytes: usize,
    /// A socket write that makes no progress for this long closes the connection.
    pub write_timeout_ms: u64,
    /// An HTTP request (body included) that takes longer is answered 503.
    pub http_timeout_ms: u64,
    /// Upper bound of a graceful shutdown before the store is flushed anyway.
    pub shutdown_timeout_ms: u64,
    /// SO_SNDBUF of accepted sockets in bytes; 0 keeps the kernel's autotuning, under which a
    /// peer that stopped reading may pin up to `net.ipv4.tcp_wmem` max (often 4 MiB) of kernel
    /// memory before its writes block and the outbox limits apply. Not applied with TLS.
    pub socket_send_buffer: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            // High enough for a backend-like client streaming messages over one connection;
            // a flood far past it still gets RATE_LIMITED and then 1008.
            frames_per_second: 10_000,
            frames_burst: 20_000,
            flood_refusals: 1000,
            max_connections_per_user: 16,
            max_connections: 100_000,
            outbox_bytes: 1024 * 1024,
            write_timeout_ms: 10_000,
            http_timeout_ms: 30_000,
            shutdown_timeout_ms: 10_000,
            socket_send_buffer: 0,
        }
    }
}

/// TLS (rustls): PEM certificate chain and private key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Who may see whom, and the limits of the awareness features (docs/PROTOCOL.md §13).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceSettings {
    /// `contacts`: a user's watchers are its contacts. `open`: anyone not blocked may also
    /// subscribe to anyone.
    pub policy: PresencePolicy,
    /// A user whose last device goes away is announced OFFLINE only after this long, so a quick
    /// reconnect makes no OFFLINE/ONLINE flap.
    pub grace_ms: u64,
    /// Users one connection may subscribe to.
    pub max_subscriptions: usize,
    /// TYPING/RECORDING frames one connection may send per second (burst of the same size).
    pub typing_per_second: u32,
    /// Longest custom status text (`details`) in bytes.
    pub max_details_bytes: usize,
    /// Whether a user's own token may add contacts (`PUT /v1/users/{user}/contacts/{contact}`).
    /// Adding someone lets the user see their presence under the `contacts` policy, so by
    /// default only the backend (API key) may; unset: allowed in development mode only.
    pub user_contacts: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresencePolicy {
    #[default]
    Contacts,
    Open,
}

impl std::str::FromStr for PresencePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "contacts" => Ok(PresencePolicy::Contacts),
            "open" => Ok(PresencePolicy::Open),
            other => Err(format!(
                "unknown presence policy {other:?}: expected contacts or open"
            )),
        }
    }
}

impl Default for PresenceSettings {
    fn default() -> Self {
        PresenceSettings {
            policy: PresencePolicy::Contacts,
            grace_ms: 2000,
            max_subscriptions: 1000,
            typing_per_second: 5,
            max_details_bytes: 256,
            user_contacts: None,
        }
    }
}

/// Scale-out on Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]` or `rediss://…`; unset = the embedded file store.
    pub url: Option<String>,
    /// Prefix of every key and channel, so several deployments can share one Redis.
    pub prefix: String,
    /// How often a node renews its lease.
    pub heartbeat_ms: u64,
    /// How long a lease lasts: a node silent this long is taken for dead and its users go
    /// OFFLINE (after the presence grace period).
    pub lease_ms: u64,
    /// A Redis command taking longer fails (sends are answered UNAVAILABLE).
    pub timeout_ms: u64,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            url: None,
            prefix: "bimip".into(),
            heartbeat_ms: 5_000,
            lease_ms: 15_000,
            timeout_ms: 5_000,
        }
    }
}

/// Tuning of the embedded file store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// Writer threads; users are spread over them by hash.
    pub shards: usize,
    /// Upper bound of open file descriptors held by the store (LRU).
    pub max_open_files: usize,
    /// Users whose queues are kept decoded in memory (LRU); others are read from disk on demand.
    pub cache_users: usize,
    /// Acknowledged items older than this many seconds are dropped by compaction (0 = never).
    pub retention_secs: u64,
    /// Most items kept per user queue; older ones are dropped by compaction (0 = no limit).
    pub max_queue_items: usize,
    /// Commit through a per-shard commit log (one append and one fdatasync per commit) rather
    /// than syncing every user file a commit touched (`fsync = batch | always` only).
    pub commit_log: bool,
}

/// One store writer per two cores (at least one, at most eight): each message's two appends
/// (recipient, sender's copy) then usually share a group commit, and on small machines the
/// writers do not compete with the network workers for the cores.
pub fn default_shards() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get() / 2)
        .clamp(1, 8)
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            shards: default_shards(),
            max_open_files: 4096,
            cache_users: 100_000,
            retention_secs: bimip_store::DEFAULT_RETENTION.as_secs(),
            max_queue_items: bimip_store::DEFAULT_MAX_QUEUE_ITEMS,
            commit_log: true,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from("./data"),
            node: String::new(),
            jwt: JwtConfig::default(),
            api_key: None,
            fsync: FsyncMode::Batch,
            heartbeat_ms: 20_000,
            max_frame_bytes: 64 * 1024,
            max_payload_bytes: 32 * 1024,
            outbox_frames: 256,
            max_inflight: 256,
            max_http_body_bytes: 256 * 1024,
            store: StoreSettings::default(),
            presence: PresenceSettings::default(),
            limits: LimitSettings::default(),
            tls: TlsSettings::default(),
            push: PushSettings::default(),
            webhooks: WebhookSettings::default(),
            redis: RedisSettings::default(),
            repair: false,
            web: None,
            dev: false,
        }
    }
}

/// Push providers and the push outbox. A provider without configuration is off (pushes for its
/// tokens are dead-lettered with reason `provider_disabled`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushSettings {
    /// FCM service-account JSON (`project_id`, `client_email`, `private_key`, `token_uri`).
    pub fcm_credentials: Option<PathBuf>,
    /// FCM base URL; requests go to `{endpoint}/v1/projects/{project_id}/messages:send`.
    pub fcm_endpoint: String,
    /// APNs signing key (.p8, PKCS#8 PEM).
    pub apns_key: Option<PathBuf>,
    /// The key's 10-character Key ID.
    pub apns_key_id: Option<String>,
    /// The 10-character Team ID.
    pub apns_team_id: Option<String>,
    /// The app's bundle id (`apns-topic`).
    pub apns_topic: Option<String>,
    /// APNs endpoint for production tokens (HTTP/2 only; `http://` = HTTP/2 over plain TCP).
    pub apns_endpoint: String,
    /// APNs endpoint for tokens registered with `sandbox: true`.
    pub apns_sandbox_endpoint: String,
    /// The app's own push service: one signed JSON document per push is POSTed here.
    pub webhook_url: Option<String>,
    /// Standard Webhooks secret (`whsec_<base64>`) signing those documents.
    pub webhook_secret: Option<String>,
    /// A chat push waits this long for some device of the recipient to acknowledge the
    /// message; if one does, no push is sent.
    pub grace_ms: u64,
    /// At most one chat push per recipient device and sender per window this long.
    pub collapse_ms: u64,
    /// Put the message text into chat pushes (off: "New message", no text leaves the server).
    pub preview: bool,
    /// First retry delay; doubles per attempt (full jitter), up to `retry_max_ms`.
    pub retry_base_ms: u64,
    /// Longest retry delay.
    pub retry_max_ms: u64,
    /// Attempts before a job is dead-lettered.
    pub max_attempts: u32,
    /// Age (seconds) after which an unsent job is dead-lettered instead of retried.
    pub max_age_secs: u64,
    /// Pushes sent concurrently.
    pub workers: usize,
    /// Extra PEM CA certificates trusted for the providers' HTTPS (private gateways, tests).
    pub ca_file: Option<PathBuf>,
    /// Timeout of one provider request (≥ 15 s avoids duplicates from early give-ups).
    pub timeout_ms: u64,
    /// How long a provider with a credential or configuration error is paused before a retry.
    pub pause_ms: u64,
}

impl Default for PushSettings {
    fn default() -> Self {
        PushSettings {
            fcm_credentials: None,
            fcm_endpoint: "https://fcm.googleapis.com".into(),
            apns_key: None,
            apns_key_id: None,
            apns_team_id: None,
            apns_topic: None,
            apns_endpoint: "https://api.push.apple.com".into(),
            apns_sandbox_endpoint: "https://api.sandbox.push.apple.com".into(),
            webhook_url: None,
            webhook_secret: None,
            grace_ms: 10_000,
            collapse_ms: 30_000,
            preview: false,
            retry_base_ms: 1000,
            retry_max_ms: 600_000,
            max_attempts: 10,
            max_age_secs: 3600,
            workers: 256,
            ca_file: None,
            timeout_ms: 15_000,
            pause_ms: 60_000,
        }
    }
}

/// The kinds of event the event webhook can deliver.
pub const WEBHOOK_EVENTS: [&str; 4] = [
    "presence.changed",
    "message.stored",
    "message.delivered",
    "message.read",
];

/// Outgoing event webhooks: one signed POST per event to `url`, retried until a 2xx.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookSettings {
    pub url: Option<String>,
    /// Standard Webhooks secret (`whsec_<base64>`).
    pub secret: Option<String>,
    /// Which events to send (default: all of [`WEBHOOK_EVENTS`]).
    pub events: Vec<String>,
    /// Age (seconds) after which an undelivered event is dead-lettered.
    pub max_age_secs: u64,
    /// Events sent concurrently.
    pub workers: usize,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            url: None,
            secret: None,
            events: WEBHOOK_EVENTS.iter().map(|s| s.to_string()).collect(),
            max_age_secs: 24 * 3600,
            workers: 16,
        }
    }
}

/// A setting that makes the server unable to start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no JWT key: set --jwt-secret, --jwt-public-key or --jwt-jwks (or run with --dev for a throwaway one)"
    )]
    NoJwtKey,
    #[error(
        "more than one JWT key source is set; choose one of --jwt-secret, --jwt-public-key, --jwt-jwks"
    )]
    ManyJwtKeys,
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Checks the settings that cannot be defaulted.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let sources = [
            self.jwt.secret.is_some(),
            self.jwt.public_key.is_some(),
            self.jwt.jwks.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        match sources {
            0 => return Err(ConfigError::NoJwtKey),
            1 => {}
            _ => return Err(ConfigError::ManyJwtKeys),
        }
        if self.jwt.secret.as_deref().is_some_and(|s| s.len() < 16) {
            return Err(ConfigError::Invalid(
                "--jwt-secret must be at least 16 bytes".into(),
            ));
        }
        if !self.node.is_empty() && !valid_node_name(&self.node) {
            return Err(ConfigError::Invalid(format!(
                "node id {:?}: use 1 to 64 letters, digits, '.', '_' or '-'",
                self.node
            )));
        }
        if self.redis.url.is_some() {
            let r = &self.redis;
            if r.heartbeat_ms < 50 || r.lease_ms < 2 * r.heartbeat_ms {
                return Err(ConfigError::Invalid(format!(
                    "redis: the node lease ({} ms) must be at least twice the heartbeat ({} ms), \
                     and the heartbeat at least 50 ms",
                    r.lease_ms, r.heartbeat_ms
                )));
            }
            if r.timeout_ms < 10 {
                return Err(ConfigError::Invalid(
                    "redis timeout_ms must be >= 10".into(),
                ));
            }
            if r.prefix.is_empty() || r.prefix.contains(['{', '}']) {
                return Err(ConfigError::Invalid(
                    "redis prefix must be non-empty and without braces".into(),
                ));
            }
        }
        if self.heartbeat_ms < 50 {
            return Err(ConfigError::Invalid("heartbeat_ms must be >= 50".into()));
        }
        if self.max_frame_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "max_frame_bytes must be >= 1024".into(),
            ));
        }
        if self.max_payload_bytes >= self.max_frame_bytes {
            return Err(ConfigError::Invalid(
                "max_payload_bytes must be smaller than max_frame_bytes".into(),
            ));
        }
        if self.outbox_frames < 8 || self.max_inflight == 0 || self.store.shards == 0 {
            return Err(ConfigError::Invalid(
                "outbox_frames must be >= 8, max_inflight and store.shards >= 1".into(),
            ));
        }
        if self.presence.typing_per_second == 0 || self.presence.max_subscriptions == 0 {
            return Err(ConfigError::Invalid(
                "presence.typing_per_second and presence.max_subscriptions must be >= 1".into(),
            ));
        }
        let l = &self.limits;
        if l.frames_per_second == 0
            || l.frames_burst == 0
            || l.flood_refusals == 0
            || l.max_connections_per_user == 0
            || l.max_connections == 0
        {
            return Err(ConfigError::Invalid(
                "limits.frames_per_second, frames_burst, flood_refusals, max_connections_per_user \
                 and max_connections must be >= 1"
                    .into(),
            ));
        }
        if l.outbox_bytes < 1024 || l.write_timeout_ms < 10 || l.http_timeout_ms < 10 {
            return Err(ConfigError::Invalid(
                "limits.outbox_bytes must be >= 1024, write_timeout_ms and http_timeout_ms >= 10"
                    .into(),
            ));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(ConfigError::Invalid(
                "TLS needs both --tls-cert and --tls-key".into(),
            ));
        }
        self.validate_push()?;
        if self.store.max_open_files < 2 * self.store.shards {
            return Err(ConfigError::Invalid(
                "store.max_open_files must be at least 2 per shard".into(),
            ));
        }
        Ok(())
    }

    fn validate_push(&self) -> Result<(), ConfigError> {
        let p = &self.push;
        let apns = [
            p.apns_key.is_some(),
            p.apns_key_id.is_some(),
            p.apns_team_id.is_some(),
            p.apns_topic.is_some(),
        ];
        if apns.iter().any(|s| *s) && !apns.iter().all(|s| *s) {
            return Err(ConfigError::Invalid(
                "APNs needs all of --push-apns-key, --push-apns-key-id, --push-apns-team-id and \
                 --push-apns-topic"
                    .into(),
            ));
        }
        if p.webhook_url.is_some() != p.webhook_secret.is_some() {
            return Err(ConfigError::Invalid(
                "the push webhook needs both --push-webhook-url and --push-webhook-secret".into(),
            ));
        }
        if p.workers == 0 || p.max_attempts == 0 || p.retry_base_ms == 0 || p.timeout_ms < 100 {
            return Err(ConfigError::Invalid(
                "push.workers, push.max_attempts and push.retry_base_ms must be >= 1, \
                 push.timeout_ms >= 100"
                    .into(),
            ));
        }
        let w = &self.webhooks;
        if w.url.is_some() != w.secret.is_some() {
            return Err(ConfigError::Invalid(
                "event webhooks need both --webhook-url and --webhook-secret".into(),
            ));
        }
        if let Some(bad) = w
            .events
            .iter()
            .find(|e| !WEBHOOK_EVENTS.contains(&e.as_str()))
        {
            return Err(ConfigError::Invalid(format!(
                "unknown webhook event {bad:?}: expected some of {}",
                WEBHOOK_EVENTS.join(", ")
            )));
        }
        if w.workers == 0 {
            return Err(ConfigError::Invalid("webhooks.workers must be >= 1".into()));
        }
        Ok(())
    }
}
