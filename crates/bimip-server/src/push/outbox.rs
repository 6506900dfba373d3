//! The outbox scheduler: every job (push or event) in memory, indexed by id, by coalesce key and
//! by due time, with each change persisted through the [`PushStore`] (durable before the caller
//! goes on). A job is taken by one worker at a time (`in_flight`); what the worker reports back
//! ([`Completion`]) decides whether the job is removed or scheduled again.
//!
//! The collapse window of a sent chat push (no second push for the same key until it ends) is
//! kept in memory only: after a restart, one more push per key may be sent inside a window,
//! which the device shows in place of the first (same collapse id). Keeping it on disk would
//! cost two more durable writes per push.
//!
//! Every change bumps the job's `version`, and the store keeps the highest version it was given,
//! so persisting outside the lock (in any order) leaves the newest state on disk.

use bimip_store::{
    PushStore, Store, StoreError,
    push::{Job, OutboxJob, PushJob},
};
use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};
use tokio::sync::Notify;

struct Entry {
    job: OutboxJob,
    /// A worker holds it: not in `due`, not dispatched again until completed.
    in_flight: bool,
    /// A newer message was folded into it while a worker held it: if that attempt ends with
    /// nothing sent (the older message was acknowledged meanwhile, say), the job is tried again
    /// for the newer one instead of being removed.
    merged_in_flight: bool,
}

#[derive(Default)]
struct State {
    jobs: HashMap<u64, Entry>,
    /// Coalesce key → id of the pending job holding it.
    by_key: HashMap<String, u64>,
    /// (due_at, id) of every job not in flight, push jobs and event jobs apart (see
    /// [`Outbox::take_due`]).
    due: [BTreeSet<(i64, u64)>; 2],
    /// Coalesce key → end of the collapse window of the push sent for it (unix ms).
    windows: HashMap<String, i64>,
    /// (window end, key), to forget ended windows.
    window_ends: BTreeSet<(i64, String)>,
}

impl State {
    /// Files a job as waiting for its due time (not in flight).
    fn insert_waiting(&mut self, job: OutboxJob) {
        self.due[kind(&job)].insert((job.due_at, job.id));
        self.jobs.insert(
            job.id,
            Entry {
                job,
                in_flight: false,
                merged_in_flight: false,
            },
        );
    }
}

/// What to persist after a change made under the lock.
#[derive(Default)]
struct Changes {
    put: Vec<OutboxJob>,
    remove: Vec<(u64, u64)>,
}

impl Changes {
    fn is_empty(&self) -> bool {
        self.put.is_empty() && self.remove.is_empty()
    }
}

/// What a new chat or notification item did to the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coalesced {
    /// A new job.
    Created,
    /// Folded into a pending job of the same key (count and newest offset updated).
    Merged,
    /// A push for this key was sent within the collapse window: nothing to send.
    InWindow,
}

/// How a worker's attempt ended, as far as the outbox is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// Done with the job (sent, or nothing to send any more): remove it.
    Remove,
    /// A chat push was sent: remove the job, and until `window_until` (unix ms) messages of the
    /// same coalesce key send nothing.
    SentWindow { window_until: i64 },
    /// Try again at `due_at`; `attempted` counts this attempt, `error` is kept on the job.
    Again {
        due_at: i64,
        attempted: bool,
        error: String,
    },
    /// Not now (its provider is paused, or the event endpoint is gone until restart): wait in
    /// memory until `due_at`. Nothing is written, so after a restart the job is due at once.
    Park { due_at: i64 },
}

/// The low bits of a job id: unix ms × 1000 plus a counter. The bits above carry the tag of the
/// node that made the job (0 with the file store), so nodes sharing Redis never collide.
pub const ID_SPACE: u64 = (1 << ID_TAG_SHIFT) - 1;
pub const ID_TAG_SHIFT: u32 = 51;

fn adopt_into(state: &mut State, job: OutboxJob) {
    if let Some(Job::Push(p)) = &job.job
        && !p.coalesce_key.is_empty()
    {
        state.by_key.insert(p.coalesce_key.clone(), job.id);
    }
    state.insert_waiting(job);
}

pub struct Outbox {
    state: Mutex<State>,
    store: Store,
    next_id: AtomicU64,
    /// Woken when a job becomes due earlier than the dispatcher's current sleep.
    pub wake: Notify,
}

impl Outbox {
    /// Loads every stored job (start-up). Jobs that were in flight when the server stopped are
    /// pending again.
    pub async fn load(store: Store) -> Result<Outbox, StoreError> {
        Outbox::load_owned(store, 0, |_| true).await
    }

