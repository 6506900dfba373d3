//! Fake FCM: Google's OAuth token endpoint and the v1 `messages:send` endpoint.

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, extract::State, response::Response, routing::post};
use serde_json::{Value, json};

use super::{
    Jwt, Log, Protocols, Scripted, Server, common_api, json_response, lock, raw_json_response,
};
use crate::fcm::{FcmConfig, SCOPE};

const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const FCM_ERROR: &str = "type.googleapis.com/google.firebase.fcm.v1.FcmError";
const BAD_REQUEST: &str = "type.googleapis.com/google.rpc.BadRequest";

/// What the fake FCM answers a `messages:send` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FcmReply {
    /// 200 `{"name": "projects/<p>/messages/<n>"}`.
    Ok,
    /// 503 `UNAVAILABLE`.
    Unavailable { retry_after: Option<String> },
    /// 500 `INTERNAL`.
    Internal { retry_after: Option<String> },
    /// 429 `QUOTA_EXCEEDED` (canonical `RESOURCE_EXHAUSTED`).
    QuotaExceeded { retry_after: Option<String> },
    /// 404 `UNREGISTERED` (canonical `NOT_FOUND`).
    Unregistered,
    /// 400 `INVALID_ARGUMENT` "The registration token is not a valid FCM registration token".
    InvalidToken,
    /// 400 `INVALID_ARGUMENT` with a `google.rpc.BadRequest` violation of `field`.
    InvalidField { field: String },
    /// 403 `SENDER_ID_MISMATCH` (canonical `PERMISSION_DENIED`).
    SenderIdMismatch,
    /// 401 `THIRD_PARTY_AUTH_ERROR` (the APNs credentials in the Firebase console).
    ThirdPartyAuthError,
    /// 401 canonical `UNAUTHENTICATED` (as for a revoked access token).
    Unauthenticated,
    /// Waits this long, then answers 200 (timeout tests).
    Delay(Duration),
    /// Anything else: this status, body and `Retry-After`.
    Raw {
        status: u16,
        body: String,
        retry_after: Option<String>,
    },
}

/// How the fake token endpoint fails, when told to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFailure {
    /// 400 `invalid_grant` with Google's clock-skew message.
    InvalidGrant,
    /// 503.
    Unavailable,
}

/// One `messages:send` request as the fake received it.
#[derive(Debug, Clone)]
pub struct FcmRequest {
    /// The project id in the URL path.
    pub project: String,
    /// The bearer access token it carried.
    pub access_token: String,
    /// `message.token`.
    pub device_token: String,
    /// The whole JSON body (`Null` if it was not JSON).
    pub body: Value,
    /// The status the fake answered.
    pub status: u16,
    pub received: Instant,
}

impl FcmRequest {
    /// `body["message"]`.
    pub fn message(&self) -> &Value {
        &self.body["message"]
    }
}

/// A fake FCM on `127.0.0.1:<port>`: token endpoint `/token` (verifies the RS256 assertion
/// against the key it generated) and `/v1/projects/{p}/messages:send` (checks the bearer token
/// and the message, records it, plays the script). Stops when dropped.
pub struct FakeFcm {
    state: Arc<FcmState>,
    server: Server,
}

struct FcmState {
    token_uri: String,
    keys: Arc<RsaKeys>,
    /// Issued access tokens and when each expires.
    tokens: RwLock<HashMap<String, Instant>>,
    lifetime_secs: AtomicU64,
    token_fetches: AtomicU64,
    issued: AtomicU64,
    token_failure: Mutex<Option<TokenFailure>>,
    token_delay: Mutex<Duration>,
    auth_failures: Mutex<Vec<String>>,
    messages: AtomicU64,
    script: Scripted<FcmReply>,
    log: Log<FcmRequest>,
}

impl FakeFcm {
    /// The project id in the credentials the fake writes.
    pub const PROJECT_ID: &'static str = "bimip-fake";
    /// The service account's `client_email`.
    pub const CLIENT_EMAIL: &'static str = "bimip-push@bimip-fake.iam.gserviceaccount.com";

