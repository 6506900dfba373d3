//! The commit log (docs/ARCHITECTURE.md, "Commit log"): with `fsync = batch | always`, each store
//! shard appends the bytes a commit wrote to the users' queue and index files to one log file as
//! well, and a commit is durable once that one sequential file is fdatasynced — one I/O however
//! many users the commit touched. The user files get the same bytes with plain writes and become
//! durable at a checkpoint: the shard starts a new log generation, a checkpoint thread runs one
//! `syncfs` and then keeps the old log's file as the shard's spare (a later generation overwrites
//! it) or deletes it. At start, [`recover`] writes every logged record whose bytes are not in its
//! user file back into that file, syncs, and deletes the logs.
//!
//! Files: `<data_dir>/wal/shard-<n>.<generation>.log`, lines in the store's line format (Base64 of
//! a `bimip.store.v1.LogRecord` and its CRC-32C). A generation's records end at the end of the file,
//! at the first record of another generation (a reused file's older bytes) or at the first zero
//! byte (space written ahead and not used yet); only the line just before that end can be torn (a
//! commit is answered after its fdatasync).
//!
//! A busy shard's logs are written ahead: the checkpoint thread gives each spare
//! [`PREALLOC_BYTES`] of zeros, so a generation overwrites blocks its file already has and each
//! commit's fdatasync is one data write, without the journal commit a growing file needs (about
//! 40% less CPU and time per fdatasync on the disks measured, see docs/BENCHMARKS.md).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bimip_proto::store::{LogFile, LogRecord};

use super::record::{self, LineError};
use super::recovery::{io_err, sync_dir};
use super::{index_path, queue_path};
use crate::StoreError;

/// The folder of the logs.
pub(crate) fn wal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("wal")
}

fn log_name(shard: usize, generation: u64) -> String {
    format!("shard-{shard}.{generation:010}.log")
}

/// `(shard, generation)` of a log's file name.
fn parse_log_name(name: &str) -> Option<(usize, u64)> {
    let rest = name.strip_prefix("shard-")?.strip_suffix(".log")?;
    let (shard, generation) = rest.split_once('.')?;
    Some((shard.parse().ok()?, generation.parse().ok()?))
}

/// A log generation's open file.
pub(crate) struct OpenLog {
    pub file: File,
    pub path: PathBuf,
}

impl OpenLog {
    pub fn sync(&self) -> Result<(), StoreError> {
        self.file.sync_data().map_err(|e| io_err(&self.path, e))
    }
}

/// The recycled file of a checkpointed generation, ready to become a shard's next one
/// (`shard-<n>.spare`). Shared by the shard and its checkpoint thread.
pub(crate) type Spare = Arc<std::sync::Mutex<Option<PathBuf>>>;

fn spare_name(shard: usize) -> String {
    format!("shard-{shard}.spare")
}

/// A commit log generation this large is checkpointed (a new one started, the old one's user
/// files synced, its file recycled or deleted): bounds the log's disk use and the replay at start.
pub(crate) const GENERATION_BYTES: u64 = 32 << 20;

/// What a spare is written ahead to: a full generation plus room for the commit that crosses the
/// limit.
#[cfg(not(test))]
const PREALLOC_BYTES: u64 = GENERATION_BYTES + (1 << 20);
#[cfg(test)]
const PREALLOC_BYTES: u64 = 256 << 10;

/// A generation that grew its file past this is a busy shard's: its spare is written ahead (an
/// idle store, or a test's, never writes 32 MB of zeros).
#[cfg(not(test))]
pub(crate) const PREALLOC_AFTER: u64 = 1 << 20;
#[cfg(test)]
pub(crate) const PREALLOC_AFTER: u64 = 16 << 10;

/// The log one shard appends to.
pub(crate) struct Wal {
    dir: PathBuf,
    shard: usize,
    generation: u64,
    log: Arc<OpenLog>,
    /// Where the next record goes: a recycled file is longer than what this generation wrote.
    len: u64,
    /// The file's length when this generation started: writes below it overwrite blocks the
    /// file has, writes beyond it grow the file.
    allocated: u64,
    /// A written-ahead spare was asked of the checkpoint thread for this generation.
    pub spare_asked: bool,
    opened: Instant,
    spare: Spare,
    /// A write or fdatasync of this generation failed: its state is unknown, the next commit
    /// starts a new generation first.
    pub broken: bool,
}

impl Wal {
    /// Opens a new, empty log for `shard` (after [`recover`] removed the old ones).
    pub fn open(data_dir: &Path, shard: usize) -> Result<Wal, StoreError> {
        let dir = wal_dir(data_dir);
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let (log, generation) = create_log(&dir, shard, 1)?;
        Ok(Wal {
            dir,
            shard,
            generation,
            log: Arc::new(log),
            len: 0,
            allocated: 0,
            spare_asked: false,
            opened: Instant::now(),
            spare: Arc::new(std::sync::Mutex::new(None)),
            broken: false,
        })
    }

