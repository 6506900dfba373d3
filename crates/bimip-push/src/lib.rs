//! Push providers for bimip: FCM HTTP v1 ([`fcm`]), APNs over HTTP/2 with token auth
//! ([`apns`]) and a signed webhook ([`webhook`]), behind one [`Provider`] trait with one
//! [`Outcome`] type, so the server's outbox workers treat every provider the same way.
//! [`signing`] implements Standard Webhooks signatures (used by the webhook provider and by the
//! server's event webhooks). With the `fake` feature, [`fake`] has loopback fake providers that
//! check what they receive the way the real services do (tests, `bimip bench push`).
//!
//! Nothing here stores anything or retries: one [`Provider::send`] is one attempt (after at most
//! one credential refresh), and its [`Outcome`] says what the caller should do next.

pub mod apns;
pub mod fcm;
pub mod http;
pub mod signing;
pub mod webhook;

#[cfg(feature = "fake")]
pub mod fake;

use std::{collections::BTreeMap, time::Duration};

use futures_util::future::BoxFuture;

/// A push service a device token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Platform {
    Fcm,
    Apns,
    Webhook,
}

impl Platform {
    pub const ALL: [Platform; 3] = [Platform::Fcm, Platform::Apns, Platform::Webhook];

    /// The name used in configuration, JSON bodies, logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Platform::Fcm => "fcm",
            Platform::Apns => "apns",
            Platform::Webhook => "webhook",
        }
    }

    pub fn parse(s: &str) -> Option<Platform> {
        match s {
            "fcm" => Some(Platform::Fcm),
            "apns" => Some(Platform::Apns),
            "webhook" => Some(Platform::Webhook),
            _ => None,
        }
    }
}

/// What a push is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Chat messages from `from` that no device of the user has acknowledged.
    Chat,
    /// A notification the app's backend sent (`POST /v1/notifications`).
    Notification,
    /// `bimip push test`.
    Test,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::Notification => "notification",
            Kind::Test => "test",
        }
    }
}

/// One push to one device, provider-neutral. Each provider maps it to its own request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushMessage {
    /// Stable id of this push, the same across retries: the webhook's `webhook-id`, and the
    /// source of the APNs `apns-id` (a UUID derived from it).
    pub id: String,
    pub platform: Platform,
    /// The device token (FCM registration token, APNs hex device token, or the opaque string a
    /// webhook-platform device registered). Never logged.
    pub token: String,
    /// APNs: send to the sandbox endpoint.
    pub sandbox: bool,
    pub user: String,
    pub device: String,
    pub kind: Kind,
    /// Chat: the sender; notifications: the sender named in the request, or "system".
    pub from: String,
    /// The newest message this push stands for.
    pub message_id: String,
    /// Its offset in the user's queue.
    pub offset: u64,
    /// How many messages this push stands for (coalesced).
    pub count: u64,
    /// The badge: the user's unread chat total, computed from its cursors (absolute).
    pub unread: u64,
    /// The visible notification. Without preview, chat pushes carry no message text.
    pub title: String,
    pub body: String,
    /// Extra string key/values for the app (FCM `data`, APNs custom keys, webhook `data`).
    pub data: BTreeMap<String, String>,
    /// Deterministic per (recipient, sender) so a repeat replaces instead of stacking
    /// (`apns-collapse-id`, Android `tag`); at most 64 bytes.
    pub collapse_id: String,
    /// OTPs and alerts: FCM `HIGH`, APNs priority 10. Chat pushes are high as well (they are
    /// user-visible); `false` means normal/power-aware priority.
    pub high_priority: bool,
    /// Unix seconds after which the provider should not deliver it any more (0 = provider
    /// default).
    pub expires_at: i64,
}

