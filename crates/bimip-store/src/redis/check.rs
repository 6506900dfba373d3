//! `bimip check` and `bimip inspect` for the Redis backend: what the file store's
//! `check_data_dir` and `inspect_user` do for files, read-only, safe while servers run (a change
//! made during the walk can show up as a problem that is gone on the next run).
//!
//! [`check_redis`] walks `P:users` and the global push keys and names each problem by key and
//! field: a record that does not decode, a profile field with a bad value, a relation without
//! its other side, a token index entry and a device that do not name each other, job bookkeeping
//! that disagrees, a queue counter behind its stream. The queue's own layout belongs to the
//! queue code; here only `{u}:seq` against the last stream ID of `{u}:q` is checked.
//! [`inspect_redis_user`] returns one user's keys decoded where their format is known here, and
//! raw otherwise.

use std::fmt;

use bimip_proto::store::{DeadLetter, DeviceToken, IdempotencyRecord, Mute, OutboxJob};
use prost::Message;
use redis::{RedisResult, Value, aio::ConnectionManager};

use super::profile::RawProfile;
use super::push::{holder_value, index_field, split_holder};
use super::{Keys, RedisStore, map_err};
use crate::push::MAX_DEAD_LETTERS;
use crate::rules::check_user;
use crate::{Profile, StoreError};

/// One finding: a key, the field (hash field, set member, list index) if it is about one, and
/// what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RedisProblem {
    pub key: String,
    pub field: Option<String>,
    pub reason: String,
}

impl fmt::Display for RedisProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{} {field:?}: {}", self.key, self.reason),
            None => write!(f, "{}: {}", self.key, self.reason),
        }
    }
}

/// What [`check_redis`] found.
#[derive(Debug, Clone, Default)]
pub struct RedisCheckReport {
    /// Members of `P:users` checked.
    pub users: usize,
    /// Entries that decoded and passed (hash fields, set members, list items, records).
    pub records: u64,
    pub problems: Vec<RedisProblem>,
    /// Harmless findings.
    pub notes: Vec<RedisProblem>,
}

impl RedisCheckReport {
    /// No problems (notes allowed).
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    fn problem(&mut self, key: &str, field: Option<&str>, reason: impl Into<String>) {
        self.problems.push(RedisProblem {
            key: key.to_string(),
            field: field.map(str::to_string),
            reason: reason.into(),
        });
    }
}

