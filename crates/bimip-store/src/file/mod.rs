//! The embedded file store (docs/ARCHITECTURE.md, "The store"): per-user append-only files of Base64 lines
//! ([`record`]), decoded lazily into per-user state ([`queue`]) owned by writer threads
//! ([`shard`]) that group-commit, and start-up recovery ([`recovery`]). Next to the users, the
//! push store (`push`): one in-memory state with its own writer, snapshots and logs.

mod behind;
mod check;
#[cfg(test)]
mod compaction_tests;
mod profile;
#[cfg(test)]
mod profile_tests;
mod push;
mod queue;
pub mod record;
mod recovery;
mod shard;
#[cfg(test)]
mod tests;
mod wal;
#[cfg(test)]
mod wal_tests;
mod writer;

use crate::rules::check_user;
use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Mutex, MutexGuard, mpsc, oneshot};

pub use check::{CheckReport, Problem, check_data_dir};
use profile::{Edit, Edited};
pub use push::{
    MAX_IDEMPOTENCY_KEY_BYTES, MAX_TOKEN_BYTES, PushTuning, PushUserFiles, inspect_push_user,
};
/// The push store's input rules, shared with the Redis backend.
pub(crate) use push::{check_device, check_device_token, check_idempotency_key, check_job};
use shard::{Cmd, Inbox, Shard, ShardConfig};
pub use wal::LogReport;

use crate::{
    AckOutcome, AckRequest, Appended, CopyTo, NewItem, Pending, PendingForDevice, PresenceUpdate,
    Profile, ProfileStore, QueueStore, ReadBatch, ReadRequest, StoreError, Unread,
};

/// When appends are fsynced before they are acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncMode {
    /// fsync after every append, before its result is returned.
    Always,
    /// Group commit: one fsync covers every append of a short window (<= 5 ms).
    #[default]
    Batch,
    /// Never fsync (the OS writes back when it likes): fastest, loses recent data on power loss.
    Never,
}

impl std::str::FromStr for FsyncMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(FsyncMode::Always),
            "batch" => Ok(FsyncMode::Batch),
            "never" => Ok(FsyncMode::Never),
            other => Err(format!(
                "unknown fsync mode {other:?}: expected always, batch or never"
            )),
        }
    }
}

/// Receives store timings (for metrics).
pub trait StoreObserver: Send + Sync {
    /// One fsync round finished: how long it took and how many appends it covered.
    fn fsync(&self, took: Duration, appends: usize);

    /// A user's files were compacted: items dropped and kept, and how long the rewrite took.
    fn compacted(&self, _user: &str, _dropped: u64, _kept: u64, _took: Duration) {}

    /// `max_queue_items` dropped `n` items of `user` that nobody had acknowledged.
    fn dropped_unacked(&self, _user: &str, _n: u64) {}
}

/// Settings of the file store.
#[derive(Clone)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    pub fsync: FsyncMode,
    pub shards: usize,
    pub max_open_files: usize,
    pub cache_users: usize,
    /// Repair mid-file corruption at start instead of refusing to start.
    pub repair: bool,
    /// Acknowledged items older than this are dropped by compaction; zero keeps them forever.
    pub retention: Duration,
    /// Most items kept per user queue (the oldest are dropped first, unacknowledged ones only
    /// when acknowledged ones do not suffice); 0 = no limit.
    pub max_queue_items: usize,
    /// With `fsync = batch | always`: commit through a per-shard commit log (one sequential
    /// append and one fdatasync per commit) instead of syncing every touched user file.
    pub commit_log: bool,
    pub observer: Option<Arc<dyn StoreObserver>>,
}

/// What start-up found and fixed.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    pub users: usize,
    pub records: u64,
    /// Files whose torn or corrupt last line was cut off: (file, line number, reason).
    pub truncated: Vec<(PathBuf, u64, String)>,
    /// Files repaired by `repair` (bad lines dropped, original kept aside).
    pub repaired: Vec<(PathBuf, u64, String)>,
    /// Users whose files look like compaction has work; their shards look at them first.
    pub compaction_due: Vec<String>,
    /// What the commit logs left by the last run held, and how much of it the user files lacked.
    pub log: LogReport,
}

