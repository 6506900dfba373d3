//! The queue contract ([`QueueStore`]), run against both backends: every scenario runs on a
//! file store in a temporary folder and on a Redis store on its own throwaway `redis-server`, and
//! a model-based property test applies random operations to a small model and to both.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bimip_proto::v1::{Partition, ReceiptKind};
use bimip_store::redis::test_server::RedisServer;
use bimip_store::{
    AckOutcome, AckRequest, Appended, Compaction, CopyTo, FileStore, FsyncMode, Item, NewItem,
    PendingForDevice, QueueStore, ReadBatch, ReadRequest, RedisConfig, RedisStore, SenderPending,
    SenderUnread, Store, StoreConfig, StoreError, Unread,
};
use bytes::Bytes;
use tempfile::TempDir;

/// One backend under test, with what keeps it alive.
struct Backend {
    name: &'static str,
    store: Store,
    dir: Option<TempDir>,
    server: Option<RedisServer>,
    retention: Duration,
    max: usize,
}

const FOREVER: Duration = Duration::ZERO;

fn file_config(dir: &std::path::Path, retention: Duration, max: usize) -> StoreConfig {
    StoreConfig {
        retention,
        max_queue_items: max,
        fsync: FsyncMode::Never,
        ..StoreConfig::new(dir)
    }
}

fn file_backend(retention: Duration, max: usize) -> Backend {
    let dir = TempDir::new().unwrap();
    let (s, _) = FileStore::open(file_config(dir.path(), retention, max)).unwrap();
    Backend {
        name: "file",
        store: Store::File(s),
        dir: Some(dir),
        server: None,
        retention,
        max,
    }
}

fn redis_config(url: String, prefix: &str, retention: Duration, max: usize) -> RedisConfig {
    RedisConfig {
        prefix: prefix.into(),
        retention,
        max_queue_items: max,
        response_timeout: Duration::from_secs(2),
        ..RedisConfig::new(url)
    }
}

async fn redis_backend(retention: Duration, max: usize) -> Backend {
    let server = RedisServer::start().expect("redis-server");
    let s = RedisStore::connect(redis_config(server.url(), "t", retention, max))
        .await
        .unwrap();
    Backend {
        name: "redis",
        store: Store::Redis(s),
        dir: None,
        server: Some(server),
        retention,
        max,
    }
}

/// The file store and the Redis store with the same limits.
async fn both(retention: Duration, max: usize) -> [Backend; 2] {
    [
        file_backend(retention, max),
        redis_backend(retention, max).await,
    ]
}

impl Backend {
    async fn compact(&self, user: &str) -> Compaction {
        match &self.store {
            Store::File(s) => s.compact(user).await.unwrap(),
            Store::Redis(s) => s.compact_user(user).await.unwrap(),
        }
    }

    /// Stops and starts the backend: the file store is shut down and opened again, redis-server
    /// is killed (SIGKILL) and started again from its AOF.
    async fn restart(&mut self) {
        match &self.store {
            Store::File(s) => {
                s.shutdown().await;
                let dir = self.dir.as_ref().unwrap().path();
                let (s, _) = FileStore::open(file_config(dir, self.retention, self.max)).unwrap();
                self.store = Store::File(s);
            }
            Store::Redis(_) => {
                self.server.as_mut().unwrap().restart().unwrap();
                // The old connection is broken: a new store (the old one reconnects too, see
                // `redis_outage_is_unavailable_then_recovers`).
                let url = self.server.as_ref().unwrap().url();
                let s = RedisStore::connect(redis_config(url, "t", self.retention, self.max))
                    .await
                    .unwrap();
                self.store = Store::Redis(s);
            }
        }
    }

    async fn append(&self, user: &str, item: NewItem) -> Appended {
        self.store
            .append(user, item)
            .await
            .unwrap_or_else(|e| panic!("{}: append: {e}", self.name))
    }

    async fn ack(&self, user: &str, req: AckRequest) -> AckOutcome {
        self.store
            .acknowledge(user, req)
            .await
            .unwrap_or_else(|e| panic!("{}: acknowledge: {e}", self.name))
    }

    async fn read(&self, user: &str, req: ReadRequest) -> ReadBatch {
        self.store
            .read(user, req)
            .await
            .unwrap_or_else(|e| panic!("{}: read: {e}", self.name))
    }

    async fn pending(&self, user: &str, device: &str) -> PendingForDevice {
        self.store
            .pending(user, device)
            .await
            .unwrap_or_else(|e| panic!("{}: pending: {e}", self.name))
    }

    async fn unread(&self, user: &str) -> Unread {
        self.store
            .unread(user)
            .await
            .unwrap_or_else(|e| panic!("{}: unread: {e}", self.name))
    }

    async fn copy(&self, to: &str, item: NewItem, copy: CopyTo) -> (Appended, Appended) {
        let (a, c) = self
            .store
            .enqueue_append_with_copy(to, item, copy)
            .await
            .unwrap_or_else(|e| panic!("{}: append with copy: {e}", self.name));
        (a.wait().await.unwrap(), c.wait().await.unwrap())
    }
}

fn chat(from: &str, to: &str, id: &str) -> NewItem {
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

fn in_partition(partition: Partition, from: &str, to: &str, id: &str) -> NewItem {
    NewItem {
        partition,
        ..chat(from, to, id)
    }
}

/// The sender's own copy of `item` (what the server stores for multi-device sync).
fn own_copy(item: &NewItem) -> CopyTo {
    CopyTo {
        user: item.from.clone(),
        item: NewItem {
            dedupe: false,
            ..item.clone()
        },
    }
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

fn ack_in(partition: Partition, device: &str, peer: Option<&str>, up: u64) -> AckRequest {
    AckRequest {
        device: device.into(),
        partition,
        peer: peer.map(Into::into),
        kind: ReceiptKind::Delivered,
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

fn read_all(peer: &str) -> ReadRequest {
    ReadRequest {
        start: Some(1),
        limit: 0,
        ..read_chat("any", peer)
    }
}

fn offsets(b: &ReadBatch) -> Vec<u64> {
    b.items.iter().map(|i| i.offset).collect()
}

fn ids(b: &ReadBatch) -> Vec<String> {
    b.items.iter().map(|i| i.message_id.clone()).collect()
}

fn covered(o: &AckOutcome) -> Vec<u64> {
    o.covered.iter().map(|c| c.0).collect()
}

/// Items without their timestamps (each backend stamps its own).
fn untimed(items: &[Item]) -> Vec<Item> {
    items
        .iter()
        .map(|i| Item {
            timestamp: 0,
            ..i.clone()
        })
        .collect()
}

fn untimed_pending(p: &PendingForDevice) -> PendingForDevice {
    PendingForDevice {
        notifications: untimed(&p.notifications),
        senders: p
            .senders
            .iter()
            .map(|s| SenderPending {
                last: Item {
                    timestamp: 0,
                    ..s.last.clone()
                },
                ..s.clone()
            })
            .collect(),
        receipts: untimed(&p.receipts),
    }
}

fn senders(p: &PendingForDevice) -> Vec<(&str, u64, u64, u64)> {
    p.senders
        .iter()
        .map(|s| (s.from.as_str(), s.unread, s.first_offset, s.last_offset))
        .collect()
}

/// Retries `f` until it succeeds (a Redis store reconnects in the background after an outage).
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, what, "retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{what}: still failing: {e}"),
        }
    }
}

