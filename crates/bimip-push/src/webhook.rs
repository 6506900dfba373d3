//! The webhook push platform and the server's event webhooks: a JSON document POSTed to one
//! configured URL and signed the Standard Webhooks way ([`crate::signing`]).
//!
//! Answers: 2xx = delivered; 410 = the endpoint (or, for pushes, the token) is gone;
//! 429, 5xx and transport errors = try again later (`Retry-After` honoured); anything else,
//! redirects included (they are never followed), = the request is refused for good.

use std::collections::BTreeMap;

use futures_util::future::BoxFuture;
use http::{StatusCode, header};
use serde::Serialize;

use crate::{
    Kind, Outcome, Platform, Provider, PushMessage, SetupError,
    http::{HttpOptions, retry_after, transport_error},
    signing::{self, Secret},
};

/// Where webhook pushes go.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// The receiver's URL (http or https).
    pub url: String,
    /// `whsec_<base64>` signing secret shared with the receiver.
    pub secret: String,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("secret", &"…")
            .finish()
    }
}

/// The webhook push provider: one signed JSON document per push, to one URL.
#[derive(Debug)]
pub struct WebhookProvider {
    poster: SignedPoster,
}

impl WebhookProvider {
    pub fn new(config: &WebhookConfig, http: &HttpOptions) -> Result<WebhookProvider, SetupError> {
        Ok(WebhookProvider {
            poster: SignedPoster::new("webhook push", &config.url, &config.secret, http)?,
        })
    }
}

impl Provider for WebhookProvider {
    fn platform(&self) -> Platform {
        Platform::Webhook
    }

    fn send<'a>(&'a self, msg: &'a PushMessage) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            match push_body(msg) {
                Ok(body) => self.poster.post(&msg.id, body).await,
                Err(outcome) => outcome,
            }
        })
    }
}

/// Sends the server's event webhooks: same signing and the same answers as pushes. A
/// [`Outcome::DropToken`] (HTTP 410) means the endpoint is gone.
#[derive(Debug)]
pub struct EventSender {
    poster: SignedPoster,
}

impl EventSender {
    /// `secret`: `whsec_<base64>`.
    pub fn new(url: &str, secret: &str, http: &HttpOptions) -> Result<EventSender, SetupError> {
        Ok(EventSender {
            poster: SignedPoster::new("event webhook", url, secret, http)?,
        })
    }

    /// POSTs one event. `webhook_id` must stay the same across retries of the event (the
    /// receiver's idempotency key).
    pub async fn post(&self, webhook_id: &str, body: &[u8]) -> Outcome {
        self.poster.post(webhook_id, body.to_vec()).await
    }
}

/// The JSON document of one webhook push, exactly these fields in this order.
#[derive(Serialize)]
struct PushBody<'a> {
    #[serde(rename = "type")]
    type_: &'static str,
    user: &'a str,
    device: &'a str,
    token: &'a str,
    kind: &'static str,
    from: &'a str,
    message_id: &'a str,
    offset: u64,
    unread: u64,
    title: &'a str,
    body: &'a str,
    data: BTreeMap<String, String>,
    collapse_key: &'a str,
    priority: &'static str,
}

fn push_body(msg: &PushMessage) -> Result<Vec<u8>, Outcome> {
    let mut data = msg.data.clone();
    let kind = match msg.kind {
        Kind::Chat => "chat",
        Kind::Notification => "notification",
        Kind::Test => {
            data.insert("bimip_test".into(), "1".into());
            "notification"
        }
    };
    serde_json::to_vec(&PushBody {
        type_: "push",
        user: &msg.user,
        device: &msg.device,
        token: &msg.token,
        kind,
        from: &msg.from,
        message_id: &msg.message_id,
        offset: msg.offset,
        unread: msg.unread,
        title: &msg.title,
        body: &msg.body,
        data,
        collapse_key: &msg.collapse_id,
        priority: if msg.high_priority { "high" } else { "normal" },
    })
    .map_err(|e| Outcome::Invalid {
        reason: format!("webhook: cannot encode the push: {e}"),
    })
}

/// The shared part: a URL, a secret, and the answer mapping.
struct SignedPoster {
    what: &'static str,
    http: reqwest::Client,
    url: reqwest::Url,
    secret: Secret,
}

impl std::fmt::Debug for SignedPoster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedPoster")
            .field("what", &self.what)
            .field("url", &self.url.as_str())
            .finish_non_exhaustive()
    }
}

