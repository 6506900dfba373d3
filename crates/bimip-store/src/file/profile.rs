//! One user's profile file, `bimip_profile_<user>.dat`: a single line in the store's line format
//! (Base64 of a `bimip.store.v1.Profile` ‖ CRC-32C), replaced atomically as a whole (temporary
//! file in the same folder, write, fsync, rename over, fsync of the folder). Also the single-user
//! edits the shard applies to a cached profile.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bimip_proto::store;
use bimip_proto::v1::Status;

use super::record::{decode_all, encode_line};
use super::recovery::{io_err, sync_dir};
use super::user_dir;
use crate::{PresenceUpdate, Profile, StoreError};

/// `<user_dir>/bimip_profile_<user>.dat`.
pub(crate) fn profile_path(data_dir: &Path, user: &str) -> PathBuf {
    user_dir(data_dir, user).join(format!("bimip_profile_{user}.dat"))
}

/// The temporary name a new version is written under before the rename.
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.tmp", path.display()))
}

/// A cached profile with what the decoded form leaves out.
#[derive(Debug, Clone, Default)]
pub(crate) struct StoredProfile {
    pub profile: Profile,
    /// When each contact was listed or its flag last changed (unix ms).
    pub contact_since: BTreeMap<String, i64>,
    pub listed_since: BTreeMap<String, i64>,
}

fn status_of(v: i32) -> Status {
    Status::try_from(v).unwrap_or(Status::Unspecified)
}

impl StoredProfile {
    pub fn from_record(rec: store::Profile) -> Self {
        let mut out = StoredProfile::default();
        for c in rec.contacts {
            out.contact_since.insert(c.user.clone(), c.since);
            out.profile.contacts.insert(c.user, c.one_way);
        }
        for c in rec.listed_by {
            out.listed_since.insert(c.user.clone(), c.since);
            out.profile.listed_by.insert(c.user, c.one_way);
        }
        let p = &mut out.profile;
        p.blocks = rec.blocks.into_iter().collect();
        p.blocked_by = rec.blocked_by.into_iter().collect();
        p.intent = status_of(rec.intent);
        p.details = rec.details;
        p.intent_at = rec.intent_at;
        p.invisible = rec.invisible;
        p.invisible_since = rec.invisible_since;
        p.last_seen = rec.last_seen;
        out
    }

    pub fn to_record(&self) -> store::Profile {
        let p = &self.profile;
        let entries = |m: &BTreeMap<String, bool>, since: &BTreeMap<String, i64>| {
            m.iter()
                .map(|(u, one_way)| store::ContactEntry {
                    user: u.clone(),
                    one_way: *one_way,
                    since: since.get(u).copied().unwrap_or(0),
                })
                .collect()
        };
        store::Profile {
            contacts: entries(&p.contacts, &self.contact_since),
            listed_by: entries(&p.listed_by, &self.listed_since),
            blocks: p.blocks.iter().cloned().collect(),
            blocked_by: p.blocked_by.iter().cloned().collect(),
            intent: p.intent as i32,
            details: p.details.clone(),
            intent_at: p.intent_at,
            invisible: p.invisible,
            invisible_since: p.invisible_since,
            last_seen: p.last_seen,
        }
    }

    /// Brings the `since` maps in line with the contact maps after an edit from `old`.
    fn touch(&mut self, old: &Profile, now: i64) {
        fn sync(
            old: &BTreeMap<String, bool>,
            new: &BTreeMap<String, bool>,
            since: &mut BTreeMap<String, i64>,
            now: i64,
        ) {
            since.retain(|u, _| new.contains_key(u));
            for (u, flag) in new {
                if old.get(u) != Some(flag) || !since.contains_key(u) {
                    since.insert(u.clone(), now);
                }
            }
        }
        sync(
            &old.contacts,
            &self.profile.contacts,
            &mut self.contact_since,
            now,
        );
        sync(
            &old.listed_by,
            &self.profile.listed_by,
            &mut self.listed_since,
            now,
        );
    }
}

/// Why a profile file's content is not a profile: (line number, reason).
fn decode_profile(data: &[u8]) -> Result<Option<store::Profile>, (u64, String)> {
    if data.is_empty() {
        // Never written by the store (it renames complete files into place).
        return Err((1, "empty profile file".into()));
    }
    let mut lines = decode_all::<store::Profile>(data).into_iter();
    let first = lines
        .next()
        .ok_or_else(|| (1, "empty profile file".to_string()))?;
    let rec = first.result.map_err(|e| (first.number, e.to_string()))?;
    if let Some(extra) = lines.next() {
        return Err((
            extra.number,
            "a profile file holds exactly one line".to_string(),
        ));
    }
    Ok(Some(rec))
}

fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(d) => Ok(Some(d)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(io_err(path, e)),
    }
}