#[tokio::test]
async fn appends_get_increasing_offsets_and_come_back_as_stored() {
    for b in both(FOREVER, 0).await {
        let n = b.name;
        let mut last_ts = 0;
        for i in 1..=3u64 {
            let a = b
                .append("alice", chat("bob", "alice", &format!("m{i}")))
                .await;
            assert_eq!((a.offset, a.duplicate), (i, false), "{n}");
            assert!(a.timestamp >= last_ts && a.timestamp > 0, "{n}");
            last_ts = a.timestamp;
        }
        let note = NewItem {
            device: String::new(),
            peer_offset: 7,
            payload: Bytes::from_static(b"\x00\xffbinary\n"),
            ..in_partition(Partition::Notification, "", "alice", "n1")
        };
        assert_eq!(b.append("alice", note.clone()).await.offset, 4, "{n}");
        // Offsets are per user.
        assert_eq!(
            b.append("bob", chat("alice", "bob", "m1")).await.offset,
            1,
            "{n}"
        );
        let r = b.read("alice", read_all("bob")).await;
        assert_eq!(offsets(&r), [1, 2, 3], "{n}");
        let first = &r.items[0];
        assert_eq!(
            (
                first.partition,
                first.from.as_str(),
                first.to.as_str(),
                first.message_id.as_str(),
                first.device.as_str(),
                first.peer_offset,
                first.acknowledged
            ),
            (Partition::Chat, "bob", "alice", "m1", "dev", 0, false),
            "{n}"
        );
        assert_eq!(first.payload, Bytes::from("payload of m1"), "{n}");
        let r = b
            .read(
                "alice",
                ReadRequest {
                    partition: Partition::Notification,
                    peer: None,
                    ..read_all("")
                },
            )
            .await;
        assert_eq!(r.items.len(), 1, "{n}");
        let it = &r.items[0];
        assert_eq!(
            (
                it.offset,
                it.payload.clone(),
                it.peer_offset,
                it.device.as_str(),
                it.from.as_str()
            ),
            (4, note.payload.clone(), 7, "", ""),
            "{n}"
        );
        // Bad input: the same errors on both backends.
        assert!(
            matches!(
                b.store
                    .enqueue_append("a/b", chat("bob", "a/b", "x"))
                    .await
                    .map(|_| ()),
                Err(StoreError::InvalidUser(_))
            ),
            "{n}"
        );
        let unspecified = in_partition(Partition::Unspecified, "bob", "alice", "x");
        let p = b.store.enqueue_append("alice", unspecified).await.unwrap();
        assert!(matches!(p.wait().await, Err(StoreError::Invalid(_))), "{n}");
        assert!(
            matches!(
                b.store.read("../etc", read_chat("phone", "bob")).await,
                Err(StoreError::InvalidUser(_))
            ),
            "{n}"
        );
        assert!(
            matches!(
                b.store
                    .read(
                        "alice",
                        ReadRequest {
                            partition: Partition::Unspecified,
                            ..read_all("bob")
                        }
                    )
                    .await,
                Err(StoreError::Invalid(_))
            ),
            "{n}"
        );
        assert!(
            matches!(
                b.store.unread("bad/user").await,
                Err(StoreError::InvalidUser(_))
            ),
            "{n}"
        );
        assert!(
            matches!(
                b.store.pending("", "phone").await,
                Err(StoreError::InvalidUser(_))
            ),
            "{n}"
        );
        // The failed append took no offset.
        assert_eq!(
            b.append("alice", chat("bob", "alice", "m4")).await.offset,
            5,
            "{n}"
        );
    }
}

#[tokio::test]
async fn dedupe_returns_the_original_across_partitions_and_copies() {
    for b in both(FOREVER, 0).await {
        let n = b.name;
        let a = b.append("alice", chat("bob", "alice", "m1")).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
        let again = b.append("alice", chat("bob", "alice", "m1")).await;
        assert!(again.duplicate, "{n}");
        assert_eq!(
            (again.offset, again.timestamp),
            (a.offset, a.timestamp),
            "{n}"
        );
        // Another sender may use the same id.
        let c = b.append("alice", chat("carol", "alice", "m1")).await;
        assert_eq!((c.offset, c.duplicate), (2, false), "{n}");
        // Without dedupe a second item is stored; dedupe still finds the first.
        let d = b
            .append(
                "alice",
                NewItem {
                    dedupe: false,
                    ..chat("bob", "alice", "m1")
                },
            )
            .await;
        assert_eq!((d.offset, d.duplicate), (3, false), "{n}");
        let e = b.append("alice", chat("bob", "alice", "m1")).await;
        assert_eq!((e.offset, e.duplicate), (1, true), "{n}");
        // Across partitions: (sender, id) is one id in the whole queue.
        let f = b
            .append(
                "alice",
                in_partition(Partition::Receipt, "bob", "alice", "m1"),
            )
            .await;
        assert_eq!((f.offset, f.duplicate), (1, true), "{n}");
        // An empty message id is never deduplicated.
        let g = b.append("alice", chat("bob", "alice", "")).await;
        let h = b.append("alice", chat("bob", "alice", "")).await;
        assert_eq!((g.offset, h.offset, h.duplicate), (4, 5, false), "{n}");
        // Through a copy: a resend is a duplicate and copies nothing.
        let item = chat("alice", "dave", "x1");
        let (s1, c1) = b.copy("dave", item.clone(), own_copy(&item)).await;
        assert_eq!(
            (s1.offset, s1.duplicate, c1.offset, c1.duplicate),
            (1, false, 6, false),
            "{n}"
        );
        let (s2, c2) = b.copy("dave", item.clone(), own_copy(&item)).await;
        assert_eq!(
            (s2.offset, s2.duplicate, c2.offset, c2.duplicate),
            (1, true, 0, true),
            "{n}"
        );
        assert_eq!(c2.timestamp, s1.timestamp, "{n}");
        let own = b.read("alice", read_all("alice")).await;
        assert_eq!(offsets(&own), [6], "{n}: one copy only");
        assert_eq!(
            b.read("dave", read_all("alice")).await.items.len(),
            1,
            "{n}"
        );
    }
}

#[tokio::test]
async fn copies_carry_the_recipients_offset() {
    for b in both(FOREVER, 0).await {
        let n = b.name;
        let mut expected = Vec::new();
        for (to, id) in [("bob", "a1"), ("carol", "a2"), ("bob", "a3")] {
            // Give the recipients different offsets from the sender's.
            b.append(to, chat("zed", to, &format!("z-{id}"))).await;
            let item = chat("alice", to, id);
            let (s, c) = b.copy(to, item.clone(), own_copy(&item)).await;
            assert!(!s.duplicate && !c.duplicate, "{n}");
            expected.push((to, id, s.offset, c.offset));
        }
        let own = b.read("alice", read_all("alice")).await;
        assert_eq!(own.items.len(), 3, "{n}");
        for (to, id, offset, copy_offset) in expected {
            let c = own.items.iter().find(|i| i.offset == copy_offset).unwrap();
            assert_eq!(
                (c.to.as_str(), c.message_id.as_str(), c.peer_offset),
                (to, id, offset),
                "{n}"
            );
            let r = b.read(to, read_all("alice")).await;
            let it = r.items.iter().find(|i| i.offset == offset).unwrap();
            assert_eq!(
                (it.payload.clone(), it.peer_offset),
                (c.payload.clone(), 0),
                "{n}"
            );
        }
        // A copy into the same queue (a note to self): the copy points at the first.
        let item = chat("erin", "erin", "self");
        let (s, c) = b.copy("erin", item.clone(), own_copy(&item)).await;
        assert_eq!((s.offset, c.offset), (1, 2), "{n}");
        let r = b.read("erin", read_all("erin")).await;
        assert_eq!(
            r.items.iter().map(|i| i.peer_offset).collect::<Vec<_>>(),
            [0, 1],
            "{n}"
        );
        // A copy with an unspecified partition: the first is stored, the copy is an error.
        let item = chat("alice", "bob", "bad-copy");
        let mut copy = own_copy(&item);
        copy.item.partition = Partition::Unspecified;
        let (s, c) = b
            .store
            .enqueue_append_with_copy("bob", item, copy)
            .await
            .unwrap();
        assert!(s.wait().await.is_ok(), "{n}");
        assert!(matches!(c.wait().await, Err(StoreError::Invalid(_))), "{n}");
        // The first unspecified: neither is stored.
        let item = in_partition(Partition::Unspecified, "alice", "bob", "bad");
        let (s, c) = b
            .store
            .enqueue_append_with_copy("bob", item.clone(), own_copy(&item))
            .await
            .unwrap();
        assert!(matches!(s.wait().await, Err(StoreError::Invalid(_))), "{n}");
        assert!(matches!(c.wait().await, Err(StoreError::Invalid(_))), "{n}");
        assert!(
            matches!(
                b.store
                    .enqueue_append_with_copy(
                        "bob",
                        chat("a", "b", "c"),
                        CopyTo {
                            user: "no/such".into(),
                            item: chat("a", "b", "c"),
                        }
                    )
                    .await
                    .map(|_| ()),
                Err(StoreError::InvalidUser(_))
            ),
            "{n}"
        );
    }
}

