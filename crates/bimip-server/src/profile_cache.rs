//! A read-through cache of the parts of each user's profile that the hot paths ask about: whom
//! the user blocks (every send checks "does the recipient block the sender") and whether its
//! intent is DND (every push decision). Without it each of those is a round trip to the store.
//! The entries change only through bimip: blocks through [`crate::api`], the intent through
//! [`crate::awareness::set_state`], each of which refreshes the entry after the store applied the
//! change and, in a cluster, tells the other nodes to drop theirs ([`ProfileCache::forget`]).

use bimip_proto::v1::Status;
use bimip_store::{Profile, ProfileStore, Store, StoreError};
use std::{
    collections::{BTreeSet, HashMap},
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex},
};

const STRIPES: usize = 64;
/// Entries per stripe before the stripe is cleared (a cheap bound; misses just reload).
const MAX_PER_STRIPE: usize = 16_384;

/// What is cached of one profile.
#[derive(Debug, Default)]
pub struct Cached {
    pub blocks: BTreeSet<String>,
    pub dnd: bool,
}

impl Cached {
    fn of(p: Profile) -> Cached {
        Cached {
            dnd: p.intent == Status::Dnd,
            blocks: p.blocks,
        }
    }
}

type Stripe = Mutex<HashMap<String, Arc<Cached>>>;

pub struct ProfileCache {
    stripes: Box<[Stripe]>,
    hasher: RandomState,
}

impl Default for ProfileCache {
    fn default() -> Self {
        ProfileCache {
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl ProfileCache {
    fn stripe(&self, user: &str) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Cached>>> {
        let i = self.hasher.hash_one(user) as usize % STRIPES;
        self.stripes[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put(&self, user: &str, c: Arc<Cached>) {
        let mut stripe = self.stripe(user);
        if stripe.len() >= MAX_PER_STRIPE {
            stripe.clear();
        }
        stripe.insert(user.to_string(), c);
    }

    /// The cached entry of `user`, loaded from the store on a miss.
    pub async fn get(&self, store: &Store, user: &str) -> Result<Arc<Cached>, StoreError> {
        if let Some(c) = self.stripe(user).get(user).cloned() {
            return Ok(c);
        }
        let c = Arc::new(Cached::of(store.profile(user).await?));
        self.put(user, c.clone());
        Ok(c)
    }

    /// Whether `user` blocks `other`.
    pub async fn blocks(&self, store: &Store, user: &str, other: &str) -> Result<bool, StoreError> {
        Ok(self.get(store, user).await?.blocks.contains(other))
    }

    /// Reloads `user`'s entry after its blocks or intent changed.
    pub async fn refresh(&self, store: &Store, user: &str) -> Result<(), StoreError> {
        let c = Arc::new(Cached::of(store.profile(user).await?));
        self.put(user, c);
        Ok(())
    }

    /// Drops `user`'s entry (another node changed the profile); the next read reloads it.
    pub fn forget(&self, user: &str) {
        self.stripe(user).remove(user);
    }

    /// Replaces `user`'s entry with what a profile the caller already holds says.
    pub fn update(&self, user: &str, p: &Profile) {
        self.put(
            user,
            Arc::new(Cached {
                blocks: p.blocks.clone(),
                dnd: p.intent == Status::Dnd,
            }),
        );
    }
}
