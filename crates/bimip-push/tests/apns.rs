//! APNs provider against the fake APNs (HTTP/2 only) over real connections on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use std::{sync::Arc, time::Duration};

use bimip_push::{
    Outcome, Platform, Provider, PushMessage,
    apns::{Apns, ApnsConfig, apns_id},
    fake::{ApnsReply, FakeApns},
    http::HttpOptions,
};
use common::push;
use serde_json::json;

struct Setup {
    fake: FakeApns,
    apns: Arc<Apns>,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let fake = FakeApns::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = fake.config(dir.path()).unwrap();
    let apns = Arc::new(Apns::new(&config, &HttpOptions::default()).unwrap());
    Setup {
        fake,
        apns,
        _dir: dir,
    }
}

const TOKEN: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

fn msg() -> PushMessage {
    push(Platform::Apns, TOKEN)
}

#[tokio::test]
async fn sends_over_h2c_with_a_verified_es256_token() {
    let s = setup().await;
    let mut m = msg();
    m.expires_at = 1_900_000_000;
    assert_eq!(
        s.apns.send(&m).await,
        Outcome::Sent {
            receipt: apns_id(&m.id)
        }
    );
    let requests = s.fake.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(r.device_token, TOKEN);
    assert_eq!(r.header("apns-topic"), Some(FakeApns::TOPIC));
    assert_eq!(r.header("apns-push-type"), Some("alert"));
    assert_eq!(r.header("apns-priority"), Some("10"));
    assert_eq!(r.header("apns-expiration"), Some("1900000000"));
    assert_eq!(r.header("apns-collapse-id"), Some("c:alice"));
    assert_eq!(r.header("apns-id").map(str::to_owned), Some(apns_id(&m.id)));
    assert!(r.header("authorization").unwrap().starts_with("bearer "));
    assert_eq!(
        r.body,
        json!({"aps": {"alert": {"title": "alice", "body": "New message"}, "badge": 3,
                       "sound": "default", "thread-id": "alice"},
               "type": "chat", "sender": "alice", "message_id": "01JD5M", "offset": "1234",
               "unread": "3", "count": "2", "room": "r1"})
    );
    assert_eq!(s.fake.jwts_accepted(), 1);
    assert!(
        s.fake.auth_failures().is_empty(),
        "{:?}",
        s.fake.auth_failures()
    );
}