/// Reads a profile file; a missing file is `None`.
pub(crate) fn read_record(path: &Path) -> Result<Option<store::Profile>, StoreError> {
    match read_if_exists(path)? {
        None => Ok(None),
        Some(data) => decode_profile(&data).map_err(|(line, reason)| StoreError::Corrupt {
            path: path.to_path_buf(),
            line,
            reason,
        }),
    }
}

/// Loads a user's profile for the shard cache (empty when the user has no profile file).
pub(crate) fn load(data_dir: &Path, user: &str) -> Result<StoredProfile, StoreError> {
    Ok(read_record(&profile_path(data_dir, user))?
        .map(StoredProfile::from_record)
        .unwrap_or_default())
}

/// What start-up did with one profile file.
pub(crate) enum Recovered {
    /// Missing or fine.
    Ok { records: u64 },
    /// Corrupt and moved aside (with `repair`): (line, reason).
    MovedAside(u64, String),
}

/// Start-up check of one user's profile file: a leftover temporary file (a crash before the
/// rename) is removed; a corrupt file refuses the start unless `repair`, which moves it aside as
/// `.corrupt-<unix_ms>` so the user starts with an empty profile.
pub(crate) fn recover(data_dir: &Path, user: &str, repair: bool) -> Result<Recovered, StoreError> {
    let path = profile_path(data_dir, user);
    let tmp = temp_path(&path);
    match fs::remove_file(&tmp) {
        Ok(()) => tracing::warn!(file = %tmp.display(), "removed an unfinished profile write"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp, e)),
    }
    let Some(data) = read_if_exists(&path)? else {
        return Ok(Recovered::Ok { records: 0 });
    };
    match decode_profile(&data) {
        Ok(_) => Ok(Recovered::Ok { records: 1 }),
        Err((line, reason)) if repair => {
            let aside = PathBuf::from(format!(
                "{}.corrupt-{}",
                path.display(),
                bimip_proto::now_ms()
            ));
            fs::rename(&path, &aside).map_err(|e| io_err(&aside, e))?;
            if let Some(dir) = path.parent() {
                sync_dir(dir)?;
            }
            tracing::warn!(file = %path.display(), line, %reason, aside = %aside.display(),
                "repair: moved a corrupt profile aside; the user starts with an empty profile");
            Ok(Recovered::MovedAside(line, reason))
        }
        Err((line, reason)) => Err(StoreError::Corrupt { path, line, reason }),
    }
}

/// Replaces the profile file atomically; with `sync`, the new content and the rename are durable
/// before this returns.
pub(crate) fn write(path: &Path, rec: &store::Profile, sync: bool) -> Result<(), StoreError> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        if let Some(prefix) = dir.parent() {
            sync_dir(prefix)?;
        }
    }
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        f.write_all(&encode_line(rec))
            .map_err(|e| io_err(&tmp, e))?;
        if sync {
            f.sync_data().map_err(|e| io_err(&tmp, e))?;
        }
        drop(f);
        fs::rename(&tmp, path).map_err(|e| io_err(path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    if sync && let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Replaces many profile files at once, durably when `sync`, with two filesystem syncs in all
/// instead of two fsyncs per file: every temporary file is written, one `syncfs` makes them
/// durable, then each is renamed over its profile and one more `syncfs` makes the renames
/// durable. A file that fails is left as it was (its error is returned with its index); the
/// others still go through.
pub(crate) fn write_many(
    data_dir: &Path,
    files: &[(PathBuf, store::Profile)],
    sync: bool,
) -> Vec<(usize, StoreError)> {
    let mut failed = Vec::new();
    let mut written = Vec::with_capacity(files.len());
    for (i, (path, rec)) in files.iter().enumerate() {
        let tmp = temp_path(path);
        let r = (|| {
            if let Some(dir) = path.parent()
                && !dir.exists()
            {
                fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
            }
            let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
            f.write_all(&encode_line(rec)).map_err(|e| io_err(&tmp, e))
        })();
        match r {
            Ok(()) => written.push(i),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                failed.push((i, e));
            }
        }
    }
    if written.is_empty() {
        return failed;
    }
    if sync && let Err(e) = syncfs(data_dir) {
        for i in written {
            let _ = fs::remove_file(temp_path(&files[i].0));
            failed.push((i, io_err(data_dir, io::Error::new(e.kind(), e.to_string()))));
        }
        return failed;
    }
    for i in written {
        let path = &files[i].0;
        if let Err(e) = fs::rename(temp_path(path), path) {
            let _ = fs::remove_file(temp_path(path));
            failed.push((i, io_err(path, e)));
        }
    }
    if sync && let Err(e) = syncfs(data_dir) {
        tracing::error!(error = %e, "syncfs after replacing profiles failed");
    }
    failed
}

/// Makes everything written on the filesystem holding `dir` durable (data, metadata, folders).
pub(crate) fn syncfs(dir: &Path) -> io::Result<()> {
    let d = File::open(dir)?;
    rustix::fs::syncfs(&d).map_err(io::Error::from)
}

/// One user's side of a profile change, applied by the user's shard.
#[derive(Debug, Clone)]
pub(crate) enum Edit {
    /// Add or update contacts (`replace`: and drop the others).
    Contacts {
        entries: Vec<(String, bool)>,
        replace: bool,
    },
    /// Drop one contact.
    RemoveContact {
        contact: String,
    },
    /// The reverse side: `by` listed this user with that flag (`None`: no longer).
    ListedBy {
        by: String,
        one_way: Option<bool>,
    },
    /// This user blocks (or unblocks) `other`.
    Block {
        other: String,
        blocked: bool,
    },
    /// The reverse side: `by` blocks (or no longer blocks) this user.
    BlockedBy {
        by: String,
        blocked: bool,
    },
    Presence(PresenceUpdate),
}

/// How an edit has to reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Durability {
    /// Nothing changed.
    Unchanged,
    /// Only advisory fields (last seen) changed.
    Advisory,
    /// Written and fsynced before the answer.
    Durable,
}

