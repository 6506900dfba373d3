//! [`QueueStore`] on Redis: the same rules as the file store (`file/queue.rs`), one Lua script
//! per operation.
//!
//! # The Redis backend
//!
//! **Keys** (all of one user carry the hash tag `{user}`; the full table is in [`Keys`]):
//! the items are a stream `{u}:q` with ID `<offset>-0` (XADD refuses an ID that is not larger
//! than the last one, so an offset is never reused, also after items were deleted); offsets come
//! from `INCR {u}:seq`; the timestamp from Redis's `TIME` inside the script (never older than the
//! item before it, so the items past the retention are always a prefix of the stream). Next to
//! the stream:
//! - `{u}:ix:<p>`: a lexicographic zset per partition of `<len(from)>:<from><16-digit offset>`,
//!   so the items of one (partition, sender) are a range (`ZRANGEBYLEX`, `ZLEXCOUNT`) without one
//!   key per sender: a script knows every key it may touch before it runs (compaction drops items
//!   of any sender), and `pending`/`unread`/`acknowledge` need no round trip to learn key names;
//! - `{u}:po:<p>`: every offset of a partition (reads without a peer);
//! - `{u}:un:<p>`: the unacknowledged offsets of the notification and receipt partitions
//!   (`pending` and acknowledgements "for every sender" read them without a scan);
//! - `{u}:snd:1`: the chat senders (score = last offset), for `pending` and `unread`;
//! - `{u}:sent`: the user's own chat copies by recipient (lexicographic like `ix`), for
//!   `with_sent`;
//! - `{u}:ids`: dedupe, `<len(from)>:<from><message id>` → offset of the first kept item, and
//!   `#<same>` → how many other kept items share it (stored without dedupe), so that dropping
//!   the first one hands the id to the next one as the file store's rebuilt index does;
//! - `{u}:ack`: acknowledgement watermarks `<p>|<from>` and `<p>|` (every sender): an item is
//!   acknowledged iff its offset ≤ max of the two (receipts cover prefixes, and the mark is
//!   clamped to the last offset, so a later item is never covered by an older mark);
//! - `{u}:cur`: device cursors `(device, partition, from, kind) → next offset` plus the maxima per
//!   device, per kind and overall, so `read`'s default start, `covered` and `unread` read a field
//!   or two instead of walking devices.
//!
//! Global: `users` (a set of every user with a queue, for `bimip check`/`inspect`) and `compact`
//! (user → unix ms when retention may next drop something, kept by the append, acknowledgement
//! and compaction scripts; [`RedisStore::compact_due`] walks it).
//!
//! **Round trips**: `enqueue_append`, `enqueue_append_with_copy` (both users' keys in one script:
//! fine on a standalone Redis; Redis Cluster would need two calls, and the global `users` and
//! `compact` keys touched by the append and acknowledgement scripts would have to move under a
//! user's hash tag or into separate calls), `acknowledge`, `read`,
//! `pending`, `unread` and [`RedisStore::compact_user`] are one script call each;
//! [`RedisStore::compact_due`] is one call plus one per user compacted. A script loaded for the
//! first time on a server costs one more (EVALSHA answered with NOSCRIPT, SCRIPT LOAD, EVALSHA).
//!
//! **Compaction**: `max_queue_items` is enforced inside the append script once the stream is past
//! the limit by an eighth (acknowledged items and own copies first, then the oldest
//! unacknowledged ones); retention runs in [`RedisStore::compact_user`], called by
//! [`RedisStore::compact_due`]. Dropped items take their index entries and dedupe ids with them;
//! cursors and watermarks stay. Droppable items are found through the indexes (the user's own
//! items, and the ranges each acknowledgement mark covers, merged in offset order), never by
//! walking the queue, so a compaction costs in proportion to what it drops: it is one script and
//! blocks Redis meanwhile, measured at about 45 µs per dropped item on a busy 2-core machine
//! (1,001 items in about 45 ms). At the default `max_queue_items` (100,000) a user past the limit
//! drops an eighth, 12,500 items (about half a second), once per 12,500 appends.
//!
//! **Durability**: a script runs atomically and its effects go to the AOF as one `MULTI`/`EXEC`;
//! with `appendfsync always` the reply is sent after the fsync, so every [`Pending`] is handed out
//! ready. Checks come before the first write of every script (Lua has no rollback). A reply lost
//! on the way ([`StoreError::Unavailable`]) leaves it open whether the write happened: a
//! deduplicated append can be retried.