#[tokio::test]
async fn receipts_move_cursors_forward_only_and_cover_once_per_kind() {
    for b in both(FOREVER, 0).await {
        let n = b.name;
        for i in 1..=5 {
            b.append("alice", chat("bob", "alice", &format!("b{i}")))
                .await;
        }
        b.append(
            "alice",
            in_partition(Partition::Notification, "", "alice", "n1"),
        )
        .await; // 6
        b.append("alice", chat("carol", "alice", "c1")).await; // 7
        b.append("alice", chat("alice", "bob", "own")).await; // 8: her own copy

        // No cursor anywhere: a device starts at the beginning.
        let r = b.read("alice", read_chat("phone", "bob")).await;
        assert_eq!(
            (offsets(&r), r.more, r.next_offset),
            (vec![1, 2, 3, 4, 5], false, 6)
        );
        assert!(r.items.iter().all(|i| !i.acknowledged), "{n}");

        let o = b
            .ack("alice", ack("phone", "bob", ReceiptKind::Delivered, 3))
            .await;
        assert_eq!(o.next_offset, 4, "{n}");
        assert_eq!(
            o.covered,
            [(1, "b1".to_string()), (2, "b2".into()), (3, "b3".into())],
            "{n}"
        );
        // Another device's DELIVERED behind the furthest DELIVERED cursor covers nothing.
        let o = b
            .ack("alice", ack("laptop", "bob", ReceiptKind::Delivered, 2))
            .await;
        assert_eq!((covered(&o), o.next_offset), (vec![], 3), "{n}");
        // READ is its own kind; clamped to the queue's last offset (8); only bob's items.
        let o = b
            .ack("alice", ack("laptop", "bob", ReceiptKind::Read, 100))
            .await;
        assert_eq!(
            (covered(&o), o.next_offset),
            (vec![1, 2, 3, 4, 5], 9),
            "{n}"
        );
        // Never moves back.
        let o = b
            .ack("alice", ack("laptop", "bob", ReceiptKind::Read, 1))
            .await;
        assert_eq!((covered(&o), o.next_offset), (vec![], 9), "{n}");
        // The phone's DELIVERED catches up: nothing new for DELIVERED beyond 3 ... 5.
        let o = b
            .ack("alice", ack("phone", "bob", ReceiptKind::Delivered, 5))
            .await;
        assert_eq!((covered(&o), o.next_offset), (vec![4, 5], 6), "{n}");
        // up 0 moves nothing and acknowledges nothing.
        let o = b
            .ack("alice", ack("tablet", "carol", ReceiptKind::Read, 0))
            .await;
        assert_eq!((covered(&o), o.next_offset), (vec![], 1), "{n}");

        // The phone resumes at its own cursor (max of its kinds).
        let r = b.read("alice", read_chat("phone", "bob")).await;
        assert!(r.items.is_empty(), "{n}");
        assert_eq!(r.next_offset, 6, "{n}");
        let r = b.read("alice", read_chat("laptop", "bob")).await;
        assert_eq!((r.items.len(), r.next_offset), (0, 9), "{n}");
        // A new device starts where the furthest device is.
        let r = b.read("alice", read_chat("tablet", "bob")).await;
        assert_eq!((r.items.len(), r.next_offset), (0, 9), "{n}");
        // Acknowledged flags on what was covered (any device, any kind).
        let r = b.read("alice", read_all("bob")).await;
        assert!(r.items.iter().all(|i| i.acknowledged), "{n}");
        let r = b.read("alice", read_all("carol")).await;
        assert!(r.items.iter().all(|i| !i.acknowledged), "{n}");
        // Explicit start and limit.
        let r = b
            .read(
                "alice",
                ReadRequest {
                    start: Some(2),
                    limit: 2,
                    ..read_chat("tablet", "bob")
                },
            )
            .await;
        assert_eq!(
            (offsets(&r), r.more, r.next_offset),
            (vec![2, 3], true, 4),
            "{n}"
        );
        let r = b
            .read(
                "alice",
                ReadRequest {
                    start: Some(u64::MAX),
                    ..read_chat("tablet", "bob")
                },
            )
            .await;
        assert_eq!((r.items.len(), r.next_offset), (0, u64::MAX), "{n}");

        // Bad receipts.
        for bad in [
            AckRequest {
                peer: None,
                ..ack("phone", "bob", ReceiptKind::Read, 1)
            },
            AckRequest {
                peer: Some(String::new()),
                ..ack("phone", "bob", ReceiptKind::Read, 1)
            },
            ack("phone", "bob", ReceiptKind::Unspecified, 1),
            AckRequest {
                partition: Partition::Unspecified,
                ..ack("phone", "bob", ReceiptKind::Read, 1)
            },
        ] {
            assert!(
                matches!(
                    b.store.acknowledge("alice", bad).await,
                    Err(StoreError::Invalid(_))
                ),
                "{n}"
            );
        }
        assert!(
            matches!(
                b.store
                    .acknowledge("x:y", ack("phone", "bob", ReceiptKind::Read, 1))
                    .await,
                Err(StoreError::InvalidUser(_))
            ),
            "{n}"
        );
    }
}

#[tokio::test]
async fn notification_and_receipt_partitions_ack_with_and_without_peer() {
    for b in both(FOREVER, 0).await {
        let n = b.name;
        for (from, id) in [("", "n1"), ("bob", "n2"), ("carol", "n3"), ("bob", "n4")] {
            b.append(
                "alice",
                in_partition(Partition::Notification, from, "alice", id),
            )
            .await; // 1..=4
        }
        b.append("alice", chat("bob", "alice", "m1")).await; // 5
        b.append(
            "alice",
            in_partition(Partition::Receipt, "bob", "alice", "r1"),
        )
        .await; // 6
        b.append(
            "alice",
            in_partition(Partition::Receipt, "carol", "alice", "r2"),
        )
        .await; // 7
        b.append(
            "alice",
            in_partition(Partition::Notification, "carol", "alice", "n5"),
        )
        .await; // 8

        let p = b.pending("alice", "phone").await;
        let notes: Vec<u64> = p.notifications.iter().map(|i| i.offset).collect();
        let receipts: Vec<u64> = p.receipts.iter().map(|i| i.offset).collect();
        assert_eq!((notes, receipts), (vec![1, 2, 3, 4, 8], vec![6, 7]), "{n}");

        // One sender, up to 4: bob's 2 and 4; the cursor is (phone, notification, bob).
        let o = b
            .ack(
                "alice",
                ack_in(Partition::Notification, "phone", Some("bob"), 4),
            )
            .await;
        assert_eq!((covered(&o), o.next_offset), (vec![2, 4], 5), "{n}");
        // Again: nothing new, the cursor stays.
        let o = b
            .ack(
                "alice",
                ack_in(Partition::Notification, "phone", Some("bob"), 3),
            )
            .await;
        assert_eq!((covered(&o), o.next_offset), (vec![], 5), "{n}");
        // Every sender up to 3: 1 and 3 (2 is already acknowledged).
        let o = b
            .ack("alice", ack_in(Partition::Notification, "laptop", None, 3))
            .await;
        assert_eq!((covered(&o), o.next_offset), (vec![1, 3], 4), "{n}");
        // Every sender, clamped to the last offset: 8 only (not chat or receipts).
        let o = b
            .ack("alice", ack_in(Partition::Notification, "laptop", None, 99))
            .await;
        assert_eq!((covered(&o), o.next_offset), (vec![8], 9), "{n}");
        let p = b.pending("alice", "phone").await;
        assert!(p.notifications.is_empty(), "{n}");
        assert_eq!(p.receipts.len(), 2, "{n}");
        // A notification after the mark is not covered by it.
        b.append(
            "alice",
            in_partition(Partition::Notification, "bob", "alice", "n6"),
        )
        .await; // 9
        let p = b.pending("alice", "phone").await;
        assert_eq!(
            p.notifications.iter().map(|i| i.offset).collect::<Vec<_>>(),
            [9],
            "{n}"
        );
        assert!(!p.notifications[0].acknowledged, "{n}");
        // Reads without start use the (device, partition, peer-or-empty) cursor.
        let all_notes = |device: &str, peer: Option<&str>| ReadRequest {
            device: device.into(),
            partition: Partition::Notification,
            peer: peer.map(Into::into),
            limit: 0,
            ..Default::default()
        };
        let r = b.read("alice", all_notes("laptop", None)).await;
        assert_eq!(offsets(&r), [9], "{n}");
        let r = b.read("alice", all_notes("phone", Some("bob"))).await;
        assert_eq!(offsets(&r), [9], "{n}");
        let r = b.read("alice", all_notes("phone", Some("carol"))).await;
        assert_eq!(offsets(&r), [3, 8], "{n}");
        // A new device starts at the furthest device's cursor for (partition, "").
        let r = b.read("alice", all_notes("tablet", None)).await;
        assert_eq!(offsets(&r), [9], "{n}");
        let r = b
            .read(
                "alice",
                ReadRequest {
                    start: Some(1),
                    ..all_notes("tablet", None)
                },
            )
            .await;
        assert_eq!(offsets(&r), [1, 2, 3, 4, 8, 9], "{n}");
        assert_eq!(
            r.items.iter().map(|i| i.acknowledged).collect::<Vec<_>>(),
            [true, true, true, true, true, false],
            "{n}"
        );

        // Receipts: with a peer, then without.
        let o = b
            .ack(
                "alice",
                ack_in(Partition::Receipt, "phone", Some("carol"), 7),
            )
            .await;
        assert_eq!((covered(&o), o.next_offset), (vec![7], 8), "{n}");
        let o = b
            .ack("alice", ack_in(Partition::Receipt, "phone", None, 6))
            .await;
        assert_eq!((covered(&o), o.next_offset), (vec![6], 7), "{n}");
        assert!(b.pending("alice", "x").await.receipts.is_empty(), "{n}");
        // The chat item in between is untouched.
        assert!(
            !b.read("alice", read_all("bob")).await.items[0].acknowledged,
            "{n}"
        );
        // up 0: nothing, and an unspecified kind is fine outside chat.
        let o = b
            .ack(
                "alice",
                AckRequest {
                    kind: ReceiptKind::Unspecified,
                    ..ack_in(Partition::Receipt, "pad", None, 0)
                },
            )
            .await;
        assert_eq!((covered(&o), o.next_offset), (vec![], 1), "{n}");
    }
}

