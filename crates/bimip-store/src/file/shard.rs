//! A shard: one writer thread owning a slice of the users (their decoded state and their open
//! files). Commands arrive over a bounded channel; a drained batch is applied to memory, each
//! dirty file gets one `write_all`, the batch is made durable (one fdatasync of the shard's commit
//! log, see [`super::wal`]; without it, fsyncs or a `syncfs`), and only then are the writes
//! answered (group commit). No lock is shared between shards and nothing blocks the async callers
//! but the send.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use tokio::sync::{mpsc, oneshot};

use super::behind::{self, Behind};
use super::profile::{self, Durability, Edit, Edited, StoredProfile, profile_path};
use super::queue::{Limits, Lines, UserQueue};
use super::recovery::{io_err, load_user};
use super::wal::{self, Checkpointer, OpenLog, Wal, Written};
use super::writer::Writer;
use super::{FsyncMode, StoreObserver, index_path, queue_path};
use crate::{
    AckOutcome, AckRequest, Appended, Compaction, CopyTo, NewItem, PendingForDevice, Profile,
    ReadBatch, ReadRequest, StoreError, Unread,
};
use bimip_proto::store::LogFile;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// What callers ask a shard to do.
pub(crate) enum Cmd {
    Append {
        user: String,
        item: NewItem,
        reply: Reply<Appended>,
        /// Appended next, to another user, with `peer_offset` = this item's offset.
        copy: Option<Box<(CopyTo, Reply<Appended>)>>,
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
    /// The user's unread chat per sender, from memory (see [`UserQueue::unread`]).
    Unread {
        user: String,
        reply: Reply<Unread>,
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
    /// Compact one user's files now (see [`Shard::compact_user`]).
    Compact {
        user: String,
        reply: Reply<Compaction>,
    },
    /// Periodic: write profiles whose advisory changes (last seen) are only in memory, and look
    /// for users due for compaction.
    Tick,
    /// Another shard put commands into this shard's [`Inbox`].
    Wake,
    /// Answered once every command queued before it has been handled (so every copy it hands
    /// another shard is in that shard's inbox) and committed, and every line waiting to be
    /// written behind the log is in its file: the first phase of a shutdown.
    Barrier {
        reply: oneshot::Sender<()>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

impl Cmd {
    fn refuse(self) {
        match self {
            Cmd::Append { reply, copy, .. } => {
                drop(reply.send(Err(StoreError::Closed)));
                if let Some(c) = copy {
                    drop(c.1.send(Err(StoreError::Closed)));
                }
            }
            Cmd::Ack { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
            Cmd::Read { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
            Cmd::Pending { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
            Cmd::Unread { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
            Cmd::Profile { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
            Cmd::EditProfile { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
            Cmd::Compact { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
            Cmd::Tick | Cmd::Wake => {}
            Cmd::Barrier { reply } | Cmd::Shutdown { reply } => drop(reply.send(())),
        }
    }
}

/// Commands one shard hands another (a sender's copy after the recipient's append). Shards
/// never wait on each other's bounded channel (two full channels would deadlock): they push
/// here, unbounded but fed only by commands that already passed a bounded channel, and nudge
/// the owner with a [`Cmd::Wake`] (a full channel needs no nudge: the owner drains the inbox
/// after every batch). `None` once the owner has stopped.
pub(crate) struct Inbox {
    cmds: Mutex<Option<Vec<Cmd>>>,
    wake: mpsc::WeakSender<Cmd>,
}

impl Inbox {
    pub fn new(wake: mpsc::WeakSender<Cmd>) -> Self {
        Inbox {
            cmds: Mutex::new(Some(Vec::new())),
            wake,
        }
    }

    fn push(&self, cmd: Cmd) {
        {
            let mut g = self.cmds.lock().unwrap_or_else(|p| p.into_inner());
            match g.as_mut() {
                Some(v) => v.push(cmd),
                None => {
                    drop(g);
                    cmd.refuse();
                    return;
                }
            }
        }
        if let Some(tx) = self.wake.upgrade() {
            let _ = tx.try_send(Cmd::Wake);
        }
    }

    fn drain_into(&self, batch: &mut Vec<Cmd>) {
        let mut g = self.cmds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = g.as_mut() {
            batch.append(v);
        }
    }

    /// The owner stops: later pushes are refused, and so is whatever is still here.
    fn close(&self) {
        let left = self
            .cmds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        left.into_iter().for_each(Cmd::refuse);
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

/// Batches whose lines are written and wait for the sync that makes them durable (the commit
/// log's `fdatasync`, or a `syncfs`): `(user, replies, appends)` per user.
type Waiting = Vec<(String, Vec<Deferred>, usize)>;

/// A batch handed to the [`Syncer`]: its number, its writes, and the commit log that holds its
/// lines (`None`: the lines are only in the user files, made durable by one `syncfs`).
type SyncJob = (u64, Waiting, Option<Arc<OpenLog>>);

/// Runs the sync of `fsync = batch` commits on its own thread (the commit log's `fdatasync`, or
/// without the log one `syncfs`), so the shard writes the next batch while the previous one is
/// being synced (pipelined group commit). A batch is answered only after a sync that began once
/// its lines were written: the thread takes every batch queued when it wakes, syncs once,
/// answers them all.
struct Syncer {
    tx: Option<std::sync::mpsc::Sender<SyncJob>>,
    /// The last batch number handed over, and (shared with the thread) the last one answered.
    submitted: u64,
    done: Arc<(std::sync::Mutex<u64>, std::sync::Condvar)>,
    /// Users of batches whose sync failed: the shard reloads them from disk.
    failed: std::sync::mpsc::Receiver<Vec<String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Syncer {
    fn start(data_dir: PathBuf, observer: Option<Arc<dyn StoreObserver>>) -> Syncer {
        let (tx, rx) = std::sync::mpsc::channel::<SyncJob>();
        let (failed_tx, failed) = std::sync::mpsc::channel();
        let done = Arc::new((std::sync::Mutex::new(0u64), std::sync::Condvar::new()));
        let finished = done.clone();
        let thread = std::thread::Builder::new()
            .name("bimip-store-sync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    jobs.extend(rx.try_iter());
                    let last = jobs.iter().map(|(n, _, _)| *n).max().unwrap_or(0);
                    let mut logs: Vec<Arc<OpenLog>> = Vec::new();
                    let mut whole_fs = false;
                    for (_, _, log) in &jobs {
                        match log {
                            Some(l) if !logs.iter().any(|x| Arc::ptr_eq(x, l)) => {
                                logs.push(l.clone())
                            }
                            Some(_) => {}
                            None => whole_fs = true,
                        }
                    }
                    let jobs: Vec<Waiting> = jobs.into_iter().map(|(_, w, _)| w).collect();
                    let t = Instant::now();
                    // On failure, also the file that failed: a log, or the data dir's filesystem.
                    let r = if whole_fs {
                        profile::syncfs(&data_dir).map_err(|e| (data_dir.as_path(), e))
                    } else {
                        logs.iter()
                            .try_for_each(|l| l.file.sync_data().map_err(|e| (l.path.as_path(), e)))
                    };
                    let took = t.elapsed();
                    match r {
                        Ok(()) => {
                            let mut appends = 0;
                            for (_, replies, n) in jobs.into_iter().flatten() {
                                appends += n;
                                replies.into_iter().for_each(Deferred::send_ok);
                            }
                            if let Some(obs) = &observer {
                                obs.fsync(took, appends);
                            }
                        }
                        Err((path, e)) => {
                            // The lines are in the files but not known durable: answer an error
                            // (a client's resend is then recognised as a duplicate) and have the
                            // shard reload the users.
                            if whole_fs {
                                tracing::error!(error = %e, "store syncfs failed; the batch is answered with an error");
                            } else {
                                tracing::error!(error = %e, "store commit log fdatasync failed; the batch is answered with an error");
                            }
                            let mut users = Vec::new();
                            for (user, replies, _) in jobs.into_iter().flatten() {
                                for r in replies {
                                    r.send_err(io_err(
                                        path,
                                        std::io::Error::new(e.kind(), e.to_string()),
                                    ));
                                }
                                users.push(user);
                            }
                            let _ = failed_tx.send(users);
                        }
                    }
                    let (lock, cv) = &*finished;
                    *lock.lock().unwrap_or_else(|p| p.into_inner()) = last;
                    cv.notify_all();
                }
            })
            .ok();
        Syncer {
            tx: thread.as_ref().map(|_| tx),
            submitted: 0,
            done,
            failed,
            thread,
        }
    }

    /// Hands a written batch over and returns its number; gives it back when the thread is
    /// gone.
    fn submit(&mut self, waiting: Waiting, log: Option<Arc<OpenLog>>) -> Result<u64, Waiting> {
        let Some(tx) = &self.tx else {
            return Err(waiting);
        };
        let n = self.submitted + 1;
        tx.send((n, waiting, log)).map_err(|e| e.0.1)?;
        self.submitted = n;
        Ok(n)
    }

    /// The last batch answered.
    fn answered(&self) -> u64 {
        *self.done.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks until batch `n` is answered (synced, or failed).
    fn wait_for(&self, n: u64) {
        let (lock, cv) = &*self.done;
        let mut done = lock.lock().unwrap_or_else(|p| p.into_inner());
        while *done < n && self.thread.is_some() {
            done = cv.wait(done).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits until every handed-over batch is synced and answered.
    fn finish(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Users written in one batch from which the batch is made durable with one `syncfs` instead of
/// one fsync per file.
const SYNCFS_MIN_USERS: usize = 3;

/// A shard batch taking this long is logged with where its time went.
const SLOW_BATCH: Duration = Duration::from_millis(100);

/// Most commands applied per group commit, so one batch's latency stays bounded.
const MAX_BATCH: usize = 1024;

/// Most profiles with advisory-only changes written per [`Cmd::Tick`], so a tick after a burst of
/// disconnects does not stall the shard's queue work for long.
const LAZY_PER_TICK: usize = 32;

pub(crate) struct ShardConfig {
    /// This shard's number, and every shard's inbox (indexed by number).
    pub index: usize,
    pub inboxes: Arc<Vec<Inbox>>,
    pub data_dir: PathBuf,
    pub mode: FsyncMode,
    pub cache_users: usize,
    pub open_files: usize,
    pub observer: Option<Arc<dyn StoreObserver>>,
    pub limits: Limits,
    /// Users recovery found likely due for compaction (loaded and looked at one at a time).
    pub due: Vec<String>,
    /// This shard's commit log (`fsync = batch | always` with the log on).
    pub wal: Option<Wal>,
}

/// A non-empty log generation this old is checkpointed at the next tick, so an idle store's user
/// files are complete on disk soon after the last write.
#[cfg(not(test))]
const CHECKPOINT_AGE: Duration = Duration::from_secs(10);
#[cfg(test)]
const CHECKPOINT_AGE: Duration = Duration::from_millis(300);

/// How often every cached user is looked at for retention (writes trigger a look at once).
#[cfg(not(test))]
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
#[cfg(test)]
const SWEEP_INTERVAL: Duration = Duration::from_millis(200);

/// Cached users looked at per tick during a sweep.
const SWEEP_PER_TICK: usize = 4096;

/// After a failed compaction, the user is not compacted again for this long (ms).
const COMPACT_RETRY_MS: i64 = 10_000;

/// Background compaction bookkeeping: which users to look at and which are due.
#[derive(Default)]
struct Maintenance {
    /// Users written since they were last looked at.
    touched: HashSet<String>,
    /// Cached users still to look at in the current sweep.
    sweep: Vec<String>,
    last_sweep: Option<Instant>,
    /// Users found due, compacted one per batch or tick.
    due: VecDeque<String>,
    due_set: HashSet<String>,
}

pub(crate) struct Shard {
    cfg: ShardConfig,
    /// Unbounded during a batch (a dirty user must never be evicted and reloaded without its
    /// uncommitted lines), trimmed to `cache_users` after each commit.
    users: LruCache<String, UserQueue>,
    files: LruCache<FileKey, OpenFile>,
    dirty: HashMap<String, Dirty>,
    /// With `FsyncMode::Never`: queue files written since their last fsync, synced at shutdown.
    unsynced_files: HashSet<FileKey>,
    /// With `FsyncMode::Never`: other files (profiles) written since their last fsync.
    unsynced: HashSet<PathBuf>,
    /// With `FsyncMode::Never`: folders with renames since their last fsync, synced at shutdown.
    unsynced_dirs: HashSet<PathBuf>,
    /// Folders that got a new user folder in this batch, synced with the batch's commit.
    new_dirs: HashSet<PathBuf>,
    /// Decoded profiles, bounded like `users` (trimmed to `cache_users` after each batch).
    profiles: LruCache<String, StoredProfile>,
    /// Users whose cached profile has advisory changes (last seen) not yet written.
    lazy: HashSet<String>,
    maint: Maintenance,
    /// With `fsync = batch`: the thread that syncs written batches while the next is written.
    syncer: Option<Syncer>,
    /// Users with lines handed to the syncer, and the batch number that covers them: a read of
    /// such a user waits for it, so reads only ever hand out durable items.
    in_sync: HashMap<String, u64>,
    /// The commit log a commit appends to and syncs (see [`wal`]); `None` without it.
    wal: Option<Wal>,
    /// Syncs the user files of finished log generations, then recycles or deletes their files.
    checkpointer: Option<Checkpointer>,
    /// With the commit log: logged lines not yet written to their user files (see [`behind`]).
    behind: Behind<FileKey>,
    /// Files whose waiting lines reached [`behind::MAX_WAITING`] in this batch.
    behind_full: Vec<FileKey>,
    /// Finished log generations waiting for their lines to reach the user files before they
    /// are checkpointed: `(generation, log)`, oldest first.
    closed: VecDeque<(u64, Arc<OpenLog>)>,
    /// With the commit log: the thread that writes the waiting lines to the user files.
    writer: Option<Writer<FileKey>>,
}

/// How long a batch spends at most writing waiting lines that are merely old, when it writes
/// them itself (no writer thread); lines a checkpoint waits for are written whatever it takes.
const BEHIND_BUDGET: Duration = Duration::from_millis(2);

/// Finished log generations that may wait for the writer thread before commits wait for it
/// too (bounds the log at about this many generations, 32 MB each, while the disk lags: a first
/// burst of new users on a slow disk takes the writer seconds of file creation).
const MAX_CLOSED: usize = 6;

/// A cached append handle and the file's length as this shard last left it (the shard is the
/// only writer), so a commit needs no `fstat` to know where a rollback would cut back to.
struct OpenFile {
    file: File,
    len: u64,
    path: PathBuf,
}

/// Which of a user's two queue files a cached handle is. Handles are looked up by user, not by
/// path: a path costs a SHA-256 and four allocations to build, and is built only to open.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum FileKind {
    Queue,
    Index,
}

type FileKey = (String, FileKind);

fn file_key(user: &str, kind: FileKind) -> FileKey {
    (user.to_string(), kind)
}

/// Keeps a cached handle's length right once the writer thread has appended to its file.
fn new_length(files: &mut LruCache<FileKey, OpenFile>) -> impl FnMut(&FileKey, u64) + '_ {
    |key, len| {
        if let Some(f) = files.peek_mut(key) {
            f.len = len;
        }
    }
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
    pub fn new(mut cfg: ShardConfig) -> Self {
        let wal = cfg.wal.take();
        let written = Written::default();
        let checkpointer = wal.as_ref().map(|w| {
            Checkpointer::start(cfg.data_dir.clone(), cfg.index, w.spare(), written.clone())
        });
        // The writer thread's handles and the shard's (reads, compaction) share the bound.
        let writer_files = cfg.open_files / 2;
        let writer = wal
            .as_ref()
            .map(|_| Writer::start(cfg.index, writer_files.max(1), Some(written)));
        let own_files = match writer {
            Some(_) => cfg.open_files - writer_files,
            None => cfg.open_files,
        };
        let cap = NonZeroUsize::new(own_files.max(1)).unwrap_or(NonZeroUsize::MIN);
        Shard {
            writer,
            wal,
            checkpointer,
            behind: Behind::new(),
            behind_full: Vec::new(),
            closed: VecDeque::new(),
            users: LruCache::unbounded(),
            files: LruCache::new(cap),
            dirty: HashMap::new(),
            unsynced_files: HashSet::new(),
            unsynced: HashSet::new(),
            unsynced_dirs: HashSet::new(),
            new_dirs: HashSet::new(),
            profiles: LruCache::unbounded(),
            lazy: HashSet::new(),
            maint: Maintenance {
                due_set: cfg.due.iter().cloned().collect(),
                due: cfg.due.iter().cloned().collect(),
                ..Maintenance::default()
            },
            in_sync: HashMap::new(),
            syncer: (cfg.mode == FsyncMode::Batch)
                .then(|| Syncer::start(cfg.data_dir.clone(), cfg.observer.clone())),
            cfg,
        }
    }

    /// The thread's main loop: runs until shutdown or until every sender is gone.
    pub fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        while let Some(first) = rx.blocking_recv() {
            // Copies handed over by other shards first: at shutdown they are all here before
            // the `Shutdown` command (see `FileStore::shutdown`), so none is refused.
            let mut batch = Vec::with_capacity(64);
            self.reload_failed();
            self.inbox().drain_into(&mut batch);
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            let mut stop = None;
            let tick = batch.iter().any(|c| matches!(c, Cmd::Tick));
            let started = Instant::now();
            let commands = batch.len();
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
            let handled = started.elapsed();
            self.commit();
            let committed = started.elapsed();
            self.flush_behind();
            let written_behind = started.elapsed();
            if stop.is_none() {
                self.maintain(tick);
            }
            let maintained = started.elapsed();
            self.trim();
            let took = started.elapsed();
            if took >= SLOW_BATCH {
                // Every write of this shard waits for its batch: say where the time went.
                tracing::warn!(
                    shard = self.cfg.index,
                    commands,
                    took_ms = took.as_millis() as u64,
                    apply_ms = handled.as_millis() as u64,
                    commit_ms = (committed - handled).as_millis() as u64,
                    behind_ms = (written_behind - committed).as_millis() as u64,
                    maintain_ms = (maintained - written_behind).as_millis() as u64,
                    trim_ms = (took - maintained).as_millis() as u64,
                    "slow store batch"
                );
            }
            if let Some(reply) = stop {
                rx.close();
                while let Ok(c) = rx.try_recv() {
                    c.refuse();
                }
                self.inbox().close();
                self.close();
                let _ = reply.send(());
                return;
            }
        }
        let mut left = Vec::new();
        self.inbox().drain_into(&mut left);
        for cmd in left {
            self.handle(cmd);
        }
        self.inbox().close();
        self.commit();
        self.close();
    }

    /// At shutdown, after the last commit: lazily kept profiles are written, everything is
    /// synced, and a last checkpoint leaves no commit log behind (the user files are complete
    /// and durable).
    fn close(&mut self) {
        self.flush_lazy(usize::MAX);
        self.sync_unsynced();
        if let Some(s) = &mut self.syncer {
            s.finish();
        }
        self.write_all_behind();
        if let Some(w) = &mut self.writer {
            w.finish();
        }
        if let (Some(wal), Some(c)) = (&self.wal, &mut self.checkpointer) {
            c.finish(wal.current());
        }
    }

    /// Starts the next log generation; the current one goes to the checkpoint thread once its
    /// lines are in their files (see [`Self::hand_over_closed`]).
    fn rotate_log(&mut self) -> Result<(), StoreError> {
        let Some(wal) = &mut self.wal else {
            return Ok(());
        };
        let generation = wal.generation();
        let old = wal.rotate()?;
        self.closed.push_back((generation, old));
        self.hand_over_closed();
        Ok(())
    }

    /// Hands finished generations to the checkpoint thread once none of their lines is still
    /// waiting for its user file (the checkpoint's `syncfs` must find them written).
    fn hand_over_closed(&mut self) {
        let on_the_way = self.writer.as_ref().and_then(Writer::oldest_generation);
        let waiting = match (self.behind.oldest_generation(), on_the_way) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        while let Some((g, _)) = self.closed.front() {
            if waiting.is_some_and(|w| w <= *g) {
                return;
            }
            let Some((_, log)) = self.closed.pop_front() else {
                return;
            };
            if let Some(c) = &self.checkpointer {
                c.submit(&self.cfg.data_dir, log);
            }
        }
    }

    /// After a commit and on ticks: hands the writer thread the lines that waited
    /// [`behind::AGE`], those of files with much waiting, and, once a second finished generation
    /// waits, every line of the older ones; then hands over the generations whose lines are all
    /// written. Commits wait for the writer only when [`MAX_CLOSED`] generations wait for it.
    fn flush_behind(&mut self) {
        self.collect_written();
        for key in std::mem::take(&mut self.behind_full) {
            if let Some(w) = self.behind.take(&key) {
                let _ = self.write_behind(key, w);
            }
        }
        if self.behind.is_empty() && self.closed.is_empty() {
            return;
        }
        let started = Instant::now();
        let aged = started.checked_sub(behind::AGE);
        // One finished generation may wait for the aged writes; more would let the log grow.
        let must = match self.closed.len() {
            0 | 1 => 0,
            n => self.closed[n - 2].0,
        };
        let threaded = self.writer.as_ref().is_some_and(Writer::running);
        let mut in_budget = true;
        loop {
            // Without a writer thread the shard writes the lines itself, checked before every
            // write: a new user's file can take milliseconds to create.
            if in_budget && !threaded && started.elapsed() >= BEHIND_BUDGET {
                in_budget = false;
            }
            let before = if in_budget { aged } else { None };
            let Some((key, w)) = self.behind.take_oldest(before, must) else {
                break;
            };
            // A failing file is retried at a later batch, not over and over in this one.
            if self.write_behind(key, w).is_err() {
                break;
            }
        }
        if self.closed.len() >= MAX_CLOSED {
            let t = Instant::now();
            let _ = self.wait_written(None);
            let waited = t.elapsed();
            if waited >= SLOW_BATCH / 10 {
                tracing::warn!(
                    shard = self.cfg.index,
                    generations = self.closed.len(),
                    waited_ms = waited.as_millis() as u64,
                    "commits waited for the user-file writer (the disk is slower than the messages)"
                );
            }
        }
        self.hand_over_closed();
    }

    /// Writes every waiting line to its file and hands over the finished generations (at
    /// shutdown, and at a barrier). A failure keeps the log: the next start writes them back.
    fn write_all_behind(&mut self) {
        for key in self.behind.keys() {
            if let Some(w) = self.behind.take(&key) {
                let _ = self.write_behind(key, w);
            }
        }
        let _ = self.wait_written(None);
        self.hand_over_closed();
    }

    /// Hands one file's waiting lines to the writer thread, or writes them here without one.
    fn write_behind(&mut self, key: FileKey, w: behind::Waiting) -> Result<(), StoreError> {
        let path = self.path_of(&key);
        let back = match &mut self.writer {
            Some(wr) => wr.send(key, path, w),
            None => Err((key, w)),
        };
        match back {
            Ok(()) => Ok(()),
            Err((key, w)) => self.write_waiting(key, w),
        }
    }

    /// Takes in what the writer thread has done: files' new lengths, failed lines back to wait.
    fn collect_written(&mut self) {
        let Some(w) = &mut self.writer else { return };
        w.collect(&mut self.behind, &mut new_length(&mut self.files));
    }

    /// Blocks until the writer thread has written every line of `keys` (of every file, for
    /// `None`) it was handed; an error if some of them wait again after a failed write.
    fn wait_written(&mut self, keys: Option<&[FileKey]>) -> Result<(), StoreError> {
        let Some(w) = &mut self.writer else {
            return Ok(());
        };
        w.wait(keys, &mut self.behind, &mut new_length(&mut self.files))
    }

    /// Writes here the lines waiting for one user file (creating its folder and file for a
    /// new user), when there is no writer thread. On failure the file is cut back and the
    /// lines wait again (the log still has them).
    fn write_waiting(&mut self, key: FileKey, w: behind::Waiting) -> Result<(), StoreError> {
        let mut f = match self.take_file(&key) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(user = key.0, error = %e, "could not open a user file to write logged lines to; retried");
                self.behind.put_back(key, w);
                return Err(e);
            }
        };
        if f.len != w.base {
            tracing::error!(file = %f.path.display(), len = f.len, expected = w.base, "a user file's length is not where its logged lines go");
        }
        match write_checked(&mut f.file, &f.path, &w.bytes) {
            Ok(()) => {
                f.len += w.bytes.len() as u64;
                self.put_file(key, f);
                Ok(())
            }
            Err(e) => {
                tracing::error!(file = %f.path.display(), error = %e, "could not write logged lines to a user file; retried (the commit log keeps them)");
                if let Err(te) = f.file.set_len(f.len) {
                    tracing::error!(file = %f.path.display(), error = %te, "could not cut back a failed write");
                }
                self.behind.put_back(key, w);
                Err(e)
            }
        }
    }

    /// Writes a user's waiting lines to its files and waits until they are there (before the
    /// files are read or the user's state is dropped).
    fn flush_user(&mut self, user: &str) -> Result<(), StoreError> {
        let keys = [
            file_key(user, FileKind::Queue),
            file_key(user, FileKind::Index),
        ];
        for key in &keys {
            if let Some(w) = self.behind.take(key) {
                self.write_behind(key.clone(), w)?;
            }
        }
        self.wait_written(Some(&keys))
    }

    /// Before a user not in memory is loaded from its files: its logged lines still waiting
    /// for them (left after a failed write) are written first, or the load fails. Loaded
    /// without them, the user would hand out their offsets again.
    fn loadable(&mut self, user: &str) -> Result<(), StoreError> {
        if self.writer.is_none() || self.users.contains(user) {
            return Ok(());
        }
        self.flush_user(user)
    }

    /// Drops a user's state (reloaded from its files on next use), after writing its waiting
    /// lines to them.
    fn forget_user(&mut self, user: &str) {
        if let Err(e) = self.flush_user(user) {
            tracing::error!(user, error = %e, "could not write a user's logged lines before reloading it; the next start writes them back");
        }
        self.users.pop(user);
    }

    /// After a commit, or on a tick: checkpoints a log generation that is large, or old and
    /// not empty; a busy shard whose generation grows its file moves to a written-ahead one as
    /// soon as the checkpoint thread has it ready.
    fn maybe_checkpoint(&mut self, tick: bool) {
        let Some(wal) = &mut self.wal else { return };
        #[cfg(test)]
        if fault::checkpoints_held(&self.cfg.data_dir) {
            return;
        }
        let busy = wal.growing() && wal.len() >= wal::PREALLOC_AFTER;
        if busy && !wal.spare_asked && !wal.spare_ready() {
            wal.spare_asked = true;
            if let Some(c) = &self.checkpointer {
                c.ask_spare();
            }
        }
        let due = wal.len() >= wal::GENERATION_BYTES
            || (busy && wal.spare_ready())
            || (tick && wal.len() > 0 && wal.age() >= CHECKPOINT_AGE);
        if due && let Err(e) = self.rotate_log() {
            tracing::error!(error = %e, "could not start a new commit log generation; the current one keeps growing");
        }
    }

    /// Before a read of `user`: its lines still waiting in this batch are committed, and lines
    /// still being synced are waited for, so the read hands out durable items only.
    fn make_durable(&mut self, user: &str) {
        if self.dirty.contains_key(user) {
            self.commit();
        }
        if let (Some(n), Some(s)) = (self.in_sync.get(user), &self.syncer) {
            s.wait_for(*n);
            self.reload_failed();
        }
    }

    /// Users whose batch's sync failed are reloaded from their files on next touch, and the
    /// commit log, in an unknown state after a failed fdatasync, is not appended to again.
    fn reload_failed(&mut self) {
        let Some(s) = &self.syncer else { return };
        let failed: Vec<String> = s.failed.try_iter().flatten().collect();
        let answered = s.answered();
        self.in_sync.retain(|_, n| *n > answered);
        if !failed.is_empty()
            && let Some(wal) = &mut self.wal
        {
            wal.broken = true;
        }
        for user in failed {
            self.forget_user(&user);
        }
    }

    fn inbox(&self) -> &Inbox {
        &self.cfg.inboxes[self.cfg.index]
    }

    /// Appends a follow-up copy: here when this shard owns its user (same group commit),
    /// else through the owner's inbox.
    fn append_copy(&mut self, copy: CopyTo, reply: Reply<Appended>) -> bool {
        let owner = super::shard_of(&copy.user, self.cfg.inboxes.len());
        let cmd = Cmd::Append {
            user: copy.user,
            item: copy.item,
            reply,
            copy: None,
        };
        if owner == self.cfg.index {
            self.handle(cmd)
        } else {
            self.cfg.inboxes[owner].push(cmd);
            false
        }
    }

    /// Applies one command to memory; returns whether it was a write.
    fn handle(&mut self, cmd: Cmd) -> bool {
        let now = bimip_proto::now_ms();
        match cmd {
            Cmd::Append {
                user,
                item,
                reply,
                copy,
            } => {
                let state = match self
                    .loadable(&user)
                    .and_then(|()| user_state(&mut self.users, &self.cfg.data_dir, &user))
                {
                    Ok(s) => s,
                    Err(e) => {
                        if let Some(c) = copy {
                            let _ = c.1.send(Err(StoreError::Invalid(
                                "not copied: the original was not stored".into(),
                            )));
                        }
                        let _ = reply.send(Err(e));
                        return false;
                    }
                };
                if !self.maint.touched.contains(&user) {
                    self.maint.touched.insert(user.clone());
                }
                let d = self.dirty.entry(user).or_default();
                let appended = match state.append(item, now, &mut d.lines) {
                    Ok(a) => {
                        d.replies.push(Deferred::Append(reply, a));
                        d.appends += 1;
                        Some(a)
                    }
                    Err(e) => {
                        drop(reply.send(Err(e)));
                        None
                    }
                };
                if let Some(b) = copy {
                    let (mut c, r) = *b;
                    match appended {
                        Some(a) if !a.duplicate => {
                            c.item.peer_offset = a.offset;
                            self.append_copy(c, r);
                        }
                        Some(a) => drop(r.send(Ok(Appended { offset: 0, ..a }))),
                        None => drop(r.send(Err(StoreError::Invalid(
                            "not copied: the original was not stored".into(),
                        )))),
                    }
                }
                true
            }
            Cmd::Ack { user, req, reply } => {
                let state = match self
                    .loadable(&user)
                    .and_then(|()| user_state(&mut self.users, &self.cfg.data_dir, &user))
                {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return false;
                    }
                };
                if !self.maint.touched.contains(&user) {
                    self.maint.touched.insert(user.clone());
                }
                let d = self.dirty.entry(user).or_default();
                match state.acknowledge(req, now, &mut d.lines) {
                    Ok(o) => d.replies.push(Deferred::Ack(reply, o)),
                    Err(e) => drop(reply.send(Err(e))),
                }
                true
            }
            Cmd::Read { user, req, reply } => {
                let r = self.with_queue_file(&user, |q, read_at| q.read(&req, read_at));
                let _ = reply.send(r);
                false
            }
            Cmd::Pending {
                user,
                device,
                reply,
            } => {
                let r = self.with_queue_file(&user, |q, read_at| q.pending(&device, read_at));
                let _ = reply.send(r);
                false
            }
            Cmd::Unread { user, reply } => {
                // Like every read, it sees only durable state: an acknowledgement still waiting
                // in this batch must not hide a message from the push pipeline.
                self.make_durable(&user);
                let r = self
                    .loadable(&user)
                    .and_then(|()| user_state(&mut self.users, &self.cfg.data_dir, &user))
                    .map(|q| q.unread());
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
            Cmd::Compact { user, reply } => {
                // Lines of this batch must reach the old files before they are replaced.
                self.commit();
                let r = self
                    .loadable(&user)
                    .and_then(|()| user_state(&mut self.users, &self.cfg.data_dir, &user))
                    .map(|_| ());
                let r = r.and_then(|()| self.compact_user(&user, now));
                let _ = reply.send(r);
                false
            }
            Cmd::Tick => {
                self.flush_lazy(LAZY_PER_TICK);
                self.flush_behind();
                self.maybe_checkpoint(true);
                false
            }
            Cmd::Wake => false,
            Cmd::Barrier { reply } => {
                self.commit();
                self.write_all_behind();
                let _ = reply.send(());
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

    /// Writes one profile file; under `FsyncMode::Never` only remembers it for shutdown. With
    /// the commit log, the file is replaced without syncs and its new content logged: one
    /// fdatasync of the log makes it durable.
    fn write_profile(&mut self, user: &str, p: &StoredProfile) -> Result<(), StoreError> {
        let path = profile_path(&self.cfg.data_dir, user);
        if self.wal.is_some() {
            let rec = p.to_record();
            let generation = self.log_ready()?;
            profile::write(&path, &rec, false)?;
            let mut buf = Vec::new();
            wal::encode_profile(&mut buf, generation, user, &rec);
            let r = self.append_log(&buf).and_then(|log| self.sync_log(&log));
            if r.is_err() {
                // The file has the new content, not known durable: memory follows the file.
                self.profiles.pop(user);
            }
            return r;
        }
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

    /// Writes (durably) up to `limit` profiles with advisory changes only in memory, all in one
    /// go (see [`profile::write_many`]): a burst of disconnects costs two syncs, not two per user.
    fn flush_lazy(&mut self, limit: usize) {
        let users: Vec<String> = self.lazy.iter().take(limit).cloned().collect();
        let mut files = Vec::with_capacity(users.len());
        let mut names = Vec::with_capacity(users.len());
        for user in users {
            self.lazy.remove(&user);
            if let Some(p) = self.profiles.peek(&user) {
                files.push((profile_path(&self.cfg.data_dir, &user), p.to_record()));
                names.push(user);
            }
        }
        if files.is_empty() {
            return;
        }
        let logged = self.wal.is_some();
        let sync = self.cfg.mode != FsyncMode::Never && !logged;
        let failed = profile::write_many(&self.cfg.data_dir, &files, sync);
        for (i, e) in &failed {
            tracing::error!(user = names[*i], error = %e, "could not write a profile's last seen");
        }
        if logged {
            // One log append and one fdatasync for all of them (no syncfs on this thread).
            let r = self.log_ready().and_then(|generation| {
                let mut buf = Vec::new();
                for (i, (_, rec)) in files.iter().enumerate() {
                    if !failed.iter().any(|(f, _)| *f == i) {
                        wal::encode_profile(&mut buf, generation, &names[i], rec);
                    }
                }
                if buf.is_empty() {
                    return Ok(());
                }
                self.append_log(&buf).and_then(|log| self.sync_log(&log))
            });
            if let Err(e) = r {
                tracing::error!(error = %e, "could not log profiles' last seen; they are written again later");
                self.lazy.extend(names);
            }
            return;
        }
        if !sync {
            for (path, _) in files {
                if let Some(dir) = path.parent() {
                    self.unsynced_dirs.insert(dir.to_path_buf());
                }
                self.unsynced.insert(path);
            }
        }
    }

    /// Runs `f` on the user's state with a reader of its queue file (payloads are read back
    /// from there). Lines of this batch not yet written are committed first: only durable
    /// items are handed out, and every position in memory is then in the file.
    fn with_queue_file<T>(
        &mut self,
        user: &str,
        f: impl FnOnce(&UserQueue, super::queue::ReadAt<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.make_durable(user);
        self.flush_user(user)?;
        user_state(&mut self.users, &self.cfg.data_dir, user)?;
        let key = file_key(user, FileKind::Queue);
        let file = if self.files.contains(&key) || queue_path(&self.cfg.data_dir, user).exists() {
            Some(self.take_file(&key)?)
        } else {
            None
        };
        let mut read_at = |pos: u64, len: usize| -> std::io::Result<Vec<u8>> {
            use std::os::unix::fs::FileExt;
            let f = file
                .as_ref()
                .map(|o| &o.file)
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, pos)?;
            Ok(buf)
        };
        let r = match self.users.peek(user) {
            Some(q) => f(q, &mut read_at),
            None => Err(StoreError::Invalid("user state vanished".into())),
        };
        if let Some(file) = file {
            self.put_file(key, file);
        }
        r
    }

    /// Takes a file handle out of the LRU (opening it if needed) so it cannot be closed while
    /// in use; [`Self::put_file`] gives it back.
    fn take_file(&mut self, key: &FileKey) -> Result<OpenFile, StoreError> {
        if let Some(f) = self.files.pop(key) {
            return Ok(f);
        }
        let path = self.path_of(key);
        if let Some(dir) = path.parent()
            && !dir.exists()
        {
            std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
            // Made durable with the batch that writes the first line (see `commit`).
            if let Some(prefix) = dir.parent() {
                self.new_dirs.insert(prefix.to_path_buf());
                if let Some(root) = prefix.parent() {
                    self.new_dirs.insert(root.to_path_buf());
                }
            }
        }
        // Close one first when the cache is full: handles taken out and the cache together stay
        // within the bound, even while a write runs concurrently with the store's callers.
        if self.files.len() >= self.files.cap().get() {
            self.files.pop_lru();
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        let len = file.metadata().map_err(|e| io_err(&path, e))?.len();
        Ok(OpenFile { file, len, path })
    }

    fn path_of(&self, key: &FileKey) -> PathBuf {
        match key.1 {
            FileKind::Queue => queue_path(&self.cfg.data_dir, &key.0),
            FileKind::Index => index_path(&self.cfg.data_dir, &key.0),
        }
    }

    fn put_file(&mut self, key: FileKey, f: OpenFile) {
        // Evicting drops (closes) the least recently used handle: the fd bound.
        self.files.push(key, f);
    }

    /// Writes and fsyncs one user's new lines (without the commit log); on failure rolls both
    /// files back.
    fn write_user(
        &mut self,
        user: &str,
        lines: &Lines,
        fsync_time: &mut Duration,
        sync: bool,
    ) -> Result<bool, StoreError> {
        let mut open: Vec<(FileKey, OpenFile, u64)> = Vec::with_capacity(2);
        let targets = [
            (FileKind::Queue, &lines.queue),
            (FileKind::Index, &lines.index),
        ];
        let mut result: Result<bool, StoreError> = Ok(false);
        for (kind, buf) in targets {
            if buf.is_empty() {
                continue;
            }
            let key = file_key(user, kind);
            let mut f = match self.take_file(&key) {
                Ok(f) => f,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let before = f.len;
            let w = write_checked(&mut f.file, &f.path, buf);
            f.len += buf.len() as u64;
            open.push((key, f, before));
            if let Err(e) = w {
                result = Err(e);
                break;
            }
        }
        if result.is_ok() && self.cfg.mode != FsyncMode::Never && !sync {
            // The caller syncs the whole batch at once (see `commit`).
            result = Ok(false);
        } else if result.is_ok() && self.cfg.mode != FsyncMode::Never {
            for (_, f, _) in &open {
                let t = Instant::now();
                let r = f.file.sync_data();
                *fsync_time += t.elapsed();
                if let Err(e) = r {
                    result = Err(io_err(&f.path, e));
                    break;
                }
                result = Ok(true);
            }
        } else if result.is_ok() {
            for (key, _, _) in &open {
                if !self.unsynced_files.contains(key) {
                    self.unsynced_files.insert(key.clone());
                }
            }
        }
        match result {
            Ok(synced) => {
                for (key, f, _) in open {
                    self.put_file(key, f);
                }
                Ok(synced)
            }
            Err(e) => {
                // Nothing half-written stays: cut back to the pre-batch length and forget the
                // handles (reopened next time).
                for (_, f, before) in open {
                    if let Err(te) = f.file.set_len(before).and_then(|()| f.file.sync_data()) {
                        tracing::error!(file = %f.path.display(), error = %te, "could not roll back a failed write");
                    }
                }
                Err(e)
            }
        }
    }

    /// A user's lines could not be written (and were rolled back): its writes get the error and
    /// its state, which has the rolled-back lines, is reloaded from disk next time.
    fn fail_user(&mut self, user: &str, replies: Vec<Deferred>, e: &StoreError) {
        tracing::error!(user, error = %e, "store write failed; the user's batch is rolled back");
        self.forget_user(user);
        for r in replies {
            r.send_err(copy_err(e));
        }
    }

    /// A logged commit's lines of one user: their records go to `buf`, the lines wait for
    /// their files (see [`behind`]), and where each file's lines start goes to `written` (to cut
    /// them off if the log write fails). All or nothing: both files' offsets are known before
    /// anything is logged.
    fn log_user(
        &mut self,
        user: &str,
        lines: &Lines,
        generation: u64,
        buf: &mut Vec<u8>,
        written: &mut Vec<(FileKey, u64)>,
    ) -> Result<(), StoreError> {
        let mut files = Vec::with_capacity(2);
        for (kind, data) in [
            (FileKind::Queue, &lines.queue),
            (FileKind::Index, &lines.index),
        ] {
            if data.is_empty() {
                continue;
            }
            let key = file_key(user, kind);
            let on_the_way = self.writer.as_ref().and_then(|w| w.end(&key));
            let at = match self.behind.end(&key).or(on_the_way) {
                Some(end) => end,
                None => self.file_len(&key)?,
            };
            files.push((kind, key, at, data));
        }
        for (kind, key, at, data) in files {
            let file = match kind {
                FileKind::Queue => LogFile::Queue,
                FileKind::Index => LogFile::Index,
            };
            wal::encode_write(buf, generation, user, file, at, data);
            if self.behind.push(&key, at, generation, data) {
                self.behind_full.push(key.clone());
            }
            written.push((key, at));
        }
        Ok(())
    }

    /// A user file's length on disk (0 for a file not created yet).
    fn file_len(&self, key: &FileKey) -> Result<u64, StoreError> {
        if let Some(f) = self.files.peek(key) {
            return Ok(f.len);
        }
        let path = self.path_of(key);
        match std::fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    /// A commit through the log: every user's lines become records appended to the log in one
    /// write, and the log is synced once (on the sync thread with `fsync = batch`, here with
    /// `always`); then the writes are answered. The lines reach the users' files later (see
    /// [`behind`] and [`Self::flush_behind`]).
    fn commit_logged(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        let generation = match self.log_ready() {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "no commit log to write to; the batch is answered with an error");
                let all = dirty.into_iter().map(|(u, d)| (u, d.replies, d.appends));
                self.fail_waiting(all.collect(), &e);
                return;
            }
        };
        // New user folders need no sync of their own: the replay at start creates them again,
        // and the checkpoint's syncfs makes them durable.
        self.new_dirs.clear();
        let mut buf = Vec::new();
        let mut written = Vec::new();
        let mut waiting: Waiting = Vec::new();
        for (user, d) in dirty {
            if d.lines.is_empty() {
                d.replies.into_iter().for_each(Deferred::send_ok);
                continue;
            }
            match self.log_user(&user, &d.lines, generation, &mut buf, &mut written) {
                Ok(()) => waiting.push((user, d.replies, d.appends)),
                Err(e) => self.fail_user(&user, d.replies, &e),
            }
        }
        if waiting.is_empty() {
            return;
        }
        let log = match self.append_log(&buf) {
            Ok(log) => log,
            Err(e) => {
                tracing::error!(error = %e, "store commit log write failed; the batch is rolled back and answered with an error");
                // Lines not in the log must not stay in front of later, logged ones.
                for (key, at) in written {
                    self.behind.cut(&key, at);
                }
                self.behind_full.clear();
                self.fail_waiting(waiting, &e);
                return;
            }
        };
        // A small batch with the sync thread idle is synced here: handing it over would cost
        // two more thread wake-ups per commit, and nothing is waiting to be written meanwhile.
        let inline = waiting.len() < SYNCFS_MIN_USERS
            && self
                .syncer
                .as_ref()
                .is_some_and(|s| s.answered() == s.submitted);
        if !inline {
            match self.hand_to_syncer(waiting, Some(log.clone())) {
                Ok(()) => {
                    self.maybe_checkpoint(false);
                    return;
                }
                Err(back) => waiting = back,
            }
        }
        let t = Instant::now();
        let r = self.sync_log(&log);
        let took = t.elapsed();
        match r {
            Ok(()) => {
                let mut appends = 0;
                for (_, replies, n) in waiting {
                    appends += n;
                    replies.into_iter().for_each(Deferred::send_ok);
                }
                if let Some(obs) = &self.cfg.observer {
                    obs.fsync(took, appends);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit log fdatasync failed; the batch is answered with an error");
                self.fail_waiting(waiting, &e);
            }
        }
        self.maybe_checkpoint(false);
    }

    /// Written lines that are not known durable: their writes get the error and the users'
    /// state is reloaded from disk on next use.
    fn fail_waiting(&mut self, waiting: Waiting, e: &StoreError) {
        for (user, replies, _) in waiting {
            self.forget_user(&user);
            replies.into_iter().for_each(|r| r.send_err(copy_err(e)));
        }
    }

    /// Hands written batches to the sync thread and remembers which users wait for it (reads of
    /// them wait too); gives the batches back without a sync thread.
    fn hand_to_syncer(
        &mut self,
        waiting: Waiting,
        log: Option<Arc<OpenLog>>,
    ) -> Result<(), Waiting> {
        let Some(syncer) = &mut self.syncer else {
            return Err(waiting);
        };
        let users: Vec<String> = waiting.iter().map(|(u, _, _)| u.clone()).collect();
        let n = syncer.submit(waiting, log)?;
        for u in users {
            self.in_sync.insert(u, n);
        }
        Ok(())
    }

    /// fdatasyncs the log here; after a failure its generation is not written to again.
    fn sync_log(&mut self, log: &OpenLog) -> Result<(), StoreError> {
        log.sync().inspect_err(|_| {
            if let Some(w) = &mut self.wal {
                w.broken = true;
            }
        })
    }

    /// The generation the next records belong to, after starting a new one if the current one
    /// saw a failure.
    fn log_ready(&mut self) -> Result<u64, StoreError> {
        if self.wal.as_ref().is_some_and(|w| w.broken) {
            self.rotate_log()?;
        }
        self.wal
            .as_ref()
            .map(Wal::generation)
            .ok_or_else(|| StoreError::Invalid("no commit log".into()))
    }

    /// Appends whole records of the current generation (see [`Self::log_ready`]) to the log.
    fn append_log(&mut self, buf: &[u8]) -> Result<Arc<OpenLog>, StoreError> {
        match &mut self.wal {
            Some(w) => w.append(buf),
            None => Err(StoreError::Invalid("no commit log".into())),
        }
    }

    /// Before compaction replaces `user`'s files: makes the current files durable (they then
    /// hold every logged line of the user) and logs, synced, that the user's earlier records no
    /// longer apply — replaying them onto the compacted files would corrupt them.
    fn log_reset(&mut self, user: &str) -> Result<(), StoreError> {
        if self.wal.is_none() {
            return Ok(());
        }
        for kind in [FileKind::Queue, FileKind::Index] {
            let key = file_key(user, kind);
            let r = match self.files.peek(&key) {
                Some(f) => f.file.sync_data().map_err(|e| io_err(&f.path, e)),
                None => {
                    let path = self.path_of(&key);
                    match File::open(&path) {
                        Ok(f) => f.sync_data().map_err(|e| io_err(&path, e)),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                        Err(e) => Err(io_err(&path, e)),
                    }
                }
            };
            r?;
        }
        let generation = self.log_ready()?;
        let log = self.append_log(&wal::encode_reset(generation, user))?;
        self.sync_log(&log)
    }

    /// Makes this batch's lines durable, then answers its writes.
    fn commit(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        if self.wal.is_some() {
            self.commit_logged();
            return;
        }
        let dirty = std::mem::take(&mut self.dirty);
        let mut fsync_time = Duration::ZERO;
        let mut appends = 0usize;
        let mut synced_any = false;
        // Group commit over many files: one fsync per file costs one journal commit each, so a
        // batch touching many users writes them all first and then syncs the filesystem once
        // (syncfs waits for every dirty page and the journal). Few files: fsync each.
        let written = dirty.values().filter(|d| !d.lines.is_empty()).count();
        let mut one_sync = self.cfg.mode == FsyncMode::Batch && written >= SYNCFS_MIN_USERS;
        // New user folders: a syncfs covers them; otherwise each parent is synced once, before
        // any answer, so an acknowledged line never sits in a file whose folder entry is lost
        // (if that fails, the batch falls back to one syncfs, whose failure fails the batch).
        let new_dirs = std::mem::take(&mut self.new_dirs);
        if self.cfg.mode == FsyncMode::Never {
            self.unsynced_dirs.extend(new_dirs);
        } else if !one_sync {
            for dir in new_dirs {
                if let Err(e) = super::recovery::sync_dir(&dir) {
                    tracing::error!(error = %e, "fsync of a new user folder failed");
                    one_sync = self.cfg.mode == FsyncMode::Batch;
                }
            }
        }
        let mut waiting: Waiting = Vec::new();
        for (user, d) in dirty {
            if d.lines.is_empty() {
                d.replies.into_iter().for_each(Deferred::send_ok);
                continue;
            }
            match self.write_user(&user, &d.lines, &mut fsync_time, !one_sync) {
                Ok(_) if one_sync => waiting.push((user, d.replies, d.appends)),
                Ok(synced) => {
                    synced_any |= synced;
                    appends += d.appends;
                    d.replies.into_iter().for_each(Deferred::send_ok);
                }
                Err(e) => self.fail_user(&user, d.replies, &e),
            }
        }
        if !waiting.is_empty()
            && let Err(back) = self.hand_to_syncer(std::mem::take(&mut waiting), None)
        {
            waiting = back;
        }
        if !waiting.is_empty() {
            let t = Instant::now();
            let r = profile::syncfs(&self.cfg.data_dir);
            fsync_time += t.elapsed();
            match r {
                Ok(()) => {
                    synced_any = true;
                    for (_, replies, n) in waiting {
                        appends += n;
                        replies.into_iter().for_each(Deferred::send_ok);
                    }
                }
                Err(e) => {
                    // The lines are in the files but not known durable: answer an error (a
                    // client's resend is then recognised as a duplicate) and reload the users.
                    tracing::error!(error = %e, "store syncfs failed; the batch is answered with an error");
                    for (user, replies, _) in waiting {
                        self.forget_user(&user);
                        for r in replies {
                            r.send_err(io_err(
                                &self.cfg.data_dir,
                                std::io::Error::new(e.kind(), e.to_string()),
                            ));
                        }
                    }
                }
            }
        }
        if synced_any && let Some(obs) = &self.cfg.observer {
            obs.fsync(fsync_time, appends);
        }
    }

    /// Background compaction, run after each batch (no uncommitted lines exist then): looks at
    /// the users written in the batch and, on ticks, at a slice of the cached users (a sweep
    /// every [`SWEEP_INTERVAL`]), then compacts at most one due user, so senders on this shard
    /// wait for at most one user's rewrite.
    fn maintain(&mut self, tick: bool) {
        #[cfg(test)]
        if fault::background_paused(&self.cfg.data_dir) {
            self.maint.touched.clear();
            return;
        }
        let now = bimip_proto::now_ms();
        let limits = self.cfg.limits;
        let touched: Vec<String> = self.maint.touched.drain().collect();
        if tick {
            let sweep_due = self
                .maint
                .last_sweep
                .is_none_or(|t| t.elapsed() >= SWEEP_INTERVAL);
            if sweep_due && self.maint.sweep.is_empty() {
                self.maint.sweep = self.users.iter().map(|(u, _)| u.clone()).collect();
                self.maint.last_sweep = Some(Instant::now());
            }
        }
        let swept: Vec<String> = if tick {
            let n = self.maint.sweep.len().saturating_sub(SWEEP_PER_TICK);
            self.maint.sweep.split_off(n)
        } else {
            Vec::new()
        };
        for user in touched.into_iter().chain(swept) {
            if self.maint.due_set.contains(&user) {
                continue;
            }
            if self
                .users
                .peek(&user)
                .is_some_and(|q| q.needs_compaction(now, &limits))
            {
                self.maint.due_set.insert(user.clone());
                self.maint.due.push_back(user);
            }
        }
        while let Some(user) = self.maint.due.pop_front() {
            self.maint.due_set.remove(&user);
            let cached = self.users.contains(&user);
            // A user found by recovery is loaded first (at most one load per round).
            let due = match self
                .loadable(&user)
                .and_then(|()| user_state(&mut self.users, &self.cfg.data_dir, &user))
            {
                Ok(q) => q.needs_compaction(now, &limits),
                Err(e) => {
                    tracing::error!(user, error = %e, "could not load a user for compaction");
                    false
                }
            };
            if due {
                // Failures are logged and retried later.
                let _ = self.compact_user(&user, now);
            }
            if due || !cached {
                break;
            }
        }
    }

    /// Rewrites one user's queue and index files without what [`UserQueue::compact`] drops:
    /// each file is written under a temporary name, fsynced, renamed over the original and the
    /// folder fsynced (the rename is the commit point; a leftover temporary file is removed at
    /// start). Memory switches to the compacted state only once both files are replaced.
    pub(crate) fn compact_user(&mut self, user: &str, now: i64) -> Result<Compaction, StoreError> {
        let started = Instant::now();
        let limits = self.cfg.limits;
        if !self.users.contains(user) {
            return Ok(Compaction::default());
        }
        let c = match self.with_queue_file(user, |q, read_at| q.compact(now, &limits, read_at)) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(user, error = %e, "compaction could not read the queue; the files are unchanged");
                if let Some(q) = self.users.get_mut(user) {
                    q.block_compaction(now + COMPACT_RETRY_MS);
                }
                return Err(e);
            }
        };
        let qp = queue_path(&self.cfg.data_dir, user);
        let ip = index_path(&self.cfg.data_dir, user);
        let mut result = Ok(());
        if c.queue_changed || c.index_changed {
            result = self.log_reset(user);
        }
        // The append handles would keep writing to the replaced files.
        let keys = vec![
            file_key(user, FileKind::Queue),
            file_key(user, FileKind::Index),
        ];
        for key in &keys {
            self.files.pop(key);
        }
        if let Some(w) = &mut self.writer {
            w.close_files(keys);
        }
        if result.is_ok() && c.queue_changed {
            result = replace_file(&qp, &c.queue);
        }
        if result.is_ok() && c.index_changed {
            result = replace_file(&ip, &c.index);
        }
        match result {
            Ok(()) => {
                if c.dropped_unacked > 0 {
                    tracing::warn!(
                        user,
                        dropped = c.dropped_unacked,
                        max_queue_items = limits.max_items,
                        "queue over max_queue_items: dropped unacknowledged items, oldest first"
                    );
                }
                tracing::debug!(user, dropped = c.dropped, kept = c.kept, "compacted");
                let out = Compaction {
                    dropped: c.dropped,
                    dropped_unacked: c.dropped_unacked,
                    kept: c.kept,
                };
                self.users.put(user.to_string(), c.state);
                if let Some(obs) = &self.cfg.observer {
                    obs.compacted(user, out.dropped, out.kept, started.elapsed());
                    if out.dropped_unacked > 0 {
                        obs.dropped_unacked(user, out.dropped_unacked);
                    }
                }
                Ok(out)
            }
            Err(e) => {
                tracing::error!(user, error = %e, "compaction failed; the files are unchanged");
                // Memory may no longer match one of the files: reload from disk next time.
                self.forget_user(user);
                if let Ok(mut q) = load_user(&self.cfg.data_dir, user) {
                    q.block_compaction(now + COMPACT_RETRY_MS);
                    self.users.put(user.to_string(), q);
                }
                Err(e)
            }
        }
    }

    fn trim(&mut self) {
        let cap = self.cfg.cache_users.max(1);
        while self.users.len() > cap {
            let Some((user, q)) = self.users.pop_lru() else {
                break;
            };
            if let Err(e) = self.flush_user(&user) {
                // Reloaded from files that lack those lines, the user would hand out their
                // offsets again: it stays in memory until they are written.
                tracing::error!(user, error = %e, "could not write a user's logged lines; the user stays cached until they are written");
                self.users.put(user, q);
                break;
            }
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
        for key in std::mem::take(&mut self.unsynced_files) {
            let r = match self.files.peek(&key) {
                Some(f) => f.file.sync_data(),
                None => {
                    let path = self.path_of(&key);
                    // Compaction may have replaced (and synced) the file, or removed the user.
                    match File::open(&path) {
                        Ok(f) => f.sync_data(),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                        Err(e) => Err(e),
                    }
                }
            };
            if let Err(e) = r {
                tracing::error!(user = key.0, error = %e, "fsync at shutdown failed");
            }
        }
        for path in std::mem::take(&mut self.unsynced) {
            let r = File::open(&path).and_then(|f| f.sync_data());
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

/// Replaces `path` with `data` atomically and durably: temporary file in the same folder, write,
/// fsync, rename over, fsync of the folder. On failure the temporary file is removed and `path`
/// is unchanged (unless only the folder fsync failed).
pub(crate) fn replace_file(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let tmp = profile::temp_path(path);
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        write_checked(&mut f, &tmp, data)?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        drop(f);
        #[cfg(test)]
        fault::before_rename(path)?;
        std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    if let Some(dir) = path.parent() {
        super::recovery::sync_dir(dir)?;
    }
    Ok(())
}

/// The same error again, for each of several waiting writes (`StoreError` is not `Clone`: an
/// I/O error keeps its kind, path and message).
pub(crate) fn copy_err(e: &StoreError) -> StoreError {
    let (kind, msg, path) = match e {
        StoreError::Io { path, source } => (source.kind(), source.to_string(), path.clone()),
        other => (std::io::ErrorKind::Other, other.to_string(), PathBuf::new()),
    };
    StoreError::Io {
        path,
        source: std::io::Error::new(kind, msg),
    }
}

/// `write_all_at`, with the same fault injection point as [`write_checked`].
pub(crate) fn write_at_checked(
    f: &File,
    path: &Path,
    buf: &[u8],
    pos: u64,
) -> Result<(), StoreError> {
    use std::os::unix::fs::FileExt;
    #[cfg(test)]
    if let Some((after, kind)) = fault::write_fault(path) {
        let n = after.min(buf.len());
        f.write_all_at(&buf[..n], pos)
            .map_err(|e| io_err(path, e))?;
        return Err(io_err(path, std::io::Error::from(kind)));
    }
    f.write_all_at(buf, pos).map_err(|e| io_err(path, e))
}

/// `write_all`, with a fault injection point under test.
pub(crate) fn write_checked(f: &mut impl Write, path: &Path, buf: &[u8]) -> Result<(), StoreError> {
    #[cfg(test)]
    if let Some((after, kind)) = fault::write_fault(path) {
        let n = after.min(buf.len());
        f.write_all(&buf[..n]).map_err(|e| io_err(path, e))?;
        return Err(io_err(path, std::io::Error::from(kind)));
    }
    f.write_all(buf).map_err(|e| io_err(path, e))
}

/// Test-only fault injection: writes to a chosen file fail (after writing part of the buffer),
/// as a full disk or a revoked permission would make them.
#[cfg(test)]
pub(crate) mod fault {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use crate::StoreError;

    static WRITES: Mutex<Option<HashMap<PathBuf, (usize, std::io::ErrorKind)>>> = Mutex::new(None);
    static WRITES_ONCE: Mutex<Option<HashMap<PathBuf, (usize, std::io::ErrorKind)>>> =
        Mutex::new(None);
    static RENAMES: Mutex<Option<HashMap<PathBuf, ()>>> = Mutex::new(None);
    static PAUSED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    static HELD: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    /// No commit-log checkpoints in stores on `data_dir` until they stop (tests that need the
    /// log to still hold what was written).
    pub fn hold_checkpoints(data_dir: &Path) {
        HELD.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(data_dir.to_path_buf());
    }

    pub(super) fn checkpoints_held(data_dir: &Path) -> bool {
        let g = HELD.lock().unwrap_or_else(|p| p.into_inner());
        g.iter().any(|d| d == data_dir)
    }

    /// No background compaction in stores on `data_dir` (tests that compact explicitly).
    pub fn pause_background(data_dir: &Path) {
        let mut g = PAUSED.lock().unwrap_or_else(|p| p.into_inner());
        g.push(data_dir.to_path_buf());
    }

    pub(super) fn background_paused(data_dir: &Path) -> bool {
        let g = PAUSED.lock().unwrap_or_else(|p| p.into_inner());
        g.iter().any(|d| d == data_dir)
    }

    /// Writes to `path` write `after` bytes, then fail with `kind` (until [`clear`]).
    pub fn fail_writes(path: &Path, after: usize, kind: std::io::ErrorKind) {
        let mut g = WRITES.lock().unwrap_or_else(|p| p.into_inner());
        g.get_or_insert_with(HashMap::new)
            .insert(path.to_path_buf(), (after, kind));
    }

    /// The next write to `path` writes `after` bytes, then fails with `kind`; later ones work.
    pub fn fail_next_write(path: &Path, after: usize, kind: std::io::ErrorKind) {
        let mut g = WRITES_ONCE.lock().unwrap_or_else(|p| p.into_inner());
        g.get_or_insert_with(HashMap::new)
            .insert(path.to_path_buf(), (after, kind));
    }

    /// The rename of a temporary file over `path` fails (a crash before the commit point).
    pub fn fail_rename(path: &Path) {
        let mut g = RENAMES.lock().unwrap_or_else(|p| p.into_inner());
        g.get_or_insert_with(HashMap::new)
            .insert(path.to_path_buf(), ());
    }

    pub fn clear(path: &Path) {
        let mut g = WRITES.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = g.as_mut() {
            m.remove(path);
        }
        let mut g = RENAMES.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = g.as_mut() {
            m.remove(path);
        }
    }

    pub(crate) fn write_fault(path: &Path) -> Option<(usize, std::io::ErrorKind)> {
        let once = WRITES_ONCE
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .and_then(|m| m.remove(path));
        if once.is_some() {
            return once;
        }
        let g = WRITES.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref()?.get(path).copied()
    }

    pub(crate) fn before_rename(path: &Path) -> Result<(), StoreError> {
        let g = RENAMES.lock().unwrap_or_else(|p| p.into_inner());
        if g.as_ref().is_some_and(|m| m.contains_key(path)) {
            return Err(StoreError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other("injected: crash before rename"),
            });
        }
        Ok(())
    }
}
