//! The push store of the embedded file store ([`crate::PushStore`]): device tokens, mutes, the
//! outbox's jobs, dead letters and idempotency records, all kept in memory ([`state`]) and made
//! durable in `<data_dir>/push/` as numbered snapshot and log files ([`layout`]).
//!
//! A change takes the state lock, is validated, changes memory and queues its encoded records
//! for the one writer thread ([`log`]) before the lock is let go, so the log holds the records
//! in the order memory took them; the caller then waits until the writer has made them durable.
//! Reads answer from memory under the lock and never wait for I/O. Compaction ([`compact`])
//! replaces a long log by a snapshot, and start-up reads the newest snapshot and the logs after
//! it ([`recovery`]).

mod compact;
mod layout;
mod log;
#[cfg(test)]
mod model_tests;
mod recovery;
mod state;
#[cfg(test)]
mod tests;

use crate::rules::check_user;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use bimip_proto::store::{
    DeadLetter, DeviceToken, IdempotencyRecord, JobRemoval, Mute, OutboxJob, PushRecord,
    outbox_job::Job, push_record::Change,
};
use bimip_proto::v1::Platform;
use tokio::sync::oneshot;

use super::record::encode_line_into;
use super::recovery::{io_err, sync_dir};
use super::{FileStore, FsyncMode, RecoveryReport};
use crate::{PushStore, StoreError, TokenMatch};

pub use recovery::PushUserFiles;
pub(crate) use recovery::check_push;
use state::{At, PushState, device_key};

/// The longest device token accepted, in bytes (FCM tokens are about 160, APNs 64).
pub const MAX_TOKEN_BYTES: usize = 4096;
/// The longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 1024;

/// When the push log is compacted, and how long removed jobs are remembered. The defaults suit
/// production; tests make compaction frequent.
#[derive(Debug, Clone)]
pub struct PushTuning {
    /// The log is compacted once it is over this many bytes …
    pub compact_min_log_bytes: u64,
    /// … and over this many times the size of the last snapshot.
    pub compact_log_ratio: u64,
    /// A removed job is remembered at least this long, so that an older put of it that is still
    /// on its way is ignored; compaction forgets older removals.
    pub tombstone_ttl: Duration,
    /// The store's clock (tests set it; otherwise the system clock).
    pub(crate) clock: Clock,
}

impl Default for PushTuning {
    fn default() -> Self {
        PushTuning {
            compact_min_log_bytes: 4 << 20,
            compact_log_ratio: 2,
            tombstone_ttl: Duration::from_secs(600),
            clock: Clock::default(),
        }
    }
}

/// Unix ms: the system clock, or a hand-set one in tests.
#[derive(Debug, Clone, Default)]
pub(crate) struct Clock(Option<Arc<AtomicI64>>);

impl Clock {
    pub fn now(&self) -> i64 {
        match &self.0 {
            Some(t) => t.load(std::sync::atomic::Ordering::Relaxed),
            None => bimip_proto::now_ms(),
        }
    }

    #[cfg(test)]
    pub fn manual(t: Arc<AtomicI64>) -> Self {
        Clock(Some(t))
    }
}

/// What callers and the writer share.
pub(crate) struct Shared {
    locked: Mutex<Locked>,
    clock: Clock,
    dir: PathBuf,
}

