//! The push store against a model: random sequences of changes, restarts, crashes and
//! compactions (forced, or started by the store itself with a tiny log threshold), checking
//! every answer and the whole visible state after every step.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bimip_proto::store::{DeadLetter, IdempotencyRecord, PushJob};
use bimip_proto::v1::Platform;
use proptest::prelude::*;
use tempfile::TempDir;

use super::*;
use crate::file::StoreConfig;
use crate::{PushStore, QueueStore, TokenMatch};

const USERS: [&str; 3] = ["ann", "ben", "cy"];
const DEVICES: [&str; 2] = ["phone", "pad"];
const KEYS: [&str; 3] = ["k0", "k1", "k2"];
/// Given `registered_at` values; `None` lets the store use its clock (≥ 1_000_000 here).
const REGISTERED: [Option<i64>; 4] = [Some(100), Some(200), Some(300), None];
const MATCH_AT: [i64; 3] = [150, 250, i64::MAX];

#[derive(Debug, Clone)]
enum Op {
    PutToken {
        user: usize,
        device: usize,
        token: u8,
        apns: bool,
        registered: usize,
    },
    RemoveToken {
        user: usize,
        device: usize,
        only_if: Option<(u8, usize)>,
    },
    NotePushed {
        user: usize,
        device: usize,
        at: i64,
    },
    Mute {
        user: usize,
        other: usize,
        muted: bool,
    },
    PutJobs(Vec<(u64, u64)>),
    RemoveJobs(Vec<(u64, u64)>),
    DeadLetter,
    PutIdempotency {
        key: usize,
        /// Expiry relative to the clock (negative: already expired).
        expires_in: i64,
    },
    Advance(i64),
    Compact,
    Reopen,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    let jobs = proptest::collection::vec((0u64..6, 0u64..5), 1..4);
    prop_oneof![
        4 => (0..3usize, 0..2usize, 0u8..4, any::<bool>(), 0..4usize).prop_map(
            |(user, device, token, apns, registered)| Op::PutToken { user, device, token, apns, registered }
        ),
        2 => (0..3usize, 0..2usize, proptest::option::of((0u8..4, 0..3usize)))
            .prop_map(|(user, device, only_if)| Op::RemoveToken { user, device, only_if }),
        1 => (0..3usize, 0..2usize, 0i64..3_000_000)
            .prop_map(|(user, device, at)| Op::NotePushed { user, device, at }),
        2 => (0..3usize, 0..3usize, any::<bool>())
            .prop_map(|(user, other, muted)| Op::Mute { user, other, muted }),
        4 => jobs.clone().prop_map(Op::PutJobs),
        3 => jobs.prop_map(Op::RemoveJobs),
        1 => Just(Op::DeadLetter),
        2 => (0..3usize, -300i64..2000).prop_map(|(key, expires_in)| Op::PutIdempotency { key, expires_in }),
        2 => (0i64..1500).prop_map(Op::Advance),
        1 => Just(Op::Compact),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

fn job(id: u64, version: u64) -> OutboxJob {
    OutboxJob {
        id,
        version,
        job: Some(Job::Push(PushJob {
            user: "ann".into(),
            device: "phone".into(),
            message_id: format!("m{id}.{version}"),
            count: version as u32,
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Dev {
    platform: i32,
    token: String,
    registered_at: i64,
    /// In memory, and as far as it is known to be on disk.
    last_push_at: i64,
    durable_push_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum JobSlot {
    Live(u64),
    Removed(u64),
}

#[derive(Default)]
struct Model {
    devices: BTreeMap<(usize, usize), Dev>,
    mutes: BTreeMap<(usize, usize), i64>,
    jobs: BTreeMap<u64, JobSlot>,
    dead: Vec<i64>,
    idempotency: BTreeMap<usize, i64>,
    now: i64,
}

impl Model {
    fn put_job(&mut self, id: u64, v: u64) {
        let take = match self.jobs.get(&id) {
            Some(JobSlot::Live(old)) => *old <= v,
            Some(JobSlot::Removed(r)) => *r < v,
            None => true,
        };
        if take {
            self.jobs.insert(id, JobSlot::Live(v));
        }
    }

    fn remove_job(&mut self, id: u64, v: u64) {
        let take = match self.jobs.get(&id) {
            Some(JobSlot::Live(old)) => *old <= v,
            Some(JobSlot::Removed(r)) => *r < v,
            None => true,
        };
        if take {
            self.jobs.insert(id, JobSlot::Removed(v));
        }
    }
}

/// Whole visible state against the model.
async fn compare(s: &FileStore, m: &Model, after_crash: bool) -> Vec<((usize, usize), i64)> {
    let mut pushed = Vec::new();
    for (u, user) in USERS.iter().enumerate() {
        let got = s.device_tokens(user).await.unwrap();
        let want: Vec<(usize, &Dev)> = m
            .devices
            .iter()
            .filter(|((mu, _), _)| *mu == u)
            .map(|((_, d), dev)| (*d, dev))
            .collect();
        // Ordered by device id ("pad" < "phone").
        let mut want = want;
        want.sort_by_key(|(d, _)| DEVICES[*d]);
        assert_eq!(got.len(), want.len(), "devices of {user}");
        for (t, (d, dev)) in got.iter().zip(&want) {
            assert_eq!(t.user, *user);
            assert_eq!(t.device, DEVICES[*d]);
            assert_eq!((t.platform, &t.token), (dev.platform, &dev.token));
            assert_eq!(t.registered_at, dev.registered_at, "{user}/{}", t.device);
            if after_crash {
                // Advisory: anything between what was surely written and what memory had.
                assert!(
                    (dev.durable_push_at..=dev.last_push_at).contains(&t.last_push_at),
                    "{user}/{}: last push {} not in {}..={}",
                    t.device,
                    t.last_push_at,
                    dev.durable_push_at,
                    dev.last_push_at
                );
                pushed.push(((u, *d), t.last_push_at));
            } else {
                assert_eq!(t.last_push_at, dev.last_push_at, "{user}/{}", t.device);
            }
        }
        assert_eq!(s.has_device_tokens(user).await, !want.is_empty());
        let mutes = s.mutes(user).await.unwrap();
        let want: Vec<(String, i64)> = m
            .mutes
            .iter()
            .filter(|((mu, _), _)| *mu == u)
            .map(|((_, o), since)| (USERS[*o].to_string(), *since))
            .collect();
        let got: Vec<(String, i64)> = mutes.into_iter().map(|m| (m.other, m.since)).collect();
        assert_eq!(got, want, "mutes of {user}");
        for (o, other) in USERS.iter().enumerate() {
            assert_eq!(s.is_muted(user, other).await, m.mutes.contains_key(&(u, o)));
        }
    }
    let want: Vec<OutboxJob> = m
        .jobs
        .iter()
        .filter_map(|(id, slot)| match slot {
            JobSlot::Live(v) => Some(job(*id, *v)),
            JobSlot::Removed(_) => None,
        })
        .collect();
    assert_eq!(s.jobs().await.unwrap(), want);
    let dead: Vec<i64> = s
        .dead_letters(usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|d| d.at)
        .collect();
    let want: Vec<i64> = m.dead.iter().rev().copied().collect();
    assert_eq!(dead, want);
    for (k, key) in KEYS.iter().enumerate() {
        let got = s.idempotency(key).await.unwrap().map(|r| r.expires_at);
        let want = m.idempotency.get(&k).copied().filter(|e| *e >= m.now);
        assert_eq!(got, want, "idempotency {key}");
    }
    pushed
}

struct Case {
    mode: FsyncMode,
    /// The store compacts by itself (tiny threshold) and never forgets a tombstone; otherwise
    /// only the `Compact` step compacts, and it forgets every tombstone.
    auto: bool,
}

fn tuning(case: &Case, clock: &Arc<AtomicI64>) -> PushTuning {
    PushTuning {
        compact_min_log_bytes: if case.auto { 1024 } else { u64::MAX },
        compact_log_ratio: 1,
        tombstone_ttl: if case.auto {
            Duration::from_secs(1 << 40)
        } else {
            Duration::ZERO
        },
        clock: Clock::manual(clock.clone()),
    }
}

fn open_case(dir: &std::path::Path, case: &Case, clock: &Arc<AtomicI64>) -> FileStore {
    let cfg = StoreConfig {
        shards: 1,
        fsync: case.mode,
        ..StoreConfig::new(dir)
    };
    let (s, report) = FileStore::open_with(cfg, tuning(case, clock)).unwrap();
    // A clean stop or a crash of this process never leaves a torn line or corruption.
    assert!(report.truncated.is_empty(), "{:?}", report.truncated);
    assert!(report.repaired.is_empty(), "{:?}", report.repaired);
    s
}

async fn run(case: Case, ops: Vec<Op>) {
    let dir = TempDir::new().unwrap();
    let clock = Arc::new(AtomicI64::new(1_000_000));
    let mut s = open_case(dir.path(), &case, &clock);
    let mut m = Model {
        now: 1_000_000,
        ..Model::default()
    };
    let mut dead_count = 0i64;
    for op in ops {
        let mut after_crash = false;
        match op {
            Op::PutToken {
                user,
                device,
                token,
                apns,
                registered,
            } => {
                let platform = if apns { Platform::Apns } else { Platform::Fcm } as i32;
                let tok = format!("tok{token}");
                let t = DeviceToken {
                    user: USERS[user].into(),
                    device: DEVICES[device].into(),
                    platform,
                    token: tok.clone(),
                    registered_at: REGISTERED[registered].unwrap_or(0),
                    ..Default::default()
                };
                let removed = s.put_device_token(t).await.unwrap();
                let holder = m
                    .devices
                    .iter()
                    .find(|(k, d)| {
                        d.platform == platform && d.token == tok && **k != (user, device)
                    })
                    .map(|(k, _)| *k);
                let want: Vec<(String, String)> = holder
                    .iter()
                    .map(|(u, d)| (USERS[*u].to_string(), DEVICES[*d].to_string()))
                    .collect();
                assert_eq!(removed, want);
                if let Some(h) = holder {
                    m.devices.remove(&h);
                }
                let keep = m
                    .devices
                    .get(&(user, device))
                    .filter(|d| d.platform == platform && d.token == tok)
                    .map_or(0, |d| d.last_push_at);
                m.devices.insert(
                    (user, device),
                    Dev {
                        platform,
                        token: tok,
                        registered_at: REGISTERED[registered].unwrap_or(m.now),
                        last_push_at: keep,
                        durable_push_at: keep,
                    },
                );
            }
            Op::RemoveToken {
                user,
                device,
                only_if,
            } => {
                let only = only_if.map(|(t, a)| TokenMatch {
                    token: format!("tok{t}"),
                    registered_at: MATCH_AT[a],
                });
                let want = match (m.devices.get(&(user, device)), &only) {
                    (None, _) => false,
                    (Some(_), None) => true,
                    (Some(d), Some(o)) => d.token == o.token && d.registered_at <= o.registered_at,
                };
                let got = s
                    .remove_device_token(USERS[user], DEVICES[device], only)
                    .await
                    .unwrap();
                assert_eq!(got, want);
                if want {
                    m.devices.remove(&(user, device));
                }
            }
            Op::NotePushed { user, device, at } => {
                s.note_pushed(USERS[user], DEVICES[device], at).await;
                if let Some(d) = m.devices.get_mut(&(user, device)) {
                    d.last_push_at = d.last_push_at.max(at);
                }
            }
            Op::Mute { user, other, muted } => {
                let r = s.set_mute(USERS[user], USERS[other], muted).await;
                if user == other {
                    assert!(matches!(r, Err(StoreError::Invalid(_))));
                } else {
                    let want = m.mutes.contains_key(&(user, other)) != muted;
                    assert_eq!(r.unwrap(), want);
                    if want && muted {
                        m.mutes.insert((user, other), m.now);
                    } else if want {
                        m.mutes.remove(&(user, other));
                    }
                }
            }
            Op::PutJobs(list) => {
                s.put_jobs(list.iter().map(|(id, v)| job(*id, *v)).collect())
                    .await
                    .unwrap();
                for (id, v) in list {
                    m.put_job(id, v);
                }
            }
            Op::RemoveJobs(list) => {
                s.remove_jobs(list.clone()).await.unwrap();
                for (id, v) in list {
                    m.remove_job(id, v);
                }
            }
            Op::DeadLetter => {
                dead_count += 1;
                s.add_dead_letter(DeadLetter {
                    job: Some(job(dead_count as u64, 1)),
                    at: dead_count,
                    reason: "max_attempts".into(),
                    provider: "fcm".into(),
                })
                .await
                .unwrap();
                m.dead.push(dead_count);
            }
            Op::PutIdempotency { key, expires_in } => {
                let expires_at = m.now + expires_in;
                s.put_idempotency(IdempotencyRecord {
                    key: KEYS[key].into(),
                    status: 200,
                    expires_at,
                    ..Default::default()
                })
                .await
                .unwrap();
                if expires_at >= m.now {
                    m.idempotency.insert(key, expires_at);
                }
            }
            Op::Advance(ms) => {
                m.now += ms;
                clock.store(m.now, Ordering::Relaxed);
            }
            Op::Compact => {
                s.compact_push().await.unwrap();
                for d in m.devices.values_mut() {
                    d.durable_push_at = d.last_push_at;
                }
                if !case.auto {
                    m.jobs.retain(|_, slot| matches!(slot, JobSlot::Live(_)));
                }
            }
            Op::Reopen => {
                s.shutdown().await;
                s = open_case(dir.path(), &case, &clock);
                for d in m.devices.values_mut() {
                    d.durable_push_at = d.last_push_at;
                }
            }
            Op::Crash => {
                s.crash_push().await;
                s = open_case(dir.path(), &case, &clock);
                after_crash = true;
            }
        }
        let pushed = compare(&s, &m, after_crash).await;
        // After a crash the advisory times are what the files had.
        for (k, at) in pushed {
            if let Some(d) = m.devices.get_mut(&k) {
                d.last_push_at = at;
                d.durable_push_at = at;
            }
        }
    }
    s.shutdown().await;
    // Whatever the history, `bimip check` finds the files clean.
    let report = crate::file::check_data_dir(dir.path(), false).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

fn mode() -> impl Strategy<Value = FsyncMode> {
    prop_oneof![
        Just(FsyncMode::Always),
        Just(FsyncMode::Batch),
        Just(FsyncMode::Never)
    ]
}

/// 48 cases by default; `PROPTEST_CASES` for a longer run.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]
    #[test]
    fn push_store_matches_model(
        mode in mode(),
        auto in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(Case { mode, auto }, ops));
    }
}
