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
    /// Offsets of one (partition, sender) key.
    pub fn index(&self, user: &str, partition: i32, from: &str) -> String {
        self.user(user, &format!("ix:{partition}:{from}"))
    }
    pub fn senders(&self, user: &str, partition: i32) -> String {
        self.user(user, &format!("snd:{partition}"))
    }
    pub fn sent(&self, user: &str, to: &str) -> String {
        self.user(user, &format!("sent:{to}"))
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_keys_share_a_hash_tag() {
        let k = Keys::new("bimip");
        assert_eq!(k.queue("alice"), "bimip:{alice}:q");
        assert_eq!(k.index("alice", 1, "bob"), "bimip:{alice}:ix:1:bob");
        assert!(k.cursors("alice").starts_with(&k.user_prefix("alice")));
        assert_eq!(k.node_channel("n1"), "bimip:ch:node:n1");
    }
}
