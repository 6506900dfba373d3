//! Tests of the per-user profile on real files in temporary directories.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use bimip_proto::v1::Status;
use tempfile::TempDir;

use super::*;
use crate::{PresenceUpdate, Profile, ProfileStore, Store};

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        shards: 3,
        ..StoreConfig::new(dir)
    }
}

fn open(dir: &Path) -> FileStore {
    FileStore::open(config(dir)).expect("open store").0
}

fn set(users: &[&str]) -> BTreeSet<String> {
    users.iter().map(|u| u.to_string()).collect()
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

#[tokio::test]
async fn round_trip_through_reopen_and_the_file_on_disk() {
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    assert_eq!(s.profile("alice").await.unwrap(), Profile::default());
    assert_eq!(
        s.put_contacts("alice", entries(&[("bob", false), ("carol", true)]), false)
            .await
            .unwrap(),
        2
    );
    assert!(s.set_block("alice", "mallory", true).await.unwrap());
    let p = s
        .set_presence(
            "alice",
            PresenceUpdate {
                intent: Some((Status::Busy, "in a meeting".into())),
                invisible: Some(true),
                last_seen: Some(1234),
            },
        )
        .await
        .unwrap();
    let before: Vec<Profile> = {
        let mut v = Vec::new();
        for u in ["alice", "bob", "carol", "mallory"] {
            v.push(s.profile(u).await.unwrap());
        }
        v
    };
    assert_eq!(before[0], p);
    s.shutdown().await;

    let (s, report) = FileStore::open(config(dir.path())).unwrap();
    assert_eq!(report.users, 4);
    assert_eq!(report.records, 4, "one profile line per user");
    for (u, want) in ["alice", "bob", "carol", "mallory"].iter().zip(&before) {
        assert_eq!(&s.profile(u).await.unwrap(), want, "{u}");
    }
    let a = &before[0];
    assert_eq!(a.contacts.get("bob"), Some(&false));
    assert_eq!(a.contacts.get("carol"), Some(&true));
    assert_eq!(a.blocks, set(&["mallory"]));
    assert_eq!(a.intent, Status::Busy);
    assert_eq!(a.details, "in a meeting");
    assert!(a.intent_at > 0);
    assert!(a.invisible && a.invisible_since > 0);
    assert_eq!(a.last_seen, 1234);
    assert_eq!(before[1].listed_by.get("alice"), Some(&false));
    assert_eq!(before[2].listed_by.get("alice"), Some(&true));
    assert_eq!(before[3].blocked_by, set(&["alice"]));
    s.shutdown().await;

    // One line in the store's line format, next to the queue files; no temporary file left.
    let path = user_dir(dir.path(), "alice").join("bimip_profile_alice.dat");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.matches('\n').count(), 1);
    assert!(text.ends_with('\n'));
    let rec: bimip_proto::store::Profile = record::decode_line(text.trim_end().as_bytes()).unwrap();
    assert_eq!(rec.contacts.len(), 2);
    assert!(rec.contacts.iter().all(|c| c.since > 0));
    assert_eq!(rec.intent, Status::Busy as i32);
    let names: Vec<String> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["bimip_profile_alice.dat".to_string()]);

    // inspect_user decodes it too.
    let files = inspect_user(dir.path(), "alice").unwrap();
    assert_eq!(files.profile_path, path);
    assert_eq!(files.profile, Some(rec));
    assert!(files.problems.is_empty());
    assert_eq!(inspect_user(dir.path(), "nobody").unwrap().profile, None);
}

#[tokio::test]
async fn mutual_and_one_way_watchers() {
    let dir = TempDir::new().unwrap();
    let s = Store::File(open(dir.path()));
    s.put_contacts("alice", entries(&[("bob", false), ("carol", true)]), false)
        .await
        .unwrap();
    let alice = s.profile("alice").await.unwrap();
    let bob = s.profile("bob").await.unwrap();
    let carol = s.profile("carol").await.unwrap();
    // Mutual: bob sees alice and alice sees bob. One way: alice sees carol, carol not alice.
    assert_eq!(alice.watchers(), set(&["bob"]));
    assert_eq!(alice.watching(), set(&["bob", "carol"]));
    assert_eq!(bob.watchers(), set(&["alice"]));
    assert_eq!(bob.watching(), set(&["alice"]));
    assert_eq!(carol.watchers(), set(&["alice"]));
    assert_eq!(carol.watching(), set(&[]));
    assert!(alice.may_see("bob") && !alice.may_see("carol") && !alice.may_see("dave"));
    assert!(carol.may_see("alice") && bob.may_see("alice"));

    // carol lists alice back: now they are mutual through carol's own entry.
    s.put_contacts("carol", entries(&[("alice", false)]), false)
        .await
        .unwrap();
    let alice = s.profile("alice").await.unwrap();
    assert_eq!(alice.watchers(), set(&["bob", "carol"]));
    assert!(alice.may_see("carol"));
    // Flag changes count as changes; unchanged entries do not.
    assert_eq!(
        s.put_contacts("alice", entries(&[("bob", true), ("carol", true)]), false)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        s.profile("bob").await.unwrap().listed_by.get("alice"),
        Some(&true)
    );
    assert_eq!(s.profile("bob").await.unwrap().watching(), set(&[]));
    s.shutdown().await;
}