    /// Starts the fake. The first fake of a process generates an RSA-2048 key pair (shared by
    /// later fakes of the same process, as generating one takes a moment).
    pub async fn start() -> io::Result<FakeFcm> {
        let keys = rsa_keys().await?;
        let listener = Server::bind().await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(FcmState {
            token_uri: format!("http://{addr}/token"),
            keys,
            tokens: RwLock::new(HashMap::new()),
            lifetime_secs: AtomicU64::new(3600),
            token_fetches: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            token_failure: Mutex::new(None),
            token_delay: Mutex::new(Duration::ZERO),
            auth_failures: Mutex::new(Vec::new()),
            messages: AtomicU64::new(0),
            script: Scripted::new(FcmReply::Ok),
            log: Log::new(),
        });
        let router = Router::new()
            .route("/token", post(token))
            .route("/v1/projects/{project}/messages:send", post(send))
            .with_state(state.clone());
        let server = Server::run(listener, router, Protocols::Any, None)?;
        Ok(FakeFcm { state, server })
    }

    /// The base URL, for [`FcmConfig::endpoint`].
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// The token endpoint (`token_uri` in the credentials).
    pub fn token_uri(&self) -> &str {
        &self.state.token_uri
    }

    /// A service-account key file's JSON for this fake (its key, its `/token`).
    pub fn service_account_json(&self) -> String {
        json!({
            "type": "service_account",
            "project_id": Self::PROJECT_ID,
            "private_key_id": "fake-key-1",
            "private_key": self.state.keys.private_pem,
            "client_email": Self::CLIENT_EMAIL,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.state.token_uri,
        })
        .to_string()
    }

    /// Writes the service-account file into `dir`; returns its path.
    pub fn write_credentials(&self, dir: &Path) -> io::Result<PathBuf> {
        let path = dir.join("fcm-service-account.json");
        std::fs::write(&path, self.service_account_json())?;
        Ok(path)
    }

    /// Writes the credentials into `dir` and returns a config pointing at this fake.
    pub fn config(&self, dir: &Path) -> io::Result<FcmConfig> {
        Ok(FcmConfig {
            credentials: self.write_credentials(dir)?,
            endpoint: self.url(),
        })
    }

    /// `expires_in` of the access tokens issued from now on (whole seconds; default 1 h).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.state
            .lifetime_secs
            .store(lifetime.as_secs(), Ordering::Relaxed);
    }

    /// Makes the token endpoint fail (`None`: work again).
    pub fn fail_token_requests(&self, failure: Option<TokenFailure>) {
        *lock(&self.state.token_failure) = failure;
    }

    /// Makes the token endpoint take this long to answer (single-flight tests).
    pub fn set_token_delay(&self, delay: Duration) {
        *lock(&self.state.token_delay) = delay;
    }

    /// Invalidates every access token issued so far (sends with them get 401).
    pub fn revoke_tokens(&self) {
        self.state
            .tokens
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// Requests to the token endpoint so far (whatever their answer).
    pub fn token_fetches(&self) -> u64 {
        self.state.token_fetches.load(Ordering::Acquire)
    }

    /// Access tokens issued so far (`t1`, `t2`, …).
    pub fn tokens_issued(&self) -> u64 {
        self.state.issued.load(Ordering::Acquire)
    }

    /// Every refused authentication: a bad grant or assertion at `/token` (with why), a send
    /// with an unknown or expired bearer token. Empty when the client behaves.
    pub fn auth_failures(&self) -> Vec<String> {
        lock(&self.state.auth_failures).clone()
    }
}

common_api!(FakeFcm, FcmReply, FcmRequest);

impl FcmState {
    fn token_is_current(&self, token: &str, now: Instant) -> bool {
        self.tokens
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(token)
            .is_some_and(|expires| now < *expires)
    }

    fn auth_failure(&self, what: String) {
        lock(&self.auth_failures).push(what);
    }

