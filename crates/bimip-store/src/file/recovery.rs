//! Start-up recovery (docs/OPERATIONS.md §6): every user's files are decoded once; a torn or corrupt last line
//! is cut off, corruption before it refuses the start unless `repair` rewrites the file. Also the
//! lazy load of one user's state and the read-only `inspect_user`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bimip_proto::store::{IndexRecord, QueueRecord, QueueRecordKind};

use super::queue::{Limits, UserQueue};
use super::record::decode_all;
use super::{RecoveryReport, UserFiles, index_path, queue_path, user_dir};
use crate::StoreError;

pub(crate) fn io_err(path: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file's lines sorted into good records, a bad tail and bad lines before it.
pub(super) struct Checked<M> {
    /// (line number, byte range, record).
    pub good: Vec<(u64, std::ops::Range<usize>, M)>,
    /// The last line, when it is torn or corrupt: (line number, its start, reason).
    pub torn: Option<(u64, u64, String)>,
    /// Bad lines before the last one: (line number, reason).
    pub bad: Vec<(u64, String)>,
}

/// Items must have increasing offsets; anything else is corruption even with a valid CRC.
pub(super) fn queue_semantics() -> impl FnMut(&QueueRecord) -> Result<(), String> {
    let mut last = 0u64;
    move |rec| {
        if rec.kind == QueueRecordKind::Ack as i32 {
            return Ok(());
        }
        if rec.kind == QueueRecordKind::Mark as i32 {
            // Compaction's note of the last offset given out: items after it must be greater.
            if rec.offset < last {
                return Err(format!(
                    "mark of last offset {} is before the previous item's offset {last}",
                    rec.offset
                ));
            }
            last = rec.offset;
            return Ok(());
        }
        if rec.offset <= last {
            return Err(format!(
                "offset {} is not after the previous item's offset {last}",
                rec.offset
            ));
        }
        last = rec.offset;
        Ok(())
    }
}

pub(super) fn check<M: prost::Message + Default>(
    data: &[u8],
    mut semantic: impl FnMut(&M) -> Result<(), String>,
) -> Checked<M> {
    let lines = decode_all::<M>(data);
    let n = lines.len();
    let mut out = Checked {
        good: Vec::with_capacity(n),
        torn: None,
        bad: Vec::new(),
    };
    for (i, l) in lines.into_iter().enumerate() {
        let is_last = i + 1 == n;
        match l.result {
            Ok(rec) => match semantic(&rec) {
                Ok(()) => {
                    let start = l.start as usize;
                    let end = data[start..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(data.len(), |p| start + p + 1);
                    out.good.push((l.number, start..end, rec));
                }
                Err(reason) => out.bad.push((l.number, reason)),
            },
            Err(e) if is_last => out.torn = Some((l.number, l.start, e.to_string())),
            Err(e) => out.bad.push((l.number, e.to_string())),
        }
    }
    out
}

pub(super) fn read_or_empty(path: &Path) -> Result<Vec<u8>, StoreError> {
    match fs::read(path) {
        Ok(d) => Ok(d),
        // A path component that is not a folder means the file does not exist either.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(Vec::new())
        }
        Err(e) => Err(io_err(path, e)),
    }
}

pub(super) fn truncate(path: &Path, len: u64) -> Result<(), StoreError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    f.set_len(len).map_err(|e| io_err(path, e))?;
    f.sync_data().map_err(|e| io_err(path, e))
}

/// Fsyncs a directory so a rename or a new file in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

/// Keeps the original aside and atomically replaces `path` with only its good lines.
pub(super) fn rewrite<M>(path: &Path, data: &[u8], checked: &Checked<M>) -> Result<(), StoreError> {
    let aside = PathBuf::from(format!(
        "{}.corrupt-{}",
        path.display(),
        bimip_proto::now_ms()
    ));
    fs::copy(path, &aside).map_err(|e| io_err(&aside, e))?;
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    let mut buf = Vec::with_capacity(data.len());
    for (_, range, _) in &checked.good {
        buf.extend_from_slice(&data[range.clone()]);
        if buf.last() != Some(&b'\n') {
            buf.push(b'\n');
        }
    }
    f.write_all(&buf).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Findings of one user's recovery.
#[derive(Default)]
struct UserReport {
    records: u64,
    truncated: Vec<(PathBuf, u64, String)>,
    repaired: Vec<(PathBuf, u64, String)>,
    user: String,
    /// The files look like compaction has work (checked precisely once the user is loaded).
    compaction_due: bool,
}

/// What recovery learns from a file's good records without keeping them (a million-line queue
/// is checked in one pass over a small buffer instead of being decoded into memory whole).
trait Tally<M> {
    fn add(&mut self, rec: &M);
    /// Forgets what was added (the slow path counts a repaired file again from the start).
    fn reset(&mut self);
}

/// The queue file's share of [`compaction_candidate`].
struct QueueTally<'a> {
    user: &'a str,
    /// Items older than this count as past the retention (None: no retention).
    cutoff: Option<i64>,
    records: u64,
    items: u64,
    /// An ACK record or an item marked acknowledged.
    acks: bool,
    old: bool,
    old_own: bool,
}

