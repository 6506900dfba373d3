//! The push store's state in memory and the one function that changes it, [`PushState::apply`]:
//! live changes and the replay of snapshot and log files go through it alike, so memory after a
//! restart is what it was before.
//!
//! Every record *assigns*: a whole device entry, mute or idempotency record, or its removal.
//! Jobs keep the greatest `(version, removed)` they were given (a removal wins over a put of the
//! same version), so applying a job record twice, or over a state that already contains later
//! records, changes nothing. That is what lets a snapshot be taken in chunks while writers go on
//! (see `compact.rs`). Dead letters are the one list that is appended to; the snapshot takes
//! them in one piece at the moment the log is switched.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use bimip_proto::store::{
    DeadLetter, DeviceKey, DeviceToken, IdempotencyRecord, JobRemoval, Mute, OutboxJob, PushRecord,
    push_record::Change,
};

use crate::push::MAX_DEAD_LETTERS;

/// Where and when a record is applied: the number of the log it is (or will be) written to, and
/// the store's clock (unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct At {
    pub log: u64,
    pub now: i64,
}

/// A job id's entry: the job (boxed: most entries of a busy outbox are tombstones), or the
/// version it was removed at.
#[derive(Debug, Clone)]
enum Slot {
    Live(Box<OutboxJob>),
    Removed(Tombstone),
}

/// A removed job, kept so that an older put of it arriving later does not bring it back.
#[derive(Debug, Clone, Copy)]
struct Tombstone {
    version: u64,
    /// The log its removal record went to, and when (memory only; a replay sets it to the load).
    log: u64,
    at: i64,
}

/// Which tombstones a compaction forgets: those whose removal record is only in logs the
/// compaction deletes (`log <= self.log`), and old enough (`at <= self.cutoff`) that no stale put
/// of the job can still be on its way. The snapshot leaves them out and memory drops them once
/// the snapshot is in place; both test the same fields, which only change when the job is
/// touched again (and then its record is in the new log).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ForgetRule {
    pub log: u64,
    pub cutoff: i64,
}

impl ForgetRule {
    fn forgets(&self, t: &Tombstone) -> bool {
        t.log <= self.log && t.at <= self.cutoff
    }
}

/// Where a chunked snapshot stands: the section and the last key taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SnapCursor {
    Devices(Option<String>),
    Mutes(Option<String>),
    Jobs(Option<u64>),
    Idempotency(Option<String>),
    Done,
}

/// Sizes, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Counts {
    pub devices: usize,
    pub mutes: usize,
    pub jobs: usize,
    pub tombstones: usize,
    pub dead_letters: usize,
    pub idempotency: usize,
}

#[derive(Debug)]
pub(crate) struct PushState {
    /// user → device → its token.
    devices: BTreeMap<String, BTreeMap<String, DeviceToken>>,
    /// (platform, token) → the (user, device) holding it.
    tokens: HashMap<(i32, String), (String, String)>,
    /// user → muted user → since (unix ms).
    mutes: BTreeMap<String, BTreeMap<String, i64>>,
    jobs: BTreeMap<u64, Slot>,
    /// Oldest first, at most `dead_cap`.
    dead: VecDeque<Arc<DeadLetter>>,
    dead_cap: usize,
    idempotency: BTreeMap<String, IdempotencyRecord>,
    /// (expires_at, key) of every idempotency record, to drop the expired ones cheaply.
    expiry: BTreeSet<(i64, String)>,
    /// Devices whose `last_push_at` in memory is newer than on disk.
    pushed: HashSet<(String, String)>,
}

impl Default for PushState {
    fn default() -> Self {
        PushState::with_dead_cap(MAX_DEAD_LETTERS)
    }
}

/// The keys of `m` after `after` (all of them for `None`), in order.
fn keys_after<'a, V>(
    m: &'a BTreeMap<String, V>,
    after: &Option<String>,
) -> impl Iterator<Item = (&'a String, &'a V)> {
    let lo = match after {
        Some(k) => Bound::Excluded(k.as_str()),
        None => Bound::Unbounded,
    };
    m.range::<str, _>((lo, Bound::Unbounded))
}

impl PushState {
    pub fn with_dead_cap(dead_cap: usize) -> Self {
        PushState {
            devices: BTreeMap::new(),
            tokens: HashMap::new(),
            mutes: BTreeMap::new(),
            jobs: BTreeMap::new(),
            dead: VecDeque::new(),
            dead_cap: dead_cap.max(1),
            idempotency: BTreeMap::new(),
            expiry: BTreeSet::new(),
            pushed: HashSet::new(),
        }
    }

