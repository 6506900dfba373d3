//! Webhook provider and event sender against the fake receiver over real HTTP on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD};
use bimip_push::{
    Kind, Outcome, Platform, Provider, PushMessage,
    fake::{FakeWebhook, WebhookReply},
    http::HttpOptions,
    signing::{self, Secret},
    webhook::{EventSender, WebhookConfig, WebhookProvider},
};
use common::push;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

const T: Duration = Duration::from_secs(5);

fn msg() -> PushMessage {
    push(Platform::Webhook, "opaque-device-handle")
}

async fn setup() -> (FakeWebhook, WebhookProvider) {
    let fake = FakeWebhook::start().await.unwrap();
    let provider = WebhookProvider::new(&fake.config(), &HttpOptions::default()).unwrap();
    (fake, provider)
}

#[tokio::test]
async fn a_push_is_signed_and_verifiable() {
    let (fake, provider) = setup().await;
    assert_eq!(
        provider.send(&msg()).await,
        Outcome::Sent {
            receipt: "200".into()
        }
    );
    let requests = fake.wait_for_requests(1, T).await;
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.verified, Ok(()));
    assert!(fake.failures().is_empty());
    assert_eq!(r.id, "push-01JD5");
    assert_eq!(
        r.body,
        json!({"type": "push", "user": "bob", "device": "phone", "token": "opaque-device-handle",
               "kind": "chat", "from": "alice", "message_id": "01JD5M", "offset": 1234,
               "unread": 3, "title": "alice", "body": "New message", "data": {"room": "r1"},
               "collapse_key": "c:alice", "priority": "high"})
    );

    // The crate's own verifier agrees…
    let secret = Secret::parse(&fake.secret()).unwrap();
    let now: i64 = r.timestamp.parse().unwrap();
    assert_eq!(
        signing::verify(&secret, &r.id, &r.timestamp, &r.signature, &r.raw, now),
        Ok(())
    );
    // …and so does an HMAC computed here by hand from the spec.
    let key = STANDARD
        .decode(fake.secret().strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.", r.id, r.timestamp).as_bytes());
    mac.update(&r.raw);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    assert_eq!(r.signature, expected);
}

#[tokio::test]
async fn retries_keep_the_webhook_id() {
    let (fake, provider) = setup().await;
    fake.push_reply(WebhookReply::Status(503));
    assert_eq!(provider.send(&msg()).await.label(), "retry");
    assert_eq!(provider.send(&msg()).await.label(), "sent");
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].id, requests[1].id);
    assert_eq!(requests[0].raw, requests[1].raw);
    assert!(requests.iter().all(|r| r.verified.is_ok()));
}

