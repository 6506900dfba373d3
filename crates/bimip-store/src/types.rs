//! Values that cross the store boundary.

use std::collections::{BTreeMap, BTreeSet};

use bimip_proto::v1::{self, Partition, ReceiptKind, Status};
use bytes::Bytes;
use tokio::sync::oneshot;

use crate::StoreError;

/// One stored item of a user's queue, as the store hands it out.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub offset: u64,
    pub partition: Partition,
    pub from: String,
    pub to: String,
    pub payload: Bytes,
    /// Unix ms when stored.
    pub timestamp: i64,
    /// Set once any device of the user acknowledged it.
    pub acknowledged: bool,
    pub message_id: String,
    /// The sending device ("" for the system / HTTP API).
    pub device: String,
    /// For the sender's own copy: the offset in the recipient's queue (0 otherwise).
    pub peer_offset: u64,
}

impl Item {
    /// The wire form of this item.
    pub fn to_message(&self) -> v1::Message {
        v1::Message {
            id: self.message_id.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            partition: self.partition as i32,
            payload: self.payload.clone(),
            offset: self.offset,
            timestamp: self.timestamp,
            device: self.device.clone(),
            acknowledged: self.acknowledged,
        }
    }
}

/// An item to append. The store assigns `offset` and `timestamp`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewItem {
    pub partition: Partition,
    pub from: String,
    pub to: String,
    pub payload: Bytes,
    pub message_id: String,
    pub device: String,
    pub peer_offset: u64,
    /// Refuse a second item with the same (`from`, `message_id`) in this queue.
    pub dedupe: bool,
}

/// A second append made right after another one, into another user's queue (the sender's own
/// copy of a message): its `peer_offset` is set to the offset the first append got. When the
/// first append is a duplicate or fails, the copy is not stored (see
/// [`crate::QueueStore::enqueue_append_with_copy`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CopyTo {
    pub user: String,
    pub item: NewItem,
}

/// Result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub offset: u64,
    pub timestamp: i64,
    /// The item was already stored (same sender and message id); nothing new was written and
    /// `offset`/`timestamp` are the original ones.
    pub duplicate: bool,
}

/// A device's receipt.
///
/// For `Partition::Chat`: `peer` is the sender whose messages are acknowledged (required). The
/// device's cursor `(device, chat, from=peer, to=user, kind)` moves to `up_to_offset + 1` if that is
/// further (never back); `up_to_offset` is clamped to the queue's last offset. Chat items from
/// `peer` not yet covered by any device's cursor of this `kind` are returned in `covered`, and items
/// newly acknowledged get an ACK record.
///
/// For `Partition::Notification` / `Partition::Receipt`: `peer` optionally narrows to one sender
/// (None = all senders). Unacknowledged items of that partition with offset <= `up_to_offset`
/// become acknowledged (and are returned in `covered`); the device's cursor for
/// `(device, partition, from=peer or "", to=user)` moves too.
#[derive(Debug, Clone, PartialEq)]
pub struct AckRequest {
    pub device: String,
    pub partition: Partition,
    pub peer: Option<String>,
    pub kind: ReceiptKind,
    pub up_to_offset: u64,
}

/// Result of an acknowledgement.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AckOutcome {
    /// (offset, message id) of the items this receipt newly covers, in offset order.
    pub covered: Vec<(u64, String)>,
    /// The device's cursor after the receipt (next offset not acknowledged).
    pub next_offset: u64,
}

/// Read items of one partition in offset order.
///
/// Chat with `peer`: items from `peer` (to this user); with `with_sent`, also the user's own
/// copies of what it sent to `peer` (the whole conversation). Without `peer`: every item of the
/// partition. Without `start`, reading begins at the device's cursor for `(chat, peer)` (the
/// furthest of its DELIVERED and READ cursors); a device with no cursor yet starts where the
/// user's furthest device is. Reading never changes cursors, so repeating it returns the same
/// items.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReadRequest {
    pub device: String,
    pub partition: Partition,
    pub peer: Option<String>,
    pub start: Option<u64>,
    /// Most items in one page; 0 means no limit.
    pub limit: usize,
    /// Chat with a `peer` other than the user: also the user's copies of what it sent to `peer`.
    pub with_sent: bool,
    /// Newest first: `start` is the newest offset included (None = from the newest item; the
    /// cursor is not used) and items come in descending offset order.
    pub newest_first: bool,
}

/// One page of a read.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReadBatch {
    pub items: Vec<Item>,
    /// More matching items exist after this page.
    pub more: bool,
    /// Where the next page starts: the last returned offset + 1 (or the start when empty); newest
    /// first, the last returned offset - 1 (0 when empty).
    pub next_offset: u64,
}

/// Chat items from one sender past a device's cursor.
#[derive(Debug, Clone, PartialEq)]
pub struct SenderPending {
    pub from: String,
    pub unread: u64,
    pub first_offset: u64,
    pub last_offset: u64,
    pub last: Item,
}