    /// Checks an RS256 assertion the way Google does: signature, iss, aud, scope, lifetime.
    fn check_assertion(&self, assertion: &str, now: i64) -> Result<(), String> {
        let jwt = Jwt::parse(assertion)?;
        if jwt.header.get("alg").and_then(Value::as_str) != Some("RS256") {
            return Err("JWT alg is not RS256".into());
        }
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            &self.keys.public_pkcs1_der,
        )
        .verify(jwt.signing_input.as_bytes(), &jwt.signature)
        .map_err(|_| "Invalid JWT Signature.".to_owned())?;
        if jwt.claim_str("iss") != Some(FakeFcm::CLIENT_EMAIL) {
            return Err("iss is not the service account's client_email".into());
        }
        if jwt.claim_str("aud") != Some(self.token_uri.as_str()) {
            return Err("aud is not the token_uri".into());
        }
        if !jwt
            .claim_str("scope")
            .is_some_and(|s| s.split_ascii_whitespace().any(|s| s == SCOPE))
        {
            return Err("scope lacks firebase.messaging".into());
        }
        let (Some(iat), Some(exp)) = (jwt.claim_i64("iat"), jwt.claim_i64("exp")) else {
            return Err("iat or exp missing".into());
        };
        if exp <= iat || exp - iat > 3600 || iat > now + 60 || exp <= now {
            return Err(format!(
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable \
                 timeframe (iat {iat}, exp {exp}, now {now})"
            ));
        }
        Ok(())
    }

    fn issue(&self) -> (String, u64) {
        let n = self.issued.fetch_add(1, Ordering::AcqRel) + 1;
        let lifetime = self.lifetime_secs.load(Ordering::Relaxed);
        let token = format!("t{n}");
        self.tokens
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                token.clone(),
                Instant::now() + Duration::from_secs(lifetime),
            );
        (token, lifetime)
    }
}

/// `application/x-www-form-urlencoded` → pairs (enough for the token request).
fn parse_form(body: &[u8]) -> HashMap<String, String> {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
    }
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(high), Some(low)) => {
                        out.push(high * 16 + low);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                },
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((decode(k), decode(v)))
        })
        .collect()
}

fn oauth_error(status: u16, error: &str, description: &str) -> Response {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
        None,
    )
}

async fn token(State(state): State<Arc<FcmState>>, body: Bytes) -> Response {
    state.token_fetches.fetch_add(1, Ordering::AcqRel);
    let delay = *lock(&state.token_delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let form = parse_form(&body);
    if form.get("grant_type").map(String::as_str) != Some(GRANT_TYPE) {
        state.auth_failure("token: grant_type is not jwt-bearer".into());
        return oauth_error(400, "unsupported_grant_type", "Invalid grant_type");
    }
    let failure = *lock(&state.token_failure);
    match failure {
        Some(TokenFailure::InvalidGrant) => {
            return oauth_error(
                400,
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable \
                 timeframe. Check your iat and exp values in the JWT claim.",
            );
        }
        Some(TokenFailure::Unavailable) => {
            return json_response(503, &json!({"error": "temporarily_unavailable"}), None);
        }
        None => {}
    }
    let Some(assertion) = form.get("assertion") else {
        state.auth_failure("token: no assertion".into());
        return oauth_error(
            400,
            "invalid_request",
            "Missing required parameter: assertion",
        );
    };
    if let Err(why) = state.check_assertion(assertion, crate::unix_now()) {
        state.auth_failure(format!("token: {why}"));
        return oauth_error(400, "invalid_grant", &why);
    }
    let (token, lifetime) = state.issue();
    json_response(
        200,
        &json!({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}),
        None,
    )
}

fn google_error(status: u16, canonical: &str, message: &str, details: Vec<Value>) -> Value {
    json!({"error": {"code": status, "message": message, "status": canonical, "details": details}})
}

fn fcm_error(code: &str) -> Value {
    json!({"@type": FCM_ERROR, "errorCode": code})
}

fn field_violation(field: &str, description: &str) -> Vec<Value> {
    vec![
        fcm_error("INVALID_ARGUMENT"),
        json!({"@type": BAD_REQUEST,
               "fieldViolations": [{"field": field, "description": description}]}),
    ]
}

/// What FCM itself would refuse in a message, before any script applies.
fn validate(body: Option<&Value>) -> Option<(u16, Value)> {
    let invalid = |message: &str, details: Vec<Value>| {
        Some((400, google_error(400, "INVALID_ARGUMENT", message, details)))
    };
    let Some(message) = body
        .and_then(|b| b.get("message"))
        .filter(|m| m.is_object())
    else {
        return invalid("Invalid JSON payload received.", vec![]);
    };
    if message
        .get("token")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return invalid(
            "Recipient of the message is not set.",
            vec![fcm_error("INVALID_ARGUMENT")],
        );
    }
    let mut size = 0;
    if let Some(data) = message.get("data") {
        let Some(data) = data.as_object() else {
            return invalid(
                "Invalid value at 'message.data'",
                field_violation("message.data", "not a map"),
            );
        };
        for (i, (key, value)) in data.iter().enumerate() {
            let Some(value) = value.as_str() else {
                let field = format!("message.data[{i}].value");
                return invalid(
                    &format!("Invalid value at '{field}' (TYPE_STRING)"),
                    field_violation(&field, "Invalid value at (TYPE_STRING)"),
                );
            };
            if key == "from"
                || key == "message_type"
                || key.starts_with("google")
                || key.starts_with("gcm")
            {
                return invalid(
                    &format!("Invalid data payload key: {key}"),
                    field_violation("message.data", "reserved key"),
                );
            }
            size += key.len() + value.len();
        }
    }
    if let Some(n) = message.get("notification") {
        for k in ["title", "body"] {
            if let Some(v) = n.get(k).and_then(Value::as_str) {
                size += k.len() + v.len();
            }
        }
    }
    if size > crate::MAX_PAYLOAD_BYTES {
        return invalid("Message is too big", vec![fcm_error("INVALID_ARGUMENT")]);
    }
    if let Some(p) = message.pointer("/android/priority")
        && !matches!(p.as_str(), Some("HIGH" | "NORMAL"))
    {
        return invalid(
            "Invalid value at 'message.android.priority'",
            field_violation("message.android.priority", "Invalid value"),
        );
    }
    if let Some(ttl) = message.pointer("/android/ttl") {
        let ok = ttl
            .as_str()
            .and_then(|t| t.strip_suffix('s'))
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n <= 2_419_200);
        if !ok {
            return invalid(
                "Invalid value at 'message.android.ttl'",
                field_violation("message.android.ttl", "Invalid duration"),
            );
        }
    }
    if let Some(headers) = message.pointer("/apns/headers").and_then(Value::as_object)
        && headers.values().any(|v| !v.is_string())
    {
        return invalid(
            "Invalid value at 'message.apns.headers'",
            field_violation("message.apns.headers", "values must be strings"),
        );
    }
    None
}