/// An applied edit's answer.
#[derive(Debug, Clone)]
pub(crate) struct Edited {
    /// Entries added or changed (contacts), or 1/0 for changed/unchanged.
    pub changed: usize,
    /// With `Contacts { replace: true }`: the contacts that were dropped.
    pub removed: Vec<String>,
    pub profile: Profile,
}

/// Applies `edit` to a copy of `cur`; the caller stores the copy once it is on disk.
pub(crate) fn apply(
    cur: &StoredProfile,
    edit: Edit,
    now: i64,
) -> Result<(StoredProfile, Durability, usize, Vec<String>), StoreError> {
    let mut next = cur.clone();
    let p = &mut next.profile;
    let mut changed = 0usize;
    let mut removed = Vec::new();
    match edit {
        Edit::Contacts { entries, replace } => {
            if replace {
                let keep: std::collections::HashSet<&str> =
                    entries.iter().map(|(u, _)| u.as_str()).collect();
                p.contacts.retain(|u, _| {
                    let k = keep.contains(u.as_str());
                    if !k {
                        removed.push(u.clone());
                    }
                    k
                });
            }
            let named: std::collections::BTreeSet<String> =
                entries.iter().map(|(u, _)| u.clone()).collect();
            for (u, one_way) in entries {
                p.contacts.insert(u, one_way);
            }
            // Duplicates in `entries` count once (the last flag wins).
            changed = named
                .iter()
                .filter(|u| cur.profile.contacts.get(*u) != p.contacts.get(*u))
                .count();
        }
        Edit::RemoveContact { contact } => {
            changed = usize::from(p.contacts.remove(&contact).is_some());
        }
        Edit::ListedBy { by, one_way } => {
            changed = usize::from(match one_way {
                Some(f) => p.listed_by.insert(by, f) != Some(f),
                None => p.listed_by.remove(&by).is_some(),
            });
        }
        Edit::Block { other, blocked } => {
            changed = usize::from(if blocked {
                p.blocks.insert(other)
            } else {
                p.blocks.remove(&other)
            });
        }
        Edit::BlockedBy { by, blocked } => {
            changed = usize::from(if blocked {
                p.blocked_by.insert(by)
            } else {
                p.blocked_by.remove(&by)
            });
        }
        Edit::Presence(u) => {
            if let Some((status, details)) = u.intent {
                match status {
                    Status::Away | Status::Busy | Status::Dnd => {
                        p.intent = status;
                        p.details = details;
                    }
                    Status::Unspecified | Status::Online => {
                        p.intent = Status::Unspecified;
                        p.details.clear();
                    }
                    other => {
                        return Err(StoreError::Invalid(format!(
                            "{} is not an intent (expected AWAY, BUSY, DND, or ONLINE to clear)",
                            other.as_str_name()
                        )));
                    }
                }
                p.intent_at = now;
            }
            if let Some(inv) = u.invisible
                && inv != p.invisible
            {
                p.invisible = inv;
                p.invisible_since = if inv { now } else { 0 };
            }
            if let Some(ts) = u.last_seen {
                p.last_seen = ts;
            }
        }
    }
    next.touch(&cur.profile, now);
    let durability = if next.profile == cur.profile {
        Durability::Unchanged
    } else {
        let mut only_seen = next.profile.clone();
        only_seen.last_seen = cur.profile.last_seen;
        if only_seen == cur.profile {
            Durability::Advisory
        } else {
            Durability::Durable
        }
    };
    Ok((next, durability, changed, removed))
}
