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
}

#[derive(Default)]
struct State {
    jobs: HashMap<u64, Entry>,
    /// Coalesce key → id of the pending job holding it.
    by_key: HashMap<String, u64>,
    /// (due_at, id) of every job not in flight.
    due: BTreeSet<(i64, u64)>,
    /// Coalesce key → end of the collapse window of the push sent for it (unix ms).
    windows: HashMap<String, i64>,
    /// (window end, key), to forget ended windows.
    window_ends: BTreeSet<(i64, String)>,
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
        let jobs = store.jobs().await?;
        let mut state = State::default();
        let mut max_id = 0;
        for job in jobs {
            max_id = max_id.max(job.id);
            if let Some(Job::Push(p)) = &job.job
                && !p.coalesce_key.is_empty()
            {
                state.by_key.insert(p.coalesce_key.clone(), job.id);
            }
            state.due.insert((job.due_at, job.id));
            state.jobs.insert(
                job.id,
                Entry {
                    job,
                    in_flight: false,
                },
            );
        }
        Ok(Outbox {
            state: Mutex::new(state),
            store,
            // Ids are never reused, also after every job was removed and the server restarted:
            // an id names pushes and events to receivers (`webhook-id`) that deduplicate on it.
            next_id: AtomicU64::new((max_id + 1).max(bimip_proto::now_ms().max(0) as u64 * 1000)),
            wake: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

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
        let due = job.due_at;
        {
            let mut st = self.lock();
            st.due.insert((due, id));
            st.jobs.insert(
                id,
                Entry {
                    job: job.clone(),
                    in_flight: false,
                },
            );
        }
        self.wake.notify_one();
        self.persist(Changes {
            put: vec![job],
            remove: vec![],
        })
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
                st.due.insert((due_at, id));
                st.jobs.insert(
                    id,
                    Entry {
                        job: job.clone(),
                        in_flight: false,
                    },
                );
                changes.put.push(job);
                Coalesced::Created
            }
        };
        if outcome == Coalesced::Created {
            self.wake.notify_one();
        }
        self.persist(changes).await?;
        Ok(outcome)
    }

    /// Takes up to `limit` jobs due at `now` (marking them in flight), and forgets collapse
    /// windows that ended. Also returns when the next job is due (unix ms).
    pub fn take_due(&self, now: i64, limit: usize) -> (Vec<OutboxJob>, Option<i64>) {
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
        while taken.len() < limit {
            let Some(&(due, id)) = st.due.first() else {
                break;
            };
            if due > now {
                break;
            }
            st.due.remove(&(due, id));
            if let Some(entry) = st.jobs.get_mut(&id) {
                entry.in_flight = true;
                taken.push(entry.job.clone());
            }
        }
        (taken, st.due.first().map(|(d, _)| *d))
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
            match how {
                Completion::Remove => {
                    remove_entry(&mut st, id, &mut changes);
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
                    st.due.insert((due_at, id));
                    true
                }
            }
        };
        if wake {
            self.wake.notify_one();
        }
        self.persist(changes).await
    }

    /// Jobs waiting (pending or in flight) and the creation time of the oldest (unix ms), for
    /// metrics.
    pub fn depth(&self) -> (usize, Option<i64>) {
        let st = self.lock();
        let oldest = st.jobs.values().map(|e| e.job.created_at).min();
        (st.jobs.len(), oldest)
    }
}

fn remove_entry(st: &mut State, id: u64, changes: &mut Changes) {
    if let Some(e) = st.jobs.remove(&id) {
        st.due.remove(&(e.job.due_at, id));
        if let Some(Job::Push(p)) = &e.job.job
            && st.by_key.get(&p.coalesce_key) == Some(&id)
        {
            st.by_key.remove(&p.coalesce_key);
        }
        changes.remove.push((id, e.job.version));
    }
}
