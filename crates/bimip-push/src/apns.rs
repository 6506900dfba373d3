//! Apple Push Notification service over HTTP/2 with token (`.p8`) authentication.
//!
//! One provider JWT (ES256) is shared by every send: minted on first use, re-minted when it is
//! 50 minutes old (Apple refuses tokens older than an hour) or when Apple answers
//! `ExpiredProviderToken`, and never otherwise: Apple answers `TooManyProviderTokenUpdates` to
//! a new token within 20 minutes of the previous one.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, Instant},
};

use futures_util::future::BoxFuture;
use http::{HeaderMap, StatusCode, header};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::{
    MAX_COLLAPSE_ID_BYTES, MAX_PAYLOAD_BYTES, Outcome, Platform, Provider, PushMessage, SetupError,
    app_data,
    http::{HttpOptions, retry_after, transport_error},
    mask_token, scrub,
};

pub const PRODUCTION_ENDPOINT: &str = "https://api.push.apple.com";
pub const SANDBOX_ENDPOINT: &str = "https://api.sandbox.push.apple.com";

/// A provider JWT is re-minted once it is this old (Apple: at most one hour).
pub const JWT_MAX_AGE: Duration = Duration::from_secs(50 * 60);
/// Apple refuses a new provider JWT within this long of the previous one
/// (`TooManyProviderTokenUpdates`); only `ExpiredProviderToken` may force one sooner.
pub const JWT_MIN_INTERVAL: Duration = Duration::from_secs(20 * 60);

/// Where APNs is and which key signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApnsConfig {
    /// The `.p8` signing key (PKCS#8 PEM, EC P-256) from the Apple developer account.
    pub key: PathBuf,
    /// The key's 10-character Key ID.
    pub key_id: String,
    /// The 10-character Team ID.
    pub team_id: String,
    /// The app's bundle id (`apns-topic`).
    pub topic: String,
    /// Base URL for production tokens, [`PRODUCTION_ENDPOINT`] unless testing.
    pub endpoint: String,
    /// Base URL for tokens registered as sandbox, [`SANDBOX_ENDPOINT`] unless testing.
    pub sandbox_endpoint: String,
}

impl ApnsConfig {
    /// A config for Apple's endpoints.
    pub fn new(
        key: impl Into<PathBuf>,
        key_id: impl Into<String>,
        team_id: impl Into<String>,
        topic: impl Into<String>,
    ) -> ApnsConfig {
        ApnsConfig {
            key: key.into(),
            key_id: key_id.into(),
            team_id: team_id.into(),
            topic: topic.into(),
            endpoint: PRODUCTION_ENDPOINT.into(),
            sandbox_endpoint: SANDBOX_ENDPOINT.into(),
        }
    }
}

/// The APNs provider. Share it (`Arc<Apns>`): all sends share its HTTP/2 connections and JWT.
pub struct Apns {
    http: reqwest::Client,
    production: String,
    sandbox: String,
    topic: String,
    key_id: String,
    team_id: String,
    key: EncodingKey,
    jwt: JwtCache,
}

impl std::fmt::Debug for Apns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Apns")
            .field("production", &self.production)
            .field("sandbox", &self.sandbox)
            .field("topic", &self.topic)
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: i64,
}