    /// Applies one record; returns whether the state changed (a live change writes the record
    /// only then).
    pub fn apply(&mut self, change: Change, at: At) -> bool {
        match change {
            Change::PutDevice(t) => self.put_device(t),
            Change::RemoveDevice(k) => self.remove_device(&k.user, &k.device).is_some(),
            Change::PutMute(m) => {
                let prev = self
                    .mutes
                    .entry(m.user)
                    .or_default()
                    .insert(m.other, m.since);
                prev != Some(m.since)
            }
            Change::RemoveMute(m) => self.remove_mute(&m.user, &m.other),
            Change::PutJob(j) => self.put_job(j),
            Change::RemoveJob(r) => self.remove_job(r, at),
            Change::DeadLetter(d) => {
                self.dead.push_back(Arc::new(d));
                while self.dead.len() > self.dead_cap {
                    self.dead.pop_front();
                }
                true
            }
            Change::PutIdempotency(r) => self.put_idempotency(r, at.now),
        }
    }

    fn put_device(&mut self, t: DeviceToken) -> bool {
        let (user, device) = (t.user.clone(), t.device.clone());
        let key = (t.platform, t.token.clone());
        let prev = self
            .devices
            .entry(user.clone())
            .or_default()
            .insert(device.clone(), t);
        if let Some(p) = prev
            && (p.platform, p.token.as_str()) != (key.0, key.1.as_str())
        {
            self.unindex(p.platform, p.token, &user, &device);
        }
        // The record carries `last_push_at` as it is now: nothing is left to write for it.
        self.pushed.remove(&(user.clone(), device.clone()));
        self.tokens.insert(key, (user, device));
        true
    }

    fn unindex(&mut self, platform: i32, token: String, user: &str, device: &str) {
        let key = (platform, token);
        if self
            .tokens
            .get(&key)
            .is_some_and(|(u, d)| u == user && d == device)
        {
            self.tokens.remove(&key);
        }
    }

    fn remove_device(&mut self, user: &str, device: &str) -> Option<DeviceToken> {
        let devices = self.devices.get_mut(user)?;
        let old = devices.remove(device)?;
        if devices.is_empty() {
            self.devices.remove(user);
        }
        self.pushed.remove(&(user.to_string(), device.to_string()));
        self.unindex(old.platform, old.token.clone(), user, device);
        Some(old)
    }

    fn remove_mute(&mut self, user: &str, other: &str) -> bool {
        let Some(m) = self.mutes.get_mut(user) else {
            return false;
        };
        let existed = m.remove(other).is_some();
        if m.is_empty() {
            self.mutes.remove(user);
        }
        existed
    }

    /// Keeps the greater of the stored and the given state (see the module docs).
    fn put_job(&mut self, job: OutboxJob) -> bool {
        match self.jobs.get(&job.id) {
            Some(Slot::Live(old)) if old.version > job.version => false,
            Some(Slot::Removed(t)) if t.version >= job.version => false,
            _ => {
                self.jobs.insert(job.id, Slot::Live(Box::new(job)));
                true
            }
        }
    }

    fn remove_job(&mut self, r: JobRemoval, at: At) -> bool {
        match self.jobs.get(&r.id) {
            Some(Slot::Live(old)) if old.version > r.version => false,
            Some(Slot::Removed(t)) if t.version >= r.version => false,
            _ => {
                let t = Tombstone {
                    version: r.version,
                    log: at.log,
                    at: at.now,
                };
                self.jobs.insert(r.id, Slot::Removed(t));
                true
            }
        }
    }

    /// Assigns the key's record. One that has expired by now is not kept, but it still replaces
    /// the older one: a replay must not bring back an answer a later record replaced. (A live
    /// put of an already expired record is skipped before it gets here.)
    fn put_idempotency(&mut self, r: IdempotencyRecord, now: i64) -> bool {
        self.drop_expired(now);
        let had = match self.idempotency.remove(&r.key) {
            Some(old) => self.expiry.remove(&(old.expires_at, r.key.clone())),
            None => false,
        };
        if r.expires_at < now {
            return had;
        }
        self.expiry.insert((r.expires_at, r.key.clone()));
        self.idempotency.insert(r.key.clone(), r);
        true
    }