impl Tally<QueueRecord> for QueueTally<'_> {
    fn add(&mut self, r: &QueueRecord) {
        self.records += 1;
        if r.kind == QueueRecordKind::Ack as i32 || r.acknowledged {
            self.acks = true;
        }
        if r.kind == QueueRecordKind::Item as i32 {
            self.items += 1;
            if self.cutoff.is_some_and(|c| r.timestamp < c) {
                self.old = true;
                self.old_own |= r.from == self.user;
            }
        }
    }
    fn reset(&mut self) {
        *self = QueueTally {
            user: self.user,
            cutoff: self.cutoff,
            records: 0,
            items: 0,
            acks: false,
            old: false,
            old_own: false,
        };
    }
}

/// The index file's share of [`compaction_candidate`]: records and distinct cursors (told apart
/// by a hash of their key: a guess is all that is needed).
#[derive(Default)]
struct IndexTally {
    records: u64,
    keys: std::collections::HashSet<u64>,
}

impl Tally<IndexRecord> for IndexTally {
    fn add(&mut self, r: &IndexRecord) {
        use std::hash::{BuildHasher, BuildHasherDefault};
        self.records += 1;
        let key = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .hash_one((&r.device, r.partition, &r.from, r.kind));
        self.keys.insert(key);
    }
    fn reset(&mut self) {
        *self = IndexTally::default();
    }
}

/// What one streaming pass found in a file.
pub(super) struct Scan {
    pub good: u64,
    /// The last line, when it is torn or corrupt: (line number, its start, reason).
    pub torn: Option<(u64, u64, String)>,
    /// The first bad line before the last one (the pass stops there): (line number, reason).
    pub bad: Option<(u64, String)>,
    /// Bytes read.
    pub len: u64,
}

/// One pass over a file, line by line through a 1 MB buffer: each good record goes to `each` with
/// its line's start and length (without `\n`). Stops at the first bad line that is not the last.
pub(super) fn scan_file<M: prost::Message + Default>(
    path: &Path,
    mut semantic: impl FnMut(&M) -> Result<(), String>,
    mut each: impl FnMut(u64, u32, M),
) -> Result<Scan, StoreError> {
    use std::io::{BufRead, BufReader};
    let mut scan = Scan {
        good: 0,
        torn: None,
        bad: None,
        len: 0,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(scan);
        }
        Err(e) => return Err(io_err(path, e)),
    };
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut line = Vec::with_capacity(1024);
    let (mut number, mut pos) = (0u64, 0u64);
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| io_err(path, e))?;
        if n == 0 {
            return Ok(scan);
        }
        number += 1;
        let start = pos;
        pos += n as u64;
        scan.len = pos;
        let result = match line.strip_suffix(b"\n") {
            Some(bytes) => super::record::decode_line::<M>(bytes)
                .map_err(|e| e.to_string())
                .and_then(|rec| semantic(&rec).map(|()| rec)),
            None => Err(super::record::LineError::Torn.to_string()),
        };
        match result {
            Ok(rec) => {
                let len = u32::try_from(n - 1).unwrap_or(u32::MAX);
                each(start, len, rec);
                scan.good += 1;
            }
            Err(reason) => {
                let last = reader.fill_buf().map_err(|e| io_err(path, e))?.is_empty();
                // A semantic error is never a torn write: it is reported as corruption.
                if last && (!line.ends_with(b"\n") || decode_fails::<M>(&line)) {
                    scan.torn = Some((number, start, reason));
                } else {
                    scan.bad = Some((number, reason));
                }
                return Ok(scan);
            }
        }
    }
}

/// Whether a (terminated) line fails to decode, as opposed to decoding into a record that breaks
/// the file's rules.
fn decode_fails<M: prost::Message + Default>(line: &[u8]) -> bool {
    let bytes = line.strip_suffix(b"\n").unwrap_or(line);
    super::record::decode_line::<M>(bytes).is_err()
}

