//! Message delivery end to end: offline → ONLINE fan-out → RESUME, realtime multi-device
//! delivery, dedupe, receipts, identity from the token, JSON ↔ binary, restart durability.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bimip_proto::{
    Body, Codec,
    v1::{self, Partition, ReceiptKind},
};
use common::*;

#[tokio::test]
async fn offline_messages_then_summary_then_resume_in_order() {
    let s = Server::start(&[]);
    let (mut alice, _) = s.online("alice", "phone").await;
    let mut offsets = Vec::new();
    for i in 1..=5 {
        let a = send(&mut alice, "bob", &format!("m{i}"), &format!("hello {i}")).await;
        assert!(!a.duplicate);
        offsets.push(a.offset);
    }
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "offsets increase: {offsets:?}"
    );
    send(&mut alice, "carol", "c1", "not for bob").await;

    let (mut bob, fan) = s.online("bob", "phone").await;
    assert!(fan.notifications.is_empty());
    assert_eq!(fan.summary.senders.len(), 1);
    let from_alice = &fan.summary.senders[0];
    assert_eq!(from_alice.from, "alice");
    assert_eq!(from_alice.unread, 5);
    assert_eq!(from_alice.first_offset, offsets[0]);
    assert_eq!(from_alice.last_offset, offsets[4]);
    let last = from_alice.last_message.as_ref().expect("last message");
    assert_eq!(text(last), "hello 5");
    assert!(fan.receipts.receipts.is_empty());

    // RESUME pages through everything in offset order (limit 2 → 3 batches).
    let (msgs, batches) = resume_all(&mut bob, "alice", 0, 2).await;
    assert_eq!(batches, 3);
    let got: Vec<_> = msgs.iter().map(text).collect();
    assert_eq!(got, ["hello 1", "hello 2", "hello 3", "hello 4", "hello 5"]);
    assert!(msgs.iter().all(|m| m.from == "alice" && m.to == "bob"));
    assert_eq!(msgs.iter().map(|m| m.offset).collect::<Vec<_>>(), offsets);

    // Without a receipt RESUME is idempotent.
    let (again, _) = resume_all(&mut bob, "alice", 0, 0).await;
    assert_eq!(again, msgs);

    // After a receipt only newer messages come back.
    let r = bob
        .receipt("alice", ReceiptKind::Read, offsets[2], Partition::Chat)
        .await
        .unwrap();
    ack(&mut bob, r).await;
    let (rest, _) = resume_all(&mut bob, "alice", 0, 0).await;
    assert_eq!(
        rest.iter().map(text).collect::<Vec<_>>(),
        ["hello 4", "hello 5"]
    );

    // from_offset overrides the cursor.
    let (from2, _) = resume_all(&mut bob, "alice", offsets[1], 0).await;
    assert_eq!(from2.len(), 4);
}

#[tokio::test]
async fn realtime_to_every_device_of_the_recipient_and_the_senders_other_devices() {
    let s = Server::start(&[]);
    let (mut bob1, _) = s.online("bob", "phone").await;
    let (mut bob2, _) = s.online("bob", "laptop").await;
    let (mut alice1, _) = s.online("alice", "phone").await;
    let (mut alice2, _) = s.online("alice", "laptop").await;

    let a = send(&mut alice1, "bob", "x1", "hi bob").await;
    for bob in [&mut bob1, &mut bob2] {
        let m = message(bob).await;
        assert_eq!(
            (m.from.as_str(), m.to.as_str(), text(&m)),
            ("alice", "bob", "hi bob".into())
        );
        assert_eq!(m.offset, a.offset);
        assert_eq!(m.device, "phone");
        assert_eq!(m.id, "x1");
    }
    let copy = message(&mut alice2).await;
    assert_eq!((copy.from.as_str(), copy.to.as_str()), ("alice", "bob"));
    assert_eq!(text(&copy), "hi bob");
    // The sending connection gets the Ack, not a copy.
    alice1.ping().await.unwrap();
    match body(&mut alice1).await {
        Body::Pong(_) => {}
        other => panic!("sender got {other:?} instead of nothing"),
    }
    let p = presence(&s, "bob").await;
    assert_eq!(p["status"], "online");
    assert_eq!(p["devices"], 2);
}

