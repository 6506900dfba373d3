//! Token revocations (`POST /v1/users/{user}/revoke`) shared by every node: one hash
//! `P:revocations`, user → `not_before` (unix seconds), instead of one node's JSON file.

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::Script;

use super::{RedisStore, map_err};
use crate::StoreError;
use crate::rules::check_user;

static PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/int_cmp.lua"),
        include_str!("lua/revocation_put.lua")
    ))
});

impl RedisStore {
    /// Every revocation: user → `not_before`. One `HGETALL`; an entry that is not an integer
    /// is an [`StoreError::Internal`] error naming it.
    pub async fn revocations(&self) -> Result<HashMap<String, i64>, StoreError> {
        let key = self.inner.keys.revocations();
        let all: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut self.connection())
            .await
            .map_err(map_err)?;
        all.into_iter()
            .map(|(user, v)| match v.parse::<i64>() {
                Ok(n) => Ok((user, n)),
                Err(_) => Err(StoreError::Internal(format!(
                    "{key} {user:?}: {v:?} is not an integer"
                ))),
            })
            .collect()
    }

    /// Records that tokens of `user` issued before `not_before` are refused; an existing later
    /// `not_before` is kept (two nodes revoking at once never move it back). One script.
    pub async fn put_revocation(&self, user: &str, not_before: i64) -> Result<(), StoreError> {
        check_user(user)?;
        let _: String = PUT
            .key(self.inner.keys.revocations())
            .arg(user)
            .arg(not_before)
            .invoke_async(&mut self.connection())
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

/// Every script of this module (loaded into Redis ahead of use).
pub(crate) fn scripts() -> Vec<&'static Script> {
    vec![&*PUT]
}
