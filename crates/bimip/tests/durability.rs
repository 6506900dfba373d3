//! What is on disk and what survives: the file layout and line format byte for byte, torn-tail recovery,
//! refusal of mid-file corruption, and no acknowledged message lost to `kill -9`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine;
use bimip_proto::{Codec, store::QueueRecord, v1::Partition};
use common::*;
use prost::Message as _;
use sha2::Digest;
use std::{path::PathBuf, process::Command, time::Duration};

fn queue_file(dir: &std::path::Path, user: &str) -> PathBuf {
    let prefix = hex::encode(&sha2::Sha256::digest(user.as_bytes())[..1]);
    dir.join("bimip")
        .join(prefix)
        .join(user)
        .join(format!("bimip_queue_{user}.dat"))
}

fn index_file(dir: &std::path::Path, user: &str) -> PathBuf {
    queue_file(dir, user).with_file_name(format!("bimip_queue_index_{user}.dat"))
}

fn decode_line(line: &str) -> Vec<u8> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(line)
        .expect("standard padded base64");
    assert!(raw.len() > 4);
    let (body, crc) = raw.split_at(raw.len() - 4);
    assert_eq!(
        u32::from_le_bytes(crc.try_into().unwrap()),
        crc32c::crc32c(body),
        "CRC-32C little-endian over the protobuf bytes"
    );
    body.to_vec()
}

#[tokio::test]
async fn file_layout_and_line_format_are_the_seeds() {
    let s = Server::start(&[]);
    let (mut alice, _) = s.online("alice", "phone").await;
    let a = send(&mut alice, "bob", "m1", "hello bob").await;
    let (mut bob, _) = s.online("bob", "tab").await;
    let r = bob
        .receipt(
            "alice",
            bimip_proto::v1::ReceiptKind::Read,
            a.offset,
            Partition::Chat,
        )
        .await
        .unwrap();
    ack(&mut bob, r).await;

    let qf = queue_file(&s.dir, "bob");
    // The lines reach the user's files behind the commit log, within about a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&qf).unwrap_or_default();
        let written = text.lines().count() >= 2
            && index_file(&s.dir, "bob").exists()
            && queue_file(&s.dir, "alice").exists();
        if written || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(text.ends_with('\n'), "{}: {text:?}", qf.display());
    let lines: Vec<&str> = text.lines().collect();
    let first = QueueRecord::decode(decode_line(lines[0]).as_slice()).unwrap();
    assert_eq!(first.offset, a.offset);
    assert_eq!(first.partition, Partition::Chat as i32);
    assert_eq!((first.from.as_str(), first.to.as_str()), ("alice", "bob"));
    assert_eq!(&first.payload[..], b"hello bob");
    assert_eq!(first.message_id, "m1");
    assert_eq!(first.device, "phone");
    assert_eq!(first.timestamp, a.timestamp);
    assert!(!first.acknowledged);
    // The acknowledgement is an appended record, not an edit.
    assert!(lines.len() >= 2, "an ack record follows: {lines:?}");
    for l in &lines {
        decode_line(l);
    }
    let idx = std::fs::read_to_string(index_file(&s.dir, "bob")).unwrap();
    let cursor = bimip_proto::store::IndexRecord::decode(
        decode_line(idx.lines().last().unwrap()).as_slice(),
    )
    .unwrap();
    assert_eq!(cursor.device, "tab");
    assert_eq!((cursor.from.as_str(), cursor.to.as_str()), ("alice", "bob"));
    assert_eq!(cursor.next_offset, a.offset + 1);
    // The sender keeps its copy for its other devices.
    assert!(queue_file(&s.dir, "alice").exists());

    // `bimip inspect` decodes the same files.
    let out = Command::new(env!("CARGO_BIN_EXE_bimip"))
        .args(["inspect", "bob", "--data-dir"])
        .arg(&s.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("hello bob") && shown.contains("tab"),
        "{shown}"
    );
}

