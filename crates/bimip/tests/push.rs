//! Push notifications end to end: the real `bimip` binary against fake FCM, APNs and webhook
//! servers that this test process starts on loopback (and that check credentials, signatures
//! and payloads the way the real services do).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bimip_proto::{
    Body,
    v1::{self, ErrorCode, Partition, ReceiptKind, Status},
};
use bimip_push::fake::{ApnsReply, FakeApns, FakeFcm, FakeWebhook, FcmReply, WebhookReply};
use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::{
    path::Path,
    time::{Duration, Instant},
};

/// Short timings so no test waits long: grace 300 ms, collapse window 5 s, retries from 50 ms.
const FAST: &[&str] = &[
    "--push-grace-ms",
    "300",
    "--push-collapse-ms",
    "5000",
    "--push-retry-base-ms",
    "50",
];

/// How long a negative check waits for a push that must not come.
const QUIET: Duration = Duration::from_millis(1200);

fn fcm_flags(fcm: &FakeFcm, dir: &Path) -> Vec<String> {
    let creds = fcm.write_credentials(dir).unwrap();
    vec![
        "--push-fcm-credentials".into(),
        creds.display().to_string(),
        "--push-fcm-endpoint".into(),
        fcm.url(),
    ]
}

/// A server pushing through `fcm`, with [`FAST`] timings and `extra` flags.
fn fcm_server(fcm: &FakeFcm, keys: &tempfile::TempDir, extra: &[&str]) -> Server {
    start_with(fcm_flags(fcm, keys.path()), extra)
}

