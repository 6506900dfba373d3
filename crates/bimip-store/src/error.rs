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
}