    /// Bytes in the current generation.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// This generation writes beyond the end its file had (each fdatasync also commits the
    /// file's new length to the file system's journal).
    pub fn growing(&self) -> bool {
        self.len > self.allocated
    }

    /// A recycled file waits in the spare slot.
    pub fn spare_ready(&self) -> bool {
        self.spare
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The current generation's number (every record carries it).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How long the current generation has been open.
    pub fn age(&self) -> Duration {
        self.opened.elapsed()
    }

    /// The slot the checkpoint thread puts a recycled file in.
    pub fn spare(&self) -> Spare {
        self.spare.clone()
    }

    /// Writes `buf` (whole records of this generation) after the last ones and returns the log
    /// to fdatasync. On failure the log is cut back to where it was, so a partial record never
    /// sits in front of later ones, and the generation is marked broken.
    pub fn append(&mut self, buf: &[u8]) -> Result<Arc<OpenLog>, StoreError> {
        let before = self.len;
        match super::shard::write_at_checked(&self.log.file, &self.log.path, buf, before) {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(self.log.clone())
            }
            Err(e) => {
                if let Err(te) = self.log.file.set_len(before) {
                    tracing::error!(file = %self.log.path.display(), error = %te, "could not cut back a failed commit log write");
                }
                self.broken = true;
                Err(e)
            }
        }
    }

    /// Starts the next generation and returns the previous one (to be checkpointed). The new
    /// generation reuses a recycled file when there is one: overwriting blocks the file already
    /// has makes each fdatasync a data write alone, with no journal commit for a growing file
    /// (and no block discards for a deleted one).
    pub fn rotate(&mut self) -> Result<Arc<OpenLog>, StoreError> {
        let generation = self.generation + 1;
        let spare = self.spare.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (log, generation, allocated) = match spare {
            Some(spare) => {
                let path = self.dir.join(log_name(self.shard, generation));
                let reused = fs::rename(&spare, &path)
                    .and_then(|()| OpenOptions::new().write(true).open(&path))
                    .and_then(|file| Ok((file.metadata()?.len(), file)));
                match reused {
                    Ok((allocated, file)) => {
                        sync_dir(&self.dir)?;
                        (OpenLog { file, path }, generation, allocated)
                    }
                    Err(e) => {
                        tracing::warn!(file = %spare.display(), error = %e, "could not reuse a recycled commit log; creating a new one");
                        let (log, generation) = create_log(&self.dir, self.shard, generation)?;
                        (log, generation, 0)
                    }
                }
            }
            None => {
                let (log, generation) = create_log(&self.dir, self.shard, generation)?;
                (log, generation, 0)
            }
        };
        let old = std::mem::replace(&mut self.log, Arc::new(log));
        self.generation = generation;
        self.len = 0;
        self.allocated = allocated;
        self.spare_asked = false;
        self.opened = Instant::now();
        self.broken = false;
        Ok(old)
    }

    /// The current generation (handed to the checkpoint thread at shutdown).
    pub fn current(&self) -> Arc<OpenLog> {
        self.log.clone()
    }
}

