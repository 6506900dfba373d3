//! End-to-end tests of the file store on real files in temporary directories.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use bimip_proto::store::{QueueRecord, QueueRecordKind};
use bimip_proto::v1::{Partition, ReceiptKind};
use bytes::Bytes;
use tempfile::TempDir;

use super::*;
use crate::{AckRequest, NewItem, QueueStore, ReadRequest, Store};

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        shards: 2,
        ..StoreConfig::new(dir)
    }
}

fn open(dir: &Path) -> FileStore {
    FileStore::open(config(dir)).expect("open store").0
}

pub(super) fn chat(from: &str, to: &str, id: &str) -> NewItem {
    NewItem {
        partition: Partition::Chat,
        from: from.into(),
        to: to.into(),
        payload: Bytes::from(format!("payload of {id}")),
        message_id: id.into(),
        device: "dev".into(),
        peer_offset: 0,
        dedupe: true,
    }
}

fn note(id: &str) -> NewItem {
    NewItem {
        partition: Partition::Notification,
        from: String::new(),
        ..chat("", "alice", id)
    }
}

async fn append(s: &FileStore, user: &str, item: NewItem) -> Appended {
    s.enqueue_append(user, item)
        .await
        .expect("enqueue")
        .wait()
        .await
        .expect("append")
}

fn ack(device: &str, peer: &str, kind: ReceiptKind, up: u64) -> AckRequest {
    AckRequest {
        device: device.into(),
        partition: Partition::Chat,
        peer: Some(peer.into()),
        kind,
        up_to_offset: up,
    }
}

fn read_chat(device: &str, peer: &str) -> ReadRequest {
    ReadRequest {
        device: device.into(),
        partition: Partition::Chat,
        peer: Some(peer.into()),
        start: None,
        limit: 100,
        ..Default::default()
    }
}

fn offsets(b: &ReadBatch) -> Vec<u64> {
    b.items.iter().map(|i| i.offset).collect()
}

#[tokio::test]
async fn layout_and_a_line_decoded_by_hand() {
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    let a = append(&s, "alice", chat("bob", "alice", "m1")).await;
    assert_eq!(a.offset, 1);
    s.shutdown().await;

    use sha2::Digest;
    let prefix = format!("{:02x}", sha2::Sha256::digest(b"alice")[0]);
    let udir = dir.path().join("bimip").join(&prefix).join("alice");
    assert_eq!(user_dir(dir.path(), "alice"), udir);
    let text = std::fs::read_to_string(udir.join("bimip_queue_alice.dat")).unwrap();
    assert!(text.ends_with('\n'));
    assert_eq!(text.lines().count(), 1);
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text.trim_end())
        .unwrap();
    let (pb, crc) = raw.split_at(raw.len() - 4);
    assert_eq!(
        u32::from_le_bytes(crc.try_into().unwrap()),
        crc32c::crc32c(pb)
    );
    let rec = <QueueRecord as prost::Message>::decode(pb).unwrap();
    assert_eq!(rec.offset, 1);
    assert_eq!(rec.partition, Partition::Chat as i32);
    assert_eq!(rec.from, "bob");
    assert_eq!(rec.to, "alice");
    assert_eq!(rec.message_id, "m1");
    assert_eq!(rec.kind, QueueRecordKind::Item as i32);
    assert_eq!(rec.timestamp, a.timestamp);
    assert_eq!(&rec.payload[..], b"payload of m1");
    // No index file until a cursor moves.
    assert!(!udir.join("bimip_queue_index_alice.dat").exists());
}

#[tokio::test]
async fn offsets_monotonic_across_reopen_and_closed_after_shutdown() {
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    for i in 1..=3 {
        let a = append(&s, "alice", chat("bob", "alice", &format!("m{i}"))).await;
        assert_eq!(a.offset, i);
    }
    s.shutdown().await;
    s.shutdown().await;
    assert!(matches!(
        s.enqueue_append("alice", chat("bob", "alice", "x")).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        s.read("alice", read_chat("d", "bob")).await,
        Err(StoreError::Closed)
    ));
    let (s, report) = FileStore::open(config(dir.path())).unwrap();
    assert_eq!(report.users, 1);
    assert_eq!(report.records, 3);
    let a = append(&s, "alice", chat("bob", "alice", "m4")).await;
    assert_eq!(a.offset, 4);
    // Another user's queue has its own sequence.
    assert_eq!(
        append(&s, "bob", chat("alice", "bob", "m1")).await.offset,
        1
    );
    s.shutdown().await;
}