impl Apns {
    /// Reads the key and checks the settings; nothing is sent yet.
    pub fn new(config: &ApnsConfig, http: &HttpOptions) -> Result<Apns, SetupError> {
        let path = config.key.display().to_string();
        let fail = |message: String| SetupError::File {
            path: path.clone(),
            message,
        };
        let pem = std::fs::read(&config.key)
            .map_err(|e| fail(format!("cannot read the APNs key: {e}")))?;
        // jsonwebtoken's messages don't quote the key, but say only what is needed anyway.
        let key = EncodingKey::from_ec_pem(&pem).map_err(|_| {
            fail(
                "not an APNs signing key (expected the .p8 file: a PKCS#8 PEM EC P-256 key)".into(),
            )
        })?;
        for (name, value) in [("key_id", &config.key_id), ("team_id", &config.team_id)] {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(SetupError::Invalid(format!(
                    "APNs {name} must be the 10-character id from the Apple developer account"
                )));
            }
        }
        if config.topic.is_empty()
            || config.topic.bytes().any(|b| b.is_ascii_whitespace())
            || http::HeaderValue::from_str(&config.topic).is_err()
        {
            return Err(SetupError::Invalid(
                "APNs topic must be the app's bundle id".into(),
            ));
        }
        let base = |name: &str, url: &str| -> Result<String, SetupError> {
            let url = url.trim_end_matches('/');
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "https" | "http") && u.host().is_some() => {
                    Ok(url.to_owned())
                }
                _ => Err(SetupError::Invalid(format!(
                    "APNs {name} `{url}` must be an http(s) URL"
                ))),
            }
        };
        let apns = Apns {
            http: crate::http::http2_client(http)?,
            production: base("endpoint", &config.endpoint)?,
            sandbox: base("sandbox_endpoint", &config.sandbox_endpoint)?,
            topic: config.topic.clone(),
            key_id: config.key_id.clone(),
            team_id: config.team_id.clone(),
            key,
            jwt: JwtCache::default(),
        };
        // Sign once now so a key that parses but cannot sign fails at start-up. The token is
        // thrown away: Apple only counts tokens it receives.
        apns.mint(crate::unix_now()).map_err(|_| {
            fail("the key cannot sign ES256 tokens (is it an EC P-256 key?)".into())
        })?;
        Ok(apns)
    }

    fn mint(&self, iat: i64) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        jsonwebtoken::encode(
            &header,
            &Claims {
                iss: &self.team_id,
                iat,
            },
            &self.key,
        )
    }

    /// The shared provider JWT; `expired`: the JWT Apple just called expired.
    fn provider_token(&self, expired: Option<&str>) -> Result<Arc<str>, Outcome> {
        if let Some(jwt) = self.jwt.usable(Instant::now(), expired) {
            return Ok(jwt);
        }
        // One minter at a time; the others find its token when they get the lock.
        let _minting = self
            .jwt
            .minting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if let Some(jwt) = self.jwt.usable(now, expired) {
            return Ok(jwt);
        }
        let jwt: Arc<str> = self
            .mint(crate::unix_now())
            .map_err(|e| Outcome::ProviderConfig {
                reason: format!("APNs: cannot sign the provider token: {e}"),
            })?
            .into();
        *self
            .jwt
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Minted {
            jwt: jwt.clone(),
            at: now,
        });
        tracing::info!(
            key_id = %self.key_id,
            after_expiry = expired.is_some(),
            "APNs provider token minted"
        );
        Ok(jwt)
    }

    async fn send_one(&self, msg: &PushMessage) -> Outcome {
        let request = match Request::new(msg) {
            Ok(request) => request,
            Err(outcome) => return outcome,
        };
        let base = if msg.sandbox {
            &self.sandbox
        } else {
            &self.production
        };
        let url = format!("{base}/3/device/{}", msg.token);
        let jwt = match self.provider_token(None) {
            Ok(jwt) => jwt,
            Err(outcome) => return outcome,
        };
        match self.post(&url, &jwt, &request, msg).await {
            Reply::Done(outcome) => outcome,
            Reply::ExpiredProviderToken(_) => {
                let jwt = match self.provider_token(Some(&jwt)) {
                    Ok(jwt) => jwt,
                    Err(outcome) => return outcome,
                };
                match self.post(&url, &jwt, &request, msg).await {
                    Reply::Done(outcome) => outcome,
                    Reply::ExpiredProviderToken(reason) => Outcome::ProviderConfig {
                        reason: format!(
                            "{reason} (again, with a freshly minted token: check the server \
                             clock, iat must be within the last hour by Apple's clock)"
                        ),
                    },
                }
            }
        }
    }

    async fn post(&self, url: &str, jwt: &str, request: &Request, msg: &PushMessage) -> Reply {
        let mut builder = self
            .http
            .post(url)
            .header(header::AUTHORIZATION, format!("bearer {jwt}"))
            .header("apns-topic", &self.topic)
            .header("apns-push-type", request.push_type)
            .header("apns-priority", request.priority)
            .header("apns-id", &request.apns_id)
            .header(header::CONTENT_TYPE, "application/json")
            .body(request.payload.clone());
        if msg.expires_at > 0 {
            builder = builder.header("apns-expiration", msg.expires_at.to_string());
        }
        if !msg.collapse_id.is_empty() {
            builder = builder.header("apns-collapse-id", &msg.collapse_id);
        }
        let response = match builder.send().await {
            Ok(response) => response,
            Err(e) => return Reply::Done(transport_error(e)),
        };
        let status = response.status();
        let headers = response.headers().clone();
        match response.bytes().await {
            Ok(body) => classify(status, &headers, &body, &request.apns_id, &msg.token),
            Err(e) => Reply::Done(transport_error(e)),
        }
    }
}

