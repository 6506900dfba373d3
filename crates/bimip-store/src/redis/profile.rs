//! [`ProfileStore`] on Redis: a user's profile is five keys (`{u}:prof`, `{u}:contacts`,
//! `{u}:listed_by`, `{u}:blocks`, `{u}:blocked_by`, see [`super::Keys`]).
//!
//! Each change is one Lua script that writes both sides of a relation at once, so the sides
//! never disagree, not even after a crash: the file store's ordering rules (reverse side first
//! when adding) are not needed on a single Redis. Every key a script touches is passed in `KEYS`;
//! the keys of two users lie in different Redis Cluster slots, so a Cluster deployment would
//! need the file store's ordered two-step instead. A `last_seen`-only update is written at once
//! like any other (the contract allows it to be later; on Redis there is no reason to wait).

use crate::rules::check_user;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use bimip_proto::v1::Status;
use redis::Script;

use super::{RedisStore, map_err};
use crate::{PresenceUpdate, Profile, ProfileStore, StoreError};

static CONTACTS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/profile_contacts.lua")));
static REMOVE_CONTACT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/profile_remove_contact.lua")));
static BLOCK: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/profile_block.lua")));
static PRESENCE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/profile_presence.lua")));

/// How often `put_contacts` with `replace` starts over when contacts were added meanwhile.
const MAX_ATTEMPTS: usize = 16;

/// A profile's keys as Redis returns them (hash fields as pairs, set members).
#[derive(Debug, Default)]
pub(crate) struct RawProfile {
    pub prof: Vec<(String, String)>,
    pub contacts: Vec<(String, String)>,
    pub listed_by: Vec<(String, String)>,
    pub blocks: Vec<String>,
    pub blocked_by: Vec<String>,
}

