//! Admission limits checked before a WebSocket upgrade: connections per user and in total. A
//! [`ConnSlot`] is taken before the upgrade and given back when the connection (or the failed
//! upgrade) is dropped, so concurrent upgrades cannot overshoot.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

const SHARDS: usize = 64;

type Shard = Mutex<HashMap<Arc<str>, u32>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The user holds `max_connections_per_user` connections already.
    User,
    /// The server holds `max_connections` connections already.
    Server,
}

pub struct ConnLimits {
    per_user: u32,
    total_max: u32,
    total: AtomicU32,
    shards: Box<[Shard]>,
    hasher: RandomState,
}

impl ConnLimits {
    pub fn new(per_user: u32, total_max: u32) -> ConnLimits {
        ConnLimits {
            per_user,
            total_max,
            total: AtomicU32::new(0),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, user: &str) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, u32>> {
        let i = self.hasher.hash_one(user) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot for one more connection of `user`.
    pub fn acquire(self: &Arc<Self>, user: &Arc<str>) -> Result<ConnSlot, Refusal> {
        let took_total = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.total_max).then_some(n + 1)
            });
        if took_total.is_err() {
            return Err(Refusal::Server);
        }
        let mut shard = self.shard(user);
        let n = shard.entry(user.clone()).or_insert(0);
        if *n >= self.per_user {
            if *n == 0 {
                shard.remove(user);
            }
            drop(shard);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::User);
        }
        *n += 1;
        Ok(ConnSlot {
            limits: self.clone(),
            user: user.clone(),
        })
    }

    pub fn total(&self) -> u32 {
        self.total.load(Ordering::Acquire)
    }

    pub fn of_user(&self, user: &str) -> u32 {
        self.shard(user).get(user).copied().unwrap_or(0)
    }

    fn release(&self, user: &str) {
        {
            let mut shard = self.shard(user);
            if let Some(n) = shard.get_mut(user) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    shard.remove(user);
                }
            }
        }
        self.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One admitted connection; gives its slot back on drop.
pub struct ConnSlot {
    limits: Arc<ConnLimits>,
    user: Arc<str>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.limits.release(&self.user);
    }
}

/// A token bucket: `rate` per second with a burst of `burst`. Used per connection for the
/// frame rate and for TYPING/RECORDING.
pub struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: tokio::time::Instant,
}

impl TokenBucket {
    pub fn new(rate: u32) -> TokenBucket {
        TokenBucket::with_burst(rate, rate)
    }

    pub fn with_burst(rate: u32, burst: u32) -> TokenBucket {
        TokenBucket {
            tokens: burst as f64,
            rate: rate as f64,
            burst: burst as f64,
            last: tokio::time::Instant::now(),
        }
    }

    /// Takes one token; false when the bucket is empty.
    pub fn take(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_user_and_total_limits() {
        let l = Arc::new(ConnLimits::new(2, 3));
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        let a1 = l.acquire(&a).expect("a1");
        let _a2 = l.acquire(&a).expect("a2");
        assert_eq!(l.acquire(&a).err(), Some(Refusal::User));
        let _b1 = l.acquire(&b).expect("b1");
        assert_eq!(l.acquire(&b).err(), Some(Refusal::Server));
        assert_eq!(l.total(), 3);
        drop(a1);
        assert_eq!(l.of_user("a"), 1);
        let _b2 = l.acquire(&b).expect("b2 after a1 left");
        assert_eq!(l.total(), 3);
    }
}
