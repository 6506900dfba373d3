//! Reading the push files back: the start (newest snapshot, then its logs in order), the offline
//! check of `bimip check`, and the read-only inspection of one user.
//!
//! Like the queue files: a torn or corrupt last line of the newest log (a write a crash cut
//! short) is cut off; a bad line anywhere else, a torn end of any other file, or a missing log
//! refuses the start, unless `repair`, which drops the bad lines (the original is kept aside as
//! `<file>.corrupt-<unix ms>`) and, for a missing log, writes a fresh snapshot of what is left.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use bimip_proto::store::{DeviceToken, Mute, PushRecord, push_record::Change};

use super::compact::write_snapshot;
use super::layout::{Layout, log_path, push_dir, remove_older};
use super::state::{At, ForgetRule, PushState, SnapCursor};
use crate::StoreError;
use crate::file::check::{CheckReport, Problem};
use crate::file::record::decode_line;
use crate::file::recovery::{check, io_err, read_or_empty, rewrite, scan_file, sync_dir, truncate};

/// What a line must be beyond a good CRC: a record the store could have written.
pub(crate) fn semantic(rec: &PushRecord) -> Result<(), String> {
    let r = match &rec.change {
        None => return Err("a push record without a change".into()),
        Some(Change::PutDevice(t)) => super::check_device_token(t),
        Some(Change::RemoveDevice(k)) => {
            super::check_user(&k.user).and_then(|()| super::check_device(&k.device))
        }
        Some(Change::PutMute(m) | Change::RemoveMute(m)) => {
            super::check_user(&m.user).and_then(|()| super::check_user(&m.other))
        }
        Some(Change::PutJob(j)) => super::check_job(j),
        Some(Change::PutIdempotency(r)) => super::check_idempotency_key(&r.key),
        Some(Change::RemoveJob(_) | Change::DeadLetter(_)) => Ok(()),
    };
    r.map_err(|e| e.to_string())
}

/// How a start treats the files.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoadOptions {
    pub repair: bool,
    /// Remove temporary and superseded files (not when a running store reloads after a failed
    /// write: nothing can be left over then).
    pub cleanup: bool,
    pub now: i64,
}

/// The state read back, and where the writer goes on.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub state: PushState,
    /// The log new records are appended to, and its length (0 when it does not exist yet).
    pub log: u64,
    pub log_len: u64,
    /// The size of the snapshot read (compaction compares the log against it).
    pub snapshot_bytes: u64,
    pub records: u64,
    pub files: usize,
    pub truncated: Vec<(PathBuf, u64, String)>,
    pub repaired: Vec<(PathBuf, u64, String)>,
}

