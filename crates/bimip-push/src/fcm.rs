//! Firebase Cloud Messaging, HTTP v1 API: one request per device token, authorised by an OAuth2
//! access token that a service account obtains with a signed JWT (RS256, signed with ring).
//!
//! The access token is shared by all sends: fetched once (concurrent sends wait for the same
//! fetch), refreshed shortly before it expires, and once more when FCM answers
//! `UNAUTHENTICATED`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use futures_util::future::BoxFuture;
use http::{HeaderMap, StatusCode, header};
use ring::{
    rand::SystemRandom,
    signature::{RSA_PKCS1_SHA256, RsaKeyPair},
};
use rustls_pki_types::{PrivatePkcs8KeyDer, pem::PemObject};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    MAX_COLLAPSE_ID_BYTES, MAX_PAYLOAD_BYTES, Outcome, Platform, Provider, PushMessage, SetupError,
    app_data,
    http::{HttpOptions, retry_after, transport_error},
    scrub,
};

/// Google's FCM API host.
pub const DEFAULT_ENDPOINT: &str = "https://fcm.googleapis.com";
/// The OAuth scope FCM sends need.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Longest TTL FCM accepts (28 days).
pub const MAX_TTL_SECS: i64 = 2_419_200;

// `urn:ietf:params:oauth:grant-type:jwt-bearer`, form-encoded.
const GRANT_TYPE_FORM: &str = "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer";
const ASSERTION_LIFETIME_SECS: i64 = 3600;
/// Refresh this long before `expires_in` runs out (at most half the lifetime).
const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// Used when the token endpoint gives no `expires_in` (Google always does).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// The message of the one `INVALID_ARGUMENT` that is about the token (lower case).
const INVALID_TOKEN_MESSAGE: &str = "not a valid fcm registration token";

/// Where FCM is and which service account sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FcmConfig {
    /// The service-account JSON key file from the Firebase console.
    pub credentials: PathBuf,
    /// The FCM API base URL, [`DEFAULT_ENDPOINT`] unless testing against a fake. With an
    /// `https://` endpoint HTTP/2 or HTTP/1.1 is chosen by ALPN; an `http://` endpoint (a
    /// local fake) is spoken to over h2c, and so is its token endpoint.
    pub endpoint: String,
}

impl FcmConfig {
    /// A config for Google's endpoint.
    pub fn new(credentials: impl Into<PathBuf>) -> FcmConfig {
        FcmConfig {
            credentials: credentials.into(),
            endpoint: DEFAULT_ENDPOINT.into(),
        }
    }
}

/// The FCM provider. Cheap to share (`Arc<Fcm>`); all sends share its connections and token.
pub struct Fcm {
    http: reqwest::Client,
    /// Parsed once: every push goes to it.
    send_url: reqwest::Url,
    account: ServiceAccount,
    token: TokenCache,
}

impl std::fmt::Debug for Fcm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fcm")
            .field("send_url", &self.send_url)
            .field("client_email", &self.account.client_email)
            .finish_non_exhaustive()
    }
}

impl Fcm {
    /// Reads and checks the service account (nothing is fetched yet: the first send gets the
    /// access token).
    pub fn new(config: &FcmConfig, http: &HttpOptions) -> Result<Fcm, SetupError> {
        let account = ServiceAccount::load(&config.credentials)?;
        let endpoint = config.endpoint.trim_end_matches('/');
        check_url(endpoint)
            .map_err(|why| SetupError::Invalid(format!("FCM endpoint `{endpoint}` {why}")))?;
        // FCM is reached over HTTP/2 (by ALPN on https). An `http://` endpoint is a local
        // fake: speak h2c to it, so tests and benchmarks multiplex the way production does.
        let client = if endpoint.starts_with("http://") {
            crate::http::http2_client(http)?
        } else {
            crate::http::client(http)?
        };
        let send_url = format!(
            "{endpoint}/v1/projects/{}/messages:send",
            account.project_id
        );
        let send_url = reqwest::Url::parse(&send_url).map_err(|e| {
            SetupError::Invalid(format!("FCM endpoint {endpoint:?} is not a valid URL: {e}"))
        })?;
        Ok(Fcm {
            http: client,
            send_url,
            account,
            token: TokenCache::default(),
        })
    }

    /// The Firebase project the service account belongs to.
    pub fn project_id(&self) -> &str {
        &self.account.project_id
    }