/// What one attempt came to, and so what the outbox does next (one type for every provider).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The provider accepted it: the job is done and must never be sent again.
    /// `receipt`: the provider's id (FCM message name, APNs `apns-id`, webhook status).
    Sent { receipt: String },
    /// Temporary: 429, 5xx, timeouts, connection errors. `after`: the provider's
    /// `Retry-After`, if it gave one (the caller takes the larger of it and its own backoff).
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// The token is dead (FCM `UNREGISTERED`, a token-specific `INVALID_ARGUMENT`,
    /// `SENDER_ID_MISMATCH`; APNs `BadDeviceToken`, `DeviceTokenNotForTopic`, 410; webhook 410):
    /// delete it (compare-and-delete) and drop the job. `at_ms`: when the provider learned it
    /// (APNs 410 `timestamp`), so a token registered after that survives.
    DropToken { reason: String, at_ms: Option<i64> },
    /// The request itself is wrong (payload too large, bad field): retrying cannot help.
    /// Dead-letter the job, keep the token.
    Invalid { reason: String },
    /// The provider's credentials or configuration are wrong (after one refresh): pause this
    /// provider, keep the job and its attempts.
    ProviderConfig { reason: String },
}

impl Outcome {
    /// Short label for metrics: sent, retry, drop_token, invalid, provider_config.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Sent { .. } => "sent",
            Outcome::Retry { .. } => "retry",
            Outcome::DropToken { .. } => "drop_token",
            Outcome::Invalid { .. } => "invalid",
            Outcome::ProviderConfig { .. } => "provider_config",
        }
    }
}

/// One push service.
pub trait Provider: Send + Sync {
    fn platform(&self) -> Platform;
    /// One attempt (after at most one credential refresh, e.g. on FCM `UNAUTHENTICATED` or
    /// APNs `ExpiredProviderToken`).
    fn send<'a>(&'a self, msg: &'a PushMessage) -> BoxFuture<'a, Outcome>;
}

/// A provider could not be set up from its configuration. The message names the setting or
/// file at fault and never includes a secret.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// A device token as it may appear in a message or log: its first 4 characters and "…".
pub fn mask_token(token: &str) -> String {
    let head: String = token.chars().take(4).collect();
    format!("{head}…")
}

/// Replaces every occurrence of `token` in a provider's error text by its masked form, so a
/// reason never carries a device token. Also cuts the text to a readable length.
pub(crate) fn scrub(text: &str, token: &str) -> String {
    let text = if token.len() >= 8 {
        text.replace(token, &mask_token(token))
    } else {
        text.to_owned()
    };
    match text.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// The string key/values the app receives with every push, whatever the provider (FCM `data`,
/// APNs custom keys): bimip's own keys, then the message's `data` where it does not reuse one.
/// `sender` carries [`PushMessage::from`] because FCM reserves the data key `from`. A
/// [`Kind::Test`] push is a notification flagged `bimip_test = "1"`.
pub(crate) fn app_data(msg: &PushMessage) -> BTreeMap<String, String> {
    let mut data = msg.data.clone();
    let kind = match msg.kind {
        Kind::Test => {
            data.insert("bimip_test".into(), "1".into());
            Kind::Notification
        }
        kind => kind,
    };
    data.insert("type".into(), kind.name().into());
    data.insert("sender".into(), msg.from.clone());
    data.insert("message_id".into(), msg.message_id.clone());
    data.insert("offset".into(), msg.offset.to_string());
    data.insert("unread".into(), msg.unread.to_string());
    data.insert("count".into(), msg.count.to_string());
    data
}

/// Longest `collapse_id` APNs accepts (`apns-collapse-id`); FCM's `tag` gets the same.
pub const MAX_COLLAPSE_ID_BYTES: usize = 64;

/// Largest notification payload FCM and APNs accept.
pub const MAX_PAYLOAD_BYTES: usize = 4096;

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking() {
        assert_eq!(mask_token("abcdef0123456789"), "abcd…");
        assert_eq!(mask_token("ab"), "ab…");
        let tok = "fcm-token-0123456789";
        assert_eq!(
            scrub(&format!("token {tok} is bad"), tok),
            "token fcm-… is bad"
        );
        let long = "x".repeat(1000);
        assert_eq!(scrub(&long, "").chars().count(), 301);
    }
}