impl fmt::Display for RedisCheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} users, {} records, {} problems, {} notes",
            self.users,
            self.records,
            self.problems.len(),
            self.notes.len()
        )?;
        for p in &self.problems {
            writeln!(f, "problem: {p}")?;
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

/// Keys taken per SCAN step.
const SCAN_COUNT: usize = 500;

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Hash fields (or stream entry fields) as they are stored.
type BytePairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Hash fields as byte pairs (RESP2 flat array or RESP3 map).
fn pairs(v: Value) -> Result<BytePairs, String> {
    redis::from_redis_value(v).map_err(|e| e.to_string())
}

fn members(v: Value) -> Result<Vec<Vec<u8>>, String> {
    redis::from_redis_value(v).map_err(|e| e.to_string())
}

/// The offset part of a stream ID `<offset>-<n>`.
fn id_offset(id: &str) -> Option<u64> {
    id.split_once('-').and_then(|(o, _)| o.parse().ok())
}

/// `SCAN`'s glob with the prefix's own glob characters escaped.
fn glob_prefix(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('*');
    out
}

/// One answer of a pipeline; an error is reported against `key`.
fn answer(key: &str, got: Option<RedisResult<Value>>, r: &mut RedisCheckReport) -> Option<Value> {
    match got {
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => {
            r.problem(key, None, format!("cannot be read: {e}"));
            None
        }
        None => {
            r.problem(key, None, "no answer");
            None
        }
    }
}

/// Hash fields as text; what is not UTF-8 is a problem.
fn text_pairs(key: &str, v: Option<Value>, r: &mut RedisCheckReport) -> Vec<(String, String)> {
    let mut out = Vec::new();
    match v.map(pairs) {
        None => {}
        Some(Err(e)) => r.problem(key, None, e),
        Some(Ok(list)) => {
            for (f, v) in list {
                match (String::from_utf8(f), String::from_utf8(v)) {
                    (Ok(f), Ok(v)) => out.push((f, v)),
                    (Ok(f), Err(_)) => r.problem(key, Some(&f), "value is not UTF-8"),
                    (Err(e), _) => r.problem(key, Some(&lossy(e.as_bytes())), "field is not UTF-8"),
                }
            }
        }
    }
    out
}

/// Set members as text; what is not UTF-8 is a problem.
fn text_members(key: &str, v: Option<Value>, r: &mut RedisCheckReport) -> Vec<String> {
    let mut out = Vec::new();
    match v.map(members) {
        None => {}
        Some(Err(e)) => r.problem(key, None, e),
        Some(Ok(list)) => {
            for m in list {
                match String::from_utf8(m) {
                    Ok(m) => out.push(m),
                    Err(e) => r.problem(key, Some(&lossy(e.as_bytes())), "not UTF-8"),
                }
            }
        }
    }
    out
}

struct Checker {
    conn: ConnectionManager,
    keys: Keys,
    report: RedisCheckReport,
}

/// Runs a pipeline whose commands may fail one by one (a key of the wrong type): only an
/// unreachable Redis fails the whole call.
async fn run(
    conn: &mut ConnectionManager,
    pipe: &redis::Pipeline,
) -> Result<Vec<RedisResult<Value>>, StoreError> {
    pipe.query_async(conn).await.map_err(map_err)
}

/// Checks the whole Redis data set of this store's prefix (see the module docs). Reads only.
pub async fn check_redis(store: &RedisStore) -> Result<RedisCheckReport, StoreError> {
    let mut c = Checker {
        conn: store.connection(),
        keys: store.inner.keys.clone(),
        report: RedisCheckReport::default(),
    };
    c.users().await?;
    c.token_index().await?;
    c.jobs().await?;
    c.dead_letters().await?;
    c.idempotency().await?;
    c.globals().await?;
    c.report.problems.sort();
    c.report.notes.sort();
    Ok(c.report)
}

impl Checker {
    async fn users(&mut self) -> Result<(), StoreError> {
        let users_key = self.keys.users();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SSCAN")
                .arg(&users_key)
                .arg(cursor)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut self.conn)
                .await
                .map_err(map_err)?;
            for raw in batch {
                let user = lossy(&raw);
                if check_user(&user).is_err() || user.as_bytes() != raw.as_slice() {
                    self.report
                        .problem(&users_key, Some(&user), "not a valid user id");
                    continue;
                }
                self.report.users += 1;
                self.user(&user).await?;
            }
            cursor = next;
            if cursor == 0 {
                return Ok(());
            }
        }
    }

    /// One user's keys: profile, relations' other sides, tokens against the index, mutes, and
    /// the queue counter.
    async fn user(&mut self, user: &str) -> Result<(), StoreError> {
        let k = self.keys.clone();
        let names = [
            k.profile(user),
            k.contacts(user),
            k.listed_by(user),
            k.blocks(user),
            k.blocked_by(user),
            k.tokens(user),
            k.mutes(user),
            k.seq(user),
            k.queue(user),
        ];
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for key in &names[..3] {
            pipe.cmd("HGETALL").arg(key);
        }
        for key in &names[3..5] {
            pipe.cmd("SMEMBERS").arg(key);
        }
        for key in &names[5..7] {
            pipe.cmd("HGETALL").arg(key);
        }
        pipe.cmd("GET").arg(&names[7]);
        pipe.cmd("XREVRANGE")
            .arg(&names[8])
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        let mut got = run(&mut self.conn, &pipe).await?.into_iter();
        let r = &mut self.report;
        let mut vals: Vec<Option<Value>> = Vec::new();
        for key in &names {
            vals.push(answer(key, got.next(), r));
        }
        let mut vals = vals.into_iter();
        let mut next = || vals.next().flatten();
        let prof = text_pairs(&names[0], next(), r);
        let contacts = text_pairs(&names[1], next(), r);
        let listed_by = text_pairs(&names[2], next(), r);
        let blocks = text_members(&names[3], next(), r);
        let blocked_by = text_members(&names[4], next(), r);
        let tokens = match next().map(pairs) {
            None => Vec::new(),
            Some(Err(e)) => {
                r.problem(&names[5], None, e);
                Vec::new()
            }
            Some(Ok(list)) => list,
        };
        let mutes = text_pairs(&names[6], next(), r);
        let seq = next();
        let last = next();

        // The profile's fields and entries.
        let raw = RawProfile {
            prof,
            contacts,
            listed_by,
            blocks,
            blocked_by,
        };
        r.records += (raw.prof.len()
            + raw.contacts.len()
            + raw.listed_by.len()
            + raw.blocks.len()
            + raw.blocked_by.len()) as u64;
        let (p, bad) = raw.decode_lossy();
        for (suffix, field, why) in bad {
            r.problem(&k.user(user, suffix), Some(&field), why);
        }
        if p.contacts.contains_key(user) {
            r.problem(&names[1], Some(user), "the user lists itself");
        }
        if p.blocks.contains(user) {
            r.problem(&names[3], Some(user), "the user blocks itself");
        }

        // The other sides, and the token index, in one pipeline.
        enum Expect {
            Flag(String, String, bool),
            Member(String, String),
            Holder(String),
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut expect = Vec::new();
        for (other, flag) in &p.contacts {
            let key = k.listed_by(other);
            pipe.cmd("HGET").arg(&key).arg(user);
            expect.push((
                names[1].clone(),
                other.clone(),
                Expect::Flag(key, "contact".into(), *flag),
            ));
        }
        for (other, flag) in &p.listed_by {
            let key = k.contacts(other);
            pipe.cmd("HGET").arg(&key).arg(user);
            expect.push((
                names[2].clone(),
                other.clone(),
                Expect::Flag(key, "listed_by entry".into(), *flag),
            ));
        }
        for other in &p.blocks {
            let key = k.blocked_by(other);
            pipe.cmd("SISMEMBER").arg(&key).arg(user);
            expect.push((
                names[3].clone(),
                other.clone(),
                Expect::Member(key, "block".into()),
            ));
        }
        for other in &p.blocked_by {
            let key = k.blocks(other);
            pipe.cmd("SISMEMBER").arg(&key).arg(user);
            expect.push((
                names[4].clone(),
                other.clone(),
                Expect::Member(key, "blocked_by entry".into()),
            ));
        }
        for (device, raw) in &tokens {
            let device = lossy(device);
            let t = match DeviceToken::decode(raw.as_slice()) {
                Ok(t) => t,
                Err(e) => {
                    r.problem(&names[5], Some(&device), format!("does not decode: {e}"));
                    continue;
                }
            };
            if t.user != user || t.device != device {
                r.problem(
                    &names[5],
                    Some(&device),
                    format!("the record is for {}/{}", t.user, t.device),
                );
                continue;
            }
            if let Err(e) = crate::file::check_device_token(&t) {
                r.problem(&names[5], Some(&device), e.to_string());
                continue;
            }
            r.records += 1;
            let field = index_field(t.platform, &t.token);
            pipe.cmd("HGET").arg(k.token_index()).arg(&field);
            expect.push((
                names[5].clone(),
                device.clone(),
                Expect::Holder(holder_value(user, &device)),
            ));
        }
        let answers = if expect.is_empty() {
            Vec::new()
        } else {
            run(&mut self.conn, &pipe).await?
        };
        let r = &mut self.report;
        for ((key, field, want), got) in expect.into_iter().zip(answers) {
            let got = match got {
                Ok(v) => v,
                Err(e) => {
                    r.problem(
                        &key,
                        Some(&field),
                        format!("its other side cannot be read: {e}"),
                    );
                    continue;
                }
            };
            match want {
                Expect::Flag(other_key, what, flag) => {
                    let other: Option<String> = redis::from_redis_value(got).ok().flatten();
                    let want = u8::from(flag).to_string();
                    match other {
                        None => r.problem(
                            &key,
                            Some(&field),
                            format!("a {what} without its other side in {other_key}"),
                        ),
                        Some(v) if v != want => r.problem(
                            &key,
                            Some(&field),
                            format!("one_way {want} here but {v:?} in {other_key}"),
                        ),
                        Some(_) => {}
                    }
                }
                Expect::Member(other_key, what) => {
                    if !redis::from_redis_value::<bool>(got).unwrap_or(false) {
                        r.problem(
                            &key,
                            Some(&field),
                            format!("a {what} without its other side in {other_key}"),
                        );
                    }
                }
                Expect::Holder(me) => {
                    let holder: Option<String> = redis::from_redis_value(got).ok().flatten();
                    if holder.as_deref() != Some(me.as_str()) {
                        r.problem(
                            &key,
                            Some(&field),
                            format!(
                                "the token index {} has {:?} for this token, not this device",
                                self.keys.token_index(),
                                holder.unwrap_or_default()
                            ),
                        );
                    }
                }
            }
        }

        // Mutes.
        for (other, since) in &mutes {
            if check_user(other).is_err() {
                r.problem(&names[6], Some(other), "not a valid user id");
            } else if other == user {
                r.problem(&names[6], Some(other), "the user mutes itself");
            } else if since.parse::<i64>().is_err() {
                r.problem(&names[6], Some(other), format!("{since:?} is not a time"));
            } else {
                r.records += 1;
            }
        }

        // The queue counter against the stream's last ID.
        let seq = match seq {
            None | Some(Value::Nil) => None,
            Some(v) => match redis::from_redis_value::<String>(v) {
                Ok(s) => match s.parse::<u64>() {
                    Ok(n) => Some(n),
                    Err(_) => {
                        r.problem(&names[7], None, format!("{s:?} is not an offset"));
                        None
                    }
                },
                Err(e) => {
                    r.problem(&names[7], None, e.to_string());
                    None
                }
            },
        };
        let last_id = match last {
            None => None,
            Some(v) => match stream_entries(v) {
                Ok(entries) => entries.into_iter().next().map(|(id, _)| id),
                Err(e) => {
                    r.problem(&names[8], None, e);
                    None
                }
            },
        };
        if let (Some(seq), Some(id)) = (seq, last_id) {
            match id_offset(&id) {
                Some(last) if last > seq => r.problem(
                    &names[7],
                    None,
                    format!("{seq} is behind the last item of {} ({id})", names[8]),
                ),
                Some(_) => {}
                None => r.problem(&names[8], Some(&id), "the stream ID is not <offset>-<n>"),
            }
        }
        Ok(())
    }

    /// Every index entry names a device whose token it is.
    async fn token_index(&mut self) -> Result<(), StoreError> {
        let key = self.keys.token_index();
        let mut cursor: u64 = 0;
        loop {
            let (next, flat): (u64, Vec<Vec<u8>>) = redis::cmd("HSCAN")
                .arg(&key)
                .arg(cursor)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut self.conn)
                .await
                .map_err(map_err)?;
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            let mut asked = Vec::new();
            for pair in flat.chunks(2) {
                let [field, value] = pair else { continue };
                let field_s = lossy(field);
                let parsed = field_s
                    .split_once('\n')
                    .and_then(|(p, t)| p.parse::<i32>().ok().map(|p| (p, t.to_string())));
                let Some((platform, token)) = parsed else {
                    self.report
                        .problem(&key, Some(&field_s), "not <platform>\\n<token>");
                    continue;
                };
                let value_s = lossy(value);
                let Some((u, d)) = split_holder(&value_s) else {
                    self.report.problem(
                        &key,
                        Some(&field_s),
                        format!("{value_s:?} is not <user>\\n<device>"),
                    );
                    continue;
                };
                if check_user(u).is_err() {
                    self.report.problem(
                        &key,
                        Some(&field_s),
                        format!("{u:?} is not a valid user id"),
                    );
                    continue;
                }
                pipe.cmd("HGET").arg(self.keys.tokens(u)).arg(d);
                asked.push((field_s, platform, token, u.to_string(), d.to_string()));
            }
            if !asked.is_empty() {
                let answers = run(&mut self.conn, &pipe).await?;
                for ((field, platform, token, u, d), got) in asked.into_iter().zip(answers) {
                    let raw: Option<Vec<u8>> =
                        got.ok().and_then(|v| redis::from_redis_value(v).ok());
                    let holds = raw
                        .and_then(|b| DeviceToken::decode(b.as_slice()).ok())
                        .is_some_and(|t| t.platform == platform && t.token == token);
                    if holds {
                        self.report.records += 1;
                    } else {
                        self.report.problem(
                            &key,
                            Some(&field),
                            format!(
                                "points to {u}/{d}, which does not hold this token (see {})",
                                self.keys.tokens(&u)
                            ),
                        );
                    }
                }
            }
            cursor = next;
            if cursor == 0 {
                return Ok(());
            }
        }
    }

    /// Jobs decode and agree with their version; versions and tombstones have their
    /// counterparts.
    async fn jobs(&mut self) -> Result<(), StoreError> {
        let (jobs, vers, dead, times) = (
            self.keys.jobs(),
            self.keys.job_versions(),
            self.keys.job_tombstones(),
            self.keys.job_tombstone_times(),
        );
        // Each job: decodes, is valid, has its version and no tombstone.
        self.hscan(
            &jobs,
            |c, id, raw| {
                let job = match OutboxJob::decode(raw) {
                    Ok(j) => j,
                    Err(e) => {
                        c.report
                            .problem(&jobs, Some(id), format!("does not decode: {e}"));
                        return None;
                    }
                };
                if id.parse::<u64>().ok() != Some(job.id) {
                    c.report
                        .problem(&jobs, Some(id), format!("holds job {}", job.id));
                    return None;
                }
                if let Err(e) = crate::file::check_job(&job) {
                    c.report.problem(&jobs, Some(id), e.to_string());
                    return None;
                }
                let mut get = redis::cmd("HGET");
                get.arg(&vers).arg(id);
                let mut exists = redis::cmd("HEXISTS");
                exists.arg(&dead).arg(id);
                Some((vec![get, exists], job.version.to_string()))
            },
            |c, id, want, answers| {
                let mut a = answers.into_iter();
                let ver: Option<String> = a
                    .next()
                    .and_then(|v| v.ok())
                    .and_then(|v| redis::from_redis_value(v).ok())
                    .flatten();
                let removed: bool = a
                    .next()
                    .and_then(|v| v.ok())
                    .and_then(|v| redis::from_redis_value(v).ok())
                    .unwrap_or(false);
                if ver.as_deref() != Some(want.as_str()) {
                    c.report.problem(
                        &jobs,
                        Some(id),
                        format!(
                            "version {want}, but {} has {:?}",
                            vers,
                            ver.unwrap_or_default()
                        ),
                    );
                } else if removed {
                    c.report.problem(
                        &jobs,
                        Some(id),
                        format!("stored and also removed in {dead}"),
                    );
                } else {
                    c.report.records += 1;
                }
            },
        )
        .await?;
        // Each version: a number with its job.
        self.hscan(
            &vers,
            |c, id, raw| {
                if lossy(raw).parse::<u64>().is_err() {
                    c.report.problem(
                        &vers,
                        Some(id),
                        format!("{:?} is not a version", lossy(raw)),
                    );
                    return None;
                }
                let mut exists = redis::cmd("HEXISTS");
                exists.arg(&jobs).arg(id);
                Some((vec![exists], String::new()))
            },
            |c, id, _, answers| {
                let has = answers
                    .into_iter()
                    .next()
                    .and_then(|v| v.ok())
                    .and_then(|v| redis::from_redis_value::<bool>(v).ok())
                    .unwrap_or(false);
                if !has {
                    c.report.problem(
                        &vers,
                        Some(id),
                        format!("a version without its job in {jobs}"),
                    );
                }
            },
        )
        .await?;
        // Each tombstone: a number with its time (else it is never forgotten).
        self.hscan(
            &dead,
            |c, id, raw| {
                if lossy(raw).parse::<u64>().is_err() {
                    c.report.problem(
                        &dead,
                        Some(id),
                        format!("{:?} is not a version", lossy(raw)),
                    );
                    return None;
                }
                let mut score = redis::cmd("ZSCORE");
                score.arg(&times).arg(id);
                Some((vec![score], String::new()))
            },
            |c, id, _, answers| {
                let has = matches!(answers.into_iter().next(), Some(Ok(v)) if v != Value::Nil);
                if has {
                    c.report.records += 1;
                } else {
                    c.report.problem(
                        &dead,
                        Some(id),
                        format!("a tombstone without its time in {times}: it is never forgotten"),
                    );
                }
            },
        )
        .await?;
        Ok(())
    }

    /// HSCAN of `key`: `ask` looks at one entry and may return commands to run about it (all of
    /// a scan step's run in one pipeline); `answer` gets their results.
    async fn hscan(
        &mut self,
        key: &str,
        mut ask: impl FnMut(&mut Checker, &str, &[u8]) -> Option<(Vec<redis::Cmd>, String)>,
        mut answer: impl FnMut(&mut Checker, &str, String, Vec<RedisResult<Value>>),
    ) -> Result<(), StoreError> {
        let mut cursor: u64 = 0;
        loop {
            let got: RedisResult<(u64, Vec<Vec<u8>>)> = redis::cmd("HSCAN")
                .arg(key)
                .arg(cursor)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut self.conn)
                .await;
            let (next, flat) = match got {
                Ok(v) => v,
                Err(e) if super::is_unavailable(&e) => return Err(map_err(e)),
                Err(e) => {
                    self.report
                        .problem(key, None, format!("cannot be read: {e}"));
                    return Ok(());
                }
            };
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            let mut asked = Vec::new();
            for pair in flat.chunks(2) {
                let [field, value] = pair else { continue };
                let field = lossy(field);
                if let Some((cmds, ctx)) = ask(self, &field, value) {
                    let n = cmds.len();
                    for cmd in cmds {
                        pipe.add_command(cmd);
                    }
                    asked.push((field, ctx, n));
                }
            }
            if !asked.is_empty() {
                let mut answers = run(&mut self.conn, &pipe).await?.into_iter();
                for (field, ctx, n) in asked {
                    let mine: Vec<_> = answers.by_ref().take(n).collect();
                    answer(self, &field, ctx, mine);
                }
            }
            cursor = next;
            if cursor == 0 {
                return Ok(());
            }
        }
    }

    async fn dead_letters(&mut self) -> Result<(), StoreError> {
        let key = self.keys.dead_letters();
        let len: RedisResult<usize> = redis::cmd("LLEN")
            .arg(&key)
            .query_async(&mut self.conn)
            .await;
        let len = match len {
            Ok(n) => n,
            Err(e) if super::is_unavailable(&e) => return Err(map_err(e)),
            Err(e) => {
                self.report
                    .problem(&key, None, format!("cannot be read: {e}"));
                return Ok(());
            }
        };
        if len > MAX_DEAD_LETTERS {
            self.report.problem(
                &key,
                None,
                format!("{len} dead letters, more than the {MAX_DEAD_LETTERS} kept"),
            );
        }
        let mut start = 0usize;
        while start < len {
            let end = (start + 999).min(len - 1);
            let items: Vec<Vec<u8>> = redis::cmd("LRANGE")
                .arg(&key)
                .arg(start)
                .arg(end)
                .query_async(&mut self.conn)
                .await
                .map_err(map_err)?;
            if items.is_empty() {
                break;
            }
            for (i, raw) in items.iter().enumerate() {
                match DeadLetter::decode(raw.as_slice()) {
                    Ok(_) => self.report.records += 1,
                    Err(e) => self.report.problem(
                        &key,
                        Some(&(start + i).to_string()),
                        format!("does not decode: {e}"),
                    ),
                }
            }
            start += items.len();
        }
        Ok(())
    }

    async fn idempotency(&mut self) -> Result<(), StoreError> {
        let prefix = self.keys.idempotency_prefix();
        let pattern = glob_prefix(&prefix);
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut self.conn)
                .await
                .map_err(map_err)?;
            if !batch.is_empty() {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for key in &batch {
                    pipe.cmd("GET").arg(key.as_slice());
                    pipe.cmd("PTTL").arg(key.as_slice());
                }
                let answers = run(&mut self.conn, &pipe).await?;
                for (key, pair) in batch.iter().zip(answers.chunks(2)) {
                    let key = lossy(key);
                    let suffix = key.strip_prefix(prefix.as_str()).unwrap_or_default();
                    let [get, pttl] = pair else { continue };
                    let raw: Option<Vec<u8>> = match get {
                        Ok(v) => redis::from_redis_value_ref(v).ok().flatten(),
                        Err(e) => {
                            self.report
                                .problem(&key, None, format!("cannot be read: {e}"));
                            continue;
                        }
                    };
                    let Some(raw) = raw else { continue }; // expired meanwhile
                    let rec = match IdempotencyRecord::decode(raw.as_slice()) {
                        Ok(r) => r,
                        Err(e) => {
                            self.report
                                .problem(&key, None, format!("does not decode: {e}"));
                            continue;
                        }
                    };
                    if rec.key != suffix {
                        self.report.problem(
                            &key,
                            None,
                            format!("holds the record of key {:?}", rec.key),
                        );
                        continue;
                    }
                    let ttl: i64 = pttl
                        .as_ref()
                        .ok()
                        .and_then(|v| redis::from_redis_value_ref(v).ok())
                        .unwrap_or(-2);
                    if ttl == -1 && rec.expires_at <= 253_402_300_799_999 {
                        self.report.problem(
                            &key,
                            None,
                            format!("no expiry, though the record expires at {}", rec.expires_at),
                        );
                        continue;
                    }
                    self.report.records += 1;
                }
            }
            cursor = next;
            if cursor == 0 {
                return Ok(());
            }
        }
    }

    /// Revocations and the job id counter.
    async fn globals(&mut self) -> Result<(), StoreError> {
        let key = self.keys.revocations();
        let got: RedisResult<Vec<(String, String)>> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut self.conn)
            .await;
        match got {
            Ok(all) => {
                for (user, v) in all {
                    if check_user(&user).is_err() {
                        self.report
                            .problem(&key, Some(&user), "not a valid user id");
                    } else if v.parse::<i64>().is_err() {
                        self.report
                            .problem(&key, Some(&user), format!("{v:?} is not a time"));
                    } else {
                        self.report.records += 1;
                    }
                }
            }
            Err(e) if super::is_unavailable(&e) => return Err(map_err(e)),
            Err(e) => self
                .report
                .problem(&key, None, format!("cannot be read: {e}")),
        }
        let key = self.keys.job_ids();
        let got: RedisResult<Option<String>> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut self.conn)
            .await;
        match got {
            Ok(None) => {}
            Ok(Some(v)) if v.parse::<u64>().is_ok() => {}
            Ok(Some(v)) => self
                .report
                .problem(&key, None, format!("{v:?} is not a job id")),
            Err(e) if super::is_unavailable(&e) => return Err(map_err(e)),
            Err(e) => self
                .report
                .problem(&key, None, format!("cannot be read: {e}")),
        }
        Ok(())
    }
}

