//! Key and channel names. Every key of one user carries the hash tag `{user}` so a script that
//! touches only that user's keys stays in one Redis Cluster slot; user ids match
//! `[A-Za-z0-9_@+-][A-Za-z0-9._@+-]{0,127}`, so they never contain `{`, `}` or `:`.
//!
//! | key | type | what |
//! |---|---|---|
//! | `P:{u}:seq` | string | last offset given out (never deleted, also when the queue is empty) |
//! | `P:{u}:q` | stream | the items, ID `<offset>-0`, fields `p f t b ts m d po` (partition, from, to, payload, unix ms, message id, device, peer offset) |
//! | `P:{u}:ix:<p>` | zset (lex) | the items of partition `p` by sender: member `<len(from)>:<from><offset, 16 digits>`, score 0 |
//! | `P:{u}:po:<p>` | zset | every item of partition `p`: member and score = offset |
//! | `P:{u}:un:<p>` | zset | unacknowledged items of partition `p` (2 and 3 only): member and score = offset |
//! | `P:{u}:snd:1` | zset | chat senders with items, score = their last offset |
//! | `P:{u}:sent` | zset (lex) | the user's own chat copies: member `<len(to)>:<to><offset, 16 digits>` |
//! | `P:{u}:ids` | hash | `<len(from)>:<from><message id>` → offset of the first kept item (dedupe); `#<same>` → how many more kept items share it |
//! | `P:{u}:ack` | hash | `<p>\|<from>` → acknowledged up to (`<p>\|` = every sender) |
//! | `P:{u}:cur` | hash | cursors: `c\|<p>\|<kind>\|<len(from)>:<from><device>` → next offset; maxima `d\|<p>\|<len(from)>:<from><device>` (device, any kind), `k\|<p>\|<kind>\|<from>` (kind, any device), `a\|<p>\|<from>` (any) |
//! | `P:{u}:prof`, `:contacts`, `:listed_by`, `:blocks`, `:blocked_by` | hash/set | the profile |
//! | `P:{u}:tokens`, `:mutes` | hash | push device tokens and mutes |
//! | `P:{u}:pres` | hash | the user's connections on every node |
//!
//! Global keys (`P:users`, `P:nodes`, `P:node:<n>:conns`, `P:offline_due`, `P:compact`, `P:push:*`) and the
//! pub/sub channels (`P:ch:node:<n>`, `P:ch:all`) are named here too.
//!
//! Profile and push (`redis/profile.rs`, `redis/push.rs`):
//!
//! | key | type | what |
//! |---|---|---|
//! | `P:{u}:prof` | hash | `intent` (status number), `details`, `intent_at`, `invisible` (0/1), `invisible_since`, `last_seen`; absent = 0 / "" |
//! | `P:{u}:contacts`, `P:{u}:listed_by` | hash | other user → `one_way` (0/1) |
//! | `P:{u}:blocks`, `P:{u}:blocked_by` | set | other users |
//! | `P:{u}:tokens` | hash | device → encoded `bimip.store.v1.DeviceToken` |
//! | `P:{u}:mutes` | hash | muted user → since (unix ms) |
//! | `P:push:tokens` | hash | `<platform>\n<token>` → `<user>\n<device>` (a token has one holder) |
//! | `P:push:{jobs}` | hash | job id → encoded `OutboxJob` |
//! | `P:push:{jobs}:ver` | hash | job id → version of the stored job |
//! | `P:push:{jobs}:removed` | hash | job id → version it was removed at (tombstone) |
//! | `P:push:{jobs}:removed_at` | zset | job id, score = when removed (unix ms), to forget old tombstones |
//! | `P:push:job_ids` | string | last job id handed out (`RedisStore::reserve_job_ids`) |
//! | `P:push:dead` | list | encoded `DeadLetter`s, newest first, capped |
//! | `P:push:idem:<key>` | string | encoded `IdempotencyRecord`, expiring at its `expires_at` |
//! | `P:revocations` | hash | user → token `not_before` (unix s) |
//!
//! `P:users` also gets every user that holds a profile entry, a device token or a mute.

