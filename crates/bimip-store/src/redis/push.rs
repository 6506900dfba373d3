//! [`PushStore`] on Redis, with the same rules as the file store (`file/push/state.rs`); records
//! are the prost-encoded `bimip.store.v1` messages. Key names: [`super::Keys`].
//!
//! - Device tokens: `{u}:tokens` (device → token) and one global index (token → holder) so that a
//!   token has one holder across users. A change reads what it replaces, then a script writes it
//!   only if that is still there (compare-and-set; read again otherwise): two round trips, and
//!   tokens change rarely. [`PushStore::has_device_tokens`] is one `EXISTS`.
//! - Jobs: the job, its version and the removal tombstones in hashes; the version rules run in
//!   Lua. Tombstones are forgotten after [`JOB_TOMBSTONE_TTL`] (far longer than a stale put of a
//!   job can be on its way between nodes).
//! - Dead letters: one list, newest first, trimmed to [`MAX_DEAD_LETTERS`] in the same
//!   MULTI/EXEC. Idempotency records: one key each, expiring at the record's `expires_at`.
//!
//! Several nodes share one Redis, so job ids come from a shared counter
//! ([`RedisStore::reserve_job_ids`]).

use std::sync::LazyLock;
use std::time::Duration;

use bimip_proto::store::{DeadLetter, DeviceToken, IdempotencyRecord, Mute, OutboxJob};
use prost::Message;
use redis::Script;

use super::{RedisStore, map_err};
use crate::file::{check_device, check_device_token, check_idempotency_key, check_job};
use crate::push::MAX_DEAD_LETTERS;
use crate::rules::check_user;
use crate::{PushStore, StoreError, TokenMatch};

/// How long a removed job is remembered, so that an older put of it arriving later (from a node
/// that lagged) does not bring it back.
pub const JOB_TOMBSTONE_TTL: Duration = Duration::from_secs(24 * 3600);

/// How often a compare-and-set starts over before giving up with `Unavailable`. Each round
/// lets at least one of the contenders through, so this bounds the contenders served, not
/// the chance of success.
const MAX_ATTEMPTS: usize = 64;

/// Expiry times beyond this (year 9999) are kept without a Redis expiry.
const MAX_EXPIRES_AT: i64 = 253_402_300_799_999;

static TOKEN_PUT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/push_token_put.lua")));
static TOKEN_REMOVE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/push_token_remove.lua")));
static TOKEN_CAS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/push_token_cas.lua")));
static JOBS_PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/int_cmp.lua"),
        include_str!("lua/push_jobs_put.lua")
    ))
});
static JOBS_REMOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/int_cmp.lua"),
        include_str!("lua/push_jobs_remove.lua")
    ))
});

/// The token index's field for a token: `<platform>\n<token>`.
pub(crate) fn index_field(platform: i32, token: &str) -> String {
    format!("{platform}\n{token}")
}

/// The token index's value for a device: `<user>\n<device>`.
pub(crate) fn holder_value(user: &str, device: &str) -> String {
    format!("{user}\n{device}")
}

/// `<user>\n<device>` back into its parts.
pub(crate) fn split_holder(v: &str) -> Option<(&str, &str)> {
    v.split_once('\n')
}

/// Decodes a stored record; `what` names it for the error.
pub(crate) fn decode<M: Message + Default>(
    bytes: &[u8],
    what: impl Fn() -> String,
) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Internal(format!("{}: does not decode: {e}", what())))
}

impl RedisStore {
    /// Reserves `n` job ids no other node gets: returns the first of `first..first + n`. Ids
    /// start at 1.
    pub async fn reserve_job_ids(&self, n: u64) -> Result<u64, StoreError> {
        let delta = i64::try_from(n)
            .ok()
            .filter(|d| *d > 0)
            .ok_or_else(|| StoreError::Invalid(format!("cannot reserve {n} job ids")))?;
        let last: i64 = redis::cmd("INCRBY")
            .arg(self.inner.keys.job_ids())
            .arg(delta)
            .query_async(&mut self.connection())
            .await
            .map_err(map_err)?;
        u64::try_from(last - delta + 1).map_err(|_| {
            StoreError::Internal(format!(
                "{} holds {last}, below the {n} ids just reserved",
                self.inner.keys.job_ids()
            ))
        })
    }

