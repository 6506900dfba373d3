//! One user's queue and device cursors in memory, rebuilt from the two files, and the operations
//! of [`crate::QueueStore`] applied to it. Every state change also produces the lines to append,
//! so memory and disk move together (the shard writes and fsyncs them).
//!
//! Memory holds what routing, dedupe, cursors and compaction decisions need ([`Meta`]: ids,
//! offsets, flags, names shared per queue) and where each item's line is in the queue file;
//! payloads stay on disk and are read back (one `pread` per span) when items are handed out.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bimip_proto::store::{IndexRecord, QueueRecord, QueueRecordKind};
use bimip_proto::v1::{Partition, ReceiptKind};

use super::record::{decode_line, encode_line_into};
use crate::{
    AckOutcome, AckRequest, Appended, Item, NewItem, PendingForDevice, ReadBatch, ReadRequest,
    SenderPending, SenderUnread, StoreError, Unread,
};

/// Offsets of one (partition, sender), in order, so RESUME and summaries never scan the whole queue.
#[derive(Debug, Default)]
struct KeyList {
    offsets: Vec<u64>,
    /// Every item before this index is acknowledged (ACK records cover prefixes).
    acked_prefix: usize,
}

/// New lines produced by operations, per file.
#[derive(Debug, Default)]
pub(crate) struct Lines {
    pub queue: Vec<u8>,
    pub index: Vec<u8>,
}

impl Lines {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.index.is_empty()
    }
}

/// One stored item in memory: everything but the payload, plus where its line is.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    offset: u64,
    peer_offset: u64,
    timestamp: i64,
    /// Byte position of the item's line in the queue file, and its length without `\n`.
    pos: u64,
    len: u32,
    partition: Partition,
    acknowledged: bool,
    from: Arc<str>,
    message_id: Box<str>,
}

/// Reads `len` bytes at `pos` of the user's queue file.
pub(crate) type ReadAt<'a> = &'a mut dyn FnMut(u64, usize) -> std::io::Result<Vec<u8>>;

/// The decoded state of one user's queue.
#[derive(Debug)]
pub(crate) struct UserQueue {
    user: String,
    /// The offset the next item gets (max offset seen + 1).
    next_offset: u64,
    /// Items in offset order.
    items: Vec<Meta>,
    by_key: HashMap<(Partition, Arc<str>), KeyList>,
    /// The user's own copies of chat messages it sent, by recipient, in offset order (so a
    /// conversation reads both directions without scanning the queue).
    sent: HashMap<Arc<str>, Vec<u64>>,
    /// Hash of (from, message id) → offset, for dedupe (a hit is confirmed against the item).
    ids: HashMap<u64, u64>,
    /// Sender names, shared by the items that carry them.
    names: HashSet<Arc<str>>,
    /// (partition, from) → (device, kind) → next offset not acknowledged.
    cursors: HashMap<(Partition, String), HashMap<(String, i32), u64>>,
    /// Length of the queue file once every line produced so far is written.
    queue_bytes: u64,
    /// Lines in the queue and index files (what compaction would shrink).
    queue_records: u64,
    index_records: u64,
    /// Unix ms of the last compaction (0 = none since loaded), and until when compaction is not
    /// retried after a failure.
    compacted_at: i64,
    compact_blocked_until: i64,
}

/// What compaction may drop (docs/OPERATIONS.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Acknowledged items older than this (ms) are dropped; 0 = kept forever.
    pub retention_ms: i64,
    /// Most items kept per queue, the oldest dropped first; 0 = no limit.
    pub max_items: usize,
}

/// A compaction's result: the new content of both files and the state they decode to.
pub(crate) struct Compacted {
    pub queue: Vec<u8>,
    pub index: Vec<u8>,
    /// Whether each file changes at all.
    pub queue_changed: bool,
    pub index_changed: bool,
    pub state: UserQueue,
    pub dropped: u64,
    /// Of `dropped`, items nobody acknowledged (only `max_items` drops those).
    pub dropped_unacked: u64,
    pub kept: u64,
}