#[tokio::test]
async fn every_answer_maps_to_its_outcome() {
    let (fake, provider) = setup().await;
    let cases = [
        (WebhookReply::Status(200), "sent"),
        (WebhookReply::Status(201), "sent"),
        (WebhookReply::Status(204), "sent"),
        (WebhookReply::Status(410), "drop_token"),
        (WebhookReply::Status(429), "retry"),
        (WebhookReply::Status(500), "retry"),
        (WebhookReply::Status(502), "retry"),
        (WebhookReply::Status(503), "retry"),
        (WebhookReply::Status(413), "invalid"),
        (WebhookReply::Status(400), "invalid"),
        (WebhookReply::Status(404), "invalid"),
        (
            WebhookReply::Redirect {
                location: format!("{}/elsewhere", fake.url()),
            },
            "invalid",
        ),
    ];
    for (reply, want) in cases {
        fake.push_reply(reply.clone());
        let got = provider.send(&msg()).await;
        assert_eq!(got.label(), want, "{reply:?} → {got:?}");
    }
    // The redirect was not followed.
    assert!(fake.requests().iter().all(|r| r.path == "/hook"));
    assert_eq!(fake.request_count(), 12);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let (fake, provider) = setup().await;
    fake.push_reply(WebhookReply::RetryAfter {
        status: 429,
        value: "42".into(),
    });
    match provider.send(&msg()).await {
        Outcome::Retry { after, .. } => assert_eq!(after, Some(Duration::from_secs(42))),
        other => panic!("{other:?}"),
    }
    // A date long past: retry at once.
    fake.push_reply(WebhookReply::RetryAfter {
        status: 503,
        value: "Sun, 06 Nov 1994 08:49:37 GMT".into(),
    });
    match provider.send(&msg()).await {
        Outcome::Retry { after, .. } => assert_eq!(after, Some(Duration::ZERO)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_wrong_secret_shows_as_a_receiver_failure() {
    let fake = FakeWebhook::start().await.unwrap();
    let wrong = WebhookConfig {
        url: fake.url(),
        secret: Secret::generate().to_whsec(),
    };
    let provider = WebhookProvider::new(&wrong, &HttpOptions::default()).unwrap();
    assert_eq!(provider.send(&msg()).await.label(), "invalid");
    let failures = fake.failures();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].contains("no `v1` signature"), "{failures:?}");
    assert_eq!(fake.requests()[0].status, 401);
}

#[tokio::test]
async fn test_pushes_go_out_as_flagged_notifications() {
    let (fake, provider) = setup().await;
    let mut m = msg();
    m.kind = Kind::Test;
    m.high_priority = false;
    assert_eq!(provider.send(&m).await.label(), "sent");
    let r = &fake.requests()[0];
    assert_eq!(r.body["kind"], "notification");
    assert_eq!(r.body["data"], json!({"room": "r1", "bimip_test": "1"}));
    assert_eq!(r.body["priority"], "normal");
}

#[tokio::test]
async fn per_token_rules() {
    let (fake, provider) = setup().await;
    fake.set_reply_for_token("gone-device", WebhookReply::Status(410));
    let mut gone = msg();
    gone.token = "gone-device".into();
    assert_eq!(provider.send(&gone).await.label(), "drop_token");
    assert_eq!(provider.send(&msg()).await.label(), "sent");
}

#[tokio::test]
async fn a_slow_receiver_is_a_retry() {
    let fake = FakeWebhook::start().await.unwrap();
    let http = HttpOptions {
        timeout: Duration::from_millis(300),
        ..HttpOptions::default()
    };
    let provider = WebhookProvider::new(&fake.config(), &http).unwrap();
    fake.push_reply(WebhookReply::Delay(Duration::from_secs(2)));
    match provider.send(&msg()).await {
        Outcome::Retry { reason, .. } => assert!(reason.contains("timed out"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn event_webhooks_are_signed_the_same_way() {
    let fake = FakeWebhook::start().await.unwrap();
    let events = EventSender::new(&fake.url(), &fake.secret(), &HttpOptions::default()).unwrap();
    let body = br#"{"type":"presence","user":"bob","status":"online"}"#;
    assert_eq!(events.post("evt_1", body).await.label(), "sent");
    let r = &fake.requests()[0];
    assert_eq!(r.id, "evt_1");
    assert_eq!(r.raw, body);
    assert_eq!(r.verified, Ok(()));
    // 410: the endpoint is gone.
    fake.push_reply(WebhookReply::Status(410));
    assert_eq!(events.post("evt_2", body).await.label(), "drop_token");
    // An id the signature scheme cannot carry is refused before sending.
    assert_eq!(events.post("evt.3", body).await.label(), "invalid");
    assert_eq!(fake.request_count(), 2);
    assert!(EventSender::new(&fake.url(), "nope", &HttpOptions::default()).is_err());
}

#[tokio::test]
async fn a_dropped_fake_stops_listening() {
    let (fake, provider) = setup().await;
    assert_eq!(provider.send(&msg()).await.label(), "sent");
    drop(fake);
    // The abort lands at the accept loop's next poll.
    tokio::time::sleep(Duration::from_millis(50)).await;
    match provider.send(&msg()).await {
        Outcome::Retry { reason, .. } => assert!(reason.contains("webhook push"), "{reason}"),
        other => panic!("{other:?}"),
    }
}