/// The embedded file store: `shards` writer threads, each owning a slice of the users.
#[derive(Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Vec<mpsc::Sender<Cmd>>,
    /// Device tokens, mutes, the outbox's jobs, dead letters, idempotency records.
    push: push::PushFiles,
    closed: AtomicBool,
    /// Serializes profile changes that touch the same users (striped by user id hash): a
    /// cross-user change locks the stripes of every user it touches, in index order.
    relation_locks: Vec<Mutex<()>>,
}

/// Stripes of [`Inner::relation_locks`].
const RELATION_STRIPES: usize = 64;

/// How often shards are asked to write profiles whose last seen is only in memory.
#[cfg(not(test))]
const LAZY_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
#[cfg(test)]
const LAZY_FLUSH_INTERVAL: Duration = Duration::from_millis(100);

impl StoreConfig {
    /// Defaults for `data_dir`: group commit, a few shards, bounded caches, no repair.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            data_dir: data_dir.into(),
            fsync: FsyncMode::Batch,
            shards: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .clamp(1, 8),
            max_open_files: 4096,
            cache_users: 100_000,
            repair: false,
            retention: DEFAULT_RETENTION,
            max_queue_items: DEFAULT_MAX_QUEUE_ITEMS,
            commit_log: true,
            observer: None,
        }
    }
}

/// Default of [`StoreConfig::retention`]: 7 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default of [`StoreConfig::max_queue_items`].
pub const DEFAULT_MAX_QUEUE_ITEMS: usize = 100_000;

/// Commands queued per shard before senders wait (back-pressure).
const CHANNEL_CAPACITY: usize = 4096;

/// A stable hash (FNV-1a), so a user always maps to the same shard.
pub(crate) fn shard_of(user: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in user.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards as u64) as usize
}

impl FileStore {
    /// Recovers every user's files and the push files (see [`RecoveryReport`]) and starts the
    /// shard threads and the push writer.
    pub fn open(cfg: StoreConfig) -> Result<(FileStore, RecoveryReport), StoreError> {
        FileStore::open_with(cfg, PushTuning::default())
    }