/// Starts a server with `base` flags, the [`FAST`] timings and `extra` (which win over FAST).
fn start_with(mut flags: Vec<String>, extra: &[&str]) -> Server {
    for pair in FAST.chunks(2) {
        if !extra.contains(&pair[0]) {
            flags.extend(pair.iter().map(|s| s.to_string()));
        }
    }
    flags.extend(extra.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Server::start(&flags)
}

async fn api(
    s: &Server,
    method: reqwest::Method,
    path: &str,
    auth: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = http().request(method, s.http(path)).bearer_auth(auth);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Registers `token` for `user`'s `device` with the API key.
async fn register(s: &Server, user: &str, device: &str, platform: &str, token: &str) {
    let (st, v) = api(
        s,
        reqwest::Method::PUT,
        &format!("/v1/users/{user}/devices/{device}/push-token"),
        API_KEY,
        Some(json!({"platform": platform, "token": token})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
}

async fn devices(s: &Server, user: &str) -> Value {
    let (st, v) = api(
        s,
        reqwest::Method::GET,
        &format!("/v1/users/{user}/devices"),
        API_KEY,
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    v
}

async fn has_token(s: &Server, user: &str, device: &str) -> bool {
    devices(s, user).await["devices"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["device"] == device && !d["token"].is_null())
}

async fn notify(s: &Server, body: Value, key: Option<&str>) -> (u16, Value, bool) {
    let mut r = http()
        .post(s.http("/v1/notifications"))
        .bearer_auth(API_KEY)
        .json(&body);
    if let Some(k) = key {
        r = r.header("Idempotency-Key", k);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let replayed = resp.headers().get("idempotent-replayed").is_some();
    (status, resp.json().await.unwrap_or(Value::Null), replayed)
}

async fn dead_letters(s: &Server) -> Vec<Value> {
    let (st, v) = api(
        s,
        reqwest::Method::GET,
        "/v1/push/dead-letters?limit=100",
        API_KEY,
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    v["dead_letters"].as_array().unwrap().clone()
}

/// alice sends `n` messages to `to` and gets every Ack.
async fn burst(s: &Server, from: &str, to: &str, n: usize, text: &str) {
    let (mut c, _) = s.online(from, "laptop").await;
    for i in 0..n {
        send(&mut c, to, &format!("{from}-{to}-{i}-{}", rand_id()), text).await;
    }
}

fn rand_id() -> u64 {
    rand::random::<u64>() >> 20
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_recipient_gets_one_push_per_burst_without_text() {
    let fcm = FakeFcm::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let s = fcm_server(&fcm, &keys, &[]);
    register(&s, "bob", "phone", "fcm", "bob-fcm-token-0001").await;
    burst(&s, "alice", "bob", 5, "the secret text").await;
    let reqs = fcm.wait_for_requests(1, T).await;
    assert_eq!(reqs.len(), 1);
    tokio::time::sleep(QUIET).await;
    let reqs = fcm.requests();
    assert_eq!(reqs.len(), 1, "one push for the burst: {reqs:#?}");
    let r = &reqs[0];
    assert_eq!(r.device_token, "bob-fcm-token-0001");
    let m = r.message();
    let tag = m["android"]["notification"]["tag"].as_str().unwrap();
    assert!(tag.starts_with("c:") && tag.len() <= 64, "{tag}");
    assert_eq!(m["apns"]["headers"]["apns-collapse-id"], tag);
    assert_eq!(
        m["apns"]["payload"]["aps"]["badge"], 5,
        "badge = unread total"
    );
    assert_eq!(m["data"]["sender"], "alice");
    assert_eq!(m["data"]["count"], "5");
    assert!(
        !r.body.to_string().contains("secret"),
        "no message text leaves the server: {}",
        r.body
    );
    // Another message inside the collapse window sends nothing.
    burst(&s, "alice", "bob", 1, "more").await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(fcm.request_count(), 1);
    // Another sender is another collapse key.
    burst(&s, "carol", "bob", 1, "hi").await;
    let reqs = fcm.wait_for_requests(2, T).await;
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].message()["data"]["sender"], "carol");
    assert_ne!(reqs[1].message()["android"]["notification"]["tag"], tag);
    assert_eq!(reqs[1].message()["apns"]["payload"]["aps"]["badge"], 7);
    assert_eq!(fcm.token_fetches(), 1, "one access token for every push");
    assert!(fcm.auth_failures().is_empty(), "{:?}", fcm.auth_failures());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_puts_the_text_into_the_push() {
    let fcm = FakeFcm::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let s = fcm_server(&fcm, &keys, &["--push-preview"]);
    register(&s, "bob", "phone", "fcm", "bob-fcm-token-0002").await;
    burst(&s, "alice", "bob", 1, "see you at eight").await;
    let reqs = fcm.wait_for_requests(1, T).await;
    assert_eq!(
        reqs[0].message()["notification"]["body"],
        "see you at eight"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_by_another_device_within_the_grace_cancels_the_push() {
    let fcm = FakeFcm::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let s = fcm_server(&fcm, &keys, &["--push-grace-ms", "1500"]);
    register(&s, "bob", "phone", "fcm", "bob-fcm-token-0003").await;
    let (mut laptop, _) = s.online("bob", "laptop").await;
    let (mut alice, _) = s.online("alice", "a").await;
    let ack = send(&mut alice, "bob", "m1", "hello").await;
    let m = message(&mut laptop).await;
    assert_eq!(m.offset, ack.offset);
    laptop
        .receipt("alice", ReceiptKind::Delivered, m.offset, Partition::Chat)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500) + QUIET).await;
    assert_eq!(fcm.request_count(), 0, "the laptop acknowledged it");
    // Not acknowledged: the phone is pushed after the grace.
    send(&mut alice, "bob", "m2", "again").await;
    message(&mut laptop).await;
    let t0 = Instant::now();
    let reqs = fcm.wait_for_requests(1, T).await;
    assert_eq!(reqs.len(), 1);
    assert!(
        t0.elapsed() >= Duration::from_millis(1200),
        "waited the grace"
    );
    assert_eq!(reqs[0].device_token, "bob-fcm-token-0003");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_an_open_connection_gets_no_push() {
    let fcm = FakeFcm::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let s = fcm_server(&fcm, &keys, &[]);
    let (mut phone, _) = s.online("bob", "phone").await;
    // The device registers its own token over the WebSocket.
    let r = phone
        .send(Body::PushToken(v1::PushToken {
            platform: v1::Platform::Fcm as i32,
            token: "bob-fcm-token-0004".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    ack(&mut phone, r).await;
    let bad = phone
        .send(Body::PushToken(v1::PushToken {
            token: "x".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    match answer(&mut phone, bad).await {
        Body::Error(e) => assert_eq!(e.code, ErrorCode::BadRequest as i32),
        other => panic!("expected an error, got {other:?}"),
    }
    burst(&s, "alice", "bob", 2, "hi").await;
    message(&mut phone).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(fcm.request_count(), 0, "the phone is online");
    let d = devices(&s, "bob").await;
    assert_eq!(d["devices"][0]["device"], "phone");
    assert_eq!(d["devices"][0]["online"], true);
    assert_eq!(d["devices"][0]["platform"], "fcm");
    assert_eq!(d["devices"][0]["token"], "bob-…0004");
    phone.close().await.unwrap();
    burst(&s, "alice", "bob", 1, "now offline").await;
    let reqs = fcm.wait_for_requests(1, T).await;
    assert_eq!(reqs.len(), 1);
    let d = devices(&s, "bob").await;
    assert_eq!(d["devices"][0]["online"], false);
    assert!(d["devices"][0]["last_push_at"].as_i64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_connection_counts_as_offline_once_its_heartbeat_fails() {
    let fcm = FakeFcm::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let s = fcm_server(&fcm, &keys, &["--heartbeat-ms", "200"]);
    register(&s, "bob", "phone", "fcm", "bob-fcm-token-0005").await;
    // The phone connects, then goes silent: it reads nothing more and answers no ping, like a
    // phone whose network vanished without closing the TCP connection.
    let (_phone, _) = s.online("bob", "phone").await;
    burst(&s, "alice", "bob", 1, "are you there").await;
    let t0 = Instant::now();
    let reqs = fcm.wait_for_requests(1, T).await;
    assert_eq!(reqs.len(), 1, "pushed once the heartbeat failed");
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(reqs[0].message()["data"]["sender"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnd_suppresses_chat_pushes_but_not_high_priority_notifications() {
    let fcm = FakeFcm::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let s = fcm_server(&fcm, &keys, &[]);
    register(&s, "bob", "phone", "fcm", "bob-fcm-token-0006").await;
    {
        let (mut bob, _) = s.online("bob", "laptop").await;
        let r = bob
            .awareness(v1::Awareness {
                status: Status::Dnd as i32,
                ..Default::default()
            })
            .await
            .unwrap();
        ack(&mut bob, r).await;
    }
    burst(&s, "alice", "bob", 1, "hi").await;
    let (st, v, _) = notify(
        &s,
        json!({"to": ["bob"], "title": "Weekly digest", "body": "3 new posts"}),
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        fcm.request_count(),
        0,
        "DND: no chat push, no normal notification"
    );
    let (st, v, _) = notify(
        &s,
        json!({"to": ["bob"], "title": "Your code", "body": "123456", "priority": "high",
               "data": {"purpose": "login"}}),
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["stored"], 1);
    let reqs = fcm.wait_for_requests(1, T).await;
    assert_eq!(reqs.len(), 1);
    let m = reqs[0].message();
    assert_eq!(m["notification"]["title"], "Your code");
    assert_eq!(m["notification"]["body"], "123456");
    assert_eq!(m["android"]["priority"], "HIGH");
    assert_eq!(m["data"]["purpose"], "login");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mute_suppresses_chat_pushes_from_that_sender_only() {
    let fcm = FakeFcm::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let s = fcm_server(&fcm, &keys, &[]);
    register(&s, "bob", "phone", "fcm", "bob-fcm-token-0007").await;
    // bob mutes alice with his own token; alice's token cannot touch bob's mutes.
    let (st, v) = api(
        &s,
        reqwest::Method::PUT,
        "/v1/users/bob/mutes/alice",
        &token("bob", Some("phone")),
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["changed"], 1);
    let (st, _) = api(
        &s,
        reqwest::Method::DELETE,
        "/v1/users/bob/mutes/alice",
        &token("alice", None),
        None,
    )
    .await;
    assert_eq!(st, 403);
    burst(&s, "alice", "bob", 1, "hi").await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(fcm.request_count(), 0, "alice is muted");
    burst(&s, "carol", "bob", 1, "hi").await;
    let reqs = fcm.wait_for_requests(1, T).await;
    assert_eq!(reqs[0].message()["data"]["sender"], "carol");
    // The messages themselves were delivered.
    let (_bob, f) = s.online("bob", "laptop").await;
    assert_eq!(f.summary.senders.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_retried_and_the_push_delivered_once() {
    let fcm = FakeFcm::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let s = fcm_server(&fcm, &keys, &[]);
    register(&s, "bob", "phone", "fcm", "bob-fcm-token-0008").await;
    fcm.push_reply(FcmReply::Unavailable { retry_after: None });
    burst(&s, "alice", "bob", 1, "hi").await;
    let reqs = fcm.wait_for_requests(2, T).await;
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].status, 503);
    assert_eq!(reqs[1].status, 200);
    tokio::time::sleep(QUIET).await;
    assert_eq!(fcm.request_count(), 2, "never sent again after a success");
    assert_eq!(
        metric(&s, "bimip_push_total{provider=\"fcm\",outcome=\"sent\"").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_retry_after_is_honoured() {
    let fcm = FakeFcm::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let s = fcm_server(&fcm, &keys, &[]);
    register(&s, "bob", "phone", "fcm", "bob-fcm-token-0009").await;
    fcm.push_reply(FcmReply::QuotaExceeded {
        retry_after: Some("2".into()),
    });
    burst(&s, "alice", "bob", 1, "hi").await;
    let reqs = fcm.wait_for_requests(2, T).await;
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].status, 429);
    let waited = reqs[1].received - reqs[0].received;
    assert!(
        waited >= Duration::from_millis(1900),
        "Retry-After: 2 honoured (backoff alone is ~50 ms), waited {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_token_is_removed_and_a_token_registered_again_survives() {
    let fcm = FakeFcm::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let s = fcm_server(&fcm, &keys, &[]);
    register(&s, "bob", "phone", "fcm", "bob-dead-token-0010").await;
    fcm.set_reply_for_token("bob-dead-token-0010", FcmReply::Unregistered);
    burst(&s, "alice", "bob", 1, "hi").await;
    fcm.wait_for_requests(1, T).await;
    eventually("the dead token is removed", T, || async {
        !has_token(&s, "bob", "phone").await
    })
    .await;
    burst(&s, "carol", "bob", 1, "hi").await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(fcm.request_count(), 1, "never sent to a removed token");

    // APNs says when it learned the token was dead; a device that registered the same token
    // again after that keeps it (compare-and-delete).
    let apns = FakeApns::start().await.unwrap();
    let s = apns_server(&apns, &keys, &[]);
    let hex = "ab".repeat(32);
    register(&s, "dave", "ipad", "apns", &hex).await;
    let learned = bimip_proto::now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    apns.set_reply_for_token(
        &hex,
        ApnsReply::Unregistered {
            timestamp_ms: learned,
        },
    );
    register(&s, "dave", "ipad", "apns", &hex).await;
    burst(&s, "alice", "dave", 1, "hi").await;
    let reqs = apns.wait_for_requests(1, T).await;
    assert_eq!(reqs[0].status, 410);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        has_token(&s, "dave", "ipad").await,
        "registered after the provider learned it was dead: kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_is_dead_lettered_after_max_attempts() {
    let fcm = FakeFcm::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let s = fcm_server(&fcm, &keys, &["--push-max-attempts", "3"]);
    register(&s, "bob", "phone", "fcm", "bob-fcm-token-0011").await;
    fcm.set_default_reply(FcmReply::Internal { retry_after: None });
    burst(&s, "alice", "bob", 1, "hi").await;
    let reqs = fcm.wait_for_requests(3, T).await;
    assert_eq!(reqs.len(), 3);
    eventually("a dead letter", T, || async {
        !dead_letters(&s).await.is_empty()
    })
    .await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(fcm.request_count(), 3, "no attempt after the last");
    let d = &dead_letters(&s).await[0];
    assert_eq!(d["reason"], "max_attempts");
    assert_eq!(d["provider"], "fcm");
    assert_eq!(d["kind"], "chat");
    assert_eq!(d["user"], "bob");
    assert_eq!(d["device"], "phone");
    assert_eq!(d["from"], "alice");
    assert!(
        metric(
            &s,
            "bimip_push_dead_letters_total{provider=\"fcm\",reason=\"max_attempts\"}"
        )
        .await
            == 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platform_without_a_provider_is_dead_lettered_as_provider_disabled() {
    let fcm = FakeFcm::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let s = fcm_server(&fcm, &keys, &[]);
    register(&s, "bob", "ipad", "apns", &"cd".repeat(32)).await;
    burst(&s, "alice", "bob", 1, "hi").await;
    eventually("a dead letter", T, || async {
        !dead_letters(&s).await.is_empty()
    })
    .await;
    let d = &dead_letters(&s).await[0];
    assert_eq!(d["reason"], "provider_disabled");
    assert_eq!(d["provider"], "apns");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_pending_at_kill_9_are_sent_after_restart_and_sent_ones_never_again() {
    let fcm = FakeFcm::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let mut s = fcm_server(&fcm, &keys, &[]);
    register(&s, "bob", "phone", "fcm", "bob-fcm-token-0012").await;
    register(&s, "carl", "phone", "fcm", "carl-fcm-token-0012").await;
    burst(&s, "alice", "bob", 1, "hi").await;
    let reqs = fcm.wait_for_requests(1, T).await;
    assert_eq!(reqs[0].device_token, "bob-fcm-token-0012");
    assert_eq!(reqs[0].status, 200);
    // carl's first attempt fails and asks for a retry in 2 s: the job is pending when the server
    // is killed.
    fcm.set_reply_for_token(
        "carl-fcm-token-0012",
        FcmReply::Unavailable {
            retry_after: Some("2".into()),
        },
    );
    burst(&s, "alice", "carl", 1, "hi").await;
    fcm.wait_for_requests(2, T).await;
    // Give the server a moment to record the failed attempt (a crash before that would retry at
    // once after the restart, which is right too, but not what this test looks at).
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.kill9();
    fcm.clear_reply_for_token("carl-fcm-token-0012");
    s.start_again();
    let reqs = fcm.wait_for_requests(3, T).await;
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[2].device_token, "carl-fcm-token-0012");
    assert_eq!(reqs[2].status, 200);
    assert!(
        reqs[2].received - reqs[1].received >= Duration::from_millis(1900),
        "the retry time survived the crash"
    );
    tokio::time::sleep(QUIET).await;
    let bobs = fcm
        .requests()
        .iter()
        .filter(|r| r.device_token == "bob-fcm-token-0012")
        .count();
    assert_eq!(bobs, 1, "bob's push was sent before the kill: never again");
    assert_eq!(fcm.request_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_queued_before_kill_9_is_sent_after_restart() {
    let fcm = FakeFcm::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    // A long grace: the job is waiting in the outbox when the server is killed.
    let mut s = fcm_server(&fcm, &keys, &["--push-grace-ms", "2500"]);
    register(&s, "bob", "phone", "fcm", "bob-fcm-token-0013").await;
    burst(&s, "alice", "bob", 3, "hi").await;
    s.kill9();
    s.start_again();
    let reqs = fcm.wait_for_requests(1, T).await;
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].message()["data"]["count"], "3");
    tokio::time::sleep(QUIET).await;
    assert_eq!(fcm.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fcm_access_token_is_fetched_once_and_refreshed() {
    let fcm = FakeFcm::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let s = fcm_server(&fcm, &keys, &[]);
    for u in ["u1", "u2", "u3", "u4"] {
        register(&s, u, "phone", "fcm", &format!("{u}-fcm-token-0014")).await;
        burst(&s, "alice", u, 1, "hi").await;
    }
    fcm.wait_for_requests(4, T).await;
    assert_eq!(fcm.token_fetches(), 1);
    // Tokens issued from now on last 2 s: the server renews its token before it runs out.
    fcm.set_token_lifetime(Duration::from_secs(2));
    fcm.revoke_tokens();
    register(&s, "u6", "phone", "fcm", "u6-fcm-token-0014").await;
    burst(&s, "alice", "u6", 1, "hi").await;
    fcm.wait_for_requests(6, T).await;
    assert_eq!(fcm.token_fetches(), 2, "a 401, then one new token");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    register(&s, "u7", "phone", "fcm", "u7-fcm-token-0014").await;
    burst(&s, "alice", "u7", 1, "hi").await;
    let reqs = fcm.wait_for_requests(7, T).await;
    assert_eq!(
        reqs[6].status, 200,
        "sent with a renewed token, no 401 first"
    );
    assert_eq!(
        fcm.token_fetches(),
        3,
        "renewed once its lifetime was nearly over"
    );
    fcm.set_token_lifetime(Duration::from_secs(3600));
    fcm.clear_requests();
    // The access token is revoked: the next push gets 401, fetches a new one once, succeeds.
    fcm.revoke_tokens();
    register(&s, "u5", "phone", "fcm", "u5-fcm-token-0014").await;
    burst(&s, "alice", "u5", 1, "hi").await;
    let reqs = fcm.wait_for_requests(2, T).await;
    assert_eq!(reqs[0].status, 401);
    assert_eq!(reqs[1].status, 200);
    assert_eq!(fcm.token_fetches(), 4);
}

fn apns_server(apns: &FakeApns, keys: &tempfile::TempDir, extra: &[&str]) -> Server {
    let key = apns.write_key(keys.path()).unwrap();
    let flags: Vec<String> = vec![
        "--push-apns-key".into(),
        key.display().to_string(),
        "--push-apns-key-id".into(),
        FakeApns::KEY_ID.into(),
        "--push-apns-team-id".into(),
        FakeApns::TEAM_ID.into(),
        "--push-apns-topic".into(),
        FakeApns::TOPIC.into(),
        "--push-apns-endpoint".into(),
        apns.url(),
        "--push-apns-sandbox-endpoint".into(),
        apns.url(),
    ];
    start_with(flags, extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_over_http2_with_an_es256_provider_token() {
    let apns = FakeApns::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let s = apns_server(&apns, &keys, &[]);
    let hex = "0f".repeat(32);
    register(&s, "bob", "iphone", "apns", &hex).await;
    register(&s, "erin", "iphone", "apns", &"1e".repeat(32)).await;
    burst(&s, "alice", "bob", 2, "secret words").await;
    burst(&s, "alice", "erin", 1, "hi").await;
    let reqs = apns.wait_for_requests(2, T).await;
    assert_eq!(reqs.len(), 2);
    let r = reqs.iter().find(|r| r.device_token == hex).unwrap();
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("apns-topic"), Some(FakeApns::TOPIC));
    assert_eq!(r.header("apns-push-type"), Some("alert"));
    let collapse = r.header("apns-collapse-id").unwrap();
    assert!(collapse.starts_with("c:") && collapse.len() <= 64);
    assert_eq!(r.body["aps"]["badge"], 2);
    assert!(!r.body.to_string().contains("secret"));
    assert!(
        apns.auth_failures().is_empty(),
        "{:?}",
        apns.auth_failures()
    );
    assert_eq!(
        apns.jwts_accepted(),
        1,
        "one provider token for both pushes"
    );
    assert_eq!(apns.token_updates_refused(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_provider_posts_a_signed_document() {
    let hook = FakeWebhook::start().await.unwrap();
    let s = Server::start(&[
        "--push-webhook-url",
        &hook.url(),
        "--push-webhook-secret",
        &hook.secret(),
        "--push-grace-ms",
        "100",
    ]);
    register(&s, "bob", "pc", "webhook", "opaque-device-ref-42").await;
    burst(&s, "alice", "bob", 1, "secret words").await;
    let reqs = hook.wait_for_requests(1, T).await;
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.verified, Ok(()), "signature verifies");
    assert!(hook.failures().is_empty());
    assert!(r.id.starts_with("push_"), "{}", r.id);
    let b = &r.body;
    assert_eq!(b["type"], "push");
    assert_eq!(b["user"], "bob");
    assert_eq!(b["device"], "pc");
    assert_eq!(b["token"], "opaque-device-ref-42");
    assert_eq!(b["kind"], "chat");
    assert_eq!(b["from"], "alice");
    assert_eq!(b["unread"], 1);
    assert!(b["collapse_key"].as_str().unwrap().starts_with("c:"));
    assert!(!r.body.to_string().contains("secret"));
    // The same signature by hand: base64(HMAC-SHA256(secret, id.timestamp.body)).
    let key = bimip_push::signing::Secret::parse(&hook.secret()).unwrap();
    let ts: i64 = r.timestamp.parse().unwrap();
    assert_eq!(
        bimip_push::signing::sign(&key, &r.id, ts, &r.raw),
        r.signature
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_registered_for_another_user_is_removed_from_the_first() {
    let fcm = FakeFcm::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let s = fcm_server(&fcm, &keys, &[]);
    // A device registers its own token with its own JWT; another user's JWT is refused.
    let (st, v) = api(
        &s,
        reqwest::Method::PUT,
        "/v1/users/bob/devices/phone/push-token",
        &token("bob", Some("phone")),
        Some(json!({"platform": "fcm", "token": "shared-phone-token-0015", "locale": "en"})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = api(
        &s,
        reqwest::Method::PUT,
        "/v1/users/bob/devices/phone/push-token",
        &token("mallory", None),
        Some(json!({"platform": "fcm", "token": "x"})),
    )
    .await;
    assert_eq!(st, 403, "{v}");
    assert_eq!(v["error"]["code"], "forbidden");
    let (st, _) = api(
        &s,
        reqwest::Method::GET,
        "/v1/users/bob/devices",
        "not-a-key",
        None,
    )
    .await;
    assert_eq!(st, 401);
    let (st, v) = api(
        &s,
        reqwest::Method::PUT,
        "/v1/users/bob/devices/phone/push-token",
        API_KEY,
        Some(json!({"platform": "gcm", "token": "x"})),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    // The phone changes hands: the same token registered for carol leaves bob.
    let (st, v) = api(
        &s,
        reqwest::Method::PUT,
        "/v1/users/carol/devices/phone/push-token",
        API_KEY,
        Some(json!({"platform": "fcm", "token": "shared-phone-token-0015"})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["moved_from"], json!([{"user": "bob", "device": "phone"}]));
    assert!(!has_token(&s, "bob", "phone").await);
    assert!(has_token(&s, "carol", "phone").await);
    burst(&s, "alice", "bob", 1, "hi").await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(fcm.request_count(), 0, "bob has no device any more");
    let (st, v) = api(
        &s,
        reqwest::Method::DELETE,
        "/v1/users/carol/devices/phone/push-token",
        &token("carol", None),
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(v["removed"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_to_a_thousand_users_and_a_retried_idempotency_key() {
    let fcm = FakeFcm::start().await.unwrap();
    fcm.set_detailed_recording(false);
    let keys = tempfile::tempdir().unwrap();
    let s = fcm_server(&fcm, &keys, &[]);
    let users: Vec<String> = (0..1000).map(|i| format!("n{i:04}")).collect();
    let tokens: Vec<String> = users.iter().map(|u| format!("{u}-token-0016")).collect();
    // At most 16 registrations in flight: a thousand at once each opened its own connection and,
    // on a loaded 2-core machine, some waited past the client's 10 s timeout.
    futures_util::stream::iter(users.iter().zip(&tokens))
        .for_each_concurrent(16, |(u, t)| register(&s, u, "phone", "fcm", t))
        .await;
    // 50 of them are online on their phone: they get the notification over the WebSocket.
    let mut online = Vec::new();
    for u in users.iter().take(50) {
        online.push(s.online(u, "phone").await.0);
    }
    let body = json!({"to": users, "title": "Maintenance", "body": "tonight 2-3 am",
                      "data": {"kind": "ops"}});
    let (st, first, replayed) = notify(&s, body.clone(), Some("maint-2026-11-29")).await;
    assert_eq!(st, 200, "{first}");
    assert!(!replayed);
    assert_eq!(first["recipients"], 1000);
    assert_eq!(first["stored"], 1000);
    for c in &mut online {
        let m = message(c).await;
        assert_eq!(m.partition, Partition::Notification as i32);
        let content: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(content["title"], "Maintenance");
    }
    assert_eq!(fcm.wait_for_count(950, T).await, 950);
    // The client retries (say its connection dropped before the answer): same answer, nothing
    // delivered or pushed twice.
    let (st, again, replayed) = notify(&s, body.clone(), Some("maint-2026-11-29")).await;
    assert_eq!(st, 200);
    assert!(replayed);
    assert_eq!(again, first);
    let (st, v, _) = notify(
        &s,
        json!({"to": ["n0001"], "title": "other"}),
        Some("maint-2026-11-29"),
    )
    .await;
    assert_eq!(st, 422, "{v}");
    tokio::time::sleep(QUIET).await;
    assert_eq!(fcm.request_count(), 950);
    for c in &mut online {
        let extra = c.recv_timeout(Duration::from_millis(50)).await;
        assert!(
            !matches!(extra, Ok(Some(ref f)) if matches!(f.body, Some(Body::Message(_)))),
            "delivered twice: {extra:?}"
        );
    }
    // Bad requests get precise errors.
    let (st, v, _) = notify(&s, json!({"to": ["bad user"], "title": "x"}), None).await;
    assert_eq!(st, 400, "{v}");
    let too_many: Vec<String> = (0..10_001).map(|i| format!("x{i}")).collect();
    let (st, v, _) = notify(&s, json!({"to": too_many, "title": "x"}), None).await;
    assert!(st == 413 || st == 400, "{st} {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_webhooks_for_each_event_type_retried_until_2xx() {
    let hook = FakeWebhook::start().await.unwrap();
    // The first delivery fails: it is retried with the same webhook-id.
    hook.push_reply(WebhookReply::Status(503));
    let s = Server::start(&[
        "--webhook-url",
        &hook.url(),
        "--webhook-secret",
        &hook.secret(),
        "--presence-grace-ms",
        "100",
        "--push-retry-base-ms",
        "50",
    ]);
    {
        let (mut alice, _) = s.online("alice", "a").await;
        let ack = send(&mut alice, "bob", "hello-1", "hello").await;
        let (mut bob, _) = s.online("bob", "b").await;
        let r = bob
            .receipt("alice", ReceiptKind::Delivered, ack.offset, Partition::Chat)
            .await
            .unwrap();
        super_ack(&mut bob, r).await;
        let r = bob
            .receipt("alice", ReceiptKind::Read, ack.offset, Partition::Chat)
            .await
            .unwrap();
        super_ack(&mut bob, r).await;
    }
    let wanted = [
        "presence.changed",
        "message.stored",
        "message.delivered",
        "message.read",
    ];
    eventually("every event type delivered", T, || async {
        let got: Vec<String> = hook
            .requests()
            .iter()
            .filter(|r| r.status == 200)
            .map(|r| r.body["type"].as_str().unwrap_or("").to_string())
            .collect();
        wanted.iter().all(|w| got.iter().any(|g| g == w))
    })
    .await;
    assert!(hook.failures().is_empty(), "{:?}", hook.failures());
    let first = hook.requests()[0].clone();
    assert_eq!(first.status, 503);
    eventually(
        "the refused event retried with the same webhook-id and body",
        T,
        || async {
            hook.requests()
                .iter()
                .any(|r| r.id == first.id && r.status == 200 && r.raw == first.raw)
        },
    )
    .await;
    let reqs = hook.requests();
    let stored = reqs
        .iter()
        .find(|r| r.body["type"] == "message.stored")
        .unwrap();
    assert_eq!(stored.body["data"]["from"], "alice");
    assert_eq!(stored.body["data"]["to"], "bob");
    assert_eq!(stored.body["data"]["id"], "hello-1");
    let read = reqs
        .iter()
        .find(|r| r.body["type"] == "message.read")
        .unwrap();
    assert_eq!(read.body["data"]["from"], "bob");
    assert_eq!(read.body["data"]["message_ids"], json!(["hello-1"]));
    // OFFLINE after the grace period, with last_seen.
    eventually("presence.changed offline", T, || async {
        hook.requests().iter().any(|r| {
            r.body["type"] == "presence.changed"
                && r.body["data"]["status"] == "offline"
                && r.body["data"]["last_seen"].as_i64().unwrap_or(0) > 0
        })
    })
    .await;
}

/// Waits for the Ack answering `r` (receipts are confirmed with a bare Ack).
async fn super_ack(c: &mut bimip_client::Client, r: u64) {
    ack(c, r).await;
}