#[tokio::test]
async fn a_torn_last_line_is_cut_on_start_and_mid_file_corruption_refuses_start() {
    let mut s = Server::start(&[]);
    let (mut alice, _) = s.online("alice", "phone").await;
    for i in 0..3 {
        send(&mut alice, "bob", &format!("t{i}"), &format!("text {i}")).await;
    }
    drop(alice);
    s.terminate();
    let qf = queue_file(&s.dir, "bob");
    let good = std::fs::read(&qf).unwrap();
    // Half a line, as a crash mid-write leaves it.
    let mut torn = good.clone();
    torn.extend_from_slice(b"CgRib2I");
    std::fs::write(&qf, &torn).unwrap();
    s.start_again();
    let (mut bob, fan) = s.online("bob", "phone").await;
    assert_eq!(fan.summary.senders[0].unread, 3);
    let (msgs, _) = resume_all(&mut bob, "alice", 0, 0).await;
    assert_eq!(msgs.len(), 3);
    drop(bob);
    s.terminate();
    assert_eq!(std::fs::read(&qf).unwrap(), good, "torn tail removed");

    // Corruption in the middle: start is refused with file and line.
    let mut bad = good.clone();
    let nl = bad.iter().position(|b| *b == b'\n').unwrap();
    bad[nl / 2] = b'!';
    std::fs::write(&qf, &bad).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bimip"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            SECRET,
            "--data-dir",
        ])
        .arg(&s.dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bimip_queue_bob.dat:1"),
        "names file and line: {err}"
    );
    // --repair starts anyway and keeps the original aside.
    let mut repaired = Server::start_in(&s.dir, &["--repair"]);
    let (_bob, fan) = repaired.online("bob", "phone").await;
    assert_eq!(fan.summary.senders[0].unread, 2);
    repaired.terminate();
    let aside = std::fs::read_dir(qf.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains("corrupt"));
    assert!(aside, "original kept aside");
}

/// Senders stream messages while the server is killed with SIGKILL; after restart every message
/// whose Ack a client received is stored exactly once, in order.
#[tokio::test]
async fn kill_9_during_a_stream_of_sends_loses_no_acknowledged_message() {
    let mut s = Server::start(&["--fsync", "batch"]);
    let senders = 4;
    let mut tasks = Vec::new();
    for i in 0..senders {
        let url = s.url();
        tasks.push(tokio::spawn(async move {
            let user = format!("s{i}");
            let opts = bimip_client::ConnectOptions::new(url)
                .token(token(&user, Some("d")))
                .codec(Codec::Binary);
            let (mut c, _) = bimip_client::Client::connect(opts).await.unwrap();
            let mut acked = Vec::new();
            let mut pending = std::collections::HashMap::new();
            // Pipelined: keep up to 32 sends in flight until the connection dies.
            let mut n = 0u64;
            'outer: loop {
                while pending.len() < 32 {
                    let id = format!("{user}-{n}");
                    match c.send_message("sink", &id, id.clone().into_bytes()).await {
                        Ok(r) => {
                            pending.insert(r, id);
                        }
                        Err(_) => break 'outer,
                    }
                    n += 1;
                }
                match c.recv_timeout(Duration::from_secs(5)).await {
                    Ok(Some(f)) => {
                        if let Some(bimip_proto::Body::Ack(a)) = f.body
                            && let Some(id) = pending.remove(&f.r#ref)
                        {
                            acked.push((id, a.offset));
                        }
                    }
                    _ => break,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    s.kill9();
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert!(
        acked.len() > 50,
        "the stream was running: {} acks",
        acked.len()
    );
    s.start_again();
    let (mut sink, _) = s.online("sink", "d").await;
    let mut stored = std::collections::HashMap::new();
    for i in 0..senders {
        let (msgs, _) = resume_all(&mut sink, &format!("s{i}"), 0, 1000).await;
        let offsets: Vec<u64> = msgs.iter().map(|m| m.offset).collect();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "monotonic offsets");
        for m in msgs {
            assert!(
                stored.insert(m.id.clone(), m.offset).is_none(),
                "{} stored twice",
                m.id
            );
        }
    }
    for (id, offset) in &acked {
        assert_eq!(
            stored.get(id),
            Some(offset),
            "acknowledged {id} lost or moved"
        );
    }
    eprintln!(
        "kill -9: {} acknowledged, {} stored, 0 lost",
        acked.len(),
        stored.len()
    );
}

/// Compaction is visible in the metrics, and unacknowledged items it drops are counted.
#[tokio::test]
async fn compaction_and_dropped_unacknowledged_items_are_counted() {
    let s = Server::start(&["--max-queue-items", "5"]);
    let (mut alice, _) = s.online("alice", "phone").await;
    for i in 0..30 {
        send(&mut alice, "quinn", &format!("q{i}"), "x").await;
    }
    eventually("compaction metrics", Duration::from_secs(15), || async {
        metric(&s, "bimip_store_compactions_total").await >= 1.0
            && metric(&s, "bimip_store_dropped_unacknowledged_total").await >= 1.0
    })
    .await;
}