    /// [`Self::load`] of the jobs `mine` accepts (in a cluster: those of this node and of the
    /// dead nodes it took over, by the tag in the id's top bits), with new ids in the space
    /// starting at `id_base` (this node's tag).
    pub async fn load_owned(
        store: Store,
        id_base: u64,
        mine: impl Fn(u64) -> bool,
    ) -> Result<Outbox, StoreError> {
        let jobs = store.jobs().await?;
        let mut state = State::default();
        let mut max_id = 0;
        for job in jobs.into_iter().filter(|j| mine(j.id)) {
            if job.id & !ID_SPACE == id_base {
                max_id = max_id.max(job.id & ID_SPACE);
            }
            adopt_into(&mut state, job);
        }
        Ok(Outbox {
            state: Mutex::new(state),
            store,
            // Ids are never reused, also after every job was removed and the server restarted:
            // an id names pushes and events to receivers (`webhook-id`) that deduplicate on it.
            next_id: AtomicU64::new(
                id_base | (max_id + 1).max(bimip_proto::now_ms().max(0) as u64 * 1000),
            ),
            wake: Notify::new(),
        })
    }

    /// Takes over stored jobs of a node that died (a cluster): they are dispatched from here.
    pub fn adopt(&self, jobs: Vec<OutboxJob>) -> usize {
        let n = jobs.len();
        {
            let mut state = self.lock();
            for job in jobs {
                if !state.jobs.contains_key(&job.id) {
                    adopt_into(&mut state, job);
                }
            }
        }
        self.wake.notify_one();
        n
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Makes `changes` durable. Callers box this future: it holds the store's futures, and an
    /// unboxed one would be copied with every task that awaits it.
    async fn persist(&self, changes: Changes) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let (put, remove) = (changes.put, changes.remove);
        match (put.is_empty(), remove.is_empty()) {
            (false, true) => self.store.put_jobs(put).await,
            (true, false) => self.store.remove_jobs(remove).await,
            _ => {
                let (a, b) = tokio::join!(self.store.put_jobs(put), self.store.remove_jobs(remove));
                a.and(b)
            }
        }
    }

    /// Adds a job that is never coalesced (events, high-priority notifications, test pushes).
    /// Returns its id once it is durable.
    pub async fn add(&self, mut job: OutboxJob) -> Result<u64, StoreError> {
        job.id = self.new_id();
        job.version = 1;
        let id = job.id;
        self.lock().insert_waiting(job.clone());
        self.wake.notify_one();
        Box::pin(self.persist(Changes {
            put: vec![job],
            remove: vec![],
        }))
        .await?;
        Ok(id)
    }

    /// A chat message (or normal notification) for one device: folded into the pending job of
    /// `push.coalesce_key`, or suppressed inside a sent push's collapse window (`window` true),
    /// or a new job due at `due_at`. Durable when it returns.
    pub async fn coalesce(
        &self,
        push: PushJob,
        now: i64,
        due_at: i64,
        window: bool,
    ) -> Result<Coalesced, StoreError> {
        let mut changes = Changes::default();
        let outcome = {
            let mut st = self.lock();
            let in_window = window
                && st
                    .windows
                    .get(&push.coalesce_key)
                    .is_some_and(|&until| until > now);
            let existing = st.by_key.get(&push.coalesce_key).copied();
            let pending = existing.and_then(|id| st.jobs.get_mut(&id));
            if in_window {
                Coalesced::InWindow
            } else if let Some(entry) = pending
                && let Some(Job::Push(p)) = &mut entry.job.job
            {
                p.count = p.count.saturating_add(push.count.max(1));
                if push.offset >= p.offset {
                    p.offset = push.offset;
                    p.message_id = push.message_id.clone();
                    p.title = push.title.clone();
                    p.body = push.body.clone();
                    p.data = push.data.clone();
                }
                entry.job.version += 1;
                entry.merged_in_flight |= entry.in_flight;
                changes.put.push(entry.job.clone());
                Coalesced::Merged
            } else {
                let id = self.new_id();
                let key = push.coalesce_key.clone();
                let job = OutboxJob {
                    id,
                    version: 1,
                    created_at: now,
                    due_at,
                    attempts: 0,
                    last_error: String::new(),
                    job: Some(Job::Push(push)),
                };
                if !key.is_empty() {
                    st.by_key.insert(key, id);
                }
                st.insert_waiting(job.clone());
                changes.put.push(job);
                Coalesced::Created
            }
        };
        if outcome == Coalesced::Created {
            self.wake.notify_one();
        }
        Box::pin(self.persist(changes)).await?;
        Ok(outcome)
    }