pub(crate) struct Locked {
    pub state: PushState,
    /// The writer's queue; `None` once the store is shut down.
    pub tx: Option<mpsc::Sender<log::Msg>>,
    /// The log new records go to (tombstones remember it, see [`state::ForgetRule`]).
    pub log: u64,
    /// Set while the writer reads the state back after a failed write (or for good if that
    /// failed too): changes are refused meanwhile.
    pub failed: Option<String>,
    /// What the last compaction did (for tests and the throughput measurement).
    pub last_compaction: Option<compact::Compacted>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Locked> {
        self.locked.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The push side of a [`FileStore`].
pub(crate) struct PushFiles {
    shared: Arc<Shared>,
}

type Durable = oneshot::Receiver<Result<(), StoreError>>;

async fn durable(rx: Durable) -> Result<(), StoreError> {
    rx.await.unwrap_or(Err(StoreError::Closed))
}

/// Encodes `change` into `out` and applies it; a record that changes nothing is not written.
fn emit(state: &mut PushState, at: At, out: &mut Vec<u8>, change: Change) -> bool {
    let rec = PushRecord {
        change: Some(change),
    };
    let mark = out.len();
    encode_line_into(&rec, out);
    let applied = rec.change.is_some_and(|c| state.apply(c, at));
    if !applied {
        out.truncate(mark);
    }
    applied
}

/// Encodes a record before the lock is taken (jobs can be large); the change comes back out.
fn pre_encode(change: Change) -> (Vec<u8>, Option<Change>) {
    let rec = PushRecord {
        change: Some(change),
    };
    let mut line = Vec::new();
    encode_line_into(&rec, &mut line);
    (line, rec.change)
}

impl PushFiles {
    /// Reads the push files (see [`recovery`]), adds what it found to `report`, and starts the
    /// writer thread.
    pub fn open(
        data_dir: &Path,
        mode: FsyncMode,
        repair: bool,
        tuning: PushTuning,
        report: &mut RecoveryReport,
    ) -> Result<PushFiles, StoreError> {
        let started = Instant::now();
        let dir = layout::push_dir(data_dir);
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
            sync_dir(data_dir)?;
        }
        let clock = tuning.clock.clone();
        let loaded = recovery::load(
            data_dir,
            recovery::LoadOptions {
                repair,
                cleanup: true,
                now: clock.now(),
            },
        )?;
        let log_file = log::open_log(&dir, &layout::log_path(&dir, loaded.log))?;
        let counts = loaded.state.counts();
        report.records += loaded.records;
        report.truncated.extend(loaded.truncated);
        report.repaired.extend(loaded.repaired);
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            locked: Mutex::new(Locked {
                state: loaded.state,
                tx: Some(tx),
                log: loaded.log,
                failed: None,
                last_compaction: None,
            }),
            clock: clock.clone(),
            dir: dir.clone(),
        });
        let writer = log::Writer::new(
            Arc::downgrade(&shared),
            rx,
            data_dir.to_path_buf(),
            mode,
            tuning,
            clock,
            loaded.log,
            log_file,
            loaded.snapshot_bytes,
        );
        std::thread::Builder::new()
            .name("bimip-push-log".into())
            .spawn(move || writer.run())
            .map_err(|e| io_err(&dir, e))?;
        tracing::info!(
            devices = counts.devices,
            mutes = counts.mutes,
            jobs = counts.jobs,
            dead_letters = counts.dead_letters,
            idempotency = counts.idempotency,
            files = loaded.files,
            records = loaded.records,
            log = loaded.log,
            took_ms = started.elapsed().as_millis() as u64,
            "push store opened"
        );
        Ok(PushFiles { shared })
    }

    /// Runs one change under the state lock and queues its records (see the module docs);
    /// returns `f`'s result and what resolves once the records are durable.
    fn submit<T>(
        &self,
        f: impl FnOnce(&mut PushState, At, &mut Vec<u8>) -> Result<T, StoreError>,
    ) -> Result<(T, Durable), StoreError> {
        let now = self.shared.clock.now();
        let mut g = self.shared.lock();
        let Locked {
            state,
            tx,
            log,
            failed,
            ..
        } = &mut *g;
        let Some(tx) = tx.as_ref() else {
            return Err(StoreError::Closed);
        };
        if let Some(why) = failed {
            return Err(io_err(
                &self.shared.dir,
                std::io::Error::other(format!(
                    "push changes are refused after a failed log write ({why})"
                )),
            ));
        }
        let at = At { log: *log, now };
        let mut lines = Vec::new();
        let t = f(state, at, &mut lines)?;
        let (reply, rx) = oneshot::channel();
        let msg = if lines.is_empty() {
            log::Msg::Sync { reply }
        } else {
            log::Msg::Write { lines, reply }
        };
        tx.send(msg).map_err(|_| StoreError::Closed)?;
        Ok((t, rx))
    }

    /// Makes everything written so far durable, writes the advisory last-push times and stops
    /// the writer; later changes are refused.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        let sent = {
            let mut g = self.shared.lock();
            g.tx.take()
                .is_some_and(|tx| tx.send(log::Msg::Shutdown { reply }).is_ok())
        };
        if sent {
            let _ = rx.await;
        }
    }

    /// Tests: stops the writer as a crash would (queued changes are lost unanswered, nothing
    /// advisory is written), and waits until it and any compaction have stopped.
    #[cfg(test)]
    pub async fn crash(&self) {
        let (reply, rx) = oneshot::channel();
        let sent = {
            let mut g = self.shared.lock();
            g.tx.take()
                .is_some_and(|tx| tx.send(log::Msg::Crash { reply }).is_ok())
        };
        if sent {
            let _ = rx.await;
        }
    }

    /// Compacts now: answered once the new snapshot is in place.
    pub async fn compact(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        {
            let g = self.shared.lock();
            let tx = g.tx.as_ref().ok_or(StoreError::Closed)?;
            tx.send(log::Msg::Compact { reply })
                .map_err(|_| StoreError::Closed)?;
        }
        durable(rx).await
    }

    /// Reads answer from memory.
    fn read<T>(&self, f: impl FnOnce(&PushState, i64) -> T) -> T {
        let now = self.shared.clock.now();
        let g = self.shared.lock();
        f(&g.state, now)
    }

    #[cfg(test)]
    fn counts(&self) -> state::Counts {
        self.shared.lock().state.counts()
    }

    async fn put_device_token(
        &self,
        token: DeviceToken,
    ) -> Result<Vec<(String, String)>, StoreError> {
        check_device_token(&token)?;
        let (removed, rx) = self.submit(|state, at, out| {
            let mut t = token;
            if t.registered_at <= 0 {
                t.registered_at = at.now;
            }
            // A phone that changed hands: its token leaves the old user or device first.
            let mut removed = Vec::new();
            if let Some((u, d)) = state.holder(t.platform, &t.token).cloned()
                && (u != t.user || d != t.device)
            {
                emit(state, at, out, Change::RemoveDevice(device_key(&u, &d)));
                removed.push((u, d));
            }
            // Registering the same token again keeps what is known of its last push.
            if let Some(prev) = state.device(&t.user, &t.device)
                && prev.platform == t.platform
                && prev.token == t.token
            {
                t.last_push_at = t.last_push_at.max(prev.last_push_at);
            }
            emit(state, at, out, Change::PutDevice(t));
            Ok(removed)
        })?;
        durable(rx).await?;
        Ok(removed)
    }

    async fn remove_device_token(
        &self,
        user: &str,
        device: &str,
        only_if: Option<TokenMatch>,
    ) -> Result<bool, StoreError> {
        check_user(user)?;
        check_device(device)?;
        let (removed, rx) = self.submit(|state, at, out| {
            let Some(cur) = state.device(user, device) else {
                return Ok(false);
            };
            if let Some(m) = &only_if
                && (cur.token != m.token || cur.registered_at > m.registered_at)
            {
                return Ok(false);
            }
            Ok(emit(
                state,
                at,
                out,
                Change::RemoveDevice(device_key(user, device)),
            ))
        })?;
        durable(rx).await?;
        Ok(removed)
    }

    async fn set_mute(&self, user: &str, other: &str, muted: bool) -> Result<bool, StoreError> {
        check_user(user)?;
        check_user(other)?;
        if user == other {
            return Err(StoreError::Invalid(format!(
                "user {user:?} cannot mute itself"
            )));
        }
        let (changed, rx) = self.submit(|state, at, out| {
            if state.is_muted(user, other) == muted {
                return Ok(false);
            }
            let m = Mute {
                user: user.to_string(),
                other: other.to_string(),
                since: if muted { at.now } else { 0 },
            };
            let change = if muted {
                Change::PutMute(m)
            } else {
                Change::RemoveMute(m)
            };
            Ok(emit(state, at, out, change))
        })?;
        durable(rx).await?;
        Ok(changed)
    }

    async fn put_jobs(&self, jobs: Vec<OutboxJob>) -> Result<(), StoreError> {
        for j in &jobs {
            check_job(j)?;
        }
        let encoded: Vec<(Vec<u8>, Option<Change>)> = jobs
            .into_iter()
            .map(|j| pre_encode(Change::PutJob(j)))
            .collect();
        self.apply_encoded(encoded).await
    }

    async fn remove_jobs(&self, jobs: Vec<(u64, u64)>) -> Result<(), StoreError> {
        let encoded: Vec<(Vec<u8>, Option<Change>)> = jobs
            .into_iter()
            .map(|(id, version)| pre_encode(Change::RemoveJob(JobRemoval { id, version })))
            .collect();
        self.apply_encoded(encoded).await
    }

    /// Applies records encoded before the lock; writes the ones that changed the state.
    async fn apply_encoded(
        &self,
        encoded: Vec<(Vec<u8>, Option<Change>)>,
    ) -> Result<(), StoreError> {
        let ((), rx) = self.submit(|state, at, out| {
            for (line, change) in encoded {
                if change.is_some_and(|c| state.apply(c, at)) {
                    out.extend_from_slice(&line);
                }
            }
            Ok(())
        })?;
        durable(rx).await
    }

    async fn add_dead_letter(&self, dead: DeadLetter) -> Result<(), StoreError> {
        let (line, change) = pre_encode(Change::DeadLetter(dead));
        self.apply_encoded(vec![(line, change)]).await
    }

    async fn put_idempotency(&self, rec: IdempotencyRecord) -> Result<(), StoreError> {
        check_idempotency_key(&rec.key)?;
        let ((), rx) = self.submit(|state, at, out| {
            // Already expired: nothing to keep (and an older answer for the key stays).
            if rec.expires_at >= at.now {
                emit(state, at, out, Change::PutIdempotency(rec));
            }
            Ok(())
        })?;
        durable(rx).await
    }
}

