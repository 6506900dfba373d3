//! The push store's one writer thread. Callers change memory under the state lock and, still
//! under it, queue the encoded records here, so the log has them in the order memory took them.
//! The writer appends whatever is queued with one write, fsyncs once for all of it (group
//! commit; with `fsync = always` once per change, with `never` not at all until shutdown), and
//! only then answers each change. It never takes the state lock around file I/O.
//!
//! It also starts compactions: when the log is large next to the last snapshot, it creates the
//! next log, switches to it under the lock (whatever was queued before the switch still goes to
//! the old log), and hands the snapshot to a thread of its own (see `compact.rs`).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use bimip_proto::store::{PushRecord, push_record::Change};
use tokio::sync::oneshot;

use super::compact::{Compacted, Compaction};
use super::layout::log_path;
use super::recovery::{LoadOptions, load};
use super::state::ForgetRule;
use super::{Clock, PushTuning, Shared};
use crate::StoreError;
use crate::file::FsyncMode;
use crate::file::record::encode_line_into;
use crate::file::recovery::{io_err, sync_dir};
use crate::file::shard::write_checked;

pub(crate) type Reply = oneshot::Sender<Result<(), StoreError>>;

/// What callers queue for the writer.
pub(crate) enum Msg {
    /// The encoded records of one change; answered once they are durable.
    Write { lines: Vec<u8>, reply: Reply },
    /// A change that changed nothing: answered once everything queued before it is durable
    /// (so its answer never rests on state that a crash could still take back).
    Sync { reply: Reply },
    /// Compact now; answered once the new snapshot is in place.
    Compact { reply: Reply },
    /// Write the advisory last-push times, fsync everything, stop.
    Shutdown { reply: oneshot::Sender<()> },
    /// Tests: stop at once, as a crash would (nothing advisory written, no final fsync).
    #[cfg(test)]
    Crash { reply: oneshot::Sender<()> },
}

/// Messages taken per round.
const MAX_BATCH: usize = 4096;
/// Least time between the starts of two commits when changes keep coming (at most 500 fsyncs
/// per second): see [`Writer::run`].
const COMMIT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(2);

/// A compaction under way.
struct Running {
    handle: JoinHandle<Result<Compacted, StoreError>>,
    abort: Arc<AtomicBool>,
}

pub(crate) struct Writer {
    pub shared: Weak<Shared>,
    pub rx: mpsc::Receiver<Msg>,
    pub data_dir: PathBuf,
    pub dir: PathBuf,
    pub mode: FsyncMode,
    pub tuning: PushTuning,
    pub clock: Clock,
    /// The current log: its number, handle, path and length.
    pub log: u64,
    pub file: File,
    pub path: PathBuf,
    pub len: u64,
    /// The size of the last snapshot (the log is compacted once it is large next to it).
    pub snapshot_bytes: u64,
    /// With `fsync = never`: logs written since their last fsync (synced at shutdown).
    pub unsynced: Vec<PathBuf>,
    /// Messages taken out of the channel at a switch that are not for the old log.
    pub front: VecDeque<Msg>,
    compactor: Option<Running>,
    /// Failed writes so far (a switch does not compact after one).
    failures: u64,
    /// After a failed switch, no new one before the log is this long.
    retry_len: u64,
    /// When the last round was committed.
    last_commit: std::time::Instant,
}