    async fn send_one(&self, msg: &PushMessage) -> Outcome {
        // Shared, not copied, when the request is sent again after a token refresh.
        let body = match request_body(msg, crate::unix_now()) {
            Ok(body) => bytes::Bytes::from(body),
            Err(outcome) => return outcome,
        };
        let token = match self.access_token(None).await {
            Ok(token) => token,
            Err(outcome) => return outcome,
        };
        match self.post(&token, body.clone(), msg).await {
            Reply::Done(outcome) => outcome,
            Reply::Unauthenticated(_) => {
                // The token was revoked or expired early: one refresh, then one more try.
                let token = match self.access_token(Some(&token)).await {
                    Ok(token) => token,
                    Err(outcome) => return outcome,
                };
                match self.post(&token, body, msg).await {
                    Reply::Done(outcome) => outcome,
                    Reply::Unauthenticated(reason) => Outcome::ProviderConfig {
                        reason: format!("{reason} (again, with a freshly fetched access token)"),
                    },
                }
            }
        }
    }

    async fn post(&self, token: &str, body: bytes::Bytes, msg: &PushMessage) -> Reply {
        let sent = self
            .http
            .post(self.send_url.clone())
            .bearer_auth(token)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => return Reply::Done(transport_error(e)),
        };
        let status = response.status();
        let headers = response.headers().clone();
        match response.bytes().await {
            Ok(bytes) => classify(status, &headers, &bytes, &msg.token),
            Err(e) => Reply::Done(transport_error(e)),
        }
    }

    /// The current access token, fetched if there is none or it is due for refresh. `stale`:
    /// a token FCM just refused, which must not be handed out again.
    async fn access_token(&self, stale: Option<&str>) -> Result<Arc<str>, Outcome> {
        if let Some(token) = self.token.fresh(stale) {
            return Ok(token);
        }
        let seen = self.token.completed.load(Ordering::Acquire);
        // Single flight: whoever holds the lock fetches; the others then find its result.
        let mut last_failure = self.token.fetching.lock().await;
        if let Some(token) = self.token.fresh(stale) {
            return Ok(token);
        }
        if self.token.completed.load(Ordering::Acquire) != seen
            && let Some(failure) = last_failure.as_ref()
        {
            // A fetch ran while we waited and failed: share its answer, don't repeat it.
            return Err(failure.clone());
        }
        let fetched = self.fetch_token().await;
        // Counted once finished: whoever read the count before this point was waiting for
        // this very fetch, and takes its result.
        self.token.completed.fetch_add(1, Ordering::AcqRel);
        match fetched {
            Ok(cached) => {
                tracing::debug!(
                    client_email = %self.account.client_email,
                    after_refusal = stale.is_some(),
                    "FCM access token fetched"
                );
                let token = cached.token.clone();
                *self
                    .token
                    .current
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = Some(cached);
                *last_failure = None;
                Ok(token)
            }
            Err(failure) => {
                tracing::warn!(
                    outcome = failure.label(),
                    "FCM access token fetch failed: {failure:?}"
                );
                *last_failure = Some(failure.clone());
                Err(failure)
            }
        }
    }

    async fn fetch_token(&self) -> Result<CachedToken, Outcome> {
        let assertion =
            self.account
                .assertion(crate::unix_now())
                .ok_or_else(|| Outcome::ProviderConfig {
                    reason: "FCM: could not sign the OAuth assertion with the service-account key"
                        .into(),
                })?;
        let started = Instant::now();
        let response = self
            .http
            .post(&self.account.token_uri)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(format!(
                "grant_type={GRANT_TYPE_FORM}&assertion={assertion}"
            ))
            .send()
            .await
            .map_err(|e| in_token_fetch(transport_error(e)))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| in_token_fetch(transport_error(e)))?;
        token_reply(status, &headers, &body, started)
    }
}

impl Provider for Fcm {
    fn platform(&self) -> Platform {
        Platform::Fcm
    }

    fn send<'a>(&'a self, msg: &'a PushMessage) -> BoxFuture<'a, Outcome> {
        Box::pin(self.send_one(msg))
    }
}

fn in_token_fetch(outcome: Outcome) -> Outcome {
    match outcome {
        Outcome::Retry { after, reason } => Outcome::Retry {
            after,
            reason: format!("FCM token endpoint: {reason}"),
        },
        other => other,
    }
}