/// Creates the log file of the first free generation from `generation` on and makes its folder
/// entry durable (an fdatasync of the file alone would not).
fn create_log(dir: &Path, shard: usize, mut generation: u64) -> Result<(OpenLog, u64), StoreError> {
    loop {
        let path = dir.join(log_name(shard, generation));
        match OpenOptions::new().create_new(true).write(true).open(&path) {
            Ok(file) => {
                sync_dir(dir)?;
                return Ok((OpenLog { file, path }, generation));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => generation += 1,
            Err(e) => return Err(io_err(&path, e)),
        }
    }
}

/// Appends the record of `data` written at `offset` of one of `user`'s files.
pub(crate) fn encode_write(
    out: &mut Vec<u8>,
    generation: u64,
    user: &str,
    file: LogFile,
    offset: u64,
    data: &[u8],
) {
    record::encode_line_into(
        &LogRecord {
            user: user.to_string(),
            file: file as i32,
            offset,
            data: bytes::Bytes::copy_from_slice(data),
            reset: false,
            generation,
        },
        out,
    );
}

/// Appends the record of `user`'s profile file replaced by `rec`'s line.
pub(crate) fn encode_profile(
    out: &mut Vec<u8>,
    generation: u64,
    user: &str,
    rec: &bimip_proto::store::Profile,
) {
    record::encode_line_into(
        &LogRecord {
            user: user.to_string(),
            file: LogFile::Profile as i32,
            offset: 0,
            data: record::encode_line(rec).into(),
            reset: false,
            generation,
        },
        out,
    );
}

/// The record saying compaction replaced `user`'s files.
pub(crate) fn encode_reset(generation: u64, user: &str) -> Vec<u8> {
    record::encode_line(&LogRecord {
        user: user.to_string(),
        reset: true,
        generation,
        ..LogRecord::default()
    })
}

/// The user files written since the last checkpoint began: the writer thread adds each file it
/// writes, the checkpoint thread takes them (see [`flush_written`]).
pub(crate) type Written = Arc<std::sync::Mutex<HashSet<PathBuf>>>;

/// Runs checkpoints for one shard: one `syncfs` makes every user-file write of the handed-over
/// generations durable, then those logs are recycled (one, as the shard's spare) or deleted. A
/// failed `syncfs` keeps the logs and is retried; logs left at a crash are replayed at the next
/// start. It also writes spares ahead for a busy shard (see [`PREALLOC_BYTES`]).
pub(crate) struct Checkpointer {
    tx: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    spare: Spare,
    shard: usize,
    written: Written,
}

/// What the checkpoint thread is asked to do.
enum Job {
    Checkpoint(Arc<OpenLog>),
    /// Have a written-ahead spare ready (a busy shard's generation is growing its file).
    Spare,
}

/// How long a failed checkpoint waits before it tries again.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(1);

impl Checkpointer {
    pub fn start(data_dir: PathBuf, shard: usize, spare: Spare, written: Written) -> Checkpointer {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let slot = spare.clone();
        let files = written.clone();
        let thread = std::thread::Builder::new()
            .name(format!("bimip-store-checkpoint-{shard}"))
            .spawn(move || {
                let mut pending: Vec<Arc<OpenLog>> = Vec::new();
                loop {
                    let next = if pending.is_empty() {
                        rx.recv().ok()
                    } else {
                        match rx.recv_timeout(CHECKPOINT_RETRY) {
                            Ok(l) => Some(l),
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                                checkpoint(&data_dir, shard, &slot, &files, &mut pending, false);
                                return;
                            }
                        }
                    };
                    if next.is_none() && pending.is_empty() {
                        return;
                    }
                    let mut spare_asked = false;
                    for job in next.into_iter().chain(rx.try_iter()) {
                        match job {
                            Job::Checkpoint(l) => pending.push(l),
                            Job::Spare => spare_asked = true,
                        }
                    }
                    checkpoint(&data_dir, shard, &slot, &files, &mut pending, true);
                    if spare_asked {
                        prepare_spare(&data_dir, shard, &slot);
                    }
                }
            })
            .ok();
        Checkpointer {
            tx: thread.as_ref().map(|_| tx),
            thread,
            spare,
            shard,
            written,
        }
    }

    /// Hands over a finished generation; without a thread, checkpoints here.
    pub fn submit(&self, data_dir: &Path, log: Arc<OpenLog>) {
        let log = match &self.tx {
            Some(tx) => match tx.send(Job::Checkpoint(log)) {
                Ok(()) => return,
                Err(e) => match e.0 {
                    Job::Checkpoint(l) => l,
                    Job::Spare => return,
                },
            },
            None => log,
        };
        checkpoint(
            data_dir,
            self.shard,
            &self.spare,
            &self.written,
            &mut vec![log],
            true,
        );
    }

    /// Asks for a written-ahead spare (nothing without a thread: the shard must not wait for
    /// 32 MB of writes).
    pub fn ask_spare(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Job::Spare);
        }
    }

    /// Hands over the last generation at shutdown and waits for every checkpoint (or its
    /// failure): nothing is recycled, a cleanly stopped store leaves no log behind.
    pub fn finish(&mut self, last: Arc<OpenLog>) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Job::Checkpoint(last));
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let spare = self.spare.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(spare) = spare {
            let _ = fs::remove_file(spare);
        }
    }
}

/// One checkpoint: the user files written since the last one are flushed one at a time, then
/// one `syncfs`, then the logs are recycled (the first, if the shard has no spare) or deleted, in
/// order, and that made durable. A failure keeps the log it failed on and every later one for
/// the next try: a newer log must never outlive an older one of the same shard (its compaction
/// resets assume the older records are gone or replayed first).
fn checkpoint(
    data_dir: &Path,
    shard: usize,
    spare: &Spare,
    written: &Written,
    logs: &mut Vec<Arc<OpenLog>>,
    recycle: bool,
) {
    if logs.is_empty() {
        return;
    }
    // Opened before the files are flushed: a write-back error from then on is reported by this
    // `syncfs`, even one that a file's own flush below has reported already.
    let synced = File::open(data_dir).and_then(|d| {
        flush_written(written);
        rustix::fs::syncfs(&d).map_err(std::io::Error::from)
    });
    if let Err(e) = synced {
        tracing::error!(error = %e, logs = logs.len(), "store checkpoint: syncfs failed; the commit logs are kept and the checkpoint retried");
        return;
    }
    let dir = wal_dir(data_dir);
    let mut done = 0;
    for log in logs.iter() {
        // Only this thread fills the slot: a free slot stays free until it is filled below.
        let free = recycle && spare.lock().unwrap_or_else(|p| p.into_inner()).is_none();
        let r = if free {
            let to = dir.join(spare_name(shard));
            fs::rename(&log.path, &to).map(|()| {
                write_ahead(&to);
                *spare.lock().unwrap_or_else(|p| p.into_inner()) = Some(to);
            })
        } else {
            match fs::remove_file(&log.path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                r => r,
            }
        };
        if let Err(e) = r {
            tracing::error!(file = %log.path.display(), error = %e, "store checkpoint: could not remove a checkpointed commit log; retried");
            break;
        }
        done += 1;
    }
    logs.drain(..done);
    if let Err(e) = sync_dir(&dir) {
        tracing::error!(error = %e, "store checkpoint: fsync of the wal folder failed");
    }
}

