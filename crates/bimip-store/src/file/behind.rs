//! Write-behind of the user files (with the commit log on): a commit's lines are durable once the
//! log is synced, so they go to the users' queue and index files later, several commits' lines
//! of a file in one write. A user's file gets one `write` per [`AGE`] instead of one per commit:
//! on a busy shard that is most of its system calls, and each of them also updates the file's
//! times in the file system's journal. New users' folders and files are created there too, off
//! the commit path.
//!
//! The bytes wait here, per file, in the order they were logged. A file's bytes are written
//! before the file is read (payloads of a history read, compaction), before its user leaves the
//! cache, and before a log generation holding their records is checkpointed; see
//! `Shard::flush_behind`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long bytes may wait for their file (a read writes them at once).
#[cfg(not(test))]
pub(crate) const AGE: Duration = Duration::from_secs(1);
#[cfg(test)]
pub(crate) const AGE: Duration = Duration::from_millis(50);

/// A file with this much waiting is written after the commit, whatever its age (bounds memory).
pub(crate) const MAX_WAITING: usize = 64 << 10;

/// The bytes waiting for one file.
pub(crate) struct Waiting {
    /// The file's length when the first of these bytes was logged: where they go.
    pub base: u64,
    pub bytes: Vec<u8>,
    /// The log generation holding the first of them: it is not checkpointed before they are
    /// in the file.
    pub generation: u64,
    since: Instant,
    seq: u64,
}

impl Waiting {
    /// Where the next byte goes.
    pub fn end(&self) -> u64 {
        self.base + self.bytes.len() as u64
    }

    /// Adds the bytes that follow these in the file (`next.base` is [`Self::end`]).
    pub fn append(&mut self, next: Waiting) {
        debug_assert_eq!(next.base, self.end(), "waiting bytes joined out of order");
        self.bytes.extend_from_slice(&next.bytes);
        self.generation = self.generation.min(next.generation);
    }
}

/// Every file's waiting bytes, oldest first.
pub(crate) struct Behind<K> {
    files: HashMap<K, Waiting>,
    /// Files in the order their bytes started waiting; an entry whose `seq` no longer matches
    /// the file's was written meanwhile (skipped when met).
    order: VecDeque<(K, u64)>,
    seq: u64,
    /// How many files have bytes of each generation first (what a checkpoint waits for).
    generations: BTreeMap<u64, usize>,
}

impl<K: std::hash::Hash + Eq + Clone> Behind<K> {
    pub fn new() -> Self {
        Behind {
            files: HashMap::new(),
            order: VecDeque::new(),
            seq: 0,
            generations: BTreeMap::new(),
        }
    }

    fn insert(&mut self, key: K, w: Waiting) {
        *self.generations.entry(w.generation).or_default() += 1;
        self.order.push_back((key.clone(), w.seq));
        self.files.insert(key, w);
    }