    /// [`FileStore::open`] with the push store's compaction and tombstone settings.
    pub fn open_with(
        cfg: StoreConfig,
        push: PushTuning,
    ) -> Result<(FileStore, RecoveryReport), StoreError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| recovery::io_err(&cfg.data_dir, e))?;
        let limits = queue::Limits {
            retention_ms: i64::try_from(cfg.retention.as_millis()).unwrap_or(i64::MAX),
            max_items: cfg.max_queue_items,
        };
        // The logs first: they may hold lines the user files lost (a machine crash before a
        // checkpoint), and the files are complete only once those are written back.
        let (mut truncated, mut repaired) = (Vec::new(), Vec::new());
        let log = wal::recover(&cfg.data_dir, cfg.repair, &mut truncated, &mut repaired)?;
        let mut report = recovery::recover(&cfg.data_dir, cfg.repair, limits)?;
        report.log = log;
        report.truncated.extend(truncated);
        report.repaired.extend(repaired);
        let push = push::PushFiles::open(&cfg.data_dir, cfg.fsync, cfg.repair, push, &mut report)?;
        let n = cfg.shards.max(1);
        let mut due: Vec<Vec<String>> = vec![Vec::new(); n];
        for user in &report.compaction_due {
            due[shard_of(user, n)].push(user.clone());
        }
        // Shards hand each other follow-up appends (a sender's copy) through these inboxes,
        // never by waiting on each other's bounded channel (see [`Inbox`]).
        let channels: Vec<_> = (0..n).map(|_| mpsc::channel(CHANNEL_CAPACITY)).collect();
        let inboxes: Arc<Vec<Inbox>> = Arc::new(
            channels
                .iter()
                .map(|(tx, _)| Inbox::new(tx.downgrade()))
                .collect(),
        );
        let mut shards = Vec::with_capacity(n);
        let logged = cfg.commit_log && cfg.fsync != FsyncMode::Never;
        for (i, (due, (tx, rx))) in due.into_iter().zip(channels).enumerate() {
            let wal = if logged {
                Some(wal::Wal::open(&cfg.data_dir, i)?)
            } else {
                None
            };
            let shard = Shard::new(ShardConfig {
                wal,
                index: i,
                inboxes: inboxes.clone(),
                data_dir: cfg.data_dir.clone(),
                mode: cfg.fsync,
                cache_users: (cfg.cache_users / n).max(1),
                open_files: (cfg.max_open_files / n).max(1),
                observer: cfg.observer.clone(),
                limits,
                due,
            });
            std::thread::Builder::new()
                .name(format!("bimip-store-{i}"))
                .spawn(move || shard.run(rx))
                .map_err(|e| recovery::io_err(&cfg.data_dir, e))?;
            shards.push(tx);
        }
        // Asks every shard to write lazily kept last-seen changes, until the store is dropped or
        // shut down (weak senders: this thread never keeps a shard alive).
        let weak: Vec<mpsc::WeakSender<Cmd>> = shards.iter().map(|s| s.downgrade()).collect();
        std::thread::Builder::new()
            .name("bimip-store-tick".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(LAZY_FLUSH_INTERVAL);
                    for w in &weak {
                        let Some(tx) = w.upgrade() else { return };
                        if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Cmd::Tick) {
                            return;
                        }
                    }
                }
            })
            .map_err(|e| recovery::io_err(&cfg.data_dir, e))?;
        tracing::info!(
            users = report.users,
            records = report.records,
            truncated = report.truncated.len(),
            repaired = report.repaired.len(),
            compaction_due = report.compaction_due.len(),
            commit_log_records = report.log.records,
            commit_log_written_back = report.log.missing,
            "file store recovered"
        );
        Ok((
            FileStore {
                inner: Arc::new(Inner {
                    shards,
                    push,
                    closed: AtomicBool::new(false),
                    relation_locks: (0..RELATION_STRIPES).map(|_| Mutex::new(())).collect(),
                }),
            },
            report,
        ))
    }

    async fn send(&self, user: &str, cmd: Cmd) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        let shard = &self.inner.shards[shard_of(user, self.inner.shards.len())];
        shard.send(cmd).await.map_err(|_| StoreError::Closed)
    }

    /// Applies one user's side of a profile change through that user's shard.
    async fn edit_profile(&self, user: &str, edit: Edit) -> Result<Edited, StoreError> {
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::EditProfile {
            user: user.to_string(),
            edit,
            reply,
        };
        self.send(user, cmd).await?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Compacts one user's files now (normally done in the background, see
    /// [`StoreConfig::retention`] and [`StoreConfig::max_queue_items`]).
    pub async fn compact(&self, user: &str) -> Result<crate::Compaction, StoreError> {
        check_user(user)?;
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Compact {
            user: user.to_string(),
            reply,
        };
        self.send(user, cmd).await?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Locks the relation stripes of `users` in index order (no deadlock between callers).
    async fn lock_relations<'s, 'u>(
        &'s self,
        users: impl IntoIterator<Item = &'u str>,
    ) -> Vec<MutexGuard<'s, ()>> {
        let mut stripes: Vec<usize> = users
            .into_iter()
            .map(|u| shard_of(u, RELATION_STRIPES))
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for i in stripes {
            guards.push(self.inner.relation_locks[i].lock().await);
        }
        guards
    }
}