#[tokio::test]
async fn blocks_are_excluded_both_ways() {
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    s.put_contacts("alice", entries(&[("bob", false)]), false)
        .await
        .unwrap();
    // bob blocks alice: alice no longer sees bob, and bob's watchers drop alice.
    assert!(s.set_block("bob", "alice", true).await.unwrap());
    assert!(!s.set_block("bob", "alice", true).await.unwrap());
    let alice = s.profile("alice").await.unwrap();
    let bob = s.profile("bob").await.unwrap();
    assert_eq!(bob.blocks, set(&["alice"]));
    assert_eq!(alice.blocked_by, set(&["bob"]));
    assert_eq!(bob.watchers(), set(&[]));
    assert!(!bob.may_see("alice"));
    assert_eq!(alice.watching(), set(&[]));
    // Contacts stay as they were; unblocking restores visibility.
    assert_eq!(alice.contacts.get("bob"), Some(&false));
    assert!(s.set_block("bob", "alice", false).await.unwrap());
    assert!(!s.set_block("bob", "alice", false).await.unwrap());
    let alice = s.profile("alice").await.unwrap();
    assert!(alice.blocked_by.is_empty());
    assert_eq!(alice.watching(), set(&["bob"]));
    assert!(s.profile("bob").await.unwrap().may_see("alice"));
    // alice blocks bob: bob leaves alice's watchers although he is a mutual contact.
    s.set_block("alice", "bob", true).await.unwrap();
    assert_eq!(s.profile("alice").await.unwrap().watchers(), set(&[]));
    assert_eq!(s.profile("bob").await.unwrap().watching(), set(&[]));
    assert!(matches!(
        s.set_block("alice", "alice", true).await,
        Err(StoreError::Invalid(_))
    ));
    s.shutdown().await;
}

#[tokio::test]
async fn put_contacts_replace_and_remove_touch_both_sides() {
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    s.put_contacts(
        "alice",
        entries(&[("bob", false), ("carol", false), ("dave", true)]),
        false,
    )
    .await
    .unwrap();
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
    assert!(s.profile("carol").await.unwrap().listed_by.is_empty());
    assert!(s.profile("dave").await.unwrap().listed_by.is_empty());
    assert_eq!(
        s.profile("erin").await.unwrap().listed_by.get("alice"),
        Some(&false)
    );
    // Without replace, nothing is removed; duplicates count once, the last flag wins.
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
    // Replace with nothing empties the list.
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

    // Validation comes first: nothing is written for a bad call.
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
        s.profile("a b").await,
        Err(StoreError::InvalidUser(_))
    ));
    assert!(s.profile("bob").await.unwrap().listed_by.is_empty());
    s.shutdown().await;
}

