//! Fake APNs: HTTP/2 only (h2c, or TLS with ALPN `h2`), ES256 provider-token checks, and the
//! provider-token update limit.

use std::{
    collections::{HashMap, HashSet},
    io,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path as UrlPath, State},
    response::Response,
    routing::any,
};
use base64::{Engine, engine::general_purpose::STANDARD};
use http::{HeaderMap, Method, Version};
use ring::{
    rand::SystemRandom,
    signature::{
        ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
        UnparsedPublicKey,
    },
};
use serde_json::{Value, json};

use super::{Jwt, Log, Protocols, Scripted, Server, common_api, json_response, lock};
use crate::apns::{ApnsConfig, JWT_MIN_INTERVAL};

/// What the fake APNs answers a request that passed its checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApnsReply {
    /// 200 with `apns-id`.
    Ok,
    /// 410 `Unregistered` with `timestamp` (ms).
    Unregistered { timestamp_ms: i64 },
    /// 400 `BadDeviceToken`.
    BadDeviceToken,
    /// 403 `ExpiredProviderToken`; the fake then accepts a new provider token at once.
    ExpiredProviderToken,
    /// 429 `TooManyRequests`.
    TooManyRequests { retry_after: Option<String> },
    /// 503 `ServiceUnavailable`.
    ServiceUnavailable { retry_after: Option<String> },
    /// Any other status and `reason`.
    Reason { status: u16, reason: String },
    /// Waits this long, then answers 200.
    Delay(Duration),
}

/// One request as the fake APNs received it.
#[derive(Debug, Clone)]
pub struct ApnsRequest {
    /// The device token from `/3/device/<token>`.
    pub device_token: String,
    pub method: Method,
    pub version: Version,
    pub headers: HeaderMap,
    /// The provider JWT from `authorization: bearer …`.
    pub jwt: String,
    /// The JSON payload (`Null` if it was not JSON).
    pub body: Value,
    /// The status and `reason` the fake answered.
    pub status: u16,
    pub reason: Option<String>,
    pub received: Instant,
}

impl ApnsRequest {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A fake APNs on `127.0.0.1:<port>` serving only HTTP/2: `POST /3/device/<token>`. It
/// generates its own P-256 key (write it with [`FakeApns::write_key`]), verifies each provider
/// JWT (ES256, `kid`, `iss`, age < 1 h), answers `429 TooManyProviderTokenUpdates` when a new
/// JWT shows up within 20 min of the previous one (unless it had called that one expired),
/// checks the headers and payload like APNs, records requests and plays the script. Stops when
/// dropped.
pub struct FakeApns {
    state: Arc<ApnsState>,
    server: Server,
    tls: bool,
}

struct ApnsState {
    pkcs8: Vec<u8>,
    public_key: Vec<u8>,
    jwt: Mutex<JwtState>,
    auth_failures: Mutex<Vec<String>>,
    script: Scripted<ApnsReply>,
    log: Log<ApnsRequest>,
    ids: AtomicU64,
}

#[derive(Default)]
struct JwtState {
    current: Option<CurrentJwt>,
    /// JWTs whose signature and claims were checked (each is checked once), with their iat.
    verified: HashMap<String, i64>,
    /// JWTs the fake called expired: refused with `ExpiredProviderToken` from then on.
    expired: HashSet<String>,
    accepted: u64,
    refused_updates: u64,
}

struct CurrentJwt {
    jwt: String,
    since: Instant,
    expired: bool,
}

impl FakeApns {
    pub const KEY_ID: &'static str = "FAKEKEY001";
    pub const TEAM_ID: &'static str = "FAKETEAM01";
    pub const TOPIC: &'static str = "dev.bimip.fake";

    /// Starts an h2c (HTTP/2 over plain TCP) fake: the URL is `http://127.0.0.1:<port>`.
    pub async fn start() -> io::Result<FakeApns> {
        Self::start_with(None).await
    }