impl ProfileStore for FileStore {
    async fn profile(&self, user: &str) -> Result<Profile, StoreError> {
        check_user(user)?;
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Profile {
            user: user.to_string(),
            reply,
        };
        self.send(user, cmd).await?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    async fn put_contacts(
        &self,
        user: &str,
        entries: Vec<(String, bool)>,
        replace: bool,
    ) -> Result<usize, StoreError> {
        crate::rules::check_contacts(user, &entries)?;
        // The last flag of a repeated contact wins.
        let wanted: std::collections::BTreeMap<String, bool> = entries.iter().cloned().collect();
        // `replace` also touches the current contacts: lock them too, and start over if they
        // changed before the locks were held.
        let mut known: Vec<String> = Vec::new();
        loop {
            let _guards = self
                .lock_relations(
                    std::iter::once(user)
                        .chain(wanted.keys().map(String::as_str))
                        .chain(known.iter().map(String::as_str)),
                )
                .await;
            let cur = self.profile(user).await?;
            if replace {
                let missing: Vec<String> = cur
                    .contacts
                    .keys()
                    .filter(|c| !wanted.contains_key(*c) && !known.contains(*c))
                    .cloned()
                    .collect();
                if !missing.is_empty() {
                    known.extend(missing);
                    continue;
                }
            }
            // Reverse sides of new or changed entries first ...
            for (c, one_way) in &wanted {
                if cur.contacts.get(c) != Some(one_way) {
                    let by = user.to_string();
                    let edit = Edit::ListedBy {
                        by,
                        one_way: Some(*one_way),
                    };
                    self.edit_profile(c, edit).await?;
                }
            }
            // ... then the user's own side ...
            let own = self
                .edit_profile(
                    user,
                    Edit::Contacts {
                        entries: wanted.clone().into_iter().collect(),
                        replace,
                    },
                )
                .await?;
            // ... and for dropped contacts the reverse side last.
            for c in &own.removed {
                let edit = Edit::ListedBy {
                    by: user.to_string(),
                    one_way: None,
                };
                self.edit_profile(c, edit).await?;
            }
            return Ok(own.changed);
        }
    }

    async fn remove_contact(&self, user: &str, contact: &str) -> Result<bool, StoreError> {
        check_user(user)?;
        check_user(contact)?;
        let _guards = self.lock_relations([user, contact]).await;
        let edit = Edit::RemoveContact {
            contact: contact.to_string(),
        };
        let existed = self.edit_profile(user, edit).await?.changed > 0;
        // Always, so that repeating the call clears a reverse entry a crash left behind.
        let edit = Edit::ListedBy {
            by: user.to_string(),
            one_way: None,
        };
        self.edit_profile(contact, edit).await?;
        Ok(existed)
    }

    async fn set_block(&self, user: &str, other: &str, blocked: bool) -> Result<bool, StoreError> {
        crate::rules::check_block(user, other)?;
        let _guards = self.lock_relations([user, other]).await;
        let reverse = Edit::BlockedBy {
            by: user.to_string(),
            blocked,
        };
        let own = Edit::Block {
            other: other.to_string(),
            blocked,
        };
        let changed = if blocked {
            self.edit_profile(other, reverse).await?;
            self.edit_profile(user, own).await?.changed > 0
        } else {
            let changed = self.edit_profile(user, own).await?.changed > 0;
            self.edit_profile(other, reverse).await?;
            changed
        };
        Ok(changed)
    }

    async fn set_presence(
        &self,
        user: &str,
        update: PresenceUpdate,
    ) -> Result<Profile, StoreError> {
        check_user(user)?;
        Ok(self
            .edit_profile(user, Edit::Presence(update))
            .await?
            .profile)
    }
}

impl QueueStore for FileStore {
    async fn enqueue_append(
        &self,
        user: &str,
        item: NewItem,
    ) -> Result<Pending<Appended>, StoreError> {
        check_user(user)?;
        let (reply, rx) = oneshot::channel();
        let user_s = user.to_string();
        self.send(
            user,
            Cmd::Append {
                user: user_s,
                item,
                reply,
                copy: None,
            },
        )
        .await?;
        Ok(Pending::new(rx))
    }
    async fn enqueue_append_with_copy(
        &self,
        user: &str,
        item: NewItem,
        copy: CopyTo,
    ) -> Result<(Pending<Appended>, Pending<Appended>), StoreError> {
        check_user(user)?;
        check_user(&copy.user)?;
        let (reply, rx) = oneshot::channel();
        let (copy_reply, copy_rx) = oneshot::channel();
        self.send(
            user,
            Cmd::Append {
                user: user.to_string(),
                item,
                reply,
                copy: Some(Box::new((copy, copy_reply))),
            },
        )
        .await?;
        Ok((Pending::new(rx), Pending::new(copy_rx)))
    }
    async fn acknowledge(&self, user: &str, req: AckRequest) -> Result<AckOutcome, StoreError> {
        check_user(user)?;
        let (reply, rx) = oneshot::channel();
        self.send(
            user,
            Cmd::Ack {
                user: user.to_string(),
                req,
                reply,
            },
        )
        .await?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }
    async fn read(&self, user: &str, req: ReadRequest) -> Result<ReadBatch, StoreError> {
        check_user(user)?;
        let (reply, rx) = oneshot::channel();
        self.send(
            user,
            Cmd::Read {
                user: user.to_string(),
                req,
                reply,
            },
        )
        .await?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }
    async fn pending(&self, user: &str, device: &str) -> Result<PendingForDevice, StoreError> {
        check_user(user)?;
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Pending {
            user: user.to_string(),
            device: device.to_string(),
            reply,
        };
        self.send(user, cmd).await?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }
    async fn unread(&self, user: &str) -> Result<Unread, StoreError> {
        check_user(user)?;
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Unread {
            user: user.to_string(),
            reply,
        };
        self.send(user, cmd).await?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }
    async fn shutdown(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // Two phases: once every shard has handled what was queued before the store closed,
        // every sender's copy those commands hand another shard is in that shard's inbox; only
        // then are the shards stopped, and each takes its inbox before it stops.
        for shard in &self.inner.shards {
            let (reply, rx) = oneshot::channel();
            if shard.send(Cmd::Barrier { reply }).await.is_ok() {
                let _ = rx.await;
            }
        }
        for shard in &self.inner.shards {
            let (reply, rx) = oneshot::channel();
            if shard.send(Cmd::Shutdown { reply }).await.is_ok() {
                let _ = rx.await;
            }
        }
        self.inner.push.shutdown().await;
    }
}

impl FileStore {
    /// Tests: every shard commits what it has and writes every logged line to its user file
    /// (what a test then reads from the files is what the store wrote).
    #[cfg(test)]
    pub(crate) async fn write_behind(&self) {
        for shard in &self.inner.shards {
            let (reply, rx) = oneshot::channel();
            if shard.send(Cmd::Barrier { reply }).await.is_ok() {
                let _ = rx.await;
            }
        }
    }