/// A scripted reply as status, JSON body, `Retry-After` and delay.
fn render(reply: FcmReply, n: u64) -> (u16, String, Option<String>, Option<Duration>) {
    // The success body is formatted directly: it is the hot path of benchmarks.
    let sent = || {
        format!(
            r#"{{"name":"projects/{}/messages/0:{n}"}}"#,
            FakeFcm::PROJECT_ID
        )
    };
    let (status, body, retry_after, delay) = match reply {
        FcmReply::Ok => return (200, sent(), None, None),
        FcmReply::Delay(d) => return (200, sent(), None, Some(d)),
        FcmReply::Unavailable { retry_after } => (
            503,
            google_error(
                503,
                "UNAVAILABLE",
                "The service is currently unavailable.",
                vec![fcm_error("UNAVAILABLE")],
            ),
            retry_after,
            None,
        ),
        FcmReply::Internal { retry_after } => (
            500,
            google_error(
                500,
                "INTERNAL",
                "Internal error encountered.",
                vec![fcm_error("INTERNAL")],
            ),
            retry_after,
            None,
        ),
        FcmReply::QuotaExceeded { retry_after } => (
            429,
            google_error(
                429,
                "RESOURCE_EXHAUSTED",
                "Quota exceeded for quota metric 'Send requests'.",
                vec![fcm_error("QUOTA_EXCEEDED")],
            ),
            retry_after,
            None,
        ),
        FcmReply::Unregistered => (
            404,
            google_error(
                404,
                "NOT_FOUND",
                "Requested entity was not found.",
                vec![fcm_error("UNREGISTERED")],
            ),
            None,
            None,
        ),
        FcmReply::InvalidToken => (
            400,
            google_error(
                400,
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
                vec![fcm_error("INVALID_ARGUMENT")],
            ),
            None,
            None,
        ),
        FcmReply::InvalidField { field } => (
            400,
            google_error(
                400,
                "INVALID_ARGUMENT",
                &format!("Invalid value at '{field}'"),
                field_violation(&field, "Invalid value"),
            ),
            None,
            None,
        ),
        FcmReply::SenderIdMismatch => (
            403,
            google_error(
                403,
                "PERMISSION_DENIED",
                "SenderId mismatch",
                vec![fcm_error("SENDER_ID_MISMATCH")],
            ),
            None,
            None,
        ),
        FcmReply::ThirdPartyAuthError => (
            401,
            google_error(
                401,
                "UNAUTHENTICATED",
                "Auth error from APNS or Web Push Service",
                vec![fcm_error("THIRD_PARTY_AUTH_ERROR")],
            ),
            None,
            None,
        ),
        FcmReply::Unauthenticated => (401, unauthenticated(), None, None),
        FcmReply::Raw {
            status,
            body,
            retry_after,
        } => return (status, body, retry_after, None),
    };
    (status, body.to_string(), retry_after, delay)
}