/// Builds key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `P:{user}:<rest>`.
    pub fn user(&self, user: &str, rest: &str) -> String {
        format!("{}:{{{user}}}:{rest}", self.prefix)
    }

    /// The prefix of every key of `user` (`P:{user}:`), for scans.
    pub fn user_prefix(&self, user: &str) -> String {
        format!("{}:{{{user}}}:", self.prefix)
    }

    /// A global key `P:<rest>`.
    pub fn global(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    pub fn seq(&self, user: &str) -> String {
        self.user(user, "seq")
    }
    pub fn queue(&self, user: &str) -> String {
        self.user(user, "q")
    }
    pub fn senders(&self, user: &str, partition: i32) -> String {
        self.user(user, &format!("snd:{partition}"))
    }
    pub fn ids(&self, user: &str) -> String {
        self.user(user, "ids")
    }
    pub fn acks(&self, user: &str) -> String {
        self.user(user, "ack")
    }
    pub fn cursors(&self, user: &str) -> String {
        self.user(user, "cur")
    }
    pub fn presence(&self, user: &str) -> String {
        self.user(user, "pres")
    }

    /// Every user with a queue or profile (a set: `bimip check` and `inspect` walk it).
    pub fn users(&self) -> String {
        self.global("users")
    }
    /// Node leases: node id → lease deadline (unix ms, Redis clock).
    pub fn nodes(&self) -> String {
        self.global("nodes")
    }
    /// One node's connections: connection id → user.
    pub fn node_conns(&self, node: &str) -> String {
        self.global(&format!("node:{node}:conns"))
    }
    /// Taken by the one node that cleans up after a dead node.
    pub fn reap_lock(&self, node: &str) -> String {
        self.global(&format!("reap:{node}"))
    }
    /// Users whose last connection went away: user → when the grace period ends (unix ms).
    pub fn offline_due(&self) -> String {
        self.global("offline_due")
    }
    /// Users whose queue may need compaction: user → when to look (unix ms).
    pub fn compact_due(&self) -> String {
        self.global("compact")
    }
    /// A node's own pub/sub channel.
    pub fn node_channel(&self, node: &str) -> String {
        self.global(&format!("ch:node:{node}"))
    }
    /// The channel every node listens on.
    pub fn all_channel(&self) -> String {
        self.global("ch:all")
    }
    /// The items of one partition by sender (a lexicographic zset, see the table).
    pub fn sender_index(&self, user: &str, partition: i32) -> String {
        self.user(user, &format!("ix:{partition}"))
    }
    /// Every item of one partition, by offset.
    pub fn partition_index(&self, user: &str, partition: i32) -> String {
        self.user(user, &format!("po:{partition}"))
    }
    /// The unacknowledged items of a notification or receipt partition, by offset.
    pub fn unacked(&self, user: &str, partition: i32) -> String {
        self.user(user, &format!("un:{partition}"))
    }
    /// The user's own chat copies by recipient (a lexicographic zset, see the table).
    pub fn sent_index(&self, user: &str) -> String {
        self.user(user, "sent")
    }

    // ---- profile and push (see the second table in the module docs) ----

    /// Intent, invisibility, last seen.
    pub fn profile(&self, user: &str) -> String {
        self.user(user, "prof")
    }
    pub fn contacts(&self, user: &str) -> String {
        self.user(user, "contacts")
    }
    pub fn listed_by(&self, user: &str) -> String {
        self.user(user, "listed_by")
    }
    pub fn blocks(&self, user: &str) -> String {
        self.user(user, "blocks")
    }
    pub fn blocked_by(&self, user: &str) -> String {
        self.user(user, "blocked_by")
    }
    /// The user's push device tokens.
    pub fn tokens(&self, user: &str) -> String {
        self.user(user, "tokens")
    }
    pub fn mutes(&self, user: &str) -> String {
        self.user(user, "mutes")
    }
    /// Who holds each push token (`<platform>\n<token>` → `<user>\n<device>`).
    pub fn token_index(&self) -> String {
        self.global("push:tokens")
    }
    /// The outbox's jobs; the job keys share the hash tag `{jobs}`.
    pub fn jobs(&self) -> String {
        self.global("push:{jobs}")
    }
    pub fn job_versions(&self) -> String {
        self.global("push:{jobs}:ver")
    }
    pub fn job_tombstones(&self) -> String {
        self.global("push:{jobs}:removed")
    }
    pub fn job_tombstone_times(&self) -> String {
        self.global("push:{jobs}:removed_at")
    }
    /// The counter job ids are taken from.
    pub fn job_ids(&self) -> String {
        self.global("push:job_ids")
    }
    pub fn dead_letters(&self) -> String {
        self.global("push:dead")
    }
    /// The prefix of the idempotency records' keys.
    pub fn idempotency_prefix(&self) -> String {
        self.global("push:idem:")
    }
    pub fn idempotency(&self, key: &str) -> String {
        format!("{}{key}", self.idempotency_prefix())
    }
    /// Token revocations: user → `not_before`.
    pub fn revocations(&self) -> String {
        self.global("revocations")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_keys_share_a_hash_tag() {
        let k = Keys::new("bimip");
        assert_eq!(k.queue("alice"), "bimip:{alice}:q");
        assert_eq!(k.sender_index("alice", 1), "bimip:{alice}:ix:1");
        assert!(k.cursors("alice").starts_with(&k.user_prefix("alice")));
        assert_eq!(k.node_channel("n1"), "bimip:ch:node:n1");
    }
}