fn check_url(url: &str) -> Result<(), &'static str> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "https" | "http") && u.host().is_some() => Ok(()),
        Ok(_) => Err("must be an http(s) URL"),
        Err(_) => Err("is not a URL"),
    }
}

// ---- service account -------------------------------------------------------------------

struct ServiceAccount {
    project_id: String,
    client_email: String,
    token_uri: String,
    key_id: Option<String>,
    key: RsaKeyPair,
}

impl ServiceAccount {
    /// Reads a service-account JSON key file. Errors name the file and the field, and never
    /// quote the key.
    fn load(path: &Path) -> Result<ServiceAccount, SetupError> {
        let fail = |message: String| SetupError::File {
            path: path.display().to_string(),
            message: format!("FCM credentials: {message}"),
        };
        let text = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        // serde_json's syntax errors give a position, never the text around it.
        let json: Value = serde_json::from_slice(&text).map_err(|e| {
            fail(format!(
                "not a JSON service-account key file (invalid JSON: {e})"
            ))
        })?;
        let Some(obj) = json.as_object() else {
            return Err(fail(
                "not a service-account key file (expected a JSON object)".into(),
            ));
        };
        if let Some(kind) = obj.get("type")
            && kind.as_str() != Some("service_account")
        {
            return Err(fail(
                "field `type` is not \"service_account\" (download a service-account key from the \
                 Firebase console: Project settings → Service accounts)"
                    .into(),
            ));
        }
        let field = |name: &str| -> Result<String, SetupError> {
            match obj.get(name) {
                None | Some(Value::Null) => Err(fail(format!("missing field `{name}`"))),
                Some(Value::String(s)) if s.trim().is_empty() => {
                    Err(fail(format!("field `{name}` is empty")))
                }
                Some(Value::String(s)) => Ok(s.trim().to_owned()),
                Some(_) => Err(fail(format!("field `{name}` must be a string"))),
            }
        };
        let project_id = field("project_id")?;
        if !project_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            return Err(fail(
                "field `project_id` is not a Firebase project id".into(),
            ));
        }
        let client_email = field("client_email")?;
        let token_uri = field("token_uri")?;
        check_url(&token_uri).map_err(|why| fail(format!("field `token_uri` {why}")))?;
        let pem = field("private_key")?;
        // The PEM parser's own errors may quote lines of the file: replace them.
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| {
            fail(
                "field `private_key` is not a PKCS#8 PEM private key (-----BEGIN PRIVATE KEY-----)"
                    .into(),
            )
        })?;
        let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(|e| {
            fail(format!(
                "field `private_key` is not a usable RSA private key ({e})"
            ))
        })?;
        let key_id = match obj.get("private_key_id") {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            _ => None,
        };
        Ok(ServiceAccount {
            project_id,
            client_email,
            token_uri,
            key_id,
            key,
        })
    }

    /// The JWT-bearer assertion, with `iat`/`exp` computed now (not once at start-up: an
    /// assertion minted at start would be refused an hour later).
    fn assertion(&self, now: i64) -> Option<String> {
        let mut header = json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.key_id {
            header["kid"] = json!(kid);
        }
        let claims = json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECS,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .ok()?;
        Some(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }
}

// ---- access token cache ----------------------------------------------------------------

#[derive(Default)]
struct TokenCache {
    current: RwLock<Option<CachedToken>>,
    /// Held while fetching; holds the last fetch's failure, if it failed.
    fetching: tokio::sync::Mutex<Option<Outcome>>,
    /// Fetches finished, so a waiter can tell that one ran while it waited.
    completed: AtomicU64,
}

#[derive(Debug, Clone)]
struct CachedToken {
    token: Arc<str>,
    refresh_at: Instant,
}

impl TokenCache {
    fn fresh(&self, stale: Option<&str>) -> Option<Arc<str>> {
        let now = Instant::now();
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        current
            .as_ref()
            .filter(|c| now < c.refresh_at && stale.is_none_or(|s| *c.token != *s))
            .map(|c| c.token.clone())
    }
}

