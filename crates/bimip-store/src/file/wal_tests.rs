//! The commit log end to end on real files: a crash image taken while the store runs (the log
//! not yet checkpointed), its user files cut back as a machine crash before write-back would
//! leave them, opened again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use bimip_proto::v1::{Partition, ReceiptKind};
use tempfile::TempDir;

use super::compaction_tests::read_all;
use super::shard::fault;
use super::tests::chat;
use super::*;
use crate::{AckRequest, Appended, CopyTo, NewItem, PresenceUpdate, ProfileStore, QueueStore};

/// A chat message to `to` and the sender's copy, both waited for.
async fn send(s: &FileStore, from: &str, to: &str, id: &str) -> Appended {
    let item = chat(from, to, id);
    let copy = CopyTo {
        user: from.into(),
        item: NewItem {
            dedupe: false,
            ..item.clone()
        },
    };
    let (a, c) = s
        .enqueue_append_with_copy(to, item, copy)
        .await
        .expect("enqueue");
    let a = a.wait().await.expect("append");
    c.wait().await.expect("copy");
    a
}

/// Every chat item `user` holds from `peer` (both directions of the conversation), as
/// `(offset, message id, acknowledged)`.
async fn conversation(s: &FileStore, user: &str, peer: &str) -> Vec<(u64, String, bool)> {
    read_all(s, user, peer)
        .await
        .items
        .iter()
        .map(|i| (i.offset, i.message_id.clone(), i.acknowledged))
        .collect()
}

/// Copies a data dir as it is on disk right now (what a machine crash would find, before the
/// page cache is lost).
fn crash_image(from: &Path, to: &Path) {
    for entry in walk(from) {
        let rel = entry.strip_prefix(from).unwrap();
        let dest = to.join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        // A log the checkpoint thread recycled or removed meanwhile is not in the image.
        match std::fs::copy(&entry, &dest) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            r => {
                r.unwrap();
            }
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The page cache is lost: every queue and index file keeps only part of what was written,
/// some nothing at all.
fn lose_write_back(dir: &Path) {
    for (i, path) in walk(&dir.join("bimip")).into_iter().enumerate() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("bimip_queue") && !name.starts_with("bimip_profile") {
            continue;
        }
        let len = std::fs::metadata(&path).unwrap().len();
        match i % 3 {
            0 => std::fs::remove_file(&path).unwrap(),
            1 => std::fs::write(&path, b"").unwrap(),
            _ => {
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                f.set_len(len / 2).unwrap();
            }
        }
    }
}

const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];