/// `XRANGE`/`XREVRANGE` entries: (ID, field-value pairs).
fn stream_entries(v: Value) -> Result<Vec<(String, BytePairs)>, String> {
    redis::from_redis_value(v).map_err(|e| e.to_string())
}

/// A value shown as it is stored: text when it is UTF-8, bytes otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawValue {
    Text(String),
    Bytes(Vec<u8>),
}

impl RawValue {
    fn of(b: Vec<u8>) -> RawValue {
        match String::from_utf8(b) {
            Ok(s) => RawValue::Text(s),
            Err(e) => RawValue::Bytes(e.into_bytes()),
        }
    }
}

impl fmt::Display for RawValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawValue::Text(s) => write!(f, "{s:?}"),
            RawValue::Bytes(b) => write!(f, "<{} bytes> {}", b.len(), hex::encode(b)),
        }
    }
}

/// One item of a user's queue stream as stored: its ID (`<offset>-0`), the offset, and the
/// fields as they are (their meaning is the queue code's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisStreamEntry {
    pub id: String,
    pub offset: Option<u64>,
    pub fields: Vec<(String, RawValue)>,
}

/// One user's Redis keys, for `bimip inspect` (read-only).
#[derive(Debug, Clone, Default)]
pub struct RedisUserDump {
    pub user: String,
    /// Whether `P:users` has the user.
    pub listed: bool,
    /// The profile; `None` when some of it does not decode (see `problems`).
    pub profile: Option<Profile>,
    /// Ordered by device.
    pub tokens: Vec<DeviceToken>,
    /// Ordered by user.
    pub mutes: Vec<Mute>,
    /// `{u}:seq` as stored.
    pub seq: Option<RawValue>,
    /// `{u}:q`, oldest first.
    pub queue: Vec<RedisStreamEntry>,
    /// `{u}:cur`: field → value, as stored, ordered by field.
    pub cursors: Vec<(String, RawValue)>,
    /// The user's token revocation (`not_before`), if any.
    pub revoked_before: Option<i64>,
    /// What did not decode.
    pub problems: Vec<RedisProblem>,
}