// ---- validation (also what a line read back must pass, see `recovery::semantic`) ----

pub(crate) fn check_device(device: &str) -> Result<(), StoreError> {
    bimip_proto::validate_device_id(device)
        .map_err(|e| StoreError::Invalid(format!("invalid device id {device:?}: {e}")))
}

pub(crate) fn check_device_token(t: &DeviceToken) -> Result<(), StoreError> {
    check_user(&t.user)?;
    check_device(&t.device)?;
    let what = || format!("push token of {}/{}", t.user, t.device);
    match Platform::try_from(t.platform) {
        Ok(Platform::Fcm | Platform::Apns | Platform::Webhook) => {}
        Ok(Platform::Unspecified) => {
            return Err(StoreError::Invalid(format!(
                "{}: the platform is unspecified",
                what()
            )));
        }
        Err(_) => {
            return Err(StoreError::Invalid(format!(
                "{}: unknown platform {}",
                what(),
                t.platform
            )));
        }
    }
    if t.token.is_empty() {
        return Err(StoreError::Invalid(format!(
            "{}: the token is empty",
            what()
        )));
    }
    if t.token.len() > MAX_TOKEN_BYTES {
        return Err(StoreError::Invalid(format!(
            "{}: the token is {} bytes long, at most {MAX_TOKEN_BYTES} are allowed",
            what(),
            t.token.len()
        )));
    }
    Ok(())
}