#[tokio::test]
async fn a_resend_with_the_same_id_is_stored_once() {
    let s = Server::start(&[]);
    let (mut alice, _) = s.online("alice", "phone").await;
    let first = send(&mut alice, "bob", "same-id", "once").await;
    let second = send(&mut alice, "bob", "same-id", "once").await;
    assert!(second.duplicate);
    assert_eq!(
        (second.offset, second.timestamp),
        (first.offset, first.timestamp)
    );
    let third = send(&mut alice, "bob", "other-id", "twice").await;
    assert!(!third.duplicate);
    let (mut bob, fan) = s.online("bob", "phone").await;
    assert_eq!(fan.summary.senders[0].unread, 2);
    let (msgs, _) = resume_all(&mut bob, "alice", 0, 0).await;
    assert_eq!(msgs.len(), 2);
    // Another sender may use the same id.
    let (mut carol, _) = s.online("carol", "phone").await;
    assert!(
        !send(&mut carol, "bob", "same-id", "carol's")
            .await
            .duplicate
    );
}

#[tokio::test]
async fn receipts_reach_an_online_sender_and_an_offline_one_via_fanout() {
    let s = Server::start(&[]);
    let (mut alice, _) = s.online("alice", "phone").await;
    let a1 = send(&mut alice, "bob", "r1", "one").await;
    let a2 = send(&mut alice, "bob", "r2", "two").await;

    let (mut bob, _) = s.online("bob", "phone").await;
    let r = bob
        .receipt("alice", ReceiptKind::Delivered, a2.offset, Partition::Chat)
        .await
        .unwrap();
    ack(&mut bob, r).await;
    let got = alice
        .recv_until(|f| matches!(f.body, Some(Body::Receipt(_))), T)
        .await
        .unwrap();
    let Some(Body::Receipt(rc)) = got.body else {
        unreachable!()
    };
    assert_eq!(rc.from, "bob");
    assert_eq!(rc.kind, ReceiptKind::Delivered as i32);
    assert_eq!(rc.up_to_offset, a2.offset);
    assert_eq!(rc.message_ids, ["r1", "r2"]);

    // Alice goes offline; bob reads in two steps; alice gets both, cumulative, on connect.
    alice.close().await.unwrap();
    eventually("alice offline", T, || async {
        presence(&s, "alice").await["status"] == "offline"
    })
    .await;
    let r = bob
        .receipt("alice", ReceiptKind::Read, a1.offset, Partition::Chat)
        .await
        .unwrap();
    ack(&mut bob, r).await;
    let r = bob
        .receipt("alice", ReceiptKind::Read, a2.offset, Partition::Chat)
        .await
        .unwrap();
    ack(&mut bob, r).await;

    let (mut alice, fan) = s.online("alice", "laptop").await;
    assert_eq!(fan.receipts.receipts.len(), 1, "{:?}", fan.receipts);
    let rc = &fan.receipts.receipts[0];
    assert_eq!(
        (rc.from.as_str(), rc.kind),
        ("bob", ReceiptKind::Read as i32)
    );
    assert_eq!(rc.up_to_offset, a2.offset);
    assert_eq!(rc.message_ids, ["r1", "r2"]);

    // Acknowledging the receipts clears them for the next connection.
    let r = alice
        .receipt(
            "",
            ReceiptKind::Delivered,
            fan.receipts.next_offset - 1,
            Partition::Receipt,
        )
        .await
        .unwrap();
    ack(&mut alice, r).await;
    let (_alice2, fan2) = s.online("alice", "tablet").await;
    assert!(fan2.receipts.receipts.is_empty());
}