fn unauthenticated() -> Value {
    google_error(
        401,
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login \
         cookie or other valid authentication credential.",
        vec![],
    )
}

async fn send(State(state): State<Arc<FcmState>>, request: axum::extract::Request) -> Response {
    let received = Instant::now();
    // The whole request is taken apart by hand (no header-map copy, no path extractor): this
    // handler is the hot path of `bimip bench push`.
    let (parts, body) = request.into_parts();
    let project = parts
        .uri
        .path()
        .strip_prefix("/v1/projects/")
        .and_then(|p| p.strip_suffix("/messages:send"))
        .unwrap_or("")
        .to_owned();
    let access_token = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_owned();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let device_token = parsed
        .as_ref()
        .and_then(|b| b.pointer("/message/token"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let (status, reply, retry_after, delay) = if !state.token_is_current(&access_token, received) {
        state.auth_failure("send: bearer token unknown, revoked or expired".into());
        (401, unauthenticated().to_string(), None, None)
    } else if project != FakeFcm::PROJECT_ID {
        let denied = google_error(
            403,
            "PERMISSION_DENIED",
            "Permission 'cloudmessaging.messages.create' denied on resource",
            vec![],
        );
        (403, denied.to_string(), None, None)
    } else if let Some((status, error)) = validate(parsed.as_ref()) {
        (status, error.to_string(), None, None)
    } else {
        let n = state.messages.fetch_add(1, Ordering::Relaxed) + 1;
        render(state.script.next(device_token.as_deref()), n)
    };
    state.log.record(received, || FcmRequest {
        project,
        access_token,
        device_token: device_token.unwrap_or_default(),
        body: parsed.unwrap_or(Value::Null),
        status,
        received,
    });
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    raw_json_response(status, reply, retry_after.as_deref())
}

// ---- the fake's key --------------------------------------------------------------------

struct RsaKeys {
    private_pem: String,
    public_pkcs1_der: Vec<u8>,
}

static KEYS: OnceLock<Arc<RsaKeys>> = OnceLock::new();

/// The process's fake service-account key, generated on first use.
async fn rsa_keys() -> io::Result<Arc<RsaKeys>> {
    if let Some(keys) = KEYS.get() {
        return Ok(keys.clone());
    }
    let keys = tokio::task::spawn_blocking(generate_rsa)
        .await
        .map_err(io::Error::other)??;
    Ok(KEYS.get_or_init(|| Arc::new(keys)).clone())
}

fn generate_rsa() -> io::Result<RsaKeys> {
    use rsa::{
        RsaPrivateKey,
        pkcs1::EncodeRsaPublicKey,
        pkcs8::{EncodePrivateKey, LineEnding},
    };
    let key = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).map_err(io::Error::other)?;
    let private_pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(io::Error::other)?
        .to_string();
    let public_pkcs1_der = key
        .to_public_key()
        .to_pkcs1_der()
        .map_err(io::Error::other)?
        .as_bytes()
        .to_vec();
    Ok(RsaKeys {
        private_pem,
        public_pkcs1_der,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding() {
        let form = parse_form(
            b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=a.b.c&x=1+2%",
        );
        assert_eq!(form.get("grant_type").map(String::as_str), Some(GRANT_TYPE));
        assert_eq!(form.get("assertion").map(String::as_str), Some("a.b.c"));
        assert_eq!(form.get("x").map(String::as_str), Some("1 2%"));
    }
}
