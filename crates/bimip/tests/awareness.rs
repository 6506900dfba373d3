//! Awareness end to end (docs/PROTOCOL.md §13): watchers and policies, intent, typing, invisibility, blocks,
//! the grace period, and the presence/contacts HTTP API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bimip_client::Client;
use bimip_proto::{
    Body,
    v1::{self, ErrorCode, Status},
};
use common::*;
use serde_json::json;
use std::time::Duration;

const FAST_GRACE: &[&str] = &["--presence-grace-ms", "100"];

/// The next Awareness frame about `from` with `status`, skipping others.
async fn awareness(c: &mut Client, from: &str, status: Status) -> v1::Awareness {
    let f = c
        .recv_until(
            |f| matches!(&f.body, Some(Body::Awareness(a)) if a.from == from && a.status == status as i32),
            T,
        )
        .await
        .unwrap_or_else(|e| panic!("no {status:?} from {from}: {e}"));
    match f.body {
        Some(Body::Awareness(a)) => a,
        _ => unreachable!(),
    }
}

/// Asserts no Awareness about `from` arrives within `ms` (bounded negative check).
async fn silent_about(c: &mut Client, from: &str, ms: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    while let Ok(Ok(Some(f))) = tokio::time::timeout_at(deadline, c.recv()).await {
        if let Some(Body::Awareness(a)) = &f.body {
            assert_ne!(a.from, from, "unexpected awareness {a:?}");
        }
    }
}

