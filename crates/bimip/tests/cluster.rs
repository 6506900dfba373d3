//! Several nodes on one Redis, end to end: real `bimip serve --redis` processes and a real
//! `redis-server` started on a free loopback port (docs/OPERATIONS.md "Several nodes").
//! Leases are short here (heartbeat 200 ms, lease 1 s) so crash tests take seconds; one test
//! keeps the production timings to check the 30 s promise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bimip_client::Client;
use bimip_proto::{
    Body,
    v1::{self, ErrorCode, Partition, ReceiptKind, Status},
};
use bimip_store::redis::test_server::RedisServer;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

fn node(redis: &RedisServer, name: &str, extra: &[&str]) -> Server {
    let url = redis.url();
    let mut args = vec![
        "--redis",
        &url,
        "--node-id",
        name,
        "--node-heartbeat-ms",
        "200",
        "--node-lease-ms",
        "1000",
        "--presence-grace-ms",
        "300",
        "--redis-timeout-ms",
        "1000",
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn redis() -> RedisServer {
    RedisServer::start().expect("redis-server (install it, or set BIMIP_REDIS_SERVER)")
}

async fn awareness(c: &mut Client, from: &str, status: Status) -> v1::Awareness {
    let f = c
        .recv_until(
            |f| matches!(&f.body, Some(Body::Awareness(a)) if a.from == from && a.status == status as i32),
            Duration::from_secs(40),
        )
        .await
        .unwrap_or_else(|e| panic!("no {status:?} from {from}: {e}"));
    match f.body {
        Some(Body::Awareness(a)) => a,
        _ => unreachable!(),
    }
}

/// Every Awareness frame about `from` arriving within `ms`.
async fn awareness_for(c: &mut Client, from: &str, ms: u64) -> Vec<v1::Awareness> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    while let Ok(Ok(Some(f))) = tokio::time::timeout_at(deadline, c.recv()).await {
        if let Some(Body::Awareness(a)) = f.body
            && a.from == from
        {
            out.push(a);
        }
    }
    out
}

async fn redis_info(redis: &RedisServer, section: &str) -> String {
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    ::redis::cmd("INFO")
        .arg(section)
        .query_async(&mut c)
        .await
        .unwrap()
}

/// `calls` of one command from `INFO commandstats`.
async fn command_calls(redis: &RedisServer, cmd: &str) -> u64 {
    let info = redis_info(redis, "commandstats").await;
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

async fn receipt(c: &mut Client, to: &str, kind: ReceiptKind, up_to: u64) {
    let r = c.receipt(to, kind, up_to, Partition::Chat).await.unwrap();
    ack(c, r).await;
}

#[tokio::test]
async fn chat_across_two_nodes_both_ways_with_receipts_and_device_sync() {
    let redis = redis();
    let n1 = node(&redis, "n1", &[]);
    let n2 = node(&redis, "n2", &[]);
    let (mut alice, _) = n1.online("alice", "phone").await;
    let (mut alice2, _) = n2.online("alice", "laptop").await;
    let (mut bob, w) = n2.connect("bob", "phone").await;
    assert_eq!(w.node, "n2", "Welcome names the node");
    read_fanout(&mut bob).await;

    // alice (n1) → bob (n2): bob gets it with the Ack's offset; alice's laptop (n2) the copy.
    let publishes = command_calls(&redis, "publish").await;
    let ack = send(&mut alice, "bob", "m-1", "hi bob").await;
    let m = message(&mut bob).await;
    assert_eq!(
        (m.id.as_str(), m.offset, text(&m).as_str()),
        ("m-1", ack.offset, "hi bob")
    );
    let copy = message(&mut alice2).await;
    assert_eq!((copy.id.as_str(), copy.to.as_str()), ("m-1", "bob"));
    // One publish to n2 for bob and one for alice's laptop: per node and target user, never
    // per device.
    let used = command_calls(&redis, "publish").await - publishes;
    assert!(used <= 2, "{used} publishes for one message");

    // bob (n2) → alice (n1 and n2): both of alice's devices get it.
    let ack2 = send(&mut bob, "alice", "m-2", "hi alice").await;
    let m = message(&mut alice).await;
    assert_eq!((m.id.as_str(), m.offset), ("m-2", ack2.offset));
    let m = message(&mut alice2).await;
    assert_eq!(m.id, "m-2");

    // bob reads on n2: alice's devices on n1 and n2 get the receipt.
    receipt(&mut bob, "alice", ReceiptKind::Read, ack.offset).await;
    for c in [&mut alice, &mut alice2] {
        let f = c
            .recv_until(|f| matches!(&f.body, Some(Body::Receipt(_))), T)
            .await
            .expect("receipt routed across nodes");
        let Some(Body::Receipt(r)) = f.body else {
            unreachable!()
        };
        assert_eq!(
            (r.from.as_str(), r.message_ids.clone()),
            ("bob", vec!["m-1".to_string()])
        );
    }
}

#[tokio::test]
async fn resume_and_dedupe_from_the_other_node_and_http_on_either() {
    let redis = redis();
    let n1 = node(&redis, "n1", &[]);
    let n2 = node(&redis, "n2", &[]);
    let (mut alice, _) = n1.online("alice", "phone").await;
    for i in 1..=3 {
        send(&mut alice, "bob", &format!("m-{i}"), &format!("text {i}")).await;
    }
    // A resend of m-2 through the other node is a duplicate with the original offset.
    let (mut alice_b, _) = n2.online("alice", "phone2").await;
    let dup = send(&mut alice_b, "bob", "m-2", "text 2 again").await;
    assert!(dup.duplicate, "{dup:?}");
    // bob, first on n1: sees three unread from alice and reads the first; then on n2 RESUME
    // continues after the cursor with the same offsets.
    let (mut bob, f) = n1.online("bob", "phone").await;
    let s = f
        .summary
        .senders
        .iter()
        .find(|s| s.from == "alice")
        .expect("alice in summary");
    assert_eq!(s.unread, 3);
    receipt(&mut bob, "alice", ReceiptKind::Delivered, s.first_offset).await;
    drop(bob);
    let (mut bob, _) = n2.online("bob", "phone").await;
    let (items, _) = resume_all(&mut bob, "alice", 0, 0).await;
    let ids: Vec<&str> = items.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["m-2", "m-3"]);

    // HTTP send on n2 to bob (on n2) and to carol (on n1); presence from either node.
    let (mut carol, _) = n1.online("carol", "web").await;
    let (st, v) = api(
        &n2,
        reqwest::Method::POST,
        "/v1/messages",
        Some(json!({"from": "system", "to": "carol", "id": "h-1", "payload": "aGk="})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let m = message(&mut carol).await;
    assert_eq!(m.id, "h-1");
    for n in [&n1, &n2] {
        let p = presence(n, "carol").await;
        assert_eq!(p["status"], "online", "{p}");
        let p = presence(n, "nobody").await;
        assert_eq!(p["status"], "offline", "{p}");
    }
}

#[tokio::test]
async fn presence_intent_typing_and_invisibility_across_nodes() {
    let redis = redis();
    let n1 = node(&redis, "n1", &[]);
    let n2 = node(&redis, "n2", &[]);
    contact(&n1, "ann", "ben").await;
    let (mut ann, _) = n1.online("ann", "phone").await;
    // ben comes online on n2: ann (n1) is told once.
    let (mut ben, _) = n2.online("ben", "phone").await;
    awareness(&mut ann, "ben", Status::Online).await;
    // ben's second device on n1 announces nothing new.
    let (ben2, _) = n1.online("ben", "tablet").await;
    let more = awareness_for(&mut ann, "ben", 500).await;
    assert!(more.is_empty(), "second device re-announced: {more:?}");
    // Intent and typing cross nodes.
    let r = ben
        .awareness(v1::Awareness {
            status: Status::Away as i32,
            details: "lunch".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(matches!(answer(&mut ben, r).await, Body::Ack(_)));
    let a = awareness(&mut ann, "ben", Status::Away).await;
    assert_eq!(a.details, "lunch");
    // TYPING is not answered when it goes through.
    ann.awareness(v1::Awareness {
        status: Status::Typing as i32,
        to: "ben".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    awareness(&mut ben, "ann", Status::Typing).await;
    // Invisible: watchers see OFFLINE.
    let r = ben
        .awareness(v1::Awareness {
            status: Status::Online as i32,
            invisible: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(matches!(answer(&mut ben, r).await, Body::Ack(_)));
    awareness(&mut ann, "ben", Status::Offline).await;
    let r = ben
        .awareness(v1::Awareness {
            status: Status::Online as i32,
            invisible: false,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(matches!(answer(&mut ben, r).await, Body::Ack(_)));
    awareness(&mut ann, "ben", Status::Online).await;
    // Both of ben's devices leave: one OFFLINE after the grace, from whichever node.
    drop(ben);
    drop(ben2);
    let a = awareness(&mut ann, "ben", Status::Offline).await;
    assert!(a.last_seen > 0);
    let more = awareness_for(&mut ann, "ben", 1000).await;
    assert!(more.is_empty(), "OFFLINE announced twice: {more:?}");
}

#[tokio::test]
async fn a_killed_node_s_users_go_offline_once_and_users_connected_elsewhere_stay() {
    let redis = redis();
    let n1 = node(&redis, "n1", &[]);
    let n2 = node(&redis, "n2", &[]);
    let mut n3 = node(&redis, "n3", &[]);
    for u in ["dan", "eve"] {
        contact(&n1, "watcher1", u).await;
        contact(&n1, "watcher2", u).await;
    }
    let (mut w1, _) = n1.online("watcher1", "phone").await;
    let (mut w2, _) = n2.online("watcher2", "phone").await;
    let (_dan, _) = n3.online("dan", "phone").await;
    let (_eve3, _) = n3.online("eve", "phone").await;
    let (_eve2, _) = n2.online("eve", "laptop").await;
    awareness(&mut w1, "dan", Status::Online).await;
    awareness(&mut w2, "eve", Status::Online).await;
    let killed = Instant::now();
    n3.kill9();
    // dan is gone everywhere within lease + sweep + grace; exactly one OFFLINE per watcher.
    let a = awareness(&mut w1, "dan", Status::Offline).await;
    assert!(a.last_seen > 0);
    awareness(&mut w2, "dan", Status::Offline).await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(10), "OFFLINE after {took:?}");
    let more = awareness_for(&mut w1, "dan", 1500).await;
    assert!(more.is_empty(), "duplicate announcements: {more:?}");
    // eve still has her laptop on n2: no OFFLINE, presence online on both nodes.
    let eve = awareness_for(&mut w2, "eve", 500).await;
    assert!(
        eve.iter().all(|a| a.status != Status::Offline as i32),
        "{eve:?}"
    );
    for n in [&n1, &n2] {
        assert_eq!(presence(n, "eve").await["status"], "online");
        assert_eq!(presence(n, "dan").await["status"], "offline");
    }
}

#[tokio::test]
async fn production_timings_announce_a_crashed_node_s_users_within_30_seconds() {
    let redis = redis();
    let url = redis.url();
    let n1 = Server::start(&["--redis", &url, "--node-id", "p1"]);
    let mut n2 = Server::start(&["--redis", &url, "--node-id", "p2"]);
    contact(&n1, "w", "gus").await;
    let (mut w, _) = n1.online("w", "phone").await;
    let (_gus, _) = n2.online("gus", "phone").await;
    awareness(&mut w, "gus", Status::Online).await;
    let killed = Instant::now();
    n2.kill9();
    awareness(&mut w, "gus", Status::Offline).await;
    let took = killed.elapsed();
    assert!(took <= Duration::from_secs(30), "OFFLINE after {took:?}");
    eprintln!("crash to OFFLINE with the default lease: {took:?}");
}

#[tokio::test]
async fn a_redis_outage_refuses_sends_keeps_connections_and_loses_nothing() {
    let mut redis = redis();
    let n1 = node(&redis, "n1", &[]);
    let n2 = node(&redis, "n2", &[]);
    contact(&n1, "fay", "gil").await;
    let (mut fay, _) = n1.online("fay", "phone").await;
    let (mut gil, _) = n2.online("gil", "phone").await;
    awareness(&mut fay, "gil", Status::Online).await;
    let ack = send(&mut fay, "gil", "before", "before the outage").await;
    assert_eq!(message(&mut gil).await.id, "before");

    redis.kill();
    let r = fay
        .send_message("gil", "during", b"during".to_vec())
        .await
        .unwrap();
    match answer(&mut fay, r).await {
        Body::Error(e) => assert_eq!(e.code, ErrorCode::Unavailable as i32, "{e:?}"),
        other => panic!("a send during the outage: {other:?}"),
    }
    let (st, _) = api(
        &n2,
        reqwest::Method::POST,
        "/v1/messages",
        Some(json!({"from": "system", "to": "gil", "id": "h", "payload": "aGk="})),
    )
    .await;
    assert_eq!(st, 503);

    redis.restart().expect("redis back");
    // The same message again goes through once Redis answers; the first one is still there.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = fay
            .send_message("gil", "after", b"after".to_vec())
            .await
            .unwrap();
        match answer(&mut fay, r).await {
            Body::Ack(_) => break,
            Body::Error(e) if Instant::now() < deadline => {
                assert_eq!(e.code, ErrorCode::Unavailable as i32, "{e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!("sends after the outage: {other:?}"),
        }
    }
    // gil hears of it: in real time, or (when the message was stored while this node was still
    // registering again) through the fan-out sent again once the node is back.
    gil.recv_until(
        |f| match &f.body {
            Some(Body::Message(m)) => m.id == "after",
            Some(Body::Summary(s)) => s.senders.iter().any(|x| x.from == "fay"),
            _ => false,
        },
        T,
    )
    .await
    .expect("told of the message sent after the outage");
    // Nothing acknowledged was lost, and nobody was announced OFFLINE: the connections stayed.
    let (items, _) = resume_all(&mut gil, "fay", 1, 0).await;
    assert!(
        items
            .iter()
            .any(|m| m.id == "before" && m.offset == ack.offset)
    );
    assert_eq!(items.iter().filter(|m| m.id == "after").count(), 1);
    let offline = awareness_for(&mut fay, "gil", 1500).await;
    assert!(
        offline.iter().all(|a| a.status != Status::Offline as i32),
        "{offline:?}"
    );
    for n in [&n1, &n2] {
        assert_eq!(presence(n, "gil").await["status"], "online");
    }
}

#[tokio::test]
async fn a_paused_node_is_reaped_and_re_announces_its_users_when_it_resumes() {
    let redis = redis();
    let n1 = node(&redis, "n1", &[]);
    let n2 = node(&redis, "n2", &[]);
    contact(&n1, "hal", "ivy").await;
    let (mut hal, _) = n1.online("hal", "phone").await;
    let (_ivy, _) = n2.online("ivy", "phone").await;
    awareness(&mut hal, "ivy", Status::Online).await;
    let pid = n2.pid().to_string();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    // Past the lease: n1 reaps n2 and announces ivy OFFLINE.
    awareness(&mut hal, "ivy", Status::Offline).await;
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    // n2 finds its lease gone, registers again, and ivy (still connected there) is ONLINE.
    awareness(&mut hal, "ivy", Status::Online).await;
    eventually("ivy online on both nodes", T, || async {
        presence(&n1, "ivy").await["status"] == "online"
            && presence(&n2, "ivy").await["status"] == "online"
    })
    .await;
}

#[tokio::test]
async fn a_clean_stop_removes_the_node_at_once() {
    let redis = redis();
    let n1 = node(&redis, "n1", &[]);
    let mut n2 = node(&redis, "n2", &[]);
    contact(&n1, "jo", "kim").await;
    let (mut jo, _) = n1.online("jo", "phone").await;
    let (_kim, _) = n2.online("kim", "phone").await;
    awareness(&mut jo, "kim", Status::Online).await;
    n2.terminate();
    awareness(&mut jo, "kim", Status::Offline).await;
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let nodes: Vec<String> = ::redis::cmd("ZRANGE")
        .arg("bimip:nodes")
        .arg(0)
        .arg(-1)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(nodes.iter().all(|n| !n.starts_with("n2/")), "{nodes:?}");
    assert_eq!(nodes.len(), 1, "{nodes:?}");
}

#[tokio::test]
async fn a_broken_subscription_is_healed_and_the_fan_out_sent_again() {
    let redis = redis();
    let n1 = node(&redis, "n1", &[]);
    let n2 = node(&redis, "n2", &[]);
    let (mut lia, _) = n1.online("lia", "phone").await;
    let (mut max, _) = n2.online("max", "phone").await;
    // Redis drops every subscriber connection: messages routed meanwhile are lost in pub/sub,
    // not in the queue.
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let killed: i64 = ::redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(killed >= 2, "{killed} subscriber connections killed");
    let ack = send(
        &mut lia,
        "max",
        "gap-1",
        "sent while the subscription was down",
    )
    .await;
    // max learns of it: in real time if the subscription was already back, else from the
    // fan-out the node sends again once it is.
    max.recv_until(
        |f| match &f.body {
            Some(Body::Message(m)) => m.id == "gap-1",
            Some(Body::Summary(s)) => s
                .senders
                .iter()
                .any(|x| x.from == "lia" && x.last_offset == ack.offset),
            _ => false,
        },
        T,
    )
    .await
    .expect("told of the message after the subscription came back");
    // And later messages flow in real time again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    send(&mut lia, "max", "gap-2", "after").await;
    max.recv_until(
        |f| matches!(&f.body, Some(Body::Message(m)) if m.id == "gap-2"),
        T,
    )
    .await
    .expect("real time again");
}

#[tokio::test]
async fn start_warns_about_redis_settings_that_lose_acknowledged_messages() {
    let redis = redis();
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    for (k, v) in [
        ("appendfsync", "everysec"),
        ("maxmemory-policy", "allkeys-lru"),
        ("requirepass", "redis-pw-SHOULD-NOT-LEAK"),
    ] {
        let () = ::redis::cmd("CONFIG")
            .arg("SET")
            .arg(k)
            .arg(v)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let url = format!(
        "redis://default:redis-pw-SHOULD-NOT-LEAK@127.0.0.1:{}",
        redis.port()
    );
    let data = tempfile::tempdir().unwrap();
    let args = ["--jwt-secret", SECRET, "--redis", &url, "--node-id", "w1"];
    let (mut child, addr) = spawn_logging(data.path(), "info", &args);
    // Requests wait until the store is open, so this answers after the settings were checked.
    let ready = http()
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let err = terminate_and_read_stderr(&mut child);
    assert!(err.contains("appendfsync=everysec"), "{err}");
    assert!(err.contains("maxmemory-policy=allkeys-lru"), "{err}");
    assert!(
        !err.contains("redis-pw-SHOULD-NOT-LEAK"),
        "the password was logged: {err}"
    );
}
