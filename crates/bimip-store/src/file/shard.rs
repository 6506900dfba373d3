//! A shard: one writer thread owning a slice of the users (their decoded state and their open
//! files). Commands arrive over a bounded channel; a drained batch is applied to memory, each
//! dirty file gets one `write_all` and one fsync, and only then are the writes answered (group
//! commit). No lock is shared between shards and nothing blocks the async callers but the send.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lru::LruCache;
use tokio::sync::{mpsc, oneshot};

use super::profile::{self, Durability, Edit, Edited, StoredProfile, profile_path};
use super::queue::{Lines, UserQueue};
use super::recovery::{io_err, load_user};
use super::{FsyncMode, StoreObserver, index_path, queue_path};
use crate::{
    AckOutcome, AckRequest, Appended, NewItem, PendingForDevice, Profile, ReadBatch, ReadRequest,
    StoreError,
};

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// What callers ask a shard to do.
pub(crate) enum Cmd {
    Append {
        user: String,
        item: NewItem,
        reply: Reply<Appended>,
    },
    Ack {
        user: String,
        req: AckRequest,
        reply: Reply<AckOutcome>,
    },
    Read {
        user: String,
        req: ReadRequest,
        reply: Reply<ReadBatch>,
    },
    Pending {
        user: String,
        device: String,
        reply: Reply<PendingForDevice>,
    },
    Profile {
        user: String,
        reply: Reply<Profile>,
    },
    EditProfile {
        user: String,
        edit: Edit,
        reply: Reply<Edited>,
    },
    /// Periodic: write profiles whose advisory changes (last seen) are only in memory.
    Tick,
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

impl Cmd {
    fn refuse(self) {
        match self {
            Cmd::Append { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
            Cmd::Ack { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
            Cmd::Read { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
            Cmd::Pending { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
            Cmd::Profile { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
            Cmd::EditProfile { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
            Cmd::Tick => {}
            Cmd::Shutdown { reply } => drop(reply.send(())),
        }
    }
}

/// A write's answer, held back until its lines are durable.
enum Deferred {
    Append(Reply<Appended>, Appended),
    Ack(Reply<AckOutcome>, AckOutcome),
}

impl Deferred {
    fn send_ok(self) {
        match self {
            Deferred::Append(r, v) => drop(r.send(Ok(v))),
            Deferred::Ack(r, v) => drop(r.send(Ok(v))),
        }
    }
    fn send_err(self, e: StoreError) {
        match self {
            Deferred::Append(r, _) => drop(r.send(Err(e))),
            Deferred::Ack(r, _) => drop(r.send(Err(e))),
        }
    }
}

/// One user's uncommitted lines and the answers waiting for them.
#[derive(Default)]
struct Dirty {
    lines: Lines,
    replies: Vec<Deferred>,
    appends: usize,
}

/// Most commands applied per group commit, so one batch's latency stays bounded.
const MAX_BATCH: usize = 1024;

/// Most profiles with advisory-only changes written per [`Cmd::Tick`], so a tick after a burst of
/// disconnects does not stall the shard's queue work for long.
const LAZY_PER_TICK: usize = 256;

pub(crate) struct ShardConfig {
    pub data_dir: PathBuf,
    pub mode: FsyncMode,
    pub cache_users: usize,
    pub open_files: usize,
    pub observer: Option<Arc<dyn StoreObserver>>,
}

pub(crate) struct Shard {
    cfg: ShardConfig,
    /// Unbounded during a batch (a dirty user must never be evicted and reloaded without its
    /// uncommitted lines), trimmed to `cache_users` after each commit.
    users: LruCache<String, UserQueue>,
    files: LruCache<PathBuf, File>,
    dirty: HashMap<String, Dirty>,
    /// With `FsyncMode::Never`: files written since their last fsync, synced at shutdown.
    unsynced: HashSet<PathBuf>,
    /// With `FsyncMode::Never`: folders with renames since their last fsync, synced at shutdown.
    unsynced_dirs: HashSet<PathBuf>,
    /// Decoded profiles, bounded like `users` (trimmed to `cache_users` after each batch).
    profiles: LruCache<String, StoredProfile>,
    /// Users whose cached profile has advisory changes (last seen) not yet written.
    lazy: HashSet<String>,
}

/// Gets a user's state, loading it from its files on first touch.
fn user_state<'a>(
    users: &'a mut LruCache<String, UserQueue>,
    data_dir: &Path,
    user: &str,
) -> Result<&'a mut UserQueue, StoreError> {
    if !users.contains(user) {
        let q = load_user(data_dir, user)?;
        users.put(user.to_string(), q);
    }
    users
        .get_mut(user)
        .ok_or_else(|| StoreError::Invalid("user state vanished".into()))
}

impl Shard {
    pub fn new(cfg: ShardConfig) -> Self {
        let cap = NonZeroUsize::new(cfg.open_files.max(1)).unwrap_or(NonZeroUsize::MIN);
        Shard {
            users: LruCache::unbounded(),
            files: LruCache::new(cap),
            dirty: HashMap::new(),
            unsynced: HashSet::new(),
            unsynced_dirs: HashSet::new(),
            profiles: LruCache::unbounded(),
            lazy: HashSet::new(),
            cfg,
        }
    }

    /// The thread's main loop: runs until shutdown or until every sender is gone.
    pub fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = Vec::with_capacity(64);
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            let mut stop = None;
            for cmd in batch {
                if stop.is_some() {
                    cmd.refuse();
                    continue;
                }
                match cmd {
                    Cmd::Shutdown { reply } => stop = Some(reply),
                    other => {
                        let wrote = self.handle(other);
                        if wrote && self.cfg.mode == FsyncMode::Always {
                            self.commit();
                        }
                    }
                }
            }
            self.commit();
            self.trim();
            if let Some(reply) = stop {
                rx.close();
                while let Ok(c) = rx.try_recv() {
                    c.refuse();
                }
                self.flush_lazy(usize::MAX);
                self.sync_unsynced();
                let _ = reply.send(());
                return;
            }
        }
        self.commit();
        self.flush_lazy(usize::MAX);
        self.sync_unsynced();
    }

    /// Applies one command to memory; returns whether it was a write.
    fn handle(&mut self, cmd: Cmd) -> bool {
        let now = bimip_proto::now_ms();
        match cmd {
            Cmd::Append { user, item, reply } => {
                let state = match user_state(&mut self.users, &self.cfg.data_dir, &user) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return false;
                    }
                };
                let d = self.dirty.entry(user).or_default();
                match state.append(item, now, &mut d.lines) {
                    Ok(a) => {
                        d.replies.push(Deferred::Append(reply, a));
                        d.appends += 1;
                    }
                    Err(e) => drop(reply.send(Err(e))),
                }
                true
            }
            Cmd::Ack { user, req, reply } => {
                let state = match user_state(&mut self.users, &self.cfg.data_dir, &user) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return false;
                    }
                };
                let d = self.dirty.entry(user).or_default();
                match state.acknowledge(req, now, &mut d.lines) {
                    Ok(o) => d.replies.push(Deferred::Ack(reply, o)),
                    Err(e) => drop(reply.send(Err(e))),
                }
                true
            }
            Cmd::Read { user, req, reply } => {
                let r = user_state(&mut self.users, &self.cfg.data_dir, &user)
                    .and_then(|s| s.read(&req));
                let _ = reply.send(r);
                false
            }
            Cmd::Pending {
                user,
                device,
                reply,
            } => {
                let r = user_state(&mut self.users, &self.cfg.data_dir, &user)
                    .map(|s| s.pending(&device));
                let _ = reply.send(r);
                false
            }
            Cmd::Profile { user, reply } => {
                let r = self.profile_state(&user).map(|p| p.profile.clone());
                let _ = reply.send(r);
                false
            }
            Cmd::EditProfile { user, edit, reply } => {
                let _ = reply.send(self.edit_profile(&user, edit, now));
                false
            }
            Cmd::Tick => {
                self.flush_lazy(LAZY_PER_TICK);
                false
            }
            Cmd::Shutdown { reply } => {
                let _ = reply.send(());
                false
            }
        }
    }

    /// Gets a user's profile, loading it from its file on first touch.
    fn profile_state(&mut self, user: &str) -> Result<&mut StoredProfile, StoreError> {
        if !self.profiles.contains(user) {
            let p = profile::load(&self.cfg.data_dir, user)?;
            self.profiles.put(user.to_string(), p);
        }
        self.profiles
            .get_mut(user)
            .ok_or_else(|| StoreError::Invalid("profile state vanished".into()))
    }

    /// Writes one profile file; under `FsyncMode::Never` only remembers it for shutdown.
    fn write_profile(&mut self, user: &str, p: &StoredProfile) -> Result<(), StoreError> {
        let path = profile_path(&self.cfg.data_dir, user);
        let sync = self.cfg.mode != FsyncMode::Never;
        profile::write(&path, &p.to_record(), sync)?;
        if !sync {
            if let Some(dir) = path.parent() {
                self.unsynced_dirs.insert(dir.to_path_buf());
            }
            self.unsynced.insert(path);
        }
        Ok(())
    }

    /// Applies one side of a profile change. Memory changes only once the file is replaced;
    /// advisory-only changes are kept in memory and written later ([`Self::flush_lazy`]).
    fn edit_profile(&mut self, user: &str, edit: Edit, now: i64) -> Result<Edited, StoreError> {
        let cur = self.profile_state(user)?;
        let (next, durability, changed, removed) = profile::apply(cur, edit, now)?;
        match durability {
            Durability::Unchanged => {}
            Durability::Advisory => {
                self.profiles.put(user.to_string(), next.clone());
                self.lazy.insert(user.to_string());
            }
            Durability::Durable => {
                self.write_profile(user, &next)?;
                self.lazy.remove(user);
                self.profiles.put(user.to_string(), next.clone());
            }
        }
        Ok(Edited {
            changed,
            removed,
            profile: next.profile,
        })
    }

    /// Writes (durably) up to `limit` profiles with advisory changes only in memory.
    fn flush_lazy(&mut self, limit: usize) {
        let users: Vec<String> = self.lazy.iter().take(limit).cloned().collect();
        for user in users {
            self.lazy.remove(&user);
            let Some(p) = self.profiles.peek(&user).cloned() else {
                continue;
            };
            if let Err(e) = self.write_profile(&user, &p) {
                tracing::error!(user, error = %e, "could not write a profile's last seen");
            }
        }
    }

    /// Takes a file handle out of the LRU (opening it if needed) so it cannot be closed while
    /// in use; [`Self::put_file`] gives it back.
    fn take_file(&mut self, path: &Path) -> Result<File, StoreError> {
        if let Some(f) = self.files.pop(path) {
            return Ok(f);
        }
        if let Some(dir) = path.parent()
            && !dir.exists()
        {
            std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
            if let Some(prefix) = dir.parent() {
                super::recovery::sync_dir(prefix)?;
            }
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io_err(path, e))
    }

    fn put_file(&mut self, path: PathBuf, f: File) {
        // Evicting drops (closes) the least recently used handle: the fd bound.
        self.files.push(path, f);
    }

    /// Writes and fsyncs one user's new lines; on failure rolls both files back.
    fn write_user(
        &mut self,
        user: &str,
        lines: &Lines,
        fsync_time: &mut Duration,
    ) -> Result<bool, StoreError> {
        let mut open: Vec<(PathBuf, File, u64)> = Vec::with_capacity(2);
        let targets = [
            (queue_path(&self.cfg.data_dir, user), &lines.queue),
            (index_path(&self.cfg.data_dir, user), &lines.index),
        ];
        let mut result: Result<bool, StoreError> = Ok(false);
        for (path, buf) in targets {
            if buf.is_empty() {
                continue;
            }
            let mut f = match self.take_file(&path) {
                Ok(f) => f,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let before = match f.metadata() {
                Ok(m) => m.len(),
                Err(e) => {
                    result = Err(io_err(&path, e));
                    break;
                }
            };
            let w = f.write_all(buf);
            open.push((path.clone(), f, before));
            if let Err(e) = w {
                result = Err(io_err(&path, e));
                break;
            }
        }
        if result.is_ok() && self.cfg.mode != FsyncMode::Never {
            for (path, f, _) in &open {
                let t = Instant::now();
                let r = f.sync_data();
                *fsync_time += t.elapsed();
                if let Err(e) = r {
                    result = Err(io_err(path, e));
                    break;
                }
                result = Ok(true);
            }
        } else if result.is_ok() {
            for (path, _, _) in &open {
                self.unsynced.insert(path.clone());
            }
        }
        match result {
            Ok(synced) => {
                for (path, f, _) in open {
                    self.put_file(path, f);
                }
                Ok(synced)
            }
            Err(e) => {
                // Nothing half-written stays: cut back to the pre-batch length and forget the
                // handles (reopened next time).
                for (path, f, before) in open {
                    if let Err(te) = f.set_len(before).and_then(|()| f.sync_data()) {
                        tracing::error!(file = %path.display(), error = %te, "could not roll back a failed write");
                    }
                }
                Err(e)
            }
        }
    }

    /// Makes this batch's lines durable, then answers its writes.
    fn commit(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let dirty = std::mem::take(&mut self.dirty);
        let mut fsync_time = Duration::ZERO;
        let mut appends = 0usize;
        let mut synced_any = false;
        for (user, d) in dirty {
            if d.lines.is_empty() {
                d.replies.into_iter().for_each(Deferred::send_ok);
                continue;
            }
            match self.write_user(&user, &d.lines, &mut fsync_time) {
                Ok(synced) => {
                    synced_any |= synced;
                    appends += d.appends;
                    d.replies.into_iter().for_each(Deferred::send_ok);
                }
                Err(e) => {
                    tracing::error!(user, error = %e, "store write failed; the user's batch is rolled back");
                    // The in-memory state has the rolled-back lines: reload from disk next time.
                    self.users.pop(&user);
                    let (kind, msg, path) = match &e {
                        StoreError::Io { path, source } => {
                            (source.kind(), source.to_string(), path.clone())
                        }
                        other => (std::io::ErrorKind::Other, other.to_string(), PathBuf::new()),
                    };
                    for r in d.replies {
                        r.send_err(StoreError::Io {
                            path: path.clone(),
                            source: std::io::Error::new(kind, msg.clone()),
                        });
                    }
                }
            }
        }
        if synced_any && let Some(obs) = &self.cfg.observer {
            obs.fsync(fsync_time, appends);
        }
    }

    fn trim(&mut self) {
        let cap = self.cfg.cache_users.max(1);
        while self.users.len() > cap {
            self.users.pop_lru();
        }
        while self.profiles.len() > cap {
            if let Some((user, p)) = self.profiles.pop_lru()
                && self.lazy.remove(&user)
                && let Err(e) = self.write_profile(&user, &p)
            {
                tracing::error!(user, error = %e, "could not write a profile's last seen");
            }
        }
    }

    /// Fsyncs what `FsyncMode::Never` left unsynced (at shutdown: "fsyncs everything").
    fn sync_unsynced(&mut self) {
        for path in std::mem::take(&mut self.unsynced) {
            let r = match self.files.peek(&path) {
                Some(f) => f.sync_data(),
                None => File::open(&path).and_then(|f| f.sync_data()),
            };
            if let Err(e) = r {
                tracing::error!(file = %path.display(), error = %e, "fsync at shutdown failed");
            }
        }
        for dir in std::mem::take(&mut self.unsynced_dirs) {
            if let Err(e) = super::recovery::sync_dir(&dir) {
                tracing::error!(error = %e, "fsync of a folder at shutdown failed");
            }
        }
    }
}
