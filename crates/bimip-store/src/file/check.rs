//! Offline verification of a whole data dir (`bimip check`): every user folder's name and prefix,
//! every line's Base64, CRC and protobuf, offset monotonicity, the index's consistency with the
//! queue and the profile files. With `repair`, what start-up recovery would fix is fixed the same
//! way (torn tails cut, files with bad lines rewritten without them and the original kept aside,
//! corrupt profiles moved aside); nothing is deleted. The push files are checked too (see
//! `push::recovery::check_push`).

use std::fs;
use std::path::{Path, PathBuf};

use bimip_proto::store::{IndexRecord, QueueRecord, QueueRecordKind};
use bimip_proto::v1::{Partition, ReceiptKind};

use super::profile::{self, Recovered, profile_path, temp_path};
use super::recovery::{Checked, check, io_err, queue_semantics, read_or_empty, rewrite, truncate};
use super::{index_path, queue_path, user_dir};
use crate::StoreError;

/// One finding: `file:line: reason` (line 0 = the file or folder as a whole).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub path: PathBuf,
    pub line: u64,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.reason)
    }
}

/// What [`check_data_dir`] found.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub users: usize,
    /// Good records (lines) in queue, index and profile files.
    pub records: u64,
    /// Problems that remain.
    pub problems: Vec<Problem>,
    /// Problems found and fixed by `repair`.
    pub repaired: Vec<Problem>,
    /// Harmless findings (e.g. a compaction's temporary file, removed at the next start).
    pub notes: Vec<Problem>,
}

impl CheckReport {
    pub(super) fn found(&mut self, path: &Path, line: u64, reason: impl Into<String>, fixed: bool) {
        let p = Problem {
            path: path.to_path_buf(),
            line,
            reason: reason.into(),
        };
        if fixed {
            self.repaired.push(p);
        } else {
            self.problems.push(p);
        }
    }
}

/// Checks every user's files under `data_dir` (see the module docs). Run `repair` only while no
/// server uses the data dir; without it nothing is written.
pub fn check_data_dir(data_dir: &Path, repair: bool) -> Result<CheckReport, StoreError> {
    let mut report = CheckReport::default();
    if !data_dir.is_dir() {
        return Err(io_err(
            data_dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such data dir"),
        ));
    }
    // The commit logs first: with `repair` they are written into the user files checked next.
    super::wal::check(data_dir, repair, &mut report)?;
    check_users(data_dir, repair, &mut report)?;
    super::push::check_push(data_dir, repair, bimip_proto::now_ms(), &mut report)?;
    report.problems.sort();
    report.repaired.sort();
    Ok(report)
}

/// Every user folder under `<data_dir>/bimip/`.
fn check_users(data_dir: &Path, repair: bool, report: &mut CheckReport) -> Result<(), StoreError> {
    let root = data_dir.join("bimip");
    if !root.is_dir() {
        return Ok(());
    }
    let mut prefixes: Vec<_> = fs::read_dir(&root)
        .map_err(|e| io_err(&root, e))?
        .filter_map(Result::ok)
        .collect();
    prefixes.sort_by_key(|e| e.file_name());
    for prefix in prefixes {
        let pdir = prefix.path();
        if !prefix.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            report.notes.push(Problem {
                path: pdir,
                line: 0,
                reason: "not a prefix folder; ignored".into(),
            });
            continue;
        }
        let mut entries: Vec<_> = fs::read_dir(&pdir)
            .map_err(|e| io_err(&pdir, e))?
            .filter_map(Result::ok)
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                report.notes.push(Problem {
                    path,
                    line: 0,
                    reason: "not a user folder; ignored".into(),
                });
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if bimip_proto::validate_user_id(&name).is_err() {
                report.found(&path, 0, format!("{name:?} is not a valid user id"), false);
                continue;
            }
            if user_dir(data_dir, &name) != path {
                let want = user_dir(data_dir, &name);
                report.found(
                    &path,
                    0,
                    format!("user {name:?} belongs in {}", want.display()),
                    false,
                );
                continue;
            }
            report.users += 1;
            check_user(data_dir, &name, repair, report)?;
        }
    }
    Ok(())
}

/// Reports a checked file's bad lines and torn tail; with `repair`, fixes them.
fn settle<M>(
    path: &Path,
    data: &[u8],
    checked: &Checked<M>,
    repair: bool,
    report: &mut CheckReport,
) -> Result<(), StoreError> {
    let fixed = repair && (!checked.bad.is_empty() || checked.torn.is_some());
    if fixed {
        if checked.bad.is_empty() {
            if let Some((_, start, _)) = &checked.torn {
                truncate(path, *start)?;
            }
        } else {
            rewrite(path, data, checked)?;
        }
    }
    for (line, reason) in &checked.bad {
        report.found(path, *line, reason.clone(), fixed);
    }
    if let Some((line, _, reason)) = &checked.torn {
        report.found(
            path,
            *line,
            format!("torn or corrupt last line: {reason}"),
            fixed,
        );
    }
    Ok(())
}

fn check_user(
    data_dir: &Path,
    user: &str,
    repair: bool,
    report: &mut CheckReport,
) -> Result<(), StoreError> {
    let qp = queue_path(data_dir, user);
    let ip = index_path(data_dir, user);
    let pp = profile_path(data_dir, user);
    for p in [&qp, &ip, &pp] {
        let tmp = temp_path(p);
        if tmp.exists() {
            report.notes.push(Problem {
                path: tmp,
                line: 0,
                reason: "unfinished rewrite (the original is complete); removed at the next start"
                    .into(),
            });
        }
    }

    // Queue: lines, offsets increasing, and the last offset given out.
    let data = read_or_empty(&qp)?;
    let checked = check::<QueueRecord>(&data, queue_semantics());
    let last = checked
        .good
        .iter()
        .filter(|(_, _, r)| r.kind != QueueRecordKind::Ack as i32)
        .map(|(_, _, r)| r.offset)
        .max()
        .unwrap_or(0);
    report.records += checked.good.len() as u64;
    settle(&qp, &data, &checked, repair, report)?;

    // Index: lines, valid partitions and kinds, cursors never past the queue's end.
    let data = read_or_empty(&ip)?;
    let checked = check::<IndexRecord>(&data, |r: &IndexRecord| {
        match Partition::try_from(r.partition) {
            Ok(Partition::Chat | Partition::Notification | Partition::Receipt) => {}
            _ => return Err(format!("invalid partition {}", r.partition)),
        }
        if ReceiptKind::try_from(r.kind).is_err() {
            return Err(format!("invalid receipt kind {}", r.kind));
        }
        if r.to != user {
            return Err(format!("cursor of user {:?} in {user:?}'s index", r.to));
        }
        if r.next_offset > last + 1 {
            return Err(format!(
                "cursor next_offset {} is past the queue's last offset {last} + 1",
                r.next_offset
            ));
        }
        Ok(())
    });
    report.records += checked.good.len() as u64;
    settle(&ip, &data, &checked, repair, report)?;

    // Profile: exactly one good line.
    match profile::read_record(&pp) {
        Ok(Some(_)) => report.records += 1,
        Ok(None) => {}
        Err(StoreError::Corrupt { line, reason, .. }) => {
            let fixed = repair
                && matches!(
                    profile::recover(data_dir, user, true)?,
                    Recovered::MovedAside(..)
                );
            let reason = if fixed {
                format!("{reason}; moved aside")
            } else {
                reason
            };
            report.found(&pp, line, reason, fixed);
        }
        Err(e) => return Err(e),
    }
    Ok(())
}