/// What a connecting device is owed (the ONLINE fan-out, docs/PROTOCOL.md §4).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PendingForDevice {
    /// Unacknowledged notification items, in offset order.
    pub notifications: Vec<Item>,
    /// One entry per sender with chat items past this device's cursor, ordered by last offset.
    pub senders: Vec<SenderPending>,
    /// Unacknowledged receipt items (their payload is an encoded `bimip.v1.Receipt`), in order.
    pub receipts: Vec<Item>,
}

/// What one compaction of a user's files did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Compaction {
    /// Items dropped (by retention or by the queue limit).
    pub dropped: u64,
    /// Of `dropped`, items nobody had acknowledged (only the queue limit drops those).
    pub dropped_unacked: u64,
    /// Items kept.
    pub kept: u64,
}

/// The result of an operation that is queued now and finishes later. Backend-neutral: the file
/// store hands out one fed by its writer thread, a backend whose answer already means "durable"
/// (Redis with `appendfsync always`) hands out one that is ready.
pub struct Pending<T> {
    state: PendingState<T>,
}

enum PendingState<T> {
    Ready(Result<T, StoreError>),
    Channel(oneshot::Receiver<Result<T, StoreError>>),
}

impl<T> Pending<T> {
    /// Finishes when the writer sends the result (a dropped sender means the store shut down).
    pub fn new(rx: oneshot::Receiver<Result<T, StoreError>>) -> Self {
        Pending {
            state: PendingState::Channel(rx),
        }
    }

    /// Already finished.
    pub fn ready(result: Result<T, StoreError>) -> Self {
        Pending {
            state: PendingState::Ready(result),
        }
    }

    /// Waits for the operation to finish.
    pub async fn wait(self) -> Result<T, StoreError> {
        match self.state {
            PendingState::Ready(r) => r,
            PendingState::Channel(rx) => rx.await.unwrap_or(Err(StoreError::Closed)),
        }
    }
}

/// One user's profile: contact lists in both directions, blocks in both directions,
/// intent, invisibility and last seen, decoded from `bimip_profile_<user>.dat`.
///
/// The reverse sides (`listed_by`, `blocked_by`) are maintained by the store together with the
/// forward sides of the other users: `A ∈ B.listed_by ⇔ B ∈ A.contacts` (with the same `one_way`
/// flag) and `A ∈ B.blocked_by ⇔ B ∈ A.blocks`. A crash in the middle of a cross-user change can
/// leave at most an extra reverse entry (see [`crate::ProfileStore`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Profile {
    /// Users this user listed → `one_way` (this user sees them, they do not see this user).
    pub contacts: BTreeMap<String, bool>,
    /// Users that listed this user → their `one_way` flag.
    pub listed_by: BTreeMap<String, bool>,
    /// Users this user blocks.
    pub blocks: BTreeSet<String>,
    /// Users blocking this user.
    pub blocked_by: BTreeSet<String>,
    /// `Unspecified` = no intent; else `Away`, `Busy` or `Dnd`.
    pub intent: Status,
    pub details: String,
    /// Unix ms when the intent was last set or cleared (0 = never).
    pub intent_at: i64,
    pub invisible: bool,
    /// Unix ms when the user turned invisible (0 when visible).
    pub invisible_since: i64,
    /// Unix ms, advisory (0 = unknown).
    pub last_seen: i64,
}

impl Profile {
    /// Who sees this user's awareness under the `contacts` policy: everyone who listed this user,
    /// plus this user's own contacts listed without `one_way` (contacts are mutual unless
    /// `one_way`); never a user this user blocks.
    pub fn watchers(&self) -> BTreeSet<String> {
        self.listed_by
            .keys()
            .chain(
                self.contacts
                    .iter()
                    .filter(|(_, one_way)| !**one_way)
                    .map(|(u, _)| u),
            )
            .filter(|u| !self.blocks.contains(*u))
            .cloned()
            .collect()
    }

    /// Whose awareness this user sees: its contacts, plus users that listed it without
    /// `one_way`; never a user that blocks this user.
    pub fn watching(&self) -> BTreeSet<String> {
        self.contacts
            .keys()
            .chain(
                self.listed_by
                    .iter()
                    .filter(|(_, one_way)| !**one_way)
                    .map(|(u, _)| u),
            )
            .filter(|u| !self.blocked_by.contains(*u))
            .cloned()
            .collect()
    }

    /// Whether `viewer` is one of [`Self::watchers`] (without building the set).
    pub fn may_see(&self, viewer: &str) -> bool {
        !self.blocks.contains(viewer)
            && (self.listed_by.contains_key(viewer) || self.contacts.get(viewer) == Some(&false))
    }

    /// Whether the user has an intent (AWAY, BUSY or DND) set.
    pub fn has_intent(&self) -> bool {
        self.intent != Status::Unspecified
    }
}

/// A change of a user's own awareness state; `None` fields stay as they are.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PresenceUpdate {
    /// `Away`/`Busy`/`Dnd` with details sets the intent; `Unspecified` or `Online` clears it;
    /// any other status is [`StoreError::Invalid`].
    pub intent: Option<(Status, String)>,
    /// Turning invisible on sets `invisible_since` to now; turning it off resets it to 0.
    pub invisible: Option<bool>,
    /// Unix ms. Advisory: an update that changes only this may reach the disk a little later.
    pub last_seen: Option<i64>,
}