#[tokio::test]
async fn conversation_reads_both_directions_in_pages_either_way() {
    for b in both(FOREVER, 0).await {
        let n = b.name;
        // b1 (from bob), a1 (own copy to bob), c1 (from carol), a2 (own copy to carol), b2,
        // a3 (own copy to bob)
        b.append("alice", chat("bob", "alice", "b1")).await;
        b.append("alice", chat("alice", "bob", "a1")).await;
        b.append("alice", chat("carol", "alice", "c1")).await;
        b.append("alice", chat("alice", "carol", "a2")).await;
        b.append("alice", chat("bob", "alice", "b2")).await;
        b.append("alice", chat("alice", "bob", "a3")).await;
        let conv = |start: Option<u64>, limit: usize, newest_first: bool| ReadRequest {
            start,
            limit,
            with_sent: true,
            newest_first,
            ..read_chat("d", "bob")
        };
        let all = b.read("alice", conv(Some(1), 0, false)).await;
        assert_eq!(
            (ids(&all), all.more),
            (
                vec!["b1".to_string(), "a1".into(), "b2".into(), "a3".into()],
                false
            ),
            "{n}"
        );
        let p1 = b.read("alice", conv(Some(1), 3, false)).await;
        assert_eq!(
            (ids(&p1), p1.more, p1.next_offset),
            (vec!["b1".into(), "a1".into(), "b2".into()], true, 6),
            "{n}"
        );
        let p2 = b.read("alice", conv(Some(p1.next_offset), 3, false)).await;
        assert_eq!(
            (ids(&p2), p2.more, p2.next_offset),
            (vec!["a3".to_string()], false, 7),
            "{n}"
        );
        let n1 = b.read("alice", conv(None, 3, true)).await;
        assert_eq!(
            (ids(&n1), n1.more, n1.next_offset),
            (vec!["a3".into(), "b2".into(), "a1".into()], true, 1),
            "{n}"
        );
        let n2 = b.read("alice", conv(Some(n1.next_offset), 3, true)).await;
        assert_eq!(
            (ids(&n2), n2.more, n2.next_offset),
            (vec!["b1".to_string()], false, 0),
            "{n}"
        );
        // A start below 1 is 1.
        let n3 = b.read("alice", conv(Some(0), 3, true)).await;
        assert_eq!(
            (ids(&n3), n3.more, n3.next_offset),
            (vec!["b1".to_string()], false, 0),
            "{n}"
        );
        // Exactly a page: no more.
        let e = b.read("alice", conv(Some(1), 4, false)).await;
        assert_eq!((e.items.len(), e.more), (4, false), "{n}");
        // Without with_sent: only the peer's messages.
        let r = b.read("alice", read_all("bob")).await;
        assert_eq!(ids(&r), ["b1", "b2"], "{n}");
        // The user's own key: every copy, with_sent or not.
        let r = b
            .read(
                "alice",
                ReadRequest {
                    with_sent: true,
                    ..read_all("alice")
                },
            )
            .await;
        assert_eq!(ids(&r), ["a1", "a2", "a3"], "{n}");
        // Newest first over the whole partition, without a peer.
        let every = b
            .read(
                "alice",
                ReadRequest {
                    peer: None,
                    newest_first: true,
                    limit: 2,
                    ..read_chat("d", "bob")
                },
            )
            .await;
        assert_eq!(
            (ids(&every), every.more, every.next_offset),
            (vec!["a3".into(), "b2".into()], true, 4),
            "{n}"
        );
        let every = b
            .read(
                "alice",
                ReadRequest {
                    peer: None,
                    start: Some(2),
                    limit: 2,
                    ..read_chat("d", "bob")
                },
            )
            .await;
        assert_eq!(
            (ids(&every), every.more, every.next_offset),
            (vec!["a1".into(), "c1".into()], true, 4),
            "{n}"
        );
        // Reading twice returns the same (reading moves no cursor).
        let x = b.read("alice", conv(None, 2, false)).await;
        assert_eq!(x, b.read("alice", conv(None, 2, false)).await, "{n}");
    }
}

#[tokio::test]
async fn pending_and_unread_follow_the_cursors() {
    for b in both(FOREVER, 0).await {
        let n = b.name;
        assert_eq!(b.unread("alice").await, Unread::default(), "{n}");
        assert_eq!(
            b.pending("alice", "phone").await,
            PendingForDevice::default(),
            "{n}"
        );
        // bob: 1, 2, 5; carol: 3, 6; a notification: 4; alice's own copy to bob: 7.
        for (from, id) in [("bob", "b1"), ("bob", "b2"), ("carol", "c1")] {
            b.append("alice", chat(from, "alice", id)).await;
        }
        b.append(
            "alice",
            in_partition(Partition::Notification, "", "alice", "n1"),
        )
        .await;
        b.append("alice", chat("bob", "alice", "b3")).await;
        b.append("alice", chat("carol", "alice", "c2")).await;
        b.append("alice", chat("alice", "bob", "own")).await;
        let u = b.unread("alice").await;
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
            ],
            "{n}"
        );
        assert_eq!(u.total, 5, "{n}");
        let p = b.pending("alice", "phone").await;
        assert_eq!(senders(&p), [("bob", 3, 1, 5), ("carol", 2, 3, 6)], "{n}");
        assert_eq!(p.senders[0].last.message_id, "b3", "{n}");
        assert_eq!(
            p.senders[0].last.payload,
            Bytes::from("payload of b3"),
            "{n}"
        );
        assert_eq!(p.senders[1].last.offset, 6, "{n}");
        assert_eq!(p.notifications.len(), 1, "{n}");

        b.ack("alice", ack("phone", "bob", ReceiptKind::Delivered, 2))
            .await;
        b.ack("alice", ack("laptop", "bob", ReceiptKind::Read, 1))
            .await;
        let u = b.unread("alice").await;
        assert_eq!(
            (u.senders[0].unread, u.senders[0].first_offset, u.total),
            (1, 5, 3),
            "{n}"
        );
        assert!(u.acknowledged("bob", 2) && !u.acknowledged("bob", 5), "{n}");
        // Pending is per device: the laptop's own cursor (2), the phone's (3), a new device
        // starts at the furthest (3). Ordered by last offset.
        let p = b.pending("alice", "laptop").await;
        assert_eq!(senders(&p), [("bob", 2, 2, 5), ("carol", 2, 3, 6)], "{n}");
        let p = b.pending("alice", "tablet").await;
        assert_eq!(senders(&p), [("bob", 1, 5, 5), ("carol", 2, 3, 6)], "{n}");
        b.ack("alice", ack("tablet", "carol", ReceiptKind::Read, 3))
            .await;
        b.append("alice", chat("bob", "alice", "b4")).await; // 8
        let p = b.pending("alice", "tablet").await;
        assert_eq!(senders(&p), [("carol", 1, 6, 6), ("bob", 2, 5, 8)], "{n}");

        b.ack("alice", ack("laptop", "bob", ReceiptKind::Read, 8))
            .await;
        b.ack("alice", ack("tablet", "carol", ReceiptKind::Read, 8))
            .await;
        assert_eq!(b.unread("alice").await, Unread::default(), "{n}");
        assert!(b.pending("alice", "laptop").await.senders.is_empty(), "{n}");
        // A device behind still sees its own backlog (bob); carol's is read elsewhere.
        assert_eq!(
            senders(&b.pending("alice", "phone").await),
            [("bob", 2, 5, 8)],
            "{n}"
        );
    }
}

#[tokio::test]
async fn retention_drops_acknowledged_items_and_own_copies_only() {
    let retention = Duration::from_millis(800);
    for b in both(retention, 0).await {
        let n = b.name;
        for i in 1..=4 {
            b.append("bob", chat("alice", "bob", &format!("m{i}")))
                .await;
        }
        b.append("bob", chat("carol", "bob", "c1")).await; // 5
        b.append("bob", chat("bob", "alice", "own")).await; // 6: bob's own copy
        b.append(
            "bob",
            in_partition(Partition::Notification, "", "bob", "n1"),
        )
        .await; // 7
        b.ack("bob", ack("phone", "alice", ReceiptKind::Delivered, 2))
            .await;
        b.ack("bob", ack_in(Partition::Notification, "phone", None, 7))
            .await;
        // Too young: nothing goes.
        let c = b.compact("bob").await;
        assert_eq!((c.dropped, c.kept), (0, 7), "{n}");
        tokio::time::sleep(retention + Duration::from_millis(100)).await;
        // A fresh item after the wait stays (and so does its acknowledgement's cursor).
        b.append("bob", chat("alice", "bob", "m5")).await; // 8
        let c = b.compact("bob").await;
        if b.name == "redis" {
            // (The file store may already have compacted in the background.)
            assert_eq!((c.dropped, c.dropped_unacked, c.kept), (4, 0, 4), "{n}");
        }
        assert_eq!(
            offsets(&b.read("bob", read_all("alice")).await),
            [3, 4, 8],
            "{n}"
        );
        assert_eq!(offsets(&b.read("bob", read_all("carol")).await), [5], "{n}");
        assert!(b.read("bob", read_all("bob")).await.items.is_empty(), "{n}");
        let notes = ReadRequest {
            partition: Partition::Notification,
            peer: None,
            ..read_all("")
        };
        assert!(b.read("bob", notes).await.items.is_empty(), "{n}");
        // Dedupe finds kept items; dropped ids may come again.
        let again = b.append("bob", chat("alice", "bob", "m3")).await;
        assert_eq!((again.duplicate, again.offset), (true, 3), "{n}");
        let fresh = b.append("bob", chat("alice", "bob", "m1")).await;
        assert_eq!((fresh.duplicate, fresh.offset), (false, 9), "{n}");
        // Cursors stay: the phone resumes after 2; pending counts kept items only.
        let r = b.read("bob", read_chat("phone", "alice")).await;
        assert_eq!(offsets(&r), [3, 4, 8, 9], "{n}");
        let p = b.pending("bob", "phone").await;
        assert_eq!(senders(&p), [("carol", 1, 5, 5), ("alice", 4, 3, 9)], "{n}");
        // Everything acknowledged and old: the queue empties, offsets go on.
        b.ack("bob", ack("phone", "alice", ReceiptKind::Read, 9))
            .await;
        b.ack("bob", ack("phone", "carol", ReceiptKind::Read, 9))
            .await;
        tokio::time::sleep(retention + Duration::from_millis(100)).await;
        b.compact("bob").await;
        assert!(
            b.read("bob", read_all("alice")).await.items.is_empty(),
            "{n}"
        );
        assert!(b.pending("bob", "phone").await.senders.is_empty(), "{n}");
        assert_eq!(b.unread("bob").await, Unread::default(), "{n}");
        assert_eq!(
            b.append("bob", chat("alice", "bob", "m1")).await.offset,
            10,
            "{n}"
        );
    }
}

