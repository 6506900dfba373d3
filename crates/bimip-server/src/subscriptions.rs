//! Live subscriptions of the `open` presence policy: target user → the connections that
//! subscribed to it. Split into 64 locked stripes by user hash; a lock is held only for a map
//! update or a copy of one target's subscribers.

use crate::sessions::ConnHandle;
use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex},
};

const STRIPES: usize = 64;

/// Subscribed connection id → (subscriber user, connection).
type Subscribers = HashMap<u64, (Arc<str>, ConnHandle)>;
type Stripe = Mutex<HashMap<Arc<str>, Subscribers>>;

pub struct Subscriptions {
    stripes: Box<[Stripe]>,
    hasher: RandomState,
}

impl Default for Subscriptions {
    fn default() -> Self {
        Subscriptions {
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl Subscriptions {
    fn stripe(&self, user: &str) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Subscribers>> {
        let i = self.hasher.hash_one(user) as usize % STRIPES;
        self.stripes[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add(&self, target: &str, subscriber: &Arc<str>, conn: &ConnHandle) {
        self.stripe(target)
            .entry(Arc::from(target))
            .or_default()
            .insert(conn.id, (subscriber.clone(), conn.clone()));
    }

    pub fn remove(&self, target: &str, conn_id: u64) {
        let mut stripe = self.stripe(target);
        if let Some(m) = stripe.get_mut(target) {
            m.remove(&conn_id);
            if m.is_empty() {
                stripe.remove(target);
            }
        }
    }

    /// The connections subscribed to `target`, with their users.
    pub fn subscribers(&self, target: &str) -> Vec<(Arc<str>, ConnHandle)> {
        self.stripe(target)
            .get(target)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}