fn corrupt(path: &Path, line: u64, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

/// Replays one file into `state`; returns its length afterwards. `newest` is the newest log,
/// the one file whose torn end is a write cut short rather than corruption.
fn load_file(
    path: &Path,
    newest: bool,
    at: At,
    opts: LoadOptions,
    state: &mut PushState,
    out: &mut Loaded,
) -> Result<u64, StoreError> {
    let scan = scan_file::<PushRecord>(path, semantic, |_, _, r| {
        if let Some(c) = r.change {
            state.apply(c, at);
        }
    })?;
    out.files += 1;
    let Some((bad_line, reason)) = scan.bad else {
        out.records += scan.good;
        let Some((line, start, reason)) = scan.torn else {
            return Ok(scan.len);
        };
        if newest {
            tracing::warn!(file = %path.display(), line, %reason, "cut off a torn last line");
            truncate(path, start)?;
            out.truncated.push((path.to_path_buf(), line, reason));
        } else if opts.repair {
            let reason =
                format!("torn or corrupt end of a file that is not the newest log: {reason}");
            tracing::warn!(file = %path.display(), line, %reason, "repair: cut off a corrupt last line");
            truncate(path, start)?;
            out.repaired.push((path.to_path_buf(), line, reason));
        } else {
            return Err(corrupt(
                path,
                line,
                format!("torn or corrupt end of a file that is not the newest log: {reason}"),
            ));
        }
        return Ok(start);
    };
    if !opts.repair {
        return Err(corrupt(path, bad_line, reason));
    }
    // Slow path: the whole file again, every bad line dropped, the original kept aside. The
    // streaming pass applied the lines before the first bad one; the good ones after it follow.
    let data = read_or_empty(path)?;
    let checked = check::<PushRecord>(&data, semantic);
    rewrite(path, &data, &checked)?;
    for (line, reason) in &checked.bad {
        tracing::warn!(file = %path.display(), line, %reason, "repair: dropped a corrupt line");
        out.repaired
            .push((path.to_path_buf(), *line, reason.clone()));
    }
    if let Some((line, _, reason)) = &checked.torn {
        out.repaired.push((
            path.to_path_buf(),
            *line,
            format!("torn or corrupt last line: {reason}"),
        ));
    }
    let mut len = 0u64;
    for (line, range, rec) in checked.good {
        len += (range.end - range.start) as u64;
        if line > bad_line
            && let Some(c) = rec.change
        {
            state.apply(c, at);
        }
        out.records += 1;
    }
    Ok(len)
}

/// Reads the push state under `<data_dir>/push/` (see the module docs).
pub(crate) fn load(data_dir: &Path, opts: LoadOptions) -> Result<Loaded, StoreError> {
    let dir = push_dir(data_dir);
    let layout = Layout::scan(&dir)?;
    if opts.cleanup {
        for tmp in &layout.temps {
            match fs::remove_file(tmp) {
                Ok(()) => {
                    tracing::warn!(file = %tmp.display(), "removed an unfinished push snapshot")
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(tmp, e)),
            }
        }
    }
    let mut out = Loaded {
        state: PushState::default(),
        log: layout.current_log(),
        log_len: 0,
        snapshot_bytes: 0,
        records: 0,
        files: 0,
        truncated: Vec::new(),
        repaired: Vec::new(),
    };
    if let Some(gap) = layout.gaps.first() {
        let reason = format!(
            "missing: the push history needs it (snapshot {}, logs {:?}); the changes it held are lost",
            layout
                .snapshot
                .map_or_else(|| "none".to_string(), |k| k.to_string()),
            layout.logs
        );
        if !opts.repair {
            return Err(corrupt(gap, 0, reason));
        }
        for gap in &layout.gaps {
            tracing::warn!(file = %gap.display(), "repair: a push log is missing; its changes are lost");
            out.repaired.push((
                gap.clone(),
                0,
                format!("{reason}; a new snapshot was written"),
            ));
        }
    }
    let mut state = PushState::default();
    if let Some(k) = layout.snapshot {
        let path = super::layout::snapshot_path(&dir, k);
        let at = At {
            log: k,
            now: opts.now,
        };
        out.snapshot_bytes = load_file(&path, false, at, opts, &mut state, &mut out)?;
    }
    let newest = layout.logs.last().copied();
    for &n in &layout.logs {
        let at = At {
            log: n,
            now: opts.now,
        };
        let len = load_file(
            &log_path(&dir, n),
            Some(n) == newest,
            at,
            opts,
            &mut state,
            &mut out,
        )?;
        if Some(n) == newest {
            out.log_len = len;
        }
    }
    for (user, device) in state.finish_load() {
        tracing::warn!(
            user,
            device,
            "a push token held by two devices stays with the later registration"
        );
    }
    if opts.cleanup {
        for old in &layout.superseded {
            match fs::remove_file(old) {
                Ok(()) => tracing::info!(file = %old.display(), "removed a superseded push file"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(old, e)),
            }
        }
    }
    if !layout.gaps.is_empty() {
        // A history with a hole is made whole again: snapshot and log M+1 from what is left.
        let next = out.log + 1;
        out.snapshot_bytes = snapshot_of(&dir, next, &mut state, opts.now)?;
        File::create(log_path(&dir, next)).map_err(|e| io_err(&log_path(&dir, next), e))?;
        sync_dir(&dir)?;
        remove_older(&dir, next)?;
        sync_dir(&dir)?;
        out.log = next;
        out.log_len = 0;
    }
    out.state = state;
    Ok(out)
}

/// Writes the whole of `state` (owned by the caller: no lock) as snapshot `n`.
fn snapshot_of(dir: &Path, n: u64, state: &mut PushState, now: i64) -> Result<u64, StoreError> {
    let dead = state.dead_snapshot();
    let keep_all = ForgetRule {
        log: 0,
        cutoff: i64::MIN,
    };
    let mut cur = SnapCursor::Devices(None);
    write_snapshot(
        dir,
        n,
        |recs| {
            state.snapshot_chunk(&mut cur, 4096, keep_all, now, recs);
            Ok(cur == SnapCursor::Done)
        },
        &dead,
    )
}

/// One line of a file as the offline tools see it: decoded and checked, or why not.
struct Line {
    number: u64,
    result: Result<PushRecord, String>,
    /// The last line of the file failed to decode (or had no `\n`): a write cut short.
    torn: bool,
}

/// Streams every line of `path` into `each`, going on past bad lines; `None` when the file
/// does not exist (a compaction deleted it meanwhile).
fn each_line(path: &Path, mut each: impl FnMut(Line)) -> Result<Option<()>, StoreError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, e)),
    };
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::with_capacity(1024);
    let mut number = 0u64;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| io_err(path, e))?;
        if n == 0 {
            return Ok(Some(()));
        }
        number += 1;
        let last = reader.fill_buf().map_err(|e| io_err(path, e))?.is_empty();
        let (result, decodes) = match buf.strip_suffix(b"\n") {
            Some(bytes) => match decode_line::<PushRecord>(bytes) {
                Ok(rec) => match semantic(&rec) {
                    Ok(()) => (Ok(rec), true),
                    Err(reason) => (Err(reason), true),
                },
                Err(e) => (Err(e.to_string()), false),
            },
            None => (Err(crate::file::record::LineError::Torn.to_string()), false),
        };
        each(Line {
            number,
            torn: last && !decodes,
            result,
        });
    }
}