pub(crate) fn check_job(j: &OutboxJob) -> Result<(), StoreError> {
    match &j.job {
        None => Err(StoreError::Invalid(format!(
            "job {} has neither a push nor an event",
            j.id
        ))),
        Some(Job::Push(p)) => {
            check_user(&p.user)?;
            if p.device.is_empty() {
                Ok(())
            } else {
                check_device(&p.device)
            }
        }
        Some(Job::Event(_)) => Ok(()),
    }
}

pub(crate) fn check_idempotency_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::Invalid("the idempotency key is empty".into()));
    }
    if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(StoreError::Invalid(format!(
            "the idempotency key is {} bytes long, at most {MAX_IDEMPOTENCY_KEY_BYTES} are allowed",
            key.len()
        )));
    }
    Ok(())
}

// ---- the public face ----

impl FileStore {
    /// Compacts the push files now (normally done when the log grows large, see
    /// [`PushTuning`]): answered once the new snapshot is in place.
    pub async fn compact_push(&self) -> Result<(), StoreError> {
        self.inner.push.compact().await
    }
}

/// Decodes the push files under `data_dir` read-only and returns `user`'s devices and mutes
/// (for `bimip inspect`; safe while the server runs).
pub fn inspect_push_user(data_dir: &Path, user: &str) -> Result<PushUserFiles, StoreError> {
    recovery::inspect(data_dir, user, bimip_proto::now_ms())
}