    /// Starts a TLS fake offering only ALPN `h2`, with the certificate chain and key (PEM
    /// files) the caller made: the certificate must be valid for `127.0.0.1` (the URL is
    /// `https://127.0.0.1:<port>`), and the client must trust its CA
    /// (`HttpOptions::extra_ca_file`).
    pub async fn start_tls(cert_chain_pem: &Path, key_pem: &Path) -> io::Result<FakeApns> {
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let certs = CertificateDer::pem_file_iter(cert_chain_pem)
            .map_err(io::Error::other)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(io::Error::other)?;
        let key = PrivateKeyDer::from_pem_file(key_pem).map_err(io::Error::other)?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(io::Error::other)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Self::start_with(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> io::Result<FakeApns> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| io::Error::other("cannot generate a P-256 key"))?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| io::Error::other("cannot load the generated P-256 key"))?;
        let state = Arc::new(ApnsState {
            pkcs8: pkcs8.as_ref().to_vec(),
            public_key: pair.public_key().as_ref().to_vec(),
            jwt: Mutex::new(JwtState::default()),
            auth_failures: Mutex::new(Vec::new()),
            script: Scripted::new(ApnsReply::Ok),
            log: Log::new(),
            ids: AtomicU64::new(0),
        });
        let router = Router::new()
            .route("/3/device/{token}", any(push))
            .fallback(|| async { json_response(404, &json!({"reason": "BadPath"}), None) })
            .with_state(state.clone());
        let listener = Server::bind().await?;
        let is_tls = tls.is_some();
        let server = Server::run(listener, router, Protocols::Http2Only, tls)?;
        Ok(FakeApns {
            state,
            server,
            tls: is_tls,
        })
    }

    /// The base URL, for [`ApnsConfig::endpoint`] and `sandbox_endpoint`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.server.addr)
    }

    /// The signing key as a `.p8` file's text (PKCS#8 PEM).
    pub fn key_pem(&self) -> String {
        let b64 = STANDARD.encode(&self.state.pkcs8);
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        pem
    }

    /// Writes the `.p8` key into `dir`; returns its path.
    pub fn write_key(&self, dir: &Path) -> io::Result<PathBuf> {
        let path = dir.join(format!("AuthKey_{}.p8", Self::KEY_ID));
        std::fs::write(&path, self.key_pem())?;
        Ok(path)
    }

    /// Writes the key into `dir` and returns a config pointing both endpoints at this fake.
    pub fn config(&self, dir: &Path) -> io::Result<ApnsConfig> {
        Ok(ApnsConfig {
            key: self.write_key(dir)?,
            key_id: Self::KEY_ID.into(),
            team_id: Self::TEAM_ID.into(),
            topic: Self::TOPIC.into(),
            endpoint: self.url(),
            sandbox_endpoint: self.url(),
        })
    }

    /// From now on, answers `403 ExpiredProviderToken` to every request that carries the
    /// current provider JWT (as APNs does once a token is an hour old), and accepts a new JWT
    /// at once.
    pub fn expire_provider_token(&self) {
        let mut st = lock(&self.state.jwt);
        if let Some(jwt) = st.current.as_ref().map(|c| c.jwt.clone()) {
            st.expire(&jwt);
        }
    }

    /// How many different provider JWTs the fake accepted (1 = the client never re-minted).
    pub fn jwts_accepted(&self) -> u64 {
        lock(&self.state.jwt).accepted
    }

    /// How many requests got `429 TooManyProviderTokenUpdates`.
    pub fn token_updates_refused(&self) -> u64 {
        lock(&self.state.jwt).refused_updates
    }

    /// Every refused provider token (bad signature, kid, iss, age, or a re-mint within 20
    /// min), with why. Empty when the client behaves.
    pub fn auth_failures(&self) -> Vec<String> {
        lock(&self.state.auth_failures).clone()
    }
}