/// One field of a profile key that does not hold what the store writes: (key suffix, field,
/// reason).
pub(crate) type BadField = (&'static str, String, String);

fn flag(v: &str) -> Result<bool, String> {
    match v {
        "0" => Ok(false),
        "1" => Ok(true),
        other => Err(format!("{other:?} is not 0 or 1")),
    }
}

fn int(v: &str) -> Result<i64, String> {
    v.parse::<i64>()
        .map_err(|_| format!("{v:?} is not an integer"))
}

/// The intents a profile can hold.
fn intent_of(v: &str) -> Result<Status, String> {
    let n = v
        .parse::<i32>()
        .map_err(|_| format!("{v:?} is not a status number"))?;
    match Status::try_from(n) {
        Ok(s @ (Status::Unspecified | Status::Away | Status::Busy | Status::Dnd)) => Ok(s),
        _ => Err(format!("{n} is not an intent (0, AWAY, BUSY or DND)")),
    }
}

impl RawProfile {
    /// Decodes the profile; every field that does not decode is returned (all of them, for
    /// `check`), and the profile only when there is none.
    pub fn decode(self) -> Result<Profile, Vec<BadField>> {
        let (p, bad) = self.decode_lossy();
        if bad.is_empty() { Ok(p) } else { Err(bad) }
    }

    /// The profile of what decodes, and what does not.
    pub fn decode_lossy(&self) -> (Profile, Vec<BadField>) {
        let mut p = Profile::default();
        let mut bad: Vec<BadField> = Vec::new();
        for (f, v) in &self.prof {
            let r = match f.as_str() {
                "intent" => intent_of(v).map(|s| p.intent = s),
                "details" => {
                    p.details = v.clone();
                    Ok(())
                }
                "intent_at" => int(v).map(|n| p.intent_at = n),
                "invisible" => flag(v).map(|b| p.invisible = b),
                "invisible_since" => int(v).map(|n| p.invisible_since = n),
                "last_seen" => int(v).map(|n| p.last_seen = n),
                _ => Err("unknown field".to_string()),
            };
            if let Err(e) = r {
                bad.push(("prof", f.clone(), e));
            }
        }
        for (suffix, pairs, out) in [
            ("contacts", &self.contacts, &mut p.contacts),
            ("listed_by", &self.listed_by, &mut p.listed_by),
        ] {
            for (other, v) in pairs {
                if let Err(e) = check_user(other) {
                    bad.push((suffix, other.clone(), e.to_string()));
                }
                match flag(v) {
                    Ok(b) => {
                        out.insert(other.clone(), b);
                    }
                    Err(e) => bad.push((suffix, other.clone(), e)),
                }
            }
        }
        for (suffix, members, out) in [
            ("blocks", &self.blocks, &mut p.blocks),
            ("blocked_by", &self.blocked_by, &mut p.blocked_by),
        ] {
            for other in members {
                if let Err(e) = check_user(other) {
                    bad.push((suffix, other.clone(), e.to_string()));
                }
                out.insert(other.clone());
            }
        }
        (p, bad)
    }
}

impl RedisStore {
    /// The five keys of `user`'s profile, in the order the presence script takes them.
    fn profile_keys(&self, user: &str) -> [String; 5] {
        let k = &self.inner.keys;
        [
            k.profile(user),
            k.contacts(user),
            k.listed_by(user),
            k.blocks(user),
            k.blocked_by(user),
        ]
    }

    /// Reads a profile's keys in one round trip (MULTI/EXEC, so no change is seen half).
    pub(crate) async fn raw_profile(&self, user: &str) -> Result<RawProfile, StoreError> {
        let [prof, contacts, listed_by, blocks, blocked_by] = self.profile_keys(user);
        let (prof, contacts, listed_by, blocks, blocked_by) = redis::pipe()
            .atomic()
            .hgetall(prof)
            .hgetall(contacts)
            .hgetall(listed_by)
            .smembers(blocks)
            .smembers(blocked_by)
            .query_async(&mut self.connection())
            .await
            .map_err(map_err)?;
        Ok(RawProfile {
            prof,
            contacts,
            listed_by,
            blocks,
            blocked_by,
        })
    }

    fn decode_profile(&self, user: &str, raw: RawProfile) -> Result<Profile, StoreError> {
        raw.decode().map_err(|bad| {
            let list: Vec<String> = bad
                .iter()
                .map(|(suffix, field, why)| {
                    format!("{} {field:?}: {why}", self.inner.keys.user(user, suffix))
                })
                .collect();
            StoreError::Internal(format!("profile of {user:?}: {}", list.join("; ")))
        })
    }
}

impl ProfileStore for RedisStore {
    async fn profile(&self, user: &str) -> Result<Profile, StoreError> {
        check_user(user)?;
        let raw = self.raw_profile(user).await?;
        self.decode_profile(user, raw)
    }

    async fn put_contacts(
        &self,
        user: &str,
        entries: Vec<(String, bool)>,
        replace: bool,
    ) -> Result<usize, StoreError> {
        crate::rules::check_contacts(user, &entries)?;
        // The last flag of a repeated contact wins.
        let wanted: BTreeMap<String, bool> = entries.into_iter().collect();
        let k = &self.inner.keys;
        // With `replace`, the script needs the listed_by keys of the contacts it drops: it names
        // those it was not given, and the call is repeated with them.
        let mut known: BTreeSet<String> = BTreeSet::new();
        for _ in 0..MAX_ATTEMPTS {
            let mut inv = CONTACTS.prepare_invoke();
            inv.key(k.contacts(user)).key(k.users());
            inv.arg(user).arg(u8::from(replace)).arg(wanted.len());
            for (c, one_way) in &wanted {
                inv.key(k.listed_by(c)).arg(c).arg(u8::from(*one_way));
            }
            for c in &known {
                inv.key(k.listed_by(c)).arg(c);
            }
            let reply: Vec<String> = inv
                .invoke_async(&mut self.connection())
                .await
                .map_err(map_err)?;
            match reply.split_first() {
                Some((tag, rest)) if tag == "ok" => {
                    let n = rest.first().and_then(|n| n.parse::<usize>().ok());
                    return n.ok_or_else(|| {
                        StoreError::Internal(format!("put_contacts script answered {reply:?}"))
                    });
                }
                Some((tag, rest)) if tag == "retry" && !rest.is_empty() => {
                    known.extend(rest.iter().filter(|c| !wanted.contains_key(*c)).cloned());
                }
                _ => {
                    return Err(StoreError::Internal(format!(
                        "put_contacts script answered {reply:?}"
                    )));
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "the contacts of {user:?} kept changing; try again"
        )))
    }

    async fn remove_contact(&self, user: &str, contact: &str) -> Result<bool, StoreError> {
        check_user(user)?;
        check_user(contact)?;
        let k = &self.inner.keys;
        let existed: i64 = REMOVE_CONTACT
            .key(k.contacts(user))
            .key(k.listed_by(contact))
            .arg(user)
            .arg(contact)
            .invoke_async(&mut self.connection())
            .await
            .map_err(map_err)?;
        Ok(existed > 0)
    }

    async fn set_block(&self, user: &str, other: &str, blocked: bool) -> Result<bool, StoreError> {
        crate::rules::check_block(user, other)?;
        let k = &self.inner.keys;
        let changed: i64 = BLOCK
            .key(k.blocks(user))
            .key(k.blocked_by(other))
            .key(k.users())
            .arg(user)
            .arg(other)
            .arg(u8::from(blocked))
            .invoke_async(&mut self.connection())
            .await
            .map_err(map_err)?;
        Ok(changed > 0)
    }

    async fn set_presence(
        &self,
        user: &str,
        update: PresenceUpdate,
    ) -> Result<Profile, StoreError> {
        check_user(user)?;
        let (intent, details) = match update.intent {
            None => (String::new(), String::new()),
            Some((status, details)) => match status {
                Status::Away | Status::Busy | Status::Dnd => ((status as i32).to_string(), details),
                Status::Unspecified | Status::Online => ("0".to_string(), String::new()),
                other => {
                    return Err(StoreError::Invalid(format!(
                        "{} is not an intent (expected AWAY, BUSY, DND, or ONLINE to clear)",
                        other.as_str_name()
                    )));
                }
            },
        };
        let invisible = update
            .invisible
            .map_or(String::new(), |b| u8::from(b).to_string());
        let last_seen = update.last_seen.map_or(String::new(), |t| t.to_string());
        let mut inv = PRESENCE.prepare_invoke();
        for key in self.profile_keys(user) {
            inv.key(key);
        }
        inv.key(self.inner.keys.users());
        inv.arg(user)
            .arg(bimip_proto::now_ms())
            .arg(intent)
            .arg(details)
            .arg(invisible)
            .arg(last_seen);
        type Reply = (
            Vec<(String, String)>,
            Vec<(String, String)>,
            Vec<(String, String)>,
            Vec<String>,
            Vec<String>,
        );
        let (prof, contacts, listed_by, blocks, blocked_by): Reply = inv
            .invoke_async(&mut self.connection())
            .await
            .map_err(map_err)?;
        let raw = RawProfile {
            prof,
            contacts,
            listed_by,
            blocks,
            blocked_by,
        };
        self.decode_profile(user, raw)
    }
}

/// Every script of this module (loaded into Redis ahead of use).
pub(crate) fn scripts() -> Vec<&'static Script> {
    vec![&*CONTACTS, &*REMOVE_CONTACT, &*BLOCK, &*PRESENCE]
}
