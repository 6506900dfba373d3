//! Store errors.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Corrupt {
        path: PathBuf,
        line: u64,
        reason: String,
    },
    #[error("invalid user id {0:?}")]
    InvalidUser(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the store is shut down")]
    Closed,
    /// The backing service (Redis) cannot be reached or did not answer in time: the operation
    /// may or may not have been applied; retrying it is safe for deduplicated appends.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The backend answered something the store cannot make sense of (a script error, a record
    /// that does not decode): a bug or foreign data, not a transient condition.
    #[error("storage error: {0}")]
    Internal(String),
}