impl Provider for Apns {
    fn platform(&self) -> Platform {
        Platform::Apns
    }

    fn send<'a>(&'a self, msg: &'a PushMessage) -> BoxFuture<'a, Outcome> {
        Box::pin(self.send_one(msg))
    }
}

// ---- provider token cache --------------------------------------------------------------

#[derive(Default)]
struct JwtCache {
    current: RwLock<Option<Minted>>,
    minting: Mutex<()>,
}

struct Minted {
    jwt: Arc<str>,
    at: Instant,
}

impl JwtCache {
    fn usable(&self, now: Instant, expired: Option<&str>) -> Option<Arc<str>> {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        let minted = current.as_ref()?;
        (!must_remint(minted.at, &minted.jwt, now, expired)).then(|| minted.jwt.clone())
    }
}

/// The minting rule: a new JWT only when the current one is [`JWT_MAX_AGE`] old or is the one
/// Apple just called expired. Every other reason would risk `TooManyProviderTokenUpdates`.
fn must_remint(minted_at: Instant, jwt: &str, now: Instant, expired: Option<&str>) -> bool {
    now.saturating_duration_since(minted_at) >= JWT_MAX_AGE || expired == Some(jwt)
}

// ---- request ---------------------------------------------------------------------------

/// Everything of one push that does not change when it is re-sent after a re-mint.
struct Request {
    payload: Vec<u8>,
    apns_id: String,
    push_type: &'static str,
    priority: &'static str,
}

impl Request {
    fn new(msg: &PushMessage) -> Result<Request, Outcome> {
        let invalid = |reason: String| Outcome::Invalid { reason };
        if msg.token.is_empty() {
            return Err(invalid("APNs: empty device token".into()));
        }
        // A device token is hex; anything else can never be delivered (and must not reach the
        // URL path).
        if !msg.token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Outcome::DropToken {
                reason: format!(
                    "APNs BadDeviceToken: {} is not a hex device token",
                    mask_token(&msg.token)
                ),
                at_ms: None,
            });
        }
        if msg.collapse_id.len() > MAX_COLLAPSE_ID_BYTES {
            return Err(invalid(format!(
                "collapse_id of {} bytes is longer than APNs' {MAX_COLLAPSE_ID_BYTES}",
                msg.collapse_id.len()
            )));
        }
        if http::HeaderValue::from_str(&msg.collapse_id).is_err() {
            return Err(invalid("collapse_id is not a valid header value".into()));
        }
        let alert = !msg.title.is_empty() || !msg.body.is_empty();
        let payload = payload(msg, alert);
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(invalid(format!(
                "APNs payload of {} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit",
                payload.len()
            )));
        }
        Ok(Request {
            payload,
            apns_id: apns_id(&msg.id),
            // A data-only push is a background push, which Apple wants at priority 5.
            push_type: if alert { "alert" } else { "background" },
            priority: if alert && msg.high_priority {
                "10"
            } else {
                "5"
            },
        })
    }
}

/// The JSON payload: `aps` and, beside it, the app's string keys (as FCM delivers them too).
fn payload(msg: &PushMessage, alert: bool) -> Vec<u8> {
    let mut aps = Map::new();
    if alert {
        aps.insert(
            "alert".into(),
            json!({"title": msg.title, "body": msg.body}),
        );
        aps.insert("sound".into(), json!("default"));
    } else {
        aps.insert("content-available".into(), json!(1));
    }
    // A badge of 0 clears every notification of the app: leave the badge alone instead.
    if msg.unread > 0 {
        aps.insert("badge".into(), json!(msg.unread));
    }
    if !msg.from.is_empty() {
        aps.insert("thread-id".into(), json!(msg.from));
    }
    let mut root = Map::new();
    for (k, v) in app_data(msg) {
        if k != "aps" {
            root.insert(k, Value::String(v));
        }
    }
    root.insert("aps".into(), Value::Object(aps));
    serde_json::to_vec(&root).unwrap_or_default()
}