#[tokio::test]
async fn intent_invisibility_and_last_seen() {
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    for st in [Status::Away, Status::Busy, Status::Dnd] {
        let p = s.set_presence("alice", intent(st, "later")).await.unwrap();
        assert_eq!((p.intent, p.details.as_str()), (st, "later"));
        assert!(p.has_intent() && p.intent_at > 0);
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
        assert!(!p.has_intent());
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
    // Turning it on again keeps the original time; other fields are untouched.
    let p = s.set_presence("alice", on).await.unwrap();
    assert_eq!(p.invisible_since, since);
    assert_eq!(p.intent, Status::Dnd);
    let p = s
        .set_presence(
            "alice",
            PresenceUpdate {
                invisible: Some(false),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(!p.invisible);
    assert_eq!(p.invisible_since, 0);

    // last seen only: visible at once, on disk shortly after (lazy write), and after reopen.
    let seen = PresenceUpdate {
        last_seen: Some(42),
        ..Default::default()
    };
    assert_eq!(s.set_presence("alice", seen).await.unwrap().last_seen, 42);
    assert_eq!(s.profile("alice").await.unwrap().last_seen, 42);
    let mut on_disk = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        on_disk = inspect_user(dir.path(), "alice")
            .unwrap()
            .profile
            .map_or(0, |p| p.last_seen);
        if on_disk == 42 {
            break;
        }
    }
    assert_eq!(on_disk, 42, "the periodic flush writes last seen");
    let seen = PresenceUpdate {
        last_seen: Some(43),
        ..Default::default()
    };
    s.set_presence("alice", seen).await.unwrap();
    s.shutdown().await;
    let s = open(dir.path());
    let p = s.profile("alice").await.unwrap();
    assert_eq!(p.last_seen, 43, "shutdown writes lazily kept last seen");
    assert_eq!((p.intent, p.details.as_str()), (Status::Dnd, "focus"));
    s.shutdown().await;
}

#[tokio::test]
async fn last_seen_survives_cache_eviction() {
    let dir = TempDir::new().unwrap();
    let cfg = StoreConfig {
        shards: 1,
        cache_users: 1,
        ..StoreConfig::new(dir.path())
    };
    let (s, _) = FileStore::open(cfg.clone()).unwrap();
    for (i, u) in ["u1", "u2", "u3"].iter().enumerate() {
        let seen = PresenceUpdate {
            last_seen: Some(100 + i as i64),
            ..Default::default()
        };
        s.set_presence(u, seen).await.unwrap();
    }
    for (i, u) in ["u1", "u2", "u3"].iter().enumerate() {
        assert_eq!(s.profile(u).await.unwrap().last_seen, 100 + i as i64);
    }
    s.shutdown().await;
    let (s, _) = FileStore::open(cfg).unwrap();
    for (i, u) in ["u1", "u2", "u3"].iter().enumerate() {
        assert_eq!(s.profile(u).await.unwrap().last_seen, 100 + i as i64);
    }
    s.shutdown().await;
}

#[tokio::test]
async fn corrupt_profile_refuses_start_and_repair_moves_it_aside() {
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    s.put_contacts("alice", entries(&[("bob", false)]), false)
        .await
        .unwrap();
    s.shutdown().await;
    let path = user_dir(dir.path(), "alice").join("bimip_profile_alice.dat");
    let mut text = std::fs::read(&path).unwrap();
    text[3] = if text[3] == b'A' { b'B' } else { b'A' };
    std::fs::write(&path, &text).unwrap();
    // A leftover temporary file of an interrupted write is simply removed.
    let tmp = path.with_file_name("bimip_profile_alice.dat.tmp");
    std::fs::write(&tmp, b"half").unwrap();

    match FileStore::open(config(dir.path())) {
        Err(StoreError::Corrupt { path: p, line, .. }) => {
            assert_eq!(p, path);
            assert_eq!(line, 1);
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a corrupt profile must refuse the start"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), text, "nothing changed");
    let files = inspect_user(dir.path(), "alice").unwrap();
    assert_eq!(files.profile, None);
    assert_eq!(files.problems.len(), 1);
    assert_eq!(files.problems[0].1, 1);

    let (s, report) = FileStore::open(StoreConfig {
        repair: true,
        ..config(dir.path())
    })
    .unwrap();
    assert!(
        report
            .repaired
            .iter()
            .any(|(p, line, _)| p == &path && *line == 1)
    );
    assert!(!tmp.exists());
    assert_eq!(s.profile("alice").await.unwrap(), Profile::default());
    let aside: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("bimip_profile_alice.dat.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(
        std::fs::read(path.parent().unwrap().join(&aside[0])).unwrap(),
        text
    );
    s.shutdown().await;

    // A second line, or an empty file, is corruption too.
    let (s, _) = FileStore::open(config(dir.path())).unwrap();
    s.set_presence("bob", intent(Status::Away, ""))
        .await
        .unwrap();
    s.shutdown().await;
    let bob = user_dir(dir.path(), "bob").join("bimip_profile_bob.dat");
    let mut twice = std::fs::read(&bob).unwrap();
    twice.extend_from_slice(&twice.clone());
    std::fs::write(&bob, &twice).unwrap();
    assert!(matches!(
        FileStore::open(config(dir.path())),
        Err(StoreError::Corrupt { line: 2, .. })
    ));
    std::fs::write(&bob, b"").unwrap();
    assert!(matches!(
        FileStore::open(config(dir.path())),
        Err(StoreError::Corrupt { line: 1, .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cross_user_changes_keep_both_sides_in_step() {
    let dir = TempDir::new().unwrap();
    let s = open(dir.path());
    let users = ["u0", "u1", "u2", "u3", "u4"];
    let mut tasks = Vec::new();
    for i in 0..40usize {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let a = users[i % 5];
            let b = users[(i * 3 + 1) % 5];
            if a == b {
                return;
            }
            match i % 4 {
                0 => drop(
                    s.put_contacts(a, entries(&[(b, i % 3 == 0)]), i % 2 == 0)
                        .await,
                ),
                1 => drop(s.remove_contact(a, b).await),
                2 => drop(s.set_block(a, b, i % 3 != 0).await),
                _ => drop(s.put_contacts(b, entries(&[(a, false)]), true).await),
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    check_invariants(&s, &users).await;
    s.shutdown().await;
}

/// `A ∈ B.listed_by ⇔ B ∈ A.contacts` (same flag), `A ∈ B.blocked_by ⇔ B ∈ A.blocks`, and so
/// watchers and watching agree.
async fn check_invariants(s: &FileStore, users: &[&str]) -> Vec<Profile> {
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
            assert_eq!(pa.may_see(b), pa.watchers().contains(*b));
        }
        assert!(!ps[i].contacts.contains_key(*a) && !ps[i].blocks.contains(*a));
    }
    ps
}

mod model {
    use super::*;
    use proptest::prelude::*;

    const USERS: [&str; 4] = ["ann", "ben", "cat", "dan"];

    #[derive(Debug, Clone)]
    enum Op {
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
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..4usize, proptest::collection::vec((0..4usize, any::<bool>()), 0..4), any::<bool>())
                .prop_map(|(user, list, replace)| Op::Put { user, list, replace }),
            2 => (0..4usize, 0..4usize).prop_map(|(user, contact)| Op::Remove { user, contact }),
            2 => (0..4usize, 0..4usize, any::<bool>())
                .prop_map(|(user, other, blocked)| Op::Block { user, other, blocked }),
            1 => Just(Op::Reopen),
        ]
    }

    fn open_fast(dir: &Path) -> FileStore {
        let cfg = StoreConfig {
            shards: 2,
            fsync: FsyncMode::Never,
            ..StoreConfig::new(dir)
        };
        FileStore::open(cfg).unwrap().0
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]
        #[test]
        fn relations_stay_symmetric(ops in proptest::collection::vec(op(), 1..30)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let dir = TempDir::new().unwrap();
                let mut s = open_fast(dir.path());
                // The model: forward edges only.
                let mut contacts = std::collections::BTreeMap::<(usize, usize), bool>::new();
                let mut blocks = BTreeSet::<(usize, usize)>::new();
                for op in ops {
                    match op {
                        Op::Put { user, list, replace } => {
                            let e: Vec<(String, bool)> =
                                list.iter().map(|(c, f)| (USERS[*c].to_string(), *f)).collect();
                            let r = s.put_contacts(USERS[user], e, replace).await;
                            if list.iter().any(|(c, _)| *c == user) {
                                assert!(matches!(r, Err(StoreError::Invalid(_))));
                                continue;
                            }
                            let mut want = std::collections::BTreeMap::new();
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
                        Op::Remove { user, contact } => {
                            let existed = s.remove_contact(USERS[user], USERS[contact]).await.unwrap();
                            assert_eq!(existed, contacts.remove(&(user, contact)).is_some());
                        }
                        Op::Block { user, other, blocked } => {
                            let r = s.set_block(USERS[user], USERS[other], blocked).await;
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
                        Op::Reopen => {
                            s.shutdown().await;
                            s = open_fast(dir.path());
                        }
                    }
                }
                let before = check_invariants(&s, &USERS).await;
                for (i, p) in before.iter().enumerate() {
                    let want: std::collections::BTreeMap<String, bool> = contacts
                        .iter()
                        .filter(|((u, _), _)| *u == i)
                        .map(|((_, c), f)| (USERS[*c].to_string(), *f))
                        .collect();
                    assert_eq!(p.contacts, want);
                    let want: BTreeSet<String> =
                        blocks.iter().filter(|(u, _)| *u == i).map(|(_, o)| USERS[*o].to_string()).collect();
                    assert_eq!(p.blocks, want);
                }
                s.shutdown().await;
                let s = open_fast(dir.path());
                let after = check_invariants(&s, &USERS).await;
                assert_eq!(before, after);
                s.shutdown().await;
            });
        }
    }
}