common_api!(FakeApns, ApnsReply, ApnsRequest);

/// A refusal: status and reason.
type Refusal = (u16, &'static str);

impl ApnsState {
    fn auth_failure(&self, what: String) {
        lock(&self.auth_failures).push(what);
    }

    /// Verifies a provider JWT; returns its `iat`.
    fn verify(&self, token: &str, now: i64) -> Result<i64, String> {
        let jwt = Jwt::parse(token)?;
        if jwt.header.get("alg").and_then(Value::as_str) != Some("ES256") {
            return Err("alg is not ES256".into());
        }
        if jwt.header.get("kid").and_then(Value::as_str) != Some(FakeApns::KEY_ID) {
            return Err("kid is not the key id".into());
        }
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &self.public_key)
            .verify(jwt.signing_input.as_bytes(), &jwt.signature)
            .map_err(|_| "bad ES256 signature".to_owned())?;
        if jwt.claim_str("iss") != Some(FakeApns::TEAM_ID) {
            return Err("iss is not the team id".into());
        }
        let iat = jwt.claim_i64("iat").ok_or("no iat")?;
        if iat > now + 60 {
            return Err(format!("iat {iat} is in the future (now {now})"));
        }
        Ok(iat)
    }

    /// Checks the provider token of one request.
    fn check_jwt(&self, token: &str) -> Result<(), Refusal> {
        let now = crate::unix_now();
        let mut st = lock(&self.jwt);
        let iat = match st.verified.get(token) {
            Some(iat) => *iat,
            None => match self.verify(token, now) {
                Ok(iat) => {
                    st.verified.insert(token.to_owned(), iat);
                    iat
                }
                Err(why) => {
                    drop(st);
                    self.auth_failure(format!("InvalidProviderToken: {why}"));
                    return Err((403, "InvalidProviderToken"));
                }
            },
        };
        if now - iat > 3600 {
            st.expire(token);
        }
        // Apple keeps refusing a token it called expired.
        if st.expired.contains(token) {
            return Err((403, "ExpiredProviderToken"));
        }
        match &st.current {
            Some(current) if current.jwt == token => Ok(()),
            Some(current) if !current.expired && current.since.elapsed() < JWT_MIN_INTERVAL => {
                let after = current.since.elapsed();
                st.refused_updates += 1;
                drop(st);
                self.auth_failure(format!(
                    "TooManyProviderTokenUpdates: a new provider token {} s after the previous one",
                    after.as_secs()
                ));
                Err((429, "TooManyProviderTokenUpdates"))
            }
            _ => {
                st.current = Some(CurrentJwt {
                    jwt: token.to_owned(),
                    since: Instant::now(),
                    expired: false,
                });
                st.accepted += 1;
                Ok(())
            }
        }
    }

    fn mark_expired(&self, token: &str) {
        lock(&self.jwt).expire(token);
    }
}

