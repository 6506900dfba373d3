//! Token revocation (`POST /v1/users/{user}/revoke`): a per-user `not_before` (unix seconds).
//! A token of that user is accepted only if its `iat` is at or after `not_before`; a token
//! without `iat` is refused once the user was revoked (its issue time is unknown, so it cannot
//! be shown to be newer). `not_before` is the second after the revoke, so a token minted in the
//! same second as the revoke is refused too: mint replacements with `iat >= not_before` (the API
//! answer carries it).
//!
//! Kept durably in `<data_dir>/revocations.json`, rewritten atomically (temporary file, fsync,
//! rename, fsync of the folder) on every revoke and loaded at start, so revokes survive restarts.
//! With Redis (several nodes) they are kept there instead, and a revoke made on one node reaches
//! the others' memory through the cluster channel ([`Revocations::announce`]).

use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    sync::Mutex,
};

pub const FILE: &str = "revocations.json";

#[derive(Serialize, Deserialize, Default)]
struct OnDisk {
    version: u32,
    /// user → not_before (unix seconds)
    users: HashMap<String, i64>,
}

pub struct Revocations {
    path: PathBuf,
    /// Where revokes are stored when several nodes share Redis (instead of `path`).
    redis: Option<bimip_store::RedisStore>,
    users: Mutex<HashMap<String, i64>>,
    /// Serializes file rewrites so an older snapshot never replaces a newer one.
    write: tokio::sync::Mutex<()>,
}

impl Revocations {
    /// Loads `<data_dir>/revocations.json` (none yet = nobody revoked).
    pub fn load(data_dir: &Path) -> std::io::Result<Revocations> {
        let path = data_dir.join(FILE);
        let users = match std::fs::read(&path) {
            Ok(bytes) => {
                let d: OnDisk = serde_json::from_slice(&bytes).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: {e}", path.display()),
                    )
                })?;
                d.users
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(e),
        };
        Ok(Revocations {
            path,
            redis: None,
            users: Mutex::new(users),
            write: tokio::sync::Mutex::new(()),
        })
    }

    /// Loads the revocations kept in Redis.
    pub async fn load_redis(
        store: bimip_store::RedisStore,
    ) -> Result<Revocations, bimip_store::StoreError> {
        let users = store.revocations().await?;
        Ok(Revocations {
            path: PathBuf::new(),
            redis: Some(store),
            users: Mutex::new(users),
            write: tokio::sync::Mutex::new(()),
        })
    }

    fn users(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn not_before(&self, user: &str) -> Option<i64> {
        self.users().get(user).copied()
    }

    /// Whether a token of `user` issued at `iat` (unix seconds) is still accepted.
    pub fn allows(&self, user: &str, iat: Option<i64>) -> bool {
        match self.not_before(user) {
            None => true,
            Some(nb) => iat.is_some_and(|iat| iat >= nb),
        }
    }

    /// Applies a revocation another node made (kept in memory; that node stored it).
    pub fn set_not_before(&self, user: &str, not_before: i64) {
        let mut users = self.users();
        let e = users.entry(user.to_string()).or_insert(not_before);
        *e = (*e).max(not_before);
    }

    /// Tells the other nodes of a cluster about a revocation made here.
    pub async fn announce(&self, state: &crate::state::Shared, user: &str, not_before: i64) {
        use crate::cluster::envelope::{Envelope, REVOKED};
        if let Some(c) = state.hub.cluster() {
            let mut env = Envelope::new(c.node(), REVOKED);
            env.users.push(user.to_string());
            env.at = not_before;
            if let Err(e) = c.publish_all(&env).await {
                tracing::warn!(user, error = %e, "revocation not sent to the other nodes");
            }
        }
    }

    /// Refuses every token of `user` issued up to now; returns the new `not_before`. Written
    /// durably before it returns.
    pub async fn revoke(&self, user: &str) -> std::io::Result<i64> {
        let _w = self.write.lock().await;
        let nb = bimip_proto::now_ms().div_euclid(1000) + 1;
        if let Some(store) = &self.redis {
            store
                .put_revocation(user, nb)
                .await
                .map_err(std::io::Error::other)?;
            self.set_not_before(user, nb);
            return Ok(nb);
        }
        let snapshot = {
            let mut users = self.users();
            let e = users.entry(user.to_string()).or_insert(nb);
            *e = (*e).max(nb);
            OnDisk {
                version: 1,
                users: users.clone(),
            }
        };
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_atomic(&path, &snapshot))
            .await
            .map_err(|e| std::io::Error::other(format!("revocation write task: {e}")))??;
        Ok(nb)
    }
}

fn write_atomic(path: &Path, d: &OnDisk) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(d).map_err(std::io::Error::other)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn revokes_survive_a_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Revocations::load(dir.path()).expect("load");
        assert!(r.allows("alice", None));
        let nb = r.revoke("alice").await.expect("revoke");
        assert!(!r.allows("alice", None), "no iat after a revoke");
        assert!(!r.allows("alice", Some(nb - 1)));
        assert!(r.allows("alice", Some(nb)));
        assert!(r.allows("bob", Some(0)));
        let again = Revocations::load(dir.path()).expect("reload");
        assert_eq!(again.not_before("alice"), Some(nb));
        assert!(!dir.path().join("revocations.json.tmp").exists());
    }

    #[test]
    fn a_corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(FILE), b"{not json").expect("write");
        assert!(Revocations::load(dir.path()).is_err());
    }
}