impl PushStore for FileStore {
    async fn put_device_token(
        &self,
        token: DeviceToken,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.inner.push.put_device_token(token).await
    }

    async fn remove_device_token(
        &self,
        user: &str,
        device: &str,
        only_if: Option<TokenMatch>,
    ) -> Result<bool, StoreError> {
        self.inner
            .push
            .remove_device_token(user, device, only_if)
            .await
    }

    async fn device_tokens(&self, user: &str) -> Result<Vec<DeviceToken>, StoreError> {
        check_user(user)?;
        Ok(self.inner.push.read(|s, _| s.device_tokens(user)))
    }

    async fn has_device_tokens(&self, user: &str) -> bool {
        self.inner.push.read(|s, _| s.has_device_tokens(user))
    }

    async fn note_pushed(&self, user: &str, device: &str, at: i64) {
        let mut g = self.inner.push.shared.lock();
        g.state.note_pushed(user, device, at);
    }

    async fn set_mute(&self, user: &str, other: &str, muted: bool) -> Result<bool, StoreError> {
        self.inner.push.set_mute(user, other, muted).await
    }

    async fn mutes(&self, user: &str) -> Result<Vec<Mute>, StoreError> {
        check_user(user)?;
        Ok(self.inner.push.read(|s, _| s.mutes(user)))
    }

    async fn is_muted(&self, user: &str, other: &str) -> bool {
        self.inner.push.read(|s, _| s.is_muted(user, other))
    }

    async fn put_jobs(&self, jobs: Vec<OutboxJob>) -> Result<(), StoreError> {
        self.inner.push.put_jobs(jobs).await
    }

    async fn remove_jobs(&self, jobs: Vec<(u64, u64)>) -> Result<(), StoreError> {
        self.inner.push.remove_jobs(jobs).await
    }

    async fn jobs(&self) -> Result<Vec<OutboxJob>, StoreError> {
        Ok(self.inner.push.read(|s, _| s.jobs()))
    }

    async fn add_dead_letter(&self, dead: DeadLetter) -> Result<(), StoreError> {
        self.inner.push.add_dead_letter(dead).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        Ok(self.inner.push.read(|s, _| s.dead_letters(limit)))
    }

    async fn idempotency(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        check_idempotency_key(key)?;
        Ok(self.inner.push.read(|s, now| s.idempotency(key, now)))
    }

    async fn put_idempotency(&self, rec: IdempotencyRecord) -> Result<(), StoreError> {
        self.inner.push.put_idempotency(rec).await
    }
}