#[tokio::test]
async fn the_apns_id_is_stable_across_retries() {
    let s = setup().await;
    s.fake
        .push_reply(ApnsReply::ServiceUnavailable { retry_after: None });
    assert_eq!(s.apns.send(&msg()).await.label(), "retry");
    assert_eq!(s.apns.send(&msg()).await.label(), "sent");
    let ids: Vec<_> = s
        .fake
        .requests()
        .iter()
        .map(|r| r.header("apns-id").unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0], ids[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_jwt_for_sequential_and_concurrent_sends() {
    let s = setup().await;
    // Concurrent first sends: one mint, not one per send.
    let sends: Vec<_> = (0..40)
        .map(|i| {
            let apns = s.apns.clone();
            tokio::spawn(async move {
                let mut m = msg();
                m.id = format!("push-{i}");
                apns.send(&m).await
            })
        })
        .collect();
    for send in sends {
        assert_eq!(send.await.unwrap().label(), "sent");
    }
    for _ in 0..10 {
        assert_eq!(s.apns.send(&msg()).await.label(), "sent");
    }
    let requests = s.fake.requests();
    assert_eq!(requests.len(), 50);
    assert!(requests.iter().all(|r| r.jwt == requests[0].jwt));
    assert_eq!(s.fake.jwts_accepted(), 1);
    assert_eq!(s.fake.token_updates_refused(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_provider_token_is_reminted_once_and_the_send_retried() {
    let s = setup().await;
    assert_eq!(s.apns.send(&msg()).await.label(), "sent");
    // The next token must differ: its iat is a later second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    s.fake.expire_provider_token();
    // Every in-flight send hears "expired"; they share one new token.
    let sends: Vec<_> = (0..10)
        .map(|_| {
            let apns = s.apns.clone();
            tokio::spawn(async move { apns.send(&msg()).await })
        })
        .collect();
    for send in sends {
        assert_eq!(send.await.unwrap().label(), "sent");
    }
    assert_eq!(s.apns.send(&msg()).await.label(), "sent");
    assert_eq!(s.fake.jwts_accepted(), 2);
    assert_eq!(s.fake.token_updates_refused(), 0);
    assert!(
        s.fake.auth_failures().is_empty(),
        "{:?}",
        s.fake.auth_failures()
    );
    let requests = s.fake.requests();
    let last = requests.last().unwrap();
    assert_eq!(last.status, 200);
    assert_ne!(last.jwt, requests[0].jwt);

    // A scripted ExpiredProviderToken on one request: re-mint and retry once.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    s.fake.push_reply(ApnsReply::ExpiredProviderToken);
    assert_eq!(s.apns.send(&msg()).await.label(), "sent");
    assert_eq!(s.fake.jwts_accepted(), 3);
}

#[tokio::test]
async fn expired_twice_is_a_provider_config_error() {
    let s = setup().await;
    assert_eq!(s.apns.send(&msg()).await.label(), "sent");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    s.fake.push_replies([
        ApnsReply::ExpiredProviderToken,
        ApnsReply::ExpiredProviderToken,
    ]);
    match s.apns.send(&msg()).await {
        Outcome::ProviderConfig { reason } => assert!(reason.contains("clock"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn every_error_row_maps_to_its_outcome() {
    let s = setup().await;
    let reason = |status: u16, reason: &str| ApnsReply::Reason {
        status,
        reason: reason.into(),
    };
    let cases: Vec<(ApnsReply, &str)> = vec![
        (ApnsReply::BadDeviceToken, "drop_token"),
        (reason(400, "DeviceTokenNotForTopic"), "drop_token"),
        (reason(400, "BadCollapseId"), "invalid"),
        (reason(400, "TopicDisallowed"), "invalid"),
        (reason(400, "IdleTimeout"), "retry"),
        (reason(403, "InvalidProviderToken"), "provider_config"),
        (reason(403, "BadCertificateEnvironment"), "provider_config"),
        (reason(404, "BadPath"), "invalid"),
        (reason(410, "ExpiredToken"), "drop_token"),
        (reason(413, "PayloadTooLarge"), "invalid"),
        (ApnsReply::TooManyRequests { retry_after: None }, "retry"),
        (reason(429, "TooManyProviderTokenUpdates"), "retry"),
        (reason(500, "InternalServerError"), "retry"),
        (ApnsReply::ServiceUnavailable { retry_after: None }, "retry"),
        (reason(503, "Shutdown"), "retry"),
    ];
    for (reply, want) in cases {
        s.fake.push_reply(reply.clone());
        let got = s.apns.send(&msg()).await;
        assert_eq!(got.label(), want, "{reply:?} → {got:?}");
    }
    // 410 carries APNs' timestamp.
    s.fake.push_reply(ApnsReply::Unregistered {
        timestamp_ms: 1_700_000_000_123,
    });
    assert_eq!(
        s.apns.send(&msg()).await,
        Outcome::DropToken {
            reason: "APNs 410 Unregistered".into(),
            at_ms: Some(1_700_000_000_123)
        }
    );
    // Retry-After honoured.
    s.fake.push_reply(ApnsReply::TooManyRequests {
        retry_after: Some("9".into()),
    });
    match s.apns.send(&msg()).await {
        Outcome::Retry { after, .. } => assert_eq!(after, Some(Duration::from_secs(9))),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.fake.jwts_accepted(), 1);
}

#[tokio::test]
async fn requests_apns_would_refuse_never_leave() {
    let s = setup().await;
    let mut big = msg();
    big.body = "x".repeat(4000);
    big.data.insert("more".into(), "y".repeat(200));
    assert_eq!(s.apns.send(&big).await.label(), "invalid");
    let mut collapse = msg();
    collapse.collapse_id = "c".repeat(65);
    assert_eq!(s.apns.send(&collapse).await.label(), "invalid");
    let mut not_hex = msg();
    not_hex.token = "not/a/token".into();
    assert_eq!(s.apns.send(&not_hex).await.label(), "drop_token");
    assert_eq!(s.fake.request_count(), 0);
}

#[tokio::test]
async fn the_fake_refuses_http1() {
    let s = setup().await;
    bimip_push::http::install_crypto_provider();
    let http1 = reqwest::Client::builder().http1_only().build().unwrap();
    let result = http1
        .post(format!("{}/3/device/{TOKEN}", s.fake.url()))
        .body("{}")
        .send()
        .await;
    assert!(result.is_err(), "{result:?}");
    assert_eq!(s.fake.request_count(), 0);
}

#[tokio::test]
async fn sandbox_tokens_go_to_the_sandbox_endpoint() {
    let fake = FakeApns::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = ApnsConfig {
        // Nothing listens on port 9 of loopback (discard is not served here).
        endpoint: "http://127.0.0.1:9".into(),
        ..fake.config(dir.path()).unwrap()
    };
    let apns = Apns::new(&config, &HttpOptions::default()).unwrap();
    let mut m = msg();
    m.sandbox = true;
    assert_eq!(apns.send(&m).await.label(), "sent");
    m.sandbox = false;
    match apns.send(&m).await {
        Outcome::Retry { reason, .. } => {
            assert!(reason.contains("connection"), "{reason}");
            assert!(!reason.contains(TOKEN), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn tls_with_alpn_h2_and_a_test_ca() {
    let dir = tempfile::tempdir().unwrap();
    common::make_test_ca(dir.path());
    let fake = FakeApns::start_tls(&dir.path().join("cert.pem"), &dir.path().join("key.pem"))
        .await
        .unwrap();
    assert!(fake.url().starts_with("https://127.0.0.1:"));
    let config = fake.config(dir.path()).unwrap();

    // Without the test CA the certificate is not trusted: nothing is sent.
    let untrusted = Apns::new(&config, &HttpOptions::default()).unwrap();
    assert_eq!(untrusted.send(&msg()).await.label(), "retry");
    assert_eq!(fake.request_count(), 0);

    let http = HttpOptions {
        extra_ca_file: Some(dir.path().join("ca.pem")),
        ..HttpOptions::default()
    };
    let apns = Apns::new(&config, &http).unwrap();
    assert_eq!(apns.send(&msg()).await.label(), "sent");
    assert_eq!(apns.send(&msg()).await.label(), "sent");
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    assert!(requests.iter().all(|r| r.version == http::Version::HTTP_2));
    assert!(fake.auth_failures().is_empty());
}

#[tokio::test]
async fn key_errors_are_clear_and_never_show_the_key() {
    let fake = FakeApns::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = fake.config(dir.path()).unwrap();
    let http = HttpOptions::default();
    let error = |config: &ApnsConfig| Apns::new(config, &http).err().unwrap().to_string();

    let missing = ApnsConfig {
        key: dir.path().join("AuthKey_missing.p8"),
        ..good.clone()
    };
    let message = error(&missing);
    assert!(
        message.contains("AuthKey_missing.p8") && message.contains("cannot read"),
        "{message}"
    );

    // A damaged key file: its lines must not show up in the error.
    let pem = fake.key_pem();
    let damaged_text = pem.replace("PRIVATE KEY", "EC PARAMETERS");
    let damaged = dir.path().join("damaged.p8");
    std::fs::write(&damaged, &damaged_text).unwrap();
    let message = error(&ApnsConfig {
        key: damaged,
        ..good.clone()
    });
    assert!(
        message.contains("damaged.p8") && message.contains(".p8"),
        "{message}"
    );
    for line in pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!message.contains(line), "{message}");
    }

    let message = error(&ApnsConfig {
        key_id: String::new(),
        ..good.clone()
    });
    assert!(message.contains("key_id"), "{message}");
    let message = error(&ApnsConfig {
        endpoint: "apple".into(),
        ..good
    });
    assert!(message.contains("endpoint"), "{message}");
}

#[tokio::test]
async fn the_fake_catches_a_second_minter() {
    // Two providers with the same key each mint their own token: the second, within 20 min of
    // the first, is refused the way Apple refuses it.
    let s = setup().await;
    assert_eq!(s.apns.send(&msg()).await.label(), "sent");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let dir = tempfile::tempdir().unwrap();
    let other = Apns::new(&s.fake.config(dir.path()).unwrap(), &HttpOptions::default()).unwrap();
    match other.send(&msg()).await {
        Outcome::Retry { reason, .. } => {
            assert!(reason.contains("TooManyProviderTokenUpdates"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.fake.token_updates_refused(), 1);
    assert_eq!(s.fake.auth_failures().len(), 1);
    // The first provider's token is still the good one.
    assert_eq!(s.apns.send(&msg()).await.label(), "sent");
}