use crate::rules::check_user;
use std::sync::LazyLock;
use std::sync::atomic::Ordering;

use bimip_proto::v1::{Partition, ReceiptKind};
use bytes::Bytes;
use redis::{Script, ScriptInvocation, Value};

use super::{Keys, RedisStore, map_err};
use crate::{
    AckOutcome, AckRequest, Appended, Compaction, CopyTo, Item, NewItem, Pending, PendingForDevice,
    QueueStore, ReadBatch, ReadRequest, SenderPending, SenderUnread, StoreError, Unread,
};

/// One script per operation, each the shared helpers followed by its own code.
macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("lua/common.lua"),
                include_str!(concat!("lua/", $file))
            ))
        })
    };
}

static APPEND: LazyLock<Script> = script!("append.lua");
static APPEND_COPY: LazyLock<Script> = script!("append_copy.lua");
static ACK: LazyLock<Script> = script!("ack.lua");
static READ: LazyLock<Script> = script!("read.lua");
static PENDING: LazyLock<Script> = script!("pending.lua");
static UNREAD: LazyLock<Script> = script!("unread.lua");
static COMPACT: LazyLock<Script> = script!("compact.lua");
static DUE: LazyLock<Script> = script!("due.lua");

/// The largest offset, start or limit handed to a script (offsets stay far below; Lua numbers
/// are exact up to here).
const MAX_LUA: u64 = (1 << 53) - 1;

/// A user's queue keys in the order `user_keys` in `lua/common.lua` reads them.
fn queue_keys(keys: &Keys, user: &str) -> [String; 15] {
    const CHAT: i32 = Partition::Chat as i32;
    const NOTE: i32 = Partition::Notification as i32;
    const RECEIPT: i32 = Partition::Receipt as i32;
    [
        keys.seq(user),
        keys.queue(user),
        keys.ids(user),
        keys.acks(user),
        keys.cursors(user),
        keys.sent_index(user),
        keys.senders(user, CHAT),
        keys.sender_index(user, CHAT),
        keys.sender_index(user, NOTE),
        keys.sender_index(user, RECEIPT),
        keys.partition_index(user, CHAT),
        keys.partition_index(user, NOTE),
        keys.partition_index(user, RECEIPT),
        keys.unacked(user, NOTE),
        keys.unacked(user, RECEIPT),
    ]
}

fn add_keys(inv: &mut ScriptInvocation<'_>, keys: &Keys, user: &str) {
    for k in queue_keys(keys, user) {
        inv.key(k);
    }
}

/// The 8 values `read_item` in `lua/common.lua` reads.
fn add_item(inv: &mut ScriptInvocation<'_>, item: &NewItem) {
    inv.arg(item.partition as i32)
        .arg(&item.from)
        .arg(&item.to)
        .arg(item.payload.as_ref())
        .arg(&item.message_id)
        .arg(&item.device)
        .arg(item.peer_offset.min(MAX_LUA))
        .arg(if item.dedupe { "1" } else { "0" });
}

fn bad(what: &str) -> StoreError {
    StoreError::Internal(format!("unexpected reply from a queue script: {what}"))
}

fn array(v: &Value) -> Result<&[Value], StoreError> {
    match v {
        Value::Array(a) => Ok(a),
        Value::Nil => Ok(&[]),
        _ => Err(bad("expected an array")),
    }
}

fn int(v: &Value) -> Result<i64, StoreError> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("expected a number")),
        _ => Err(bad("expected a number")),
    }
}

fn uint(v: &Value) -> Result<u64, StoreError> {
    u64::try_from(int(v)?).map_err(|_| bad("negative offset"))
}

fn bytes(v: &Value) -> Result<Vec<u8>, StoreError> {
    match v {
        Value::BulkString(b) => Ok(b.clone()),
        Value::SimpleString(s) => Ok(s.clone().into_bytes()),
        Value::Nil => Ok(Vec::new()),
        _ => Err(bad("expected a string")),
    }
}