impl fmt::Display for RedisUserDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "user {} (in users set: {})", self.user, self.listed)?;
        match &self.profile {
            Some(p) => write_profile(f, p)?,
            None => writeln!(f, "profile: does not decode")?,
        }
        for t in &self.tokens {
            writeln!(
                f,
                "token: device={} platform={} token={} registered_at={}{}",
                t.device,
                bimip_proto::v1::Platform::try_from(t.platform)
                    .map(|p| p
                        .as_str_name()
                        .trim_start_matches("PLATFORM_")
                        .to_lowercase())
                    .unwrap_or_else(|_| t.platform.to_string()),
                mask(&t.token),
                t.registered_at,
                if t.sandbox { " sandbox" } else { "" }
            )?;
        }
        for m in &self.mutes {
            writeln!(f, "mute: {} since {}", m.other, m.since)?;
        }
        if let Some(nb) = self.revoked_before {
            writeln!(f, "revoked: tokens issued before {nb}")?;
        }
        match &self.seq {
            Some(s) => writeln!(f, "last offset given out (seq): {}", plain(s))?,
            None => writeln!(f, "last offset given out (seq): none")?,
        }
        writeln!(f, "queue ({} items):", self.queue.len())?;
        for e in &self.queue {
            write_entry(f, e)?;
        }
        // The maxima kept beside the cursors (`d|`, `k|`, `a|`) are derived: left out.
        let cursors: Vec<_> = self
            .cursors
            .iter()
            .filter(|(k, _)| !["d|", "k|", "a|"].iter().any(|p| k.starts_with(p)))
            .map(|(k, v)| cursor_line(k, v).unwrap_or_else(|| format!("{k:?} = {v}")))
            .collect();
        writeln!(f, "cursors ({}):", cursors.len())?;
        for c in cursors {
            writeln!(f, "  {c}")?;
        }
        for p in &self.problems {
            writeln!(f, "problem: {p}")?;
        }
        Ok(())
    }
}

