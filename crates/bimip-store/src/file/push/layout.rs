//! The files of `<data_dir>/push/`: `snapshot-<N>.dat` (the whole state when log N began) and
//! `log-<N>.dat` (every change from then on), and which of them a start reads.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::StoreError;
use crate::file::recovery::io_err;

pub(crate) fn push_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("push")
}

pub(crate) fn log_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("log-{n}.dat"))
}

pub(crate) fn snapshot_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("snapshot-{n}.dat"))
}

/// What a file name in the push folder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Snapshot(u64),
    Log(u64),
    /// A snapshot being written (`snapshot-<N>.dat.tmp`), or a repair's temporary file.
    Temp,
    /// Anything else (originals kept aside by a repair, files of an operator): left alone.
    Other,
}

fn number(s: &str) -> Option<u64> {
    // Only the canonical spelling, so no two names mean the same number.
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    s.parse().ok()
}

fn kind_of(name: &str) -> Kind {
    if name.ends_with(".tmp") {
        return Kind::Temp;
    }
    let Some(stem) = name.strip_suffix(".dat") else {
        return Kind::Other;
    };
    if let Some(n) = stem.strip_prefix("snapshot-").and_then(number) {
        return Kind::Snapshot(n);
    }
    if let Some(n) = stem.strip_prefix("log-").and_then(number) {
        return Kind::Log(n);
    }
    Kind::Other
}

/// The push folder as found, and what a start makes of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Whether `push/` exists at all.
    pub exists: bool,
    /// The newest snapshot: the state a start begins from.
    pub snapshot: Option<u64>,
    /// The logs replayed over it, in order: every log from the snapshot's number on (from the
    /// oldest log when there is no snapshot).
    pub logs: Vec<u64>,
    /// Numbers missing from that sequence (a log lost, or no snapshot before the first log):
    /// the changes they held are gone.
    pub gaps: Vec<PathBuf>,
    /// Older snapshots and logs, superseded by `snapshot` (a compaction stopped before it
    /// deleted them).
    pub superseded: Vec<PathBuf>,
    /// Temporary files (a snapshot or a repair cut short before its rename).
    pub temps: Vec<PathBuf>,
}

impl Layout {
    /// Lists `dir` (an absent folder is an empty layout).
    pub fn scan(dir: &Path) -> Result<Layout, StoreError> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Layout::default()),
            Err(e) => return Err(io_err(dir, e)),
        };
        let mut snapshots = Vec::new();
        let mut logs = Vec::new();
        let mut out = Layout {
            exists: true,
            ..Layout::default()
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_err(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            match kind_of(&name) {
                Kind::Snapshot(n) => snapshots.push(n),
                Kind::Log(n) => logs.push(n),
                Kind::Temp => out.temps.push(entry.path()),
                Kind::Other => {}
            }
        }
        snapshots.sort_unstable();
        logs.sort_unstable();
        out.temps.sort();
        out.snapshot = snapshots.last().copied();
        // Without a snapshot, the history must start at log 1.
        let first = out.snapshot.unwrap_or(1);
        for &n in &snapshots {
            if Some(n) != out.snapshot {
                out.superseded.push(snapshot_path(dir, n));
            }
        }
        let mut expect = first;
        for &n in &logs {
            if n < first {
                out.superseded.push(log_path(dir, n));
                continue;
            }
            while expect < n {
                out.gaps.push(log_path(dir, expect));
                expect += 1;
            }
            out.logs.push(n);
            expect = n + 1;
        }
        Ok(out)
    }

    /// The files a start reads, in order, with their numbers: the snapshot, then the logs.
    pub fn files(&self, dir: &Path) -> Vec<(u64, PathBuf)> {
        self.snapshot
            .map(|k| (k, snapshot_path(dir, k)))
            .into_iter()
            .chain(self.logs.iter().map(|&n| (n, log_path(dir, n))))
            .collect()
    }

    /// The log new records go to: the newest one, or the first of a fresh history.
    pub fn current_log(&self) -> u64 {
        self.logs
            .last()
            .copied()
            .unwrap_or_else(|| self.snapshot.unwrap_or(1))
    }
}