/// The token endpoint's answer as a cached token or the outcome for the send that needed it.
fn token_reply(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    started: Instant,
) -> Result<CachedToken, Outcome> {
    if status.is_success() {
        #[derive(Deserialize)]
        struct Granted {
            access_token: String,
            expires_in: Option<u64>,
        }
        let granted: Granted = serde_json::from_slice(body)
            .ok()
            .filter(|g: &Granted| !g.access_token.is_empty())
            .ok_or_else(|| Outcome::ProviderConfig {
                reason: format!("FCM token endpoint answered {status} without an access_token"),
            })?;
        let lifetime = granted
            .expires_in
            .map_or(DEFAULT_LIFETIME, Duration::from_secs);
        let margin = REFRESH_MARGIN.min(lifetime / 2);
        return Ok(CachedToken {
            token: granted.access_token.into(),
            refresh_at: started + lifetime - margin,
        });
    }
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        return Err(Outcome::Retry {
            after: retry_after(headers),
            reason: format!("FCM token endpoint: HTTP {status}"),
        });
    }
    #[derive(Deserialize, Default)]
    struct Refused {
        error: Option<String>,
        error_description: Option<String>,
    }
    let refused: Refused = serde_json::from_slice(body).unwrap_or_default();
    let code = refused.error.unwrap_or_else(|| "no error code".into());
    let description = refused
        .error_description
        .map(|d| format!(": {}", scrub(&d, "")))
        .unwrap_or_default();
    let hint = if code == "invalid_grant" {
        "; check the server clock (Google refuses assertions whose iat/exp are off by more than a \
         few minutes: clock skew) and that the service-account key was not deleted"
    } else {
        ""
    };
    Err(Outcome::ProviderConfig {
        reason: format!(
            "FCM token endpoint refused the service account (HTTP {status}, {code}{description}){hint}"
        ),
    })
}

// ---- request ---------------------------------------------------------------------------

fn reserved_data_key(key: &str) -> bool {
    key == "from" || key == "message_type" || key.starts_with("google") || key.starts_with("gcm")
}

/// The `messages:send` body for `msg` (§1.1 of the push note), or the outcome that stops it
/// before any request (payload too large, reserved data key, …).
pub(crate) fn request_body(msg: &PushMessage, now: i64) -> Result<Vec<u8>, Outcome> {
    let invalid = |reason: String| Outcome::Invalid { reason };
    if msg.token.is_empty() {
        return Err(invalid("FCM: empty registration token".into()));
    }
    if msg.collapse_id.len() > MAX_COLLAPSE_ID_BYTES {
        return Err(invalid(format!(
            "collapse_id of {} bytes is longer than {MAX_COLLAPSE_ID_BYTES}",
            msg.collapse_id.len()
        )));
    }
    let data = app_data(msg);
    if let Some(key) = data.keys().find(|k| reserved_data_key(k)) {
        return Err(invalid(format!("FCM: data key `{key}` is reserved")));
    }
    // FCM counts the keys and values of `data` and `notification`.
    let size: usize = data.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        + "title".len()
        + msg.title.len()
        + "body".len()
        + msg.body.len();
    if size > MAX_PAYLOAD_BYTES {
        return Err(invalid(format!(
            "FCM payload of {size} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit"
        )));
    }
    let alert = !msg.title.is_empty() || !msg.body.is_empty();
    let ttl = (msg.expires_at > 0).then(|| (msg.expires_at - now).clamp(0, MAX_TTL_SECS));
    let ttl = ttl.map(|t| format!("{t}s"));
    let expiration = (msg.expires_at > 0).then(|| msg.expires_at.to_string());
    let text = alert.then_some(Text {
        title: &msg.title,
        body: &msg.body,
    });
    // A badge of 0 clears every notification of the app on iOS: leave the badge alone instead.
    let unread = (msg.unread > 0).then_some(msg.unread);
    let collapse = (!msg.collapse_id.is_empty()).then_some(msg.collapse_id.as_str());
    let body = Body {
        message: Message {
            token: &msg.token,
            data: &data,
            notification: text,
            android: Android {
                priority: if msg.high_priority { "HIGH" } else { "NORMAL" },
                ttl: ttl.as_deref(),
                notification: alert.then(|| AndroidNotification {
                    tag: collapse,
                    notification_count: unread.map(|u| i32::try_from(u).unwrap_or(i32::MAX)),
                    channel_id: android_channel(msg),
                }),
            },
            apns: Apns {
                headers: ApnsHeaders {
                    // A data-only push to iOS is a background push: Apple wants priority 5.
                    priority: if alert && msg.high_priority {
                        "10"
                    } else {
                        "5"
                    },
                    push_type: if alert { "alert" } else { "background" },
                    collapse_id: collapse,
                    expiration: expiration.as_deref(),
                },
                payload: ApnsPayload {
                    aps: Aps {
                        alert: text,
                        sound: alert.then_some("default"),
                        content_available: (!alert).then_some(1),
                        badge: unread,
                        thread_id: (!msg.from.is_empty()).then_some(msg.from.as_str()),
                    },
                },
            },
        },
    };
    // FCM hands `data` to iOS as custom keys of the APNs payload: that must fit too.
    let aps_size = serde_json::to_vec(&body.message.apns.payload).map_or(0, |v| v.len());
    let data_size: usize = data.iter().map(|(k, v)| k.len() + v.len() + 6).sum();
    let apns_size = aps_size + data_size;
    if apns_size > MAX_PAYLOAD_BYTES {
        return Err(invalid(format!(
            "APNs payload (through FCM) of {apns_size} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit"
        )));
    }
    serde_json::to_vec(&body).map_err(|e| invalid(format!("FCM: cannot encode the request: {e}")))
}