    /// Takes what waits for `key`.
    pub fn take(&mut self, key: &K) -> Option<Waiting> {
        let w = self.files.remove(key)?;
        if let Some(n) = self.generations.get_mut(&w.generation) {
            *n -= 1;
            if *n == 0 {
                self.generations.remove(&w.generation);
            }
        }
        Some(w)
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Where bytes for `key` go next, if some are waiting.
    pub fn end(&self, key: &K) -> Option<u64> {
        self.files.get(key).map(Waiting::end)
    }

    /// Adds `data` after what waits for `key` (or at `base`, the file's length, if nothing
    /// does); returns whether the file now has [`MAX_WAITING`] or more waiting.
    pub fn push(&mut self, key: &K, base: u64, generation: u64, data: &[u8]) -> bool {
        if !self.files.contains_key(key) {
            self.seq += 1;
            let w = Waiting {
                base,
                bytes: Vec::new(),
                generation,
                since: Instant::now(),
                seq: self.seq,
            };
            self.insert(key.clone(), w);
        }
        match self.files.get_mut(key) {
            Some(w) => {
                w.bytes.extend_from_slice(data);
                w.bytes.len() >= MAX_WAITING
            }
            None => false,
        }
    }

    /// Drops what waits for `key` from file offset `at` on (a commit whose log write failed).
    pub fn cut(&mut self, key: &K, at: u64) {
        match self.files.get_mut(key) {
            Some(w) if at > w.base => w.bytes.truncate((at - w.base) as usize),
            Some(_) => {
                self.take(key);
            }
            None => {}
        }
    }

    /// Takes the file that has waited longest if it started waiting before `before`, or
    /// belongs to a generation up to `generation`.
    pub fn take_oldest(
        &mut self,
        before: Option<Instant>,
        generation: u64,
    ) -> Option<(K, Waiting)> {
        while let Some((key, seq)) = self.order.front() {
            match self.files.get(key) {
                Some(w) if w.seq == *seq => {
                    let aged = before.is_some_and(|b| w.since < b);
                    if !aged && w.generation > generation {
                        return None;
                    }
                    let (key, _) = self.order.pop_front()?;
                    let w = self.take(&key)?;
                    return Some((key, w));
                }
                _ => {
                    self.order.pop_front();
                }
            }
        }
        None
    }

    /// Puts back bytes whose write failed (retried after [`AGE`]).
    pub fn put_back(&mut self, key: K, mut w: Waiting) {
        self.seq += 1;
        w.seq = self.seq;
        w.since = Instant::now();
        self.insert(key, w);
    }

    /// The oldest generation some waiting bytes belong to.
    pub fn oldest_generation(&self) -> Option<u64> {
        self.generations.keys().next().copied()
    }

    /// Every file with bytes waiting.
    pub fn keys(&self) -> Vec<K> {
        self.files.keys().cloned().collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn bytes_wait_in_order_and_leave_oldest_first() {
        let mut b: Behind<&str> = Behind::new();
        assert!(!b.push(&"a", 10, 1, b"xx"));
        assert!(!b.push(&"b", 0, 1, b"y"));
        assert!(!b.push(&"a", 99, 2, b"zz"));
        assert_eq!(b.end(&"a"), Some(14));
        assert_eq!(b.oldest_generation(), Some(1));
        // "a" written on its own (a read): its place in the order is skipped later.
        let a = b.take(&"a").unwrap();
        assert_eq!((a.base, &a.bytes[..]), (10, &b"xxzz"[..]));
        b.push(&"a", 14, 3, b"w");
        let far_past = Instant::now() - Duration::from_secs(3600);
        // Nothing is old enough, but generation 1 must be written out.
        let (k, w) = b.take_oldest(Some(far_past), 1).unwrap();
        assert_eq!((k, w.generation), ("b", 1));
        assert!(b.take_oldest(Some(far_past), 1).is_none());
        assert!(b.take_oldest(None, 2).is_none());
        assert_eq!(b.oldest_generation(), Some(3));
        let (k, w) = b.take_oldest(Some(Instant::now() + AGE), 0).unwrap();
        // A failed write is put back, behind the others, and still counts for its generation.
        assert_eq!(b.oldest_generation(), None);
        b.push(&"c", 0, 4, b"v");
        b.put_back(k, w);
        assert_eq!(b.oldest_generation(), Some(3));
        let later = Some(Instant::now() + AGE);
        assert_eq!(b.take_oldest(later, 0).map(|(k, _)| k), Some("c"));
        assert_eq!(b.take_oldest(later, 0).map(|(k, _)| k), Some("a"));
        assert_eq!(b.oldest_generation(), None);
        assert!(b.is_empty());
    }

    #[test]
    fn a_failed_commit_is_cut_off() {
        let mut b: Behind<&str> = Behind::new();
        b.push(&"a", 5, 1, b"abc");
        b.push(&"a", 8, 1, b"def");
        b.cut(&"a", 8);
        assert_eq!(b.end(&"a"), Some(8));
        b.cut(&"a", 5);
        assert!(b.is_empty());
        assert!(b.push(&"a", 5, 1, &vec![0; MAX_WAITING]));
    }
}
