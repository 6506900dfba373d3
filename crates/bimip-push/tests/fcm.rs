//! FCM provider against the fake FCM over real HTTP on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use bimip_push::{
    Outcome, Platform, Provider, PushMessage,
    fake::{FakeFcm, FcmReply, TokenFailure},
    fcm::{Fcm, FcmConfig},
    http::HttpOptions,
};
use common::push;
use serde_json::json;

const T: Duration = Duration::from_secs(5);

struct Setup {
    fake: FakeFcm,
    fcm: Arc<Fcm>,
    _dir: tempfile::TempDir,
}

async fn setup_with(http: HttpOptions) -> Setup {
    let fake = FakeFcm::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = fake.config(dir.path()).unwrap();
    let fcm = Arc::new(Fcm::new(&config, &http).unwrap());
    Setup {
        fake,
        fcm,
        _dir: dir,
    }
}

async fn setup() -> Setup {
    setup_with(HttpOptions::default()).await
}

fn msg() -> PushMessage {
    push(Platform::Fcm, "fcm-device-token-0001")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_the_documented_message_with_one_token_for_many_sends() {
    let s = setup().await;
    assert_eq!(
        s.fcm.send(&msg()).await,
        Outcome::Sent {
            receipt: "projects/bimip-fake/messages/0:1".into()
        }
    );
    // Concurrent sends share the cached token: no second fetch.
    let sends: Vec<_> = (0..20)
        .map(|i| {
            let fcm = s.fcm.clone();
            tokio::spawn(async move {
                let mut m = msg();
                m.token = format!("fcm-device-token-{i:04}");
                fcm.send(&m).await
            })
        })
        .collect();
    for send in sends {
        assert_eq!(send.await.unwrap().label(), "sent");
    }
    for _ in 0..5 {
        assert_eq!(s.fcm.send(&msg()).await.label(), "sent");
    }
    assert_eq!(s.fake.token_fetches(), 1);
    assert_eq!(s.fake.auth_failures(), Vec::<String>::new());
    let requests = s.fake.requests();
    assert_eq!(requests.len(), 26);
    assert!(requests.iter().all(|r| r.access_token == "t1"));
    assert_eq!(
        requests[0].body,
        json!({"message": {
            "token": "fcm-device-token-0001",
            "data": {"type": "chat", "sender": "alice", "message_id": "01JD5M", "offset": "1234",
                     "unread": "3", "count": "2", "room": "r1"},
            "notification": {"title": "alice", "body": "New message"},
            "android": {"priority": "HIGH",
                        "notification": {"tag": "c:alice", "notification_count": 3,
                                         "channel_id": "chat"}},
            "apns": {"headers": {"apns-priority": "10", "apns-push-type": "alert",
                                 "apns-collapse-id": "c:alice"},
                     "payload": {"aps": {"alert": {"title": "alice", "body": "New message"},
                                         "badge": 3, "sound": "default", "thread-id": "alice"}}}
        }})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_sends_fetch_the_token_once() {
    let s = setup().await;
    s.fake.set_token_delay(Duration::from_millis(200));
    let sends: Vec<_> = (0..16)
        .map(|_| {
            let fcm = s.fcm.clone();
            tokio::spawn(async move { fcm.send(&msg()).await })
        })
        .collect();
    for send in sends {
        assert_eq!(send.await.unwrap().label(), "sent");
    }
    assert_eq!(s.fake.token_fetches(), 1);
}

#[tokio::test]
async fn token_is_refreshed_before_it_expires() {
    let s = setup().await;
    // 2 s tokens are refreshed after 1 s (the margin is at most half the lifetime).
    s.fake.set_token_lifetime(Duration::from_secs(2));
    assert_eq!(s.fcm.send(&msg()).await.label(), "sent");
    assert_eq!(s.fcm.send(&msg()).await.label(), "sent");
    assert_eq!(s.fake.token_fetches(), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(s.fcm.send(&msg()).await.label(), "sent");
    assert_eq!(s.fake.token_fetches(), 2);
    let tokens: Vec<_> = s
        .fake
        .requests()
        .into_iter()
        .map(|r| r.access_token)
        .collect();
    assert_eq!(tokens, ["t1", "t1", "t2"]);
    assert!(s.fake.auth_failures().is_empty());
}

#[tokio::test]
async fn unauthenticated_refreshes_once_then_succeeds() {
    let s = setup().await;
    assert_eq!(s.fcm.send(&msg()).await.label(), "sent");
    // The token is revoked behind the client's back: 401, one refresh, one retry.
    s.fake.revoke_tokens();
    assert_eq!(s.fcm.send(&msg()).await.label(), "sent");
    assert_eq!(s.fake.token_fetches(), 2);
    let requests = s.fake.requests();
    let seen: Vec<_> = requests
        .iter()
        .map(|r| (r.access_token.as_str(), r.status))
        .collect();
    assert_eq!(seen, [("t1", 200), ("t1", 401), ("t2", 200)]);

    // A scripted 401 UNAUTHENTICATED behaves the same.
    s.fake.push_reply(FcmReply::Unauthenticated);
    assert_eq!(s.fcm.send(&msg()).await.label(), "sent");
    assert_eq!(s.fake.token_fetches(), 3);
}

#[tokio::test]
async fn a_second_unauthenticated_is_a_provider_config_error() {
    let s = setup().await;
    s.fake
        .push_replies([FcmReply::Unauthenticated, FcmReply::Unauthenticated]);
    match s.fcm.send(&msg()).await {
        Outcome::ProviderConfig { reason } => assert!(reason.contains("UNAUTHENTICATED")),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.fake.token_fetches(), 2);
    assert_eq!(s.fake.request_count(), 2);
}

fn http_date(in_secs: u64) -> String {
    // Formats an IMF-fixdate by hand (the crate parses it; this side must not use the crate).
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + in_secs;
    let days = t / 86_400;
    let secs = t % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(m - 1) as usize];
    format!(
        "{weekday}, {d:02} {month} {y} {:02}:{:02}:{:02} GMT",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[tokio::test]
async fn every_error_row_maps_to_its_outcome() {
    let s = setup().await;
    let drop = |r: &Outcome| matches!(r, Outcome::DropToken { at_ms: None, .. });
    let cases: Vec<(FcmReply, &str)> = vec![
        (FcmReply::Unregistered, "drop_token"),
        (FcmReply::InvalidToken, "drop_token"),
        (FcmReply::SenderIdMismatch, "drop_token"),
        (
            FcmReply::InvalidField {
                field: "message.android.ttl".into(),
            },
            "invalid",
        ),
        (FcmReply::ThirdPartyAuthError, "provider_config"),
        (FcmReply::Unavailable { retry_after: None }, "retry"),
        (FcmReply::Internal { retry_after: None }, "retry"),
        (FcmReply::QuotaExceeded { retry_after: None }, "retry"),
        (
            FcmReply::Raw {
                status: 403,
                body: json!({"error": {"code": 403, "status": "PERMISSION_DENIED",
                                       "message": "denied"}})
                .to_string(),
                retry_after: None,
            },
            "provider_config",
        ),
        (
            FcmReply::Raw {
                status: 502,
                body: "<html>bad gateway</html>".into(),
                retry_after: None,
            },
            "retry",
        ),
    ];
    for (reply, want) in cases {
        s.fake.push_reply(reply.clone());
        let got = s.fcm.send(&msg()).await;
        assert_eq!(got.label(), want, "{reply:?} → {got:?}");
        if want == "drop_token" {
            assert!(drop(&got), "{got:?}");
        }
    }
    // None of these touched the access token.
    assert_eq!(s.fake.token_fetches(), 1);
}

#[tokio::test]
async fn retry_after_in_seconds_and_as_a_date_is_honoured() {
    let s = setup().await;
    s.fake.push_reply(FcmReply::QuotaExceeded {
        retry_after: Some("17".into()),
    });
    match s.fcm.send(&msg()).await {
        Outcome::Retry { after, reason } => {
            assert_eq!(after, Some(Duration::from_secs(17)));
            assert!(reason.contains("QUOTA_EXCEEDED"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    s.fake.push_reply(FcmReply::Unavailable {
        retry_after: Some(http_date(120)),
    });
    match s.fcm.send(&msg()).await {
        Outcome::Retry {
            after: Some(after), ..
        } => {
            assert!(
                (Duration::from_secs(117)..=Duration::from_secs(120)).contains(&after),
                "{after:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn reasons_name_the_problem_without_the_device_token() {
    let s = setup().await;
    s.fake.push_reply(FcmReply::InvalidField {
        field: "message.data[0].value".into(),
    });
    match s.fcm.send(&msg()).await {
        Outcome::Invalid { reason } => {
            assert!(reason.contains("message.data[0].value"), "{reason}");
            assert!(!reason.contains("fcm-device-token-0001"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn token_endpoint_failures() {
    let s = setup().await;
    s.fake.fail_token_requests(Some(TokenFailure::InvalidGrant));
    match s.fcm.send(&msg()).await {
        Outcome::ProviderConfig { reason } => {
            assert!(reason.contains("invalid_grant"), "{reason}");
            assert!(reason.contains("clock"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    s.fake.fail_token_requests(Some(TokenFailure::Unavailable));
    assert_eq!(s.fcm.send(&msg()).await.label(), "retry");
    assert_eq!(s.fake.request_count(), 0);
    s.fake.fail_token_requests(None);
    assert_eq!(s.fcm.send(&msg()).await.label(), "sent");
    assert_eq!(s.fake.token_fetches(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_share_a_failed_token_fetch() {
    let s = setup().await;
    s.fake.fail_token_requests(Some(TokenFailure::Unavailable));
    // A slow token endpoint, so every send is waiting while the one fetch runs.
    s.fake.set_token_delay(Duration::from_millis(400));
    let sends: Vec<_> = (0..12)
        .map(|_| {
            let fcm = s.fcm.clone();
            tokio::spawn(async move { fcm.send(&msg()).await })
        })
        .collect();
    for send in sends {
        assert_eq!(send.await.unwrap().label(), "retry");
    }
    // Waiters take the failure of the fetch that ran while they waited.
    assert_eq!(s.fake.token_fetches(), 1);
    // A send after that failure tries again.
    s.fake.set_token_delay(Duration::ZERO);
    s.fake.fail_token_requests(None);
    assert_eq!(s.fcm.send(&msg()).await.label(), "sent");
    assert_eq!(s.fake.token_fetches(), 2);
}

#[tokio::test]
async fn a_payload_over_4096_bytes_is_invalid_without_a_request() {
    let s = setup().await;
    let mut m = msg();
    m.body = "é".repeat(2100); // 4200 bytes
    match s.fcm.send(&m).await {
        Outcome::Invalid { reason } => assert!(reason.contains("4096"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.fake.request_count(), 0);
    assert_eq!(s.fake.token_fetches(), 0);
}

#[tokio::test]
async fn a_slow_fcm_is_a_retry() {
    let s = setup_with(HttpOptions {
        timeout: Duration::from_millis(300),
        ..HttpOptions::default()
    })
    .await;
    s.fake.push_reply(FcmReply::Delay(Duration::from_secs(2)));
    match s.fcm.send(&msg()).await {
        Outcome::Retry {
            after: None,
            reason,
        } => assert!(reason.contains("timed out"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.fake.wait_for_requests(1, T).await.len(), 1);
}

#[tokio::test]
async fn per_token_rules_and_test_pushes() {
    let s = setup().await;
    s.fake.set_reply_for_token("dead", FcmReply::Unregistered);
    let mut dead = msg();
    dead.token = "dead".into();
    assert_eq!(s.fcm.send(&dead).await.label(), "drop_token");
    assert_eq!(s.fcm.send(&dead).await.label(), "drop_token");
    assert_eq!(s.fcm.send(&msg()).await.label(), "sent");
    let mut test = msg();
    test.kind = bimip_push::Kind::Test;
    assert_eq!(s.fcm.send(&test).await.label(), "sent");
    let last = s.fake.requests().pop().unwrap();
    assert_eq!(last.message()["data"]["type"], "notification");
    assert_eq!(last.message()["data"]["bimip_test"], "1");
}

#[tokio::test]
async fn the_fake_refuses_what_fcm_refuses() {
    let s = setup().await;
    assert_eq!(s.fcm.send(&msg()).await.label(), "sent"); // issues t1
    bimip_push::http::install_crypto_provider();
    let client = reqwest::Client::new();
    let url = format!(
        "{}/v1/projects/{}/messages:send",
        s.fake.url(),
        FakeFcm::PROJECT_ID
    );
    let post = |body: serde_json::Value, bearer: Option<&'static str>| {
        let mut request = client.post(&url).json(&body);
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        async move { request.send().await.unwrap() }
    };
    let no_auth = post(json!({"message": {"token": "x"}}), None).await;
    assert_eq!(no_auth.status(), 401);
    assert_eq!(s.fake.auth_failures().len(), 1);
    let number = post(
        json!({"message": {"token": "x", "data": {"n": 1}}}),
        Some("t1"),
    )
    .await;
    assert_eq!(number.status(), 400);
    let text = number.text().await.unwrap();
    assert!(text.contains("message.data[0].value"), "{text}");
    let reserved = post(
        json!({"message": {"token": "x", "data": {"from": "a"}}}),
        Some("t1"),
    )
    .await;
    assert_eq!(reserved.status(), 400);
    let no_token = post(json!({"message": {"data": {}}}), Some("t1")).await;
    assert_eq!(no_token.status(), 400);
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn credential_errors_are_clear_and_never_show_the_key() {
    let fake = FakeFcm::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good: serde_json::Value = serde_json::from_str(&fake.service_account_json()).unwrap();
    let key = good["private_key"].as_str().unwrap().to_owned();
    // No line of the key may ever appear in an error.
    let key_lines: Vec<String> = key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::to_owned)
        .collect();
    let http = HttpOptions::default();
    let error = |path: std::path::PathBuf| -> String {
        let config = FcmConfig {
            credentials: path,
            endpoint: fake.url(),
        };
        Fcm::new(&config, &http).err().unwrap().to_string()
    };
    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        edit(&mut v);
        v.to_string()
    };

    let cases: Vec<(String, String, &str)> = vec![
        ("missing.json".into(), String::new(), "cannot read"),
        ("notjson.json".into(), format!("{{ {key}"), "invalid JSON"),
        (
            "nokey.json".into(),
            with(&|v| {
                v.as_object_mut().unwrap().remove("private_key");
            }),
            "missing field `private_key`",
        ),
        (
            "noproject.json".into(),
            with(&|v| {
                v.as_object_mut().unwrap().remove("project_id");
            }),
            "missing field `project_id`",
        ),
        (
            "badkey.json".into(),
            with(&|v| v["private_key"] = json!(key.replace("PRIVATE KEY", "SECRET STUFF"))),
            "field `private_key` is not a PKCS#8 PEM private key",
        ),
        (
            "truncated.json".into(),
            with(&|v| {
                let lines: Vec<&str> = key.lines().collect();
                let cut = [&lines[..4], &lines[lines.len() - 1..]].concat().join("\n");
                v["private_key"] = json!(cut);
            }),
            "field `private_key`",
        ),
        (
            "number.json".into(),
            with(&|v| v["client_email"] = json!(42)),
            "field `client_email` must be a string",
        ),
        (
            "uri.json".into(),
            with(&|v| v["token_uri"] = json!("not a url")),
            "field `token_uri`",
        ),
        (
            "type.json".into(),
            with(&|v| v["type"] = json!("authorized_user")),
            "field `type`",
        ),
    ];
    for (name, text, want) in cases {
        let path = dir.path().join(&name);
        if !text.is_empty() {
            write(dir.path(), &name, &text);
        }
        let message = error(path);
        eprintln!("{message}");
        assert!(message.contains(&name), "{name}: {message}");
        assert!(message.contains(want), "{name}: {message}");
        assert!(
            !key_lines.iter().any(|l| message.contains(l.as_str())),
            "{name} shows the key: {message}"
        );
    }
    // An EC key where an RSA key belongs.
    let apns = bimip_push::fake::FakeApns::start().await.unwrap();
    let ec = with(&|v| v["private_key"] = json!(apns.key_pem()));
    let message = error(write(dir.path(), "ec.json", &ec));
    assert!(
        message.contains("not a usable RSA private key"),
        "{message}"
    );
    let ec_pem = apns.key_pem();
    assert!(
        !ec_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .any(|l| message.contains(l)),
        "{message}"
    );
}