/// Items from the front of a queue looked at when deciding whether retention has work.
const RETENTION_SCAN: usize = 1024;

/// A queue file with more lines than this many per item (plus a constant) is rewritten even when
/// nothing is dropped (acknowledgement records add up); the same for the index per cursor.
const QUEUE_LINES_PER_ITEM: u64 = 3;
const INDEX_LINES_PER_CURSOR: u64 = 4;
const SLACK_LINES: u64 = 1024;

fn partition_of(v: i32) -> Partition {
    Partition::try_from(v).unwrap_or(Partition::Unspecified)
}

/// The dedupe key of (sender, message id): a fixed-key hash, stable for the process.
fn id_key(from: &str, message_id: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    from.hash(&mut h);
    message_id.hash(&mut h);
    h.finish()
}

/// One item line as read back from the file.
fn item_from_line(meta: &Meta, line: &[u8]) -> Result<Item, String> {
    let rec: QueueRecord = decode_line(line).map_err(|e| e.to_string())?;
    if rec.offset != meta.offset || rec.kind != QueueRecordKind::Item as i32 {
        return Err(format!(
            "expected item {} at byte {}, found record {} of kind {}",
            meta.offset, meta.pos, rec.offset, rec.kind
        ));
    }
    Ok(Item {
        offset: meta.offset,
        partition: meta.partition,
        from: rec.from,
        to: rec.to,
        payload: rec.payload,
        timestamp: meta.timestamp,
        acknowledged: meta.acknowledged,
        message_id: rec.message_id,
        device: rec.device,
        peer_offset: meta.peer_offset,
    })
}

/// Up to `limit` offsets of the sorted `lists`, merged: from `start` on in ascending order, or
/// (`newest_first`) from `start` down in descending order. Also whether more remain.
fn merged_page(lists: &[&[u64]], start: u64, limit: usize, newest_first: bool) -> (Vec<u64>, bool) {
    let mut out = Vec::new();
    if newest_first {
        // Exclusive ends: the next offset of list i is lists[i][ends[i] - 1].
        let mut ends: Vec<usize> = lists
            .iter()
            .map(|l| l.partition_point(|&o| o <= start))
            .collect();
        loop {
            let next = (0..lists.len())
                .filter(|&i| ends[i] > 0)
                .max_by_key(|&i| lists[i][ends[i] - 1]);
            let Some(i) = next else {
                return (out, false);
            };
            if out.len() == limit {
                return (out, true);
            }
            ends[i] -= 1;
            out.push(lists[i][ends[i]]);
        }
    } else {
        let mut at: Vec<usize> = lists
            .iter()
            .map(|l| l.partition_point(|&o| o < start))
            .collect();
        loop {
            let next = (0..lists.len())
                .filter(|&i| at[i] < lists[i].len())
                .min_by_key(|&i| lists[i][at[i]]);
            let Some(i) = next else {
                return (out, false);
            };
            if out.len() == limit {
                return (out, true);
            }
            out.push(lists[i][at[i]]);
            at[i] += 1;
        }
    }
}

/// Spans of lines read with one `pread` while the gaps between them stay this small.
const MAX_SPAN_GAP: u64 = 16 * 1024;

impl UserQueue {
    pub fn empty(user: &str) -> Self {
        UserQueue {
            user: user.to_string(),
            next_offset: 1,
            items: Vec::new(),
            by_key: HashMap::new(),
            sent: HashMap::new(),
            ids: HashMap::new(),
            names: HashSet::new(),
            cursors: HashMap::new(),
            queue_bytes: 0,
            queue_records: 0,
            index_records: 0,
            compacted_at: 0,
            compact_blocked_until: 0,
        }
    }

    /// Rebuilds the state from the records of both files, in file order: queue records with
    /// their line's position and length, and the queue file's length.
    pub fn from_records(
        user: &str,
        queue: impl IntoIterator<Item = (u64, u32, QueueRecord)>,
        queue_bytes: u64,
        index: impl IntoIterator<Item = IndexRecord>,
    ) -> Self {
        let mut q = UserQueue::empty(user);
        for (pos, len, rec) in queue {
            q.apply_record(rec, pos, len);
        }
        q.queue_bytes = queue_bytes;
        for rec in index {
            q.apply_index(&rec);
        }
        q
    }