#[tokio::test]
async fn identity_comes_from_the_token_not_the_frame() {
    let s = Server::start(&[]);
    let (mut mallory, _) = s.online("mallory", "m").await;
    let (mut bob, _) = s.online("bob", "phone").await;
    let r = mallory
        .send(Body::Message(v1::Message {
            id: "spoof".into(),
            from: "alice".into(),
            to: "bob".into(),
            payload: b"trust me".to_vec().into(),
            offset: 999_999,
            timestamp: 1,
            device: "alices-phone".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let a = ack(&mut mallory, r).await;
    let m = message(&mut bob).await;
    assert_eq!(m.from, "mallory");
    assert_eq!(m.device, "m");
    assert_eq!(m.offset, a.offset);
    assert_ne!(m.offset, 999_999);
    assert_ne!(m.timestamp, 1);
}

#[tokio::test]
async fn json_and_binary_clients_talk_to_each_other() {
    let s = Server::start(&[]);
    let (mut j, _) = s.online_with("jay", "web", Codec::Json).await;
    let (mut b, _) = s.online_with("bea", "app", Codec::Binary).await;
    assert_eq!(j.codec(), Codec::Json);
    let a = send(&mut j, "bea", "j1", "from json").await;
    let m = message(&mut b).await;
    assert_eq!((text(&m), m.offset), ("from json".into(), a.offset));
    send(&mut b, "jay", "b1", "from binary").await;
    let m = message(&mut j).await;
    assert_eq!(text(&m), "from binary");
    // A raw JSON frame as a browser would write it.
    j.send_raw(tungstenite_text(
        r#"{"ref":"77","message":{"id":"raw-1","to":"bea","payload":"aGVsbG8="}}"#,
    ))
    .await
    .unwrap();
    let a = ack(&mut j, 77).await;
    assert!(a.offset > 0);
    assert_eq!(text(&message(&mut b).await), "hello");
}

fn tungstenite_text(s: &str) -> bimip_client::WsMessage {
    bimip_client::WsMessage::Text(s.into())
}

#[tokio::test]
async fn cursors_and_offsets_survive_a_restart() {
    let mut s = Server::start(&[]);
    let (mut alice, _) = s.online("alice", "phone").await;
    let mut acks = Vec::new();
    for i in 0..4 {
        acks.push(send(&mut alice, "bob", &format!("k{i}"), &format!("msg {i}")).await);
    }
    let (mut bob, _) = s.online("bob", "phone").await;
    let r = bob
        .receipt("alice", ReceiptKind::Read, acks[1].offset, Partition::Chat)
        .await
        .unwrap();
    ack(&mut bob, r).await;
    drop(alice);
    drop(bob);
    s.restart();

    let (mut bob, fan) = s.online("bob", "phone").await;
    assert_eq!(fan.summary.senders[0].unread, 2);
    let (rest, _) = resume_all(&mut bob, "alice", 0, 0).await;
    assert_eq!(
        rest.iter().map(text).collect::<Vec<_>>(),
        ["msg 2", "msg 3"]
    );
    // Offsets continue after the restart and dedupe still knows old ids.
    let (mut alice, _) = s.online("alice", "phone").await;
    let again = send(&mut alice, "bob", "k0", "msg 0").await;
    assert!(again.duplicate);
    assert_eq!(again.offset, acks[0].offset);
    let next = send(&mut alice, "bob", "k9", "new").await;
    assert!(next.offset > acks[3].offset);
}

#[tokio::test]
async fn notifications_from_the_backend_arrive_in_the_fanout_and_in_real_time() {
    let s = Server::start(&[]);
    let client = http();
    let post = |body: serde_json::Value| {
        client
            .post(s.http("/v1/messages"))
            .bearer_auth(API_KEY)
            .json(&body)
            .send()
    };
    let r = post(serde_json::json!({"to": "dana", "partition": "notification", "text": "OTP 1234", "id": "otp-1"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let reply: serde_json::Value = r.json().await.unwrap();
    assert_eq!(reply["duplicate"], false);
    let (mut dana, fan) = s.online("dana", "phone").await;
    assert_eq!(fan.notifications.len(), 1);
    assert_eq!(fan.notifications[0].from, "system");
    assert_eq!(text(&fan.notifications[0]), "OTP 1234");
    assert!(!fan.notifications[0].acknowledged);

    // Realtime, as a user, chat partition.
    let r = post(serde_json::json!({"from": "erin", "to": "dana", "text": "hey"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m = message(&mut dana).await;
    assert_eq!((m.from.as_str(), text(&m)), ("erin", "hey".into()));

    // Acked notifications are not fanned out again.
    let off = fan.notifications[0].offset;
    let r = dana
        .receipt("", ReceiptKind::Delivered, off, Partition::Notification)
        .await
        .unwrap();
    ack(&mut dana, r).await;
    let (_d2, fan2) = s.online("dana", "laptop").await;
    assert!(fan2.notifications.is_empty());
    assert_eq!(
        fan2.summary.senders.len(),
        1,
        "erin's chat message is pending"
    );
}
