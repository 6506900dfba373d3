//! The push store: device tokens, mutes, the durable outbox of push and event-webhook jobs, dead
//! letters and idempotency keys ([`PushStore`]), and the unread counts the push pipeline reads
//! from the queue ([`Unread`]).
//!
//! The records are the `bimip.store.v1` push messages (`proto/bimip/store/v1/push.proto`); the
//! embedded file store keeps them under `<data_dir>/push/`, a Redis backend in Redis keys. The
//! outbox's scheduling (what is due, coalescing, retries) is the server's: the store keeps what
//! must survive a crash, and hands every stored job back at start ([`PushStore::jobs`]).

use std::future::Future;

pub use bimip_proto::store::{
    DeadLetter, DeviceToken, EventJob, IdempotencyRecord, Mute, OutboxJob, PushJob, PushKind,
    outbox_job::Job,
};

use crate::StoreError;

/// Chat items from one sender that no device of the user has acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderUnread {
    pub from: String,
    pub unread: u64,
    pub first_offset: u64,
    pub last_offset: u64,
}

/// A user's unread chat (see [`crate::QueueStore::unread`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unread {
    /// Ordered by sender.
    pub senders: Vec<SenderUnread>,
    /// The sum of `unread` over `senders` (the badge).
    pub total: u64,
}

impl Unread {
    /// Whether some device of the user acknowledged the chat item at `offset` from `from`
    /// (no unread item from `from` at or before `offset`).
    pub fn acknowledged(&self, from: &str, offset: u64) -> bool {
        self.senders
            .iter()
            .find(|s| s.from == from)
            .is_none_or(|s| s.first_offset > offset)
    }
}

/// Compare-and-delete of a device token: remove it only if it is still this token and was
/// registered no later than `registered_at` (unix ms). A token the device registered again
/// meanwhile (after the push that found it dead was sent) survives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMatch {
    pub token: String,
    pub registered_at: i64,
}

/// Durable push state. Every change resolves once it is durable under the store's fsync mode;
/// reads never wait for I/O in the embedded store (the state is kept in memory).
pub trait PushStore: Send + Sync {
    /// Registers `token` for `(token.user, token.device)`, replacing that device's previous
    /// token. The same platform and token registered for another user or device is removed
    /// from there first (a phone that changed hands must not get the old user's pushes).
    /// Returns the `(user, device)` pairs it was removed from.
    fn put_device_token(
        &self,
        token: DeviceToken,
    ) -> impl Future<Output = Result<Vec<(String, String)>, StoreError>> + Send;

    /// Removes the device's token; with `only_if`, only when it still matches (see
    /// [`TokenMatch`]). Returns whether a token was removed.
    fn remove_device_token(
        &self,
        user: &str,
        device: &str,
        only_if: Option<TokenMatch>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The user's devices with a registered token, ordered by device id.
    fn device_tokens(
        &self,
        user: &str,
    ) -> impl Future<Output = Result<Vec<DeviceToken>, StoreError>> + Send;

    /// Whether the user has any device with a token. Called for every stored chat message, so
    /// it must be cheap (no I/O in the embedded store).
    fn has_device_tokens(&self, user: &str) -> impl Future<Output = bool> + Send;

    /// Advisory: the device got a push at `at` (unix ms). May reach the disk later (with the
    /// next snapshot or at shutdown); never fails.
    fn note_pushed(&self, user: &str, device: &str, at: i64) -> impl Future<Output = ()> + Send;

    /// `user` mutes (or unmutes) chat pushes from `other`. Returns whether it changed.
    fn set_mute(
        &self,
        user: &str,
        other: &str,
        muted: bool,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Users `user` muted, with when (unix ms), ordered by user.
    fn mutes(&self, user: &str) -> impl Future<Output = Result<Vec<Mute>, StoreError>> + Send;

    /// Whether `user` muted `other`.
    fn is_muted(&self, user: &str, other: &str) -> impl Future<Output = bool> + Send;

    /// Stores jobs (insert, or replace by id). A job whose stored version is newer than the
    /// given one is left as it is; so is a job removed at a version not older than the given
    /// one.
    fn put_jobs(&self, jobs: Vec<OutboxJob>)
    -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Removes jobs `(id, version)`: each only if its stored version is not newer.
    fn remove_jobs(
        &self,
        jobs: Vec<(u64, u64)>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every stored job (read once at start by the outbox scheduler), ordered by id.
    fn jobs(&self) -> impl Future<Output = Result<Vec<OutboxJob>, StoreError>> + Send;

    /// Records a dead letter. Only the newest [`MAX_DEAD_LETTERS`] are kept.
    fn add_dead_letter(
        &self,
        dead: DeadLetter,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The newest dead letters first, at most `limit`.
    fn dead_letters(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, StoreError>> + Send;

    /// The stored answer for an idempotency key, if it has not expired.
    fn idempotency(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<IdempotencyRecord>, StoreError>> + Send;

    /// Stores the answer for an idempotency key (replacing an older one); dropped after
    /// `expires_at`.
    fn put_idempotency(
        &self,
        rec: IdempotencyRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Dead letters kept (the oldest are dropped first).
pub const MAX_DEAD_LETTERS: usize = 10_000;