#[tokio::test]
async fn max_queue_items_drops_acknowledged_then_oldest_unacknowledged() {
    // max 4: an append that makes 5 items (more than 4 + 4/8) compacts back to 4.
    for b in both(FOREVER, 4).await {
        let n = b.name;
        b.append("bob", chat("carol", "bob", "c1")).await; // 1
        b.append("bob", chat("carol", "bob", "c2")).await; // 2
        b.append("bob", chat("alice", "bob", "a1")).await; // 3
        b.append("bob", chat("alice", "bob", "a2")).await; // 4
        b.ack("bob", ack("phone", "alice", ReceiptKind::Delivered, 4))
            .await;
        b.append("bob", chat("alice", "bob", "a3")).await; // 5: drops 3 (acknowledged)
        let all = |b: &Backend| {
            let s = b.store.clone();
            async move {
                s.read(
                    "bob",
                    ReadRequest {
                        peer: None,
                        ..read_all("")
                    },
                )
                .await
                .unwrap()
            }
        };
        assert_eq!(offsets(&all(&b).await), [1, 2, 4, 5], "{n}");
        b.append("bob", chat("bob", "dave", "own")).await; // 6: drops 4 (acknowledged)
        assert_eq!(offsets(&all(&b).await), [1, 2, 5, 6], "{n}");
        b.append("bob", chat("dave", "bob", "d1")).await; // 7: drops 6 (own copy)
        assert_eq!(offsets(&all(&b).await), [1, 2, 5, 7], "{n}");
        b.append("bob", chat("dave", "bob", "d2")).await; // 8: drops 1 (oldest unacknowledged)
        assert_eq!(offsets(&all(&b).await), [2, 5, 7, 8], "{n}");
        // The dropped id may come again; kept ones are still duplicates.
        let a = b.append("bob", chat("carol", "bob", "c2")).await;
        assert_eq!((a.offset, a.duplicate), (2, true), "{n}");
        let a = b.append("bob", chat("carol", "bob", "c1")).await; // 9: drops 2
        assert_eq!((a.offset, a.duplicate), (9, false), "{n}");
        assert_eq!(offsets(&all(&b).await), [5, 7, 8, 9], "{n}");
        // An explicit compaction with nothing over the limit drops nothing.
        assert_eq!(
            b.compact("bob").await,
            Compaction {
                dropped: 0,
                dropped_unacked: 0,
                kept: 4
            },
            "{n}"
        );
        let p = b.pending("bob", "phone").await;
        assert_eq!(
            senders(&p),
            [("alice", 1, 5, 5), ("dave", 2, 7, 8), ("carol", 1, 9, 9)],
            "{n}"
        );
        assert_eq!(b.unread("bob").await.total, 4, "{n}");
    }
    // max 8: compaction only past 9 items; an explicit one trims to 8.
    let mut kept: Vec<Vec<u64>> = Vec::new();
    for b in both(FOREVER, 8).await {
        let n = b.name;
        for i in 1..=9 {
            b.append("bob", chat("alice", "bob", &format!("m{i}")))
                .await;
        }
        assert_eq!(b.read("bob", read_all("alice")).await.items.len(), 9, "{n}");
        let c = b.compact("bob").await;
        assert_eq!((c.dropped, c.dropped_unacked, c.kept), (1, 1, 8), "{n}");
        for i in 10..=100 {
            b.append("bob", chat("alice", "bob", &format!("m{i}")))
                .await;
        }
        let k = offsets(&b.read("bob", read_all("alice")).await);
        assert!(k.len() <= 9 && k.last() == Some(&100), "{n}: {k:?}");
        kept.push(k);
    }
    assert_eq!(kept[0], kept[1], "both backends keep the same items");
}

#[tokio::test]
async fn a_restart_keeps_everything_and_offsets_continue() {
    for mut b in both(FOREVER, 0).await {
        let n = b.name;
        for i in 1..=3 {
            b.append("alice", chat("bob", "alice", &format!("b{i}")))
                .await;
        }
        b.append(
            "alice",
            in_partition(Partition::Notification, "", "alice", "n1"),
        )
        .await;
        let item = chat("alice", "carol", "a1");
        b.copy("carol", item.clone(), own_copy(&item)).await; // alice 5
        b.ack("alice", ack("phone", "bob", ReceiptKind::Delivered, 2))
            .await;
        let before = (
            b.read("alice", read_all("bob")).await,
            b.read("alice", read_all("alice")).await,
            b.pending("alice", "phone").await,
            b.pending("alice", "tablet").await,
            b.unread("alice").await,
            b.read("carol", read_all("alice")).await,
        );
        b.restart().await;
        let after = (
            b.read("alice", read_all("bob")).await,
            b.read("alice", read_all("alice")).await,
            b.pending("alice", "phone").await,
            b.pending("alice", "tablet").await,
            b.unread("alice").await,
            b.read("carol", read_all("alice")).await,
        );
        assert_eq!(before, after, "{n}");
        assert!(
            after.0.items[0].acknowledged && !after.0.items[2].acknowledged,
            "{n}"
        );
        // Dedupe, cursors and offsets survive.
        let d = b.append("alice", chat("bob", "alice", "b2")).await;
        assert_eq!((d.offset, d.duplicate), (2, true), "{n}");
        assert_eq!(
            b.append("alice", chat("bob", "alice", "b4")).await.offset,
            6,
            "{n}"
        );
        assert_eq!(
            b.append("carol", chat("dave", "carol", "d1")).await.offset,
            2,
            "{n}"
        );
        let r = b.read("alice", read_chat("phone", "bob")).await;
        assert_eq!(offsets(&r), [3, 6], "{n}");
        let o = b
            .ack("alice", ack("laptop", "bob", ReceiptKind::Delivered, 6))
            .await;
        assert_eq!(covered(&o), [3, 6], "{n}");
    }
}

#[tokio::test]
async fn shutdown_refuses_later_calls() {
    for b in both(FOREVER, 0).await {
        let n = b.name;
        b.append("alice", chat("bob", "alice", "m1")).await;
        b.store.shutdown().await;
        assert!(
            matches!(
                b.store
                    .enqueue_append("alice", chat("bob", "alice", "m2"))
                    .await
                    .map(|_| ()),
                Err(StoreError::Closed)
            ),
            "{n}"
        );
        assert!(
            matches!(
                b.store.read("alice", read_all("bob")).await,
                Err(StoreError::Closed)
            ),
            "{n}"
        );
    }
}