fn string(v: &Value) -> Result<String, StoreError> {
    String::from_utf8(bytes(v)?).map_err(|_| bad("a name that is not UTF-8"))
}

fn at(a: &[Value], i: usize) -> Result<&Value, StoreError> {
    a.get(i).ok_or_else(|| bad("too short"))
}

/// `{ offset, timestamp, duplicate, dropped, dropped_unacked }`.
fn appended(user: &str, max_items: usize, v: &Value) -> Result<Appended, StoreError> {
    let a = array(v)?;
    let dropped_unacked = uint(at(a, 4)?)?;
    if dropped_unacked > 0 {
        tracing::warn!(
            user,
            dropped = dropped_unacked,
            max_queue_items = max_items,
            "queue over max_queue_items: dropped unacknowledged items, oldest first"
        );
    }
    Ok(Appended {
        offset: uint(at(a, 0)?)?,
        timestamp: int(at(a, 1)?)?,
        duplicate: int(at(a, 2)?)? != 0,
    })
}

/// `item_reply` in `lua/common.lua`.
fn item(v: &Value) -> Result<Item, StoreError> {
    let a = array(v)?;
    let partition = i32::try_from(int(at(a, 1)?)?).map_err(|_| bad("partition"))?;
    Ok(Item {
        offset: uint(at(a, 0)?)?,
        partition: Partition::try_from(partition).unwrap_or(Partition::Unspecified),
        from: string(at(a, 2)?)?,
        to: string(at(a, 3)?)?,
        payload: Bytes::from(bytes(at(a, 4)?)?),
        timestamp: int(at(a, 5)?)?,
        message_id: string(at(a, 6)?)?,
        device: string(at(a, 7)?)?,
        peer_offset: uint(at(a, 8)?)?,
        acknowledged: int(at(a, 9)?)? != 0,
    })
}

fn items(v: &[Value]) -> Result<Vec<Item>, StoreError> {
    v.iter().map(item).collect()
}

fn unspecified(what: &str) -> StoreError {
    StoreError::Invalid(format!("{what}: partition is unspecified"))
}

impl RedisStore {
    fn open(&self) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    fn retention_ms(&self) -> u64 {
        u64::try_from(self.inner.cfg.retention.as_millis())
            .unwrap_or(u64::MAX)
            .min(MAX_LUA)
    }

    fn max_items(&self) -> u64 {
        (self.inner.cfg.max_queue_items as u64).min(MAX_LUA)
    }

    async fn run(&self, inv: &ScriptInvocation<'_>) -> Result<Value, StoreError> {
        inv.invoke_async(&mut self.connection())
            .await
            .map_err(map_err)
    }

    /// Compacts one user's queue now (retention and `max_queue_items`, the file store's rules;
    /// see the module doc). One script call.
    pub async fn compact_user(&self, user: &str) -> Result<Compaction, StoreError> {
        check_user(user)?;
        self.open()?;
        let keys = &self.inner.keys;
        let mut inv = COMPACT.prepare_invoke();
        add_keys(&mut inv, keys, user);
        inv.key(keys.compact_due())
            .arg(user)
            .arg(self.retention_ms())
            .arg(self.max_items());
        let v = self.run(&inv).await?;
        let a = array(&v)?;
        let c = Compaction {
            dropped: uint(at(a, 0)?)?,
            dropped_unacked: uint(at(a, 1)?)?,
            kept: uint(at(a, 2)?)?,
        };
        if c.dropped_unacked > 0 {
            tracing::warn!(
                user,
                dropped = c.dropped_unacked,
                max_queue_items = self.inner.cfg.max_queue_items,
                "queue over max_queue_items: dropped unacknowledged items, oldest first"
            );
        }
        if c.dropped > 0 {
            tracing::debug!(user, dropped = c.dropped, kept = c.kept, "compacted");
        }
        Ok(c)
    }