    /// Forgets idempotency records past their expiry (they are ignored by reads already).
    pub fn drop_expired(&mut self, now: i64) {
        while let Some((exp, key)) = self.expiry.first().cloned() {
            if exp >= now {
                break;
            }
            self.expiry.pop_first();
            self.idempotency.remove(&key);
        }
    }

    /// After a full replay: a token held by two devices (only possible when the files were
    /// changed by hand, or after a repair or lost log) stays with the one that registered it
    /// last. Rebuilds the token index from the devices.
    pub fn finish_load(&mut self) -> Vec<(String, String)> {
        self.tokens.clear();
        let mut dropped = Vec::new();
        let mut holders: HashMap<(i32, String), (String, String, i64)> = HashMap::new();
        for (user, devices) in &self.devices {
            for (device, t) in devices {
                let key = (t.platform, t.token.clone());
                let this = (user.clone(), device.clone(), t.registered_at);
                match holders.get(&key) {
                    Some(h) if h.2 >= this.2 => dropped.push((this.0, this.1)),
                    Some(h) => {
                        dropped.push((h.0.clone(), h.1.clone()));
                        holders.insert(key, this);
                    }
                    None => {
                        holders.insert(key, this);
                    }
                }
            }
        }
        for (user, device) in &dropped {
            if let Some(m) = self.devices.get_mut(user) {
                m.remove(device);
                if m.is_empty() {
                    self.devices.remove(user);
                }
            }
        }
        self.tokens = holders
            .into_iter()
            .map(|(k, (u, d, _))| (k, (u, d)))
            .collect();
        dropped
    }

    // ---- reads ----