    /// Takes jobs due at `now` (marking them in flight): at most `pushes` push jobs and
    /// `events` event jobs, so a slow push provider never holds events back (or the reverse).
    /// Also forgets collapse windows that ended, and returns when the next job left waiting is
    /// due (unix ms).
    pub fn take_due(
        &self,
        now: i64,
        pushes: usize,
        events: usize,
    ) -> (Vec<OutboxJob>, Option<i64>) {
        let mut taken = Vec::new();
        let mut st = self.lock();
        while let Some((end, _)) = st.window_ends.first()
            && *end <= now
        {
            if let Some((end, key)) = st.window_ends.pop_first()
                && st.windows.get(&key) == Some(&end)
            {
                st.windows.remove(&key);
            }
        }
        let mut next: Option<i64> = None;
        for (k, budget) in [(PUSH, pushes), (EVENT, events)] {
            for _ in 0..budget {
                let Some(&(due, id)) = st.due[k].first() else {
                    break;
                };
                if due > now {
                    break;
                }
                st.due[k].remove(&(due, id));
                if let Some(entry) = st.jobs.get_mut(&id) {
                    entry.in_flight = true;
                    taken.push(entry.job.clone());
                }
            }
            // A kind with no free slot left wakes the dispatcher when a worker is done.
            if budget > 0
                && let Some(&(due, _)) = st.due[k].first()
            {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        (taken, next)
    }

    /// A worker finished with job `id`. Durable when it returns.
    pub async fn complete(&self, id: u64, how: Completion) -> Result<(), StoreError> {
        let mut changes = Changes::default();
        let wake = {
            let mut st = self.lock();
            let Some(entry) = st.jobs.get_mut(&id) else {
                return Ok(());
            };
            entry.in_flight = false;
            let merged = std::mem::take(&mut entry.merged_in_flight);
            match how {
                Completion::Remove if merged => {
                    // Tried again at once for the message folded in meanwhile.
                    entry.job.version += 1;
                    changes.put.push(entry.job.clone());
                    let (due, k) = (entry.job.due_at, kind(&entry.job));
                    st.due[k].insert((due, id));
                    true
                }
                Completion::Remove => {
                    remove_entry(&mut st, id, &mut changes);
                    false
                }
                Completion::Park { due_at } => {
                    // The stored due time stays: `remove_entry` and `take_due` look jobs up by
                    // the one in memory.
                    let (old, k) = (entry.job.due_at, kind(&entry.job));
                    entry.job.due_at = due_at;
                    st.due[k].remove(&(old, id));
                    st.due[k].insert((due_at, id));
                    false
                }
                Completion::SentWindow { window_until } => {
                    if let Some(Job::Push(p)) = &entry.job.job
                        && !p.coalesce_key.is_empty()
                    {
                        let key = p.coalesce_key.clone();
                        st.windows.insert(key.clone(), window_until);
                        st.window_ends.insert((window_until, key));
                    }
                    remove_entry(&mut st, id, &mut changes);
                    false
                }
                Completion::Again {
                    due_at,
                    attempted,
                    error,
                } => {
                    if attempted {
                        entry.job.attempts += 1;
                    }
                    entry.job.last_error = error;
                    entry.job.due_at = due_at;
                    entry.job.version += 1;
                    changes.put.push(entry.job.clone());
                    let k = kind(&entry.job);
                    st.due[k].insert((due_at, id));
                    true
                }
            }
        };
        if wake {
            self.wake.notify_one();
        }
        Box::pin(self.persist(changes)).await
    }

    /// Jobs waiting (pending or in flight) and the creation time of the oldest (unix ms), for
    /// metrics.
    pub fn depth(&self) -> (usize, Option<i64>) {
        let st = self.lock();
        let oldest = st.jobs.values().map(|e| e.job.created_at).min();
        (st.jobs.len(), oldest)
    }
}

const PUSH: usize = 0;
const EVENT: usize = 1;

/// Which due set a job waits in.
fn kind(job: &OutboxJob) -> usize {
    match job.job {
        Some(Job::Event(_)) => EVENT,
        _ => PUSH,
    }
}

fn remove_entry(st: &mut State, id: u64, changes: &mut Changes) {
    if let Some(e) = st.jobs.remove(&id) {
        st.due[kind(&e.job)].remove(&(e.job.due_at, id));
        if let Some(Job::Push(p)) = &e.job.job
            && st.by_key.get(&p.coalesce_key) == Some(&id)
        {
            st.by_key.remove(&p.coalesce_key);
        }
        changes.remove.push((id, e.job.version));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bimip_store::{FileStore, QueueStore, StoreConfig, push::EventJob};

    fn store(dir: &std::path::Path) -> Store {
        Store::File(FileStore::open(StoreConfig::new(dir)).unwrap().0)
    }

    fn chat(user: &str, offset: u64) -> PushJob {
        PushJob {
            user: user.into(),
            device: "phone".into(),
            from: "alice".into(),
            offset,
            count: 1,
            coalesce_key: format!("c-{user}"),
            ..Default::default()
        }
    }

    fn event(now: i64) -> OutboxJob {
        OutboxJob {
            created_at: now,
            due_at: now,
            job: Some(Job::Event(EventJob {
                r#type: "message.stored".into(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_burst_is_one_job_and_a_sent_push_opens_a_window() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::load(store(dir.path())).await.unwrap();
        assert_eq!(
            o.coalesce(chat("bob", 1), 0, 0, true).await.unwrap(),
            Coalesced::Created
        );
        assert_eq!(
            o.coalesce(chat("bob", 2), 0, 0, true).await.unwrap(),
            Coalesced::Merged
        );
        let (jobs, _) = o.take_due(0, 10, 10);
        assert_eq!(jobs.len(), 1);
        let Some(Job::Push(p)) = &jobs[0].job else {
            panic!()
        };
        assert_eq!((p.count, p.offset), (2, 2));
        o.complete(jobs[0].id, Completion::SentWindow { window_until: 100 })
            .await
            .unwrap();
        assert_eq!(
            o.coalesce(chat("bob", 3), 50, 50, true).await.unwrap(),
            Coalesced::InWindow
        );
        assert_eq!(o.depth().0, 0);
        // The window ends: the next message makes a new job.
        o.take_due(150, 10, 10);
        assert_eq!(
            o.coalesce(chat("bob", 4), 150, 150, true).await.unwrap(),
            Coalesced::Created
        );
    }

    #[tokio::test]
    async fn a_message_folded_in_during_an_attempt_that_sends_nothing_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::load(store(dir.path())).await.unwrap();
        o.coalesce(chat("bob", 1), 0, 0, true).await.unwrap();
        let (jobs, _) = o.take_due(0, 10, 10);
        // While the worker finds offset 1 acknowledged, offset 2 arrives.
        assert_eq!(
            o.coalesce(chat("bob", 2), 1, 1, true).await.unwrap(),
            Coalesced::Merged
        );
        o.complete(jobs[0].id, Completion::Remove).await.unwrap();
        let (again, _) = o.take_due(2, 10, 10);
        assert_eq!(again.len(), 1, "tried again for the newer message");
        let Some(Job::Push(p)) = &again[0].job else {
            panic!()
        };
        assert_eq!(p.offset, 2);
        o.complete(again[0].id, Completion::Remove).await.unwrap();
        assert_eq!(o.depth().0, 0);
    }

    #[tokio::test]
    async fn a_parked_job_keeps_its_stored_due_time() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let o = Outbox::load(s.clone()).await.unwrap();
        let id = o.add(event(10)).await.unwrap();
        let (jobs, _) = o.take_due(10, 0, 10);
        assert_eq!(jobs.len(), 1);
        o.complete(id, Completion::Park { due_at: 1_000_000 })
            .await
            .unwrap();
        assert!(o.take_due(20, 10, 10).0.is_empty(), "parked in memory");
        drop(o);
        s.shutdown().await;
        let o = Outbox::load(store(dir.path())).await.unwrap();
        assert_eq!(
            o.take_due(20, 10, 10).0.len(),
            1,
            "due at once after a restart"
        );
    }

    #[tokio::test]
    async fn events_are_not_held_back_by_busy_push_workers() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::load(store(dir.path())).await.unwrap();
        for u in ["a", "b", "c"] {
            o.coalesce(chat(u, 1), 0, 0, true).await.unwrap();
        }
        o.add(event(1)).await.unwrap();
        let (jobs, next) = o.take_due(5, 0, 1);
        assert_eq!(jobs.len(), 1);
        assert!(matches!(jobs[0].job, Some(Job::Event(_))));
        assert_eq!(
            next, None,
            "no push slot: a finishing worker wakes the dispatcher"
        );
        assert_eq!(o.take_due(5, 2, 0).0.len(), 2);
    }
}
