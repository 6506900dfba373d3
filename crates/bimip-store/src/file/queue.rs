//! One user's queue and device cursors in memory, rebuilt from the two files, and the operations
//! of [`crate::QueueStore`] applied to it. Every state change also produces the lines to append,
//! so memory and disk move together (the shard writes and fsyncs them).

use std::collections::HashMap;

use bimip_proto::store::{IndexRecord, QueueRecord, QueueRecordKind};
use bimip_proto::v1::{Partition, ReceiptKind};

use super::record::encode_line_into;
use crate::{
    AckOutcome, AckRequest, Appended, Item, NewItem, PendingForDevice, ReadBatch, ReadRequest,
    SenderPending, StoreError,
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

/// The decoded state of one user's queue.
#[derive(Debug)]
pub(crate) struct UserQueue {
    user: String,
    /// The offset the next item gets (max offset seen + 1).
    next_offset: u64,
    /// Items in offset order.
    items: Vec<Item>,
    by_key: HashMap<(Partition, String), KeyList>,
    /// (from, message id) → offset, for dedupe.
    ids: HashMap<(String, String), u64>,
    /// (partition, from) → (device, kind) → next offset not acknowledged.
    cursors: HashMap<(Partition, String), HashMap<(String, i32), u64>>,
}

fn partition_of(v: i32) -> Partition {
    Partition::try_from(v).unwrap_or(Partition::Unspecified)
}

impl UserQueue {
    pub fn empty(user: &str) -> Self {
        UserQueue {
            user: user.to_string(),
            next_offset: 1,
            items: Vec::new(),
            by_key: HashMap::new(),
            ids: HashMap::new(),
            cursors: HashMap::new(),
        }
    }

    /// Rebuilds the state from the records of both files, in file order.
    pub fn from_records(
        user: &str,
        queue: impl IntoIterator<Item = QueueRecord>,
        index: impl IntoIterator<Item = IndexRecord>,
    ) -> Self {
        let mut q = UserQueue::empty(user);
        for rec in queue {
            q.apply_record(rec);
        }
        for rec in index {
            q.apply_index(&rec);
        }
        q
    }

    /// The last offset given out (0 when the queue is empty).
    pub fn last_offset(&self) -> u64 {
        self.next_offset - 1
    }

    fn apply_record(&mut self, rec: QueueRecord) {
        if rec.kind == QueueRecordKind::Ack as i32 {
            self.mark_acked(partition_of(rec.partition), &rec.from, rec.offset);
            return;
        }
        // Recovery guarantees increasing offsets; skip anything else rather than break order.
        if rec.offset < self.next_offset || rec.offset == 0 {
            return;
        }
        self.next_offset = rec.offset.saturating_add(1);
        self.insert(Item {
            offset: rec.offset,
            partition: partition_of(rec.partition),
            from: rec.from,
            to: rec.to,
            payload: rec.payload,
            timestamp: rec.timestamp,
            acknowledged: rec.acknowledged,
            message_id: rec.message_id,
            device: rec.device,
            peer_offset: rec.peer_offset,
        });
    }

    fn apply_index(&mut self, rec: &IndexRecord) {
        let slot = self
            .cursors
            .entry((partition_of(rec.partition), rec.from.clone()))
            .or_default()
            .entry((rec.device.clone(), rec.kind))
            .or_insert(0);
        *slot = (*slot).max(rec.next_offset);
    }

    fn insert(&mut self, item: Item) {
        if !item.message_id.is_empty() {
            self.ids
                .entry((item.from.clone(), item.message_id.clone()))
                .or_insert(item.offset);
        }
        self.by_key
            .entry((item.partition, item.from.clone()))
            .or_default()
            .offsets
            .push(item.offset);
        self.items.push(item);
    }

    fn item(&self, offset: u64) -> Option<&Item> {
        self.items
            .binary_search_by_key(&offset, |i| i.offset)
            .ok()
            .map(|i| &self.items[i])
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
                .get_mut(&(partition, from.to_string()))
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
                        newly.push((off, it.message_id.clone()));
                    }
                }
                list.acked_prefix += 1;
            }
        }
        newly.sort_unstable_by_key(|(o, _)| *o);
        newly
    }

    /// Unacknowledged items of `partition`, in offset order.
    fn unacked(&self, partition: Partition) -> Vec<Item> {
        let mut out: Vec<Item> = Vec::new();
        for ((p, _), list) in &self.by_key {
            if *p != partition {
                continue;
            }
            for &off in &list.offsets[list.acked_prefix..] {
                if let Some(it) = self.item(off)
                    && !it.acknowledged
                {
                    out.push(it.clone());
                }
            }
        }
        out.sort_unstable_by_key(|i| i.offset);
        out
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
            && let Some(&off) = self.ids.get(&(new.from.clone(), new.message_id.clone()))
            && let Some(orig) = self.item(off)
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
        encode_line_into(&rec, &mut out.queue);
        self.apply_record(rec);
        Ok(Appended {
            offset,
            timestamp: now,
            duplicate: false,
        })
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
            return to;
        }
        current
    }

    fn write_ack(&self, partition: Partition, from: &str, up: u64, now: i64, out: &mut Lines) {
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
        encode_line_into(&rec, &mut out.queue);
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
                let covered = match self.by_key.get(&key) {
                    Some(list) => {
                        let a = list.offsets.partition_point(|&o| o < furthest);
                        let b = list.offsets.partition_point(|&o| o < new_cursor);
                        list.offsets[a..b.max(a)]
                            .iter()
                            .filter_map(|&o| self.item(o).map(|i| (o, i.message_id.clone())))
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
    pub fn read(&self, req: &ReadRequest) -> Result<ReadBatch, StoreError> {
        if req.partition == Partition::Unspecified {
            return Err(StoreError::Invalid("read: partition is unspecified".into()));
        }
        let from = req.peer.as_deref().unwrap_or("");
        let start = req
            .start
            .unwrap_or_else(|| self.read_cursor(&req.device, req.partition, from))
            .max(1);
        let limit = if req.limit == 0 {
            usize::MAX
        } else {
            req.limit
        };
        let mut items = Vec::new();
        let mut more = false;
        if from.is_empty() {
            let i = self.items.partition_point(|it| it.offset < start);
            for it in self.items[i..]
                .iter()
                .filter(|it| it.partition == req.partition)
            {
                if items.len() == limit {
                    more = true;
                    break;
                }
                items.push(it.clone());
            }
        } else if let Some(list) = self.by_key.get(&(req.partition, from.to_string())) {
            let i = list.offsets.partition_point(|&o| o < start);
            let rest = &list.offsets[i..];
            more = rest.len() > limit;
            items = rest
                .iter()
                .take(limit)
                .filter_map(|&o| self.item(o).cloned())
                .collect();
        }
        let next_offset = items.last().map_or(start, |i| i.offset + 1);
        Ok(ReadBatch {
            items,
            more,
            next_offset,
        })
    }

    /// What a connecting device is owed.
    pub fn pending(&self, device: &str) -> PendingForDevice {
        let mut senders: Vec<SenderPending> = self
            .by_key
            .iter()
            .filter(|((p, from), _)| *p == Partition::Chat && *from != self.user)
            .filter_map(|((_, from), list)| {
                let cursor = self.read_cursor(device, Partition::Chat, from);
                let i = list.offsets.partition_point(|&o| o < cursor);
                let rest = &list.offsets[i..];
                let (&first, &last) = (rest.first()?, rest.last()?);
                Some(SenderPending {
                    from: from.clone(),
                    unread: rest.len() as u64,
                    first_offset: first,
                    last_offset: last,
                    last: self.item(last)?.clone(),
                })
            })
            .collect();
        senders.sort_unstable_by_key(|s| s.last_offset);
        PendingForDevice {
            notifications: self.unacked(Partition::Notification),
            senders,
            receipts: self.unacked(Partition::Receipt),
        }
    }
}