    /// Compacts up to `max_users` users whose retention may be due (by Redis's clock); returns
    /// how many were compacted. The server calls it periodically.
    pub async fn compact_due(&self, max_users: usize) -> Result<usize, StoreError> {
        self.open()?;
        if max_users == 0 {
            return Ok(0);
        }
        let mut inv = DUE.prepare_invoke();
        inv.key(self.inner.keys.compact_due())
            .arg((max_users as u64).min(MAX_LUA));
        let v = self.run(&inv).await?;
        let mut n = 0;
        for u in array(&v)? {
            let user = string(u)?;
            // A foreign entry would stay due forever: drop it.
            if check_user(&user).is_err() {
                let _: Result<i64, _> = redis::cmd("ZREM")
                    .arg(self.inner.keys.compact_due())
                    .arg(&user)
                    .query_async(&mut self.connection())
                    .await;
                continue;
            }
            self.compact_user(&user).await?;
            n += 1;
        }
        Ok(n)
    }

    async fn append_one(&self, user: &str, item: &NewItem) -> Result<Appended, StoreError> {
        let keys = &self.inner.keys;
        let mut inv = APPEND.prepare_invoke();
        add_keys(&mut inv, keys, user);
        inv.key(keys.users())
            .key(keys.compact_due())
            .arg(user)
            .arg(self.retention_ms())
            .arg(self.max_items());
        add_item(&mut inv, item);
        let v = self.run(&inv).await?;
        appended(user, self.inner.cfg.max_queue_items, &v)
    }
}

impl QueueStore for RedisStore {
    async fn enqueue_append(
        &self,
        user: &str,
        item: NewItem,
    ) -> Result<Pending<Appended>, StoreError> {
        check_user(user)?;
        self.open()?;
        if item.partition == Partition::Unspecified {
            return Ok(Pending::ready(Err(unspecified("append"))));
        }
        Ok(Pending::ready(Ok(self.append_one(user, &item).await?)))
    }

    async fn enqueue_append_with_copy(
        &self,
        user: &str,
        item: NewItem,
        copy: CopyTo,
    ) -> Result<(Pending<Appended>, Pending<Appended>), StoreError> {
        check_user(user)?;
        check_user(&copy.user)?;
        self.open()?;
        if item.partition == Partition::Unspecified {
            let not_copied = StoreError::Invalid("not copied: the original was not stored".into());
            return Ok((
                Pending::ready(Err(unspecified("append"))),
                Pending::ready(Err(not_copied)),
            ));
        }
        if copy.item.partition == Partition::Unspecified {
            let first = self.append_one(user, &item).await?;
            let copied = if first.duplicate {
                Ok(Appended { offset: 0, ..first })
            } else {
                Err(unspecified("append"))
            };
            return Ok((Pending::ready(Ok(first)), Pending::ready(copied)));
        }
        let keys = &self.inner.keys;
        let mut inv = APPEND_COPY.prepare_invoke();
        add_keys(&mut inv, keys, user);
        add_keys(&mut inv, keys, &copy.user);
        inv.key(keys.users())
            .key(keys.compact_due())
            .arg(user)
            .arg(&copy.user)
            .arg(self.retention_ms())
            .arg(self.max_items());
        add_item(&mut inv, &item);
        add_item(&mut inv, &copy.item);
        let v = self.run(&inv).await?;
        let a = array(&v)?;
        let max = self.inner.cfg.max_queue_items;
        let first = appended(user, max, at(a, 0)?)?;
        let copied = appended(&copy.user, max, at(a, 1)?)?;
        Ok((Pending::ready(Ok(first)), Pending::ready(Ok(copied))))
    }

