//! Snapshots of the push state, and compaction: once the writer has started log N+1 (every
//! later record goes there), snapshot N+1 is written from memory in chunks, each taken under the
//! state lock for a moment, so writers wait for one chunk at most. The snapshot is written to
//! `snapshot-<N+1>.dat.tmp`, fsynced, renamed, and the folder fsynced; only then are snapshot N
//! and log N deleted.
//!
//! The chunks are taken at different moments, so the snapshot is not the state of one instant:
//! each entry is as it was when its chunk was taken, at or after the switch. Replaying log N+1
//! over it still gives the right state because every record assigns (see `state.rs`): an entry
//! changed after the switch has that change in log N+1, and the replay sets it again. Dead
//! letters (appended, not assigned) are taken in one piece at the switch itself.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bimip_proto::store::{DeadLetter, PushRecord, push_record::Change};

use super::Shared;
use super::layout::{remove_older, snapshot_path};
use super::state::{ForgetRule, SnapCursor};
use crate::StoreError;
use crate::file::profile::temp_path;
use crate::file::record::encode_line_into;
use crate::file::recovery::{io_err, sync_dir};

/// Records taken per hold of the state lock: about half a millisecond each (measured with 100k
/// devices, 100k jobs and 100k tombstones; one copy of it all would hold the lock for 0.46 s).
pub(crate) const CHUNK: usize = 512;

/// Writes snapshot `n` into `dir`: the records `next_chunk` hands out (it returns `true` with
/// the last chunk), then `dead`, oldest first. Returns the file's size. On error the temporary
/// file is removed and nothing else changed.
pub(crate) fn write_snapshot(
    dir: &Path,
    n: u64,
    mut next_chunk: impl FnMut(&mut Vec<PushRecord>) -> Result<bool, StoreError>,
    dead: &[Arc<DeadLetter>],
) -> Result<u64, StoreError> {
    let path = snapshot_path(dir, n);
    let tmp = temp_path(&path);
    let result = (|| {
        let file = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let mut bytes = 0u64;
        let mut recs = Vec::with_capacity(CHUNK + 16);
        let mut line = Vec::with_capacity(512);
        let mut put = |w: &mut BufWriter<File>, rec: &PushRecord| {
            line.clear();
            encode_line_into(rec, &mut line);
            bytes += line.len() as u64;
            w.write_all(&line).map_err(|e| io_err(&tmp, e))
        };
        loop {
            recs.clear();
            let done = next_chunk(&mut recs)?;
            for r in &recs {
                put(&mut w, r)?;
            }
            if done {
                break;
            }
        }
        for d in dead {
            let rec = PushRecord {
                change: Some(Change::DeadLetter((**d).clone())),
            };
            put(&mut w, &rec)?;
        }
        let file = w.into_inner().map_err(|e| io_err(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| io_err(&tmp, e))?;
        drop(file);
        #[cfg(test)]
        crate::file::shard::fault::before_rename(&path)?;
        std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
        Ok(bytes)
    })();
    match result {
        Ok(bytes) => {
            sync_dir(dir)?;
            Ok(bytes)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// What one compaction did (logged by the writer).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Compacted {
    pub log: u64,
    pub bytes: u64,
    pub took: Duration,
    /// The longest the state lock was held for one chunk, and all chunks together.
    pub longest_hold: Duration,
    pub total_hold: Duration,
    pub chunks: usize,
    pub forgotten_tombstones: usize,
}

/// One compaction, run on its own thread (the writer goes on appending to the new log).
pub(crate) struct Compaction {
    pub shared: Weak<Shared>,
    pub dir: std::path::PathBuf,
    /// The new log's number, which the snapshot gets too.
    pub log: u64,
    /// The dead letters at the switch.
    pub dead: Vec<Arc<DeadLetter>>,
    pub rule: ForgetRule,
    /// Set by the writer to give up between two chunks (shutdown).
    pub abort: Arc<AtomicBool>,
}

impl Compaction {
    pub fn run(self) -> Result<Compacted, StoreError> {
        let started = Instant::now();
        let mut cur = SnapCursor::Devices(None);
        let (mut longest_hold, mut total_hold, mut chunks) = (Duration::ZERO, Duration::ZERO, 0);
        let bytes = write_snapshot(
            &self.dir,
            self.log,
            |out| {
                if self.abort.load(Ordering::Acquire) {
                    return Err(StoreError::Closed);
                }
                let shared = self.shared.upgrade().ok_or(StoreError::Closed)?;
                let now = shared.clock.now();
                let mut g = shared.lock();
                let t = Instant::now();
                g.state.snapshot_chunk(&mut cur, CHUNK, self.rule, now, out);
                let held = t.elapsed();
                drop(g);
                longest_hold = longest_hold.max(held);
                total_hold += held;
                chunks += 1;
                Ok(cur == SnapCursor::Done)
            },
            &self.dead,
        )?;
        // Snapshot N+1 is in place: snapshot N and log N (and anything older a crash left
        // behind) are no longer read.
        remove_older(&self.dir, self.log)?;
        sync_dir(&self.dir)?;
        let mut done = Compacted {
            log: self.log,
            bytes,
            took: started.elapsed(),
            longest_hold,
            total_hold,
            chunks,
            forgotten_tombstones: 0,
        };
        if let Some(shared) = self.shared.upgrade() {
            let mut g = shared.lock();
            done.forgotten_tombstones = g.state.forget_tombstones(self.rule);
            g.last_compaction = Some(done);
        }
        Ok(done)
    }
}
