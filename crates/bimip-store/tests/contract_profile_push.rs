//! The profile and push contract ([`ProfileStore`], [`PushStore`]) through the public API, run
//! against both backends: every scenario once on the file store (temporary folder) and once on
//! Redis (its own `redis-server` per test). Redis-only parts (revocations, job id blocks,
//! `check_redis`, `inspect_redis_user`, outages) follow, then model-based property tests of the
//! push store and of profile relations on both backends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use bimip_proto::v1::{Platform, Status};
use bimip_store::push::{
    DeadLetter, DeviceToken, EventJob, IdempotencyRecord, Job, OutboxJob, PushJob,
};
use bimip_store::redis::test_server::RedisServer;
use bimip_store::{
    FileStore, FsyncMode, PresenceUpdate, Profile, ProfileStore, PushStore, QueueStore,
    RedisConfig, RedisStore, Store, StoreConfig, StoreError, TokenMatch,
};
use tempfile::TempDir;

// ---- the two backends ----

enum Backing {
    File(TempDir),
    Redis(RedisServer),
}

/// A store and what keeps it, able to stop and come back with the same data.
struct Env {
    store: Store,
    backing: Backing,
}

fn file_config(dir: &std::path::Path) -> StoreConfig {
    StoreConfig {
        shards: 2,
        fsync: FsyncMode::Never,
        ..StoreConfig::new(dir)
    }
}

fn redis_config(server: &RedisServer) -> RedisConfig {
    RedisConfig {
        response_timeout: Duration::from_secs(2),
        ..RedisConfig::new(server.url())
    }
}

async fn connect(server: &RedisServer) -> RedisStore {
    RedisStore::connect(redis_config(server)).await.unwrap()
}

impl Env {
    async fn file() -> Env {
        let dir = TempDir::new().unwrap();
        let (s, _) = FileStore::open(file_config(dir.path())).unwrap();
        Env {
            store: Store::File(s),
            backing: Backing::File(dir),
        }
    }

    async fn redis() -> Env {
        let server = RedisServer::start().expect("redis-server");
        let s = connect(&server).await;
        Env {
            store: Store::Redis(s),
            backing: Backing::Redis(server),
        }
    }

    fn redis_store(&self) -> &RedisStore {
        match &self.store {
            Store::Redis(s) => s,
            Store::File(_) => panic!("not a redis store"),
        }
    }

    fn server(&mut self) -> &mut RedisServer {
        match &mut self.backing {
            Backing::Redis(s) => s,
            Backing::File(_) => panic!("not a redis store"),
        }
    }

    /// File: a clean shutdown and a new start. Redis: redis-server is killed (SIGKILL) and
    /// started again from its append-only file, and a new store connects.
    async fn reopen(&mut self) {
        match &mut self.backing {
            Backing::File(dir) => {
                self.store.shutdown().await;
                let (s, _) = FileStore::open(file_config(dir.path())).unwrap();
                self.store = Store::File(s);
            }
            Backing::Redis(server) => {
                let cfg = match &self.store {
                    Store::Redis(s) => s.config().clone(),
                    Store::File(_) => unreachable!(),
                };
                server.restart().unwrap();
                self.store = Store::Redis(RedisStore::connect(cfg).await.unwrap());
            }
        }
    }

    async fn close(self) {
        self.store.shutdown().await;
    }
}

/// One test per backend for a scenario `async fn(&mut Env)`.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod file_store {
            $(
                #[tokio::test]
                async fn $name() {
                    let mut env = super::Env::file().await;
                    super::$name(&mut env).await;
                    env.close().await;
                }
            )*
        }
        mod redis_store {
            $(
                #[tokio::test]
                async fn $name() {
                    let mut env = super::Env::redis().await;
                    super::$name(&mut env).await;
                    env.close().await;
                }
            )*
        }
    };
}

contract!(
    contacts_add_replace_remove_touch_both_sides,
    one_way_contacts_and_watchers,
    blocks_have_two_sides,
    intent_invisibility_and_last_seen,
    invalid_input_is_refused_before_anything_is_written,
    device_tokens_replace_and_move_between_users,
    remove_device_token_is_compare_and_delete,
    last_push_time_only_moves_forward,
    mutes_set_and_unset,
    jobs_keep_the_highest_version_and_removals_stay_removed,
    dead_letters_newest_first_and_capped,
    idempotency_records_expire,
    everything_survives_a_restart,
    concurrent_cross_user_changes_keep_both_sides_in_step,
    concurrent_registrations_of_one_token_leave_one_holder,
);

// ---- helpers ----

fn set(users: &[&str]) -> BTreeSet<String> {
    users.iter().map(|s| s.to_string()).collect()
}

fn entries(list: &[(&str, bool)]) -> Vec<(String, bool)> {
    list.iter().map(|(u, f)| (u.to_string(), *f)).collect()
}

