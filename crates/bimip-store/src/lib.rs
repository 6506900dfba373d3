//! bimip's durable per-user queue and per-device cursors.
//!
//! [`Store`] is what the server talks to, with two backends of the same semantics: the embedded
//! file store ([`FileStore`], docs/ARCHITECTURE.md "The store"), the default, and Redis
//! ([`RedisStore`]), which lets several nodes share one user base. Every operation is scoped to one user's queue; all operations on one user are applied
//! in the order they were enqueued (see [`Store::enqueue_append`]). Next to the queue, each user
//! has a profile (contacts, blocks, intent, invisibility, last seen): see [`ProfileStore`]. The
//! push pipeline's durable state (device tokens, mutes, the outbox, dead letters, idempotency
//! keys) is not per user: see [`PushStore`].

pub mod error;
pub mod file;
pub mod push;
pub mod redis;
mod rules;
pub mod types;

pub use error::StoreError;
pub use file::{
    CheckReport, DEFAULT_MAX_QUEUE_ITEMS, DEFAULT_RETENTION, FileStore, FsyncMode,
    MAX_IDEMPOTENCY_KEY_BYTES, MAX_TOKEN_BYTES, Problem, PushTuning, PushUserFiles, RecoveryReport,
    StoreConfig, StoreObserver, UserFiles, check_data_dir, inspect_push_user, inspect_user,
    user_dir,
};
pub use push::{PushStore, SenderUnread, TokenMatch, Unread};
pub use redis::{
    RawValue, RedisCheckReport, RedisProblem, RedisStreamEntry, RedisUserDump, check_redis,
    inspect_redis_user,
};
pub use redis::{RedisConfig, RedisStore};
pub use types::*;

use std::future::Future;

/// The storage backends behind one set of calls, so call sites stay non-generic.
#[derive(Clone)]
pub enum Store {
    File(FileStore),
    Redis(RedisStore),
}

/// The contract every backend implements. Offsets are per user queue, start at 1, never repeat and
/// never decrease, also across restarts. Writes resolve only once durable under the configured
/// fsync mode.
pub trait QueueStore: Send + Sync {
    /// Queues an append and returns once it has its place in the user's order (so a caller that
    /// enqueues several appends sees them stored in that order); the returned [`Pending`] resolves
    /// once the append is durable. With `dedupe`, an item of the same sender and message id already
    /// in this queue is returned with `duplicate = true` and nothing is stored.
    fn enqueue_append(
        &self,
        user: &str,
        item: NewItem,
    ) -> impl Future<Output = Result<Pending<Appended>, StoreError>> + Send;

    /// [`Self::enqueue_append`] of `item` to `user`, then, once it has its offset, of `copy`
    /// to `copy.user` with `peer_offset` = that offset, without a round trip back to the
    /// caller in between: both become durable in the same group commit when both users live on
    /// the same writer, and concurrently otherwise. The copy's result is `duplicate` (nothing
    /// stored) when the first append is a duplicate, and an error when the first one fails.
    fn enqueue_append_with_copy(
        &self,
        user: &str,
        item: NewItem,
        copy: CopyTo,
    ) -> impl Future<Output = Result<(Pending<Appended>, Pending<Appended>), StoreError>> + Send;

    /// A device acknowledges items (a receipt): see [`AckRequest`].
    fn acknowledge(
        &self,
        user: &str,
        req: AckRequest,
    ) -> impl Future<Output = Result<AckOutcome, StoreError>> + Send;

    /// Reads items of one partition in offset order: see [`ReadRequest`].
    fn read(
        &self,
        user: &str,
        req: ReadRequest,
    ) -> impl Future<Output = Result<ReadBatch, StoreError>> + Send;

    /// What a device gets when it connects: pending notifications and receipts, and the
    /// per-sender summary of chat items past its cursors.
    fn pending(
        &self,
        user: &str,
        device: &str,
    ) -> impl Future<Output = Result<PendingForDevice, StoreError>> + Send;

    /// The user's unread chat per sender, counted from the furthest cursor of any of its
    /// devices (DELIVERED or READ): what no device has acknowledged yet. The push pipeline reads
    /// the badge (`total`) and whether a message was acknowledged here; no payload is read.
    fn unread(&self, user: &str) -> impl Future<Output = Result<Unread, StoreError>> + Send;

    /// Flushes and fsyncs everything written so far, then stops accepting operations.
    fn shutdown(&self) -> impl Future<Output = ()> + Send;
}