fn write_profile(f: &mut fmt::Formatter<'_>, p: &Profile) -> fmt::Result {
    let list = |m: &mut dyn Iterator<Item = String>| {
        let v: Vec<String> = m.collect();
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(", ")
        }
    };
    let rel = |m: &std::collections::BTreeMap<String, bool>| {
        list(&mut m.iter().map(|(u, one_way)| {
            if *one_way {
                format!("{u} (one way)")
            } else {
                u.clone()
            }
        }))
    };
    writeln!(f, "contacts: {}", rel(&p.contacts))?;
    writeln!(f, "listed by: {}", rel(&p.listed_by))?;
    writeln!(f, "blocks: {}", list(&mut p.blocks.iter().cloned()))?;
    writeln!(f, "blocked by: {}", list(&mut p.blocked_by.iter().cloned()))?;
    writeln!(
        f,
        "intent: {:?}{} invisible={} last_seen={}",
        p.intent,
        if p.details.is_empty() {
            String::new()
        } else {
            format!(" {:?}", p.details)
        },
        p.invisible,
        p.last_seen
    )
}

/// A value as text, without quotes (bytes that are not UTF-8 as `RawValue` shows them).
fn plain(v: &RawValue) -> String {
    match v {
        RawValue::Text(t) => t.clone(),
        other => other.to_string(),
    }
}