/// Removes every snapshot and log numbered below `n` (after snapshot `n` is in place).
pub(crate) fn remove_older(dir: &Path, n: u64) -> Result<usize, StoreError> {
    let entries = fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let old = match kind_of(&name) {
            Kind::Snapshot(k) | Kind::Log(k) => k < n,
            Kind::Temp | Kind::Other => false,
        };
        if old {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path, e)),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn layout(names: &[&str]) -> Layout {
        let dir = tempfile::tempdir().unwrap();
        for n in names {
            std::fs::write(dir.path().join(n), b"").unwrap();
        }
        let mut l = Layout::scan(dir.path()).unwrap();
        // Compare names only.
        let strip = |v: &mut Vec<PathBuf>| {
            for p in v.iter_mut() {
                *p = PathBuf::from(p.file_name().unwrap());
            }
        };
        strip(&mut l.gaps);
        strip(&mut l.superseded);
        strip(&mut l.temps);
        l.superseded.sort();
        l
    }

    #[test]
    fn names() {
        assert_eq!(kind_of("log-1.dat"), Kind::Log(1));
        assert_eq!(kind_of("snapshot-12.dat"), Kind::Snapshot(12));
        assert_eq!(kind_of("snapshot-12.dat.tmp"), Kind::Temp);
        assert_eq!(kind_of("log-01.dat"), Kind::Other);
        assert_eq!(kind_of("log-.dat"), Kind::Other);
        assert_eq!(kind_of("log-1.dat.corrupt-1700000000000"), Kind::Other);
        assert_eq!(kind_of("log-+1.dat"), Kind::Other);
    }

    #[test]
    fn fresh_and_plain_histories() {
        let l = layout(&[]);
        assert_eq!(
            (l.snapshot, l.logs.clone(), l.current_log()),
            (None, vec![], 1)
        );
        let l = layout(&["log-1.dat", "log-2.dat"]);
        assert_eq!(
            (l.snapshot, l.logs.clone(), l.gaps.len()),
            (None, vec![1, 2], 0)
        );
        let l = layout(&["snapshot-3.dat", "log-3.dat", "log-4.dat"]);
        assert_eq!((l.snapshot, l.logs.clone()), (Some(3), vec![3, 4]));
        assert_eq!(l.current_log(), 4);
    }

    #[test]
    fn interrupted_compactions() {
        // Log 4 begun, snapshot 4 not written yet: snapshot 3 + logs 3 and 4.
        let l = layout(&[
            "snapshot-3.dat",
            "log-3.dat",
            "log-4.dat",
            "snapshot-4.dat.tmp",
        ]);
        assert_eq!((l.snapshot, l.logs.clone()), (Some(3), vec![3, 4]));
        assert_eq!(l.temps, vec![PathBuf::from("snapshot-4.dat.tmp")]);
        // Snapshot 4 in place, the old files not deleted yet.
        let l = layout(&["snapshot-3.dat", "log-3.dat", "log-4.dat", "snapshot-4.dat"]);
        assert_eq!((l.snapshot, l.logs.clone()), (Some(4), vec![4]));
        assert_eq!(
            l.superseded,
            vec![PathBuf::from("log-3.dat"), PathBuf::from("snapshot-3.dat")]
        );
        assert!(l.gaps.is_empty());
    }

    #[test]
    fn gaps() {
        let l = layout(&["snapshot-3.dat", "log-3.dat", "log-5.dat"]);
        assert_eq!(l.gaps, vec![PathBuf::from("log-4.dat")]);
        assert_eq!(l.logs, vec![3, 5]);
        // The snapshot lost: logs that do not start at 1.
        let l = layout(&["log-4.dat"]);
        assert_eq!(l.gaps.len(), 3);
        // Snapshot 4 without log 4.
        let l = layout(&["snapshot-4.dat", "log-5.dat"]);
        assert_eq!(l.gaps, vec![PathBuf::from("log-4.dat")]);
    }
}
