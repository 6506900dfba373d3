//! bimip's durable per-user queue (the seed's BimipQueue) and per-device cursors (BimipQueueIndex).
//!
//! [`Store`] is what the server talks to; today it has one backend, the embedded file store of
//! SPEC §6.1 ([`FileStore`]), and a Redis backend will join it as another variant with the same
//! semantics. Every operation is scoped to one user's queue; all operations on one user are applied
//! in the order they were enqueued (see [`Store::enqueue_append`]).

pub mod error;
pub mod file;
pub mod types;

pub use error::StoreError;
pub use file::{
    FileStore, FsyncMode, RecoveryReport, StoreConfig, StoreObserver, UserFiles, inspect_user,
    user_dir,
};
pub use types::*;

use std::future::Future;

/// The storage backends behind one set of calls, so call sites stay non-generic.
#[derive(Clone)]
pub enum Store {
    File(FileStore),
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

    /// Flushes and fsyncs everything written so far, then stops accepting operations.
    fn shutdown(&self) -> impl Future<Output = ()> + Send;
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
        }
    }
    async fn acknowledge(&self, user: &str, req: AckRequest) -> Result<AckOutcome, StoreError> {
        match self {
            Store::File(s) => s.acknowledge(user, req).await,
        }
    }
    async fn read(&self, user: &str, req: ReadRequest) -> Result<ReadBatch, StoreError> {
        match self {
            Store::File(s) => s.read(user, req).await,
        }
    }
    async fn pending(&self, user: &str, device: &str) -> Result<PendingForDevice, StoreError> {
        match self {
            Store::File(s) => s.pending(user, device).await,
        }
    }
    async fn shutdown(&self) {
        match self {
            Store::File(s) => s.shutdown().await,
        }
    }
}