/// The first and last four characters of a token.
fn mask(token: &str) -> String {
    let n = token.chars().count();
    if n <= 8 {
        return "…".into();
    }
    let head: String = token.chars().take(4).collect();
    let tail: String = token.chars().skip(n - 4).collect();
    format!("{head}…{tail}")
}

/// One stream entry as `#<offset> <partition> <from>→<to> id=… device=… at=… "payload"`, or its
/// fields as they are when it does not have the queue's layout.
fn write_entry(f: &mut fmt::Formatter<'_>, e: &RedisStreamEntry) -> fmt::Result {
    let has = |k: &str| e.fields.iter().any(|(name, _)| name == k);
    if !["p", "f", "t", "b", "ts", "m", "d", "po"]
        .iter()
        .all(|k| has(k))
    {
        write!(f, "  {}", e.id)?;
        for (k, v) in &e.fields {
            write!(f, " {k}={v}")?;
        }
        return writeln!(f);
    }
    let field = |k: &str| {
        e.fields
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| plain(v))
            .unwrap_or_default()
    };
    let partition = match field("p").as_str() {
        "1" => "chat".to_string(),
        "2" => "notification".to_string(),
        "3" => "receipt".to_string(),
        other => format!("partition({other})"),
    };
    let peer = match field("po").as_str() {
        "" | "0" => String::new(),
        po => format!(" peer_offset={po}"),
    };
    writeln!(
        f,
        "  #{} {partition} {}→{} id={} device={} at={}{peer} {:?}",
        e.offset.map_or_else(|| e.id.clone(), |o| o.to_string()),
        field("f"),
        field("t"),
        field("m"),
        field("d"),
        field("ts"),
        field("b"),
    )
}