/// `apns-id` for a push: a UUID derived from [`PushMessage::id`] (SHA-256, then the RFC 9562
/// version 8 "custom" and variant bits), so every retry of the push carries the same id.
pub fn apns_id(push_id: &str) -> String {
    let digest = Sha256::digest(format!("bimip apns-id\0{push_id}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

// ---- response --------------------------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Done(Outcome),
    /// 403 `ExpiredProviderToken`: re-mint and retry once.
    ExpiredProviderToken(String),
}

#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    reason: String,
    timestamp: Option<i64>,
}

/// Maps one APNs response to what to do (§2.4 and §6 of the push note).
fn classify(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    sent_id: &str,
    token: &str,
) -> Reply {
    if status == StatusCode::OK {
        let receipt = headers
            .get("apns-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or(sent_id)
            .to_owned();
        return Reply::Done(Outcome::Sent { receipt });
    }
    let error: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let reason_code = error.reason.as_str();
    let reason = format!(
        "APNs {} {}",
        status.as_u16(),
        if reason_code.is_empty() {
            "(no reason)".to_owned()
        } else {
            scrub(reason_code, token)
        }
    );
    let retry = |reason: String| Outcome::Retry {
        after: retry_after(headers),
        reason,
    };
    let drop = |reason: String, at_ms: Option<i64>| Outcome::DropToken { reason, at_ms };
    Reply::Done(match (status.as_u16(), reason_code) {
        (400, "BadDeviceToken" | "DeviceTokenNotForTopic") => drop(reason, None),
        (400, "IdleTimeout") => retry(reason),
        (403, "ExpiredProviderToken") => return Reply::ExpiredProviderToken(reason),
        (403, _) => Outcome::ProviderConfig { reason },
        (410, _) => drop(reason, error.timestamp),
        (429, "TooManyProviderTokenUpdates") => retry(format!(
            "{reason}: the provider token changed too often; keeping the current one"
        )),
        (429 | 500..=599, _) => retry(reason),
        // 400 Bad*/Missing*/…, 404 BadPath, 405, 413 PayloadTooLarge: our request is wrong.
        _ => Outcome::Invalid { reason },
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::Kind;

    #[test]
    fn apns_id_is_a_stable_uuid() {
        let a = apns_id("push-1");
        assert_eq!(a, apns_id("push-1"));
        assert_ne!(a, apns_id("push-2"));
        assert_eq!(a.len(), 36);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('8'));
        assert!(matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'));
        assert_eq!(a, a.to_lowercase());
    }

    #[test]
    fn remint_rule() {
        let t0 = Instant::now();
        let min = Duration::from_secs(60);
        assert!(!must_remint(t0, "a", t0, None));
        assert!(!must_remint(t0, "a", t0 + 49 * min, None));
        assert!(must_remint(t0, "a", t0 + 50 * min, None));
        // Only the token Apple refused triggers a re-mint, at any age.
        assert!(must_remint(t0, "a", t0 + min, Some("a")));
        assert!(!must_remint(t0, "b", t0 + min, Some("a")));
    }

    fn msg() -> PushMessage {
        PushMessage {
            id: "p1".into(),
            platform: Platform::Apns,
            token: "a1b2c3d4e5f6".into(),
            sandbox: false,
            user: "bob".into(),
            device: "phone".into(),
            kind: Kind::Chat,
            from: "alice".into(),
            message_id: "01JD".into(),
            offset: 7,
            count: 1,
            unread: 2,
            title: "alice".into(),
            body: "New message".into(),
            data: BTreeMap::new(),
            collapse_id: "c:alice".into(),
            high_priority: true,
            expires_at: 0,
        }
    }

    #[test]
    fn payload_shape() {
        let r = Request::new(&msg()).unwrap_or_else(|o| panic!("{o:?}"));
        let v: Value = serde_json::from_slice(&r.payload).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            v,
            json!({"aps": {"alert": {"title": "alice", "body": "New message"}, "badge": 2,
                           "sound": "default", "thread-id": "alice"},
                   "type": "chat", "sender": "alice", "message_id": "01JD", "offset": "7",
                   "unread": "2", "count": "1"})
        );
        assert_eq!((r.push_type, r.priority), ("alert", "10"));
        let mut m = msg();
        m.unread = 0;
        m.high_priority = false;
        let r = Request::new(&m).unwrap_or_else(|o| panic!("{o:?}"));
        let v: Value = serde_json::from_slice(&r.payload).unwrap_or_else(|e| panic!("{e}"));
        assert!(v["aps"].get("badge").is_none());
        assert_eq!(r.priority, "5");
    }

    #[test]
    fn request_checks() {
        let mut m = msg();
        m.body = "x".repeat(4100);
        assert!(matches!(Request::new(&m), Err(Outcome::Invalid { .. })));
        let mut m = msg();
        m.collapse_id = "c".repeat(65);
        assert!(matches!(Request::new(&m), Err(Outcome::Invalid { .. })));
        let mut m = msg();
        m.token = "../../x".into();
        assert!(matches!(Request::new(&m), Err(Outcome::DropToken { .. })));
    }

    fn run(status: u16, body: &str, retry_after: Option<&str>) -> Reply {
        let mut headers = HeaderMap::new();
        if let Some(v) = retry_after {
            headers.insert(
                header::RETRY_AFTER,
                v.parse().unwrap_or_else(|e| panic!("{e}")),
            );
        }
        let status = StatusCode::from_u16(status).unwrap_or_else(|e| panic!("{e}"));
        classify(status, &headers, body.as_bytes(), "sent-id", "a1b2c3d4e5f6")
    }

    fn label(r: Reply) -> &'static str {
        match r {
            Reply::Done(o) => o.label(),
            Reply::ExpiredProviderToken(_) => "remint",
        }
    }

    #[test]
    fn error_table() {
        let reason = |r: &str| format!(r#"{{"reason":"{r}"}}"#);
        let cases: &[(u16, &str, &str)] = &[
            (400, "BadDeviceToken", "drop_token"),
            (400, "DeviceTokenNotForTopic", "drop_token"),
            (400, "BadCollapseId", "invalid"),
            (400, "BadTopic", "invalid"),
            (400, "TopicDisallowed", "invalid"),
            (400, "PayloadEmpty", "invalid"),
            (400, "IdleTimeout", "retry"),
            (403, "ExpiredProviderToken", "remint"),
            (403, "InvalidProviderToken", "provider_config"),
            (403, "MissingProviderToken", "provider_config"),
            (403, "Forbidden", "provider_config"),
            (403, "BadCertificateEnvironment", "provider_config"),
            (404, "BadPath", "invalid"),
            (405, "MethodNotAllowed", "invalid"),
            (410, "Unregistered", "drop_token"),
            (410, "ExpiredToken", "drop_token"),
            (413, "PayloadTooLarge", "invalid"),
            (429, "TooManyRequests", "retry"),
            (429, "TooManyProviderTokenUpdates", "retry"),
            (500, "InternalServerError", "retry"),
            (503, "ServiceUnavailable", "retry"),
            (503, "Shutdown", "retry"),
        ];
        for (status, r, want) in cases {
            assert_eq!(label(run(*status, &reason(r), None)), *want, "{status} {r}");
        }
    }

    #[test]
    fn gone_carries_the_timestamp_and_ok_the_id() {
        assert_eq!(
            run(
                410,
                r#"{"reason":"Unregistered","timestamp":1700000000123}"#,
                None
            ),
            Reply::Done(Outcome::DropToken {
                reason: "APNs 410 Unregistered".into(),
                at_ms: Some(1_700_000_000_123)
            })
        );
        assert_eq!(
            run(200, "", None),
            Reply::Done(Outcome::Sent {
                receipt: "sent-id".into()
            })
        );
        match run(429, r#"{"reason":"TooManyRequests"}"#, Some("12")) {
            Reply::Done(Outcome::Retry { after, .. }) => {
                assert_eq!(after, Some(Duration::from_secs(12)));
            }
            other => panic!("{other:?}"),
        }
    }
}