/// `bimip check` of the push files: every line of the files a start reads, the sequence of
/// snapshot and logs, leftovers as notes. With `repair`, fixes what a start with `--repair`
/// would, by running that start's load.
pub(crate) fn check_push(
    data_dir: &Path,
    repair: bool,
    now: i64,
    report: &mut CheckReport,
) -> Result<(), StoreError> {
    let dir = push_dir(data_dir);
    let layout = Layout::scan(&dir)?;
    if !layout.exists {
        return Ok(());
    }
    for tmp in &layout.temps {
        report.notes.push(Problem {
            path: tmp.clone(),
            line: 0,
            reason: "unfinished push snapshot (the files before it are complete); removed at the next start"
                .into(),
        });
    }
    for old in &layout.superseded {
        report.notes.push(Problem {
            path: old.clone(),
            line: 0,
            reason: "superseded by a newer push snapshot; removed at the next start".into(),
        });
    }
    let mut found: Vec<(PathBuf, u64, String)> = Vec::new();
    for gap in &layout.gaps {
        found.push((
            gap.clone(),
            0,
            format!(
                "missing: the push history needs it (snapshot {}, logs {:?}); the changes it held are lost",
                layout
                    .snapshot
                    .map_or_else(|| "none".to_string(), |k| k.to_string()),
                layout.logs
            ),
        ));
    }
    let newest = layout.logs.last().map(|&n| log_path(&dir, n));
    let mut good = 0u64;
    for (_, path) in layout.files(&dir) {
        let is_newest = Some(&path) == newest.as_ref();
        let read = each_line(&path, |l| match l.result {
            Ok(_) => good += 1,
            Err(reason) if l.torn && is_newest => {
                found.push((
                    path.clone(),
                    l.number,
                    format!("torn or corrupt last line: {reason}"),
                ));
            }
            Err(reason) if l.torn => found.push((
                path.clone(),
                l.number,
                format!("torn or corrupt end of a file that is not the newest log: {reason}"),
            )),
            Err(reason) => found.push((path.clone(), l.number, reason)),
        })?;
        if read.is_none() {
            found.push((
                path.clone(),
                0,
                "vanished while checked (is a server running?)".into(),
            ));
        }
    }
    report.records += good;
    let fixed = repair && !found.is_empty();
    if fixed {
        load(
            data_dir,
            LoadOptions {
                repair: true,
                cleanup: true,
                now,
            },
        )?;
    }
    for (path, line, reason) in found {
        report.found(&path, line, reason, fixed);
    }
    Ok(())
}

/// One user's push state decoded from the files, for `bimip inspect` (reads only; safe while
/// the server runs, though a compaction at the same moment makes it read again).
#[derive(Debug, Clone, Default)]
pub struct PushUserFiles {
    /// The files read, in order (snapshot, then logs).
    pub files: Vec<PathBuf>,
    /// The user's devices with a token, ordered by device id.
    pub devices: Vec<DeviceToken>,
    /// Users this user muted, ordered by user.
    pub mutes: Vec<Mute>,
    /// Users that muted this user.
    pub muted_by: Vec<Mute>,
    /// Lines that could not be used, and missing files: (file, line number, reason).
    pub problems: Vec<(PathBuf, u64, String)>,
}

/// Replays the push files read-only and picks out `user`.
pub(crate) fn inspect(data_dir: &Path, user: &str, now: i64) -> Result<PushUserFiles, StoreError> {
    super::check_user(user)?;
    let dir = push_dir(data_dir);
    // A compaction may delete a file between the listing and its read: list again.
    for _ in 0..5 {
        let layout = Layout::scan(&dir)?;
        let mut state = PushState::default();
        let files = layout.files(&dir);
        let mut out = PushUserFiles {
            files: files.iter().map(|(_, p)| p.clone()).collect(),
            ..PushUserFiles::default()
        };
        for gap in &layout.gaps {
            out.problems
                .push((gap.clone(), 0, "missing from the push history".into()));
        }
        let mut vanished = false;
        for (n, path) in &files {
            let at = At { log: *n, now };
            let read = each_line(path, |l| match l.result {
                Ok(rec) => {
                    if let Some(c) = rec.change {
                        state.apply(c, at);
                    }
                }
                Err(reason) => out.problems.push((path.clone(), l.number, reason)),
            })?;
            if read.is_none() {
                vanished = true;
                break;
            }
        }
        if vanished {
            continue;
        }
        state.finish_load();
        out.devices = state.device_tokens(user);
        out.mutes = state.mutes(user);
        out.muted_by = state.muted_by(user);
        return Ok(out);
    }
    Err(io_err(
        &dir,
        io::Error::other("the push files kept changing while read; try again"),
    ))
}