// The request body, borrowed from the `PushMessage`: written out directly, without building a
// JSON tree first (this runs for every push).

#[derive(Serialize)]
struct Body<'a> {
    message: Message<'a>,
}

#[derive(Serialize)]
struct Message<'a> {
    token: &'a str,
    data: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notification: Option<Text<'a>>,
    android: Android<'a>,
    apns: Apns<'a>,
}

#[derive(Serialize, Clone, Copy)]
struct Text<'a> {
    title: &'a str,
    body: &'a str,
}

#[derive(Serialize)]
struct Android<'a> {
    priority: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notification: Option<AndroidNotification<'a>>,
}

#[derive(Serialize)]
struct AndroidNotification<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notification_count: Option<i32>,
    channel_id: &'static str,
}

#[derive(Serialize)]
struct Apns<'a> {
    headers: ApnsHeaders<'a>,
    payload: ApnsPayload<'a>,
}

#[derive(Serialize)]
struct ApnsHeaders<'a> {
    #[serde(rename = "apns-priority")]
    priority: &'static str,
    #[serde(rename = "apns-push-type")]
    push_type: &'static str,
    #[serde(rename = "apns-collapse-id", skip_serializing_if = "Option::is_none")]
    collapse_id: Option<&'a str>,
    #[serde(rename = "apns-expiration", skip_serializing_if = "Option::is_none")]
    expiration: Option<&'a str>,
}

#[derive(Serialize)]
struct ApnsPayload<'a> {
    aps: Aps<'a>,
}

#[derive(Serialize)]
struct Aps<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    alert: Option<Text<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sound: Option<&'static str>,
    #[serde(rename = "content-available", skip_serializing_if = "Option::is_none")]
    content_available: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    badge: Option<u64>,
    #[serde(rename = "thread-id", skip_serializing_if = "Option::is_none")]
    thread_id: Option<&'a str>,
}

/// The Android notification channel: the app creates `chat` and `notification`.
fn android_channel(msg: &PushMessage) -> &'static str {
    match msg.kind {
        crate::Kind::Chat => "chat",
        crate::Kind::Notification | crate::Kind::Test => "notification",
    }
}

// ---- response --------------------------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Done(Outcome),
    /// 401 `UNAUTHENTICATED`: the access token is no good; refresh it once and retry.
    Unauthenticated(String),
}

#[derive(Deserialize)]
struct ErrorBody {
    error: GoogleError,
}

#[derive(Deserialize)]
struct GoogleError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<Value>,
}

impl GoogleError {
    /// The FCM-specific `errorCode` of the `FcmError` detail.
    fn fcm_code(&self) -> Option<&str> {
        self.details.iter().find_map(|d| {
            d.get("@type")
                .and_then(Value::as_str)
                .filter(|t| t.ends_with("google.firebase.fcm.v1.FcmError"))?;
            d.get("errorCode").and_then(Value::as_str)
        })
    }