/// Flushes the user files written since the last checkpoint, one `fdatasync` at a time, so that
/// the checkpoint's `syncfs` finds little left to write. Only pacing: one `syncfs` over tens of
/// MB of dirty pages holds the disk's queue for up to seconds in front of the commits' log
/// flushes, one small file at a time does not. What makes the checkpoint durable is still the
/// `syncfs` after it, so a file that cannot be opened or flushed here is left to it.
fn flush_written(written: &Written) {
    let files = std::mem::take(&mut *written.lock().unwrap_or_else(|p| p.into_inner()));
    for path in files {
        if let Ok(f) = File::open(&path) {
            let _ = f.sync_data();
        }
    }
}

/// A recycled busy generation's file is filled up to [`PREALLOC_BYTES`] with zeros and synced,
/// before the shard can take it. On failure the file stays as it is (still a usable spare: the
/// generation using it grows the file as a new one would).
fn write_ahead(path: &Path) {
    let filled = OpenOptions::new().write(true).open(path).and_then(|f| {
        let len = f.metadata()?.len();
        if !(PREALLOC_AFTER..PREALLOC_BYTES).contains(&len) {
            return Ok(());
        }
        fill_zeros(&f, len, PREALLOC_BYTES)
    });
    if let Err(e) = filled {
        tracing::warn!(file = %path.display(), error = %e, "could not write a commit log spare ahead; the next generation grows its file");
    }
}

/// Writes zeros from `from` to `to` and syncs them, 1 MB at a time: one 33 MB flush would hold
/// the disk's queue long enough to delay the commits' own log flushes.
fn fill_zeros(f: &File, from: u64, to: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], at)?;
        f.sync_data()?;
        at += n as u64;
    }
    Ok(())
}

/// A busy shard whose generation grows its file gets a new spare written ahead, unless one is
/// already waiting (the shard moves to it at its next commit).
fn prepare_spare(data_dir: &Path, shard: usize, spare: &Spare) {
    if spare.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
        return;
    }
    let dir = wal_dir(data_dir);
    let path = dir.join(spare_name(shard));
    let made = File::create(&path)
        .and_then(|f| fill_zeros(&f, 0, PREALLOC_BYTES))
        .map_err(|e| io_err(&path, e))
        .and_then(|()| sync_dir(&dir));
    match made {
        Ok(()) => *spare.lock().unwrap_or_else(|p| p.into_inner()) = Some(path),
        Err(e) => {
            tracing::warn!(error = %e, "could not write a commit log spare ahead; the current generation keeps growing its file");
            let _ = fs::remove_file(&path);
        }
    }
}

/// One log as found on disk.
struct LogScan {
    path: PathBuf,
    records: Vec<(u64, LogRecord)>,
    /// A bad line followed by good ones: `(line, reason)`.
    bad: Vec<(u64, LineError)>,
    /// A bad or unterminated last line (a write cut short by a crash): `(line, reason)`.
    torn: Option<(u64, String)>,
}

/// The logs under `<data_dir>/wal`, oldest generation first within each shard.
fn scan_logs(data_dir: &Path, remove_spares: bool) -> Result<Vec<LogScan>, StoreError> {
    let dir = wal_dir(data_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&dir, e)),
    };
    let mut logs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_err(&dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(key) = parse_log_name(&name) {
            logs.push((key, entry.path()));
        }
    }
    // The spares (recycled, checkpointed logs) hold nothing to replay.
    if remove_spares {
        for entry in fs::read_dir(&dir).map_err(|e| io_err(&dir, e))? {
            let path = entry.map_err(|e| io_err(&dir, e))?.path();
            if path.extension().is_some_and(|x| x == "spare") {
                fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
            }
        }
    }
    logs.sort();
    let mut scans = Vec::with_capacity(logs.len());
    for ((_, generation), path) in logs {
        let data = fs::read(&path).map_err(|e| io_err(&path, e))?;
        scans.push(scan_log(path, generation, &data));
    }
    Ok(scans)
}

/// Reads one log of `generation`. Its records end at the first record of another generation (a
/// recycled file's older bytes) or at the end of the file; a bad line just before that end is
/// a write cut short, a bad line followed by records of this generation is corruption.
fn scan_log(path: PathBuf, generation: u64, data: &[u8]) -> LogScan {
    let mut scan = LogScan {
        path,
        records: Vec::new(),
        bad: Vec::new(),
        torn: None,
    };
    // Space written ahead and not used yet is zeros, which no line holds.
    let data = match data.iter().position(|&b| b == 0) {
        Some(end) => &data[..end],
        None => data,
    };
    let mut last_bad: Option<(u64, LineError)> = None;
    for line in record::split_lines(data) {
        let decoded = if line.terminated {
            record::decode_line::<LogRecord>(line.bytes)
        } else {
            Err(LineError::Torn)
        };
        match decoded {
            Ok(r) if r.generation != generation => {
                // An older generation's bytes: the end of this one's (a bad line just before
                // is the last write's tail or part of an older line, not worth a word).
                return scan;
            }
            Ok(r) => {
                // A bad line before a good one is not a torn tail.
                scan.bad.extend(last_bad.take());
                scan.records.push((line.number, r));
            }
            Err(e) => {
                scan.bad.extend(last_bad.take());
                last_bad = Some((line.number, e));
            }
        }
    }
    scan.torn = last_bad.map(|(n, e)| (n, e.to_string()));
    scan
}