#[tokio::test]
async fn dedupe_returns_the_original() {
    let dir = TempDir::new().unwrap();
    let s = Store::File(open(dir.path()));
    let a = s.append("alice", chat("bob", "alice", "m1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3)).await;
    let b = s.append("alice", chat("bob", "alice", "m1")).await.unwrap();
    assert!(b.duplicate);
    assert_eq!((b.offset, b.timestamp), (a.offset, a.timestamp));
    // Another sender may use the same id; without dedupe a copy is stored.
    let c = s
        .append("alice", chat("carol", "alice", "m1"))
        .await
        .unwrap();
    assert_eq!((c.offset, c.duplicate), (2, false));
    let d = s
        .append(
            "alice",
            NewItem {
                dedupe: false,
                ..chat("bob", "alice", "m1")
            },
        )
        .await
        .unwrap();
    assert_eq!((d.offset, d.duplicate), (3, false));
    s.shutdown().await;
    // Dedupe survives a restart.
    let s = open(dir.path());
    let e = append(&s, "alice", chat("bob", "alice", "m1")).await;
    assert_eq!((e.offset, e.duplicate), (1, true));
    let lines = std::fs::read_to_string(queue_path(dir.path(), "alice")).unwrap();
    assert_eq!(lines.lines().count(), 3);
    s.shutdown().await;
}

#[tokio::test]
async fn acknowledge_read_pending_with_several_devices() {
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    for i in 1..=5 {
        append(&s, "alice", chat("bob", "alice", &format!("b{i}"))).await;
    }
    append(&s, "alice", note("n1")).await; // 6
    append(&s, "alice", chat("carol", "alice", "c1")).await; // 7
    append(&s, "alice", chat("alice", "bob", "own")).await; // 8: her own copy

    // No cursor anywhere: a device starts at the beginning.
    let r = s.read("alice", read_chat("phone", "bob")).await.unwrap();
    assert_eq!(offsets(&r), [1, 2, 3, 4, 5]);
    assert!(!r.more);
    assert_eq!(r.next_offset, 6);
    assert!(r.items.iter().all(|i| !i.to_message().acknowledged));

    let o = s
        .acknowledge("alice", ack("phone", "bob", ReceiptKind::Delivered, 3))
        .await
        .unwrap();
    assert_eq!(o.next_offset, 4);
    assert_eq!(
        o.covered,
        [(1, "b1".to_string()), (2, "b2".into()), (3, "b3".into())]
    );
    // Another device's DELIVERED receipt behind the furthest cursor covers nothing new.
    let o = s
        .acknowledge("alice", ack("laptop", "bob", ReceiptKind::Delivered, 2))
        .await
        .unwrap();
    assert!(o.covered.is_empty());
    assert_eq!(o.next_offset, 3);
    // READ is its own kind; clamped to the queue's last offset (8), only bob's items count.
    let o = s
        .acknowledge("alice", ack("laptop", "bob", ReceiptKind::Read, 100))
        .await
        .unwrap();
    assert_eq!(o.covered.len(), 5);
    assert_eq!(o.next_offset, 9);
    // Never moves back.
    let o = s
        .acknowledge("alice", ack("laptop", "bob", ReceiptKind::Read, 1))
        .await
        .unwrap();
    assert_eq!((o.covered.len(), o.next_offset), (0, 9));

    // The phone resumes at its own cursor (max of its DELIVERED and READ).
    let r = s.read("alice", read_chat("phone", "bob")).await.unwrap();
    assert_eq!(offsets(&r), [4, 5]);
    assert!(r.items.iter().all(|i| i.to_message().acknowledged));
    let r = s.read("alice", read_chat("laptop", "bob")).await.unwrap();
    assert!(r.items.is_empty());
    assert_eq!(r.next_offset, 9);
    // A new device starts where the furthest device is.
    let r = s.read("alice", read_chat("tablet", "bob")).await.unwrap();
    assert!(r.items.is_empty());
    // Explicit start and limit.
    let r = s
        .read(
            "alice",
            ReadRequest {
                start: Some(2),
                limit: 2,
                ..read_chat("tablet", "bob")
            },
        )
        .await
        .unwrap();
    assert_eq!(offsets(&r), [2, 3]);
    assert!(r.more);
    assert_eq!(r.next_offset, 4);

    let p = s.pending("alice", "phone").await.unwrap();
    assert_eq!(p.notifications.len(), 1);
    assert_eq!(p.notifications[0].offset, 6);
    let senders: Vec<_> = p
        .senders
        .iter()
        .map(|s| (s.from.as_str(), s.unread, s.first_offset, s.last_offset))
        .collect();
    assert_eq!(senders, [("bob", 2, 4, 5), ("carol", 1, 7, 7)]);
    assert_eq!(p.senders[0].last.message_id, "b5");
    assert!(p.receipts.is_empty());
    let p = s.pending("alice", "laptop").await.unwrap();
    assert_eq!(p.senders.len(), 1);

    // Notifications: acknowledged by any device, then gone from pending.
    let o = s
        .acknowledge(
            "alice",
            AckRequest {
                device: "phone".into(),
                partition: Partition::Notification,
                peer: None,
                kind: ReceiptKind::Delivered,
                up_to_offset: 6,
            },
        )
        .await
        .unwrap();
    assert_eq!(o.covered, [(6, "n1".to_string())]);
    assert_eq!(o.next_offset, 7);
    assert!(
        s.pending("alice", "laptop")
            .await
            .unwrap()
            .notifications
            .is_empty()
    );

    // Receipts partition.
    let r = append(
        &s,
        "alice",
        NewItem {
            partition: Partition::Receipt,
            ..chat("bob", "alice", "r1")
        },
    )
    .await;
    let p = s.pending("alice", "phone").await.unwrap();
    assert_eq!(p.receipts.len(), 1);
    let o = s
        .acknowledge(
            "alice",
            AckRequest {
                device: "phone".into(),
                partition: Partition::Receipt,
                peer: Some("bob".into()),
                kind: ReceiptKind::Delivered,
                up_to_offset: r.offset,
            },
        )
        .await
        .unwrap();
    assert_eq!(o.covered.len(), 1);
    assert!(
        s.pending("alice", "phone")
            .await
            .unwrap()
            .receipts
            .is_empty()
    );

    // Bad requests.
    assert!(matches!(
        s.acknowledge(
            "alice",
            AckRequest {
                peer: None,
                ..ack("phone", "bob", ReceiptKind::Read, 1)
            }
        )
        .await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.read("../etc", read_chat("phone", "bob")).await,
        Err(StoreError::InvalidUser(_))
    ));
    assert!(matches!(
        s.enqueue_append("a/b", chat("bob", "a/b", "x")).await,
        Err(StoreError::InvalidUser(_))
    ));
    s.shutdown().await;

    // Everything (acknowledged flags, cursors) survives a restart.
    let s = open(dir.path());
    let p = s.pending("alice", "phone").await.unwrap();
    assert!(p.notifications.is_empty() && p.receipts.is_empty());
    assert_eq!(p.senders.len(), 2);
    let r = s.read("alice", read_chat("phone", "bob")).await.unwrap();
    assert_eq!(offsets(&r), [4, 5]);
    assert!(r.items.iter().all(|i| i.acknowledged));
    s.shutdown().await;
    let files = inspect_user(dir.path(), "alice").unwrap();
    assert!(files.problems.is_empty());
    assert_eq!(files.index.len(), 5);
    assert!(
        files
            .queue
            .iter()
            .any(|(_, r)| r.kind == QueueRecordKind::Ack as i32)
    );
    assert!(!dir.path().join("bimip").join("..").join("etc").exists());
}

#[tokio::test]
async fn resume_is_idempotent_and_survives_reopen() {
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    for i in 1..=3 {
        append(&s, "alice", chat("bob", "alice", &format!("m{i}"))).await;
    }
    let a = s.read("alice", read_chat("phone", "bob")).await.unwrap();
    let b = s.read("alice", read_chat("phone", "bob")).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(offsets(&a), [1, 2, 3]);
    s.acknowledge("alice", ack("phone", "bob", ReceiptKind::Delivered, 2))
        .await
        .unwrap();
    append(&s, "alice", chat("bob", "alice", "m4")).await;
    let c = s.read("alice", read_chat("phone", "bob")).await.unwrap();
    assert_eq!(offsets(&c), [3, 4]);
    s.shutdown().await;
    let s = open(dir.path());
    let d = s.read("alice", read_chat("phone", "bob")).await.unwrap();
    assert_eq!(offsets(&d), [3, 4]);
    assert_eq!(d, s.read("alice", read_chat("phone", "bob")).await.unwrap());
    s.shutdown().await;
}

/// Writes three items for alice and returns the queue file's path.
async fn three_items(dir: &Path) -> PathBuf {
    let s = open(dir);
    for i in 1..=3 {
        append(&s, "alice", chat("bob", "alice", &format!("m{i}"))).await;
    }
    s.shutdown().await;
    queue_path(dir, "alice")
}

#[tokio::test]
async fn torn_last_line_is_cut_at_every_byte_position() {
    let dir = TempDir::new().unwrap();
    let path = three_items(dir.path()).await;
    let full = std::fs::read(&path).unwrap();
    let last_start = full[..full.len() - 1]
        .iter()
        .rposition(|&b| b == b'\n')
        .unwrap()
        + 1;
    for cut in last_start + 1..full.len() {
        std::fs::write(&path, &full[..cut]).unwrap();
        let (s, report) = FileStore::open(config(dir.path())).unwrap();
        assert_eq!(report.truncated.len(), 1, "cut at {cut}");
        assert_eq!(report.truncated[0].0, path);
        assert_eq!(report.truncated[0].1, 3);
        assert_eq!(report.records, 2);
        assert_eq!(std::fs::read(&path).unwrap(), &full[..last_start]);
        let r = s.read("alice", read_chat("d", "bob")).await.unwrap();
        assert_eq!(offsets(&r), [1, 2]);
        s.shutdown().await;
    }
    // A complete last line with a flipped character (bad CRC or base64) is cut too.
    let mut bad = full.clone();
    bad[last_start + 5] = if bad[last_start + 5] == b'A' {
        b'B'
    } else {
        b'A'
    };
    std::fs::write(&path, &bad).unwrap();
    let (s, report) = FileStore::open(config(dir.path())).unwrap();
    assert_eq!(report.truncated.len(), 1);
    assert_eq!(
        append(&s, "alice", chat("bob", "alice", "m9")).await.offset,
        3
    );
    s.shutdown().await;
}

#[tokio::test]
async fn mid_file_corruption_refuses_start_and_repair_fixes_it() {
    let dir = TempDir::new().unwrap();
    let path = three_items(dir.path()).await;
    let full = std::fs::read(&path).unwrap();
    let second = full.iter().position(|&b| b == b'\n').unwrap() + 1;
    let mut bad = full.clone();
    bad[second + 3] = b'*';
    std::fs::write(&path, &bad).unwrap();

    match FileStore::open(config(dir.path())) {
        Err(StoreError::Corrupt { path: p, line, .. }) => {
            assert_eq!(p, path);
            assert_eq!(line, 2);
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a corrupt file must refuse the start"),
    }
    // inspect reads it anyway.
    let files = inspect_user(dir.path(), "alice").unwrap();
    assert_eq!(files.queue.len(), 2);
    assert_eq!(files.problems.len(), 1);
    assert_eq!(files.problems[0].1, 2);

    let (s, report) = FileStore::open(StoreConfig {
        repair: true,
        ..config(dir.path())
    })
    .unwrap();
    assert_eq!(report.repaired.len(), 1);
    assert_eq!((&report.repaired[0].0, report.repaired[0].1), (&path, 2));
    let aside: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("bimip_queue_alice.dat.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(
        std::fs::read(path.parent().unwrap().join(&aside[0])).unwrap(),
        bad
    );
    let r = s.read("alice", read_chat("d", "bob")).await.unwrap();
    assert_eq!(offsets(&r), [1, 3]);
    assert_eq!(
        append(&s, "alice", chat("bob", "alice", "m4")).await.offset,
        4
    );
    s.shutdown().await;
    assert!(FileStore::open(config(dir.path())).is_ok());
}

#[tokio::test]
async fn misplaced_folder_is_reported() {
    let dir = TempDir::new().unwrap();
    let wrong = dir.path().join("bimip").join("zz").join("alice");
    std::fs::create_dir_all(&wrong).unwrap();
    assert!(matches!(
        FileStore::open(config(dir.path())),
        Err(StoreError::Corrupt { line: 0, .. })
    ));
    let (_s, report) = FileStore::open(StoreConfig {
        repair: true,
        ..config(dir.path())
    })
    .unwrap();
    assert_eq!(report.repaired.len(), 1);
}

#[derive(Default)]
struct Counter {
    rounds: AtomicUsize,
    appends: AtomicUsize,
}

impl StoreObserver for Counter {
    fn fsync(&self, _took: Duration, appends: usize) {
        self.rounds.fetch_add(1, Ordering::Relaxed);
        self.appends.fetch_add(appends, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_shares_fsyncs() {
    let dir = TempDir::new().unwrap();
    let counter = Arc::new(Counter::default());
    let (s, _) = FileStore::open(StoreConfig {
        shards: 1,
        observer: Some(counter.clone()),
        ..StoreConfig::new(dir.path())
    })
    .unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut pending = Vec::new();
            for i in 0..50 {
                let user = format!("u{}", (t + i) % 4);
                pending.push(
                    s.enqueue_append(&user, chat("x", &user, &format!("{t}-{i}")))
                        .await
                        .unwrap(),
                );
            }
            let mut last = 0;
            for p in pending {
                let a = p.wait().await.unwrap();
                assert!(!a.duplicate);
                let _ = std::mem::replace(&mut last, a.offset);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Writers are answered as soon as their own file is synced; the observer hears of the round
    // once every file of it is, so it may lag the last answer a little.
    for _ in 0..200 {
        if counter.appends.load(Ordering::Relaxed) >= 400 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rounds = counter.rounds.load(Ordering::Relaxed);
    assert_eq!(counter.appends.load(Ordering::Relaxed), 400);
    assert!(rounds < 400, "{rounds} fsync rounds for 400 appends");
    // One caller's appends are stored in its order.
    let r = s
        .read(
            "u0",
            ReadRequest {
                device: "d".into(),
                partition: Partition::Chat,
                peer: Some("x".into()),
                start: None,
                limit: 0,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.items.len(), 100);
    for t in 0..8 {
        let mine: Vec<u64> = r
            .items
            .iter()
            .filter(|i| i.message_id.starts_with(&format!("{t}-")))
            .map(|i| i.message_id[2..].parse().unwrap())
            .collect();
        assert!(mine.windows(2).all(|w| w[0] < w[1]));
    }
    s.shutdown().await;
}

fn open_fds_under(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    entries
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p.starts_with(dir))
        .count()
}

#[tokio::test]
async fn open_files_are_bounded() {
    let dir = TempDir::new().unwrap();
    let dir_path = dir.path().canonicalize().unwrap();
    let (s, _) = FileStore::open(StoreConfig {
        shards: 1,
        max_open_files: 4,
        cache_users: 8,
        ..StoreConfig::new(&dir_path)
    })
    .unwrap();
    for round in 0..2 {
        for u in 0..50 {
            let user = format!("user{u}");
            let a = append(&s, &user, chat("bob", &user, &format!("m{round}"))).await;
            assert_eq!(a.offset, round + 1);
            s.acknowledge(&user, ack("d", "bob", ReceiptKind::Delivered, 1))
                .await
                .unwrap();
            // The users' handles (the push log's one handle under push/ is not among them).
            assert!(open_fds_under(&dir_path.join("bimip")) <= 4);
        }
    }
    for u in 0..50 {
        let user = format!("user{u}");
        let r = s.read(&user, read_chat("d", "bob")).await.unwrap();
        assert_eq!(offsets(&r), [2]);
    }
    s.shutdown().await;
}

#[tokio::test]
async fn a_failed_write_is_an_error_for_that_user_only() {
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    append(&s, "alice", chat("bob", "alice", "m1")).await;
    // Block carol's folder with a file, so creating her queue fails.
    let cdir = user_dir(dir.path(), "carol");
    std::fs::create_dir_all(cdir.parent().unwrap()).unwrap();
    std::fs::write(&cdir, b"in the way").unwrap();
    let r = s
        .enqueue_append("carol", chat("bob", "carol", "m1"))
        .await
        .unwrap()
        .wait()
        .await;
    assert!(matches!(r, Err(StoreError::Io { .. })), "{r:?}");
    assert_eq!(
        append(&s, "alice", chat("bob", "alice", "m2")).await.offset,
        2
    );
    let r = s.read("carol", read_chat("d", "bob")).await.unwrap();
    assert!(r.items.is_empty(), "nothing half-written stays visible");
    std::fs::remove_file(&cdir).unwrap();
    assert_eq!(
        append(&s, "carol", chat("bob", "carol", "m1")).await.offset,
        1
    );
    s.shutdown().await;
}

#[tokio::test]
async fn fsync_modes_always_and_never_store_the_same() {
    for mode in [FsyncMode::Always, FsyncMode::Never] {
        let dir = TempDir::new().unwrap();
        let counter = Arc::new(Counter::default());
        let (s, _) = FileStore::open(StoreConfig {
            fsync: mode,
            observer: Some(counter.clone()),
            ..config(dir.path())
        })
        .unwrap();
        for i in 1..=5 {
            assert_eq!(
                append(&s, "alice", chat("bob", "alice", &format!("m{i}")))
                    .await
                    .offset,
                i
            );
        }
        s.shutdown().await;
        let expected = if mode == FsyncMode::Always { 5 } else { 0 };
        assert_eq!(counter.rounds.load(Ordering::Relaxed), expected);
        let files = inspect_user(dir.path(), "alice").unwrap();
        assert_eq!(files.queue.len(), 5);
    }
    assert!("batch".parse::<FsyncMode>().is_ok());
    assert!("sometimes".parse::<FsyncMode>().is_err());
}

mod model {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    enum Op {
        Append {
            from: usize,
            dup: bool,
            /// Through `enqueue_append_with_copy`, with the sender's copy.
            copy: bool,
        },
        Ack {
            device: usize,
            from: usize,
            read: bool,
            up: u64,
        },
        Read {
            device: usize,
            from: usize,
        },
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3usize, any::<bool>(), any::<bool>())
                .prop_map(|(from, dup, copy)| Op::Append { from, dup, copy }),
            2 => (0..3usize, 0..3usize, any::<bool>(), 0..30u64)
                .prop_map(|(device, from, read, up)| Op::Ack { device, from, read, up }),
            2 => (0..3usize, 0..3usize).prop_map(|(device, from)| Op::Read { device, from }),
            1 => Just(Op::Reopen),
        ]
    }

    const SENDERS: [&str; 3] = ["bob", "carol", "dave"];
    const DEVICES: [&str; 3] = ["phone", "laptop", "tablet"];

    /// The simplest model: a list of (offset, sender, id) and a cursor map.
    #[derive(Default)]
    struct Model {
        items: Vec<(u64, usize, String)>,
        cursors: HashMap<(usize, usize, bool), u64>,
        count: usize,
        /// Per sender: (peer offset, id) of its own copies, in order.
        copies: HashMap<usize, Vec<(u64, String)>>,
    }

    impl Model {
        fn start(&self, device: usize, from: usize) -> u64 {
            let own = [false, true]
                .iter()
                .filter_map(|k| self.cursors.get(&(device, from, *k)))
                .max()
                .copied();
            own.or_else(|| {
                self.cursors
                    .iter()
                    .filter(|((_, f, _), _)| *f == from)
                    .map(|(_, v)| *v)
                    .max()
            })
            .unwrap_or(1)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn store_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let dir = TempDir::new().unwrap();
                let mut s = open(dir.path());
                let mut m = Model::default();
                for op in ops {
                    match op {
                        Op::Append { from, dup, copy } => {
                            let id = if dup && m.count > 0 { format!("m{}", m.count - 1) } else { format!("m{}", m.count) };
                            let item = chat(SENDERS[from], "alice", &id);
                            let a = if copy {
                                let c = crate::CopyTo {
                                    user: SENDERS[from].into(),
                                    item: NewItem { dedupe: false, ..item.clone() },
                                };
                                let (p, c) = s.enqueue_append_with_copy("alice", item, c).await.unwrap();
                                let (a, c) = (p.wait().await.unwrap(), c.wait().await.unwrap());
                                assert_eq!(c.duplicate, a.duplicate, "a copy only of what was stored");
                                if !a.duplicate {
                                    m.copies.entry(from).or_default().push((a.offset, id.clone()));
                                }
                                a
                            } else {
                                append(&s, "alice", item).await
                            };
                            match m.items.iter().find(|(_, f, i)| *f == from && *i == id) {
                                Some((off, _, _)) => {
                                    assert!(a.duplicate);
                                    assert_eq!(a.offset, *off);
                                }
                                None => {
                                    assert!(!a.duplicate);
                                    assert_eq!(a.offset, m.items.last().map_or(1, |x| x.0 + 1));
                                    m.items.push((a.offset, from, id));
                                    m.count += 1;
                                }
                            }
                        }
                        Op::Ack { device, from, read, up } => {
                            let kind = if read { ReceiptKind::Read } else { ReceiptKind::Delivered };
                            let o = s.acknowledge("alice", ack(DEVICES[device], SENDERS[from], kind, up)).await.unwrap();
                            let last = m.items.last().map_or(0, |x| x.0);
                            let new = up.min(last) + 1;
                            let cur = m.cursors.get(&(device, from, read)).copied().unwrap_or(1);
                            if new > cur {
                                m.cursors.insert((device, from, read), new);
                            }
                            assert_eq!(o.next_offset, cur.max(new));
                        }
                        Op::Read { device, from } => {
                            let r = s.read("alice", read_chat(DEVICES[device], SENDERS[from])).await.unwrap();
                            let start = m.start(device, from);
                            let want: Vec<u64> = m.items.iter().filter(|(o, f, _)| *f == from && *o >= start).map(|x| x.0).collect();
                            assert_eq!(offsets(&r), want);
                            // Payloads come back from the file, each the one of its own item.
                            for it in &r.items {
                                assert_eq!(it.payload, Bytes::from(format!("payload of {}", it.message_id)));
                            }
                            // The sender's own copies: in its queue, with the recipient's offset.
                            let own = s.read(SENDERS[from], ReadRequest {
                                device: "any".into(),
                                partition: Partition::Chat,
                                peer: Some(SENDERS[from].into()),
                                start: Some(1),
                                limit: 0,
                                ..Default::default()
                            }).await.unwrap();
                            let got: Vec<(u64, String)> = own.items.iter().map(|i| (i.peer_offset, i.message_id.clone())).collect();
                            assert_eq!(&got, m.copies.get(&from).unwrap_or(&Vec::new()));
                        }
                        Op::Reopen => {
                            s.shutdown().await;
                            s = open(dir.path());
                        }
                    }
                }
                s.shutdown().await;
            });
        }
    }
}

/// Start-up speed with many stored records (run in release: `cargo test --release -p bimip-store
/// -- --ignored recovery_speed --nocapture`; the target is 1M records in < 2 s).
#[test]
#[ignore]
fn recovery_speed() {
    let dir = TempDir::new().unwrap();
    let users = 1000;
    let per_user = 1000;
    for u in 0..users {
        let user = format!("user{u}");
        let mut buf = Vec::new();
        for i in 1..=per_user {
            let rec = QueueRecord {
                offset: i,
                partition: Partition::Chat as i32,
                from: "bob".into(),
                to: user.clone(),
                payload: Bytes::from_static(b"hello there, a message of ordinary size"),
                timestamp: 1_700_000_000_000 + i as i64,
                message_id: format!("m{i}"),
                device: "phone".into(),
                ..Default::default()
            };
            record::encode_line_into(&rec, &mut buf);
        }
        let path = queue_path(dir.path(), &user);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, buf).unwrap();
    }
    let t = std::time::Instant::now();
    let (_s, report) = FileStore::open(config(dir.path())).unwrap();
    let took = t.elapsed();
    eprintln!(
        "recovered {} records of {} users in {took:?}",
        report.records, report.users
    );
    assert_eq!(report.records, users * per_user);
}

/// The sender's copy is queued by the store behind the recipient's item, on the same shard or
/// through another shard's inbox; it carries the recipient's offset, is skipped for a
/// duplicate, and both read back (payload from the file) after a restart.
#[tokio::test]
async fn append_with_copy_same_and_other_shard() {
    use crate::CopyTo;
    let dir = TempDir::new().unwrap();
    let users: Vec<String> = (0..12).map(|i| format!("u{i}")).collect();
    let shards = config(dir.path()).shards;
    assert!(
        users
            .iter()
            .any(|u| shard_of(u, shards) != shard_of(&users[0], shards)),
        "the users cover both shards"
    );
    let s = open(dir.path());
    let mut expected = Vec::new();
    for (round, id) in ["m1", "m2", "m1"].into_iter().enumerate() {
        for to in &users[1..] {
            let item = chat(&users[0], to, id);
            let copy = CopyTo {
                user: users[0].clone(),
                item: NewItem {
                    dedupe: false,
                    ..item.clone()
                },
            };
            let (p, c) = s
                .enqueue_append_with_copy(to, item, copy)
                .await
                .expect("enqueue");
            let stored = p.wait().await.expect("append");
            let copied = c.wait().await.expect("copy");
            if round == 2 {
                assert!(
                    stored.duplicate && copied.duplicate,
                    "a resend copies nothing"
                );
            } else {
                assert!(!stored.duplicate && !copied.duplicate && copied.offset > 0);
                expected.push((to.clone(), id, stored.offset, copied.offset));
            }
        }
    }
    s.shutdown().await;
    let s = open(dir.path());
    let own = s
        .read(
            &users[0],
            ReadRequest {
                device: "d".into(),
                partition: Partition::Chat,
                peer: Some(users[0].clone()),
                start: Some(1),
                limit: 0,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(own.items.len(), expected.len(), "one copy per message");
    for (to, id, offset, copy_offset) in expected {
        let r = s.read(&to, read_chat("d", &users[0])).await.unwrap();
        let it = r.items.iter().find(|i| i.offset == offset).expect("item");
        assert_eq!(it.message_id, id);
        assert_eq!(it.payload, Bytes::from(format!("payload of {id}")));
        let c = own
            .items
            .iter()
            .find(|i| i.offset == copy_offset)
            .expect("copy");
        assert_eq!((c.to.as_str(), c.peer_offset), (to.as_str(), offset));
        assert_eq!(c.payload, it.payload);
    }
}

/// A shutdown while copies are on their way between shards refuses none of them: whatever
/// recipient item was stored has its sender's copy stored too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_keeps_copies_in_flight_between_shards() {
    use crate::CopyTo;
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let (from, to) = (format!("a{i}"), format!("b{i}"));
            let mut outcomes = Vec::new();
            for n in 0..200 {
                let item = chat(&from, &to, &format!("m{n}"));
                let copy = CopyTo {
                    user: from.clone(),
                    item: NewItem {
                        dedupe: false,
                        ..item.clone()
                    },
                };
                let Ok((p, c)) = s.enqueue_append_with_copy(&to, item, copy).await else {
                    break;
                };
                outcomes.push((p.wait().await.is_ok(), c.wait().await.is_ok()));
            }
            outcomes
        }));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.shutdown().await;
    let mut stored = 0;
    for t in tasks {
        for (item, copy) in t.await.unwrap() {
            if item {
                stored += 1;
                assert!(copy, "a stored item lost its sender's copy at shutdown");
            }
        }
    }
    assert!(stored > 0);
}

/// `unread`: per sender (chat only, not the user's own copies), the items past the furthest
/// cursor of any device for that sender, whatever its receipt kind; a device with no cursor
/// does not hold the count back.
#[tokio::test]
async fn unread_counts_past_the_furthest_cursor_of_any_device() {
    use crate::{SenderUnread, Unread};
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    assert_eq!(s.unread("alice").await.unwrap(), Unread::default());
    assert!(matches!(
        s.unread("bad/user").await,
        Err(StoreError::InvalidUser(_))
    ));
    // bob: 1, 2, 5; carol: 3, 6; a notification: 4; alice's own copy of a message to bob: 7.
    for (from, id) in [("bob", "b1"), ("bob", "b2"), ("carol", "c1")] {
        append(&s, "alice", chat(from, "alice", id)).await;
    }
    append(&s, "alice", note("n1")).await;
    append(&s, "alice", chat("bob", "alice", "b3")).await;
    append(&s, "alice", chat("carol", "alice", "c2")).await;
    append(&s, "alice", chat("alice", "bob", "own")).await;
    let u = s.unread("alice").await.unwrap();
    assert_eq!(
        u.senders,
        vec![
            SenderUnread {
                from: "bob".into(),
                unread: 3,
                first_offset: 1,
                last_offset: 5,
            },
            SenderUnread {
                from: "carol".into(),
                unread: 2,
                first_offset: 3,
                last_offset: 6,
            },
        ]
    );
    assert_eq!(u.total, 5);
    assert!(!u.acknowledged("bob", 1));
    assert!(u.acknowledged("dave", 1));

    // The phone was delivered bob's first two, the laptop read only the first: the furthest
    // cursor (phone, DELIVERED) counts. A device without a cursor changes nothing.
    s.acknowledge("alice", ack("phone", "bob", ReceiptKind::Delivered, 2))
        .await
        .unwrap();
    s.acknowledge("alice", ack("laptop", "bob", ReceiptKind::Read, 1))
        .await
        .unwrap();
    let u = s.unread("alice").await.unwrap();
    assert_eq!(u.senders[0].unread, 1);
    assert_eq!(u.senders[0].first_offset, 5);
    assert_eq!(u.total, 3);
    assert!(u.acknowledged("bob", 2));
    assert!(!u.acknowledged("bob", 5));

    // READ further than DELIVERED on another device; all of carol's read: she drops out.
    s.acknowledge("alice", ack("laptop", "bob", ReceiptKind::Read, 5))
        .await
        .unwrap();
    s.acknowledge("alice", ack("tablet", "carol", ReceiptKind::Read, 6))
        .await
        .unwrap();
    let u = s.unread("alice").await.unwrap();
    assert_eq!(u, Unread::default());

    // The same after a restart (cursors come back from the index file), and through `Store`.
    append(&s, "alice", chat("carol", "alice", "c3")).await;
    s.shutdown().await;
    let store = crate::Store::File(open(dir.path()));
    let u = store.unread("alice").await.unwrap();
    assert_eq!(u.total, 1);
    assert_eq!(u.senders[0].from, "carol");
    assert_eq!(u.senders[0].first_offset, 8);
    store.shutdown().await;
}

/// A conversation read: messages from the peer merged with the user's own copies of what it sent
/// to the peer (not to others), in either order and in pages, the same after a restart (the
/// index of own copies is rebuilt from the file).
#[tokio::test]
async fn conversation_reads_both_directions_in_either_order() {
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    // alice's queue: b1 (from bob), a1 (own copy to bob), c1 (from carol), a2 (own copy to
    // carol), b2, a3 (own copy to bob)
    append(&s, "alice", chat("bob", "alice", "b1")).await;
    append(&s, "alice", chat("alice", "bob", "a1")).await;
    append(&s, "alice", chat("carol", "alice", "c1")).await;
    append(&s, "alice", chat("alice", "carol", "a2")).await;
    append(&s, "alice", chat("bob", "alice", "b2")).await;
    append(&s, "alice", chat("alice", "bob", "a3")).await;
    check_conversation(&s).await;
    s.shutdown().await;
    let s = open(dir.path());
    check_conversation(&s).await;
    s.shutdown().await;
}

async fn check_conversation(s: &FileStore) {
    let conv = |start: Option<u64>, limit: usize, newest_first: bool| ReadRequest {
        start,
        limit,
        with_sent: true,
        newest_first,
        ..read_chat("d", "bob")
    };
    let ids =
        |r: &ReadBatch| -> Vec<String> { r.items.iter().map(|i| i.message_id.clone()).collect() };
    let all = s.read("alice", conv(Some(1), 0, false)).await.unwrap();
    assert_eq!(ids(&all), ["b1", "a1", "b2", "a3"]);
    assert!(!all.more);
    // Oldest first in pages of 3: the second page starts after the last item.
    let p1 = s.read("alice", conv(Some(1), 3, false)).await.unwrap();
    assert_eq!(
        (ids(&p1), p1.more),
        (vec!["b1".into(), "a1".into(), "b2".into()], true)
    );
    let p2 = s
        .read("alice", conv(Some(p1.next_offset), 3, false))
        .await
        .unwrap();
    assert_eq!((ids(&p2), p2.more), (vec!["a3".to_string()], false));
    // Newest first from the end, then from next_offset down.
    let n1 = s.read("alice", conv(None, 3, true)).await.unwrap();
    assert_eq!(
        (ids(&n1), n1.more),
        (vec!["a3".into(), "b2".into(), "a1".into()], true)
    );
    let n2 = s
        .read("alice", conv(Some(n1.next_offset), 3, true))
        .await
        .unwrap();
    assert_eq!(
        (ids(&n2), n2.more, n2.next_offset),
        (vec!["b1".to_string()], false, 0)
    );
    // Without with_sent, only the peer's messages (what RESUME reads).
    let resume = s
        .read(
            "alice",
            ReadRequest {
                start: Some(1),
                ..read_chat("d", "bob")
            },
        )
        .await
        .unwrap();
    assert_eq!(ids(&resume), ["b1", "b2"]);
    // Newest first over the whole partition, without a peer.
    let every = s
        .read(
            "alice",
            ReadRequest {
                peer: None,
                newest_first: true,
                limit: 2,
                ..read_chat("d", "bob")
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (ids(&every), every.more),
        (vec!["a3".into(), "b2".into()], true)
    );
}