    /// The device's stored token entry, raw and decoded.
    async fn token_entry(
        &self,
        user: &str,
        device: &str,
    ) -> Result<Option<(Vec<u8>, DeviceToken)>, StoreError> {
        let key = self.inner.keys.tokens(user);
        let raw: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(&key)
            .arg(device)
            .query_async(&mut self.connection())
            .await
            .map_err(map_err)?;
        match raw {
            None => Ok(None),
            Some(raw) => {
                let t = decode::<DeviceToken>(&raw, || format!("{key} {device:?}"))?;
                Ok(Some((raw, t)))
            }
        }
    }
}

impl PushStore for RedisStore {
    async fn put_device_token(
        &self,
        token: DeviceToken,
    ) -> Result<Vec<(String, String)>, StoreError> {
        check_device_token(&token)?;
        let k = &self.inner.keys;
        let user_key = k.tokens(&token.user);
        let field = index_field(token.platform, &token.token);
        let me = holder_value(&token.user, &token.device);
        for _ in 0..MAX_ATTEMPTS {
            // What the change replaces: the device's entry and the token's holder.
            let (cur, holder): (Option<Vec<u8>>, Option<String>) = redis::pipe()
                .cmd("HGET")
                .arg(&user_key)
                .arg(&token.device)
                .cmd("HGET")
                .arg(k.token_index())
                .arg(&field)
                .query_async(&mut self.connection())
                .await
                .map_err(map_err)?;
            let mut t = token.clone();
            if t.registered_at <= 0 {
                t.registered_at = bimip_proto::now_ms();
            }
            let mut old_field = String::new();
            if let Some(raw) = &cur {
                let prev = decode::<DeviceToken>(raw, || format!("{user_key} {:?}", token.device))?;
                if prev.platform == t.platform && prev.token == t.token {
                    // Registering the same token again keeps what is known of its last push.
                    t.last_push_at = t.last_push_at.max(prev.last_push_at);
                } else {
                    old_field = index_field(prev.platform, &prev.token);
                }
            }
            let mut removed = Vec::new();
            let mut holder_key = user_key.clone();
            let mut holder_device = String::new();
            if let Some(h) = holder.as_deref()
                && h != me
            {
                let (hu, hd) = split_holder(h).ok_or_else(|| {
                    StoreError::Internal(format!(
                        "{} {field:?}: {h:?} is not <user>\\n<device>",
                        k.token_index()
                    ))
                })?;
                holder_key = k.tokens(hu);
                holder_device = hd.to_string();
                removed.push((hu.to_string(), hd.to_string()));
            }
            let done: i64 = TOKEN_PUT
                .key(&user_key)
                .key(k.token_index())
                .key(&holder_key)
                .key(k.users())
                .arg(&t.device)
                .arg(t.encode_to_vec())
                .arg(&field)
                .arg(&me)
                .arg(cur.unwrap_or_default())
                .arg(holder.unwrap_or_default())
                .arg(&holder_device)
                .arg(&old_field)
                .arg(&t.user)
                .invoke_async(&mut self.connection())
                .await
                .map_err(map_err)?;
            if done == 1 {
                return Ok(removed);
            }
        }
        Err(StoreError::Unavailable(format!(
            "the push token of {}/{} kept changing; try again",
            token.user, token.device
        )))
    }

    async fn remove_device_token(
        &self,
        user: &str,
        device: &str,
        only_if: Option<TokenMatch>,
    ) -> Result<bool, StoreError> {
        check_user(user)?;
        check_device(device)?;
        let k = &self.inner.keys;
        for _ in 0..MAX_ATTEMPTS {
            let Some((raw, cur)) = self.token_entry(user, device).await? else {
                return Ok(false);
            };
            if let Some(m) = &only_if
                && (cur.token != m.token || cur.registered_at > m.registered_at)
            {
                return Ok(false);
            }
            let done: i64 = TOKEN_REMOVE
                .key(k.tokens(user))
                .key(k.token_index())
                .arg(device)
                .arg(raw)
                .arg(index_field(cur.platform, &cur.token))
                .arg(holder_value(user, device))
                .invoke_async(&mut self.connection())
                .await
                .map_err(map_err)?;
            if done == 1 {
                return Ok(true);
            }
        }
        Err(StoreError::Unavailable(format!(
            "the push token of {user}/{device} kept changing; try again"
        )))
    }

