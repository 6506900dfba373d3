//! STUB: replaced by the real Redis implementation of [`crate::PushStore`].

#![allow(unused_variables)]

use super::RedisStore;
use crate::push::*;
use crate::*;

impl PushStore for RedisStore {
    async fn put_device_token(
        &self,
        token: DeviceToken,
    ) -> Result<Vec<(String, String)>, StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn remove_device_token(
        &self,
        user: &str,
        device: &str,
        only_if: Option<TokenMatch>,
    ) -> Result<bool, StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn device_tokens(&self, user: &str) -> Result<Vec<DeviceToken>, StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn has_device_tokens(&self, user: &str) -> bool {
        false
    }
    async fn note_pushed(&self, user: &str, device: &str, at: i64) -> () {}
    async fn set_mute(&self, user: &str, other: &str, muted: bool) -> Result<bool, StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn mutes(&self, user: &str) -> Result<Vec<Mute>, StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn is_muted(&self, user: &str, other: &str) -> bool {
        false
    }
    async fn put_jobs(&self, jobs: Vec<OutboxJob>) -> Result<(), StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn remove_jobs(&self, jobs: Vec<(u64, u64)>) -> Result<(), StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn jobs(&self) -> Result<Vec<OutboxJob>, StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn add_dead_letter(&self, dead: DeadLetter) -> Result<(), StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn idempotency(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn put_idempotency(&self, rec: IdempotencyRecord) -> Result<(), StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
}