    /// Tests: the push writer stops as in a crash (see `PushFiles::crash`), the shards stop.
    #[cfg(test)]
    pub(crate) async fn crash_push(&self) {
        self.inner.push.crash().await;
        self.shutdown().await;
    }
}

/// A user's two files decoded, for `bimip inspect` (reads the files directly; the server may be
/// running or not).
#[derive(Debug, Clone, Default)]
pub struct UserFiles {
    pub queue_path: PathBuf,
    pub index_path: PathBuf,
    /// (line number, record), in file order.
    pub queue: Vec<(u64, bimip_proto::store::QueueRecord)>,
    pub index: Vec<(u64, bimip_proto::store::IndexRecord)>,
    /// `bimip_profile_<user>.dat` (contacts, blocks, intent, invisibility, last seen).
    pub profile_path: PathBuf,
    /// The decoded profile; `None` when the user has no profile file (or it is undecodable,
    /// which is then listed in `problems`).
    pub profile: Option<bimip_proto::store::Profile>,
    /// Lines that could not be decoded: (file, line number, reason).
    pub problems: Vec<(PathBuf, u64, String)>,
}

/// Decodes the files of `user` under `data_dir` without changing them.
pub fn inspect_user(data_dir: &std::path::Path, user: &str) -> Result<UserFiles, StoreError> {
    recovery::inspect(data_dir, user)
}

/// The queue file of `user` (BimipQueue).
pub(crate) fn queue_path(data_dir: &std::path::Path, user: &str) -> PathBuf {
    user_dir(data_dir, user).join(format!("bimip_queue_{user}.dat"))
}

/// The index file of `user` (BimipQueueIndex).
pub(crate) fn index_path(data_dir: &std::path::Path, user: &str) -> PathBuf {
    user_dir(data_dir, user).join(format!("bimip_queue_index_{user}.dat"))
}

/// `<data_dir>/bimip/<prefix>/<user>/`, prefix = first byte of SHA-256(user) as two hex digits.
pub fn user_dir(data_dir: &std::path::Path, user: &str) -> PathBuf {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(user.as_bytes());
    data_dir
        .join("bimip")
        .join(hex::encode(&digest[..1]))
        .join(user)
}