impl JwtState {
    /// Refuses `token` from now on; if it is the current one, a new one is welcome at once.
    fn expire(&mut self, token: &str) {
        self.expired.insert(token.to_owned());
        if let Some(current) = self.current.as_mut().filter(|c| c.jwt == token) {
            current.expired = true;
        }
    }
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// What APNs itself would refuse in the request's headers, path and payload.
fn validate(token: &str, headers: &HeaderMap, body: &[u8]) -> Result<(), Refusal> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err((400, "BadDeviceToken"));
    }
    match header("apns-topic") {
        None => return Err((400, "MissingTopic")),
        Some(topic) if topic != FakeApns::TOPIC => return Err((400, "BadTopic")),
        Some(_) => {}
    }
    let push_type = header("apns-push-type");
    if !matches!(
        push_type,
        Some(
            "alert"
                | "background"
                | "voip"
                | "liveactivity"
                | "complication"
                | "fileprovider"
                | "mdm"
                | "location"
        )
    ) {
        return Err((400, "InvalidPushType"));
    }
    if let Some(priority) = header("apns-priority") {
        if !matches!(priority, "10" | "5" | "1") {
            return Err((400, "BadPriority"));
        }
        if push_type == Some("background") && priority == "10" {
            return Err((400, "BadPriority"));
        }
    }
    if header("apns-id").is_some_and(|id| !is_uuid(id)) {
        return Err((400, "BadMessageId"));
    }
    if header("apns-collapse-id").is_some_and(|c| c.len() > 64) {
        return Err((400, "BadCollapseId"));
    }
    if header("apns-expiration").is_some_and(|e| e.parse::<u64>().is_err()) {
        return Err((400, "BadExpirationDate"));
    }
    if body.len() > crate::MAX_PAYLOAD_BYTES {
        return Err((413, "PayloadTooLarge"));
    }
    let aps = serde_json::from_slice::<Value>(body)
        .ok()
        .filter(|v| v.get("aps").is_some_and(Value::is_object));
    if aps.is_none() {
        return Err((400, "PayloadEmpty"));
    }
    Ok(())
}

async fn push(
    State(state): State<Arc<ApnsState>>,
    UrlPath(device_token): UrlPath<String>,
    method: Method,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received = Instant::now();
    let jwt = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("bearer ")
                .or_else(|| v.strip_prefix("Bearer "))
        })
        .unwrap_or("")
        .to_owned();
    let apns_id = headers
        .get("apns-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let n = state.ids.fetch_add(1, Ordering::Relaxed);
            format!("00000000-0000-4000-8000-{n:012x}")
        });
    let checked = if version != Version::HTTP_2 {
        // Cannot happen behind the h2-only server; kept so the check is explicit.
        Err((400, "BadPath"))
    } else if method != Method::POST {
        Err((405, "MethodNotAllowed"))
    } else if jwt.is_empty() {
        Err((403, "MissingProviderToken"))
    } else {
        state
            .check_jwt(&jwt)
            .and_then(|()| validate(&device_token, &headers, &body))
    };
    let (status, reason, retry_after, delay, timestamp) = match checked {
        Err((status, reason)) => (status, Some(reason.to_owned()), None, None, None),
        Ok(()) => match state.script.next(Some(&device_token)) {
            ApnsReply::Ok => (200, None, None, None, None),
            ApnsReply::Delay(d) => (200, None, None, Some(d), None),
            ApnsReply::Unregistered { timestamp_ms } => (
                410,
                Some("Unregistered".into()),
                None,
                None,
                Some(timestamp_ms),
            ),
            ApnsReply::BadDeviceToken => (400, Some("BadDeviceToken".into()), None, None, None),
            ApnsReply::ExpiredProviderToken => {
                state.mark_expired(&jwt);
                (403, Some("ExpiredProviderToken".into()), None, None, None)
            }
            ApnsReply::TooManyRequests { retry_after } => {
                (429, Some("TooManyRequests".into()), retry_after, None, None)
            }
            ApnsReply::ServiceUnavailable { retry_after } => (
                503,
                Some("ServiceUnavailable".into()),
                retry_after,
                None,
                None,
            ),
            ApnsReply::Reason { status, reason } => (status, Some(reason), None, None, None),
        },
    };
    state.log.record(received, || ApnsRequest {
        device_token,
        method,
        version,
        headers,
        jwt,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        status,
        reason: reason.clone(),
        received,
    });
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let mut response = match reason {
        None => {
            let mut r = Response::new(axum::body::Body::empty());
            *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
            r
        }
        Some(reason) => {
            let mut body = json!({"reason": reason});
            if let Some(ts) = timestamp {
                body["timestamp"] = json!(ts);
            }
            json_response(status, &body, retry_after.as_deref())
        }
    };
    if let Ok(value) = http::HeaderValue::from_str(&apns_id) {
        response.headers_mut().insert("apns-id", value);
    }
    response
}