    async fn acknowledge(&self, user: &str, req: AckRequest) -> Result<AckOutcome, StoreError> {
        check_user(user)?;
        self.open()?;
        let peer = match req.partition {
            Partition::Chat => {
                let peer = match req.peer.as_deref() {
                    Some(p) if !p.is_empty() => p,
                    _ => {
                        return Err(StoreError::Invalid(
                            "a chat receipt needs the peer whose messages it covers".into(),
                        ));
                    }
                };
                if req.kind == ReceiptKind::Unspecified {
                    return Err(StoreError::Invalid("receipt kind is unspecified".into()));
                }
                peer
            }
            Partition::Notification | Partition::Receipt => req.peer.as_deref().unwrap_or(""),
            Partition::Unspecified => {
                return Err(StoreError::Invalid(
                    "acknowledge: partition is unspecified".into(),
                ));
            }
        };
        let keys = &self.inner.keys;
        let mut inv = ACK.prepare_invoke();
        add_keys(&mut inv, keys, user);
        inv.key(keys.compact_due())
            .arg(user)
            .arg(self.retention_ms())
            .arg(&req.device)
            .arg(req.partition as i32)
            .arg(peer)
            .arg(req.kind as i32)
            .arg(req.up_to_offset.min(MAX_LUA));
        let v = self.run(&inv).await?;
        let a = array(&v)?;
        let next_offset = uint(at(a, 0)?)?;
        let covered = a[1..]
            .iter()
            .map(|c| {
                let c = array(c)?;
                Ok((uint(at(c, 0)?)?, string(at(c, 1)?)?))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(AckOutcome {
            covered,
            next_offset,
        })
    }

    async fn read(&self, user: &str, req: ReadRequest) -> Result<ReadBatch, StoreError> {
        check_user(user)?;
        self.open()?;
        if req.partition == Partition::Unspecified {
            return Err(StoreError::Invalid("read: partition is unspecified".into()));
        }
        let keys = &self.inner.keys;
        let mut inv = READ.prepare_invoke();
        add_keys(&mut inv, keys, user);
        inv.arg(user)
            .arg(&req.device)
            .arg(req.partition as i32)
            .arg(req.peer.as_deref().unwrap_or(""))
            .arg(
                req.start
                    .map_or(String::new(), |s| s.min(MAX_LUA).to_string()),
            )
            .arg((req.limit as u64).min(MAX_LUA))
            .arg(if req.with_sent { "1" } else { "0" })
            .arg(if req.newest_first { "1" } else { "0" });
        let v = self.run(&inv).await?;
        let a = array(&v)?;
        let more = int(at(a, 0)?)? != 0;
        // The script's start is clamped to what Lua holds exactly; an explicit one is the caller's.
        let start = match req.start {
            Some(s) => s.max(1),
            None => uint(at(a, 1)?)?,
        };
        let items = items(&a[2..])?;
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

    async fn pending(&self, user: &str, device: &str) -> Result<PendingForDevice, StoreError> {
        check_user(user)?;
        self.open()?;
        let mut inv = PENDING.prepare_invoke();
        add_keys(&mut inv, &self.inner.keys, user);
        inv.arg(user).arg(device);
        let v = self.run(&inv).await?;
        let a = array(&v)?;
        let mut senders = array(at(a, 0)?)?
            .iter()
            .map(|s| {
                let s = array(s)?;
                Ok(SenderPending {
                    from: string(at(s, 0)?)?,
                    unread: uint(at(s, 1)?)?,
                    first_offset: uint(at(s, 2)?)?,
                    last_offset: uint(at(s, 3)?)?,
                    last: item(at(s, 4)?)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        senders.sort_unstable_by_key(|s| s.last_offset);
        Ok(PendingForDevice {
            notifications: items(array(at(a, 1)?)?)?,
            senders,
            receipts: items(array(at(a, 2)?)?)?,
        })
    }

    async fn unread(&self, user: &str) -> Result<Unread, StoreError> {
        check_user(user)?;
        self.open()?;
        let mut inv = UNREAD.prepare_invoke();
        add_keys(&mut inv, &self.inner.keys, user);
        inv.arg(user);
        let v = self.run(&inv).await?;
        let mut senders = array(&v)?
            .iter()
            .map(|s| {
                let s = array(s)?;
                Ok(SenderUnread {
                    from: string(at(s, 0)?)?,
                    unread: uint(at(s, 1)?)?,
                    first_offset: uint(at(s, 2)?)?,
                    last_offset: uint(at(s, 3)?)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        senders.sort_unstable_by(|a, b| a.from.cmp(&b.from));
        let total = senders.iter().map(|s| s.unread).sum();
        Ok(Unread { senders, total })
    }

    /// Nothing to flush: every reply already means durable. Later calls answer
    /// [`StoreError::Closed`].
    async fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::Release);
    }
}

/// Every script of this module (loaded into Redis ahead of use).
pub(crate) fn scripts() -> Vec<&'static Script> {
    vec![
        &*APPEND,
        &*APPEND_COPY,
        &*ACK,
        &*READ,
        &*PENDING,
        &*UNREAD,
        &*COMPACT,
        &*DUE,
    ]
}
