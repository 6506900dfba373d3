//! The push store on real files: each operation and rule, restarts, compaction, recovery of
//! torn and corrupt files, `bimip check`, inspection and failed writes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bimip_proto::store::{DeadLetter, EventJob, IdempotencyRecord, PushJob, PushRecord};
use bimip_proto::v1::Platform;
use tempfile::TempDir;

use super::layout::{log_path, push_dir, snapshot_path};
use super::*;
use crate::file::record::encode_line_into;
use crate::file::shard::fault;
use crate::file::{StoreConfig, check_data_dir};
use crate::{PushStore, QueueStore, Store, StoreError, TokenMatch};

fn config(dir: &Path, mode: FsyncMode) -> StoreConfig {
    StoreConfig {
        shards: 1,
        fsync: mode,
        ..StoreConfig::new(dir)
    }
}

fn open_with(dir: &Path, tuning: PushTuning) -> FileStore {
    FileStore::open_with(config(dir, FsyncMode::Batch), tuning)
        .expect("open store")
        .0
}

fn open(dir: &Path) -> FileStore {
    open_with(dir, PushTuning::default())
}

fn token(user: &str, device: &str, tok: &str) -> DeviceToken {
    DeviceToken {
        user: user.into(),
        device: device.into(),
        platform: Platform::Fcm as i32,
        token: tok.into(),
        ..Default::default()
    }
}