/// What one record needs to be in its user file.
#[derive(Debug, PartialEq, Eq)]
enum Needed {
    /// The file already holds the bytes at the offset.
    Present,
    /// The file is shorter or holds other bytes there: cut at the offset, write the bytes.
    Write,
    /// The file ends before the offset: bytes in front of the record are missing.
    Gap(u64),
}

fn record_path(data_dir: &Path, r: &LogRecord) -> PathBuf {
    match LogFile::try_from(r.file) {
        Ok(LogFile::Index) => index_path(data_dir, &r.user),
        Ok(LogFile::Profile) => super::profile::profile_path(data_dir, &r.user),
        _ => queue_path(data_dir, &r.user),
    }
}

fn is_profile(r: &LogRecord) -> bool {
    r.file == LogFile::Profile as i32
}

fn needed(path: &Path, r: &LogRecord) -> Result<Needed, StoreError> {
    if is_profile(r) {
        return Ok(match fs::read(path) {
            Ok(d) if d[..] == r.data[..] => Needed::Present,
            Ok(_) => Needed::Write,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Needed::Write,
            Err(e) => return Err(io_err(path, e)),
        });
    }
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(if r.offset == 0 {
                Needed::Write
            } else {
                Needed::Gap(0)
            });
        }
        Err(e) => return Err(io_err(path, e)),
    };
    let len = f.metadata().map_err(|e| io_err(path, e))?.len();
    if len < r.offset {
        return Ok(Needed::Gap(len));
    }
    if len < r.offset + r.data.len() as u64 {
        return Ok(Needed::Write);
    }
    let mut buf = vec![0u8; r.data.len()];
    f.read_exact_at(&mut buf, r.offset)
        .map_err(|e| io_err(path, e))?;
    Ok(if buf[..] == r.data[..] {
        Needed::Present
    } else {
        Needed::Write
    })
}

/// Puts a record's bytes into its file (folders created as needed; the `syncfs` after the
/// replay makes files and folders durable).
fn write_record(path: &Path, r: &LogRecord) -> Result<(), StoreError> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    }
    if is_profile(r) {
        // Replaced whole, as the store does (made durable by the syncfs after the replay).
        let tmp = super::profile::temp_path(path);
        fs::write(&tmp, &r.data).map_err(|e| io_err(&tmp, e))?;
        return fs::rename(&tmp, path).map_err(|e| io_err(path, e));
    }
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    f.set_len(r.offset).map_err(|e| io_err(path, e))?;
    f.write_all_at(&r.data, r.offset)
        .map_err(|e| io_err(path, e))
}

/// What [`recover`] (or `bimip check`) found in the commit logs.
#[derive(Debug, Clone, Default)]
pub struct LogReport {
    pub logs: usize,
    pub records: u64,
    /// Records whose bytes were not (or are not yet, for a check) in their user file.
    pub missing: u64,
    /// Users those records belong to.
    pub users: usize,
}

/// Every record still to apply, in order: a user's records before its last reset are dropped.
fn live_records(scans: &[LogScan]) -> Vec<(&Path, u64, &LogRecord)> {
    let mut last_reset: HashMap<&str, (usize, usize)> = HashMap::new();
    for (li, s) in scans.iter().enumerate() {
        for (ri, (_, r)) in s.records.iter().enumerate() {
            if r.reset {
                last_reset.insert(r.user.as_str(), (li, ri));
            }
        }
    }
    let mut out = Vec::new();
    for (li, s) in scans.iter().enumerate() {
        for (ri, (line, r)) in s.records.iter().enumerate() {
            if r.reset {
                continue;
            }
            // Compaction leaves profiles alone.
            if !is_profile(r)
                && last_reset
                    .get(r.user.as_str())
                    .is_some_and(|&at| (li, ri) < at)
            {
                continue;
            }
            out.push((s.path.as_path(), *line, r));
        }
    }
    out
}