fn intent(status: Status, details: &str) -> PresenceUpdate {
    PresenceUpdate {
        intent: Some((status, details.into())),
        ..Default::default()
    }
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

fn pair(u: &str, d: &str) -> (String, String) {
    (u.to_string(), d.to_string())
}

fn devices(ts: &[DeviceToken]) -> Vec<(String, String)> {
    ts.iter()
        .map(|t| (t.device.clone(), t.token.clone()))
        .collect()
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

fn now_ms() -> i64 {
    bimip_proto::now_ms()
}

/// `A ∈ B.listed_by ⇔ B ∈ A.contacts` (same flag), `A ∈ B.blocked_by ⇔ B ∈ A.blocks`.
async fn check_invariants(s: &Store, users: &[&str]) -> Vec<Profile> {
    let mut ps = Vec::new();
    for u in users {
        ps.push(s.profile(u).await.unwrap());
    }
    for (i, a) in users.iter().enumerate() {
        for (j, b) in users.iter().enumerate() {
            let (pa, pb) = (&ps[i], &ps[j]);
            assert_eq!(pa.contacts.get(*b), pb.listed_by.get(*a), "{a} lists {b}");
            assert_eq!(
                pa.blocks.contains(*b),
                pb.blocked_by.contains(*a),
                "{a} blocks {b}"
            );
            assert_eq!(
                pa.watchers().contains(*b),
                pb.watching().contains(*a),
                "{b} watches {a}"
            );
        }
        assert!(!ps[i].contacts.contains_key(*a) && !ps[i].blocks.contains(*a));
    }
    ps
}

// ---- profile scenarios ----

async fn contacts_add_replace_remove_touch_both_sides(env: &mut Env) {
    let s = &env.store;
    let added = s
        .put_contacts(
            "alice",
            entries(&[("bob", false), ("carol", false), ("dave", true)]),
            false,
        )
        .await
        .unwrap();
    assert_eq!(added, 3);
    assert_eq!(
        s.profile("dave").await.unwrap().listed_by.get("alice"),
        Some(&true)
    );
    // Replace: bob stays (flag changed), carol and dave go, erin comes.
    let changed = s
        .put_contacts("alice", entries(&[("bob", true), ("erin", false)]), true)
        .await
        .unwrap();
    assert_eq!(changed, 2);
    let alice = s.profile("alice").await.unwrap();
    assert_eq!(
        alice.contacts.keys().cloned().collect::<BTreeSet<_>>(),
        set(&["bob", "erin"])
    );
    assert_eq!(alice.contacts.get("bob"), Some(&true));
    assert_eq!(
        s.profile("bob").await.unwrap().listed_by.get("alice"),
        Some(&true)
    );
    assert!(s.profile("carol").await.unwrap().listed_by.is_empty());
    assert!(s.profile("dave").await.unwrap().listed_by.is_empty());
    assert_eq!(
        s.profile("erin").await.unwrap().listed_by.get("alice"),
        Some(&false)
    );
    // Without replace nothing is removed; duplicates count once, the last flag wins.
    let changed = s
        .put_contacts(
            "alice",
            entries(&[("carol", true), ("carol", false)]),
            false,
        )
        .await
        .unwrap();
    assert_eq!(changed, 1);
    let alice = s.profile("alice").await.unwrap();
    assert_eq!(alice.contacts.len(), 3);
    assert_eq!(alice.contacts.get("carol"), Some(&false));
    // The same again changes nothing.
    assert_eq!(
        s.put_contacts("alice", entries(&[("carol", false)]), false)
            .await
            .unwrap(),
        0
    );
    // Replace with nothing empties the list, on both sides.
    assert_eq!(s.put_contacts("alice", vec![], true).await.unwrap(), 0);
    assert!(s.profile("alice").await.unwrap().contacts.is_empty());
    for u in ["bob", "carol", "erin"] {
        assert!(s.profile(u).await.unwrap().listed_by.is_empty(), "{u}");
    }
    s.put_contacts("alice", entries(&[("bob", false)]), false)
        .await
        .unwrap();
    assert!(s.remove_contact("alice", "bob").await.unwrap());
    assert!(!s.remove_contact("alice", "bob").await.unwrap());
    assert!(s.profile("alice").await.unwrap().contacts.is_empty());
    assert!(s.profile("bob").await.unwrap().listed_by.is_empty());
    check_invariants(s, &["alice", "bob", "carol", "dave", "erin"]).await;
}

async fn one_way_contacts_and_watchers(env: &mut Env) {
    let s = &env.store;
    // alice lists bob mutually, carol one way (alice sees carol, carol does not see alice).
    s.put_contacts("alice", entries(&[("bob", false), ("carol", true)]), false)
        .await
        .unwrap();
    let alice = s.profile("alice").await.unwrap();
    assert_eq!(alice.watching(), set(&["bob", "carol"]));
    assert_eq!(alice.watchers(), set(&["bob"]));
    let carol = s.profile("carol").await.unwrap();
    assert_eq!(carol.listed_by.get("alice"), Some(&true));
    assert!(carol.watchers().contains("alice"));
    assert!(!carol.watching().contains("alice"));
    let bob = s.profile("bob").await.unwrap();
    assert!(bob.watching().contains("alice") && bob.watchers().contains("alice"));
    // Turning the flag changes the other side too.
    s.put_contacts("alice", entries(&[("carol", false)]), false)
        .await
        .unwrap();
    assert_eq!(
        s.profile("carol").await.unwrap().listed_by.get("alice"),
        Some(&false)
    );
    check_invariants(s, &["alice", "bob", "carol"]).await;
}

async fn blocks_have_two_sides(env: &mut Env) {
    let s = &env.store;
    s.put_contacts("alice", entries(&[("bob", false)]), false)
        .await
        .unwrap();
    assert!(s.set_block("alice", "bob", true).await.unwrap());
    assert!(
        !s.set_block("alice", "bob", true).await.unwrap(),
        "no change"
    );
    let (alice, bob) = (
        s.profile("alice").await.unwrap(),
        s.profile("bob").await.unwrap(),
    );
    assert_eq!(alice.blocks, set(&["bob"]));
    assert_eq!(bob.blocked_by, set(&["alice"]));
    assert!(!alice.watchers().contains("bob") && !alice.may_see("bob"));
    assert!(!bob.watching().contains("alice"));
    assert!(matches!(
        s.set_block("alice", "alice", true).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(s.set_block("alice", "bob", false).await.unwrap());
    assert!(!s.set_block("alice", "bob", false).await.unwrap());
    assert!(s.profile("bob").await.unwrap().blocked_by.is_empty());
    assert!(s.profile("alice").await.unwrap().may_see("bob"));
    check_invariants(s, &["alice", "bob"]).await;
}

async fn intent_invisibility_and_last_seen(env: &mut Env) {
    let s = &env.store;
    assert_eq!(s.profile("alice").await.unwrap(), Profile::default());
    for st in [Status::Away, Status::Busy, Status::Dnd] {
        let before = now_ms();
        let p = s.set_presence("alice", intent(st, "later")).await.unwrap();
        assert_eq!((p.intent, p.details.as_str()), (st, "later"));
        assert!(p.has_intent() && p.intent_at >= before && p.intent_at <= now_ms());
    }
    for clear in [Status::Online, Status::Unspecified] {
        s.set_presence("alice", intent(Status::Away, "x"))
            .await
            .unwrap();
        let p = s
            .set_presence("alice", intent(clear, "ignored"))
            .await
            .unwrap();
        assert_eq!(p.intent, Status::Unspecified);
        assert_eq!(p.details, "");
        assert!(p.intent_at > 0);
    }
    for bad in [
        Status::Offline,
        Status::Typing,
        Status::Recording,
        Status::Resume,
    ] {
        assert!(matches!(
            s.set_presence("alice", intent(bad, "")).await,
            Err(StoreError::Invalid(_))
        ));
    }
    s.set_presence("alice", intent(Status::Dnd, "focus"))
        .await
        .unwrap();
    let on = PresenceUpdate {
        invisible: Some(true),
        ..Default::default()
    };
    let p = s.set_presence("alice", on.clone()).await.unwrap();
    let since = p.invisible_since;
    assert!(p.invisible && since > 0);
    tokio::time::sleep(Duration::from_millis(5)).await;
    // On again keeps the original time; other fields are untouched.
    let p = s.set_presence("alice", on).await.unwrap();
    assert_eq!(p.invisible_since, since);
    assert_eq!((p.intent, p.details.as_str()), (Status::Dnd, "focus"));
    let off = PresenceUpdate {
        invisible: Some(false),
        ..Default::default()
    };
    let p = s.set_presence("alice", off).await.unwrap();
    assert!(!p.invisible);
    assert_eq!(p.invisible_since, 0);
    // Last seen only: visible at once.
    let seen = PresenceUpdate {
        last_seen: Some(42),
        ..Default::default()
    };
    let p = s.set_presence("alice", seen).await.unwrap();
    assert_eq!(p.last_seen, 42);
    assert_eq!(s.profile("alice").await.unwrap().last_seen, 42);
    // The answer carries the relations too.
    s.put_contacts("alice", entries(&[("bob", true)]), false)
        .await
        .unwrap();
    let p = s
        .set_presence("alice", PresenceUpdate::default())
        .await
        .unwrap();
    assert_eq!(p.contacts.get("bob"), Some(&true));
    assert_eq!(p, s.profile("alice").await.unwrap());
    // Everything set at once.
    let p = s
        .set_presence(
            "bob",
            PresenceUpdate {
                intent: Some((Status::Busy, "call".into())),
                invisible: Some(true),
                last_seen: Some(7),
            },
        )
        .await
        .unwrap();
    assert_eq!((p.intent, p.details.as_str()), (Status::Busy, "call"));
    assert!(p.invisible && p.invisible_since > 0 && p.last_seen == 7);
    assert_eq!(p.listed_by.get("alice"), Some(&true));
}

async fn invalid_input_is_refused_before_anything_is_written(env: &mut Env) {
    let s = &env.store;
    // Profiles.
    assert!(matches!(
        s.put_contacts("alice", entries(&[("bob", false), ("alice", false)]), false)
            .await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.put_contacts("alice", entries(&[("bob", false), ("../x", false)]), false)
            .await,
        Err(StoreError::InvalidUser(u)) if u == "../x"
    ));
    assert!(matches!(
        s.put_contacts("no/pe", vec![], false).await,
        Err(StoreError::InvalidUser(_))
    ));
    assert!(matches!(
        s.remove_contact("alice", "").await,
        Err(StoreError::InvalidUser(_))
    ));
    assert!(matches!(
        s.set_block("a b", "alice", true).await,
        Err(StoreError::InvalidUser(_))
    ));
    assert!(matches!(
        s.profile("a b").await,
        Err(StoreError::InvalidUser(_))
    ));
    assert!(matches!(
        s.set_presence("x:y", PresenceUpdate::default()).await,
        Err(StoreError::InvalidUser(_))
    ));
    assert!(s.profile("bob").await.unwrap().listed_by.is_empty());
    assert!(s.profile("alice").await.unwrap().contacts.is_empty());
    // Push.
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
    let long = "x".repeat(bimip_store::MAX_TOKEN_BYTES + 1);
    let m = invalid(s.put_device_token(token("ann", "phone", &long)).await);
    assert!(m.contains("4097 bytes"), "{m}");
    for platform in [0, 9] {
        let t = DeviceToken {
            platform,
            ..token("ann", "pad", "t")
        };
        let m = invalid(s.put_device_token(t).await);
        assert!(m.contains("platform"), "{m}");
    }
    assert!(!s.has_device_tokens("ann").await);
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
    assert!(
        s.jobs().await.unwrap().is_empty(),
        "nothing of a refused batch"
    );
    assert!(matches!(
        s.put_idempotency(IdempotencyRecord::default()).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.idempotency("").await,
        Err(StoreError::Invalid(_))
    ));
    let long_key = "k".repeat(bimip_store::MAX_IDEMPOTENCY_KEY_BYTES + 1);
    assert!(matches!(
        s.idempotency(&long_key).await,
        Err(StoreError::Invalid(_))
    ));
}

// ---- push scenarios ----

async fn device_tokens_replace_and_move_between_users(env: &mut Env) {
    let s = &env.store;
    assert!(!s.has_device_tokens("ann").await);
    assert!(s.device_tokens("ann").await.unwrap().is_empty());
    for (d, t) in [("phone", "t1"), ("laptop", "t2")] {
        assert!(
            s.put_device_token(token("ann", d, t))
                .await
                .unwrap()
                .is_empty()
        );
    }
    assert!(s.has_device_tokens("ann").await);
    let ts = s.device_tokens("ann").await.unwrap();
    assert_eq!(
        devices(&ts),
        vec![pair("laptop", "t2"), pair("phone", "t1")],
        "ordered by device"
    );
    assert!(ts.iter().all(|t| t.registered_at > 0 && t.user == "ann"));
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
    // Within one user: another device takes the token.
    let removed = s
        .put_device_token(token("ben", "watch", "t1"))
        .await
        .unwrap();
    assert_eq!(removed, vec![pair("ben", "pad")]);
    // The same token string on another platform is another token.
    let apns = DeviceToken {
        platform: Platform::Apns as i32,
        sandbox: true,
        locale: "de".into(),
        registered_at: 1234,
        ..token("cy", "phone", "t2")
    };
    assert!(s.put_device_token(apns.clone()).await.unwrap().is_empty());
    assert_eq!(s.device_tokens("cy").await.unwrap(), vec![apns]);
    // Registering the same token again on the same device removes nothing.
    assert!(
        s.put_device_token(token("ben", "phone", "t3"))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        devices(&s.device_tokens("ben").await.unwrap()),
        vec![pair("phone", "t3"), pair("watch", "t1")]
    );
    // Moving t2 (FCM) from ann finds its holder.
    let removed = s
        .put_device_token(token("cy", "laptop", "t2"))
        .await
        .unwrap();
    assert_eq!(removed, vec![pair("ann", "laptop")]);
    assert!(!s.has_device_tokens("ann").await);
    // The replaced token t1 of ben's pad is free: taking it removes nothing.
    assert_eq!(
        s.put_device_token(token("ann", "phone", "t1"))
            .await
            .unwrap(),
        vec![pair("ben", "watch")]
    );
}

async fn remove_device_token_is_compare_and_delete(env: &mut Env) {
    let s = &env.store;
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
    assert!(!s.remove_device_token("zed", "phone", None).await.unwrap());
    s.put_device_token(token("ann", "phone", "t1"))
        .await
        .unwrap();
    assert!(s.remove_device_token("ann", "phone", None).await.unwrap());
    // The index forgot it: another user takes t1 without removing anything.
    assert!(
        s.put_device_token(token("ben", "phone", "t1"))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn last_push_time_only_moves_forward(env: &mut Env) {
    let s = &env.store;
    s.put_device_token(token("ann", "phone", "t"))
        .await
        .unwrap();
    s.note_pushed("ann", "phone", 5000).await;
    s.note_pushed("ann", "phone", 4000).await; // never backwards
    s.note_pushed("ann", "nope", 4000).await; // no such device: ignored
    s.note_pushed("bad/user", "x", 1).await; // invalid: ignored
    let last = || async { s.device_tokens("ann").await.unwrap()[0].last_push_at };
    assert_eq!(last().await, 5000);
    assert_eq!(s.device_tokens("ann").await.unwrap().len(), 1);
    // Registering the same token again keeps it; a new token starts afresh.
    s.put_device_token(token("ann", "phone", "t"))
        .await
        .unwrap();
    assert_eq!(last().await, 5000);
    s.put_device_token(token("ann", "phone", "t2"))
        .await
        .unwrap();
    assert_eq!(last().await, 0);
}

async fn mutes_set_and_unset(env: &mut Env) {
    let s = &env.store;
    let before = now_ms();
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
    assert!(
        m.iter()
            .all(|m| m.user == "ann" && m.since >= before && m.since <= now_ms())
    );
    assert!(s.set_mute("ann", "al", false).await.unwrap());
    assert!(!s.set_mute("ann", "al", false).await.unwrap());
    assert!(!s.set_mute("cy", "al", false).await.unwrap());
    assert_eq!(s.mutes("ann").await.unwrap(), vec![m[1].clone()]);
    assert!(s.mutes("ben").await.unwrap().is_empty());
}

async fn jobs_keep_the_highest_version_and_removals_stay_removed(env: &mut Env) {
    let s = &env.store;
    assert!(s.jobs().await.unwrap().is_empty());
    s.put_jobs(vec![job(3, 1), job(1, 2), job(2, 1)])
        .await
        .unwrap();
    s.put_jobs(vec![job(1, 1)]).await.unwrap();
    assert_eq!(
        versions(&s.jobs().await.unwrap()),
        vec![(1, 2), (2, 1), (3, 1)]
    );
    // The same version replaces the content.
    let mut j = job(3, 1);
    j.attempts = 4;
    j.last_error = "timeout".into();
    s.put_jobs(vec![j.clone()]).await.unwrap();
    assert_eq!(s.jobs().await.unwrap()[2], j);
    // Not newer: kept. At the stored version: removed.
    s.remove_jobs(vec![(1, 1), (2, 1)]).await.unwrap();
    assert_eq!(versions(&s.jobs().await.unwrap()), vec![(1, 2), (3, 1)]);
    // A late put of the removed version does not bring it back; a newer one does.
    s.put_jobs(vec![job(2, 1)]).await.unwrap();
    // A removal that arrives before its job: the put is ignored.
    s.remove_jobs(vec![(9, 4)]).await.unwrap();
    s.put_jobs(vec![job(9, 3), job(9, 4)]).await.unwrap();
    assert_eq!(versions(&s.jobs().await.unwrap()), vec![(1, 2), (3, 1)]);
    s.put_jobs(vec![job(9, 5)]).await.unwrap();
    assert_eq!(
        versions(&s.jobs().await.unwrap()),
        vec![(1, 2), (3, 1), (9, 5)]
    );
    // An older removal than the tombstone changes nothing; a newer one moves it.
    s.remove_jobs(vec![(2, 0), (2, 3)]).await.unwrap();
    s.put_jobs(vec![job(2, 3)]).await.unwrap();
    assert!(!versions(&s.jobs().await.unwrap()).contains(&(2, 3)));
    // Removing a newer job with an older version keeps it; removing all of them empties it.
    s.remove_jobs(vec![(9, 4)]).await.unwrap();
    assert_eq!(s.jobs().await.unwrap().len(), 3);
    s.remove_jobs(vec![(1, 2), (3, 1), (9, 5)]).await.unwrap();
    assert!(s.jobs().await.unwrap().is_empty());
    // Large ids and versions compare exactly (beyond 2^53).
    let big = u64::MAX - 1;
    s.put_jobs(vec![job(big, big)]).await.unwrap();
    s.put_jobs(vec![job(big, big - 1)]).await.unwrap();
    assert_eq!(versions(&s.jobs().await.unwrap()), vec![(big, big)]);
    s.remove_jobs(vec![(big, big - 1)]).await.unwrap();
    assert_eq!(s.jobs().await.unwrap().len(), 1);
    s.remove_jobs(vec![(big, big)]).await.unwrap();
    s.put_jobs(vec![job(big, big)]).await.unwrap();
    assert!(s.jobs().await.unwrap().is_empty());
    s.put_jobs(vec![job(big, u64::MAX)]).await.unwrap();
    assert_eq!(versions(&s.jobs().await.unwrap()), vec![(big, u64::MAX)]);
    // Event jobs are stored whole too.
    let ev = OutboxJob {
        id: 20,
        version: 1,
        job: Some(Job::Event(EventJob {
            webhook_id: "w".into(),
            r#type: "presence.changed".into(),
            body: b"{}".to_vec().into(),
        })),
        ..Default::default()
    };
    s.put_jobs(vec![ev.clone()]).await.unwrap();
    assert!(s.jobs().await.unwrap().contains(&ev));
    s.put_jobs(vec![]).await.unwrap();
    s.remove_jobs(vec![]).await.unwrap();
}

async fn dead_letters_newest_first_and_capped(env: &mut Env) {
    let s = &env.store;
    assert!(s.dead_letters(10).await.unwrap().is_empty());
    let max = bimip_store::push::MAX_DEAD_LETTERS;
    let dead = |at: i64, id: u64| DeadLetter {
        job: Some(job(id, 1)),
        at,
        reason: "max_attempts".into(),
        provider: "fcm".into(),
    };
    // `max` letters in groups of 100 sent at once (`at` = group), then 5 one by one: the
    // oldest 5 (of group 0) are dropped, the newest come first.
    let groups = (max / 100) as i64;
    for g in 0..groups {
        let mut tasks = Vec::new();
        for i in 0..100u64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.add_dead_letter(dead(g, g as u64 * 100 + i)).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    }
    for i in 0..5 {
        s.add_dead_letter(dead(1_000_000 + i, 1_000_000 + i as u64))
            .await
            .unwrap();
    }
    let all = s.dead_letters(usize::MAX).await.unwrap();
    assert_eq!(all.len(), max);
    let at: Vec<i64> = all.iter().map(|d| d.at).collect();
    assert_eq!(
        &at[..5],
        &[1_000_004, 1_000_003, 1_000_002, 1_000_001, 1_000_000]
    );
    assert!(at.windows(2).all(|w| w[0] >= w[1]), "newest first");
    assert_eq!(at.iter().filter(|a| **a == 0).count(), 95);
    assert_eq!(at.iter().filter(|a| **a == groups - 1).count(), 100);
    assert_eq!(all[0].job, Some(job(1_000_004, 1)));
    assert_eq!(all[0].reason, "max_attempts");
    let three = s.dead_letters(3).await.unwrap();
    assert_eq!(three, all[..3].to_vec());
    assert!(s.dead_letters(0).await.unwrap().is_empty());
}

async fn idempotency_records_expire(env: &mut Env) {
    let s = &env.store;
    let rec = |key: &str, expires_at| IdempotencyRecord {
        key: key.into(),
        request_hash: vec![1u8; 32].into(),
        status: 201,
        response: b"{\"id\":1}".to_vec().into(),
        expires_at,
    };
    let now = now_ms();
    s.put_idempotency(rec("soon", now + 300)).await.unwrap();
    s.put_idempotency(rec("later", now + 600_000))
        .await
        .unwrap();
    s.put_idempotency(rec("gone", now - 1)).await.unwrap();
    s.put_idempotency(rec("forever", i64::MAX)).await.unwrap();
    assert_eq!(
        s.idempotency("soon").await.unwrap(),
        Some(rec("soon", now + 300))
    );
    assert_eq!(s.idempotency("gone").await.unwrap(), None);
    assert_eq!(s.idempotency("nope").await.unwrap(), None);
    assert!(s.idempotency("forever").await.unwrap().is_some());
    // Replacing an answer; an already expired one does not replace it.
    s.put_idempotency(rec("later", now + 600_001))
        .await
        .unwrap();
    s.put_idempotency(rec("later", now - 5)).await.unwrap();
    assert_eq!(
        s.idempotency("later").await.unwrap().unwrap().expires_at,
        now + 600_001
    );
    // Keys are taken as they are (any bytes but empty).
    let odd = "a:{b}*?[x] \n\u{e9}";
    s.put_idempotency(rec(odd, now + 600_000)).await.unwrap();
    assert_eq!(s.idempotency(odd).await.unwrap().unwrap().key, odd);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(s.idempotency("soon").await.unwrap(), None, "expired");
    assert!(s.idempotency("later").await.unwrap().is_some());
}

async fn everything_survives_a_restart(env: &mut Env) {
    {
        let s = &env.store;
        s.put_contacts("alice", entries(&[("bob", true), ("carol", false)]), false)
            .await
            .unwrap();
        s.set_block("bob", "carol", true).await.unwrap();
        s.set_presence(
            "alice",
            PresenceUpdate {
                intent: Some((Status::Dnd, "focus".into())),
                invisible: Some(true),
                last_seen: Some(99),
            },
        )
        .await
        .unwrap();
        // A last-seen-only change right before the stop.
        s.set_presence(
            "bob",
            PresenceUpdate {
                last_seen: Some(77),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        s.put_device_token(token("ann", "phone", "t1"))
            .await
            .unwrap();
        s.note_pushed("ann", "phone", 5000).await;
        s.set_mute("ann", "ben", true).await.unwrap();
        s.put_jobs(vec![job(1, 1), job(2, 2)]).await.unwrap();
        s.remove_jobs(vec![(2, 2)]).await.unwrap();
        s.add_dead_letter(DeadLetter {
            at: 3,
            ..Default::default()
        })
        .await
        .unwrap();
        s.put_idempotency(IdempotencyRecord {
            key: "k".into(),
            status: 200,
            expires_at: now_ms() + 600_000,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let users = ["alice", "bob", "carol", "ann", "ben"];
    let mut before = Vec::new();
    for u in users {
        before.push((
            env.store.profile(u).await.unwrap(),
            env.store.device_tokens(u).await.unwrap(),
            env.store.mutes(u).await.unwrap(),
        ));
    }
    let jobs = env.store.jobs().await.unwrap();
    let dead = env.store.dead_letters(10).await.unwrap();
    let idem = env.store.idempotency("k").await.unwrap();
    env.reopen().await;
    let s = &env.store;
    for (u, b) in users.iter().zip(&before) {
        let after = (
            s.profile(u).await.unwrap(),
            s.device_tokens(u).await.unwrap(),
            s.mutes(u).await.unwrap(),
        );
        assert_eq!(&after, b, "{u}");
    }
    assert_eq!(before[1].0.last_seen, 77);
    assert_eq!(before[3].1[0].last_push_at, 5000);
    assert_eq!(s.jobs().await.unwrap(), jobs);
    assert_eq!(versions(&jobs), vec![(1, 1)]);
    // The tombstone came back too.
    s.put_jobs(vec![job(2, 2)]).await.unwrap();
    assert_eq!(versions(&s.jobs().await.unwrap()), vec![(1, 1)]);
    assert_eq!(s.dead_letters(10).await.unwrap(), dead);
    assert!(idem.is_some());
    assert_eq!(s.idempotency("k").await.unwrap(), idem);
    // The token index came back: ben takes ann's token.
    assert_eq!(
        s.put_device_token(token("ben", "pad", "t1")).await.unwrap(),
        vec![pair("ann", "phone")]
    );
    check_invariants(s, &users).await;
}

async fn concurrent_cross_user_changes_keep_both_sides_in_step(env: &mut Env) {
    let users = ["u0", "u1", "u2", "u3", "u4"];
    let mut tasks = Vec::new();
    for i in 0..60usize {
        let s = env.store.clone();
        tasks.push(tokio::spawn(async move {
            let a = users[i % 5];
            let b = users[(i * 3 + 1) % 5];
            if a == b {
                return;
            }
            match i % 4 {
                0 => drop(
                    s.put_contacts(a, entries(&[(b, i % 3 == 0)]), i % 2 == 0)
                        .await
                        .unwrap(),
                ),
                1 => drop(s.remove_contact(a, b).await.unwrap()),
                2 => drop(s.set_block(a, b, i % 3 != 0).await.unwrap()),
                _ => drop(
                    s.put_contacts(b, entries(&[(a, false)]), true)
                        .await
                        .unwrap(),
                ),
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    check_invariants(&env.store, &users).await;
    if let Store::Redis(r) = &env.store {
        let report = bimip_store::check_redis(r).await.unwrap();
        assert!(report.is_clean(), "{report}");
    }
}

async fn concurrent_registrations_of_one_token_leave_one_holder(env: &mut Env) {
    let users: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
    let mut tasks = Vec::new();
    for u in &users {
        let s = env.store.clone();
        let u = u.clone();
        tasks.push(tokio::spawn(async move {
            s.put_device_token(token(&u, "phone", "shared"))
                .await
                .unwrap()
        }));
    }
    let mut removed = Vec::new();
    for t in tasks {
        removed.extend(t.await.unwrap());
    }
    let mut holders = Vec::new();
    for u in &users {
        let ts = env.store.device_tokens(u).await.unwrap();
        assert!(ts.len() <= 1);
        assert_eq!(env.store.has_device_tokens(u).await, ts.len() == 1);
        if !ts.is_empty() {
            holders.push(u.clone());
        }
    }
    assert_eq!(holders.len(), 1, "one holder: {holders:?}");
    // Every registration but the first took the token from the one before.
    assert_eq!(removed.len(), users.len() - 1, "{removed:?}");
    // Each lost it once, after it had it; the holder never lost it.
    let lost: BTreeSet<&String> = removed.iter().map(|(u, _)| u).collect();
    assert_eq!(lost.len(), users.len() - 1);
    assert!(!lost.contains(&holders[0]));
    if let Store::Redis(r) = &env.store {
        let report = bimip_store::check_redis(r).await.unwrap();
        assert!(report.is_clean(), "{report}");
    }
}

// ---- Redis only ----

async fn redis_env() -> Env {
    Env::redis().await
}

#[tokio::test]
async fn redis_revocations_keep_the_latest() {
    let env = redis_env().await;
    let s = env.redis_store();
    assert!(s.revocations().await.unwrap().is_empty());
    s.put_revocation("ann", 100).await.unwrap();
    s.put_revocation("ann", 50).await.unwrap();
    s.put_revocation("ben", -5).await.unwrap();
    s.put_revocation("ben", -7).await.unwrap();
    s.put_revocation("cy", 9_007_199_254_740_993).await.unwrap();
    s.put_revocation("cy", 9_007_199_254_740_992).await.unwrap();
    let r = s.revocations().await.unwrap();
    assert_eq!(r.get("ann"), Some(&100));
    assert_eq!(r.get("ben"), Some(&-5));
    assert_eq!(r.get("cy"), Some(&9_007_199_254_740_993));
    s.put_revocation("ann", 200).await.unwrap();
    assert_eq!(s.revocations().await.unwrap().get("ann"), Some(&200));
    assert!(matches!(
        s.put_revocation("a/b", 1).await,
        Err(StoreError::InvalidUser(_))
    ));
    // Another node (another connection) sees them.
    let other = connect(match &env.backing {
        Backing::Redis(s) => s,
        Backing::File(_) => unreachable!(),
    })
    .await;
    assert_eq!(other.revocations().await.unwrap().len(), 3);
    env.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_job_id_blocks_never_overlap_across_nodes() {
    let env = redis_env().await;
    let server = match &env.backing {
        Backing::Redis(s) => s,
        Backing::File(_) => unreachable!(),
    };
    let nodes = [connect(server).await, connect(server).await];
    assert!(matches!(
        nodes[0].reserve_job_ids(0).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(nodes[0].reserve_job_ids(1).await.unwrap(), 1);
    let mut tasks = Vec::new();
    for i in 0..40u64 {
        let s = nodes[(i % 2) as usize].clone();
        tasks.push(tokio::spawn(async move {
            let n = 1 + i % 7;
            (s.reserve_job_ids(n).await.unwrap(), n)
        }));
    }
    let mut ids = BTreeSet::new();
    for t in tasks {
        let (first, n) = t.await.unwrap();
        assert!(first >= 2);
        for id in first..first + n {
            assert!(ids.insert(id), "id {id} handed out twice");
        }
    }
    // The blocks are dense: every id from 2 on was handed out once.
    let max = *ids.iter().max().unwrap();
    assert_eq!(ids.len() as u64, max - 1);
    env.close().await;
}

/// Runs a raw command on the test server.
async fn raw<T: redis::FromRedisValue>(s: &RedisStore, args: &[&[u8]]) -> T {
    let mut cmd = redis::cmd(std::str::from_utf8(args[0]).unwrap());
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut s.connection()).await.unwrap()
}

#[tokio::test]
async fn redis_check_is_clean_after_normal_use_and_names_planted_problems() {
    let env = redis_env().await;
    let s = env.redis_store();
    let st = &env.store;
    st.put_contacts("ann", entries(&[("ben", false), ("cy", true)]), false)
        .await
        .unwrap();
    st.set_block("ben", "cy", true).await.unwrap();
    st.set_presence("ann", intent(Status::Away, "lunch"))
        .await
        .unwrap();
    st.put_device_token(token("ann", "phone", "t1"))
        .await
        .unwrap();
    st.put_device_token(token("ben", "phone", "t1"))
        .await
        .unwrap();
    st.put_device_token(token("ben", "pad", "t2"))
        .await
        .unwrap();
    st.set_mute("ann", "ben", true).await.unwrap();
    st.put_jobs(vec![job(1, 1), job(2, 1)]).await.unwrap();
    st.remove_jobs(vec![(2, 1), (3, 1)]).await.unwrap();
    st.add_dead_letter(DeadLetter::default()).await.unwrap();
    st.put_idempotency(IdempotencyRecord {
        key: "k*1".into(),
        expires_at: now_ms() + 60_000,
        ..Default::default()
    })
    .await
    .unwrap();
    s.put_revocation("ann", 5).await.unwrap();
    s.reserve_job_ids(10).await.unwrap();
    let k = s.keys().clone();
    // A queue as the queue code keeps it: counter and stream agree.
    let _: () = raw(s, &[b"SET", k.seq("ann").as_bytes(), b"2"]).await;
    for id in ["1-0", "2-0"] {
        let _: String = raw(
            s,
            &[
                b"XADD",
                k.queue("ann").as_bytes(),
                id.as_bytes(),
                b"f",
                b"v",
            ],
        )
        .await;
    }
    let report = bimip_store::check_redis(s).await.unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.users, 3);
    assert!(report.records >= 15, "{report}");

    // Now break things, one of each kind.
    let _: redis::Value = raw(
        s,
        &[
            b"HSET",
            k.tokens("ben").as_bytes(),
            b"pad",
            b"\xff\xfe not protobuf",
        ],
    )
    .await;
    let _: redis::Value = raw(s, &[b"HSET", k.contacts("ann").as_bytes(), b"dan", b"0"]).await;
    let _: redis::Value = raw(s, &[b"HSET", k.profile("ann").as_bytes(), b"intent", b"99"]).await;
    let _: redis::Value = raw(
        s,
        &[
            b"HSET",
            k.profile("ann").as_bytes(),
            b"last_seen",
            b"yesterday",
        ],
    )
    .await;
    let _: redis::Value = raw(
        s,
        &[b"HSET", k.token_index().as_bytes(), b"1\nt9", b"cy\nphone"],
    )
    .await;
    let _: redis::Value = raw(s, &[b"SET", k.seq("ann").as_bytes(), b"1"]).await;
    let _: redis::Value = raw(s, &[b"HSET", k.jobs().as_bytes(), b"7", b"garbage\xff"]).await;
    let _: redis::Value = raw(s, &[b"SADD", k.blocked_by("cy").as_bytes(), b"ann"]).await;
    let _: redis::Value = raw(s, &[b"HSET", k.mutes("ann").as_bytes(), b"cy", b"soon"]).await;
    let _: redis::Value = raw(s, &[b"LPUSH", k.dead_letters().as_bytes(), b"\xff\xff\xff"]).await;
    let _: redis::Value = raw(s, &[b"SADD", k.users().as_bytes(), b"bad user"]).await;
    let _: redis::Value = raw(s, &[b"SET", k.profile("dan").as_bytes(), b"a string"]).await;
    let _: redis::Value = raw(s, &[b"SADD", k.users().as_bytes(), b"dan"]).await;
    let report = bimip_store::check_redis(s).await.unwrap();
    let text = report.to_string();
    let has = |key: &str, field: Option<&str>, words: &str| {
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.key == key && p.field.as_deref() == field && p.reason.contains(words)),
            "no problem {key} {field:?} {words:?} in\n{text}"
        );
    };
    has(&k.tokens("ben"), Some("pad"), "does not decode");
    has(&k.contacts("ann"), Some("dan"), "without its other side");
    has(&k.profile("ann"), Some("intent"), "not an intent");
    has(&k.profile("ann"), Some("last_seen"), "not an integer");
    has(&k.token_index(), Some("1\nt9"), "does not hold this token");
    // ben's pad no longer decodes, so its index entry points nowhere.
    has(&k.token_index(), Some("1\nt2"), "does not hold this token");
    has(&k.seq("ann"), None, "behind the last item");
    has(&k.jobs(), Some("7"), "does not decode");
    has(&k.blocked_by("cy"), Some("ann"), "without its other side");
    has(&k.mutes("ann"), Some("cy"), "not a time");
    has(&k.dead_letters(), Some("0"), "does not decode");
    has(&k.users(), Some("bad user"), "not a valid user id");
    has(&k.profile("dan"), None, "cannot be read");
    assert_eq!(report.problems.len(), 13, "{text}");
    assert!(text.contains("problem: "), "{text}");
    env.close().await;
}

#[tokio::test]
async fn redis_inspect_shows_a_users_keys_raw_and_decoded() {
    let env = redis_env().await;
    let s = env.redis_store();
    let st = &env.store;
    st.put_contacts("ann", entries(&[("ben", true)]), false)
        .await
        .unwrap();
    st.put_device_token(token("ann", "phone", "t1"))
        .await
        .unwrap();
    st.set_mute("ann", "cy", true).await.unwrap();
    s.put_revocation("ann", 12).await.unwrap();
    let k = s.keys().clone();
    let _: () = raw(s, &[b"SET", k.seq("ann").as_bytes(), b"5"]).await;
    let _: String = raw(
        s,
        &[
            b"XADD",
            k.queue("ann").as_bytes(),
            b"4-0",
            b"from",
            b"ben",
            b"p",
            b"\xff\x00",
        ],
    )
    .await;
    let _: String = raw(
        s,
        &[b"XADD", k.queue("ann").as_bytes(), b"5-0", b"from", b"cy"],
    )
    .await;
    let _: i64 = raw(s, &[b"HSET", k.cursors("ann").as_bytes(), b"phone|0", b"3"]).await;
    let d = bimip_store::inspect_redis_user(s, "ann").await.unwrap();
    assert!(d.listed);
    let p = d.profile.clone().unwrap();
    assert_eq!(p.contacts.get("ben"), Some(&true));
    assert_eq!(devices(&d.tokens), vec![pair("phone", "t1")]);
    assert_eq!(d.mutes.len(), 1);
    assert_eq!(d.mutes[0].other, "cy");
    assert_eq!(d.seq, Some(bimip_store::RawValue::Text("5".into())));
    assert_eq!(d.queue.len(), 2);
    assert_eq!(d.queue[0].id, "4-0");
    assert_eq!(d.queue[0].offset, Some(4));
    assert_eq!(
        d.queue[0].fields,
        vec![
            (
                "from".to_string(),
                bimip_store::RawValue::Text("ben".into())
            ),
            ("p".to_string(), bimip_store::RawValue::Bytes(vec![0xff, 0])),
        ]
    );
    assert_eq!(
        d.cursors,
        vec![(
            "phone|0".to_string(),
            bimip_store::RawValue::Text("3".into())
        )]
    );
    assert_eq!(d.revoked_before, Some(12));
    assert!(d.problems.is_empty());
    let text = d.to_string();
    assert!(
        text.contains("4-0") && text.contains("<2 bytes> ff00"),
        "{text}"
    );
    // A user never seen: empty, not an error.
    let d = bimip_store::inspect_redis_user(s, "nobody").await.unwrap();
    assert!(!d.listed && d.profile == Some(Profile::default()) && d.queue.is_empty());
    assert!(matches!(
        bimip_store::inspect_redis_user(s, "no body").await,
        Err(StoreError::InvalidUser(_))
    ));
    // A profile field that does not decode is shown as a problem.
    let _: i64 = raw(
        s,
        &[b"HSET", k.profile("ann").as_bytes(), b"invisible", b"2"],
    )
    .await;
    let d = bimip_store::inspect_redis_user(s, "ann").await.unwrap();
    assert!(d.profile.is_none());
    assert_eq!(d.problems.len(), 1);
    assert_eq!(d.problems[0].field.as_deref(), Some("invisible"));
    // ... and the store refuses the profile with an error that names it.
    match st.profile("ann").await {
        Err(StoreError::Internal(m)) => assert!(m.contains("invisible"), "{m}"),
        other => panic!("expected Internal, got {other:?}"),
    }
    env.close().await;
}

#[tokio::test]
async fn redis_outage_is_unavailable_and_the_store_recovers() {
    let mut env = redis_env().await;
    let st = env.store.clone();
    st.put_contacts("ann", entries(&[("ben", false)]), false)
        .await
        .unwrap();
    st.put_device_token(token("ann", "phone", "t1"))
        .await
        .unwrap();
    env.server().kill();
    let unavailable = |r: Result<(), StoreError>| {
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    };
    unavailable(st.profile("ann").await.map(drop));
    unavailable(st.put_contacts("ann", vec![], true).await.map(drop));
    unavailable(st.set_block("ann", "ben", true).await.map(drop));
    unavailable(
        st.set_presence("ann", PresenceUpdate::default())
            .await
            .map(drop),
    );
    unavailable(
        st.put_device_token(token("ann", "pad", "t2"))
            .await
            .map(drop),
    );
    unavailable(st.device_tokens("ann").await.map(drop));
    unavailable(st.put_jobs(vec![job(1, 1)]).await);
    unavailable(st.add_dead_letter(DeadLetter::default()).await);
    unavailable(st.idempotency("k").await.map(drop));
    unavailable(env.redis_store().revocations().await.map(drop));
    unavailable(env.redis_store().reserve_job_ids(1).await.map(drop));
    // The advisory and boolean calls answer without failing.
    st.note_pushed("ann", "phone", 1).await;
    assert!(st.has_device_tokens("ann").await, "unknown: assume tokens");
    assert!(!st.is_muted("ann", "ben").await);
    // Back: the same store reconnects by itself and the data is there.
    env.server().restart().unwrap();
    let mut got = None;
    for _ in 0..100 {
        match st.profile("ann").await {
            Ok(p) => {
                got = Some(p);
                break;
            }
            Err(StoreError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("{e}"),
        }
    }
    let p = got.expect("the store reconnects");
    assert_eq!(p.contacts.get("ben"), Some(&false));
    assert!(st.has_device_tokens("ann").await);
    st.put_jobs(vec![job(1, 1)]).await.unwrap();
    assert_eq!(st.jobs().await.unwrap().len(), 1);
    env.close().await;
}

#[tokio::test]
async fn redis_stores_with_other_prefixes_do_not_see_each_other() {
    let env = redis_env().await;
    let server = match &env.backing {
        Backing::Redis(s) => s,
        Backing::File(_) => unreachable!(),
    };
    let other = RedisStore::connect(RedisConfig {
        prefix: "other".into(),
        ..redis_config(server)
    })
    .await
    .unwrap();
    env.store
        .put_device_token(token("ann", "phone", "t"))
        .await
        .unwrap();
    env.store.put_jobs(vec![job(1, 1)]).await.unwrap();
    assert!(!other.has_device_tokens("ann").await);
    assert!(other.jobs().await.unwrap().is_empty());
    assert!(
        other
            .put_device_token(token("ben", "phone", "t"))
            .await
            .unwrap()
            .is_empty()
    );
    env.close().await;
}

// ---- model-based property tests on both backends ----

mod model {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    /// Cases per backend and property: `PROPTEST_CASES`, else 24.
    fn cases() -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(24)
    }

    #[derive(Clone, Copy, Debug)]
    enum Kind {
        File,
        Redis,
    }

    /// Runs `f` on fresh stores of `kind`, one per case; Redis cases share one server (each
    /// case gets its own key prefix and may restart the server).
    fn check<S, F, Fut>(kind: Kind, strategy: S, f: F)
    where
        S: Strategy,
        S::Value: Clone + std::fmt::Debug,
        F: Fn(Env, S::Value) -> Fut,
        Fut: Future<Output = Env>,
    {
        let mut runner = TestRunner::new(Config {
            cases: cases(),
            failure_persistence: None,
            ..Config::default()
        });
        let server = std::cell::RefCell::new(match kind {
            Kind::Redis => Some(RedisServer::start().expect("redis-server")),
            Kind::File => None,
        });
        let case = std::cell::Cell::new(0u64);
        runner
            .run(&strategy, |ops| {
                case.set(case.get() + 1);
                let case = case.get();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let taken = server.borrow_mut().take();
                let (env, back) = rt.block_on(async {
                    let env = match (kind, taken) {
                        (Kind::File, _) => Env::file().await,
                        (Kind::Redis, Some(server)) => {
                            let store = RedisStore::connect(RedisConfig {
                                prefix: format!("case{case}"),
                                ..redis_config(&server)
                            })
                            .await
                            .unwrap();
                            Env {
                                store: Store::Redis(store),
                                backing: Backing::Redis(server),
                            }
                        }
                        (Kind::Redis, None) => Env::redis().await,
                    };
                    let env = std::panic::AssertUnwindSafe(f(env, ops));
                    let env = futures_like::catch(env).await;
                    match env {
                        Ok(env) => {
                            env.store.shutdown().await;
                            (None, Some(env.backing))
                        }
                        Err(p) => (Some(p), None),
                    }
                });
                if let Some(Backing::Redis(s)) = back {
                    *server.borrow_mut() = Some(s);
                }
                match env {
                    None => Ok(()),
                    Some(msg) => Err(TestCaseError::fail(msg)),
                }
            })
            .unwrap();
    }

    /// A panic inside the case becomes its failure, so proptest can shrink it.
    mod futures_like {
        use std::future::Future;
        use std::panic::{AssertUnwindSafe, catch_unwind};
        use std::task::Poll;

        pub async fn catch<F: Future>(f: AssertUnwindSafe<F>) -> Result<F::Output, String> {
            let mut fut = Box::pin(f.0);
            std::future::poll_fn(move |cx| {
                match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
                    Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
                    Ok(Poll::Pending) => Poll::Pending,
                    Err(p) => Poll::Ready(Err(p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic".into()))),
                }
            })
            .await
        }
    }

    // ---- the push store against a model ----

    const USERS: [&str; 3] = ["ann", "ben", "cy"];
    const DEVICES: [&str; 2] = ["phone", "pad"];
    const KEYS: [&str; 3] = ["k0", "k1", "k2"];
    /// Given `registered_at` values; `None` lets the store use its clock.
    const REGISTERED: [Option<i64>; 4] = [Some(100), Some(200), Some(300), None];
    const MATCH_AT: [i64; 3] = [150, 250, i64::MAX];

    #[derive(Debug, Clone)]
    enum PushOp {
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
            expired: bool,
        },
        Reopen,
    }

    fn push_op() -> impl Strategy<Value = PushOp> {
        let jobs = proptest::collection::vec((0u64..6, 0u64..5), 1..4);
        prop_oneof![
            4 => (0..3usize, 0..2usize, 0u8..4, any::<bool>(), 0..4usize).prop_map(
                |(user, device, token, apns, registered)| PushOp::PutToken { user, device, token, apns, registered }
            ),
            2 => (0..3usize, 0..2usize, proptest::option::of((0u8..4, 0..3usize)))
                .prop_map(|(user, device, only_if)| PushOp::RemoveToken { user, device, only_if }),
            1 => (0..3usize, 0..2usize, 0i64..3_000_000)
                .prop_map(|(user, device, at)| PushOp::NotePushed { user, device, at }),
            2 => (0..3usize, 0..3usize, any::<bool>())
                .prop_map(|(user, other, muted)| PushOp::Mute { user, other, muted }),
            4 => jobs.clone().prop_map(PushOp::PutJobs),
            3 => jobs.prop_map(PushOp::RemoveJobs),
            1 => Just(PushOp::DeadLetter),
            2 => (0..3usize, any::<bool>()).prop_map(|(key, expired)| PushOp::PutIdempotency { key, expired }),
            1 => Just(PushOp::Reopen),
        ]
    }

    /// A job whose content also carries `stamp`, so that which put of a version is stored shows.
    fn model_job(id: u64, version: u64, stamp: u32) -> OutboxJob {
        OutboxJob {
            id,
            version,
            attempts: stamp,
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

    #[derive(Debug, Clone)]
    struct Dev {
        platform: i32,
        token: String,
        /// `None`: the store's clock at the put (at least `PushModel::start`).
        registered_at: Option<i64>,
        last_push_at: i64,
    }

    #[derive(Debug, Clone, Copy)]
    enum Slot {
        /// Version, stamp.
        Live(u64, u32),
        Removed(u64),
    }

    #[derive(Default)]
    struct PushModel {
        start: i64,
        devices: BTreeMap<(usize, usize), Dev>,
        /// (user, other) → the clock around the call.
        mutes: BTreeMap<(usize, usize), (i64, i64)>,
        jobs: BTreeMap<u64, Slot>,
        /// Puts so far (the next job's stamp).
        stamps: u32,
        dead: Vec<i64>,
        idempotency: BTreeMap<usize, i64>,
    }

    impl PushModel {
        /// The file store's rule (`state.rs`): the greatest version wins, a removal wins ties.
        fn job(&mut self, id: u64, v: u64, put: Option<u32>) {
            let take = match self.jobs.get(&id) {
                Some(Slot::Live(old, _)) => *old <= v,
                Some(Slot::Removed(r)) => *r < v,
                None => true,
            };
            if take {
                self.jobs.insert(
                    id,
                    match put {
                        Some(stamp) => Slot::Live(v, stamp),
                        None => Slot::Removed(v),
                    },
                );
            }
        }
    }

    /// The whole visible state against the model.
    async fn compare_push(s: &Store, m: &PushModel) {
        for (u, user) in USERS.iter().enumerate() {
            let got = s.device_tokens(user).await.unwrap();
            let mut want: Vec<(usize, &Dev)> = m
                .devices
                .iter()
                .filter(|((mu, _), _)| *mu == u)
                .map(|((_, d), dev)| (*d, dev))
                .collect();
            want.sort_by_key(|(d, _)| DEVICES[*d]);
            assert_eq!(got.len(), want.len(), "devices of {user}: {got:?}");
            for (t, (d, dev)) in got.iter().zip(&want) {
                assert_eq!((t.user.as_str(), t.device.as_str()), (*user, DEVICES[*d]));
                assert_eq!((t.platform, &t.token), (dev.platform, &dev.token));
                match dev.registered_at {
                    Some(at) => assert_eq!(t.registered_at, at),
                    None => assert!(t.registered_at >= m.start, "{t:?}"),
                }
                assert_eq!(t.last_push_at, dev.last_push_at, "{user}/{}", t.device);
            }
            assert_eq!(s.has_device_tokens(user).await, !want.is_empty());
            let got: Vec<(String, i64)> = s
                .mutes(user)
                .await
                .unwrap()
                .into_iter()
                .map(|m| (m.other, m.since))
                .collect();
            let want: Vec<(String, (i64, i64))> = m
                .mutes
                .iter()
                .filter(|((mu, _), _)| *mu == u)
                .map(|((_, o), at)| (USERS[*o].to_string(), *at))
                .collect();
            assert_eq!(got.len(), want.len(), "mutes of {user}");
            for ((go, since), (wo, (lo, hi))) in got.iter().zip(&want) {
                assert_eq!(go, wo);
                assert!((*lo..=*hi).contains(since), "{since} not in {lo}..={hi}");
            }
            for (o, other) in USERS.iter().enumerate() {
                assert_eq!(s.is_muted(user, other).await, m.mutes.contains_key(&(u, o)));
            }
        }
        let want: Vec<OutboxJob> = m
            .jobs
            .iter()
            .filter_map(|(id, slot)| match slot {
                Slot::Live(v, stamp) => Some(model_job(*id, *v, *stamp)),
                Slot::Removed(_) => None,
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
            assert_eq!(got, m.idempotency.get(&k).copied(), "idempotency {key}");
        }
    }

    async fn run_push(mut env: Env, ops: Vec<PushOp>) -> Env {
        let mut m = PushModel {
            start: now_ms(),
            ..PushModel::default()
        };
        for op in ops {
            let s = env.store.clone();
            match op {
                PushOp::PutToken {
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
                            registered_at: REGISTERED[registered],
                            last_push_at: keep,
                        },
                    );
                }
                PushOp::RemoveToken {
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
                        (Some(d), Some(o)) => {
                            d.token == o.token
                                && d.registered_at.unwrap_or(now_ms()) <= o.registered_at
                        }
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
                PushOp::NotePushed { user, device, at } => {
                    s.note_pushed(USERS[user], DEVICES[device], at).await;
                    if let Some(d) = m.devices.get_mut(&(user, device)) {
                        d.last_push_at = d.last_push_at.max(at);
                    }
                }
                PushOp::Mute { user, other, muted } => {
                    let lo = now_ms();
                    let r = s.set_mute(USERS[user], USERS[other], muted).await;
                    let hi = now_ms();
                    if user == other {
                        assert!(matches!(r, Err(StoreError::Invalid(_))));
                    } else {
                        let want = m.mutes.contains_key(&(user, other)) != muted;
                        assert_eq!(r.unwrap(), want);
                        if want && muted {
                            m.mutes.insert((user, other), (lo, hi));
                        } else if want {
                            m.mutes.remove(&(user, other));
                        }
                    }
                }
                PushOp::PutJobs(list) => {
                    let first = m.stamps;
                    let jobs = list
                        .iter()
                        .zip(first..)
                        .map(|((id, v), stamp)| model_job(*id, *v, stamp))
                        .collect();
                    s.put_jobs(jobs).await.unwrap();
                    for ((id, v), stamp) in list.into_iter().zip(first..) {
                        m.job(id, v, Some(stamp));
                        m.stamps = stamp + 1;
                    }
                }
                PushOp::RemoveJobs(list) => {
                    s.remove_jobs(list.clone()).await.unwrap();
                    for (id, v) in list {
                        m.job(id, v, None);
                    }
                }
                PushOp::DeadLetter => {
                    let n = m.dead.len() as i64 + 1;
                    s.add_dead_letter(DeadLetter {
                        job: Some(model_job(n as u64, 1, 0)),
                        at: n,
                        reason: "max_attempts".into(),
                        provider: "fcm".into(),
                    })
                    .await
                    .unwrap();
                    m.dead.push(n);
                }
                PushOp::PutIdempotency { key, expired } => {
                    // Far from the clock either way, so the test's own time does not matter.
                    let expires_at = if expired {
                        now_ms() - 100_000
                    } else {
                        now_ms() + 3_600_000
                    };
                    s.put_idempotency(IdempotencyRecord {
                        key: KEYS[key].into(),
                        status: 200,
                        expires_at,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                    if !expired {
                        m.idempotency.insert(key, expires_at);
                    }
                }
                PushOp::Reopen => env.reopen().await,
            }
            compare_push(&env.store, &m).await;
        }
        if let Store::Redis(r) = &env.store {
            let report = bimip_store::check_redis(r).await.unwrap();
            assert!(report.is_clean(), "{report}");
        }
        env
    }

    #[test]
    fn push_store_matches_model_on_files() {
        check(
            Kind::File,
            proptest::collection::vec(push_op(), 1..40),
            run_push,
        );
    }

    #[test]
    fn push_store_matches_model_on_redis() {
        check(
            Kind::Redis,
            proptest::collection::vec(push_op(), 1..40),
            run_push,
        );
    }

    // ---- profile relations against a model ----

    const PEOPLE: [&str; 4] = ["ann", "ben", "cat", "dan"];

    #[derive(Debug, Clone)]
    enum RelOp {
        Put {
            user: usize,
            list: Vec<(usize, bool)>,
            replace: bool,
        },
        Remove {
            user: usize,
            contact: usize,
        },
        Block {
            user: usize,
            other: usize,
            blocked: bool,
        },
        Seen {
            user: usize,
            at: i64,
        },
        Reopen,
    }

    fn rel_op() -> impl Strategy<Value = RelOp> {
        prop_oneof![
            4 => (0..4usize, proptest::collection::vec((0..4usize, any::<bool>()), 0..4), any::<bool>())
                .prop_map(|(user, list, replace)| RelOp::Put { user, list, replace }),
            2 => (0..4usize, 0..4usize).prop_map(|(user, contact)| RelOp::Remove { user, contact }),
            2 => (0..4usize, 0..4usize, any::<bool>())
                .prop_map(|(user, other, blocked)| RelOp::Block { user, other, blocked }),
            1 => (0..4usize, 0i64..1000).prop_map(|(user, at)| RelOp::Seen { user, at }),
            1 => Just(RelOp::Reopen),
        ]
    }

    async fn run_relations(mut env: Env, ops: Vec<RelOp>) -> Env {
        // The model: forward edges only; the reverse sides must follow.
        let mut contacts = BTreeMap::<(usize, usize), bool>::new();
        let mut blocks = BTreeSet::<(usize, usize)>::new();
        let mut seen = BTreeMap::<usize, i64>::new();
        for op in ops {
            let s = env.store.clone();
            match op {
                RelOp::Put {
                    user,
                    list,
                    replace,
                } => {
                    let e: Vec<(String, bool)> = list
                        .iter()
                        .map(|(c, f)| (PEOPLE[*c].to_string(), *f))
                        .collect();
                    let r = s.put_contacts(PEOPLE[user], e, replace).await;
                    if list.iter().any(|(c, _)| *c == user) {
                        assert!(matches!(r, Err(StoreError::Invalid(_))));
                        continue;
                    }
                    let mut want = BTreeMap::new();
                    for (c, f) in &list {
                        want.insert(*c, *f);
                    }
                    let changed = want
                        .iter()
                        .filter(|(c, f)| contacts.get(&(user, **c)) != Some(*f))
                        .count();
                    assert_eq!(r.unwrap(), changed);
                    if replace {
                        contacts.retain(|(u, c), _| *u != user || want.contains_key(c));
                    }
                    for (c, f) in want {
                        contacts.insert((user, c), f);
                    }
                }
                RelOp::Remove { user, contact } => {
                    let existed = s
                        .remove_contact(PEOPLE[user], PEOPLE[contact])
                        .await
                        .unwrap();
                    assert_eq!(existed, contacts.remove(&(user, contact)).is_some());
                }
                RelOp::Block {
                    user,
                    other,
                    blocked,
                } => {
                    let r = s.set_block(PEOPLE[user], PEOPLE[other], blocked).await;
                    if user == other {
                        assert!(matches!(r, Err(StoreError::Invalid(_))));
                        continue;
                    }
                    let changed = if blocked {
                        blocks.insert((user, other))
                    } else {
                        blocks.remove(&(user, other))
                    };
                    assert_eq!(r.unwrap(), changed);
                }
                RelOp::Seen { user, at } => {
                    let update = PresenceUpdate {
                        last_seen: Some(at),
                        ..Default::default()
                    };
                    let p = s.set_presence(PEOPLE[user], update).await.unwrap();
                    assert_eq!(p.last_seen, at);
                    seen.insert(user, at);
                }
                RelOp::Reopen => env.reopen().await,
            }
        }
        let before = check_invariants(&env.store, &PEOPLE).await;
        for (i, p) in before.iter().enumerate() {
            let want: BTreeMap<String, bool> = contacts
                .iter()
                .filter(|((u, _), _)| *u == i)
                .map(|((_, c), f)| (PEOPLE[*c].to_string(), *f))
                .collect();
            assert_eq!(p.contacts, want);
            let want: BTreeSet<String> = blocks
                .iter()
                .filter(|(u, _)| *u == i)
                .map(|(_, o)| PEOPLE[*o].to_string())
                .collect();
            assert_eq!(p.blocks, want);
            assert_eq!(p.last_seen, seen.get(&i).copied().unwrap_or(0));
        }
        env.reopen().await;
        let after = check_invariants(&env.store, &PEOPLE).await;
        assert_eq!(before, after);
        if let Store::Redis(r) = &env.store {
            let report = bimip_store::check_redis(r).await.unwrap();
            assert!(report.is_clean(), "{report}");
        }
        env
    }

    #[test]
    fn profile_relations_match_model_on_files() {
        check(
            Kind::File,
            proptest::collection::vec(rel_op(), 1..30),
            run_relations,
        );
    }

    #[test]
    fn profile_relations_match_model_on_redis() {
        check(
            Kind::Redis,
            proptest::collection::vec(rel_op(), 1..30),
            run_relations,
        );
    }
}