    /// The last offset given out (0 when the queue is empty).
    pub fn last_offset(&self) -> u64 {
        self.next_offset - 1
    }

    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        self.names.insert(n.clone());
        n
    }

    /// The file's length after loading its records one by one (see `recovery::load_user`).
    pub(crate) fn set_queue_bytes(&mut self, queue_bytes: u64) {
        self.queue_bytes = queue_bytes;
    }

    pub(crate) fn apply_record(&mut self, rec: QueueRecord, pos: u64, len: u32) {
        self.queue_records += 1;
        if rec.kind == QueueRecordKind::Mark as i32 {
            self.next_offset = self.next_offset.max(rec.offset.saturating_add(1));
            return;
        }
        if rec.kind == QueueRecordKind::Ack as i32 {
            self.mark_acked(partition_of(rec.partition), &rec.from, rec.offset);
            return;
        }
        // Recovery guarantees increasing offsets; skip anything else rather than break order.
        if rec.offset < self.next_offset || rec.offset == 0 {
            return;
        }
        self.next_offset = rec.offset.saturating_add(1);
        let partition = partition_of(rec.partition);
        if partition == Partition::Chat && rec.from == self.user && !rec.to.is_empty() {
            let to = self.intern(&rec.to);
            self.sent.entry(to).or_default().push(rec.offset);
        }
        let meta = Meta {
            offset: rec.offset,
            peer_offset: rec.peer_offset,
            timestamp: rec.timestamp,
            pos,
            len,
            partition,
            acknowledged: rec.acknowledged,
            from: self.intern(&rec.from),
            message_id: rec.message_id.into_boxed_str(),
        };
        self.insert(meta);
    }

    pub(crate) fn apply_index(&mut self, rec: &IndexRecord) {
        self.index_records += 1;
        let slot = self
            .cursors
            .entry((partition_of(rec.partition), rec.from.clone()))
            .or_default()
            .entry((rec.device.clone(), rec.kind))
            .or_insert(0);
        *slot = (*slot).max(rec.next_offset);
    }

    fn insert(&mut self, item: Meta) {
        if !item.message_id.is_empty() {
            self.ids
                .entry(id_key(&item.from, &item.message_id))
                .or_insert(item.offset);
        }
        let list = self
            .by_key
            .entry((item.partition, item.from.clone()))
            .or_default();
        // A compacted file stores the acknowledged flag on the item instead of ACK records.
        if item.acknowledged && list.acked_prefix == list.offsets.len() {
            list.acked_prefix += 1;
        }
        list.offsets.push(item.offset);
        self.items.push(item);
    }

    fn item(&self, offset: u64) -> Option<&Meta> {
        self.items
            .binary_search_by_key(&offset, |i| i.offset)
            .ok()
            .map(|i| &self.items[i])
    }

    /// Reads the items of `metas` (in file order) back from the queue file, one `pread` per
    /// run of nearby lines.
    fn fetch(&self, metas: &[&Meta], read_at: ReadAt<'_>) -> Result<Vec<Item>, StoreError> {
        let corrupt = |m: &Meta, reason: String| StoreError::Corrupt {
            path: std::path::PathBuf::from(format!("bimip_queue_{}.dat", self.user)),
            line: 0,
            reason: format!("byte {}: {reason}", m.pos),
        };
        let mut out = Vec::with_capacity(metas.len());
        let mut i = 0;
        while i < metas.len() {
            let start = metas[i].pos;
            let mut end = start + u64::from(metas[i].len);
            let mut j = i + 1;
            while j < metas.len() && metas[j].pos >= end && metas[j].pos - end <= MAX_SPAN_GAP {
                end = metas[j].pos + u64::from(metas[j].len);
                j += 1;
            }
            let span = usize::try_from(end - start).unwrap_or(usize::MAX);
            let buf = read_at(start, span).map_err(|e| corrupt(metas[i], e.to_string()))?;
            for m in &metas[i..j] {
                let a = usize::try_from(m.pos - start).unwrap_or(usize::MAX);
                let line = buf
                    .get(a..a.saturating_add(m.len as usize))
                    .ok_or_else(|| corrupt(m, "line past the end of the file".into()))?;
                out.push(item_from_line(m, line).map_err(|e| corrupt(m, e))?);
            }
            i = j;
        }
        Ok(out)
    }

    /// Marks items of `partition` from `from` ("" = every sender) with offset <= `up` as
    /// acknowledged; returns the newly acknowledged ones in offset order.
    fn mark_acked(&mut self, partition: Partition, from: &str, up: u64) -> Vec<(u64, String)> {
        let mut newly = Vec::new();
        let items = &mut self.items;
        let lists: Vec<&mut KeyList> = if from.is_empty() {
            self.by_key
                .iter_mut()
                .filter(|((p, _), _)| *p == partition)
                .map(|(_, l)| l)
                .collect()
        } else {
            self.by_key
                .get_mut(&(partition, Arc::<str>::from(from)))
                .into_iter()
                .collect()
        };
        for list in lists {
            while let Some(&off) = list.offsets.get(list.acked_prefix) {
                if off > up {
                    break;
                }
                if let Ok(i) = items.binary_search_by_key(&off, |i| i.offset) {
                    let it = &mut items[i];
                    if !it.acknowledged {
                        it.acknowledged = true;
                        newly.push((off, it.message_id.to_string()));
                    }
                }
                list.acked_prefix += 1;
            }
        }
        newly.sort_unstable_by_key(|(o, _)| *o);
        newly
    }

    /// Unacknowledged items of `partition`, in offset order.
    fn unacked(&self, partition: Partition, read_at: ReadAt<'_>) -> Result<Vec<Item>, StoreError> {
        let mut metas: Vec<&Meta> = Vec::new();
        for ((p, _), list) in &self.by_key {
            if *p != partition {
                continue;
            }
            for &off in &list.offsets[list.acked_prefix..] {
                if let Some(it) = self.item(off)
                    && !it.acknowledged
                {
                    metas.push(it);
                }
            }
        }
        metas.sort_unstable_by_key(|m| m.offset);
        self.fetch(&metas, read_at)
    }

    /// Where a device reads from by default: its furthest cursor of any kind for the key, or,
    /// for a device without one, the furthest cursor of any device (a new device does not replay
    /// what another device of the user already handled); 1 when nobody has a cursor.
    fn read_cursor(&self, device: &str, partition: Partition, from: &str) -> u64 {
        let Some(map) = self.cursors.get(&(partition, from.to_string())) else {
            return 1;
        };
        let own = map
            .iter()
            .filter(|((d, _), _)| d == device)
            .map(|(_, &v)| v)
            .max();
        own.or_else(|| map.values().copied().max())
            .unwrap_or(1)
            .max(1)
    }

    /// Appends an item (or finds its original with `dedupe`).
    pub fn append(
        &mut self,
        new: NewItem,
        now: i64,
        out: &mut Lines,
    ) -> Result<Appended, StoreError> {
        if new.partition == Partition::Unspecified {
            return Err(StoreError::Invalid(
                "append: partition is unspecified".into(),
            ));
        }
        if new.dedupe
            && !new.message_id.is_empty()
            && let Some(&off) = self.ids.get(&id_key(&new.from, &new.message_id))
            && let Some(orig) = self.item(off)
            && *orig.from == *new.from
            && *orig.message_id == *new.message_id
        {
            return Ok(Appended {
                offset: orig.offset,
                timestamp: orig.timestamp,
                duplicate: true,
            });
        }
        let offset = self.next_offset;
        let rec = QueueRecord {
            offset,
            partition: new.partition as i32,
            from: new.from,
            to: new.to,
            payload: new.payload,
            timestamp: now,
            acknowledged: false,
            message_id: new.message_id,
            device: new.device,
            kind: QueueRecordKind::Item as i32,
            peer_offset: new.peer_offset,
        };
        let (pos, len) = self.push_line(&rec, out);
        self.apply_record(rec, pos, len);
        Ok(Appended {
            offset,
            timestamp: now,
            duplicate: false,
        })
    }

    /// Encodes a queue record into `out` and returns its line's position and length in the file.
    fn push_line(&mut self, rec: &QueueRecord, out: &mut Lines) -> (u64, u32) {
        let before = out.queue.len();
        encode_line_into(rec, &mut out.queue);
        let written = (out.queue.len() - before) as u64;
        let pos = self.queue_bytes;
        self.queue_bytes += written;
        (
            pos,
            u32::try_from(written.saturating_sub(1)).unwrap_or(u32::MAX),
        )
    }

    /// Moves the cursor `(device, partition, from, kind)` forward (never back) to `to`.
    fn move_cursor(
        &mut self,
        device: &str,
        (partition, from, kind): (Partition, &str, i32),
        to: u64,
        now: i64,
        out: &mut Lines,
    ) -> u64 {
        let map = self
            .cursors
            .entry((partition, from.to_string()))
            .or_default();
        let key = (device.to_string(), kind);
        let current = map.get(&key).copied().unwrap_or(1);
        if to > current {
            map.insert(key, to);
            let rec = IndexRecord {
                device: device.to_string(),
                partition: partition as i32,
                from: from.to_string(),
                to: self.user.clone(),
                next_offset: to,
                kind,
                timestamp: now,
            };
            encode_line_into(&rec, &mut out.index);
            self.index_records += 1;
            return to;
        }
        current
    }

    fn write_ack(&mut self, partition: Partition, from: &str, up: u64, now: i64, out: &mut Lines) {
        let rec = QueueRecord {
            offset: up,
            partition: partition as i32,
            from: from.to_string(),
            to: self.user.clone(),
            timestamp: now,
            acknowledged: true,
            kind: QueueRecordKind::Ack as i32,
            ..Default::default()
        };
        self.push_line(&rec, out);
        self.queue_records += 1;
    }

    /// Applies a device's receipt (see [`AckRequest`] for the semantics).
    pub fn acknowledge(
        &mut self,
        req: AckRequest,
        now: i64,
        out: &mut Lines,
    ) -> Result<AckOutcome, StoreError> {
        let up = req.up_to_offset.min(self.last_offset());
        let kind = req.kind as i32;
        match req.partition {
            Partition::Chat => {
                let peer = match req.peer.as_deref() {
                    Some(p) if !p.is_empty() => p.to_string(),
                    _ => {
                        return Err(StoreError::Invalid(
                            "a chat receipt needs the peer whose messages it covers".into(),
                        ));
                    }
                };
                if req.kind == ReceiptKind::Unspecified {
                    return Err(StoreError::Invalid("receipt kind is unspecified".into()));
                }
                let key = (Partition::Chat, peer.clone());
                let furthest = self
                    .cursors
                    .get(&key)
                    .and_then(|m| {
                        m.iter()
                            .filter(|((_, k), _)| *k == kind)
                            .map(|(_, &v)| v)
                            .max()
                    })
                    .unwrap_or(1);
                let new_cursor = up + 1;
                let covered = match self
                    .by_key
                    .get(&(Partition::Chat, Arc::from(peer.as_str())))
                {
                    Some(list) => {
                        let a = list.offsets.partition_point(|&o| o < furthest);
                        let b = list.offsets.partition_point(|&o| o < new_cursor);
                        list.offsets[a..b.max(a)]
                            .iter()
                            .filter_map(|&o| self.item(o).map(|i| (o, i.message_id.to_string())))
                            .collect()
                    }
                    None => Vec::new(),
                };
                let next_offset = self.move_cursor(
                    &req.device,
                    (Partition::Chat, &peer, kind),
                    new_cursor,
                    now,
                    out,
                );
                if up > 0 && !self.mark_acked(Partition::Chat, &peer, up).is_empty() {
                    self.write_ack(Partition::Chat, &peer, up, now, out);
                }
                Ok(AckOutcome {
                    covered,
                    next_offset,
                })
            }
            Partition::Notification | Partition::Receipt => {
                let from = req.peer.unwrap_or_default();
                let covered = if up > 0 {
                    self.mark_acked(req.partition, &from, up)
                } else {
                    Vec::new()
                };
                if !covered.is_empty() {
                    self.write_ack(req.partition, &from, up, now, out);
                }
                let next_offset =
                    self.move_cursor(&req.device, (req.partition, &from, kind), up + 1, now, out);
                Ok(AckOutcome {
                    covered,
                    next_offset,
                })
            }
            Partition::Unspecified => Err(StoreError::Invalid(
                "acknowledge: partition is unspecified".into(),
            )),
        }
    }

    /// Reads one page (see [`ReadRequest`]); never changes state. `limit == 0` means no limit.
    pub fn read(&self, req: &ReadRequest, read_at: ReadAt<'_>) -> Result<ReadBatch, StoreError> {
        if req.partition == Partition::Unspecified {
            return Err(StoreError::Invalid("read: partition is unspecified".into()));
        }
        let from = req.peer.as_deref().unwrap_or("");
        let start = match (req.start, req.newest_first) {
            (Some(s), _) => s,
            (None, false) => self.read_cursor(&req.device, req.partition, from),
            (None, true) => u64::MAX,
        };
        let start = start.max(1);
        let limit = if req.limit == 0 {
            usize::MAX
        } else {
            req.limit
        };
        let mut metas: Vec<&Meta> = Vec::new();
        let mut more = false;
        if from.is_empty() {
            let scan: Box<dyn Iterator<Item = &Meta>> = if req.newest_first {
                let end = self.items.partition_point(|it| it.offset <= start);
                Box::new(self.items[..end].iter().rev())
            } else {
                let i = self.items.partition_point(|it| it.offset < start);
                Box::new(self.items[i..].iter())
            };
            for it in scan.filter(|it| it.partition == req.partition) {
                if metas.len() == limit {
                    more = true;
                    break;
                }
                metas.push(it);
            }
        } else {
            let mut lists: Vec<&[u64]> = Vec::with_capacity(2);
            if let Some(list) = self.by_key.get(&(req.partition, Arc::from(from))) {
                lists.push(&list.offsets);
            }
            // The user's own key already holds every copy it sent: no second list for itself.
            if req.with_sent
                && req.partition == Partition::Chat
                && from != self.user
                && let Some(sent) = self.sent.get(from)
            {
                lists.push(sent);
            }
            let (offsets, m) = merged_page(&lists, start, limit, req.newest_first);
            more = m;
            metas = offsets.iter().filter_map(|&o| self.item(o)).collect();
        }
        // Lines are read in file order; a newest-first page is turned around afterwards.
        if req.newest_first {
            metas.reverse();
        }
        let mut items = self.fetch(&metas, read_at)?;
        let next_offset = if req.newest_first {
            items.reverse();
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

    /// What a connecting device is owed.
    pub fn pending(
        &self,
        device: &str,
        read_at: ReadAt<'_>,
    ) -> Result<PendingForDevice, StoreError> {
        let mut senders: Vec<(SenderPending, &Meta)> = Vec::new();
        for ((p, from), list) in &self.by_key {
            if *p != Partition::Chat || **from == *self.user {
                continue;
            }
            let cursor = self.read_cursor(device, Partition::Chat, from);
            let i = list.offsets.partition_point(|&o| o < cursor);
            let rest = &list.offsets[i..];
            let (Some(&first), Some(&last)) = (rest.first(), rest.last()) else {
                continue;
            };
            let Some(meta) = self.item(last) else {
                continue;
            };
            let sp = SenderPending {
                from: from.to_string(),
                unread: rest.len() as u64,
                first_offset: first,
                last_offset: last,
                last: Item {
                    offset: 0,
                    partition: Partition::Unspecified,
                    from: String::new(),
                    to: String::new(),
                    payload: Default::default(),
                    timestamp: 0,
                    acknowledged: false,
                    message_id: String::new(),
                    device: String::new(),
                    peer_offset: 0,
                },
            };
            senders.push((sp, meta));
        }
        senders.sort_unstable_by_key(|(s, _)| s.last_offset);
        let metas: Vec<&Meta> = senders.iter().map(|(_, m)| *m).collect();
        let lasts = self.fetch(&metas, read_at)?;
        let senders = senders
            .into_iter()
            .zip(lasts)
            .map(|((mut s, _), last)| {
                s.last = last;
                s
            })
            .collect();
        Ok(PendingForDevice {
            notifications: self.unacked(Partition::Notification, read_at)?,
            senders,
            receipts: self.unacked(Partition::Receipt, read_at)?,
        })
    }

    /// The user's unread chat (see [`crate::QueueStore::unread`]): per sender other than the
    /// user itself, the items at or past the furthest cursor of any device for that sender (any
    /// receipt kind), which is where [`Self::read_cursor`] starts a device without a cursor of
    /// its own. Memory only: no payload is read.
    pub fn unread(&self) -> Unread {
        let mut senders: Vec<SenderUnread> = Vec::new();
        for ((p, from), list) in &self.by_key {
            if *p != Partition::Chat || **from == *self.user {
                continue;
            }
            let cursor = self
                .cursors
                .get(&(Partition::Chat, from.to_string()))
                .and_then(|m| m.values().copied().max())
                .unwrap_or(1)
                .max(1);
            let i = list.offsets.partition_point(|&o| o < cursor);
            let rest = &list.offsets[i..];
            if let (Some(&first), Some(&last)) = (rest.first(), rest.last()) {
                senders.push(SenderUnread {
                    from: from.to_string(),
                    unread: rest.len() as u64,
                    first_offset: first,
                    last_offset: last,
                });
            }
        }
        senders.sort_unstable_by(|a, b| a.from.cmp(&b.from));
        let total = senders.iter().map(|s| s.unread).sum();
        Unread { senders, total }
    }

    /// Whether retention may drop `item` once it is old enough: acknowledged items, and the
    /// user's own copies of what it sent (nobody acknowledges those).
    fn retention_droppable(&self, item: &Meta) -> bool {
        item.acknowledged || *item.from == *self.user
    }

    fn cursor_count(&self) -> u64 {
        self.cursors.values().map(|m| m.len() as u64).sum()
    }

    /// Whether compaction has work here; cheap (looks at most at [`RETENTION_SCAN`] items).
    /// Counts over the limit trigger only past an eighth more, so compaction is not run after
    /// every append; retention runs at most every sixteenth of the retention period.
    pub fn needs_compaction(&self, now: i64, lim: &Limits) -> bool {
        if now < self.compact_blocked_until {
            return false;
        }
        let items = self.items.len();
        if lim.max_items > 0 && items > lim.max_items + lim.max_items / 8 {
            return true;
        }
        if self.queue_records > QUEUE_LINES_PER_ITEM * items as u64 + SLACK_LINES
            || self.index_records > INDEX_LINES_PER_CURSOR * self.cursor_count() + SLACK_LINES
        {
            return true;
        }
        if lim.retention_ms > 0 && now - self.compacted_at >= lim.retention_ms / 16 {
            let cutoff = now - lim.retention_ms;
            return self
                .items
                .iter()
                .take(RETENTION_SCAN)
                .take_while(|i| i.timestamp < cutoff)
                .any(|i| self.retention_droppable(i));
        }
        false
    }

    /// After a failed compaction: not again before `until` (unix ms).
    pub fn block_compaction(&mut self, until: i64) {
        self.compact_blocked_until = until;
    }

    /// Computes the compacted form of both files: the kept items (with their acknowledged flag,
    /// so no ACK records are needed), a MARK record when the last offset given out is not the
    /// last kept item's (offsets stay monotonic even when everything was dropped), and the latest
    /// cursor per (device, partition, from, kind). Dropped: retention-droppable items older than
    /// the retention, then, over `max_items`, acknowledged items oldest first and then
    /// unacknowledged ones oldest first.
    /// Kept items are read back from the queue file (payloads are not in memory).
    pub fn compact(
        &self,
        now: i64,
        lim: &Limits,
        read_at: ReadAt<'_>,
    ) -> Result<Compacted, StoreError> {
        let n = self.items.len();
        let cutoff = if lim.retention_ms > 0 {
            now - lim.retention_ms
        } else {
            i64::MIN
        };
        let mut keep: Vec<bool> = self
            .items
            .iter()
            .map(|i| !(i.timestamp < cutoff && self.retention_droppable(i)))
            .collect();
        let mut kept = keep.iter().filter(|k| **k).count();
        let mut dropped_unacked = 0u64;
        if lim.max_items > 0 && kept > lim.max_items {
            for pass_acked in [true, false] {
                for (i, it) in self.items.iter().enumerate() {
                    if kept <= lim.max_items {
                        break;
                    }
                    if keep[i] && self.retention_droppable(it) == pass_acked {
                        keep[i] = false;
                        kept -= 1;
                        if !it.acknowledged {
                            dropped_unacked += 1;
                        }
                    }
                }
            }
        }
        let kept_metas: Vec<&Meta> = self
            .items
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(m, _)| m)
            .collect();
        let mut queue_recs: Vec<QueueRecord> = Vec::with_capacity(kept + 1);
        for it in self.fetch(&kept_metas, read_at)? {
            queue_recs.push(QueueRecord {
                offset: it.offset,
                partition: it.partition as i32,
                from: it.from,
                to: it.to,
                payload: it.payload,
                timestamp: it.timestamp,
                acknowledged: it.acknowledged,
                message_id: it.message_id,
                device: it.device,
                kind: QueueRecordKind::Item as i32,
                peer_offset: it.peer_offset,
            });
        }
        let last = self.last_offset();
        if last > 0 && queue_recs.last().map(|r| r.offset) != Some(last) {
            queue_recs.push(QueueRecord {
                offset: last,
                to: self.user.clone(),
                timestamp: now,
                kind: QueueRecordKind::Mark as i32,
                ..Default::default()
            });
        }
        let mut index_recs: Vec<IndexRecord> = Vec::new();
        for ((partition, from), map) in &self.cursors {
            for ((device, kind), &next_offset) in map {
                index_recs.push(IndexRecord {
                    device: device.clone(),
                    partition: *partition as i32,
                    from: from.clone(),
                    to: self.user.clone(),
                    next_offset,
                    kind: *kind,
                    timestamp: now,
                });
            }
        }
        index_recs.sort_by(|a, b| {
            (a.partition, &a.from, &a.device, a.kind).cmp(&(
                b.partition,
                &b.from,
                &b.device,
                b.kind,
            ))
        });
        let queue_changed = self.queue_records != queue_recs.len() as u64;
        let index_changed = self.index_records != index_recs.len() as u64;
        let mut queue = Vec::new();
        let mut placed = Vec::with_capacity(queue_recs.len());
        for r in queue_recs {
            let before = queue.len() as u64;
            encode_line_into(&r, &mut queue);
            let len = u32::try_from(queue.len() as u64 - before - 1).unwrap_or(u32::MAX);
            // An unchanged file is not rewritten: its lines stay where they are.
            let (pos, len) = match self.item(r.offset) {
                Some(m) if !queue_changed && r.kind == QueueRecordKind::Item as i32 => {
                    (m.pos, m.len)
                }
                _ => (before, len),
            };
            placed.push((pos, len, r));
        }
        let queue_bytes = if queue_changed {
            queue.len() as u64
        } else {
            self.queue_bytes
        };
        let mut index = Vec::new();
        for r in &index_recs {
            encode_line_into(r, &mut index);
        }
        let mut state = UserQueue::from_records(&self.user, placed, queue_bytes, index_recs);
        state.compacted_at = now;
        Ok(Compacted {
            queue,
            index,
            queue_changed,
            index_changed,
            state,
            dropped: (n - kept) as u64,
            dropped_unacked,
            kept: kept as u64,
        })
    }
}