/// Checks (and fixes) one file, counting its good records into `tally`. Clean files (the usual
/// case) take one streaming pass; a file with a bad line before its last one is read whole
/// again to refuse the start or, with `repair`, to rewrite it without the bad lines.
fn recover_file<M: prost::Message + Default, S: FnMut(&M) -> Result<(), String>>(
    path: &Path,
    repair: bool,
    semantic: impl Fn() -> S,
    report: &mut UserReport,
    tally: &mut impl Tally<M>,
) -> Result<(), StoreError> {
    let scan = scan_file(path, semantic(), |_, _, r| tally.add(&r))?;
    let (good, torn) = if scan.bad.is_none() {
        if let Some((_, start, _)) = &scan.torn {
            truncate(path, *start)?;
        }
        (scan.good, scan.torn)
    } else {
        tally.reset();
        let data = read_or_empty(path)?;
        let checked = check::<M>(&data, semantic());
        if let Some((line, reason)) = checked.bad.first() {
            if !repair {
                return Err(StoreError::Corrupt {
                    path: path.to_path_buf(),
                    line: *line,
                    reason: reason.clone(),
                });
            }
            rewrite(path, &data, &checked)?;
            for (line, reason) in &checked.bad {
                tracing::warn!(file = %path.display(), line, %reason, "repair: dropped a corrupt line");
                report
                    .repaired
                    .push((path.to_path_buf(), *line, reason.clone()));
            }
        } else if let Some((_, start, _)) = &checked.torn {
            truncate(path, *start)?;
        }
        checked.good.iter().for_each(|(_, _, r)| tally.add(r));
        (checked.good.len() as u64, checked.torn)
    };
    if let Some((line, _, reason)) = &torn {
        tracing::warn!(file = %path.display(), line, %reason, "cut off a torn or corrupt last line");
        report
            .truncated
            .push((path.to_path_buf(), *line, reason.clone()));
    }
    report.records += good;
    Ok(())
}

/// Removes temporary files of a compaction that a crash interrupted before its rename (the
/// original files are still complete).
pub(super) fn remove_leftover_temps(data_dir: &Path, user: &str) -> Result<(), StoreError> {
    for path in [queue_path(data_dir, user), index_path(data_dir, user)] {
        let tmp = super::profile::temp_path(&path);
        match fs::remove_file(&tmp) {
            Ok(()) => tracing::warn!(file = %tmp.display(), "removed an unfinished compaction"),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) => {}
            Err(e) => return Err(io_err(&tmp, e)),
        }
    }
    Ok(())
}

/// A cheap guess from the files whether compaction has work for a user (the shard decides
/// precisely once the user is loaded): over the queue limit, many more lines than items or
/// cursors, or items older than the retention while acknowledgements or own copies exist.
fn compaction_candidate(queue: &QueueTally<'_>, index: &IndexTally, limits: Limits) -> bool {
    if limits.max_items > 0 && queue.items > (limits.max_items + limits.max_items / 8) as u64 {
        return true;
    }
    if queue.records > 3 * queue.items + 1024 {
        return true;
    }
    if index.records > 1024 && index.records > 4 * index.keys.len() as u64 + 1024 {
        return true;
    }
    queue.old_own || (queue.acks && queue.old)
}

fn recover_user(
    data_dir: &Path,
    user: &str,
    repair: bool,
    limits: Limits,
) -> Result<UserReport, StoreError> {
    let mut report = UserReport::default();
    remove_leftover_temps(data_dir, user)?;
    let mut queue = QueueTally {
        user,
        cutoff: (limits.retention_ms > 0).then(|| bimip_proto::now_ms() - limits.retention_ms),
        records: 0,
        items: 0,
        acks: false,
        old: false,
        old_own: false,
    };
    let q = queue_path(data_dir, user);
    recover_file(&q, repair, queue_semantics, &mut report, &mut queue)?;
    let mut index = IndexTally::default();
    let i = index_path(data_dir, user);
    recover_file(
        &i,
        repair,
        || |_: &IndexRecord| Ok(()),
        &mut report,
        &mut index,
    )?;
    report.compaction_due = compaction_candidate(&queue, &index, limits);
    match super::profile::recover(data_dir, user, repair)? {
        super::profile::Recovered::Ok { records } => report.records += records,
        super::profile::Recovered::MovedAside(line, reason) => report.repaired.push((
            super::profile::profile_path(data_dir, user),
            line,
            format!("{reason}; moved aside, the user starts with an empty profile"),
        )),
    }
    Ok(report)
}