async fn busy_store(s: &FileStore) {
    for round in 0..12 {
        for (i, from) in USERS.iter().enumerate() {
            let to = USERS[(i + 1 + round % 3) % USERS.len()];
            send(s, from, to, &format!("{from}-{round}")).await;
        }
    }
    // Profiles: a durable change (contacts) and an advisory one (last seen, written lazily).
    s.put_contacts(
        "alice",
        vec![("bob".into(), false), ("carol".into(), true)],
        false,
    )
    .await
    .unwrap();
    s.set_presence(
        "dave",
        PresenceUpdate {
            last_seen: Some(1_700_000_000_000),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // Cursors move too (index files).
    s.acknowledge(
        "bob",
        AckRequest {
            device: "phone".into(),
            partition: Partition::Chat,
            peer: Some("alice".into()),
            kind: ReceiptKind::Read,
            up_to_offset: 3,
        },
    )
    .await
    .unwrap();
}

async fn everything(s: &FileStore) -> (Vec<crate::Profile>, Vec<Vec<(u64, String, bool)>>) {
    let mut profiles = Vec::new();
    for u in USERS {
        profiles.push(s.profile(u).await.unwrap());
    }
    let mut all = Vec::new();
    for a in USERS {
        for b in USERS {
            if a != b {
                all.push(conversation(s, a, b).await);
            }
        }
    }
    (profiles, all)
}

#[tokio::test]
async fn the_log_restores_what_the_user_files_lost_in_a_machine_crash() {
    let live = TempDir::new().unwrap();
    fault::hold_checkpoints(live.path());
    let (s, _) = FileStore::open(StoreConfig {
        shards: 2,
        ..StoreConfig::new(live.path())
    })
    .unwrap();
    busy_store(&s).await;
    // The last seen reaches the file (lazily, within a tick).
    tokio::time::sleep(Duration::from_millis(400)).await;
    let want = everything(&s).await;
    let n: usize = want.1.iter().map(Vec::len).sum();
    assert_eq!(n, 48, "{want:?}");
    assert_eq!(want.0[3].last_seen, 1_700_000_000_000);
    assert_eq!(want.0[0].contacts.len(), 2);
    let logs = walk(&live.path().join("wal"));
    assert_eq!(logs.len(), 2, "one log per shard: {logs:?}");

    let image = TempDir::new().unwrap();
    crash_image(live.path(), image.path());
    lose_write_back(image.path());
    // `bimip check` sees what the log still has to write, and changes nothing.
    let report = check_data_dir(image.path(), false).unwrap();
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.reason.contains("commit-log records")),
        "{:?}",
        report.notes
    );
    let (s2, report) = FileStore::open(StoreConfig {
        shards: 3, // another shard count than the run that wrote the logs
        ..StoreConfig::new(image.path())
    })
    .unwrap();
    assert!(report.log.missing > 0, "{:?}", report.log);
    // Byte for byte what the running store wrote (senders' copies and cursors included).
    for user in USERS {
        for path in [queue_path, index_path, profile::profile_path] {
            let a = std::fs::read(path(live.path(), user)).ok();
            assert_eq!(std::fs::read(path(image.path(), user)).ok(), a, "{user}");
        }
    }
    assert_eq!(everything(&s2).await, want);
    // Writing goes on where it stopped.
    assert!(!send(&s2, "alice", "bob", "after").await.duplicate);
    s2.shutdown().await;
    assert_eq!(walk(&image.path().join("wal")).len(), 0);
    let report = check_data_dir(image.path(), false).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);

    // `bimip check --repair` writes the log back just as a start does.
    let image2 = TempDir::new().unwrap();
    crash_image(live.path(), image2.path());
    lose_write_back(image2.path());
    let report = check_data_dir(image2.path(), true).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(
        report.notes.iter().any(|n| n.reason.contains("wrote")),
        "{:?}",
        report.notes
    );
    let (s3, report) = FileStore::open(StoreConfig::new(image2.path())).unwrap();
    assert_eq!(report.log.records, 0);
    assert_eq!(everything(&s3).await, want);
    s3.shutdown().await;

    // A clean stop checkpoints: no log is left and the user files are complete.
    s.shutdown().await;
    assert_eq!(walk(&live.path().join("wal")).len(), 0);
}

#[tokio::test]
async fn records_from_before_a_compaction_are_not_replayed_onto_the_compacted_files() {
    let live = TempDir::new().unwrap();
    fault::pause_background(live.path());
    fault::hold_checkpoints(live.path());
    let (s, _) = FileStore::open(StoreConfig {
        shards: 1,
        max_queue_items: 8,
        ..StoreConfig::new(live.path())
    })
    .unwrap();
    for i in 0..20 {
        send(&s, "alice", "bob", &format!("m{i}")).await;
    }
    let c = s.compact("bob").await.unwrap();
    assert!(c.dropped > 0);
    let compacted_len = std::fs::metadata(queue_path(live.path(), "bob"))
        .unwrap()
        .len();
    for i in 20..24 {
        send(&s, "alice", "bob", &format!("m{i}")).await;
    }
    let want = conversation(&s, "bob", "alice").await;
    s.write_behind().await;

    let image = TempDir::new().unwrap();
    crash_image(live.path(), image.path());
    // The lines written after the compaction are lost from the file.
    let q = queue_path(image.path(), "bob");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&q)
        .unwrap()
        .set_len(compacted_len)
        .unwrap();
    let (s2, report) = FileStore::open(StoreConfig {
        shards: 1,
        max_queue_items: 8,
        ..StoreConfig::new(image.path())
    })
    .unwrap();
    // The four lines after the compaction, one commit each; the 20 before are not replayed.
    assert_eq!(report.log.missing, 4, "{:?}", report.log);
    assert_eq!(conversation(&s2, "bob", "alice").await, want);
    let report = check_data_dir(image.path(), false).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    s2.shutdown().await;
    s.shutdown().await;
}