    pub fn device_tokens(&self, user: &str) -> Vec<DeviceToken> {
        self.devices
            .get(user)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn has_device_tokens(&self, user: &str) -> bool {
        self.devices.get(user).is_some_and(|m| !m.is_empty())
    }

    pub fn device(&self, user: &str, device: &str) -> Option<&DeviceToken> {
        self.devices.get(user)?.get(device)
    }

    /// Who holds `token` of `platform`.
    pub fn holder(&self, platform: i32, token: &str) -> Option<&(String, String)> {
        self.tokens.get(&(platform, token.to_string()))
    }

    pub fn mutes(&self, user: &str) -> Vec<Mute> {
        self.mutes
            .get(user)
            .map(|m| {
                m.iter()
                    .map(|(other, since)| Mute {
                        user: user.to_string(),
                        other: other.clone(),
                        since: *since,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn is_muted(&self, user: &str, other: &str) -> bool {
        self.mutes.get(user).is_some_and(|m| m.contains_key(other))
    }

    /// Mutes of other users naming `other` (for inspection; scans every mute).
    pub fn muted_by(&self, other: &str) -> Vec<Mute> {
        self.mutes
            .iter()
            .filter_map(|(user, m)| {
                m.get(other).map(|since| Mute {
                    user: user.clone(),
                    other: other.to_string(),
                    since: *since,
                })
            })
            .collect()
    }

    pub fn jobs(&self) -> Vec<OutboxJob> {
        self.jobs
            .values()
            .filter_map(|s| match s {
                Slot::Live(j) => Some((**j).clone()),
                Slot::Removed(_) => None,
            })
            .collect()
    }

    /// Newest first.
    pub fn dead_letters(&self, limit: usize) -> Vec<DeadLetter> {
        self.dead
            .iter()
            .rev()
            .take(limit)
            .map(|d| (**d).clone())
            .collect()
    }

    pub fn idempotency(&self, key: &str, now: i64) -> Option<IdempotencyRecord> {
        self.idempotency
            .get(key)
            .filter(|r| r.expires_at >= now)
            .cloned()
    }

    pub fn counts(&self) -> Counts {
        let (mut jobs, mut tombstones) = (0, 0);
        for s in self.jobs.values() {
            match s {
                Slot::Live(_) => jobs += 1,
                Slot::Removed(_) => tombstones += 1,
            }
        }
        Counts {
            devices: self.devices.values().map(BTreeMap::len).sum(),
            mutes: self.mutes.values().map(BTreeMap::len).sum(),
            jobs,
            tombstones,
            dead_letters: self.dead.len(),
            idempotency: self.idempotency.len(),
        }
    }

    // ---- advisory last push ----

    /// Sets a device's `last_push_at` in memory (only forward); false when it has no token.
    pub fn note_pushed(&mut self, user: &str, device: &str, at: i64) -> bool {
        let Some(t) = self.devices.get_mut(user).and_then(|m| m.get_mut(device)) else {
            return false;
        };
        if at > t.last_push_at {
            t.last_push_at = at;
            self.pushed.insert((user.to_string(), device.to_string()));
        }
        true
    }

    /// The devices whose `last_push_at` is newer in memory than on disk; forgets the list.
    pub fn take_pushed(&mut self) -> Vec<DeviceToken> {
        let keys: Vec<(String, String)> = self.pushed.drain().collect();
        keys.iter()
            .filter_map(|(u, d)| self.device(u, d).cloned())
            .collect()
    }

    // ---- snapshots ----

    /// Every dead letter, oldest first (shared, so taking them costs no copy).
    pub fn dead_snapshot(&self) -> Vec<Arc<DeadLetter>> {
        self.dead.iter().cloned().collect()
    }

    /// The next records of a snapshot after `cur`, about `max` of them (a user's devices or
    /// mutes are never split), leaving out expired idempotency records and the tombstones
    /// `rule` forgets. Dead letters are not part of it (see [`Self::dead_snapshot`]).
    pub fn snapshot_chunk(
        &mut self,
        cur: &mut SnapCursor,
        max: usize,
        rule: ForgetRule,
        now: i64,
        out: &mut Vec<PushRecord>,
    ) {
        let rec = |c: Change| PushRecord { change: Some(c) };
        while out.len() < max {
            match cur {
                SnapCursor::Devices(after) => {
                    let mut next = None;
                    for (user, devices) in keys_after(&self.devices, after) {
                        for t in devices.values() {
                            // The snapshot takes its last push time along.
                            if !self.pushed.is_empty() {
                                self.pushed.remove(&(t.user.clone(), t.device.clone()));
                            }
                            out.push(rec(Change::PutDevice(t.clone())));
                        }
                        next = Some(user.clone());
                        if out.len() >= max {
                            break;
                        }
                    }
                    *cur = match next {
                        Some(u) if out.len() >= max => SnapCursor::Devices(Some(u)),
                        _ => SnapCursor::Mutes(None),
                    };
                }
                SnapCursor::Mutes(after) => {
                    let mut next = None;
                    for (user, m) in keys_after(&self.mutes, after) {
                        for (other, since) in m {
                            out.push(rec(Change::PutMute(Mute {
                                user: user.clone(),
                                other: other.clone(),
                                since: *since,
                            })));
                        }
                        next = Some(user.clone());
                        if out.len() >= max {
                            break;
                        }
                    }
                    *cur = match next {
                        Some(u) if out.len() >= max => SnapCursor::Mutes(Some(u)),
                        _ => SnapCursor::Jobs(None),
                    };
                }
                SnapCursor::Jobs(after) => {
                    let lo = after.map_or(Bound::Unbounded, Bound::Excluded);
                    let mut next = None;
                    for (id, slot) in self.jobs.range((lo, Bound::Unbounded)) {
                        match slot {
                            Slot::Live(j) => out.push(rec(Change::PutJob((**j).clone()))),
                            Slot::Removed(t) if !rule.forgets(t) => {
                                out.push(rec(Change::RemoveJob(JobRemoval {
                                    id: *id,
                                    version: t.version,
                                })));
                            }
                            Slot::Removed(_) => {}
                        }
                        next = Some(*id);
                        if out.len() >= max {
                            break;
                        }
                    }
                    *cur = match next {
                        Some(id) if out.len() >= max => SnapCursor::Jobs(Some(id)),
                        _ => SnapCursor::Idempotency(None),
                    };
                }
                SnapCursor::Idempotency(after) => {
                    let mut next = None;
                    for (key, r) in keys_after(&self.idempotency, after) {
                        if r.expires_at >= now {
                            out.push(rec(Change::PutIdempotency(r.clone())));
                        }
                        next = Some(key.clone());
                        if out.len() >= max {
                            break;
                        }
                    }
                    *cur = match next {
                        Some(k) if out.len() >= max => SnapCursor::Idempotency(Some(k)),
                        _ => SnapCursor::Done,
                    };
                }
                SnapCursor::Done => return,
            }
        }
    }

    /// Drops the tombstones a finished snapshot left out; returns how many.
    pub fn forget_tombstones(&mut self, rule: ForgetRule) -> usize {
        let before = self.jobs.len();
        self.jobs
            .retain(|_, s| !matches!(s, Slot::Removed(t) if rule.forgets(t)));
        before - self.jobs.len()
    }
}

/// A device key record.
pub(crate) fn device_key(user: &str, device: &str) -> DeviceKey {
    DeviceKey {
        user: user.to_string(),
        device: device.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bimip_proto::store::{EventJob, outbox_job::Job};

    const AT: At = At { log: 1, now: 1000 };

    fn token(user: &str, device: &str, tok: &str) -> DeviceToken {
        DeviceToken {
            user: user.into(),
            device: device.into(),
            platform: 1,
            token: tok.into(),
            registered_at: 10,
            ..Default::default()
        }
    }

    fn job(id: u64, version: u64) -> OutboxJob {
        OutboxJob {
            id,
            version,
            job: Some(Job::Event(EventJob {
                webhook_id: format!("w{id}.{version}"),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn removal(id: u64, version: u64) -> Change {
        Change::RemoveJob(JobRemoval { id, version })
    }

    fn versions(s: &PushState) -> Vec<(u64, u64)> {
        s.jobs().iter().map(|j| (j.id, j.version)).collect()
    }

    #[test]
    fn jobs_keep_the_greatest_version_and_removals_win_ties() {
        let mut s = PushState::default();
        assert!(s.apply(Change::PutJob(job(1, 2)), AT));
        assert!(!s.apply(Change::PutJob(job(1, 1)), AT), "older put ignored");
        assert!(
            s.apply(Change::PutJob(job(1, 2)), AT),
            "same version replaces"
        );
        assert!(!s.apply(removal(1, 1), AT), "older removal ignored");
        assert_eq!(versions(&s), vec![(1, 2)]);
        assert!(s.apply(removal(1, 2), AT), "removal at the stored version");
        assert!(s.jobs().is_empty());
        assert!(!s.apply(Change::PutJob(job(1, 2)), AT), "no resurrection");
        assert!(!s.apply(removal(1, 2), AT));
        assert!(
            s.apply(Change::PutJob(job(1, 3)), AT),
            "a newer put is a new life"
        );
        // A removal that arrives before its job: the put is ignored.
        assert!(s.apply(removal(7, 4), AT));
        assert!(!s.apply(Change::PutJob(job(7, 4)), AT));
        assert_eq!(versions(&s), vec![(1, 3)]);
        assert_eq!(s.counts().tombstones, 1);
    }

    #[test]
    fn device_tokens_index_follows_puts_and_removals() {
        let mut s = PushState::default();
        s.apply(Change::PutDevice(token("ann", "phone", "t1")), AT);
        assert_eq!(s.holder(1, "t1").unwrap().0, "ann");
        // Replacing the device's token frees the old one.
        s.apply(Change::PutDevice(token("ann", "phone", "t2")), AT);
        assert!(s.holder(1, "t1").is_none());
        assert_eq!(s.device_tokens("ann").len(), 1);
        // The same token on another platform is another token.
        s.apply(
            Change::PutDevice(DeviceToken {
                platform: 2,
                ..token("ben", "pad", "t2")
            }),
            AT,
        );
        assert_eq!(s.holder(1, "t2").unwrap().0, "ann");
        assert_eq!(s.holder(2, "t2").unwrap().0, "ben");
        assert!(s.apply(Change::RemoveDevice(device_key("ann", "phone")), AT));
        assert!(!s.apply(Change::RemoveDevice(device_key("ann", "phone")), AT));
        assert!(s.holder(1, "t2").is_none());
        assert!(!s.has_device_tokens("ann"));
        assert!(s.has_device_tokens("ben"));
    }

    #[test]
    fn a_token_held_twice_after_a_replay_stays_with_the_latest_registration() {
        let mut s = PushState::default();
        s.apply(Change::PutDevice(token("ann", "phone", "t")), AT);
        s.apply(
            Change::PutDevice(DeviceToken {
                registered_at: 20,
                ..token("ben", "phone", "t")
            }),
            AT,
        );
        let dropped = s.finish_load();
        assert_eq!(dropped, vec![("ann".to_string(), "phone".to_string())]);
        assert!(!s.has_device_tokens("ann"));
        assert_eq!(s.holder(1, "t").unwrap().0, "ben");
    }

    #[test]
    fn dead_letters_are_capped_newest_kept() {
        let mut s = PushState::with_dead_cap(3);
        for i in 0..5 {
            s.apply(
                Change::DeadLetter(DeadLetter {
                    at: i,
                    ..Default::default()
                }),
                AT,
            );
        }
        let at: Vec<i64> = s.dead_letters(10).iter().map(|d| d.at).collect();
        assert_eq!(at, vec![4, 3, 2]);
        assert_eq!(s.dead_letters(1).len(), 1);
    }

    #[test]
    fn default_dead_letter_cap_is_the_contract() {
        let mut s = PushState::default();
        for i in 0..(MAX_DEAD_LETTERS + 5) {
            s.apply(
                Change::DeadLetter(DeadLetter {
                    at: i as i64,
                    ..Default::default()
                }),
                AT,
            );
        }
        let all = s.dead_letters(usize::MAX);
        assert_eq!(all.len(), MAX_DEAD_LETTERS);
        assert_eq!(all[0].at, (MAX_DEAD_LETTERS + 4) as i64);
        assert_eq!(all[MAX_DEAD_LETTERS - 1].at, 5);
    }

    #[test]
    fn idempotency_expires() {
        let mut s = PushState::default();
        let rec = |key: &str, expires_at| IdempotencyRecord {
            key: key.into(),
            expires_at,
            ..Default::default()
        };
        assert!(!s.apply(Change::PutIdempotency(rec("old", 999)), AT));
        assert!(s.apply(Change::PutIdempotency(rec("k", 1500)), AT));
        assert!(s.idempotency("k", 1500).is_some());
        assert!(s.idempotency("k", 1501).is_none());
        // Replacing moves the expiry; a later put drops what expired.
        assert!(s.apply(Change::PutIdempotency(rec("k", 3000)), AT));
        assert!(s.apply(Change::PutIdempotency(rec("j", 1200)), AT));
        s.apply(
            Change::PutIdempotency(rec("x", 9000)),
            At { log: 1, now: 2000 },
        );
        assert_eq!(s.counts().idempotency, 2);
        assert!(s.idempotency("k", 2000).is_some());
        // Replayed after it expired, a record still replaces the one before it.
        assert!(s.apply(
            Change::PutIdempotency(rec("k", 2500)),
            At { log: 1, now: 2600 }
        ));
        assert!(s.idempotency("k", 2000).is_none());
    }

    #[test]
    fn chunked_snapshot_replays_to_the_same_state_and_forgets_old_tombstones() {
        let mut s = PushState::default();
        for u in 0..50 {
            for d in 0..3 {
                s.apply(
                    Change::PutDevice(token(
                        &format!("u{u:02}"),
                        &format!("d{d}"),
                        &format!("t{u}.{d}"),
                    )),
                    AT,
                );
            }
            s.apply(
                Change::PutMute(Mute {
                    user: format!("u{u:02}"),
                    other: "spam".into(),
                    since: 5,
                }),
                AT,
            );
        }
        for id in 0..40 {
            s.apply(Change::PutJob(job(id, 1)), AT);
        }
        for id in 0..10 {
            s.apply(removal(id, 1), At { log: 1, now: 100 });
        }
        for id in 10..20 {
            s.apply(removal(id, 1), At { log: 2, now: 100 });
        }
        s.apply(
            Change::PutIdempotency(IdempotencyRecord {
                key: "k".into(),
                expires_at: 5000,
                ..Default::default()
            }),
            AT,
        );
        // Forget tombstones of log 1 older than 500: ids 0..10.
        let rule = ForgetRule {
            log: 1,
            cutoff: 500,
        };
        let mut cur = SnapCursor::Devices(None);
        let mut recs = Vec::new();
        let mut chunks = 0;
        while cur != SnapCursor::Done {
            let mut chunk = Vec::new();
            s.snapshot_chunk(&mut cur, 7, rule, 1000, &mut chunk);
            assert!(chunk.len() <= 9, "a chunk is about max long");
            recs.extend(chunk);
            chunks += 1;
        }
        assert!(chunks > 20);
        let mut back = PushState::default();
        for r in recs {
            back.apply(r.change.unwrap(), AT);
        }
        back.finish_load();
        assert_eq!(s.forget_tombstones(rule), 10);
        let (a, b) = (s.counts(), back.counts());
        assert_eq!(a, b);
        assert_eq!(a.tombstones, 10);
        assert_eq!(s.jobs(), back.jobs());
        assert_eq!(s.device_tokens("u07"), back.device_tokens("u07"));
        assert_eq!(s.mutes("u49"), back.mutes("u49"));
        assert_eq!(back.holder(1, "t3.2").unwrap().0, "u03");
    }
}