/// A device cursor field (`c|<p>|<kind>|<len>:<from><device>`) as a readable line.
fn cursor_line(k: &str, v: &RawValue) -> Option<String> {
    let mut parts = k.splitn(4, '|');
    if parts.next()? != "c" {
        return None;
    }
    let partition = match parts.next()? {
        "1" => "chat",
        "2" => "notification",
        "3" => "receipt",
        _ => "partition(?)",
    };
    let kind = match parts.next()? {
        "1" => "DELIVERED",
        "2" => "READ",
        _ => "-",
    };
    let rest = parts.next()?;
    let (len, tail) = rest.split_once(':')?;
    let len: usize = len.parse().ok()?;
    let from = tail.get(..len)?;
    let device = tail.get(len..)?;
    let from = if from.is_empty() {
        "(every sender)"
    } else {
        from
    };
    Some(format!(
        "device={device} {partition} from={from} {kind} next_offset={}",
        plain(v)
    ))
}

/// Stream entries read per `XRANGE`.
const XRANGE_COUNT: usize = 1000;

/// Reads `user`'s keys (see [`RedisUserDump`]). Records that do not decode are listed in
/// `problems`, not errors; only an unreachable Redis is an error.
pub async fn inspect_redis_user(
    store: &RedisStore,
    user: &str,
) -> Result<RedisUserDump, StoreError> {
    check_user(user)?;
    let k = &store.inner.keys;
    let mut conn = store.connection();
    let mut out = RedisUserDump {
        user: user.to_string(),
        ..Default::default()
    };
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    pipe.cmd("SISMEMBER").arg(k.users()).arg(user);
    pipe.cmd("HGETALL").arg(k.profile(user));
    pipe.cmd("HGETALL").arg(k.contacts(user));
    pipe.cmd("HGETALL").arg(k.listed_by(user));
    pipe.cmd("SMEMBERS").arg(k.blocks(user));
    pipe.cmd("SMEMBERS").arg(k.blocked_by(user));
    pipe.cmd("HGETALL").arg(k.tokens(user));
    pipe.cmd("HGETALL").arg(k.mutes(user));
    pipe.cmd("GET").arg(k.seq(user));
    pipe.cmd("HGETALL").arg(k.cursors(user));
    pipe.cmd("HGET").arg(k.revocations()).arg(user);
    let got = run(&mut conn, &pipe).await?;
    let keys = [
        k.users(),
        k.profile(user),
        k.contacts(user),
        k.listed_by(user),
        k.blocks(user),
        k.blocked_by(user),
        k.tokens(user),
        k.mutes(user),
        k.seq(user),
        k.cursors(user),
        k.revocations(),
    ];
    let mut vals: Vec<Option<Value>> = Vec::new();
    for (key, v) in keys.iter().zip(got) {
        match v {
            Ok(v) => vals.push(Some(v)),
            Err(e) => {
                out.problems.push(RedisProblem {
                    key: key.clone(),
                    field: None,
                    reason: format!("cannot be read: {e}"),
                });
                vals.push(None);
            }
        }
    }
    let mut take = |i: usize| vals.get_mut(i).and_then(Option::take);
    out.listed = take(0)
        .and_then(|v| redis::from_redis_value::<bool>(v).ok())
        .unwrap_or(false);
    let text_pairs = |v: Option<Value>| -> Vec<(String, String)> {
        v.and_then(|v| pairs(v).ok())
            .unwrap_or_default()
            .into_iter()
            .map(|(a, b)| (lossy(&a), lossy(&b)))
            .collect()
    };
    let text_members = |v: Option<Value>| -> Vec<String> {
        v.and_then(|v| members(v).ok())
            .unwrap_or_default()
            .iter()
            .map(|m| lossy(m))
            .collect()
    };
    let raw = RawProfile {
        prof: text_pairs(take(1)),
        contacts: text_pairs(take(2)),
        listed_by: text_pairs(take(3)),
        blocks: text_members(take(4)),
        blocked_by: text_members(take(5)),
    };
    match raw.decode() {
        Ok(p) => out.profile = Some(p),
        Err(bad) => {
            for (suffix, field, reason) in bad {
                out.problems.push(RedisProblem {
                    key: k.user(user, suffix),
                    field: Some(field),
                    reason,
                });
            }
        }
    }
    for (device, raw) in take(6).and_then(|v| pairs(v).ok()).unwrap_or_default() {
        match DeviceToken::decode(raw.as_slice()) {
            Ok(t) => out.tokens.push(t),
            Err(e) => out.problems.push(RedisProblem {
                key: k.tokens(user),
                field: Some(lossy(&device)),
                reason: format!("does not decode: {e}"),
            }),
        }
    }
    out.tokens.sort_by(|a, b| a.device.cmp(&b.device));
    for (other, since) in text_pairs(take(7)) {
        match since.parse::<i64>() {
            Ok(since) => out.mutes.push(Mute {
                user: user.to_string(),
                other,
                since,
            }),
            Err(_) => out.problems.push(RedisProblem {
                key: k.mutes(user),
                field: Some(other),
                reason: format!("{since:?} is not a time"),
            }),
        }
    }
    out.mutes.sort_by(|a, b| a.other.cmp(&b.other));
    out.seq = take(8)
        .and_then(|v| redis::from_redis_value::<Option<Vec<u8>>>(v).ok())
        .flatten()
        .map(RawValue::of);
    let mut cursors: Vec<(String, RawValue)> = take(9)
        .and_then(|v| pairs(v).ok())
        .unwrap_or_default()
        .into_iter()
        .map(|(f, v)| (lossy(&f), RawValue::of(v)))
        .collect();
    cursors.sort_by(|a, b| a.0.cmp(&b.0));
    out.cursors = cursors;
    out.revoked_before = take(10)
        .and_then(|v| redis::from_redis_value::<Option<String>>(v).ok())
        .flatten()
        .and_then(|s| s.parse().ok());

    // The stream, in pages.
    let qkey = k.queue(user);
    let mut start = "-".to_string();
    loop {
        let got: RedisResult<Value> = redis::cmd("XRANGE")
            .arg(&qkey)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(XRANGE_COUNT)
            .query_async(&mut conn)
            .await;
        let page = match got {
            Ok(v) => stream_entries(v),
            Err(e) if super::is_unavailable(&e) => return Err(map_err(e)),
            Err(e) => Err(e.to_string()),
        };
        let page = match page {
            Ok(p) => p,
            Err(e) => {
                out.problems.push(RedisProblem {
                    key: qkey.clone(),
                    field: None,
                    reason: format!("cannot be read: {e}"),
                });
                break;
            }
        };
        let n = page.len();
        for (id, fields) in page {
            start = format!("({id}");
            out.queue.push(RedisStreamEntry {
                offset: id_offset(&id),
                id,
                fields: fields
                    .into_iter()
                    .map(|(f, v)| (lossy(&f), RawValue::of(v)))
                    .collect(),
            });
        }
        if n < XRANGE_COUNT {
            break;
        }
    }
    Ok(out)
}
