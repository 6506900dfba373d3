//! The HTTP routes a client app uses with its user's own token: contacts with presence, adding
//! and removing contacts, history pages, unread counts, presence; a token of another user gets
//! 403 JSON; every route is in the OpenAPI document.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine;
use bimip_proto::{
    Body,
    v1::{self, Partition, ReceiptKind, Status},
};
use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

/// A request with `auth` as the bearer credential (API key or token).
async fn call(s: &Server, method: Method, path: &str, auth: &str) -> (u16, Value) {
    let resp = http()
        .request(method, s.http(path))
        .bearer_auth(auth)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn ok(s: &Server, method: Method, path: &str, auth: &str) -> Value {
    let (st, v) = call(s, method.clone(), path, auth).await;
    assert_eq!(st, 200, "{method} {path}: {v}");
    v
}

fn contact<'a>(v: &'a Value, user: &str) -> &'a Value {
    v["contacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["user"] == user)
        .unwrap_or_else(|| panic!("{user} not in {v}"))
}

async fn set_status(c: &mut bimip_client::Client, a: v1::Awareness) {
    let r = c.awareness(a).await.unwrap();
    match answer(c, r).await {
        Body::Ack(_) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_users_token_reaches_its_own_routes_and_no_one_elses() {
    let s = Server::start(&["--user-contacts"]);
    let alice = token("alice", None);
    let bob = token("bob", None);
    let routes = [
        (Method::GET, "/v1/users/{u}/contacts"),
        (Method::PUT, "/v1/users/{u}/contacts/zed"),
        (Method::DELETE, "/v1/users/{u}/contacts/zed"),
        (Method::GET, "/v1/users/{u}/messages?contact=zed"),
        (Method::GET, "/v1/users/{u}/unread"),
        (Method::GET, "/v1/users/{u}/presence"),
        (Method::PUT, "/v1/users/{u}/blocks/zed"),
        (Method::DELETE, "/v1/users/{u}/blocks/zed"),
    ];
    for (m, path) in routes {
        let own = path.replace("{u}", "alice");
        ok(&s, m.clone(), &own, &alice).await;
        ok(&s, m.clone(), &own, API_KEY).await;
        let other = path.replace("{u}", "bob");
        let (st, v) = call(&s, m.clone(), &other, &alice).await;
        assert_eq!(st, 403, "{m} {other}: {v}");
        assert_eq!(v["error"]["code"], "forbidden", "{m} {other}");
        ok(&s, m.clone(), &other, &bob).await;
        let (st, v) = call(&s, m.clone(), &own, "not-a-token").await;
        assert_eq!(st, 401, "{m} {own}: {v}");
        assert_eq!(v["error"]["code"], "unauthorized");
    }
    // Backend-only routes stay backend-only.
    for (m, path) in [
        (Method::POST, "/v1/users/alice/revoke"),
        (Method::POST, "/v1/presence/query"),
        (Method::POST, "/v1/messages"),
    ] {
        let (st, v) = call(&s, m.clone(), path, &alice).await;
        assert_eq!(st, 401, "{m} {path}: {v}");
    }
    // All of them are in the OpenAPI document, with the user's token as an option.
    let spec = openapi(&s).await;
    for (m, p) in [
        ("get", "/v1/users/{user}/contacts"),
        ("put", "/v1/users/{user}/contacts/{contact}"),
        ("delete", "/v1/users/{user}/contacts/{contact}"),
        ("get", "/v1/users/{user}/messages"),
        ("get", "/v1/users/{user}/unread"),
        ("get", "/v1/users/{user}/presence"),
    ] {
        let op = &spec["paths"][p][m];
        assert!(op.is_object(), "openapi lacks {m} {p}");
        assert!(
            op["security"].to_string().contains("user_token"),
            "{m} {p}: {}",
            op["security"]
        );
    }
}

#[tokio::test]
async fn contacts_carry_presence_as_the_user_may_see_it() {
    let s = Server::start(&["--presence-grace-ms", "100", "--user-contacts"]);
    let alice = token("alice", None);
    let bob = token("bob", None);
    // Both add each other with their own tokens, as the demo does.
    ok(&s, Method::PUT, "/v1/users/alice/contacts/bob", &alice).await;
    ok(&s, Method::PUT, "/v1/users/bob/contacts/alice", &bob).await;
    ok(&s, Method::PUT, "/v1/users/alice/contacts/carol", &alice).await;
    let v = ok(&s, Method::GET, "/v1/users/alice/contacts", &alice).await;
    assert_eq!(v["user"], "alice");
    let b = contact(&v, "bob");
    assert_eq!(b["online"], false);
    assert_eq!(b["status"], "offline");
    let (mut bob_c, _) = s.online("bob", "phone").await;
    let v = ok(&s, Method::GET, "/v1/users/alice/contacts", &alice).await;
    let b = contact(&v, "bob");
    assert_eq!(
        (b["online"].as_bool(), b["status"].as_str()),
        (Some(true), Some("online"))
    );
    set_status(
        &mut bob_c,
        v1::Awareness {
            status: Status::Away as i32,
            details: "lunch".into(),
            ..Default::default()
        },
    )
    .await;
    let v = ok(&s, Method::GET, "/v1/users/alice/contacts", &alice).await;
    let b = contact(&v, "bob");
    assert_eq!(b["status"], "away", "{b}");
    assert_eq!(b["details"], "lunch");
    assert_eq!(b["online"], true);
    // Invisible: offline for alice, as on the wire.
    set_status(
        &mut bob_c,
        v1::Awareness {
            status: Status::Online as i32,
            invisible: true,
            ..Default::default()
        },
    )
    .await;
    let v = ok(&s, Method::GET, "/v1/users/alice/contacts", &alice).await;
    assert_eq!(contact(&v, "bob")["status"], "offline");
    assert_eq!(contact(&v, "bob")["online"], false);
    set_status(
        &mut bob_c,
        v1::Awareness {
            status: Status::Online as i32,
            invisible: false,
            ..Default::default()
        },
    )
    .await;
    // Bob blocks alice (with his own token): alice sees him offline, without last seen.
    ok(&s, Method::PUT, "/v1/users/bob/blocks/alice", &bob).await;
    let v = ok(&s, Method::GET, "/v1/users/alice/contacts", &alice).await;
    let b = contact(&v, "bob");
    assert_eq!(
        (b["online"].as_bool(), b["last_seen"].as_i64()),
        (Some(false), Some(0))
    );
    ok(&s, Method::DELETE, "/v1/users/bob/blocks/alice", &bob).await;
    // Going offline: last seen once the grace period is over.
    bob_c.close().await.unwrap();
    eventually("bob offline with last_seen", T, || async {
        let v = ok(&s, Method::GET, "/v1/users/alice/contacts", &alice).await;
        let b = contact(&v, "bob").clone();
        b["online"] == false && b["last_seen"].as_i64().unwrap_or(0) > 0
    })
    .await;
    // A one-way contact, set with the user's own token.
    let dave = token("dave", None);
    let r = http()
        .put(s.http("/v1/users/dave/contacts/alice"))
        .bearer_auth(&dave)
        .json(&json!({"one_way": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = ok(&s, Method::GET, "/v1/users/dave/contacts", &dave).await;
    assert_eq!(contact(&v, "alice")["one_way"], true);
    // Removing a contact with the user's token.
    let v = ok(&s, Method::DELETE, "/v1/users/alice/contacts/carol", &alice).await;
    assert_eq!(v["changed"], 1);
    let v = ok(&s, Method::GET, "/v1/users/alice/contacts", &alice).await;
    assert!(
        v["contacts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["user"] != "carol")
    );
    // A carol that alice does not list and that does not list alice: presence route with her
    // own token shows her own state.
    let carol = token("carol", None);
    let p = ok(&s, Method::GET, "/v1/users/carol/presence", &carol).await;
    assert_eq!(p["status"], "offline");
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test]
async fn history_pages_both_directions_in_either_order() {
    let s = Server::start(&[]);
    let (mut a, _) = s.online("alice", "phone").await;
    let (mut b, _) = s.online("bob", "phone").await;
    let (mut c, _) = s.online("carol", "phone").await;
    // a1 b1 a2 b2 a3 (alice's view), plus noise from carol and to carol.
    send(&mut a, "bob", "a1", "hello bob").await;
    send(&mut b, "alice", "b1", "hi alice").await;
    send(&mut c, "alice", "c1", "from carol").await;
    send(&mut a, "bob", "a2", "how are you?").await;
    send(&mut a, "carol", "a-c", "to carol").await;
    send(&mut b, "alice", "b2", "fine").await;
    let r = b
        .send_message("alice", "b3", vec![0xff, 0xfe, 0x00])
        .await
        .unwrap();
    ack(&mut b, r).await;
    let alice = token("alice", None);
    let ids = |v: &Value| -> Vec<String> {
        v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let all = ok(
        &s,
        Method::GET,
        "/v1/users/alice/messages?contact=bob",
        &alice,
    )
    .await;
    assert_eq!(ids(&all), ["a1", "b1", "a2", "b2", "b3"]);
    assert_eq!(all["next_offset"], Value::Null);
    let m = &all["messages"][0];
    assert_eq!(
        (m["from"].as_str(), m["to"].as_str()),
        (Some("alice"), Some("bob"))
    );
    assert_eq!(m["text"], "hello bob");
    assert_eq!(m["payload"], b64("hello bob"));
    assert!(m["peer_offset"].as_u64().unwrap() > 0, "own copy: {m}");
    let m = &all["messages"][1];
    assert_eq!(
        (m["from"].as_str(), m["device"].as_str()),
        (Some("bob"), Some("phone"))
    );
    assert!(m.get("peer_offset").is_none(), "{m}");
    let binary = &all["messages"][4];
    assert!(binary.get("text").is_none(), "not UTF-8: {binary}");
    assert_eq!(binary["payload"], "//4A");
    let offsets: Vec<u64> = all["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    // Oldest first, two per page.
    let mut got = Vec::new();
    let mut from = 0u64;
    let mut pages = 0;
    loop {
        let v = ok(
            &s,
            Method::GET,
            &format!("/v1/users/alice/messages?contact=bob&limit=2&from_offset={from}"),
            &alice,
        )
        .await;
        pages += 1;
        got.extend(ids(&v));
        match v["next_offset"].as_u64() {
            Some(n) => from = n,
            None => break,
        }
    }
    assert_eq!(got, ["a1", "b1", "a2", "b2", "b3"]);
    assert_eq!(pages, 3);
    // Newest first, two per page.
    let v = ok(
        &s,
        Method::GET,
        "/v1/users/alice/messages?contact=bob&limit=2&order=desc",
        &alice,
    )
    .await;
    assert_eq!(ids(&v), ["b3", "b2"]);
    let next = v["next_offset"].as_u64().unwrap();
    let v = ok(
        &s,
        Method::GET,
        &format!("/v1/users/alice/messages?contact=bob&limit=2&order=desc&from_offset={next}"),
        &alice,
    )
    .await;
    assert_eq!(ids(&v), ["a2", "b1"]);
    let next = v["next_offset"].as_u64().unwrap();
    let v = ok(
        &s,
        Method::GET,
        &format!("/v1/users/alice/messages?contact=bob&limit=2&order=desc&from_offset={next}"),
        &alice,
    )
    .await;
    assert_eq!(ids(&v), ["a1"]);
    assert_eq!(v["next_offset"], Value::Null);
    // Bob's side holds the same conversation (his own offsets).
    let v = ok(
        &s,
        Method::GET,
        "/v1/users/bob/messages?contact=alice",
        &token("bob", None),
    )
    .await;
    assert_eq!(ids(&v), ["a1", "b1", "a2", "b2", "b3"]);
    // The conversation with carol does not mix in.
    let v = ok(
        &s,
        Method::GET,
        "/v1/users/alice/messages?contact=carol",
        &alice,
    )
    .await;
    assert_eq!(ids(&v), ["c1", "a-c"]);
    // Without a contact: every chat item of the queue.
    let v = ok(&s, Method::GET, "/v1/users/alice/messages", &alice).await;
    assert_eq!(v["messages"].as_array().unwrap().len(), 7);
    // Notifications from the backend.
    let r = http()
        .post(s.http("/v1/messages"))
        .bearer_auth(API_KEY)
        .json(&json!({"to": "alice", "text": "welcome", "partition": "notification"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = ok(
        &s,
        Method::GET,
        "/v1/users/alice/messages?partition=notification",
        &alice,
    )
    .await;
    assert_eq!(v["messages"][0]["text"], "welcome");
    // Bad parameters are 400 JSON.
    for q in [
        "contact=a%2Fb",
        "partition=receipt",
        "order=sideways",
        "limit=x",
        "from_offset=-1",
    ] {
        let (st, v) = call(
            &s,
            Method::GET,
            &format!("/v1/users/alice/messages?{q}"),
            &alice,
        )
        .await;
        assert_eq!(st, 400, "{q}: {v}");
        assert_eq!(v["error"]["code"], "bad_request", "{q}");
    }
    // limit is capped at 1000, 0 means the default.
    let v = ok(
        &s,
        Method::GET,
        "/v1/users/alice/messages?contact=bob&limit=0",
        &alice,
    )
    .await;
    assert_eq!(ids(&v).len(), 5);
    drop((a, c));
}

#[tokio::test]
async fn unread_counts_follow_the_cursors() {
    let s = Server::start(&[]);
    let (mut b, _) = s.online("bob", "phone").await;
    let (mut c, _) = s.online("carol", "phone").await;
    let mut last = 0;
    for i in 0..3 {
        last = send(&mut b, "alice", &format!("b{i}"), "hi").await.offset;
    }
    send(&mut c, "alice", "c0", "yo").await;
    let alice = token("alice", None);
    let v = ok(&s, Method::GET, "/v1/users/alice/unread", &alice).await;
    assert_eq!(v["total"], 4, "{v}");
    let u = v["unread"].as_array().unwrap();
    assert_eq!(u.len(), 2);
    assert_eq!(u[0]["from"], "bob");
    assert_eq!(u[0]["count"], 3);
    assert_eq!(u[0]["last_offset"].as_u64(), Some(last));
    assert!(u[0]["first_offset"].as_u64().unwrap() < last);
    assert_eq!(
        (u[1]["from"].as_str(), u[1]["count"].as_u64()),
        (Some("carol"), Some(1))
    );
    // A device of alice reads bob's messages: bob drops out.
    let (mut a, _) = s.online("alice", "web").await;
    let r = a
        .receipt("bob", ReceiptKind::Read, last, Partition::Chat)
        .await
        .unwrap();
    ack(&mut a, r).await;
    let v = ok(&s, Method::GET, "/v1/users/alice/unread", &alice).await;
    assert_eq!(v["total"], 1, "{v}");
    assert_eq!(v["unread"][0]["from"], "carol");
    // Nothing for a new user.
    let v = ok(&s, Method::GET, "/v1/users/zoe/unread", &token("zoe", None)).await;
    assert_eq!(v, json!({"unread": [], "total": 0}));
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_add_contacts_with_their_own_token_only_where_allowed() {
    // Off by default: adding someone would let the user see their presence.
    let s = Server::start(&[]);
    let alice = token("alice", None);
    let (st, v) = call(&s, Method::PUT, "/v1/users/alice/contacts/bob", &alice).await;
    assert_eq!(st, 403, "{v}");
    assert_eq!(v["error"]["code"], "forbidden");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("user_contacts"),
        "{v}"
    );
    // Removing and reading stay the user's own business; the backend may add.
    ok(&s, Method::DELETE, "/v1/users/alice/contacts/bob", &alice).await;
    ok(&s, Method::PUT, "/v1/users/alice/contacts/bob", API_KEY).await;
    let v = ok(&s, Method::GET, "/v1/users/alice/contacts", &alice).await;
    assert_eq!(contact(&v, "bob")["one_way"], false);
    drop(s);
    // Switched on explicitly, and off again even in development mode.
    let s = Server::start(&["--user-contacts=true"]);
    ok(
        &s,
        Method::PUT,
        "/v1/users/alice/contacts/bob",
        &token("alice", None),
    )
    .await;
}
