//! Fake webhook receiver: verifies Standard Webhooks signatures, records deliveries, plays
//! scripted answers.

use std::{
    io,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, extract::State, http::Uri, response::Response};
use http::HeaderMap;
use serde_json::{Value, json};

use super::{Log, Protocols, Scripted, Server, common_api, json_response, lock};
use crate::{
    signing::{self, Secret},
    webhook::WebhookConfig,
};

/// What the fake receiver answers a correctly signed delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookReply {
    /// This status, empty JSON body (`Status(200)` is the default).
    Status(u16),
    /// This status with `Retry-After: <value>` (seconds or an HTTP-date).
    RetryAfter { status: u16, value: String },
    /// 307 to `location` (a sender must not follow it).
    Redirect { location: String },
    /// Waits this long, then answers 200.
    Delay(Duration),
}

/// One delivery as the fake received it.
#[derive(Debug, Clone)]
pub struct WebhookRequest {
    pub path: String,
    /// `webhook-id`, `webhook-timestamp`, `webhook-signature` (empty when missing).
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    /// The body as received, and parsed (`Null` if not JSON).
    pub raw: Vec<u8>,
    pub body: Value,
    /// The signature check: `Err(why)` if it failed (the fake then answered 401).
    pub verified: Result<(), String>,
    pub status: u16,
    pub received: Instant,
}

/// A fake webhook receiver on `127.0.0.1:<port>`, any path. Every delivery's Standard Webhooks
/// signature is verified with its secret; a failure is answered 401 and listed by
/// [`FakeWebhook::failures`]. Per-token rules match the push body's `token` field. Stops when
/// dropped.
pub struct FakeWebhook {
    state: Arc<WebhookState>,
    server: Server,
}

struct WebhookState {
    secret: Secret,
    failures: Mutex<Vec<String>>,
    script: Scripted<WebhookReply>,
    log: Log<WebhookRequest>,
}

impl FakeWebhook {
    /// Starts a receiver with a new random secret ([`FakeWebhook::secret`]).
    pub async fn start() -> io::Result<FakeWebhook> {
        Self::start_with_secret(Secret::generate()).await
    }

    /// Starts a receiver that verifies with `secret`.
    pub async fn start_with_secret(secret: Secret) -> io::Result<FakeWebhook> {
        let state = Arc::new(WebhookState {
            secret,
            failures: Mutex::new(Vec::new()),
            script: Scripted::new(WebhookReply::Status(200)),
            log: Log::new(),
        });
        let router = Router::new().fallback(receive).with_state(state.clone());
        let listener = Server::bind().await?;
        let server = Server::run(listener, router, Protocols::Any, None)?;
        Ok(FakeWebhook { state, server })
    }

    /// The receiver URL (`http://127.0.0.1:<port>/hook`).
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.server.addr)
    }

    /// The secret as `whsec_<base64>`.
    pub fn secret(&self) -> String {
        self.state.secret.to_whsec()
    }

    /// A config pointing at this receiver with its secret.
    pub fn config(&self) -> WebhookConfig {
        WebhookConfig {
            url: self.url(),
            secret: self.secret(),
        }
    }

    /// Deliveries whose signature did not verify, with why (empty when the sender behaves).
    pub fn failures(&self) -> Vec<String> {
        lock(&self.state.failures).clone()
    }
}

common_api!(FakeWebhook, WebhookReply, WebhookRequest);

async fn receive(
    State(state): State<Arc<WebhookState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received = Instant::now();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let id = header(signing::HEADER_ID);
    let verified = signing::verify_headers(&state.secret, &headers, &body, crate::unix_now())
        .map_err(|e| e.to_string());
    if let Err(why) = &verified {
        lock(&state.failures).push(format!("{}: {why}", uri.path()));
    }
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (status, extra, delay) = if verified.is_err() {
        (401, None, None)
    } else {
        let token = parsed.get("token").and_then(Value::as_str);
        match state.script.next(token) {
            WebhookReply::Status(status) => (status, None, None),
            WebhookReply::RetryAfter { status, value } => {
                (status, Some((http::header::RETRY_AFTER, value)), None)
            }
            WebhookReply::Redirect { location } => {
                (307, Some((http::header::LOCATION, location)), None)
            }
            WebhookReply::Delay(d) => (200, None, Some(d)),
        }
    };
    state.log.record(received, || WebhookRequest {
        path: uri.path().to_owned(),
        id,
        timestamp: header(signing::HEADER_TIMESTAMP),
        signature: header(signing::HEADER_SIGNATURE),
        raw: body.to_vec(),
        body: parsed,
        verified,
        status,
        received,
    });
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let mut response = json_response(status, &json!({}), None);
    if let Some((name, value)) = extra
        && let Ok(value) = http::HeaderValue::from_str(&value)
    {
        response.headers_mut().insert(name, value);
    }
    response
}