    async fn device_tokens(&self, user: &str) -> Result<Vec<DeviceToken>, StoreError> {
        check_user(user)?;
        let key = self.inner.keys.tokens(user);
        let all: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut self.connection())
            .await
            .map_err(map_err)?;
        let mut out = all
            .iter()
            .map(|(device, raw)| decode::<DeviceToken>(raw, || format!("{key} {device:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by(|a, b| a.device.cmp(&b.device));
        Ok(out)
    }

    /// One `EXISTS`. When Redis cannot answer: `true`, so the caller goes on to
    /// [`PushStore::device_tokens`], which reports the error, rather than silently skipping a
    /// push.
    async fn has_device_tokens(&self, user: &str) -> bool {
        if check_user(user).is_err() {
            return false;
        }
        let r: Result<bool, _> = redis::cmd("EXISTS")
            .arg(self.inner.keys.tokens(user))
            .query_async(&mut self.connection())
            .await;
        r.unwrap_or_else(|e| {
            tracing::warn!(user, error = %e, "has_device_tokens: redis did not answer");
            true
        })
    }

    /// Advisory: read, then a compare-and-set of the entry; any failure is logged and ignored.
    async fn note_pushed(&self, user: &str, device: &str, at: i64) {
        if check_user(user).is_err() || check_device(device).is_err() {
            return;
        }
        let r = async {
            let Some((raw, mut t)) = self.token_entry(user, device).await? else {
                return Ok(());
            };
            if at <= t.last_push_at {
                return Ok(());
            }
            t.last_push_at = at;
            let _: i64 = TOKEN_CAS
                .key(self.inner.keys.tokens(user))
                .arg(device)
                .arg(raw)
                .arg(t.encode_to_vec())
                .invoke_async(&mut self.connection())
                .await
                .map_err(map_err)?;
            Ok::<(), StoreError>(())
        }
        .await;
        if let Err(e) = r {
            tracing::debug!(user, device, error = %e, "note_pushed: not recorded");
        }
    }

    async fn set_mute(&self, user: &str, other: &str, muted: bool) -> Result<bool, StoreError> {
        check_user(user)?;
        check_user(other)?;
        if user == other {
            return Err(StoreError::Invalid(format!(
                "user {user:?} cannot mute itself"
            )));
        }
        let k = &self.inner.keys;
        let mut conn = self.connection();
        let changed: bool = if muted {
            let (set, _): (bool, i64) = redis::pipe()
                .atomic()
                .hset_nx(k.mutes(user), other, bimip_proto::now_ms())
                .sadd(k.users(), user)
                .query_async(&mut conn)
                .await
                .map_err(map_err)?;
            set
        } else {
            let n: i64 = redis::cmd("HDEL")
                .arg(k.mutes(user))
                .arg(other)
                .query_async(&mut conn)
                .await
                .map_err(map_err)?;
            n > 0
        };
        Ok(changed)
    }

    async fn mutes(&self, user: &str) -> Result<Vec<Mute>, StoreError> {
        check_user(user)?;
        let key = self.inner.keys.mutes(user);
        let all: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut self.connection())
            .await
            .map_err(map_err)?;
        let mut out = all
            .into_iter()
            .map(|(other, since)| {
                let since = since.parse::<i64>().map_err(|_| {
                    StoreError::Internal(format!("{key} {other:?}: {since:?} is not a time"))
                })?;
                Ok(Mute {
                    user: user.to_string(),
                    other,
                    since,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.sort_by(|a, b| a.other.cmp(&b.other));
        Ok(out)
    }

    /// One `HEXISTS`. When Redis cannot answer: `false` (a push too many rather than one lost).
    async fn is_muted(&self, user: &str, other: &str) -> bool {
        if check_user(user).is_err() {
            return false;
        }
        let r: Result<bool, _> = redis::cmd("HEXISTS")
            .arg(self.inner.keys.mutes(user))
            .arg(other)
            .query_async(&mut self.connection())
            .await;
        r.unwrap_or_else(|e| {
            tracing::warn!(user, error = %e, "is_muted: redis did not answer");
            false
        })
    }

    async fn put_jobs(&self, jobs: Vec<OutboxJob>) -> Result<(), StoreError> {
        for j in &jobs {
            check_job(j)?;
        }
        if jobs.is_empty() {
            return Ok(());
        }
        let k = &self.inner.keys;
        let mut inv = JOBS_PUT.prepare_invoke();
        inv.key(k.jobs())
            .key(k.job_versions())
            .key(k.job_tombstones())
            .key(k.job_tombstone_times());
        for j in &jobs {
            inv.arg(j.id).arg(j.version).arg(j.encode_to_vec());
        }
        let _: i64 = inv
            .invoke_async(&mut self.connection())
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn remove_jobs(&self, jobs: Vec<(u64, u64)>) -> Result<(), StoreError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let k = &self.inner.keys;
        let now = bimip_proto::now_ms();
        let ttl = i64::try_from(JOB_TOMBSTONE_TTL.as_millis()).unwrap_or(i64::MAX);
        let mut inv = JOBS_REMOVE.prepare_invoke();
        inv.key(k.jobs())
            .key(k.job_versions())
            .key(k.job_tombstones())
            .key(k.job_tombstone_times());
        inv.arg(now).arg(now.saturating_sub(ttl));
        for (id, version) in &jobs {
            inv.arg(*id).arg(*version);
        }
        let _: i64 = inv
            .invoke_async(&mut self.connection())
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn jobs(&self) -> Result<Vec<OutboxJob>, StoreError> {
        let key = self.inner.keys.jobs();
        let all: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut self.connection())
            .await
            .map_err(map_err)?;
        let mut out = all
            .iter()
            .map(|(id, raw)| decode::<OutboxJob>(raw, || format!("{key} {id:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|j| j.id);
        Ok(out)
    }

    async fn add_dead_letter(&self, dead: DeadLetter) -> Result<(), StoreError> {
        let key = self.inner.keys.dead_letters();
        let cap = isize::try_from(MAX_DEAD_LETTERS).unwrap_or(isize::MAX);
        let _: () = redis::pipe()
            .atomic()
            .lpush(&key, dead.encode_to_vec())
            .ignore()
            .ltrim(&key, 0, cap - 1)
            .ignore()
            .query_async(&mut self.connection())
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let n = limit.min(MAX_DEAD_LETTERS);
        if n == 0 {
            return Ok(Vec::new());
        }
        let key = self.inner.keys.dead_letters();
        let all: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(&key)
            .arg(0)
            .arg(n - 1)
            .query_async(&mut self.connection())
            .await
            .map_err(map_err)?;
        all.iter()
            .enumerate()
            .map(|(i, raw)| decode::<DeadLetter>(raw, || format!("{key}[{i}]")))
            .collect()
    }

    async fn idempotency(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        check_idempotency_key(key)?;
        let rkey = self.inner.keys.idempotency(key);
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&rkey)
            .query_async(&mut self.connection())
            .await
            .map_err(map_err)?;
        let Some(raw) = raw else { return Ok(None) };
        let rec = decode::<IdempotencyRecord>(&raw, || rkey.clone())?;
        // Redis drops the key after `expires_at` by its own clock; this node's clock decides too.
        Ok(Some(rec).filter(|r| r.expires_at >= bimip_proto::now_ms()))
    }

    async fn put_idempotency(&self, rec: IdempotencyRecord) -> Result<(), StoreError> {
        check_idempotency_key(&rec.key)?;
        // Already expired: nothing to keep (and an older answer for the key stays).
        if rec.expires_at < bimip_proto::now_ms() {
            return Ok(());
        }
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.inner.keys.idempotency(&rec.key))
            .arg(rec.encode_to_vec());
        if rec.expires_at <= MAX_EXPIRES_AT {
            cmd.arg("PXAT").arg(rec.expires_at);
        }
        let _: () = cmd
            .query_async(&mut self.connection())
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

/// Every script of this module (loaded into Redis ahead of use).
pub(crate) fn scripts() -> Vec<&'static Script> {
    vec![
        &*TOKEN_PUT,
        &*TOKEN_REMOVE,
        &*TOKEN_CAS,
        &*JOBS_PUT,
        &*JOBS_REMOVE,
    ]
}
