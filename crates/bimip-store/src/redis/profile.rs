//! STUB: replaced by the real Redis implementation of [`crate::ProfileStore`].

#![allow(unused_variables)]

use super::RedisStore;
use crate::*;

impl ProfileStore for RedisStore {
    async fn profile(&self, user: &str) -> Result<Profile, StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn put_contacts(
        &self,
        user: &str,
        entries: Vec<(String, bool)>,
        replace: bool,
    ) -> Result<usize, StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn remove_contact(&self, user: &str, contact: &str) -> Result<bool, StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn set_block(&self, user: &str, other: &str, blocked: bool) -> Result<bool, StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
    async fn set_presence(
        &self,
        user: &str,
        update: PresenceUpdate,
    ) -> Result<Profile, StoreError> {
        Err(StoreError::Internal("not implemented yet".into()))
    }
}
