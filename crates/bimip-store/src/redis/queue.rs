//! STUB: replaced by the real Redis implementation of [`crate::QueueStore`].

#![allow(unused_variables)]

use super::RedisStore;
use crate::*;

impl QueueStore for RedisStore {
    async fn enqueue_append(
        &self,
        user: &str,
        item: NewItem,
    ) -> Result<Pending<Appended>, StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn enqueue_append_with_copy(
        &self,
        user: &str,
        item: NewItem,
        copy: CopyTo,
    ) -> Result<(Pending<Appended>, Pending<Appended>), StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn acknowledge(&self, user: &str, req: AckRequest) -> Result<AckOutcome, StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn read(&self, user: &str, req: ReadRequest) -> Result<ReadBatch, StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn pending(&self, user: &str, device: &str) -> Result<PendingForDevice, StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn unread(&self, user: &str) -> Result<Unread, StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn shutdown(&self) -> () {}
}
