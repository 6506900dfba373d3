//! What a push says. Chat pushes carry no message text unless `push.preview` is on: the title is
//! the sender, the body "New message" or "N new messages". The badge is the recipient's unread
//! total from its cursors (absolute, never a per-push counter), and the collapse id is the same
//! for every push of one sender, so a repeat replaces the shown notification instead of stacking.

use bimip_push::{Kind, Platform, PushMessage};
use bimip_store::push::{DeviceToken, PushJob};
use bytes::Bytes;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The payload of a notification item as `POST /v1/notifications` stores it (also what online
/// devices get in the `Message` frame).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotificationContent {
    pub title: String,
    pub body: String,
    pub data: BTreeMap<String, String>,
    pub high_priority: bool,
}

impl NotificationContent {
    /// Reads a notification payload. Any other payload (a notification a client sent with its
    /// own format) is pushed as a generic "New notification" at normal priority.
    pub fn parse(payload: &Bytes) -> NotificationContent {
        #[derive(Deserialize)]
        struct Stored {
            #[serde(default)]
            title: String,
            #[serde(default)]
            body: String,
            #[serde(default)]
            data: BTreeMap<String, String>,
            #[serde(default)]
            priority: Option<String>,
        }
        match serde_json::from_slice::<Stored>(payload) {
            Ok(s) => NotificationContent {
                title: s.title,
                body: s.body,
                data: s.data,
                high_priority: s.priority.as_deref() == Some("high"),
            },
            Err(_) => NotificationContent {
                title: "New notification".into(),
                ..Default::default()
            },
        }
    }
}

/// A collapse id for `prefix` and `of` (the sender): short, stable, at most 64 bytes.
pub fn collapse_id(prefix: &str, of: &str) -> String {
    let digest = Sha256::digest(of.as_bytes());
    format!("{prefix}:{}", hex::encode(&digest[..12]))
}

/// Where a push goes and for how long it is worth delivering.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The outbox job's id: the push's stable id across retries.
    pub job_id: u64,
    pub token: &'a DeviceToken,
    pub platform: Platform,
    /// Unix seconds after which the provider should drop it.
    pub expires_at: i64,
}

/// What every push to this device has in common.
fn base(t: Target<'_>, p: &PushJob) -> PushMessage {
    PushMessage {
        id: format!("push_{}", t.job_id),
        platform: t.platform,
        token: t.token.token.clone(),
        sandbox: t.token.sandbox,
        user: p.user.clone(),
        device: p.device.clone(),
        kind: Kind::Chat,
        from: p.from.clone(),
        message_id: p.message_id.clone(),
        offset: p.offset,
        count: u64::from(p.count.max(1)),
        unread: 0,
        title: String::new(),
        body: String::new(),
        data: BTreeMap::new(),
        collapse_id: String::new(),
        high_priority: true,
        expires_at: t.expires_at,
    }
}

/// A chat push: `count` unread messages from the sender, `unread` in total; `preview` is the
/// newest message's text when preview is on.
pub fn chat(
    t: Target<'_>,
    p: &PushJob,
    count: u64,
    unread: u64,
    preview: Option<String>,
) -> PushMessage {
    let mut m = base(t, p);
    m.count = count.max(1);
    m.unread = unread;
    m.title = p.from.clone();
    m.body = match preview {
        Some(text) => text,
        None if m.count > 1 => format!("{} new messages", m.count),
        None => "New message".into(),
    };
    m.collapse_id = collapse_id("c", &p.from);
    m
}

/// A notification push, as the backend wrote it.
pub fn notification(t: Target<'_>, p: &PushJob, unread: u64) -> PushMessage {
    let mut m = base(t, p);
    m.kind = Kind::Notification;
    m.unread = unread;
    m.title = p.title.clone();
    m.body = p.body.clone();
    m.data = p.data.clone().into_iter().collect();
    m.high_priority = p.high_priority;
    // A high-priority notification (an OTP) replaces only a repeat of itself; normal ones of one
    // sender replace each other.
    m.collapse_id = if p.high_priority {
        collapse_id("m", &p.message_id)
    } else {
        collapse_id("n", &p.from)
    };
    m
}

/// The text of a message payload for a preview: valid UTF-8 only, at most `max` characters.
pub fn preview_text(payload: &[u8], max: usize) -> Option<String> {
    let text = std::str::from_utf8(payload).ok()?.trim();
    if text.is_empty() {
        return None;
    }
    let mut out: String = text.chars().take(max).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapse_ids_are_stable_short_and_per_sender() {
        let a = collapse_id("c", "alice");
        assert_eq!(a, collapse_id("c", "alice"));
        assert_ne!(a, collapse_id("c", "bob"));
        assert!(a.len() <= 64);
    }

    #[test]
    fn notification_payloads_parse_and_others_fall_back() {
        let n = NotificationContent::parse(&Bytes::from_static(
            br#"{"title":"Code","body":"123456","data":{"k":"v"},"priority":"high"}"#,
        ));
        assert!(n.high_priority);
        assert_eq!(n.title, "Code");
        assert_eq!(n.data.get("k").map(String::as_str), Some("v"));
        let other = NotificationContent::parse(&Bytes::from_static(b"\x00\x01binary"));
        assert!(!other.high_priority);
        assert_eq!(other.title, "New notification");
    }

    #[test]
    fn preview_is_utf8_and_cut() {
        assert_eq!(preview_text(b"hello", 10).as_deref(), Some("hello"));
        assert_eq!(
            preview_text("héllo wörld".as_bytes(), 5).as_deref(),
            Some("héllo…")
        );
        assert_eq!(preview_text(&[0xff, 0xfe], 10), None);
        assert_eq!(preview_text(b"   ", 10), None);
    }
}