/// Per-user profiles: contacts, blocks, intent, invisibility and last seen.
///
/// Relations have two sides kept by different users (`A.contacts[B]` and `B.listed_by[A]`,
/// `A.blocks ∋ B` and `B.blocked_by ∋ A`), possibly on different shards. A change is applied one
/// user at a time through each user's own writer (never holding one while waiting on another),
/// and changes touching the same users are serialized, so the sides agree once a call returns.
/// The order is chosen so that a crash (or an I/O error) in the middle leaves at most an extra
/// *reverse* entry (in `listed_by` / `blocked_by`), never a forward entry without its reverse:
/// when adding, the other user's reverse side is written first, then the user's own side; when
/// removing, the user's own side first, then the reverse side. Repeating the call repairs it
/// (removals always clear the reverse side, even when the forward side was already gone).
///
/// Every change is durable (under the configured fsync mode) before the call returns, except a
/// [`PresenceUpdate`] that changes only `last_seen`, which is advisory: it is visible at once and
/// written shortly after (within about a second, at eviction from the cache, or at shutdown).
pub trait ProfileStore: Send + Sync {
    /// A copy of the user's current profile (empty for a user never seen).
    fn profile(&self, user: &str) -> impl Future<Output = Result<Profile, StoreError>> + Send;

    /// Adds or updates `user`'s contacts (`(contact, one_way)`; for a repeated contact the last
    /// flag wins) and sets `user` in each contact's `listed_by` with the same flag. With
    /// `replace`, contacts of `user` not in `entries` are removed too (both sides). Returns how
    /// many entries were added or had their flag changed (removals are not counted). Every id is
    /// validated first ([`StoreError::InvalidUser`]); listing oneself is [`StoreError::Invalid`].
    fn put_contacts(
        &self,
        user: &str,
        entries: Vec<(String, bool)>,
        replace: bool,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Removes `contact` from `user`'s contacts and `user` from `contact`'s `listed_by`;
    /// returns whether the contact existed.
    fn remove_contact(
        &self,
        user: &str,
        contact: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// `user` blocks (or unblocks) `other`: `user.blocks` and `other.blocked_by`. Returns whether
    /// `user`'s block list changed. Blocking oneself is [`StoreError::Invalid`].
    fn set_block(
        &self,
        user: &str,
        other: &str,
        blocked: bool,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Changes the user's intent, invisibility and/or last seen (see [`PresenceUpdate`]) and
    /// returns the resulting profile.
    fn set_presence(
        &self,
        user: &str,
        update: PresenceUpdate,
    ) -> impl Future<Output = Result<Profile, StoreError>> + Send;
}

impl Store {
    /// Appends and waits for durability.
    pub async fn append(&self, user: &str, item: NewItem) -> Result<Appended, StoreError> {
        self.enqueue_append(user, item).await?.wait().await
    }
}

impl QueueStore for Store {
    async fn enqueue_append(
        &self,
        user: &str,
        item: NewItem,
    ) -> Result<Pending<Appended>, StoreError> {
        match self {
            Store::File(s) => s.enqueue_append(user, item).await,
            Store::Redis(s) => s.enqueue_append(user, item).await,
        }
    }
    async fn enqueue_append_with_copy(
        &self,
        user: &str,
        item: NewItem,
        copy: CopyTo,
    ) -> Result<(Pending<Appended>, Pending<Appended>), StoreError> {
        match self {
            Store::File(s) => s.enqueue_append_with_copy(user, item, copy).await,
            Store::Redis(s) => s.enqueue_append_with_copy(user, item, copy).await,
        }
    }
    async fn acknowledge(&self, user: &str, req: AckRequest) -> Result<AckOutcome, StoreError> {
        match self {
            Store::File(s) => s.acknowledge(user, req).await,
            Store::Redis(s) => s.acknowledge(user, req).await,
        }
    }
    async fn read(&self, user: &str, req: ReadRequest) -> Result<ReadBatch, StoreError> {
        match self {
            Store::File(s) => s.read(user, req).await,
            Store::Redis(s) => s.read(user, req).await,
        }
    }
    async fn pending(&self, user: &str, device: &str) -> Result<PendingForDevice, StoreError> {
        match self {
            Store::File(s) => s.pending(user, device).await,
            Store::Redis(s) => s.pending(user, device).await,
        }
    }
    async fn unread(&self, user: &str) -> Result<Unread, StoreError> {
        match self {
            Store::File(s) => s.unread(user).await,
            Store::Redis(s) => s.unread(user).await,
        }
    }
    async fn shutdown(&self) {
        match self {
            Store::File(s) => s.shutdown().await,
            Store::Redis(s) => s.shutdown().await,
        }
    }
}

impl PushStore for Store {
    async fn put_device_token(
        &self,
        token: push::DeviceToken,
    ) -> Result<Vec<(String, String)>, StoreError> {
        match self {
            Store::File(s) => s.put_device_token(token).await,
            Store::Redis(s) => s.put_device_token(token).await,
        }
    }
    async fn remove_device_token(
        &self,
        user: &str,
        device: &str,
        only_if: Option<TokenMatch>,
    ) -> Result<bool, StoreError> {
        match self {
            Store::File(s) => s.remove_device_token(user, device, only_if).await,
            Store::Redis(s) => s.remove_device_token(user, device, only_if).await,
        }
    }
    async fn device_tokens(&self, user: &str) -> Result<Vec<push::DeviceToken>, StoreError> {
        match self {
            Store::File(s) => s.device_tokens(user).await,
            Store::Redis(s) => s.device_tokens(user).await,
        }
    }
    async fn has_device_tokens(&self, user: &str) -> bool {
        match self {
            Store::File(s) => s.has_device_tokens(user).await,
            Store::Redis(s) => s.has_device_tokens(user).await,
        }
    }
    async fn note_pushed(&self, user: &str, device: &str, at: i64) {
        match self {
            Store::File(s) => s.note_pushed(user, device, at).await,
            Store::Redis(s) => s.note_pushed(user, device, at).await,
        }
    }
    async fn set_mute(&self, user: &str, other: &str, muted: bool) -> Result<bool, StoreError> {
        match self {
            Store::File(s) => s.set_mute(user, other, muted).await,
            Store::Redis(s) => s.set_mute(user, other, muted).await,
        }
    }
    async fn mutes(&self, user: &str) -> Result<Vec<push::Mute>, StoreError> {
        match self {
            Store::File(s) => s.mutes(user).await,
            Store::Redis(s) => s.mutes(user).await,
        }
    }
    async fn is_muted(&self, user: &str, other: &str) -> bool {
        match self {
            Store::File(s) => s.is_muted(user, other).await,
            Store::Redis(s) => s.is_muted(user, other).await,
        }
    }
    async fn put_jobs(&self, jobs: Vec<push::OutboxJob>) -> Result<(), StoreError> {
        match self {
            Store::File(s) => s.put_jobs(jobs).await,
            Store::Redis(s) => s.put_jobs(jobs).await,
        }
    }
    async fn remove_jobs(&self, jobs: Vec<(u64, u64)>) -> Result<(), StoreError> {
        match self {
            Store::File(s) => s.remove_jobs(jobs).await,
            Store::Redis(s) => s.remove_jobs(jobs).await,
        }
    }
    async fn jobs(&self) -> Result<Vec<push::OutboxJob>, StoreError> {
        match self {
            Store::File(s) => s.jobs().await,
            Store::Redis(s) => s.jobs().await,
        }
    }
    async fn add_dead_letter(&self, dead: push::DeadLetter) -> Result<(), StoreError> {
        match self {
            Store::File(s) => s.add_dead_letter(dead).await,
            Store::Redis(s) => s.add_dead_letter(dead).await,
        }
    }
    async fn dead_letters(&self, limit: usize) -> Result<Vec<push::DeadLetter>, StoreError> {
        match self {
            Store::File(s) => s.dead_letters(limit).await,
            Store::Redis(s) => s.dead_letters(limit).await,
        }
    }
    async fn idempotency(&self, key: &str) -> Result<Option<push::IdempotencyRecord>, StoreError> {
        match self {
            Store::File(s) => s.idempotency(key).await,
            Store::Redis(s) => s.idempotency(key).await,
        }
    }
    async fn put_idempotency(&self, rec: push::IdempotencyRecord) -> Result<(), StoreError> {
        match self {
            Store::File(s) => s.put_idempotency(rec).await,
            Store::Redis(s) => s.put_idempotency(rec).await,
        }
    }
}

impl ProfileStore for Store {
    async fn profile(&self, user: &str) -> Result<Profile, StoreError> {
        match self {
            Store::File(s) => s.profile(user).await,
            Store::Redis(s) => s.profile(user).await,
        }
    }
    async fn put_contacts(
        &self,
        user: &str,
        entries: Vec<(String, bool)>,
        replace: bool,
    ) -> Result<usize, StoreError> {
        match self {
            Store::File(s) => s.put_contacts(user, entries, replace).await,
            Store::Redis(s) => s.put_contacts(user, entries, replace).await,
        }
    }
    async fn remove_contact(&self, user: &str, contact: &str) -> Result<bool, StoreError> {
        match self {
            Store::File(s) => s.remove_contact(user, contact).await,
            Store::Redis(s) => s.remove_contact(user, contact).await,
        }
    }
    async fn set_block(&self, user: &str, other: &str, blocked: bool) -> Result<bool, StoreError> {
        match self {
            Store::File(s) => s.set_block(user, other, blocked).await,
            Store::Redis(s) => s.set_block(user, other, blocked).await,
        }
    }
    async fn set_presence(
        &self,
        user: &str,
        update: PresenceUpdate,
    ) -> Result<Profile, StoreError> {
        match self {
            Store::File(s) => s.set_presence(user, update).await,
            Store::Redis(s) => s.set_presence(user, update).await,
        }
    }
}