/// At start, before the user files are loaded: writes every logged record whose bytes are not
/// in its user file into it, makes that durable with one `syncfs`, and deletes the logs. A torn
/// last line is ignored (its commit was never answered). A bad line in the middle of a log, or a
/// record that would leave a gap in its file, refuses the start unless `repair`; with `repair`
/// they are skipped and reported, and that log is kept aside as `<name>.bad`.
pub(crate) fn recover(
    data_dir: &Path,
    repair: bool,
    truncated: &mut Vec<(PathBuf, u64, String)>,
    repaired: &mut Vec<(PathBuf, u64, String)>,
) -> Result<LogReport, StoreError> {
    let scans = scan_logs(data_dir, true)?;
    let mut report = LogReport {
        logs: scans.len(),
        ..LogReport::default()
    };
    if scans.is_empty() {
        return Ok(report);
    }
    let mut keep_aside: HashSet<PathBuf> = HashSet::new();
    for s in &scans {
        if let Some((line, reason)) = &s.torn {
            truncated.push((
                s.path.clone(),
                *line,
                format!("torn last record ignored: {reason}"),
            ));
        }
        for (line, e) in &s.bad {
            if !repair {
                return Err(StoreError::Corrupt {
                    path: s.path.clone(),
                    line: *line,
                    reason: format!("{e} (start with --repair to skip it; the log is kept aside)"),
                });
            }
            repaired.push((
                s.path.clone(),
                *line,
                format!("bad commit log record skipped: {e}"),
            ));
            keep_aside.insert(s.path.clone());
        }
    }
    let mut users = HashSet::new();
    for (log, line, r) in live_records(&scans) {
        report.records += 1;
        let path = record_path(data_dir, r);
        match needed(&path, r)? {
            Needed::Present => {}
            Needed::Write => {
                write_record(&path, r)?;
                report.missing += 1;
                users.insert(r.user.clone());
            }
            Needed::Gap(len) => {
                let reason = format!(
                    "record for {} at offset {} but the file has {len} bytes",
                    path.display(),
                    r.offset
                );
                if !repair {
                    return Err(StoreError::Corrupt {
                        path: log.to_path_buf(),
                        line,
                        reason: format!("{reason} (start with --repair to skip it)"),
                    });
                }
                repaired.push((log.to_path_buf(), line, format!("skipped: {reason}")));
                keep_aside.insert(log.to_path_buf());
            }
        }
    }
    report.users = users.len();
    if report.missing > 0 {
        super::profile::syncfs(data_dir).map_err(|e| io_err(data_dir, e))?;
    }
    for s in &scans {
        if keep_aside.contains(&s.path) {
            let mut aside = s.path.clone().into_os_string();
            aside.push(".bad");
            fs::rename(&s.path, &aside).map_err(|e| io_err(&s.path, e))?;
        } else {
            fs::remove_file(&s.path).map_err(|e| io_err(&s.path, e))?;
        }
    }
    sync_dir(&wal_dir(data_dir))?;
    if report.missing > 0 {
        tracing::warn!(
            logs = report.logs,
            records = report.records,
            written = report.missing,
            users = report.users,
            "commit log: wrote back records the user files were missing (the server or the machine stopped without a graceful stop)"
        );
    }
    Ok(report)
}