fn job(id: u64, version: u64) -> OutboxJob {
    OutboxJob {
        id,
        version,
        created_at: 1,
        due_at: 2,
        job: Some(Job::Push(PushJob {
            user: "ann".into(),
            device: "phone".into(),
            message_id: format!("m{id}.{version}"),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn versions(jobs: &[OutboxJob]) -> Vec<(u64, u64)> {
    jobs.iter().map(|j| (j.id, j.version)).collect()
}

fn devices(ts: &[DeviceToken]) -> Vec<(String, String)> {
    ts.iter()
        .map(|t| (t.device.clone(), t.token.clone()))
        .collect()
}

fn pair(u: &str, d: &str) -> (String, String) {
    (u.to_string(), d.to_string())
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(push_dir(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn device_tokens_replace_move_and_survive_a_restart() {
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    assert!(!s.has_device_tokens("ann").await);
    assert!(
        s.put_device_token(token("ann", "phone", "t1"))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.put_device_token(token("ann", "laptop", "t2"))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.has_device_tokens("ann").await);
    // Ordered by device; registered_at filled in.
    let ts = s.device_tokens("ann").await.unwrap();
    assert_eq!(
        devices(&ts),
        vec![pair("laptop", "t2"), pair("phone", "t1")]
    );
    assert!(ts.iter().all(|t| t.registered_at > 0));
    // A new token for the phone replaces the old one, which is free again.
    assert!(
        s.put_device_token(token("ann", "phone", "t3"))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.put_device_token(token("ben", "pad", "t1"))
            .await
            .unwrap()
            .is_empty()
    );
    // The phone changed hands: ben registers ann's token; it leaves ann.
    let removed = s
        .put_device_token(token("ben", "phone", "t3"))
        .await
        .unwrap();
    assert_eq!(removed, vec![pair("ann", "phone")]);
    assert_eq!(
        devices(&s.device_tokens("ann").await.unwrap()),
        vec![pair("laptop", "t2")]
    );
    // The same token string on another platform is another token.
    let apns = DeviceToken {
        platform: Platform::Apns as i32,
        sandbox: true,
        locale: "de".into(),
        ..token("cy", "phone", "t2")
    };
    assert!(s.put_device_token(apns.clone()).await.unwrap().is_empty());
    // Registering the same token again on the same device removes nothing.
    assert!(
        s.put_device_token(token("ben", "phone", "t3"))
            .await
            .unwrap()
            .is_empty()
    );
    let before = (
        s.device_tokens("ann").await.unwrap(),
        s.device_tokens("ben").await.unwrap(),
        s.device_tokens("cy").await.unwrap(),
    );
    assert_eq!(before.2[0].locale, "de");
    assert!(before.2[0].sandbox);
    s.shutdown().await;
    let s = open(dir.path());
    let after = (
        s.device_tokens("ann").await.unwrap(),
        s.device_tokens("ben").await.unwrap(),
        s.device_tokens("cy").await.unwrap(),
    );
    assert_eq!(before, after);
    // The index came back too: moving t2 (FCM) from ann finds its holder.
    let removed = s
        .put_device_token(token("cy", "laptop", "t2"))
        .await
        .unwrap();
    assert_eq!(removed, vec![pair("ann", "laptop")]);
    assert!(!s.has_device_tokens("ann").await);
    s.shutdown().await;
}

#[tokio::test]
async fn remove_device_token_is_compare_and_delete_with_a_match() {
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    let t = DeviceToken {
        registered_at: 1000,
        ..token("ann", "phone", "t1")
    };
    s.put_device_token(t).await.unwrap();
    let m = |tok: &str, at| {
        Some(TokenMatch {
            token: tok.into(),
            registered_at: at,
        })
    };
    // Another token, or registered again after the push that found it dead: kept.
    assert!(
        !s.remove_device_token("ann", "phone", m("t0", 2000))
            .await
            .unwrap()
    );
    assert!(
        !s.remove_device_token("ann", "phone", m("t1", 999))
            .await
            .unwrap()
    );
    assert!(s.has_device_tokens("ann").await);
    assert!(
        s.remove_device_token("ann", "phone", m("t1", 1000))
            .await
            .unwrap()
    );
    assert!(!s.has_device_tokens("ann").await);
    assert!(!s.remove_device_token("ann", "phone", None).await.unwrap());
    s.put_device_token(token("ann", "phone", "t1"))
        .await
        .unwrap();
    assert!(s.remove_device_token("ann", "phone", None).await.unwrap());
    s.shutdown().await;
    let s = open(dir.path());
    assert!(!s.has_device_tokens("ann").await);
    s.shutdown().await;
}

#[tokio::test]
async fn input_is_validated_with_precise_errors() {
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    let invalid = |r: Result<Vec<(String, String)>, StoreError>| match r {
        Err(StoreError::Invalid(m)) => m,
        other => panic!("expected Invalid, got {other:?}"),
    };
    assert!(matches!(
        s.put_device_token(token("bad/user", "phone", "t")).await,
        Err(StoreError::InvalidUser(u)) if u == "bad/user"
    ));
    let m = invalid(s.put_device_token(token("ann", ".phone", "t")).await);
    assert!(m.contains("device id \".phone\""), "{m}");
    let m = invalid(s.put_device_token(token("ann", "phone", "")).await);
    assert!(m.contains("ann/phone") && m.contains("empty"), "{m}");
    let long = "x".repeat(MAX_TOKEN_BYTES + 1);
    let m = invalid(s.put_device_token(token("ann", "phone", &long)).await);
    assert!(m.contains("4097 bytes") && m.contains("4096"), "{m}");
    assert!(
        s.put_device_token(token("ann", "phone", &"x".repeat(MAX_TOKEN_BYTES)))
            .await
            .is_ok()
    );
    for platform in [0, 9] {
        let t = DeviceToken {
            platform,
            ..token("ann", "pad", "t")
        };
        let m = invalid(s.put_device_token(t).await);
        assert!(m.contains("platform"), "{m}");
    }
    assert!(matches!(
        s.remove_device_token("ann", "", None).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.device_tokens("").await,
        Err(StoreError::InvalidUser(_))
    ));
    assert!(matches!(
        s.mutes("a b").await,
        Err(StoreError::InvalidUser(_))
    ));
    assert!(matches!(
        s.set_mute("ann", "no/one", true).await,
        Err(StoreError::InvalidUser(_))
    ));
    assert!(matches!(
        s.set_mute("ann", "ann", true).await,
        Err(StoreError::Invalid(m)) if m.contains("itself")
    ));
    let empty = OutboxJob {
        id: 5,
        ..Default::default()
    };
    assert!(matches!(
        s.put_jobs(vec![job(1, 1), empty]).await,
        Err(StoreError::Invalid(m)) if m.contains("job 5")
    ));
    // Nothing of a refused batch is stored.
    assert!(s.jobs().await.unwrap().is_empty());
    assert!(matches!(
        s.put_idempotency(IdempotencyRecord::default()).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.idempotency("").await,
        Err(StoreError::Invalid(_))
    ));
    // Nothing invalid reached the files: they read back cleanly.
    s.shutdown().await;
    let report = check_data_dir(dir.path(), false).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test]
async fn mutes_set_unset_and_survive_a_restart() {
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    assert!(s.set_mute("ann", "ben", true).await.unwrap());
    assert!(!s.set_mute("ann", "ben", true).await.unwrap(), "no change");
    assert!(s.set_mute("ann", "al", true).await.unwrap());
    assert!(s.is_muted("ann", "ben").await);
    assert!(!s.is_muted("ben", "ann").await);
    let m = s.mutes("ann").await.unwrap();
    assert_eq!(
        m.iter().map(|m| m.other.as_str()).collect::<Vec<_>>(),
        vec!["al", "ben"]
    );
    assert!(m.iter().all(|m| m.user == "ann" && m.since > 0));
    assert!(s.set_mute("ann", "al", false).await.unwrap());
    assert!(!s.set_mute("ann", "al", false).await.unwrap());
    s.shutdown().await;
    let s = open(dir.path());
    assert_eq!(s.mutes("ann").await.unwrap(), vec![m[1].clone()]);
    assert!(s.mutes("ben").await.unwrap().is_empty());
    s.shutdown().await;
}

#[tokio::test]
async fn jobs_keep_the_highest_version_and_removals_stay_removed() {
    let dir = TempDir::new().unwrap();
    let clock = Arc::new(AtomicI64::new(1_000_000));
    let tuning = || PushTuning {
        tombstone_ttl: Duration::from_secs(60),
        clock: Clock::manual(clock.clone()),
        ..PushTuning::default()
    };
    let s = open_with(dir.path(), tuning());
    s.put_jobs(vec![job(3, 1), job(1, 2), job(2, 1)])
        .await
        .unwrap();
    s.put_jobs(vec![job(1, 1)]).await.unwrap();
    assert_eq!(
        versions(&s.jobs().await.unwrap()),
        vec![(1, 2), (2, 1), (3, 1)]
    );
    // Not newer: kept. At the stored version: removed.
    s.remove_jobs(vec![(1, 1), (2, 1)]).await.unwrap();
    assert_eq!(versions(&s.jobs().await.unwrap()), vec![(1, 2), (3, 1)]);
    // A late put of the removed version does not bring it back; a newer one does.
    s.put_jobs(vec![job(2, 1)]).await.unwrap();
    s.remove_jobs(vec![(9, 4)]).await.unwrap();
    s.put_jobs(vec![job(9, 3)]).await.unwrap();
    assert_eq!(versions(&s.jobs().await.unwrap()), vec![(1, 2), (3, 1)]);
    // The job's content is stored whole.
    let j = &s.jobs().await.unwrap()[0];
    assert_eq!(j, &job(1, 2));
    s.shutdown().await;

    // The tombstones come back from the log, and through a compaction within their TTL.
    let s = open_with(dir.path(), tuning());
    s.put_jobs(vec![job(2, 1), job(9, 4)]).await.unwrap();
    s.compact_push().await.unwrap();
    s.put_jobs(vec![job(2, 1), job(9, 4)]).await.unwrap();
    assert_eq!(versions(&s.jobs().await.unwrap()), vec![(1, 2), (3, 1)]);
    s.shutdown().await;

    // Once older than the TTL, a compaction forgets them (and only then may a stale put of
    // that version be taken again).
    let s = open_with(dir.path(), tuning());
    clock.fetch_add(61_000, Ordering::Relaxed);
    s.compact_push().await.unwrap();
    assert_eq!(s.inner.push.counts().tombstones, 0);
    s.put_jobs(vec![job(2, 1)]).await.unwrap();
    s.shutdown().await;
    let s = open_with(dir.path(), tuning());
    assert_eq!(
        versions(&s.jobs().await.unwrap()),
        vec![(1, 2), (2, 1), (3, 1)]
    );
    s.shutdown().await;
}

#[tokio::test]
async fn dead_letters_newest_first_capped_and_kept() {
    let dir = TempDir::new().unwrap();
    let s = FileStore::open(config(dir.path(), FsyncMode::Never))
        .unwrap()
        .0;
    let total = crate::push::MAX_DEAD_LETTERS + 5;
    let mut waits = Vec::new();
    for i in 0..total {
        let s = s.clone();
        waits.push(tokio::spawn(async move {
            s.add_dead_letter(DeadLetter {
                job: Some(job(i as u64, 1)),
                at: i as i64,
                reason: "max_attempts".into(),
                provider: "fcm".into(),
            })
            .await
        }));
        // Keep the order of `at` the order of the log.
        if i % 64 == 63 {
            for w in waits.drain(..) {
                w.await.unwrap().unwrap();
            }
        }
    }
    for w in waits.drain(..) {
        w.await.unwrap().unwrap();
    }
    let check = |d: Vec<DeadLetter>, n: usize| {
        assert_eq!(d.len(), n);
        assert_eq!(d[0].at, (total - 1) as i64);
        assert!(d.windows(2).all(|w| w[0].at == w[1].at + 1));
    };
    check(s.dead_letters(3).await.unwrap(), 3);
    check(
        s.dead_letters(usize::MAX).await.unwrap(),
        crate::push::MAX_DEAD_LETTERS,
    );
    s.shutdown().await;
    let s = FileStore::open(config(dir.path(), FsyncMode::Never))
        .unwrap()
        .0;
    check(
        s.dead_letters(usize::MAX).await.unwrap(),
        crate::push::MAX_DEAD_LETTERS,
    );
    s.compact_push().await.unwrap();
    s.shutdown().await;
    let s = FileStore::open(config(dir.path(), FsyncMode::Never))
        .unwrap()
        .0;
    let all = s.dead_letters(usize::MAX).await.unwrap();
    check(all.clone(), crate::push::MAX_DEAD_LETTERS);
    assert_eq!(all[0].job, Some(job((total - 1) as u64, 1)));
    s.shutdown().await;
}

#[tokio::test]
async fn idempotency_records_expire_and_are_dropped() {
    let dir = TempDir::new().unwrap();
    let clock = Arc::new(AtomicI64::new(1_000_000));
    let tuning = || PushTuning {
        clock: Clock::manual(clock.clone()),
        ..PushTuning::default()
    };
    let rec = |key: &str, expires_at| IdempotencyRecord {
        key: key.into(),
        request_hash: vec![1u8; 32].into(),
        status: 201,
        response: b"{\"id\":1}".to_vec().into(),
        expires_at,
    };
    let s = open_with(dir.path(), tuning());
    s.put_idempotency(rec("a", 1_000_500)).await.unwrap();
    s.put_idempotency(rec("b", 2_000_000)).await.unwrap();
    s.put_idempotency(rec("gone", 999_999)).await.unwrap();
    assert_eq!(s.idempotency("a").await.unwrap(), Some(rec("a", 1_000_500)));
    assert_eq!(s.idempotency("gone").await.unwrap(), None);
    assert_eq!(s.idempotency("nope").await.unwrap(), None);
    // Replacing an answer.
    s.put_idempotency(rec("b", 2_000_001)).await.unwrap();
    assert_eq!(
        s.idempotency("b").await.unwrap().unwrap().expires_at,
        2_000_001
    );
    clock.store(1_000_501, Ordering::Relaxed);
    assert_eq!(s.idempotency("a").await.unwrap(), None, "expired");
    s.shutdown().await;
    // Expired records are not read back, and a snapshot leaves them out.
    let s = open_with(dir.path(), tuning());
    assert_eq!(s.idempotency("a").await.unwrap(), None);
    assert_eq!(s.inner.push.counts().idempotency, 1);
    s.compact_push().await.unwrap();
    s.shutdown().await;
    let snap = std::fs::read(snapshot_path(&push_dir(dir.path()), 2)).unwrap();
    let lines: Vec<PushRecord> = crate::file::record::decode_all::<PushRecord>(&snap)
        .into_iter()
        .map(|l| l.result.unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    clock.store(2_000_002, Ordering::Relaxed);
    let s = open_with(dir.path(), tuning());
    assert_eq!(s.idempotency("b").await.unwrap(), None);
    assert_eq!(s.inner.push.counts().idempotency, 0);
    s.shutdown().await;
}

#[tokio::test]
async fn last_push_time_reaches_disk_at_shutdown_and_with_snapshots() {
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    s.put_device_token(token("ann", "phone", "t"))
        .await
        .unwrap();
    s.note_pushed("ann", "phone", 5000).await;
    s.note_pushed("ann", "phone", 4000).await; // never backwards
    s.note_pushed("ann", "nope", 4000).await; // no such device: ignored
    s.note_pushed("bad/user", "x", 1).await;
    let last = |s: &FileStore| {
        let s = s.clone();
        async move { s.device_tokens("ann").await.unwrap()[0].last_push_at }
    };
    assert_eq!(last(&s).await, 5000);
    s.shutdown().await;
    let s = open(dir.path());
    assert_eq!(last(&s).await, 5000, "written at shutdown");
    // Memory only until then: a crash loses it ...
    s.note_pushed("ann", "phone", 6000).await;
    s.crash_push().await;
    let s = open(dir.path());
    assert_eq!(last(&s).await, 5000);
    // ... unless a snapshot took it.
    s.note_pushed("ann", "phone", 7000).await;
    s.compact_push().await.unwrap();
    s.crash_push().await;
    let s = open(dir.path());
    assert_eq!(last(&s).await, 7000);
    // Registering the same token again keeps it; a new token starts afresh.
    s.put_device_token(token("ann", "phone", "t"))
        .await
        .unwrap();
    assert_eq!(last(&s).await, 7000);
    s.put_device_token(token("ann", "phone", "t2"))
        .await
        .unwrap();
    assert_eq!(last(&s).await, 0);
    s.shutdown().await;
}

/// Stores a few records and stops cleanly; returns the log's path.
async fn some_records(dir: &Path) -> PathBuf {
    let s = open(dir);
    s.put_device_token(token("ann", "phone", "t1"))
        .await
        .unwrap();
    s.set_mute("ann", "ben", true).await.unwrap();
    s.put_jobs(vec![job(1, 1)]).await.unwrap();
    s.put_device_token(token("ben", "phone", "t2"))
        .await
        .unwrap();
    s.shutdown().await;
    log_path(&push_dir(dir), 1)
}

#[tokio::test]
async fn a_torn_last_line_is_cut_at_every_position() {
    let dir = TempDir::new().unwrap();
    let log = some_records(dir.path()).await;
    let good = std::fs::read(&log).unwrap();
    let mut extra = Vec::new();
    encode_line_into(
        &PushRecord {
            change: Some(Change::PutJob(job(2, 1))),
        },
        &mut extra,
    );
    for cut in 1..extra.len() {
        let mut data = good.clone();
        data.extend_from_slice(&extra[..cut]);
        std::fs::write(&log, &data).unwrap();
        let (s, report) = FileStore::open(config(dir.path(), FsyncMode::Batch)).unwrap();
        assert_eq!(report.truncated.len(), 1, "cut at {cut}");
        assert_eq!(report.truncated[0].0, log);
        assert_eq!(report.truncated[0].1, 5);
        assert_eq!(versions(&s.jobs().await.unwrap()), vec![(1, 1)]);
        s.shutdown().await;
        assert_eq!(std::fs::read(&log).unwrap(), good);
    }
    // A complete last line is kept.
    let mut data = good.clone();
    data.extend_from_slice(&extra);
    std::fs::write(&log, &data).unwrap();
    let (s, report) = FileStore::open(config(dir.path(), FsyncMode::Batch)).unwrap();
    assert!(report.truncated.is_empty());
    assert_eq!(versions(&s.jobs().await.unwrap()), vec![(1, 1), (2, 1)]);
    s.shutdown().await;
}

#[tokio::test]
async fn a_corrupt_middle_line_refuses_the_start_and_repair_drops_it() {
    let dir = TempDir::new().unwrap();
    let log = some_records(dir.path()).await;
    let data = std::fs::read(&log).unwrap();
    // Line 3 (the job) gets a flipped character.
    let starts: Vec<usize> = std::iter::once(0)
        .chain(
            data.iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1),
        )
        .collect();
    let mut bad = data.clone();
    bad[starts[2] + 5] ^= 0x01;
    std::fs::write(&log, &bad).unwrap();
    match FileStore::open(config(dir.path(), FsyncMode::Batch)) {
        Err(StoreError::Corrupt { path, line, .. }) => {
            assert_eq!(path, log);
            assert_eq!(line, 3);
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("expected Corrupt, the store opened"),
    }
    assert_eq!(
        std::fs::read(&log).unwrap(),
        bad,
        "nothing changed without repair"
    );
    let (s, report) = FileStore::open(StoreConfig {
        repair: true,
        ..config(dir.path(), FsyncMode::Batch)
    })
    .unwrap();
    assert_eq!(report.repaired.len(), 1);
    assert_eq!(
        (report.repaired[0].0.clone(), report.repaired[0].1),
        (log.clone(), 3)
    );
    assert!(
        s.jobs().await.unwrap().is_empty(),
        "the corrupt job is gone"
    );
    assert!(
        s.has_device_tokens("ben").await,
        "the line after it is kept"
    );
    assert!(s.is_muted("ann", "ben").await);
    s.shutdown().await;
    assert!(
        names(dir.path())
            .iter()
            .any(|n| n.starts_with("log-1.dat.corrupt-")),
        "{:?}",
        names(dir.path())
    );
    let (s, report) = FileStore::open(config(dir.path(), FsyncMode::Batch)).unwrap();
    assert!(report.repaired.is_empty() && report.truncated.is_empty());
    s.shutdown().await;
}

/// Only the newest log can have been cut short by a crash: a torn end of an older log (or of a
/// snapshot) is corruption.
#[tokio::test]
async fn a_torn_end_of_a_log_that_is_not_the_newest_refuses_the_start() {
    let dir = TempDir::new().unwrap();
    let pdir = push_dir(dir.path());
    let s = open(dir.path());
    s.put_jobs(vec![job(1, 1), job(2, 1)]).await.unwrap();
    fault::fail_rename(&snapshot_path(&pdir, 2));
    assert!(s.compact_push().await.is_err());
    fault::clear(&snapshot_path(&pdir, 2));
    s.put_jobs(vec![job(3, 1)]).await.unwrap();
    s.shutdown().await;
    let log1 = log_path(&pdir, 1);
    let data = std::fs::read(&log1).unwrap();
    std::fs::write(&log1, &data[..data.len() - 10]).unwrap();
    match FileStore::open(config(dir.path(), FsyncMode::Batch)) {
        Err(StoreError::Corrupt { path, line, reason }) => {
            // Log 1: job 1, job 2 (torn).
            assert_eq!((path, line), (log1.clone(), 2));
            assert!(reason.contains("not the newest"), "{reason}");
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("opened with a torn older log"),
    }
    let r = check_data_dir(dir.path(), false).unwrap();
    assert_eq!(r.problems.len(), 1);
    assert_eq!(
        (r.problems[0].path.clone(), r.problems[0].line),
        (log1.clone(), 2)
    );
    let (s, report) = FileStore::open(StoreConfig {
        repair: true,
        ..config(dir.path(), FsyncMode::Batch)
    })
    .unwrap();
    assert_eq!(report.repaired.len(), 1);
    assert_eq!(versions(&s.jobs().await.unwrap()), vec![(1, 1), (3, 1)]);
    s.shutdown().await;
}

#[tokio::test]
async fn check_reports_push_problems_with_file_and_line_and_repair_fixes_them() {
    let dir = TempDir::new().unwrap();
    let log = some_records(dir.path()).await;
    let clean = check_data_dir(dir.path(), false).unwrap();
    assert!(clean.problems.is_empty());
    assert_eq!(clean.records, 4);
    // A torn tail and a bad middle line.
    let mut data = std::fs::read(&log).unwrap();
    let first_nl = data.iter().position(|b| *b == b'\n').unwrap();
    data[first_nl - 3] = b'!';
    data.extend_from_slice(b"QUJD");
    std::fs::write(&log, &data).unwrap();
    std::fs::write(push_dir(dir.path()).join("snapshot-2.dat.tmp"), b"half").unwrap();
    let r = check_data_dir(dir.path(), false).unwrap();
    let found: Vec<(PathBuf, u64)> = r
        .problems
        .iter()
        .map(|p| (p.path.clone(), p.line))
        .collect();
    assert_eq!(found, vec![(log.clone(), 1), (log.clone(), 5)]);
    assert!(r.problems[1].reason.contains("torn"), "{}", r.problems[1]);
    assert_eq!(r.notes.len(), 1);
    assert_eq!(r.records, 3);
    let r = check_data_dir(dir.path(), true).unwrap();
    assert!(r.problems.is_empty());
    assert_eq!(r.repaired.len(), 2);
    let r = check_data_dir(dir.path(), false).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert!(r.notes.is_empty(), "the start's cleanup ran: {:?}", r.notes);
    let s = open(dir.path());
    assert!(!s.has_device_tokens("ann").await);
    assert!(s.has_device_tokens("ben").await);
    s.shutdown().await;
}

/// A crash between the start of log N+1 and the rename of snapshot N+1: the start reads
/// snapshot N, log N and log N+1 (and any later logs of more such crashes).
#[tokio::test]
async fn a_crash_mid_compaction_replays_the_snapshot_and_several_logs() {
    let dir = TempDir::new().unwrap();
    let pdir = push_dir(dir.path());
    let s = open(dir.path());
    s.put_device_token(token("ann", "phone", "t1"))
        .await
        .unwrap();
    s.put_jobs(vec![job(1, 1), job(2, 1)]).await.unwrap();
    s.compact_push().await.unwrap();
    assert_eq!(names(dir.path()), vec!["log-2.dat", "snapshot-2.dat"]);
    s.put_jobs(vec![job(1, 2)]).await.unwrap();
    s.remove_jobs(vec![(2, 1)]).await.unwrap();
    // Two compactions that never reach their rename: logs 3 and 4 begin, snapshots 3 and 4
    // are never written.
    for n in [3, 4] {
        fault::fail_rename(&snapshot_path(&pdir, n));
        assert!(s.compact_push().await.is_err());
        fault::clear(&snapshot_path(&pdir, n));
        s.put_jobs(vec![job(10 + n, 1)]).await.unwrap();
        s.set_mute("ann", &format!("u{n}"), true).await.unwrap();
    }
    s.put_device_token(token("ben", "phone", "t1"))
        .await
        .unwrap();
    assert_eq!(
        names(dir.path()),
        vec!["log-2.dat", "log-3.dat", "log-4.dat", "snapshot-2.dat"]
    );
    let want = (
        versions(&s.jobs().await.unwrap()),
        s.mutes("ann").await.unwrap(),
        s.device_tokens("ben").await.unwrap(),
    );
    s.crash_push().await;
    // And a snapshot cut short before its rename, as the crash left it.
    std::fs::write(pdir.join("snapshot-5.dat.tmp"), b"partial").unwrap();
    let (s, report) = FileStore::open(config(dir.path(), FsyncMode::Batch)).unwrap();
    // Snapshot 2: ann's device and jobs 1, 2. Log 2: job 1 v2, removal of 2. Log 3: job 13,
    // a mute. Log 4: job 14, a mute, ben takes t1 (ann's removal, ben's put).
    assert_eq!(report.records, 3 + 2 + 2 + 4);
    let got = (
        versions(&s.jobs().await.unwrap()),
        s.mutes("ann").await.unwrap(),
        s.device_tokens("ben").await.unwrap(),
    );
    assert_eq!(got, want);
    assert_eq!(got.0, vec![(1, 2), (13, 1), (14, 1)]);
    assert!(!s.has_device_tokens("ann").await);
    assert!(!pdir.join("snapshot-5.dat.tmp").exists());
    // The next compaction folds it all into snapshot 5.
    s.compact_push().await.unwrap();
    assert_eq!(names(dir.path()), vec!["log-5.dat", "snapshot-5.dat"]);
    s.shutdown().await;
    let s = open(dir.path());
    assert_eq!(versions(&s.jobs().await.unwrap()), want.0);
    s.shutdown().await;
}

/// The same from hand-written files: snapshot 3 complete with log 4 begun, old files left
/// behind by a crash before their deletion.
#[tokio::test]
async fn start_reads_the_newest_snapshot_and_removes_superseded_files() {
    let dir = TempDir::new().unwrap();
    let pdir = push_dir(dir.path());
    std::fs::create_dir_all(&pdir).unwrap();
    let write = |name: &str, recs: Vec<Change>| {
        let mut buf = Vec::new();
        for c in recs {
            encode_line_into(&PushRecord { change: Some(c) }, &mut buf);
        }
        std::fs::write(pdir.join(name), buf).unwrap();
    };
    write("snapshot-2.dat", vec![Change::PutJob(job(99, 1))]);
    write("log-2.dat", vec![Change::PutJob(job(98, 1))]);
    write(
        "snapshot-3.dat",
        vec![
            Change::PutDevice(token("ann", "phone", "t1")),
            Change::PutJob(job(1, 1)),
            Change::PutJob(job(2, 1)),
        ],
    );
    write(
        "log-3.dat",
        // Fuzzy snapshot: log 3 also holds changes the snapshot already has.
        vec![Change::PutJob(job(1, 1)), Change::PutJob(job(2, 2))],
    );
    write(
        "log-4.dat",
        vec![
            Change::RemoveJob(JobRemoval { id: 1, version: 1 }),
            Change::RemoveDevice(device_key("ann", "phone")),
            Change::PutDevice(token("ben", "phone", "t1")),
        ],
    );
    let (s, report) = FileStore::open(config(dir.path(), FsyncMode::Batch)).unwrap();
    assert_eq!(report.records, 3 + 2 + 3);
    assert_eq!(versions(&s.jobs().await.unwrap()), vec![(2, 2)]);
    assert!(!s.has_device_tokens("ann").await);
    assert!(s.has_device_tokens("ben").await);
    assert_eq!(
        names(dir.path()),
        vec!["log-3.dat", "log-4.dat", "snapshot-3.dat"]
    );
    // New records go to the newest log.
    s.put_jobs(vec![job(5, 1)]).await.unwrap();
    s.shutdown().await;
    let log4 = std::fs::read(pdir.join("log-4.dat")).unwrap();
    assert_eq!(log4.iter().filter(|b| **b == b'\n').count(), 4);
}

#[tokio::test]
async fn a_missing_log_refuses_the_start_and_repair_rebuilds() {
    let dir = TempDir::new().unwrap();
    let pdir = push_dir(dir.path());
    let s = open(dir.path());
    s.put_jobs(vec![job(1, 1)]).await.unwrap();
    s.compact_push().await.unwrap();
    s.put_jobs(vec![job(2, 1)]).await.unwrap();
    s.compact_push().await.unwrap();
    s.put_jobs(vec![job(3, 1)]).await.unwrap();
    fault::fail_rename(&snapshot_path(&pdir, 4));
    assert!(s.compact_push().await.is_err());
    fault::clear(&snapshot_path(&pdir, 4));
    s.put_jobs(vec![job(4, 1)]).await.unwrap();
    s.shutdown().await;
    assert_eq!(
        names(dir.path()),
        vec!["log-3.dat", "log-4.dat", "snapshot-3.dat"]
    );
    std::fs::remove_file(log_path(&pdir, 3)).unwrap();
    match FileStore::open(config(dir.path(), FsyncMode::Batch)) {
        Err(StoreError::Corrupt { path, line, reason }) => {
            assert_eq!(path, log_path(&pdir, 3));
            assert_eq!(line, 0);
            assert!(reason.contains("missing"), "{reason}");
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("opened with a missing log"),
    }
    let r = check_data_dir(dir.path(), false).unwrap();
    assert_eq!(r.problems.len(), 1);
    assert_eq!(r.problems[0].path, log_path(&pdir, 3));
    let (s, report) = FileStore::open(StoreConfig {
        repair: true,
        ..config(dir.path(), FsyncMode::Batch)
    })
    .unwrap();
    assert_eq!(report.repaired.len(), 1);
    // Job 3 was in the lost log.
    assert_eq!(
        versions(&s.jobs().await.unwrap()),
        vec![(1, 1), (2, 1), (4, 1)]
    );
    assert_eq!(names(dir.path()), vec!["log-5.dat", "snapshot-5.dat"]);
    s.shutdown().await;
    assert!(
        check_data_dir(dir.path(), false)
            .unwrap()
            .problems
            .is_empty()
    );
}

#[tokio::test]
async fn compaction_starts_by_itself_when_the_log_grows() {
    let dir = TempDir::new().unwrap();
    let tuning = || PushTuning {
        compact_min_log_bytes: 8 << 10,
        compact_log_ratio: 2,
        ..PushTuning::default()
    };
    let s = open_with(dir.path(), tuning());
    // The same 20 jobs over and over: the live state stays small, the log grows.
    for v in 1..=60u64 {
        s.put_jobs((1..=20).map(|id| job(id, v)).collect())
            .await
            .unwrap();
        s.put_device_token(token("ann", "phone", &format!("t{v}")))
            .await
            .unwrap();
    }
    // Compactions run on their own thread; let the last one finish.
    for _ in 0..100 {
        if names(dir.path())
            .iter()
            .filter(|n| n.starts_with("log-"))
            .count()
            == 1
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let files = names(dir.path());
    assert!(
        files.iter().any(|n| n.starts_with("snapshot-")),
        "{files:?}"
    );
    let log = files
        .iter()
        .find(|n| n.starts_with("log-"))
        .unwrap()
        .clone();
    assert_ne!(log, "log-1.dat", "{files:?}");
    let size: u64 = files
        .iter()
        .map(|n| {
            std::fs::metadata(push_dir(dir.path()).join(n))
                .unwrap()
                .len()
        })
        .sum();
    assert!(size < 64 << 10, "the files stay small: {size} bytes");
    let want = s.jobs().await.unwrap();
    assert!(want.iter().all(|j| j.version == 60));
    s.shutdown().await;
    let s = open_with(dir.path(), tuning());
    assert_eq!(s.jobs().await.unwrap(), want);
    assert_eq!(s.device_tokens("ann").await.unwrap()[0].token, "t60");
    s.shutdown().await;
}

#[tokio::test]
async fn a_failed_write_is_an_error_and_memory_follows_the_disk() {
    let dir = TempDir::new().unwrap();
    let log = log_path(&push_dir(dir.path()), 1);
    let s = open(dir.path());
    s.put_jobs(vec![job(1, 1)]).await.unwrap();
    fault::fail_writes(&log, 7, std::io::ErrorKind::StorageFull);
    let r = s.put_jobs(vec![job(2, 1)]).await;
    assert!(matches!(r, Err(StoreError::Io { .. })), "{r:?}");
    let r = s.put_device_token(token("ann", "phone", "t")).await;
    assert!(r.is_err(), "{r:?}");
    // The failed changes are not in memory once the error is answered.
    assert_eq!(versions(&s.jobs().await.unwrap()), vec![(1, 1)]);
    assert!(!s.has_device_tokens("ann").await);
    fault::clear(&log);
    s.put_jobs(vec![job(3, 1)]).await.unwrap();
    assert_eq!(versions(&s.jobs().await.unwrap()), vec![(1, 1), (3, 1)]);
    s.shutdown().await;
    let (s, report) = FileStore::open(config(dir.path(), FsyncMode::Batch)).unwrap();
    assert!(report.truncated.is_empty(), "the half write was cut back");
    assert_eq!(versions(&s.jobs().await.unwrap()), vec![(1, 1), (3, 1)]);
    s.shutdown().await;
}

/// With `fsync = always` one round writes change after change; when one fails, the rest of the
/// round is refused unwritten, so memory (read back from the files) and the files agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_in_a_round_of_single_fsyncs_refuses_the_rest() {
    let dir = TempDir::new().unwrap();
    let log = log_path(&push_dir(dir.path()), 1);
    let s = FileStore::open(config(dir.path(), FsyncMode::Always))
        .unwrap()
        .0;
    s.put_jobs(vec![job(0, 1)]).await.unwrap();
    for round in 0..5u64 {
        fault::fail_next_write(&log, 3, std::io::ErrorKind::StorageFull);
        let mut waits = Vec::new();
        for i in 0..40u64 {
            let s = s.clone();
            let id = 1 + round * 100 + i;
            waits.push(tokio::spawn(async move {
                s.put_jobs(vec![job(id, 1)]).await.map(|()| id)
            }));
        }
        let mut ok = 0;
        for w in waits {
            if w.await.unwrap().is_ok() {
                ok += 1;
            }
        }
        assert!(ok < 40, "one write failed");
        let memory = s.jobs().await.unwrap();
        let on_disk = inspect_jobs(dir.path());
        assert_eq!(versions(&memory), on_disk, "round {round}: {ok} stored");
    }
    s.shutdown().await;
}

/// The jobs the push files hold, read directly.
fn inspect_jobs(data_dir: &Path) -> Vec<(u64, u64)> {
    let mut state = super::state::PushState::default();
    let layout = super::layout::Layout::scan(&push_dir(data_dir)).unwrap();
    for (n, path) in layout.files(&push_dir(data_dir)) {
        let data = std::fs::read(path).unwrap();
        for l in crate::file::record::decode_all::<PushRecord>(&data) {
            state.apply(
                l.result.unwrap().change.unwrap(),
                super::state::At { log: n, now: 0 },
            );
        }
    }
    versions(&state.jobs())
}

#[tokio::test]
async fn fsync_modes_store_the_same() {
    for mode in [FsyncMode::Always, FsyncMode::Batch, FsyncMode::Never] {
        let dir = TempDir::new().unwrap();
        let s = FileStore::open(config(dir.path(), mode)).unwrap().0;
        let mut waits = Vec::new();
        for i in 0..50u64 {
            let s = s.clone();
            waits.push(tokio::spawn(async move {
                s.put_jobs(vec![job(i, 1)]).await.unwrap();
                s.set_mute("ann", &format!("u{i}"), true).await.unwrap();
            }));
        }
        for w in waits {
            w.await.unwrap();
        }
        s.remove_jobs(vec![(7, 1)]).await.unwrap();
        s.shutdown().await;
        let s = FileStore::open(config(dir.path(), mode)).unwrap().0;
        assert_eq!(s.jobs().await.unwrap().len(), 49, "{mode:?}");
        assert_eq!(s.mutes("ann").await.unwrap().len(), 50, "{mode:?}");
        s.shutdown().await;
    }
}

#[tokio::test]
async fn changes_after_shutdown_are_refused_and_reads_still_answer() {
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    s.set_mute("ann", "ben", true).await.unwrap();
    s.shutdown().await;
    assert!(matches!(
        s.set_mute("ann", "cy", true).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        s.put_jobs(vec![job(1, 1)]).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(s.compact_push().await, Err(StoreError::Closed)));
    assert!(s.is_muted("ann", "ben").await);
}

#[tokio::test]
async fn inspect_push_user_decodes_devices_and_mutes() {
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    s.put_device_token(token("ann", "phone", "t1"))
        .await
        .unwrap();
    s.put_device_token(token("ann", "laptop", "t2"))
        .await
        .unwrap();
    s.set_mute("ann", "ben", true).await.unwrap();
    s.set_mute("cy", "ann", true).await.unwrap();
    s.compact_push().await.unwrap();
    s.put_device_token(token("ben", "pad", "t2")).await.unwrap();
    // While the server runs.
    let u = inspect_push_user(dir.path(), "ann").unwrap();
    assert_eq!(devices(&u.devices), vec![pair("phone", "t1")]);
    assert_eq!(u.mutes.len(), 1);
    assert_eq!(u.muted_by[0].user, "cy");
    assert_eq!(u.files.len(), 2);
    assert!(u.problems.is_empty());
    s.shutdown().await;
    assert!(matches!(
        inspect_push_user(dir.path(), "a/b"),
        Err(StoreError::InvalidUser(_))
    ));
    // A bad line is reported, not fatal.
    let log = log_path(&push_dir(dir.path()), 2);
    let mut data = std::fs::read(&log).unwrap();
    data.extend_from_slice(b"garbage\n");
    std::fs::write(&log, data).unwrap();
    let u = inspect_push_user(dir.path(), "ben").unwrap();
    assert_eq!(u.devices.len(), 1);
    assert_eq!(u.problems.len(), 1);
    // Log 2: ann/laptop's removal and ben's put (ben took t2), then the garbage.
    assert_eq!((u.problems[0].0.clone(), u.problems[0].1), (log, 3));
    // An empty data dir has nothing.
    let empty = TempDir::new().unwrap();
    assert!(
        inspect_push_user(empty.path(), "ann")
            .unwrap()
            .devices
            .is_empty()
    );
}

#[tokio::test]
async fn the_store_enum_forwards_push_calls() {
    let dir = TempDir::new().unwrap();
    let s = Store::File(open(dir.path()));
    s.put_device_token(token("ann", "phone", "t"))
        .await
        .unwrap();
    s.note_pushed("ann", "phone", 9).await;
    assert!(s.has_device_tokens("ann").await);
    assert_eq!(s.device_tokens("ann").await.unwrap()[0].last_push_at, 9);
    assert!(s.set_mute("ann", "ben", true).await.unwrap());
    assert!(s.is_muted("ann", "ben").await);
    assert_eq!(s.mutes("ann").await.unwrap().len(), 1);
    s.put_jobs(vec![job(1, 1)]).await.unwrap();
    s.remove_jobs(vec![(1, 1)]).await.unwrap();
    assert!(s.jobs().await.unwrap().is_empty());
    s.add_dead_letter(DeadLetter::default()).await.unwrap();
    assert_eq!(s.dead_letters(10).await.unwrap().len(), 1);
    let rec = IdempotencyRecord {
        key: "k".into(),
        expires_at: i64::MAX,
        ..Default::default()
    };
    s.put_idempotency(rec.clone()).await.unwrap();
    assert_eq!(s.idempotency("k").await.unwrap(), Some(rec));
    assert!(s.remove_device_token("ann", "phone", None).await.unwrap());
    let event = OutboxJob {
        id: 2,
        version: 1,
        job: Some(Job::Event(EventJob {
            webhook_id: "w".into(),
            r#type: "presence.changed".into(),
            body: b"{}".to_vec().into(),
        })),
        ..Default::default()
    };
    s.put_jobs(vec![event.clone()]).await.unwrap();
    assert_eq!(s.jobs().await.unwrap(), vec![event]);
    s.shutdown().await;
}

/// Job puts and removes per second with `fsync = batch`, many callers at once (run with
/// `cargo test --release -p bimip-store -- --ignored push_throughput --nocapture`).
#[test]
#[ignore]
fn push_throughput() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = TempDir::new().unwrap();
        let s = FileStore::open(config(dir.path(), FsyncMode::Batch)).unwrap().0;
        let tasks = 256u64;
        let per_task = 400u64;
        let t = std::time::Instant::now();
        let mut waits = Vec::new();
        for task in 0..tasks {
            let s = s.clone();
            waits.push(tokio::spawn(async move {
                for i in 0..per_task {
                    let id = task * per_task + i;
                    s.put_jobs(vec![job(id, 1)]).await.unwrap();
                    s.remove_jobs(vec![(id, 1)]).await.unwrap();
                }
            }));
        }
        for w in waits {
            w.await.unwrap();
        }
        let took = t.elapsed();
        let ops = tasks * per_task * 2;
        eprintln!(
            "{ops} job puts/removes by {tasks} callers in {took:?}: {:.0}/s",
            ops as f64 / took.as_secs_f64()
        );
        // Compaction of a large state: how long writers can be held up by one chunk.
        for chunk in 0..100u64 {
            let jobs: Vec<OutboxJob> = (0..1000)
                .map(|i| job(1_000_000 + chunk * 1000 + i, 1))
                .collect();
            s.put_jobs(jobs).await.unwrap();
        }
        let mut waits = Vec::new();
        for task in 0..100u64 {
            let s = s.clone();
            waits.push(tokio::spawn(async move {
                for i in 0..1000u64 {
                    let u = task * 1000 + i;
                    let t = token(&format!("user{u}"), "phone", &format!("tok{u}"));
                    s.put_device_token(t).await.unwrap();
                }
            }));
        }
        for w in waits {
            w.await.unwrap();
        }
        // Writers keep going during the compaction.
        let busy = {
            let s = s.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                let mut worst = Duration::ZERO;
                for i in 0..2000u64 {
                    let t = std::time::Instant::now();
                    s.put_jobs(vec![job(5_000_000 + i, 1)]).await.unwrap();
                    worst = worst.max(t.elapsed());
                    n += 1;
                }
                (n, worst)
            })
        };
        let t = std::time::Instant::now();
        s.compact_push().await.unwrap();
        let took = t.elapsed();
        let (n, worst) = busy.await.unwrap();
        let c = s.inner.push.shared.lock().last_compaction.unwrap();
        eprintln!(
            "compaction of 100k devices + 100k jobs (+ tombstones): {took:?}, snapshot {} bytes, {} chunks, lock held {:?} on average, {:?} at most; {n} job puts meanwhile, slowest {worst:?}",
            c.bytes,
            c.chunks,
            c.total_hold / c.chunks.max(1) as u32,
            c.longest_hold
        );
        // The same state, cloned in one piece under the lock (the alternative to chunks).
        let mut all = Vec::new();
        let held = {
            let mut g = s.inner.push.shared.lock();
            let t = std::time::Instant::now();
            let mut cur = super::state::SnapCursor::Devices(None);
            let keep = super::state::ForgetRule {
                log: 0,
                cutoff: i64::MIN,
            };
            g.state
                .snapshot_chunk(&mut cur, usize::MAX, keep, 0, &mut all);
            t.elapsed()
        };
        eprintln!(
            "one clone of all {} records under the lock instead: {held:?}",
            all.len()
        );
        drop(all);
        let t = std::time::Instant::now();
        let mut probes = 0u64;
        while t.elapsed() < Duration::from_millis(200) {
            assert!(s.has_device_tokens("user5").await);
            probes += 1;
        }
        eprintln!("has_device_tokens: {:.0}/s", probes as f64 / 0.2);
        s.shutdown().await;
        let t = std::time::Instant::now();
        let s = FileStore::open(config(dir.path(), FsyncMode::Batch)).unwrap().0;
        eprintln!("reopen: {:?}", t.elapsed());
        s.shutdown().await;
    });
}