async fn set_status(c: &mut Client, status: Status, details: &str) {
    let r = c
        .awareness(v1::Awareness {
            status: status as i32,
            details: details.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    match answer(c, r).await {
        Body::Ack(_) => {}
        other => panic!("setting {status:?}: {other:?}"),
    }
}

#[tokio::test]
async fn watchers_get_online_offline_and_intent_non_contacts_do_not() {
    let s = Server::start(FAST_GRACE);
    contact(&s, "alice", "bob").await; // mutual: bob watches alice, alice watches bob
    let (mut bob, _) = s.online("bob", "phone").await;
    let (mut eve, _) = s.online("eve", "phone").await;
    let (mut alice, _) = s.online("alice", "phone").await;
    let on = awareness(&mut bob, "alice", Status::Online).await;
    assert_eq!(on.intent, Status::Unspecified as i32);
    // Alice's second device: no second ONLINE.
    let (alice2, _) = s.online("alice", "laptop").await;
    for (st, details) in [
        (Status::Away, "lunch"),
        (Status::Busy, "meeting"),
        (Status::Dnd, ""),
    ] {
        set_status(&mut alice, st, details).await;
        let a = awareness(&mut bob, "alice", st).await;
        assert_eq!(a.intent, st as i32);
        assert_eq!(a.details, details);
    }
    set_status(&mut alice, Status::Online, "").await;
    let a = awareness(&mut bob, "alice", Status::Online).await;
    assert_eq!(
        a.intent,
        Status::Unspecified as i32,
        "ONLINE clears the intent"
    );
    drop(alice2);
    drop(alice);
    let off = awareness(&mut bob, "alice", Status::Offline).await;
    assert!(off.last_seen > 0);
    silent_about(&mut eve, "alice", 300).await;
    // A one-way contact: carol lists dave, dave does not see carol.
    let (st, _) = api(
        &s,
        reqwest::Method::PUT,
        "/v1/users/carol/contacts/dave",
        Some(json!({"one_way": true})),
    )
    .await;
    assert_eq!(st, 200);
    let (mut carol, _) = s.online("carol", "c").await;
    let (mut dave, _) = s.online("dave", "d").await;
    awareness(&mut carol, "dave", Status::Online).await;
    drop(carol);
    silent_about(&mut dave, "carol", 400).await;
}

#[tokio::test]
async fn open_policy_subscribers_get_snapshots_and_changes() {
    let s = Server::start(&["--presence-policy", "open", "--presence-grace-ms", "100"]);
    let (mut zed, _) = s.online("zed", "z").await;
    set_status(&mut zed, Status::Busy, "coding").await;
    let (mut fan, _) = s.online("fan", "f").await;
    let r = fan
        .subscribe(vec!["zed".into(), "nobody".into()], false)
        .await
        .unwrap();
    let snap = awareness(&mut fan, "zed", Status::Online).await;
    assert_eq!(snap.intent, Status::Busy as i32);
    assert_eq!(snap.details, "coding");
    let none = awareness(&mut fan, "nobody", Status::Offline).await;
    assert_eq!(none.last_seen, 0);
    ack(&mut fan, r).await;
    // A name listed twice gets one snapshot.
    let r = fan
        .subscribe(vec!["zed".into(), "zed".into()], false)
        .await
        .unwrap();
    awareness(&mut fan, "zed", Status::Online).await;
    ack(&mut fan, r).await;
    silent_about(&mut fan, "zed", 200).await;
    set_status(&mut zed, Status::Away, "").await;
    awareness(&mut fan, "zed", Status::Away).await;
    drop(zed);
    awareness(&mut fan, "zed", Status::Offline).await;
    let r = fan.subscribe(vec!["zed".into()], true).await.unwrap();
    ack(&mut fan, r).await;
    let (_zed, _) = s.online("zed", "z").await;
    silent_about(&mut fan, "zed", 300).await;
}

#[tokio::test]
async fn contacts_policy_refuses_subscribing_to_strangers_and_limits_subscriptions() {
    let s = Server::start(FAST_GRACE);
    contact(&s, "ann", "ben").await;
    let (_ben, _) = s.online("ben", "b").await;
    let (mut ann, _) = s.online("ann", "a").await;
    let r = ann
        .subscribe(vec!["ben".into(), "stranger".into()], false)
        .await
        .unwrap();
    let snap = awareness(&mut ann, "ben", Status::Online).await;
    assert_eq!(snap.status, Status::Online as i32);
    match answer(&mut ann, r).await {
        Body::Error(e) => {
            assert_eq!(e.code, ErrorCode::Forbidden as i32);
            assert!(e.message.contains("stranger"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    let s2 = Server::start(&["--presence-policy", "open"]);
    let (mut many, _) = s2.online("many", "m").await;
    let users: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let r = many.subscribe(users, false).await.unwrap();
    match answer(&mut many, r).await {
        Body::Error(e) => assert_eq!(e.code, ErrorCode::TooLarge as i32),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn blocked_users_see_offline_and_cannot_message_or_type() {
    let s = Server::start(FAST_GRACE);
    contact(&s, "vic", "troll").await;
    let (st, _) = api(&s, reqwest::Method::PUT, "/v1/users/vic/blocks/troll", None).await;
    assert_eq!(st, 200);
    let (mut troll, _) = s.online("troll", "t").await;
    let (mut vic, _) = s.online("vic", "v").await;
    silent_about(&mut troll, "vic", 300).await;
    let r = troll.subscribe(vec!["vic".into()], false).await.unwrap();
    let snap = awareness(&mut troll, "vic", Status::Offline).await;
    assert_eq!(snap.status, Status::Offline as i32);
    let _ = r;
    let r = troll
        .send_message("vic", "b1", b"hi".to_vec())
        .await
        .unwrap();
    match answer(&mut troll, r).await {
        Body::Error(e) => assert_eq!(e.code, ErrorCode::Forbidden as i32),
        other => panic!("{other:?}"),
    }
    let r = troll
        .awareness(v1::Awareness {
            to: "vic".into(),
            status: Status::Typing as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    match answer(&mut troll, r).await {
        Body::Error(e) => assert_eq!(e.code, ErrorCode::Forbidden as i32),
        other => panic!("{other:?}"),
    }
    // Nothing was stored for vic.
    let (msgs, _) = resume_all(&mut vic, "troll", 0, 0).await;
    assert!(msgs.is_empty());
    // Unblocked: messages flow again.
    let (st, _) = api(
        &s,
        reqwest::Method::DELETE,
        "/v1/users/vic/blocks/troll",
        None,
    )
    .await;
    assert_eq!(st, 200);
    send(&mut troll, "vic", "b2", "sorry").await;
    assert_eq!(text(&message(&mut vic).await), "sorry");
}

#[tokio::test]
async fn intent_survives_a_restart() {
    let mut s = Server::start(FAST_GRACE);
    contact(&s, "ida", "joe").await;
    let (mut ida, _) = s.online("ida", "i").await;
    set_status(&mut ida, Status::Dnd, "focus").await;
    drop(ida);
    s.restart();
    let (_, p) = api(&s, reqwest::Method::GET, "/v1/users/ida/presence", None).await;
    assert_eq!(p["intent"], "dnd");
    assert_eq!(p["details"], "focus");
    assert_eq!(p["status"], "offline");
    assert!(p["last_seen"].as_i64().unwrap() > 0, "last_seen kept: {p}");
    let (mut joe, _) = s.online("joe", "j").await;
    let (_ida, _) = s.online("ida", "i").await;
    let on = awareness(&mut joe, "ida", Status::Online).await;
    assert_eq!(on.intent, Status::Dnd as i32);
    assert_eq!(on.details, "focus");
}

#[tokio::test]
async fn typing_reaches_only_the_peers_devices_and_is_rate_limited() {
    let s = Server::start(FAST_GRACE);
    contact(&s, "tom", "una").await;
    let (mut una1, _) = s.online("una", "phone").await;
    let (mut una2, _) = s.online("una", "laptop").await;
    let (mut tom2, _) = s.online("tom", "laptop").await;
    let (mut tom, _) = s.online("tom", "phone").await;
    let (mut other, _) = s.online("other", "o").await;
    for st in [Status::Typing, Status::Recording] {
        tom.awareness(v1::Awareness {
            to: "una".into(),
            status: st as i32,
            ttl_ms: 99_999,
            ..Default::default()
        })
        .await
        .unwrap();
        for una in [&mut una1, &mut una2] {
            let a = awareness(una, "tom", st).await;
            assert_eq!(a.to, "una");
            assert_eq!(a.device, "phone");
            assert_eq!(a.ttl_ms, 30_000, "ttl capped");
        }
    }
    silent_about(&mut tom2, "tom", 200).await;
    silent_about(&mut other, "tom", 100).await;
    // Frames refused for a bad peer id do not use up the allowance of 5 per second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..8 {
        let r = tom
            .awareness(v1::Awareness {
                to: "".into(),
                status: Status::Typing as i32,
                ..Default::default()
            })
            .await
            .unwrap();
        match answer(&mut tom, r).await {
            Body::Error(e) => assert_eq!(e.code, ErrorCode::BadRequest as i32, "{}", e.message),
            other => panic!("{other:?}"),
        }
    }
    tom.awareness(v1::Awareness {
        to: "una".into(),
        status: Status::Typing as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    awareness(&mut una1, "tom", Status::Typing).await;
    // Past 5 per second: RATE_LIMITED, and the connection stays.
    let mut limited = false;
    for _ in 0..12 {
        let r = tom
            .awareness(v1::Awareness {
                to: "una".into(),
                status: Status::Typing as i32,
                ..Default::default()
            })
            .await
            .unwrap();
        if let Ok(f) = tom
            .recv_until(|f| f.r#ref == r, Duration::from_millis(50))
            .await
            && let Some(Body::Error(e)) = f.body
        {
            assert_eq!(e.code, ErrorCode::RateLimited as i32);
            limited = true;
        }
    }
    assert!(limited, "rate limit answered with an error");
    send(&mut tom, "una", "still", "connected").await;
    // Typing to a non-contact is refused.
    let r = tom
        .awareness(v1::Awareness {
            to: "other".into(),
            status: Status::Typing as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let f = tom.recv_until(|f| f.r#ref == r, T).await.unwrap();
    assert!(matches!(f.body, Some(Body::Error(_))));
}

#[tokio::test]
async fn an_invisible_user_appears_offline_but_still_gets_messages() {
    let s = Server::start(FAST_GRACE);
    contact(&s, "ivy", "kim").await;
    let (mut kim, _) = s.online("kim", "k").await;
    let (mut ivy, _) = s.online("ivy", "i").await;
    awareness(&mut kim, "ivy", Status::Online).await;
    set_status(&mut ivy, Status::Busy, "b").await;
    awareness(&mut kim, "ivy", Status::Busy).await;
    let r = ivy
        .awareness(v1::Awareness {
            status: Status::Online as i32,
            invisible: true,
            ..Default::default()
        })
        .await
        .unwrap();
    ack(&mut ivy, r).await;
    let off = awareness(&mut kim, "ivy", Status::Offline).await;
    assert!(off.last_seen > 0);
    let (_, p) = api(&s, reqwest::Method::GET, "/v1/users/ivy/presence", None).await;
    assert_eq!(p["status"], "offline");
    let (_, p) = api(
        &s,
        reqwest::Method::GET,
        "/v1/users/ivy/presence?include_invisible=true",
        None,
    )
    .await;
    assert_eq!(
        (p["status"].as_str(), p["invisible"].as_bool()),
        (Some("online"), Some(true))
    );
    // Intent changes stay hidden; messages still arrive.
    set_status(&mut ivy, Status::Away, "").await;
    silent_about(&mut kim, "ivy", 200).await;
    send(&mut kim, "ivy", "inv-1", "are you there?").await;
    assert_eq!(text(&message(&mut ivy).await), "are you there?");
    // Leaving invisibility broadcasts the real state: online, with the intent set meanwhile.
    let r = ivy
        .awareness(v1::Awareness {
            status: Status::Online as i32,
            invisible: false,
            ..Default::default()
        })
        .await
        .unwrap();
    ack(&mut ivy, r).await;
    let back = awareness(&mut kim, "ivy", Status::Online).await;
    assert_eq!(back.intent, Status::Away as i32);
}

#[tokio::test]
async fn a_quick_reconnect_makes_no_offline_online_flap() {
    let s = Server::start(&["--presence-grace-ms", "1500"]);
    contact(&s, "flo", "gil").await;
    let (mut gil, _) = s.online("gil", "g").await;
    let (flo, _) = s.online("flo", "f").await;
    awareness(&mut gil, "flo", Status::Online).await;
    flo.close().await.unwrap();
    let (flo, _) = s.online("flo", "f").await;
    silent_about(&mut gil, "flo", 1800).await;
    drop(flo);
    awareness(&mut gil, "flo", Status::Offline).await;
}

#[tokio::test]
async fn presence_and_contacts_over_http_with_bad_input() {
    let s = Server::start(FAST_GRACE);
    let (st, v) = api(
        &s,
        reqwest::Method::POST,
        "/v1/users/hub/contacts",
        Some(json!({
            "contacts": [{"user": "c1"}, {"user": "c2", "one_way": true}, {"user": "c3"}]
        })),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["changed"], 3);
    let (_, v) = api(&s, reqwest::Method::GET, "/v1/users/hub/contacts", None).await;
    assert_eq!(v["contacts"].as_array().unwrap().len(), 3);
    let (_, v) = api(&s, reqwest::Method::GET, "/v1/users/c1/contacts", None).await;
    assert_eq!(v["watchers"], json!(["hub"]), "c1 is watched by hub");
    let (st, v) = api(
        &s,
        reqwest::Method::DELETE,
        "/v1/users/hub/contacts/c3",
        None,
    )
    .await;
    assert_eq!((st, v["changed"].as_u64()), (200, Some(1)));
    let (st, _) = api(
        &s,
        reqwest::Method::POST,
        "/v1/users/hub/contacts",
        Some(json!({
            "contacts": [{"user": "c1"}], "replace": true
        })),
    )
    .await;
    assert_eq!(st, 200);
    let (_, v) = api(&s, reqwest::Method::GET, "/v1/users/hub/contacts", None).await;
    // Each contact carries its presence as hub sees it (c1 never connected).
    assert_eq!(
        v["contacts"],
        json!([{"user": "c1", "one_way": false, "online": false, "status": "offline",
                "details": "", "last_seen": 0}])
    );

    let (_c1, _) = s.online("c1", "d").await;
    let (st, v) = api(
        &s,
        reqwest::Method::POST,
        "/v1/presence/query",
        Some(json!({"users": ["c1", "never-seen"]})),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(v["users"][0]["status"], "online");
    assert_eq!(v["users"][0]["devices"], 1);
    assert_eq!(v["users"][1]["status"], "offline");

    for (method, path, body) in [
        (reqwest::Method::PUT, "/v1/users/bad%20id/contacts/x", None),
        (reqwest::Method::PUT, "/v1/users/x/contacts/.hidden", None),
        (reqwest::Method::PUT, "/v1/users/x/contacts/x", None),
        (
            reqwest::Method::PUT,
            "/v1/users/x/contacts/y",
            Some(json!({"one_way": "yes"})),
        ),
        (reqwest::Method::PUT, "/v1/users/x/blocks/x", None),
        (
            reqwest::Method::POST,
            "/v1/users/x/contacts",
            Some(json!({"contacts": [{"user": "a/b"}]})),
        ),
        (
            reqwest::Method::POST,
            "/v1/presence/query",
            Some(json!({"users": ["ok", "not ok"]})),
        ),
        (
            reqwest::Method::POST,
            "/v1/presence/query",
            Some(json!({"users": vec!["u"; 1001]})),
        ),
        (reqwest::Method::GET, "/v1/users/a%00b/presence", None),
    ] {
        let (st, v) = api(&s, method.clone(), path, body).await;
        assert_eq!(st, 400, "{method} {path}: {v}");
        assert_eq!(v["error"]["code"], "bad_request", "{method} {path}: {v}");
    }
    let r = http()
        .get(s.http("/v1/users/x/contacts"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let spec = openapi(&s).await;
    for p in [
        "/v1/presence/query",
        "/v1/users/{user}/contacts",
        "/v1/users/{user}/contacts/{contact}",
        "/v1/users/{user}/blocks/{other}",
    ] {
        assert!(spec["paths"].get(p).is_some(), "openapi lacks {p}");
    }
}