/// `bimip check`: the logs' lines, and how many records are not (yet) in their user files.
/// Without `repair` nothing is written; with it the logs are applied as at start.
pub(crate) fn check(
    data_dir: &Path,
    repair: bool,
    report: &mut super::CheckReport,
) -> Result<(), StoreError> {
    if repair {
        let mut truncated = Vec::new();
        let mut repaired = Vec::new();
        let r = recover(data_dir, true, &mut truncated, &mut repaired)?;
        for (path, line, reason) in truncated {
            report.notes.push(super::Problem { path, line, reason });
        }
        for (path, line, reason) in repaired {
            report.found(&path, line, reason, true);
        }
        // Writing the log back is what every start does, not a repair of damage: a note.
        if r.missing > 0 {
            report.notes.push(super::Problem {
                path: wal_dir(data_dir),
                line: 0,
                reason: format!(
                    "wrote {} commit-log records of {} users back into their files (as a start does)",
                    r.missing, r.users
                ),
            });
        }
        return Ok(());
    }
    let scans = scan_logs(data_dir, false)?;
    let mut missing = 0u64;
    let mut users = HashSet::new();
    for s in &scans {
        report.records += s.records.len() as u64;
        if let Some((line, reason)) = &s.torn {
            report.notes.push(super::Problem {
                path: s.path.clone(),
                line: *line,
                reason: format!("torn last record (a commit cut short, never answered): {reason}"),
            });
        }
        for (line, e) in &s.bad {
            report.found(&s.path, *line, format!("bad commit log record: {e}"), false);
        }
    }
    // What the files' lengths would be once the missing records are written (nothing is).
    let mut would_be: HashMap<PathBuf, u64> = HashMap::new();
    for (log, line, r) in live_records(&scans) {
        let path = record_path(data_dir, r);
        let need = match would_be.get(&path) {
            _ if is_profile(r) => needed(&path, r)?,
            Some(&len) if len < r.offset => Needed::Gap(len),
            Some(_) => Needed::Write,
            None => needed(&path, r)?,
        };
        match need {
            Needed::Present => {}
            Needed::Write => {
                missing += 1;
                users.insert(r.user.as_str());
                would_be.insert(path, r.offset + r.data.len() as u64);
            }
            Needed::Gap(len) => report.found(
                log,
                line,
                format!(
                    "record for {} at offset {} but the file has {len} bytes",
                    path.display(),
                    r.offset
                ),
                false,
            ),
        }
    }
    if missing > 0 {
        report.notes.push(super::Problem {
            path: wal_dir(data_dir),
            line: 0,
            reason: format!(
                "{missing} commit-log records of {} users are not in their files yet: the next start writes them (so does `bimip check --repair`)",
                users.len()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A temporary data dir with an empty `wal/` folder: (dir, data dir, wal folder).
    fn data_dir() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let wal = wal_dir(&d);
        fs::create_dir_all(&wal).unwrap();
        (dir, d, wal)
    }

    #[test]
    fn the_files_written_since_a_checkpoint_are_flushed_and_forgotten_even_if_gone() {
        let (_dir, d, _wal) = data_dir();
        let q = alice_queue(&d, b"line\n");
        let written = Written::default();
        written
            .lock()
            .unwrap()
            .extend([q.clone(), d.join("deleted-meanwhile.dat")]);
        flush_written(&written);
        assert!(written.lock().unwrap().is_empty());
        assert_eq!(fs::read(&q).unwrap(), b"line\n");
    }

    /// Writes `data` as alice's queue file (its folder created).
    fn alice_queue(d: &Path, data: &[u8]) -> PathBuf {
        let q = queue_path(d, "alice");
        fs::create_dir_all(q.parent().unwrap()).unwrap();
        fs::write(&q, data).unwrap();
        q
    }

    /// A record of generation 1 (the tests' logs are `log_name(_, 1)` unless said otherwise).
    fn rec(user: &str, file: LogFile, offset: u64, data: &[u8]) -> Vec<u8> {
        rec_of(1, user, file, offset, data)
    }

    fn rec_of(generation: u64, user: &str, file: LogFile, offset: u64, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_write(&mut out, generation, user, file, offset, data);
        out
    }

    proptest::proptest! {
        #[test]
        fn scanning_any_bytes_never_panics(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000),
            generation in 0u64..4,
        ) {
            let s = scan_log(PathBuf::from("l"), generation, &bytes);
            proptest::prop_assert!(s.records.iter().all(|(_, r)| r.generation == generation));
        }

        /// Whatever prefix of a user file survived, and whatever wrong bytes follow it, the replay
        /// makes the file exactly what the running store wrote.
        #[test]
        fn replay_restores_any_cut_file(
            lines in proptest::collection::vec("[a-z0-9]{0,40}", 1..20),
            cut in 0.0f64..=1.0,
            garbage in 0.0f64..=1.0,
        ) {
            let (_dir, d, wal) = data_dir();
            let mut full = Vec::new();
            let mut log = Vec::new();
            for l in &lines {
                let line = format!("{l}\n").into_bytes();
                log.extend(rec("alice", LogFile::Queue, full.len() as u64, &line));
                full.extend_from_slice(&line);
            }
            let c = ((full.len() as f64) * cut) as usize;
            let g = (((full.len() - c) as f64) * garbage) as usize;
            let mut on_disk = full[..c].to_vec();
            on_disk.extend(full[c..c + g].iter().map(|b| b ^ 0x55));
            let q = alice_queue(&d, &on_disk);
            fs::write(wal.join(log_name(0, 1)), &log).unwrap();
            let (mut t, mut r) = (Vec::new(), Vec::new());
            let rep = recover(&d, false, &mut t, &mut r).unwrap();
            proptest::prop_assert_eq!(fs::read(&q).unwrap(), full);
            proptest::prop_assert_eq!(rep.records, lines.len() as u64);
        }
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_log_name(&log_name(3, 42)), Some((3, 42)));
        assert_eq!(parse_log_name("shard-1.0000000001.log.bad"), None);
        assert_eq!(parse_log_name("other.log"), None);
    }

    #[test]
    fn torn_tail_and_bad_middle_are_told_apart() {
        let mut data = rec("a", LogFile::Queue, 0, b"x\n");
        data.extend_from_slice(b"not base64!\n");
        data.extend(rec("a", LogFile::Queue, 2, b"y\n"));
        data.extend_from_slice(b"QUJD");
        let s = scan_log(PathBuf::from("l"), 1, &data);
        assert_eq!(s.records.len(), 2);
        assert_eq!(s.bad.len(), 1);
        assert_eq!(s.bad[0].0, 2);
        assert_eq!(s.torn.as_ref().map(|t| t.0), Some(4));
    }

    #[test]
    fn a_recycled_file_ends_where_the_older_generation_starts() {
        // Generation 5 overwrote the start of generation 3's file; its last write was cut
        // short in the middle of an older line.
        let mut data = rec_of(5, "a", LogFile::Queue, 0, b"new\n");
        let old = rec_of(3, "a", LogFile::Queue, 0, b"older-and-longer\n");
        data.extend_from_slice(&old[old.len() / 2..]);
        data.extend(rec_of(3, "a", LogFile::Queue, 17, b"x\n"));
        let s = scan_log(PathBuf::from("l"), 5, &data);
        assert_eq!(s.records.len(), 1);
        assert!(s.bad.is_empty());
        assert!(s.torn.is_none());
    }

    #[test]
    fn space_written_ahead_ends_the_records() {
        // Two records, then the zeros of a file written ahead; a write cut short over them
        // leaves a torn line, never a bad one.
        let mut data = rec("a", LogFile::Queue, 0, b"x\n");
        data.extend(rec("a", LogFile::Queue, 2, b"y\n"));
        data.extend(vec![0u8; 4096]);
        let s = scan_log(PathBuf::from("l"), 1, &data);
        assert_eq!(s.records.len(), 2);
        assert!(
            s.bad.is_empty() && s.torn.is_none(),
            "{:?} {:?}",
            s.bad,
            s.torn
        );
        let next = rec("a", LogFile::Queue, 4, b"z\n");
        let at = data.len() - 4096;
        data[at..at + next.len() / 2].copy_from_slice(&next[..next.len() / 2]);
        let s = scan_log(PathBuf::from("l"), 1, &data);
        assert_eq!(s.records.len(), 2);
        assert!(s.bad.is_empty());
        assert_eq!(s.torn.as_ref().map(|t| t.0), Some(3));
    }

    #[test]
    fn replay_writes_what_the_files_lost_and_skips_what_they_have() {
        let (_dir, d, wal) = data_dir();
        let d = d.as_path();
        // The file kept the first record but lost (part of) the second.
        let q = alice_queue(d, b"first\nsec");
        let mut log = rec("alice", LogFile::Queue, 0, b"first\n");
        log.extend(rec("alice", LogFile::Queue, 6, b"second\n"));
        log.extend(rec("bob", LogFile::Index, 0, b"cursor\n"));
        fs::write(wal.join(log_name(0, 1)), &log).unwrap();
        let (mut t, mut r) = (Vec::new(), Vec::new());
        let rep = recover(d, false, &mut t, &mut r).unwrap();
        assert_eq!((rep.records, rep.missing, rep.users), (3, 2, 2));
        assert_eq!(fs::read(&q).unwrap(), b"first\nsecond\n");
        assert_eq!(fs::read(index_path(d, "bob")).unwrap(), b"cursor\n");
        assert_eq!(fs::read_dir(&wal).unwrap().count(), 0);
        // Nothing left to do the second time.
        let rep = recover(d, false, &mut t, &mut r).unwrap();
        assert_eq!(rep.records, 0);
    }

    #[test]
    fn records_before_a_reset_are_not_replayed() {
        let (_dir, d, wal) = data_dir();
        let d = d.as_path();
        let q = alice_queue(d, b"compacted\n");
        let mut log = rec("alice", LogFile::Queue, 0, b"old-old-old-old\n");
        log.extend(encode_reset(1, "alice"));
        fs::write(wal.join(log_name(0, 1)), &log).unwrap();
        fs::write(
            wal.join(log_name(0, 2)),
            rec_of(2, "alice", LogFile::Queue, 10, b"new\n"),
        )
        .unwrap();
        let (mut t, mut r) = (Vec::new(), Vec::new());
        let rep = recover(d, false, &mut t, &mut r).unwrap();
        assert_eq!((rep.records, rep.missing), (1, 1));
        assert_eq!(fs::read(&q).unwrap(), b"compacted\nnew\n");
    }

    #[test]
    fn a_bad_middle_line_refuses_the_start_unless_repair() {
        let (_dir, d, wal) = data_dir();
        let d = d.as_path();
        let mut log = rec_of(7, "alice", LogFile::Queue, 0, b"a\n");
        log.extend_from_slice(b"@@@@\n");
        log.extend(rec_of(7, "alice", LogFile::Queue, 2, b"b\n"));
        let path = wal.join(log_name(1, 7));
        fs::write(&path, &log).unwrap();
        let (mut t, mut r) = (Vec::new(), Vec::new());
        let err = recover(d, false, &mut t, &mut r).unwrap_err();
        assert!(matches!(&err, StoreError::Corrupt { line: 2, .. }), "{err}");
        let mut report = super::super::CheckReport::default();
        check(d, false, &mut report).unwrap();
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.reason.contains("2 commit-log records"))
        );
        let rep = recover(d, true, &mut t, &mut r).unwrap();
        assert_eq!(rep.missing, 2);
        assert_eq!(fs::read(queue_path(d, "alice")).unwrap(), b"a\nb\n");
        assert!(wal.join(format!("{}.bad", log_name(1, 7))).exists());
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn a_gap_is_reported_not_filled() {
        let (_dir, d, wal) = data_dir();
        let d = d.as_path();
        fs::write(
            wal.join(log_name(0, 1)),
            rec("alice", LogFile::Queue, 100, b"late\n"),
        )
        .unwrap();
        let (mut t, mut r) = (Vec::new(), Vec::new());
        assert!(recover(d, false, &mut t, &mut r).is_err());
        let rep = recover(d, true, &mut t, &mut r).unwrap();
        assert_eq!(rep.missing, 0);
        assert!(!queue_path(d, "alice").exists());
    }
}