/// Lists `<data_dir>/bimip/<prefix>/<user>/` folders, checking names and prefixes.
fn list_users(
    data_dir: &Path,
    repair: bool,
    report: &mut RecoveryReport,
) -> Result<Vec<String>, StoreError> {
    let root = data_dir.join("bimip");
    fs::create_dir_all(&root).map_err(|e| io_err(&root, e))?;
    let mut users = Vec::new();
    for prefix in fs::read_dir(&root).map_err(|e| io_err(&root, e))? {
        let prefix = prefix.map_err(|e| io_err(&root, e))?;
        if !prefix.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        let pdir = prefix.path();
        for entry in fs::read_dir(&pdir).map_err(|e| io_err(&pdir, e))? {
            let entry = entry.map_err(|e| io_err(&pdir, e))?;
            if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let problem = if bimip_proto::validate_user_id(&name).is_err() {
                Some(format!("{name:?} is not a valid user id"))
            } else if user_dir(data_dir, &name) != path {
                Some(format!(
                    "user {name:?} belongs under prefix {}, not {}",
                    user_dir(data_dir, &name)
                        .parent()
                        .and_then(|p| p.file_name())
                        .map(|p| p.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    prefix.file_name().to_string_lossy()
                ))
            } else {
                None
            };
            match problem {
                None => users.push(name),
                Some(reason) if repair => {
                    tracing::warn!(folder = %path.display(), %reason, "ignoring a misplaced folder");
                    report
                        .repaired
                        .push((path, 0, format!("{reason}; ignored")));
                }
                Some(reason) => {
                    return Err(StoreError::Corrupt {
                        path,
                        line: 0,
                        reason,
                    });
                }
            }
        }
    }
    Ok(users)
}

/// Checks every user's files in parallel over a few threads.
pub(crate) fn recover(
    data_dir: &Path,
    repair: bool,
    limits: Limits,
) -> Result<RecoveryReport, StoreError> {
    let mut report = RecoveryReport::default();
    let users = list_users(data_dir, repair, &mut report)?;
    report.users = users.len();
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8)
        .min(users.len().max(1));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Result<UserReport, StoreError>>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut local = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(user) = users.get(i) else { break };
                    let r = recover_user(data_dir, user, repair, limits).map(|mut r| {
                        r.user = user.clone();
                        r
                    });
                    let failed = r.is_err();
                    local.push(r);
                    if failed {
                        // Stop the others early: the start is refused anyway.
                        next.store(usize::MAX / 2, Ordering::Relaxed);
                        break;
                    }
                }
                if let Ok(mut all) = results.lock() {
                    all.extend(local);
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut first_err: Option<StoreError> = None;
    for r in results {
        match r {
            Ok(u) => {
                report.records += u.records;
                report.truncated.extend(u.truncated);
                report.repaired.extend(u.repaired);
                if u.compaction_due {
                    report.compaction_due.push(u.user);
                }
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    report.truncated.sort();
    report.repaired.sort();
    Ok(report)
}

/// Streams one file's records into `each` for the running store, with their line's position and
/// length (without `\n`); returns the file's length. A bad last line (a write that failed and
/// could not be rolled back) is cut off so later appends start on a clean line; anything else is
/// an error.
fn load_file<M: prost::Message + Default>(
    path: &Path,
    each: impl FnMut(u64, u32, M),
) -> Result<u64, StoreError> {
    let scan = scan_file(path, |_| Ok(()), each)?;
    if let Some((line, reason)) = scan.bad {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            line,
            reason,
        });
    }
    if let Some((line, start, reason)) = &scan.torn {
        tracing::warn!(file = %path.display(), line, %reason, "cut off a torn last line");
        truncate(path, *start)?;
        return Ok(*start);
    }
    Ok(scan.len)
}

/// Loads one user's state from its files (empty when it has none), one line at a time.
pub(crate) fn load_user(data_dir: &Path, user: &str) -> Result<UserQueue, StoreError> {
    let mut q = UserQueue::empty(user);
    let queue_bytes = load_file::<QueueRecord>(&queue_path(data_dir, user), |pos, len, r| {
        q.apply_record(r, pos, len)
    })?;
    q.set_queue_bytes(queue_bytes);
    load_file::<IndexRecord>(&index_path(data_dir, user), |_, _, r| q.apply_index(&r))?;
    Ok(q)
}

/// Decodes both files read-only, collecting undecodable lines.
pub(crate) fn inspect(data_dir: &Path, user: &str) -> Result<UserFiles, StoreError> {
    bimip_proto::validate_user_id(user).map_err(|_| StoreError::InvalidUser(user.to_string()))?;
    let mut out = UserFiles {
        queue_path: queue_path(data_dir, user),
        index_path: index_path(data_dir, user),
        profile_path: super::profile::profile_path(data_dir, user),
        ..Default::default()
    };
    match super::profile::read_record(&out.profile_path) {
        Ok(p) => out.profile = p,
        Err(StoreError::Corrupt { path, line, reason }) => out.problems.push((path, line, reason)),
        Err(e) => return Err(e),
    }
    for l in decode_all::<QueueRecord>(&read_or_empty(&out.queue_path)?) {
        match l.result {
            Ok(r) => out.queue.push((l.number, r)),
            Err(e) => out
                .problems
                .push((out.queue_path.clone(), l.number, e.to_string())),
        }
    }
    for l in decode_all::<IndexRecord>(&read_or_empty(&out.index_path)?) {
        match l.result {
            Ok(r) => out.index.push((l.number, r)),
            Err(e) => out
                .problems
                .push((out.index_path.clone(), l.number, e.to_string())),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[derive(Default)]
    struct Count(u64);
    impl Tally<QueueRecord> for Count {
        fn add(&mut self, _: &QueueRecord) {
            self.0 += 1;
        }
        fn reset(&mut self) {
            self.0 = 0;
        }
    }

    /// What a file is made of: good items (by offset), garbage lines, or an item whose offset
    /// goes back (decodes, breaks the order).
    #[derive(Debug, Clone)]
    enum Part {
        Item(u64),
        Garbage(Vec<u8>),
        Backwards,
    }

    fn part() -> impl Strategy<Value = Part> {
        prop_oneof![
            6 => (1u64..4).prop_map(Part::Item),
            1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(|mut g| {
                g.retain(|&b| b != b'\n');
                Part::Garbage(g)
            }),
            1 => Just(Part::Backwards),
        ]
    }

    fn build(parts: &[Part], cut: usize) -> Vec<u8> {
        let mut data = Vec::new();
        let mut offset = 0u64;
        for p in parts {
            match p {
                Part::Item(step) => {
                    offset += step;
                    let rec = QueueRecord {
                        offset,
                        kind: QueueRecordKind::Item as i32,
                        from: "bob".into(),
                        payload: vec![7u8; (offset % 50) as usize].into(),
                        ..Default::default()
                    };
                    super::super::record::encode_line_into(&rec, &mut data);
                }
                Part::Garbage(g) => {
                    data.extend_from_slice(g);
                    data.push(b'\n');
                }
                Part::Backwards => {
                    let rec = QueueRecord {
                        offset: offset.saturating_sub(1),
                        kind: QueueRecordKind::Item as i32,
                        ..Default::default()
                    };
                    super::super::record::encode_line_into(&rec, &mut data);
                }
            }
        }
        let keep = data.len().saturating_sub(cut);
        data.truncate(keep);
        data
    }

    proptest! {
        /// The streaming pass of recovery agrees with the whole-file check it replaces on the
        /// usual path: same good count and torn tail when the file is clean, and "not clean"
        /// exactly when the check finds a bad line before the last.
        #[test]
        fn streaming_scan_agrees_with_the_whole_file_check(
            parts in proptest::collection::vec(part(), 0..30),
            cut in prop_oneof![Just(0usize), 1usize..12],
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("q.dat");
            let data = build(&parts, cut);
            std::fs::write(&path, &data).unwrap();
            let checked = check::<QueueRecord>(&data, queue_semantics());
            let mut count = Count::default();
            let scan = scan_file::<QueueRecord>(&path, queue_semantics(), |_, _, r| count.add(&r)).unwrap();
            prop_assert_eq!(scan.bad.is_none(), checked.bad.is_empty());
            prop_assert_eq!(scan.bad.as_ref().map(|b| b.0), checked.bad.first().map(|b| b.0));
            if scan.bad.is_none() {
                prop_assert_eq!(scan.good, checked.good.len() as u64);
                prop_assert_eq!(count.0, scan.good);
                prop_assert_eq!(
                    scan.torn.as_ref().map(|t| (t.0, t.1)),
                    checked.torn.as_ref().map(|t| (t.0, t.1))
                );
            }
        }
    }
}