    /// The `google.rpc.BadRequest` field violations, as `field: description` lines.
    fn field_violations(&self) -> Vec<String> {
        self.details
            .iter()
            .filter(|d| {
                d.get("@type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.ends_with("google.rpc.BadRequest"))
            })
            .filter_map(|d| d.get("fieldViolations").and_then(Value::as_array))
            .flatten()
            .map(|v| {
                let field = v.get("field").and_then(Value::as_str).unwrap_or("?");
                let what = v.get("description").and_then(Value::as_str).unwrap_or("");
                format!("{field}: {what}")
            })
            .collect()
    }
}

/// Maps one `messages:send` response to what to do (§1.2 and §6 of the push note):
/// `details[].errorCode` first, then the canonical `status`, then the HTTP status.
fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8], token: &str) -> Reply {
    if status.is_success() {
        #[derive(Deserialize)]
        struct Sent {
            #[serde(default)]
            name: String,
        }
        // FCM accepted it: that holds even if the body is odd, so never retry it.
        let name = serde_json::from_slice::<Sent>(body)
            .map(|s| s.name)
            .unwrap_or_default();
        return Reply::Done(Outcome::Sent { receipt: name });
    }
    let retry = |reason: String| Outcome::Retry {
        after: retry_after(headers),
        reason,
    };
    let Ok(ErrorBody { error }) = serde_json::from_slice::<ErrorBody>(body) else {
        // Not a Google API error: a proxy, or a wrong endpoint.
        let reason = format!("FCM HTTP {status} without an API error body");
        return Reply::Done(match status.as_u16() {
            429 | 500..=599 => retry(reason),
            401 | 403 | 404 | 405 => Outcome::ProviderConfig {
                reason: format!("{reason}: check the FCM endpoint"),
            },
            _ => Outcome::Invalid { reason },
        });
    };
    let code = error.fcm_code().unwrap_or(&error.status).to_owned();
    let mut reason = format!("FCM {} {code}", status.as_u16());
    if !error.message.is_empty() {
        reason.push_str(": ");
        reason.push_str(&scrub(&error.message, token));
    }
    let violations = error.field_violations();
    if !violations.is_empty() {
        reason.push_str(" (");
        reason.push_str(&scrub(&violations.join("; "), token));
        reason.push(')');
    }
    Reply::Done(match code.as_str() {
        "UNREGISTERED" | "SENDER_ID_MISMATCH" => Outcome::DropToken {
            reason,
            at_ms: None,
        },
        // Google's own SDKs read a bare canonical NOT_FOUND as "token not registered".
        "NOT_FOUND" => Outcome::DropToken {
            reason,
            at_ms: None,
        },
        // INVALID_ARGUMENT also covers every payload mistake: only this message means the
        // token is bad.
        "INVALID_ARGUMENT"
            if violations.is_empty()
                && error.message.to_lowercase().contains(INVALID_TOKEN_MESSAGE) =>
        {
            Outcome::DropToken {
                reason,
                at_ms: None,
            }
        }
        "INVALID_ARGUMENT" => Outcome::Invalid { reason },
        "UNAUTHENTICATED" => return Reply::Unauthenticated(reason),
        "THIRD_PARTY_AUTH_ERROR" | "PERMISSION_DENIED" => Outcome::ProviderConfig { reason },
        "QUOTA_EXCEEDED" | "RESOURCE_EXHAUSTED" | "UNAVAILABLE" | "INTERNAL" => retry(reason),
        _ => match status.as_u16() {
            401 => return Reply::Unauthenticated(reason),
            429 | 500..=599 => retry(reason),
            403 => Outcome::ProviderConfig { reason },
            _ => Outcome::Invalid { reason },
        },
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::Kind;

    fn msg() -> PushMessage {
        PushMessage {
            id: "p1".into(),
            platform: Platform::Fcm,
            token: "fcm-token-abcdefgh".into(),
            sandbox: false,
            user: "bob".into(),
            device: "phone".into(),
            kind: Kind::Chat,
            from: "alice".into(),
            message_id: "01JD".into(),
            offset: 1234,
            count: 2,
            unread: 3,
            title: "alice".into(),
            body: "New message".into(),
            data: BTreeMap::from([("room".into(), "r1".into())]),
            collapse_id: "c:alice".into(),
            high_priority: true,
            expires_at: 1_000_100,
        }
    }

    fn body(m: &PushMessage) -> Value {
        let bytes = request_body(m, 1_000_000).unwrap_or_else(|o| panic!("{o:?}"));
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn chat_request_shape() {
        let expected = json!({"message": {
            "token": "fcm-token-abcdefgh",
            "data": {"type": "chat", "sender": "alice", "message_id": "01JD", "offset": "1234",
                     "unread": "3", "count": "2", "room": "r1"},
            "notification": {"title": "alice", "body": "New message"},
            "android": {"priority": "HIGH", "ttl": "100s",
                        "notification": {"tag": "c:alice", "notification_count": 3,
                                         "channel_id": "chat"}},
            "apns": {"headers": {"apns-priority": "10", "apns-push-type": "alert",
                                 "apns-collapse-id": "c:alice", "apns-expiration": "1000100"},
                     "payload": {"aps": {"alert": {"title": "alice", "body": "New message"},
                                         "badge": 3, "sound": "default", "thread-id": "alice"}}}
        }});
        assert_eq!(body(&msg()), expected);
    }

    #[test]
    fn no_badge_zero_and_test_pushes() {
        let mut m = msg();
        m.unread = 0;
        m.kind = Kind::Test;
        m.high_priority = false;
        m.expires_at = 0;
        m.collapse_id.clear();
        let b = body(&m);
        let message = &b["message"];
        assert!(message["apns"]["payload"]["aps"].get("badge").is_none());
        assert!(
            message["android"]["notification"]
                .get("notification_count")
                .is_none()
        );
        assert!(message["android"].get("ttl").is_none());
        assert!(message["android"]["notification"].get("tag").is_none());
        assert!(message["apns"]["headers"].get("apns-collapse-id").is_none());
        assert_eq!(message["data"]["type"], "notification");
        assert_eq!(message["data"]["bimip_test"], "1");
        assert_eq!(message["android"]["priority"], "NORMAL");
        assert_eq!(message["apns"]["headers"]["apns-priority"], "5");
        assert_eq!(
            message["android"]["notification"]["channel_id"],
            "notification"
        );
        // Every data value is a string.
        assert!(
            message["data"]
                .as_object()
                .is_some_and(|d| d.values().all(Value::is_string))
        );
    }

    #[test]
    fn limits_are_enforced_before_sending() {
        let mut m = msg();
        m.body = "x".repeat(4097);
        assert!(matches!(request_body(&m, 0), Err(Outcome::Invalid { .. })));
        let mut m = msg();
        m.data.insert("blob".into(), "y".repeat(4000));
        assert!(matches!(request_body(&m, 0), Err(Outcome::Invalid { .. })));
        let mut m = msg();
        m.collapse_id = "c".repeat(65);
        assert!(matches!(request_body(&m, 0), Err(Outcome::Invalid { .. })));
        let mut m = msg();
        m.data.insert("google.x".into(), "1".into());
        assert!(matches!(request_body(&m, 0), Err(Outcome::Invalid { .. })));
        // Just under: fine.
        let mut m = msg();
        m.body = "x".repeat(3000);
        assert!(request_body(&m, 0).is_ok());
    }

    fn error(status: u16, code: Option<&str>, canonical: &str, message: &str) -> Vec<u8> {
        let mut details = vec![];
        if let Some(code) = code {
            details.push(
                json!({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                                "errorCode": code}),
            );
        }
        json!({"error": {"code": status, "message": message, "status": canonical,
                         "details": details}})
        .to_string()
        .into_bytes()
    }

    fn run(status: u16, body: &[u8], retry_after: Option<&str>) -> Reply {
        let mut headers = HeaderMap::new();
        if let Some(v) = retry_after {
            headers.insert(
                header::RETRY_AFTER,
                v.parse().unwrap_or_else(|e| panic!("{e}")),
            );
        }
        let status = StatusCode::from_u16(status).unwrap_or_else(|e| panic!("{e}"));
        classify(status, &headers, body, "fcm-token-abcdefgh")
    }

    fn label(r: Reply) -> &'static str {
        match r {
            Reply::Done(o) => o.label(),
            Reply::Unauthenticated(_) => "refresh",
        }
    }

    #[test]
    fn error_table() {
        let cases: &[(u16, Option<&str>, &str, &str, &str)] = &[
            (
                404,
                Some("UNREGISTERED"),
                "NOT_FOUND",
                "Requested entity was not found.",
                "drop_token",
            ),
            (
                404,
                None,
                "NOT_FOUND",
                "Requested entity was not found.",
                "drop_token",
            ),
            (
                400,
                Some("INVALID_ARGUMENT"),
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
                "drop_token",
            ),
            (
                400,
                Some("INVALID_ARGUMENT"),
                "INVALID_ARGUMENT",
                "Invalid TTL",
                "invalid",
            ),
            (
                403,
                Some("SENDER_ID_MISMATCH"),
                "PERMISSION_DENIED",
                "SenderId mismatch",
                "drop_token",
            ),
            (
                401,
                Some("THIRD_PARTY_AUTH_ERROR"),
                "UNAUTHENTICATED",
                "Auth error from APNS",
                "provider_config",
            ),
            (
                403,
                None,
                "PERMISSION_DENIED",
                "The caller does not have permission",
                "provider_config",
            ),
            (
                429,
                Some("QUOTA_EXCEEDED"),
                "RESOURCE_EXHAUSTED",
                "Quota exceeded",
                "retry",
            ),
            (
                503,
                Some("UNAVAILABLE"),
                "UNAVAILABLE",
                "The service is currently unavailable.",
                "retry",
            ),
            (500, Some("INTERNAL"), "INTERNAL", "Internal error", "retry"),
            (
                401,
                None,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials.",
                "refresh",
            ),
            (502, None, "", "", "retry"),
            (400, None, "FAILED_PRECONDITION", "odd", "invalid"),
        ];
        for (status, code, canonical, message, want) in cases {
            let got = label(run(
                *status,
                &error(*status, *code, canonical, message),
                None,
            ));
            assert_eq!(got, *want, "{status} {code:?} {canonical}");
        }
    }

    #[test]
    fn field_violation_is_invalid_with_the_field_in_the_reason() {
        let body = json!({"error": {"code": 400, "status": "INVALID_ARGUMENT",
            "message": "Invalid value at 'message.data[0].value' (TYPE_STRING), 1",
            "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                         "fieldViolations": [{"field": "message.data[0].value",
                                              "description": "Invalid value"}]}]}});
        match run(400, body.to_string().as_bytes(), None) {
            Reply::Done(Outcome::Invalid { reason }) => {
                assert!(reason.contains("message.data[0].value"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_after_and_receipts() {
        let body = error(429, Some("QUOTA_EXCEEDED"), "RESOURCE_EXHAUSTED", "q");
        match run(429, &body, Some("30")) {
            Reply::Done(Outcome::Retry { after, .. }) => {
                assert_eq!(after, Some(Duration::from_secs(30)));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            run(200, br#"{"name":"projects/p/messages/0:1"}"#, None),
            Reply::Done(Outcome::Sent {
                receipt: "projects/p/messages/0:1".into()
            })
        );
        assert_eq!(label(run(503, b"<html>oops</html>", Some("2"))), "retry");
        assert_eq!(label(run(404, b"<html>no</html>", None)), "provider_config");
    }

    #[test]
    fn reasons_never_carry_the_token() {
        let body = error(
            400,
            Some("INVALID_ARGUMENT"),
            "INVALID_ARGUMENT",
            "fcm-token-abcdefgh is not a valid FCM registration token",
        );
        match run(400, &body, None) {
            Reply::Done(Outcome::DropToken { reason, .. }) => {
                assert!(!reason.contains("fcm-token-abcdefgh"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn token_endpoint_answers() {
        let now = Instant::now();
        let ok = token_reply(
            StatusCode::OK,
            &HeaderMap::new(),
            br#"{"access_token":"t1","expires_in":3600,"token_type":"Bearer"}"#,
            now,
        )
        .unwrap_or_else(|o| panic!("{o:?}"));
        assert_eq!(&*ok.token, "t1");
        assert_eq!(ok.refresh_at, now + Duration::from_secs(3540));
        let short = token_reply(
            StatusCode::OK,
            &HeaderMap::new(),
            br#"{"access_token":"t2","expires_in":2}"#,
            now,
        )
        .unwrap_or_else(|o| panic!("{o:?}"));
        assert_eq!(short.refresh_at, now + Duration::from_secs(1));
        let grant = token_reply(
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            br#"{"error":"invalid_grant","error_description":"Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe."}"#,
            now,
        );
        match grant {
            Err(Outcome::ProviderConfig { reason }) => {
                assert!(reason.contains("invalid_grant"), "{reason}");
                assert!(reason.contains("clock"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            token_reply(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new(), b"", now),
            Err(Outcome::Retry { .. })
        ));
        assert!(matches!(
            token_reply(StatusCode::OK, &HeaderMap::new(), b"{}", now),
            Err(Outcome::ProviderConfig { .. })
        ));
    }
}
