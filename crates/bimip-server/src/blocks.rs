//! A read-through cache of who each user blocks, so the send path checks a block without a round
//! trip to the store on every message. Blocks change only through [`crate::api`], which refreshes
//! the entry after the store applied the change.

use bimip_store::{ProfileStore, Store, StoreError};
use std::{
    collections::{BTreeSet, HashMap},
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex},
};

const SHARDS: usize = 64;
/// Entries per shard before the shard is cleared (a cheap bound; misses just reload).
const MAX_PER_SHARD: usize = 16_384;

type Blocked = Arc<BTreeSet<String>>;

pub struct BlockCache {
    shards: Box<[Mutex<HashMap<String, Blocked>>]>,
    hasher: RandomState,
}

impl Default for BlockCache {
    fn default() -> Self {
        BlockCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl BlockCache {
    fn shard(&self, user: &str) -> std::sync::MutexGuard<'_, HashMap<String, Blocked>> {
        let i = self.hasher.hash_one(user) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put(&self, user: &str, blocked: Blocked) {
        let mut shard = self.shard(user);
        if shard.len() >= MAX_PER_SHARD {
            shard.clear();
        }
        shard.insert(user.to_string(), blocked);
    }

    /// Whether `user` blocks `other`.
    pub async fn blocks(&self, store: &Store, user: &str, other: &str) -> Result<bool, StoreError> {
        let cached = self.shard(user).get(user).cloned();
        let set = match cached {
            Some(s) => s,
            None => {
                let s = Arc::new(store.profile(user).await?.blocks);
                self.put(user, s.clone());
                s
            }
        };
        Ok(set.contains(other))
    }

    /// Reloads `user`'s entry after its blocks changed.
    pub async fn refresh(&self, store: &Store, user: &str) -> Result<(), StoreError> {
        let s = Arc::new(store.profile(user).await?.blocks);
        self.put(user, s);
        Ok(())
    }
}