fn copy_err(e: &StoreError) -> StoreError {
    match e {
        StoreError::Io { path, source } => StoreError::Io {
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        StoreError::Corrupt { path, line, reason } => StoreError::Corrupt {
            path: path.clone(),
            line: *line,
            reason: reason.clone(),
        },
        StoreError::InvalidUser(u) => StoreError::InvalidUser(u.clone()),
        StoreError::Invalid(s) => StoreError::Invalid(s.clone()),
        StoreError::Closed => StoreError::Closed,
        StoreError::Unavailable(s) => StoreError::Unavailable(s.clone()),
        StoreError::Internal(s) => StoreError::Internal(s.clone()),
    }
}

/// Opens log `path` for appending, creating it (and making its folder entry durable) if needed.
pub(crate) fn open_log(dir: &Path, path: &Path) -> Result<(File, u64), StoreError> {
    let existed = path.exists();
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    if !existed {
        sync_dir(dir)?;
    }
    let len = file.metadata().map_err(|e| io_err(path, e))?.len();
    Ok((file, len))
}

enum Flow {
    Go,
    Stop,
}

impl Writer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shared: Weak<Shared>,
        rx: mpsc::Receiver<Msg>,
        data_dir: PathBuf,
        mode: FsyncMode,
        tuning: PushTuning,
        clock: Clock,
        log: u64,
        (file, len): (File, u64),
        snapshot_bytes: u64,
    ) -> Self {
        let dir = super::layout::push_dir(&data_dir);
        Writer {
            shared,
            rx,
            path: log_path(&dir, log),
            dir,
            data_dir,
            mode,
            tuning,
            clock,
            log,
            file,
            len,
            snapshot_bytes,
            unsynced: Vec::new(),
            front: VecDeque::new(),
            compactor: None,
            failures: 0,
            retry_len: 0,
            last_commit: std::time::Instant::now(),
        }
    }

    pub fn run(mut self) {
        // A log left large by the last run is compacted right away.
        self.maybe_compact(Vec::new());
        loop {
            let first = match self.front.pop_front() {
                Some(m) => m,
                None => match self.rx.recv() {
                    Ok(m) => m,
                    // Every handle of the store is gone without a shutdown.
                    Err(_) => {
                        self.stop_compactor();
                        return;
                    }
                },
            };
            // Under load, let changes gather for a moment so one fsync covers more of them:
            // the disk's flushes are shared with the queue files, and each one costs every
            // writer waiting on it. An idle writer commits at once.
            let since = self.last_commit.elapsed();
            if since < COMMIT_INTERVAL && self.mode != FsyncMode::Never {
                std::thread::sleep(COMMIT_INTERVAL - since);
            }
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match self.front.pop_front() {
                    Some(m) => batch.push(m),
                    None => match self.rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    },
                }
            }
            let flow = self.handle(batch);
            self.last_commit = std::time::Instant::now();
            if let Flow::Stop = flow {
                return;
            }
            self.poll_compactor();
            self.maybe_compact(Vec::new());
        }
    }

    fn handle(&mut self, batch: Vec<Msg>) -> Flow {
        let mut pending: Vec<(Vec<u8>, Reply)> = Vec::with_capacity(batch.len());
        let mut compact: Vec<Reply> = Vec::new();
        for msg in batch {
            match msg {
                Msg::Write { lines, reply } => pending.push((lines, reply)),
                Msg::Sync { reply } => pending.push((Vec::new(), reply)),
                // After this batch: its writes came before the switch.
                Msg::Compact { reply } => compact.push(reply),
                Msg::Shutdown { reply } => {
                    self.commit(std::mem::take(&mut pending));
                    self.shutdown();
                    compact
                        .into_iter()
                        .for_each(|r| drop(r.send(Err(StoreError::Closed))));
                    let _ = reply.send(());
                    return Flow::Stop;
                }
                #[cfg(test)]
                Msg::Crash { reply } => {
                    self.commit(std::mem::take(&mut pending));
                    self.stop_compactor();
                    compact
                        .into_iter()
                        .for_each(|r| drop(r.send(Err(StoreError::Closed))));
                    let _ = reply.send(());
                    return Flow::Stop;
                }
            }
        }
        self.commit(pending);
        if !compact.is_empty() {
            self.wait_compactor();
            self.maybe_compact(compact);
        }
        Flow::Go
    }

    /// Appends the changes' records, makes them durable (per the fsync mode), answers them.
    fn commit(&mut self, items: Vec<(Vec<u8>, Reply)>) {
        if items.is_empty() {
            return;
        }
        if self.mode != FsyncMode::Always {
            let _ = self.write_group(items);
            return;
        }
        // One write and fsync per change; a `Sync` rides on the one before it. After a failure
        // the rest is refused unwritten: memory was read back without it.
        let mut group: Vec<(Vec<u8>, Reply)> = Vec::new();
        let mut failed: Option<StoreError> = None;
        for (lines, reply) in items {
            if failed.is_none() && !lines.is_empty() && !group.is_empty() {
                failed = self.write_group(std::mem::take(&mut group)).err();
            }
            match &failed {
                Some(e) => drop(reply.send(Err(copy_err(e)))),
                None => group.push((lines, reply)),
            }
        }
        if failed.is_none() {
            let _ = self.write_group(group);
        }
    }

    /// Writes and syncs one group; on failure every change of it has been answered with the
    /// error, which is returned (see [`Self::failed`]).
    fn write_group(&mut self, items: Vec<(Vec<u8>, Reply)>) -> Result<(), StoreError> {
        let total: usize = items.iter().map(|(l, _)| l.len()).sum();
        if total == 0 {
            // Only `Sync`s: everything before them was made durable by an earlier round.
            items.into_iter().for_each(|(_, r)| drop(r.send(Ok(()))));
            return Ok(());
        }
        let mut buf = Vec::with_capacity(total);
        let mut replies = Vec::with_capacity(items.len());
        for (lines, reply) in items {
            buf.extend_from_slice(&lines);
            replies.push(reply);
        }
        let before = self.len;
        let mut r = write_checked(&mut self.file, &self.path, &buf);
        if r.is_ok() {
            if self.mode == FsyncMode::Never {
                if !self.unsynced.contains(&self.path) {
                    self.unsynced.push(self.path.clone());
                }
            } else {
                r = self.file.sync_data().map_err(|e| io_err(&self.path, e));
            }
        }
        match r {
            Ok(()) => {
                self.len += buf.len() as u64;
                replies.into_iter().for_each(|r| drop(r.send(Ok(()))));
                Ok(())
            }
            Err(e) => {
                let copy = copy_err(&e);
                self.failed(before, replies, e);
                Err(copy)
            }
        }
    }

    /// A write or fsync failed: the log is cut back to where the round began. Memory already
    /// holds the round's changes (and those queued since), so it is read back from the files
    /// first, refusing changes meanwhile; then the round and everything queued behind it are
    /// answered with the error (a caller that reads again sees the state without its change).
    /// If the files cannot be read back, changes stay refused until a restart.
    fn failed(&mut self, before: u64, replies: Vec<Reply>, e: StoreError) {
        self.failures += 1;
        tracing::error!(file = %self.path.display(), error = %e, "push log write failed; the push state is read back from its files and the changes are answered with the error");
        if let Err(te) = self
            .file
            .set_len(before)
            .and_then(|()| self.file.sync_data())
        {
            tracing::error!(file = %self.path.display(), error = %te, "could not cut back a failed push log write");
        }
        self.stop_compactor();
        let mut refused = replies;
        if let Some(shared) = self.shared.upgrade() {
            let later: Vec<Msg> = {
                let mut g = shared.lock();
                g.failed = Some(e.to_string());
                self.front.drain(..).chain(self.rx.try_iter()).collect()
            };
            for m in later {
                match m {
                    Msg::Write { reply, .. } | Msg::Sync { reply } | Msg::Compact { reply } => {
                        refused.push(reply);
                    }
                    other => self.front.push_back(other),
                }
            }
            let opts = LoadOptions {
                repair: false,
                cleanup: false,
                now: self.clock.now(),
            };
            match load(&self.data_dir, opts) {
                Ok(loaded) => {
                    let mut g = shared.lock();
                    g.state = loaded.state;
                    g.failed = None;
                    self.len = loaded.log_len;
                    tracing::warn!("push state read back from its files after a failed write");
                }
                Err(le) => {
                    tracing::error!(error = %le, "could not read the push state back; push changes are refused until a restart");
                }
            }
        }
        for r in refused {
            let _ = r.send(Err(copy_err(&e)));
        }
    }

    /// Starts a compaction when the log is large next to the last snapshot, or when asked.
    fn maybe_compact(&mut self, asked: Vec<Reply>) {
        if self.compactor.is_some() {
            return;
        }
        let t = &self.tuning;
        let due = self.len > t.compact_min_log_bytes
            && self.len > t.compact_log_ratio.saturating_mul(self.snapshot_bytes)
            && self.len >= self.retry_len;
        if !due && asked.is_empty() {
            return;
        }
        let failures = self.failures;
        match self.switch() {
            Ok(Some(switched)) if self.failures == failures => self.spawn(switched, asked),
            Ok(_) => asked
                .into_iter()
                .for_each(|r| drop(r.send(Err(StoreError::Closed)))),
            Err(e) => {
                tracing::error!(error = %e, "could not start a new push log; compaction put off");
                self.retry_len = self.len.saturating_add(self.tuning.compact_min_log_bytes);
                for r in asked {
                    let _ = r.send(Err(copy_err(&e)));
                }
            }
        }
    }

    /// Begins log N+1. Under the lock, N+1 becomes the log of every later change; what was
    /// queued before still goes to log N, written now. Only then is log N+1 created: log N is
    /// complete by the time a newer log exists, so a crash in between leaves a torn end only on
    /// the newest log, which the start cuts. Returns the dead letters and the tombstone rule as
    /// of the switch, or `None` when the store is going away.
    fn switch(&mut self) -> Result<Option<Switched>, StoreError> {
        let next = self.log + 1;
        let Some(shared) = self.shared.upgrade() else {
            return Ok(None);
        };
        let now = self.clock.now();
        let ttl = i64::try_from(self.tuning.tombstone_ttl.as_millis()).unwrap_or(i64::MAX);
        let (before, dead) = {
            let mut g = shared.lock();
            if g.tx.is_none() || g.failed.is_some() {
                return Ok(None);
            }
            g.log = next;
            let dead = g.state.dead_snapshot();
            let before: Vec<Msg> = self.front.drain(..).chain(self.rx.try_iter()).collect();
            (before, dead)
        };
        let mut old = Vec::new();
        for m in before {
            match m {
                Msg::Write { lines, reply } => old.push((lines, reply)),
                Msg::Sync { reply } => old.push((Vec::new(), reply)),
                other => self.front.push_back(other),
            }
        }
        self.commit(old);
        // Changes queued meanwhile wait in the channel. Should the new log not be created, they
        // go on to log N: their tombstones then name a later log than the one holding them,
        // which only keeps them longer.
        let path = log_path(&self.dir, next);
        let (file, len) = open_log(&self.dir, &path)?;
        self.file = file;
        self.path = path;
        self.log = next;
        self.len = len;
        Ok(Some(Switched {
            dead,
            rule: ForgetRule {
                log: next - 1,
                cutoff: now.saturating_sub(ttl),
            },
        }))
    }

    fn spawn(&mut self, s: Switched, asked: Vec<Reply>) {
        let abort = Arc::new(AtomicBool::new(false));
        let job = Compaction {
            shared: self.shared.clone(),
            dir: self.dir.clone(),
            log: self.log,
            dead: s.dead,
            rule: s.rule,
            abort: abort.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("bimip-push-compact".into())
            .spawn(move || {
                let r = job.run();
                for reply in asked {
                    let _ = reply.send(r.as_ref().map(|_| ()).map_err(copy_err));
                }
                r
            });
        match spawned {
            Ok(handle) => self.compactor = Some(Running { handle, abort }),
            Err(e) => tracing::error!(error = %e, "could not start the push compaction thread"),
        }
    }

    /// Takes the result of a finished compaction.
    fn poll_compactor(&mut self) {
        if self
            .compactor
            .as_ref()
            .is_some_and(|r| r.handle.is_finished())
        {
            self.wait_compactor();
        }
    }

    /// Waits for the compaction under way, if any.
    fn wait_compactor(&mut self) {
        let Some(run) = self.compactor.take() else {
            return;
        };
        match run.handle.join() {
            Ok(Ok(c)) => {
                self.snapshot_bytes = c.bytes;
                // The logs before it are deleted: nothing left to fsync there.
                self.unsynced.retain(|p| p.exists());
                tracing::info!(
                    snapshot = c.log,
                    bytes = c.bytes,
                    took_ms = c.took.as_millis() as u64,
                    longest_lock_us = c.longest_hold.as_micros() as u64,
                    chunks = c.chunks,
                    mean_lock_us = (c.total_hold.as_micros() / c.chunks.max(1) as u128) as u64,
                    forgotten_tombstones = c.forgotten_tombstones,
                    "push store compacted"
                );
            }
            Ok(Err(StoreError::Closed)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "push compaction failed; the files before it are kept and it is tried again later");
            }
            Err(_) => tracing::error!("the push compaction thread panicked"),
        }
    }

    /// Stops a compaction under way between two chunks (its temporary file is removed; the
    /// next one starts over).
    fn stop_compactor(&mut self) {
        if let Some(run) = &self.compactor {
            run.abort.store(true, Ordering::Release);
        }
        self.wait_compactor();
    }

    /// The end of a clean shutdown: a compaction under way is finished (its snapshot took the
    /// last-push times of the devices it copied), the other advisory last-push times reach the
    /// log, and every log and the folder are fsynced whatever the fsync mode.
    fn shutdown(&mut self) {
        self.wait_compactor();
        if let Some(shared) = self.shared.upgrade() {
            let pushed = shared.lock().state.take_pushed();
            let mut buf = Vec::new();
            for t in pushed {
                let rec = PushRecord {
                    change: Some(Change::PutDevice(t)),
                };
                encode_line_into(&rec, &mut buf);
            }
            if !buf.is_empty() {
                match write_checked(&mut self.file, &self.path, &buf) {
                    Ok(()) => self.len += buf.len() as u64,
                    Err(e) => {
                        tracing::error!(error = %e, "could not write the last push times at shutdown");
                    }
                }
            }
        }
        if let Err(e) = self.file.sync_data() {
            tracing::error!(file = %self.path.display(), error = %e, "fsync of the push log at shutdown failed");
        }
        for path in std::mem::take(&mut self.unsynced) {
            if path == self.path {
                continue;
            }
            match File::open(&path).and_then(|f| f.sync_data()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "fsync of a push log at shutdown failed");
                }
            }
        }
        if let Err(e) = sync_dir(&self.dir) {
            tracing::error!(error = %e, "fsync of the push folder at shutdown failed");
        }
    }
}

/// What a switch hands the compaction.
struct Switched {
    dead: Vec<Arc<bimip_proto::store::DeadLetter>>,
    rule: ForgetRule,
}