fn logs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = walk(&dir.join("wal"))
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Waits until the log generation `name` is checkpointed (test builds checkpoint a non-empty
/// generation after a short age, see `CHECKPOINT_AGE`).
async fn checkpointed(dir: &Path, name: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dir.join("wal").join(name).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{name} never checkpointed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn checkpointed_generations_are_recycled_and_their_old_bytes_never_replayed() {
    let live = TempDir::new().unwrap();
    let d = live.path();
    let s = one_shard(d);
    send(&s, "alice", "bob", "m1").await;
    assert_eq!(logs(d), ["shard-0.0000000001.log"]);
    checkpointed(d, "shard-0.0000000001.log").await;
    // The checkpointed file is kept as the spare; the next generation was a new file.
    assert_eq!(logs(d), ["shard-0.0000000002.log", "shard-0.spare"]);
    send(&s, "alice", "bob", "m2").await;
    checkpointed(d, "shard-0.0000000002.log").await;
    // Generation 3 reuses generation 1's file (its old record still in it), 2 is the spare.
    assert_eq!(logs(d), ["shard-0.0000000003.log", "shard-0.spare"]);
    let q = queue_path(d, "bob");
    let before = std::fs::metadata(&q).unwrap().len();
    fault::hold_checkpoints(d);
    send(&s, "alice", "bob", "m3").await;
    let want = conversation(&s, "bob", "alice").await;
    assert_eq!(want.len(), 3);
    s.write_behind().await;

    let image = TempDir::new().unwrap();
    crash_image(d, image.path());
    // m3's line did not reach bob's file before the machine stopped.
    let iq = queue_path(image.path(), "bob");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&iq)
        .unwrap()
        .set_len(before)
        .unwrap();
    let (s2, report) = FileStore::open(StoreConfig::new(image.path())).unwrap();
    // Only generation 3's records (m3 to bob, its copy to alice), not generation 1's m1.
    assert_eq!(
        (report.log.records, report.log.missing),
        (2, 1),
        "{:?}",
        report.log
    );
    assert!(report.truncated.is_empty(), "{:?}", report.truncated);
    assert_eq!(conversation(&s2, "bob", "alice").await, want);
    s2.shutdown().await;
    assert!(logs(image.path()).is_empty());

    // A clean stop leaves neither logs nor a spare.
    s.shutdown().await;
    assert!(logs(d).is_empty(), "{:?}", logs(d));
    let (s3, report) = FileStore::open(StoreConfig::new(d)).unwrap();
    assert_eq!(report.log.records, 0);
    assert_eq!(conversation(&s3, "bob", "alice").await, want);
    s3.shutdown().await;
}

#[tokio::test]
async fn without_the_log_nothing_is_written_to_wal() {
    let live = TempDir::new().unwrap();
    let (s, _) = FileStore::open(StoreConfig {
        commit_log: false,
        ..StoreConfig::new(live.path())
    })
    .unwrap();
    send(&s, "alice", "bob", "m1").await;
    assert!(!live.path().join("wal").exists());
    s.shutdown().await;
}

/// A store of one shard on `dir`.
fn one_shard(dir: &Path) -> FileStore {
    FileStore::open(StoreConfig {
        shards: 1,
        ..StoreConfig::new(dir)
    })
    .unwrap()
    .0
}

/// A one-shard store whose checkpoints are held, after alice's m1 to bob reached the files.
async fn held_store_after_m1() -> (TempDir, FileStore) {
    let live = TempDir::new().unwrap();
    fault::hold_checkpoints(live.path());
    let s = one_shard(live.path());
    send(&s, "alice", "bob", "m1").await;
    s.write_behind().await;
    (live, s)
}

#[tokio::test]
async fn a_failed_log_write_fails_its_batch_only_and_the_log_starts_a_new_generation() {
    let (live, s) = held_store_after_m1().await;
    let d = live.path();
    let len = |dir: &Path, user: &str| std::fs::metadata(queue_path(dir, user)).unwrap().len();
    let after_m1 = [("bob", len(d, "bob")), ("alice", len(d, "alice"))];
    let log = d.join("wal").join("shard-0.0000000001.log");
    assert!(log.exists());
    // The disk fills up halfway through the next commit's log write.
    fault::fail_next_write(&log, 10, std::io::ErrorKind::StorageFull);
    let item = chat("alice", "bob", "m2");
    let copy = CopyTo {
        user: "alice".into(),
        item: NewItem {
            dedupe: false,
            ..item.clone()
        },
    };
    let (a, c) = s.enqueue_append_with_copy("bob", item, copy).await.unwrap();
    assert!(matches!(a.wait().await, Err(StoreError::Io { .. })));
    let _ = c.wait().await;
    // The failed batch left nothing behind: m2 was not stored, and m2's resend is new.
    assert_eq!(send(&s, "alice", "bob", "m3").await.offset, 2);
    // Generation 1 is abandoned (checkpointed like any other, meanwhile perhaps already).
    assert!(
        logs(d).contains(&"shard-0.0000000002.log".to_string()),
        "{:?}",
        logs(d)
    );
    let want = conversation(&s, "bob", "alice").await;
    let ids: Vec<&str> = want.iter().map(|w| w.1.as_str()).collect();
    assert_eq!(ids, ["m1", "m3"]);

    // A machine crash loses what was written after m1 (generation 1 may have been checkpointed
    // meanwhile, so m1 itself is durable either way): generation 2 brings m3 back, and nothing of
    // the failed write comes back.
    let image = TempDir::new().unwrap();
    crash_image(d, image.path());
    for (user, n) in after_m1 {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(queue_path(image.path(), user))
            .unwrap();
        f.set_len(n).unwrap();
    }
    let (s2, report) = FileStore::open(StoreConfig::new(image.path())).unwrap();
    assert!(report.truncated.is_empty(), "{:?}", report.truncated);
    assert_eq!(conversation(&s2, "bob", "alice").await, want);
    assert!(!send(&s2, "alice", "bob", "m2").await.duplicate);
    s2.shutdown().await;
    s.shutdown().await;
}

#[tokio::test]
async fn a_busy_shard_moves_to_a_log_written_ahead_whose_zeros_are_not_records() {
    let live = TempDir::new().unwrap();
    let d = live.path();
    let s = one_shard(d);
    // Enough to grow the first generation past what makes a shard busy (16 KB in test builds):
    // the checkpoint thread writes a spare ahead (256 KB of zeros) and the shard moves to it.
    let written_ahead = |d: &Path| {
        walk(&d.join("wal")).into_iter().any(|p| {
            p.extension().is_some_and(|x| x == "log")
                && std::fs::metadata(&p).unwrap().len() >= 256 << 10
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    while !written_ahead(d) {
        assert!(std::time::Instant::now() < deadline, "no log written ahead");
        n += 1;
        send(&s, "alice", "bob", &format!("m{n}")).await;
    }
    fault::hold_checkpoints(d);
    // Earlier generations finish their checkpoints: their writes are durable in the files.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while logs(d).iter().filter(|n| n.ends_with(".log")).count() > 1 {
        assert!(std::time::Instant::now() < deadline, "{:?}", logs(d));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let files = |dir: &Path| {
        ["alice", "bob"]
            .into_iter()
            .flat_map(|u| [queue_path(dir, u), index_path(dir, u)])
            .collect::<Vec<_>>()
    };
    let durable: Vec<u64> = files(d)
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .collect();
    for i in 0..5 {
        send(&s, "bob", "alice", &format!("r{i}")).await;
    }
    let want = (
        conversation(&s, "bob", "alice").await,
        conversation(&s, "alice", "bob").await,
    );

    let image = TempDir::new().unwrap();
    crash_image(d, image.path());
    // The machine stops before any write since the hold reached the disk.
    for (p, len) in files(image.path()).iter().zip(durable) {
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(p) {
            f.set_len(len).unwrap();
        }
    }
    // The zeros after the last record are neither a torn line nor a problem.
    let report = check_data_dir(image.path(), false).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let (s2, report) = FileStore::open(StoreConfig::new(image.path())).unwrap();
    assert!(report.log.missing > 0, "{:?}", report.log);
    for user in ["alice", "bob"] {
        for path in [queue_path, index_path] {
            let a = std::fs::read(path(d, user)).ok();
            assert_eq!(std::fs::read(path(image.path(), user)).ok(), a, "{user}");
        }
    }
    assert_eq!(
        (
            conversation(&s2, "bob", "alice").await,
            conversation(&s2, "alice", "bob").await
        ),
        want
    );
    s2.shutdown().await;
    s.shutdown().await;
    assert!(logs(d).is_empty(), "{:?}", logs(d));
}

#[tokio::test]
async fn a_user_file_that_cannot_be_written_keeps_its_lines_waiting_and_logged() {
    let (live, s) = held_store_after_m1().await;
    let d = live.path();
    let qp = queue_path(d, "bob");
    let before = std::fs::read(&qp).unwrap();
    // The disk fills up: bob's file takes 7 bytes of the next write, then fails.
    fault::fail_writes(&qp, 7, std::io::ErrorKind::StorageFull);
    // The commit is the log's: m2 is stored and acknowledged.
    assert_eq!(send(&s, "alice", "bob", "m2").await.offset, 2);
    s.write_behind().await;
    assert_eq!(std::fs::read(&qp).unwrap(), before, "nothing half-written");
    // A read needs the lines in the file: it reports the error and changes nothing.
    let r = s
        .read(
            "bob",
            crate::ReadRequest {
                device: "reader".into(),
                partition: Partition::Chat,
                peer: Some("alice".into()),
                start: Some(1),
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(r, Err(StoreError::Io { .. })), "{r:?}");
    // A crash now: the log has m2.
    let image = TempDir::new().unwrap();
    crash_image(d, image.path());
    let (s2, report) = FileStore::open(StoreConfig::new(image.path())).unwrap();
    assert!(report.log.missing >= 1, "{:?}", report.log);
    let ids = |c: Vec<(u64, String, bool)>| c.into_iter().map(|x| x.1).collect::<Vec<_>>();
    assert_eq!(ids(conversation(&s2, "bob", "alice").await), ["m1", "m2"]);
    s2.shutdown().await;
    // Room again: the waiting lines land and reads work.
    fault::clear(&qp);
    assert_eq!(ids(conversation(&s, "bob", "alice").await), ["m1", "m2"]);
    s.shutdown().await;
    let (s3, report) = FileStore::open(StoreConfig::new(d)).unwrap();
    assert_eq!(report.log.records, 0);
    assert_eq!(ids(conversation(&s3, "bob", "alice").await), ["m1", "m2"]);
    s3.shutdown().await;
}

#[tokio::test]
async fn a_user_whose_lines_cannot_be_written_stays_cached_and_keeps_its_offsets() {
    let live = TempDir::new().unwrap();
    let d = live.path();
    // One cached user: every other user's message evicts bob.
    let s = FileStore::open(StoreConfig {
        shards: 1,
        cache_users: 1,
        ..StoreConfig::new(d)
    })
    .unwrap()
    .0;
    assert_eq!(send(&s, "alice", "bob", "m1").await.offset, 1);
    s.write_behind().await;
    let qp = queue_path(d, "bob");
    fault::fail_writes(&qp, 0, std::io::ErrorKind::StorageFull);
    assert_eq!(send(&s, "alice", "bob", "m2").await.offset, 2);
    // Carol's message would evict bob, whose m2 is not in his file: he stays.
    send(&s, "alice", "carol", "c1").await;
    assert_eq!(send(&s, "alice", "bob", "m3").await.offset, 3);
    fault::clear(&qp);
    let ids = |c: Vec<(u64, String, bool)>| c.into_iter().map(|x| x.1).collect::<Vec<_>>();
    assert_eq!(
        ids(conversation(&s, "bob", "alice").await),
        ["m1", "m2", "m3"]
    );
    s.shutdown().await;
    let (s2, _) = FileStore::open(StoreConfig::new(d)).unwrap();
    let offsets = |c: Vec<(u64, String, bool)>| c.into_iter().map(|x| x.0).collect::<Vec<_>>();
    assert_eq!(offsets(conversation(&s2, "bob", "alice").await), [1, 2, 3]);
    s2.shutdown().await;
}

#[tokio::test]
async fn a_user_reloaded_while_its_lines_cannot_be_written_waits_for_them() {
    let (live, s) = held_store_after_m1().await;
    let d = live.path();
    let qp = queue_path(d, "bob");
    fault::fail_writes(&qp, 0, std::io::ErrorKind::StorageFull);
    assert_eq!(send(&s, "alice", "bob", "m2").await.offset, 2);
    // The log write of m3's batch fails too: bob's memory is dropped, his m2 still not in his
    // file.
    let log = d.join("wal").join("shard-0.0000000001.log");
    fault::fail_next_write(&log, 10, std::io::ErrorKind::StorageFull);
    let r = s
        .enqueue_append("bob", chat("alice", "bob", "m3"))
        .await
        .unwrap()
        .wait()
        .await;
    assert!(matches!(r, Err(StoreError::Io { .. })), "{r:?}");
    // Reloading bob from a file without m2 would give m4 offset 2: it is refused instead.
    let r = s.enqueue_append("bob", chat("alice", "bob", "m4")).await;
    let refused = match r {
        Ok(p) => matches!(p.wait().await, Err(StoreError::Io { .. })),
        Err(e) => matches!(e, StoreError::Io { .. }),
    };
    assert!(refused, "bob cannot be loaded while m2 is not in his file");
    fault::clear(&qp);
    assert_eq!(send(&s, "alice", "bob", "m5").await.offset, 3);
    let ids = |c: Vec<(u64, String, bool)>| c.into_iter().map(|x| (x.0, x.1)).collect::<Vec<_>>();
    assert_eq!(
        ids(conversation(&s, "bob", "alice").await),
        [(1, "m1".into()), (2, "m2".into()), (3, "m5".into())]
    );
    s.shutdown().await;
}