impl SignedPoster {
    fn new(
        what: &'static str,
        url: &str,
        secret: &str,
        http: &HttpOptions,
    ) -> Result<SignedPoster, SetupError> {
        let url = match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "https" | "http") && u.host().is_some() => u,
            _ => {
                return Err(SetupError::Invalid(format!(
                    "{what} URL must be an http(s) URL"
                )));
            }
        };
        let secret = Secret::parse(secret)
            .map_err(|e| SetupError::Invalid(format!("{what} secret: {e}")))?;
        Ok(SignedPoster {
            what,
            http: crate::http::client(http)?,
            url,
            secret,
        })
    }

    async fn post(&self, id: &str, body: Vec<u8>) -> Outcome {
        // The id goes into a header and into the signed `id.timestamp.body` string.
        if id.is_empty() || id.contains('.') || http::HeaderValue::from_str(id).is_err() {
            return Outcome::Invalid {
                reason: format!(
                    "{}: webhook id must be non-empty header-safe text without `.`",
                    self.what
                ),
            };
        }
        let timestamp = crate::unix_now();
        let signature = signing::sign(&self.secret, id, timestamp, &body);
        let sent = self
            .http
            .post(self.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(signing::HEADER_ID, id)
            .header(signing::HEADER_TIMESTAMP, timestamp.to_string())
            .header(signing::HEADER_SIGNATURE, signature)
            .body(body)
            .send()
            .await;
        match sent {
            Ok(response) => outcome(self.what, response.status(), response.headers()),
            Err(e) => match transport_error(e) {
                Outcome::Retry { after, reason } => Outcome::Retry {
                    after,
                    reason: format!("{}: {reason}", self.what),
                },
                other => other,
            },
        }
    }
}

/// Standard Webhooks' answer rules.
fn outcome(what: &str, status: StatusCode, headers: &http::HeaderMap) -> Outcome {
    let code = status.as_u16();
    let reason = format!("{what}: HTTP {code}");
    match code {
        200..=299 => Outcome::Sent {
            receipt: code.to_string(),
        },
        410 => Outcome::DropToken {
            reason,
            at_ms: None,
        },
        429 | 500..=599 => Outcome::Retry {
            after: retry_after(headers),
            reason,
        },
        300..=399 => Outcome::Invalid {
            reason: format!("{reason} (redirects are not followed)"),
        },
        _ => Outcome::Invalid { reason },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::{Value, json};

    use super::*;

    fn msg(kind: Kind) -> PushMessage {
        PushMessage {
            id: "push-1".into(),
            platform: Platform::Webhook,
            token: "device-opaque".into(),
            sandbox: false,
            user: "bob".into(),
            device: "pc".into(),
            kind,
            from: "alice".into(),
            message_id: "01JD".into(),
            offset: 9,
            count: 2,
            unread: 4,
            title: "alice".into(),
            body: "New message".into(),
            data: BTreeMap::from([("k".into(), "v".into())]),
            collapse_id: "c:alice".into(),
            high_priority: true,
            expires_at: 0,
        }
    }

    #[test]
    fn body_is_exactly_the_documented_shape() {
        let bytes = push_body(&msg(Kind::Chat)).unwrap_or_else(|o| panic!("{o:?}"));
        let text = String::from_utf8(bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            text,
            r#"{"type":"push","user":"bob","device":"pc","token":"device-opaque","kind":"chat","from":"alice","message_id":"01JD","offset":9,"unread":4,"title":"alice","body":"New message","data":{"k":"v"},"collapse_key":"c:alice","priority":"high"}"#
        );
    }

    #[test]
    fn test_pushes_are_flagged_notifications() {
        let mut m = msg(Kind::Test);
        m.high_priority = false;
        let bytes = push_body(&m).unwrap_or_else(|o| panic!("{o:?}"));
        let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v["kind"], "notification");
        assert_eq!(v["data"], json!({"k": "v", "bimip_test": "1"}));
        assert_eq!(v["priority"], "normal");
    }

    #[test]
    fn answers() {
        let mut h = http::HeaderMap::new();
        let label = |c: u16, h: &http::HeaderMap| {
            outcome(
                "t",
                StatusCode::from_u16(c).unwrap_or_else(|e| panic!("{e}")),
                h,
            )
            .label()
        };
        for (code, want) in [
            (200, "sent"),
            (201, "sent"),
            (204, "sent"),
            (301, "invalid"),
            (302, "invalid"),
            (400, "invalid"),
            (404, "invalid"),
            (410, "drop_token"),
            (413, "invalid"),
            (429, "retry"),
            (500, "retry"),
            (502, "retry"),
            (503, "retry"),
        ] {
            assert_eq!(label(code, &h), want, "{code}");
        }
        h.insert(header::RETRY_AFTER, http::HeaderValue::from_static("3"));
        assert_eq!(
            outcome("t", StatusCode::SERVICE_UNAVAILABLE, &h),
            Outcome::Retry {
                after: Some(Duration::from_secs(3)),
                reason: "t: HTTP 503".into()
            }
        );
    }

    #[test]
    fn setup_errors_hide_the_secret() {
        let http = HttpOptions::default();
        let bad = WebhookConfig {
            url: "http://127.0.0.1:1/hook".into(),
            secret: "whsec_short".into(),
        };
        let err = WebhookProvider::new(&bad, &http)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("secret"), "{err}");
        assert!(!err.contains("whsec_short"), "{err}");
        assert!(!format!("{bad:?}").contains("whsec_short"));
        let bad_url = WebhookConfig {
            url: "ftp://x".into(),
            secret: Secret::generate().to_whsec(),
        };
        assert!(WebhookProvider::new(&bad_url, &http).is_err());
    }
}