#[tokio::test]
async fn redis_outage_is_unavailable_then_recovers() {
    let mut server = RedisServer::start().expect("redis-server");
    let cfg = RedisConfig {
        response_timeout: Duration::from_millis(500),
        ..redis_config(server.url(), "t", FOREVER, 0)
    };
    let redis = RedisStore::connect(cfg).await.unwrap();
    let s = Store::Redis(redis.clone());
    assert_eq!(
        s.append("alice", chat("bob", "alice", "m1"))
            .await
            .unwrap()
            .offset,
        1
    );
    server.kill();
    let started = Instant::now();
    for _ in 0..3 {
        let r = s.append("alice", chat("bob", "alice", "m2")).await;
        assert!(
            matches!(r, Err(StoreError::Unavailable(_))),
            "{:?}",
            r.map(|_| ())
        );
    }
    assert!(matches!(
        s.read("alice", read_all("bob")).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(30));
    server.restart().unwrap();
    // The same store reconnects; the AOF brought back the first item and its offset.
    let a = eventually("append after restart", || {
        s.append("alice", chat("bob", "alice", "m2"))
    })
    .await;
    assert_eq!((a.offset, a.duplicate), (2, false));
    let r = s.read("alice", read_all("bob")).await.unwrap();
    assert_eq!(ids(&r), ["m1", "m2"]);
    // Scripts are loaded again after the restart emptied the script cache.
    assert_eq!(s.unread("alice").await.unwrap().total, 2);
    assert!(redis.durability_warnings().await.unwrap().is_empty());
}

#[tokio::test]
async fn compact_due_runs_retention_for_the_users_that_need_it() {
    let server = RedisServer::start().expect("redis-server");
    let retention = Duration::from_millis(800);
    let redis = RedisStore::connect(redis_config(server.url(), "t", retention, 0))
        .await
        .unwrap();
    let s = Store::Redis(redis.clone());
    // alice: an acknowledged item and an own copy; bob: only unacknowledged items.
    s.append("alice", chat("bob", "alice", "b1")).await.unwrap();
    s.append("alice", chat("bob", "alice", "b2")).await.unwrap();
    s.append("alice", chat("alice", "bob", "own"))
        .await
        .unwrap();
    s.append("bob", chat("carol", "bob", "c1")).await.unwrap();
    s.acknowledge("alice", ack("phone", "bob", ReceiptKind::Read, 1))
        .await
        .unwrap();
    assert_eq!(
        redis.compact_due(10).await.unwrap(),
        0,
        "nothing is old yet"
    );
    tokio::time::sleep(retention + Duration::from_millis(100)).await;
    assert_eq!(redis.compact_due(10).await.unwrap(), 1, "alice only");
    assert_eq!(
        offsets(&s.read("alice", read_all("bob")).await.unwrap()),
        [2]
    );
    assert!(
        s.read("alice", read_all("alice"))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(
        s.read("bob", read_all("carol")).await.unwrap().items.len(),
        1
    );
    assert_eq!(
        redis.compact_due(10).await.unwrap(),
        0,
        "done until b2 is acknowledged"
    );
    s.acknowledge("alice", ack("phone", "bob", ReceiptKind::Read, 2))
        .await
        .unwrap();
    // b2 is already old: due at once.
    assert_eq!(redis.compact_due(10).await.unwrap(), 1);
    assert!(
        s.read("alice", read_all("bob"))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(redis.compact_due(0).await.unwrap(), 0);
    // Every user with a queue is listed for check/inspect.
    let mut conn = redis.connection();
    let mut users: Vec<String> = redis::cmd("SMEMBERS")
        .arg(redis.keys().users())
        .query_async(&mut conn)
        .await
        .unwrap();
    users.sort();
    assert_eq!(users, ["alice", "bob"]);
}

/// Every key the queue writes is one of the documented ones (`redis/keys.rs`): a user's keys
/// under its hash tag, and the two global sets.
#[tokio::test]
async fn redis_keys_follow_the_schema() {
    let server = RedisServer::start().expect("redis-server");
    let redis = RedisStore::connect(redis_config(
        server.url(),
        "t",
        Duration::from_secs(3600),
        4,
    ))
    .await
    .unwrap();
    let b = Backend {
        name: "redis",
        store: Store::Redis(redis.clone()),
        dir: None,
        server: None,
        retention: FOREVER,
        max: 4,
    };
    for i in 0..6 {
        let item = chat("alice", "bob", &format!("a{i}"));
        b.copy("bob", item.clone(), own_copy(&item)).await;
    }
    for p in [Partition::Notification, Partition::Receipt] {
        b.append(
            "bob",
            in_partition(p, "sys", "bob", &format!("x{}", p as i32)),
        )
        .await;
    }
    b.ack("bob", ack("phone", "alice", ReceiptKind::Read, 3))
        .await;
    b.ack("bob", ack_in(Partition::Notification, "phone", None, 9))
        .await;
    b.read(
        "alice",
        ReadRequest {
            with_sent: true,
            ..read_all("bob")
        },
    )
    .await;
    let mut conn = redis.connection();
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    keys.sort();
    let allowed = [
        "seq", "q", "ids", "ack", "cur", "sent", "snd:1", "ix:1", "ix:2", "ix:3", "po:1", "po:2",
        "po:3", "un:2", "un:3",
    ];
    for k in &keys {
        let ok = k == "t:users"
            || k == "t:compact"
            || ["alice", "bob"].iter().any(|u| {
                k.strip_prefix(&format!("t:{{{u}}}:"))
                    .is_some_and(|rest| allowed.contains(&rest))
            });
        assert!(ok, "unexpected key {k:?} in {keys:?}");
    }
    assert!(keys.contains(&"t:{bob}:un:3".to_string()), "{keys:?}");
    assert!(keys.contains(&"t:compact".to_string()), "{keys:?}");
    let kind: String = redis::cmd("TYPE")
        .arg("t:{bob}:q")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kind, "stream");
}

/// Random operations on a few users, senders and devices, applied to a model and to both
/// backends; every result is compared (timestamps aside).
mod model {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    const USERS: [&str; 3] = ["alice", "bob", "carol"];
    /// Senders: the users, a system sender and the empty sender.
    const FROMS: [&str; 5] = ["alice", "bob", "carol", "sys", ""];
    const DEVICES: [&str; 2] = ["phone", "laptop"];
    const PARTITIONS: [Partition; 4] = [
        Partition::Chat,
        Partition::Notification,
        Partition::Receipt,
        Partition::Unspecified,
    ];
    const KINDS: [ReceiptKind; 3] = [
        ReceiptKind::Delivered,
        ReceiptKind::Read,
        ReceiptKind::Unspecified,
    ];

    #[derive(Debug, Clone)]
    pub enum Op {
        Append {
            user: usize,
            from: usize,
            partition: usize,
            id: Option<u8>,
            dedupe: bool,
        },
        /// From one user to another (or itself), with the sender's copy.
        Copy {
            to: usize,
            from: usize,
            id: Option<u8>,
            dedupe: bool,
            dedupe_copy: bool,
        },
        Ack {
            user: usize,
            device: usize,
            partition: usize,
            peer: Option<usize>,
            kind: usize,
            up: u64,
        },
        Read {
            user: usize,
            device: usize,
            partition: usize,
            peer: Option<usize>,
            start: Option<u64>,
            limit: usize,
            with_sent: bool,
            newest_first: bool,
        },
        Pending {
            user: usize,
            device: usize,
        },
        Unread {
            user: usize,
        },
        Compact {
            user: usize,
        },
    }

    fn partition() -> impl Strategy<Value = usize> {
        prop_oneof![6 => Just(0usize), 2 => Just(1usize), 2 => Just(2usize), 1 => Just(3usize)]
    }

    /// A sender (an index into FROMS): mostly other users, sometimes the user itself, the
    /// system sender or the empty one.
    fn sender() -> impl Strategy<Value = usize> {
        prop_oneof![3 => Just(1usize), 3 => Just(2usize), 2 => Just(0usize), 1 => Just(3usize), 1 => Just(4usize)]
    }

    pub fn op(users: usize) -> impl Strategy<Value = Op> {
        let id = proptest::option::weighted(0.9, 0..5u8);
        prop_oneof![
            6 => (0..users, sender(), partition(), id.clone(), any::<bool>())
                .prop_map(|(user, from, partition, id, dedupe)| Op::Append { user, from, partition, id, dedupe }),
            3 => (0..users, 0..users, id, any::<bool>(), any::<bool>())
                .prop_map(|(to, from, id, dedupe, dedupe_copy)| Op::Copy { to, from, id, dedupe, dedupe_copy }),
            5 => (0..users, 0..DEVICES.len(), partition(), proptest::option::weighted(0.85, sender()), 0..KINDS.len(), 0..12u64)
                .prop_map(|(user, device, partition, peer, kind, up)| Op::Ack { user, device, partition, peer, kind, up }),
            4 => (
                (0..users, 0..DEVICES.len(), partition(), proptest::option::weighted(0.8, sender())),
                (proptest::option::weighted(0.3, 0..14u64), 0..5usize, any::<bool>(), any::<bool>()),
            )
                .prop_map(|((user, device, partition, peer), (start, limit, with_sent, newest_first))| Op::Read {
                    user, device, partition, peer, start, limit, with_sent, newest_first,
                }),
            // A resume: a device reads a peer's chat from its cursor.
            3 => (0..users, 0..DEVICES.len(), sender()).prop_map(|(user, device, peer)| Op::Read {
                user,
                device,
                partition: 0,
                peer: Some(peer),
                start: None,
                limit: 0,
                with_sent: false,
                newest_first: false,
            }),
            2 => (0..users, 0..DEVICES.len()).prop_map(|(user, device)| Op::Pending { user, device }),
            1 => (0..users).prop_map(|user| Op::Unread { user }),
            1 => (0..users).prop_map(|user| Op::Compact { user }),
        ]
    }

    #[derive(Debug, Clone, PartialEq)]
    struct MItem {
        item: Item,
    }

    /// One user's queue, kept the simplest way.
    #[derive(Debug, Default)]
    struct Queue {
        items: Vec<MItem>,
        last: u64,
        /// (partition, from, device, kind) → next offset.
        cursors: BTreeMap<(i32, String, String, i32), u64>,
    }

    /// The model of every user's queue.
    #[derive(Debug, Default)]
    pub struct Model {
        queues: BTreeMap<String, Queue>,
        pub max: usize,
    }

    fn invalid(what: &str) -> StoreError {
        StoreError::Invalid(what.into())
    }

    impl Queue {
        fn droppable(user: &str, it: &Item) -> bool {
            it.acknowledged || it.from == user
        }

        fn compact(&mut self, user: &str, max: usize) -> Compaction {
            let n = self.items.len();
            let mut keep = vec![true; n];
            let mut kept = n;
            let mut dropped_unacked = 0;
            if max > 0 && kept > max {
                for pass in [true, false] {
                    for (i, it) in self.items.iter().enumerate() {
                        if kept <= max {
                            break;
                        }
                        if keep[i] && Self::droppable(user, &it.item) == pass {
                            keep[i] = false;
                            kept -= 1;
                            if !it.item.acknowledged {
                                dropped_unacked += 1;
                            }
                        }
                    }
                }
            }
            let mut k = keep.iter();
            self.items.retain(|_| *k.next().unwrap());
            Compaction {
                dropped: (n - kept) as u64,
                dropped_unacked,
                kept: kept as u64,
            }
        }

        fn append(&mut self, new: NewItem) -> Result<(u64, bool), StoreError> {
            if new.partition == Partition::Unspecified {
                return Err(invalid("unspecified"));
            }
            if new.dedupe
                && !new.message_id.is_empty()
                && let Some(x) = self
                    .items
                    .iter()
                    .find(|x| x.item.from == new.from && x.item.message_id == new.message_id)
            {
                return Ok((x.item.offset, true));
            }
            self.last += 1;
            self.items.push(MItem {
                item: Item {
                    offset: self.last,
                    partition: new.partition,
                    from: new.from,
                    to: new.to,
                    payload: new.payload,
                    timestamp: 0,
                    acknowledged: false,
                    message_id: new.message_id,
                    device: new.device,
                    peer_offset: new.peer_offset,
                },
            });
            Ok((self.last, false))
        }

        /// The limit applied after a write (past the limit by an eighth).
        fn limit(&mut self, user: &str, max: usize) {
            if max > 0 && self.items.len() > max + max / 8 {
                self.compact(user, max);
            }
        }

        fn read_cursor(&self, device: &str, p: i32, from: &str) -> u64 {
            let of = |d: Option<&str>| {
                self.cursors
                    .iter()
                    .filter(|((cp, cf, cd, _), _)| {
                        *cp == p && cf == from && d.is_none_or(|d| d == cd)
                    })
                    .map(|(_, v)| *v)
                    .max()
            };
            of(Some(device)).or_else(|| of(None)).unwrap_or(1).max(1)
        }

        fn move_cursor(&mut self, key: (i32, String, String, i32), to: u64) -> u64 {
            let cur = self.cursors.get(&key).copied().unwrap_or(1);
            if to > cur {
                self.cursors.insert(key, to);
                to
            } else {
                cur
            }
        }

        fn mark(&mut self, p: Partition, from: &str, up: u64) -> Vec<(u64, String)> {
            let mut out = Vec::new();
            for x in &mut self.items {
                let it = &mut x.item;
                if it.partition == p
                    && (from.is_empty() || it.from == from)
                    && it.offset <= up
                    && !it.acknowledged
                {
                    it.acknowledged = true;
                    out.push((it.offset, it.message_id.clone()));
                }
            }
            out
        }

        fn ack(&mut self, req: AckRequest) -> Result<AckOutcome, StoreError> {
            let up = req.up_to_offset.min(self.last);
            let kind = req.kind as i32;
            match req.partition {
                Partition::Chat => {
                    let peer = match req.peer.as_deref() {
                        Some(p) if !p.is_empty() => p.to_string(),
                        _ => return Err(invalid("peer")),
                    };
                    if req.kind == ReceiptKind::Unspecified {
                        return Err(invalid("kind"));
                    }
                    let p = Partition::Chat as i32;
                    let furthest = self
                        .cursors
                        .iter()
                        .filter(|((cp, cf, _, ck), _)| *cp == p && *cf == peer && *ck == kind)
                        .map(|(_, v)| *v)
                        .max()
                        .unwrap_or(1);
                    let covered = self
                        .items
                        .iter()
                        .filter(|x| {
                            x.item.partition == Partition::Chat
                                && x.item.from == peer
                                && x.item.offset >= furthest
                                && x.item.offset <= up
                        })
                        .map(|x| (x.item.offset, x.item.message_id.clone()))
                        .collect();
                    let next_offset =
                        self.move_cursor((p, peer.clone(), req.device.clone(), kind), up + 1);
                    if up > 0 {
                        self.mark(Partition::Chat, &peer, up);
                    }
                    Ok(AckOutcome {
                        covered,
                        next_offset,
                    })
                }
                Partition::Notification | Partition::Receipt => {
                    let from = req.peer.unwrap_or_default();
                    let covered = if up > 0 {
                        self.mark(req.partition, &from, up)
                    } else {
                        Vec::new()
                    };
                    let next_offset = self.move_cursor(
                        (req.partition as i32, from, req.device.clone(), kind),
                        up + 1,
                    );
                    Ok(AckOutcome {
                        covered,
                        next_offset,
                    })
                }
                Partition::Unspecified => Err(invalid("partition")),
            }
        }

        fn read(&self, user: &str, req: &ReadRequest) -> Result<ReadBatch, StoreError> {
            if req.partition == Partition::Unspecified {
                return Err(invalid("partition"));
            }
            let from = req.peer.as_deref().unwrap_or("");
            let start = match (req.start, req.newest_first) {
                (Some(s), _) => s,
                (None, false) => self.read_cursor(&req.device, req.partition as i32, from),
                (None, true) => u64::MAX,
            }
            .max(1);
            let mut matching: Vec<&Item> = self
                .items
                .iter()
                .map(|x| &x.item)
                .filter(|it| it.partition == req.partition)
                .filter(|it| {
                    from.is_empty()
                        || it.from == from
                        || (req.with_sent
                            && req.partition == Partition::Chat
                            && from != user
                            && it.from == user
                            && it.to == from)
                })
                .filter(|it| {
                    if req.newest_first {
                        it.offset <= start
                    } else {
                        it.offset >= start
                    }
                })
                .collect();
            if req.newest_first {
                matching.reverse();
            }
            let limit = if req.limit == 0 {
                usize::MAX
            } else {
                req.limit
            };
            let more = matching.len() > limit;
            let items: Vec<Item> = matching.into_iter().take(limit).cloned().collect();
            let next_offset = if req.newest_first {
                items.last().map_or(0, |i| i.offset - 1)
            } else {
                items.last().map_or(start, |i| i.offset + 1)
            };
            Ok(ReadBatch {
                items,
                more,
                next_offset,
            })
        }

        fn chat_senders(&self, user: &str) -> Vec<String> {
            let mut s: Vec<String> = self
                .items
                .iter()
                .filter(|x| x.item.partition == Partition::Chat && x.item.from != user)
                .map(|x| x.item.from.clone())
                .collect();
            s.sort();
            s.dedup();
            s
        }

        fn pending(&self, user: &str, device: &str) -> PendingForDevice {
            let mut senders = Vec::new();
            for from in self.chat_senders(user) {
                let cursor = self.read_cursor(device, Partition::Chat as i32, &from);
                let rest: Vec<&Item> = self
                    .items
                    .iter()
                    .map(|x| &x.item)
                    .filter(|it| {
                        it.partition == Partition::Chat && it.from == from && it.offset >= cursor
                    })
                    .collect();
                if let (Some(first), Some(last)) = (rest.first(), rest.last()) {
                    senders.push(SenderPending {
                        from: from.clone(),
                        unread: rest.len() as u64,
                        first_offset: first.offset,
                        last_offset: last.offset,
                        last: (*last).clone(),
                    });
                }
            }
            senders.sort_by_key(|s| s.last_offset);
            let unacked = |p: Partition| -> Vec<Item> {
                self.items
                    .iter()
                    .map(|x| &x.item)
                    .filter(|it| it.partition == p && !it.acknowledged)
                    .cloned()
                    .collect()
            };
            PendingForDevice {
                notifications: unacked(Partition::Notification),
                senders,
                receipts: unacked(Partition::Receipt),
            }
        }

        fn unread(&self, user: &str) -> Unread {
            let mut senders = Vec::new();
            for from in self.chat_senders(user) {
                let cursor = self
                    .cursors
                    .iter()
                    .filter(|((p, f, _, _), _)| *p == Partition::Chat as i32 && *f == from)
                    .map(|(_, v)| *v)
                    .max()
                    .unwrap_or(1)
                    .max(1);
                let rest: Vec<u64> = self
                    .items
                    .iter()
                    .filter(|x| {
                        x.item.partition == Partition::Chat
                            && x.item.from == from
                            && x.item.offset >= cursor
                    })
                    .map(|x| x.item.offset)
                    .collect();
                if let (Some(first), Some(last)) = (rest.first(), rest.last()) {
                    senders.push(SenderUnread {
                        from,
                        unread: rest.len() as u64,
                        first_offset: *first,
                        last_offset: *last,
                    });
                }
            }
            let total = senders.iter().map(|s| s.unread).sum();
            Unread { senders, total }
        }
    }

    /// A result reduced to what both backends and the model must agree on.
    #[derive(Debug, PartialEq)]
    pub enum Outcome {
        Error(&'static str),
        Appended(u64, bool),
        Copied((u64, bool), Result<(u64, bool), &'static str>),
        Ack(AckOutcome),
        Read(ReadBatch),
        Pending(PendingForDevice),
        Unread(Unread),
        Compacted(Compaction),
    }

    fn kind(e: &StoreError) -> &'static str {
        match e {
            StoreError::Invalid(_) => "invalid",
            StoreError::InvalidUser(_) => "invalid user",
            StoreError::Closed => "closed",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Internal(_) => "internal",
            StoreError::Io { .. } => "io",
            StoreError::Corrupt { .. } => "corrupt",
        }
    }

    fn new_item(
        from: &str,
        to: &str,
        partition: Partition,
        id: Option<u8>,
        dedupe: bool,
        n: usize,
    ) -> NewItem {
        let message_id = id.map_or(String::new(), |i| format!("m{i}"));
        NewItem {
            partition,
            from: from.into(),
            to: to.into(),
            payload: Bytes::from(format!("payload {n} of {message_id}")),
            message_id,
            device: format!("d{}", n % 3),
            peer_offset: 0,
            dedupe,
        }
    }

    fn read_req(op: &Op) -> ReadRequest {
        let Op::Read {
            device,
            partition,
            peer,
            start,
            limit,
            with_sent,
            newest_first,
            ..
        } = op
        else {
            unreachable!()
        };
        ReadRequest {
            device: DEVICES[*device].into(),
            partition: PARTITIONS[*partition],
            peer: peer.map(|p| FROMS[p].to_string()),
            start: *start,
            limit: *limit,
            with_sent: *with_sent,
            newest_first: *newest_first,
        }
    }

    fn ack_req(op: &Op) -> AckRequest {
        let Op::Ack {
            device,
            partition,
            peer,
            kind,
            up,
            ..
        } = op
        else {
            unreachable!()
        };
        AckRequest {
            device: DEVICES[*device].into(),
            partition: PARTITIONS[*partition],
            peer: peer.map(|p| FROMS[p].to_string()),
            kind: KINDS[*kind],
            up_to_offset: *up,
        }
    }

    impl Model {
        fn q(&mut self, user: &str) -> &mut Queue {
            self.queues.entry(user.to_string()).or_default()
        }

        pub fn apply(&mut self, op: &Op, n: usize) -> Outcome {
            let max = self.max;
            match op {
                Op::Append {
                    user,
                    from,
                    partition,
                    id,
                    dedupe,
                } => {
                    let user = USERS[*user];
                    let item =
                        new_item(FROMS[*from], user, PARTITIONS[*partition], *id, *dedupe, n);
                    match self.q(user).append(item) {
                        Ok((o, d)) => {
                            self.q(user).limit(user, max);
                            Outcome::Appended(o, d)
                        }
                        Err(e) => Outcome::Error(kind(&e)),
                    }
                }
                Op::Copy {
                    to,
                    from,
                    id,
                    dedupe,
                    dedupe_copy,
                } => {
                    let (to, from) = (USERS[*to], USERS[*from]);
                    let item = new_item(from, to, Partition::Chat, *id, *dedupe, n);
                    let copy = NewItem {
                        dedupe: *dedupe_copy,
                        ..item.clone()
                    };
                    let (o, d) = self.q(to).append(item).unwrap();
                    if d {
                        return Outcome::Copied((o, d), Ok((0, true)));
                    }
                    let copy = NewItem {
                        peer_offset: o,
                        ..copy
                    };
                    let c = self.q(from).append(copy).unwrap();
                    // Both users' limits once both items are in.
                    self.q(to).limit(to, max);
                    self.q(from).limit(from, max);
                    Outcome::Copied((o, d), Ok(c))
                }
                Op::Ack { user, .. } => match self.q(USERS[*user]).ack(ack_req(op)) {
                    Ok(o) => Outcome::Ack(o),
                    Err(e) => Outcome::Error(kind(&e)),
                },
                Op::Read { user, .. } => {
                    let user = USERS[*user];
                    match self.q(user).read(user, &read_req(op)) {
                        Ok(r) => Outcome::Read(r),
                        Err(e) => Outcome::Error(kind(&e)),
                    }
                }
                Op::Pending { user, device } => {
                    let user = USERS[*user];
                    Outcome::Pending(self.q(user).pending(user, DEVICES[*device]))
                }
                Op::Unread { user } => {
                    let user = USERS[*user];
                    Outcome::Unread(self.q(user).unread(user))
                }
                Op::Compact { user } => {
                    let user = USERS[*user];
                    Outcome::Compacted(self.q(user).compact(user, max))
                }
            }
        }
    }

    pub async fn run(b: &Backend, op: &Op, n: usize) -> Outcome {
        let s = &b.store;
        let r: Result<Outcome, StoreError> = async {
            Ok(match op {
                Op::Append {
                    user,
                    from,
                    partition,
                    id,
                    dedupe,
                } => {
                    let user = USERS[*user];
                    let item =
                        new_item(FROMS[*from], user, PARTITIONS[*partition], *id, *dedupe, n);
                    let a = s.append(user, item).await?;
                    Outcome::Appended(a.offset, a.duplicate)
                }
                Op::Copy {
                    to,
                    from,
                    id,
                    dedupe,
                    dedupe_copy,
                } => {
                    let (to, from) = (USERS[*to], USERS[*from]);
                    let item = new_item(from, to, Partition::Chat, *id, *dedupe, n);
                    let copy = CopyTo {
                        user: from.into(),
                        item: NewItem {
                            dedupe: *dedupe_copy,
                            ..item.clone()
                        },
                    };
                    let (a, c) = s.enqueue_append_with_copy(to, item, copy).await?;
                    let a = a.wait().await?;
                    let c = c
                        .wait()
                        .await
                        .map(|c| (c.offset, c.duplicate))
                        .map_err(|e| kind(&e));
                    Outcome::Copied((a.offset, a.duplicate), c)
                }
                Op::Ack { user, .. } => {
                    Outcome::Ack(s.acknowledge(USERS[*user], ack_req(op)).await?)
                }
                Op::Read { user, .. } => {
                    let r = s.read(USERS[*user], read_req(op)).await?;
                    Outcome::Read(ReadBatch {
                        items: untimed(&r.items),
                        ..r
                    })
                }
                Op::Pending { user, device } => Outcome::Pending(untimed_pending(
                    &s.pending(USERS[*user], DEVICES[*device]).await?,
                )),
                Op::Unread { user } => Outcome::Unread(s.unread(USERS[*user]).await?),
                Op::Compact { user } => Outcome::Compacted(b.compact(USERS[*user]).await),
            })
        }
        .await;
        r.unwrap_or_else(|e| Outcome::Error(kind(&e)))
    }

    /// Runs `cases` random sequences (over `users` users, with `max` items per queue) on the
    /// model and on a file store and a Redis store (one redis-server, a key prefix per case).
    pub fn check(cases: u32, users: usize, max: usize, len: std::ops::Range<usize>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let server = RedisServer::start().expect("redis-server");
        let case = std::cell::Cell::new(0u32);
        let mut runner = TestRunner::new(Config {
            failure_persistence: None,
            ..Config::with_cases(cases)
        });
        let result = runner.run(&proptest::collection::vec(op(users), len), |ops| {
            case.set(case.get() + 1);
            let prefix = format!("case{}", case.get());
            rt.block_on(async {
                let file = file_backend(FOREVER, max);
                let redis = Backend {
                    name: "redis",
                    store: Store::Redis(
                        RedisStore::connect(redis_config(server.url(), &prefix, FOREVER, max))
                            .await
                            .unwrap(),
                    ),
                    dir: None,
                    server: None,
                    retention: FOREVER,
                    max,
                };
                let mut model = Model {
                    max,
                    ..Model::default()
                };
                for (n, op) in ops.iter().enumerate() {
                    let want = model.apply(op, n);
                    for b in [&file, &redis] {
                        let got = run(b, op, n).await;
                        if got != want {
                            return Err(TestCaseError::fail(format!(
                                "op {n} {op:?} on {}:\n got {got:?}\nwant {want:?}",
                                b.name
                            )));
                        }
                    }
                }
                file.store.shutdown().await;
                Ok(())
            })
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }
}

#[test]
fn backends_match_the_model() {
    model::check(24, 3, 0, 20..100);
}

/// With a small `max_queue_items`: compaction after appends and on demand. One user at a time
/// (the file store compacts in the background after each batch, at most one user per batch, so
/// only a single user's queue compacts at the same moment on both backends).
#[test]
fn backends_match_the_model_with_a_queue_limit() {
    model::check(24, 1, 8, 20..100);
}
