//! `Refused`: a request the server turned down, with the wire error code it answers with
//! (an `Error` frame on a WebSocket, a JSON error over HTTP).

use bimip_proto::v1::ErrorCode;
use bimip_store::StoreError;

/// A request that failed, with the wire error code to answer with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    pub code: ErrorCode,
    pub message: String,
}

impl Refused {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refused {
        Refused {
            code,
            message: message.into(),
        }
    }
    pub fn bad(message: impl Into<String>) -> Refused {
        Refused::new(ErrorCode::BadRequest, message)
    }
}

impl From<StoreError> for Refused {
    fn from(e: StoreError) -> Refused {
        match e {
            StoreError::InvalidUser(u) => Refused::bad(format!("invalid user id {u:?}")),
            StoreError::Invalid(m) => Refused::bad(m),
            StoreError::Closed => Refused::new(ErrorCode::Unavailable, "server is shutting down"),
            StoreError::Io { .. } => {
                tracing::error!(error = %e, "store write failed");
                Refused::new(ErrorCode::Unavailable, "storage unavailable, retry later")
            }
            StoreError::Unavailable(_) => {
                tracing::warn!(error = %e, "store unavailable");
                Refused::new(ErrorCode::Unavailable, "storage unavailable, retry later")
            }
            StoreError::Internal(_) => {
                tracing::error!(error = %e, "store error");
                Refused::new(ErrorCode::Internal, "storage error")
            }
            StoreError::Corrupt { .. } => {
                tracing::error!(error = %e, "store corruption");
                Refused::new(ErrorCode::Internal, "storage error")
            }
        }
    }
}

/// Metric label of a wire error code.
pub fn error_label(code: i32) -> &'static str {
    match ErrorCode::try_from(code) {
        Ok(ErrorCode::BadRequest) => "bad_request",
        Ok(ErrorCode::Unauthorized) => "unauthorized",
        Ok(ErrorCode::Forbidden) => "forbidden",
        Ok(ErrorCode::NotFound) => "not_found",
        Ok(ErrorCode::RateLimited) => "rate_limited",
        Ok(ErrorCode::TooLarge) => "too_large",
        Ok(ErrorCode::Unavailable) => "unavailable",
        Ok(ErrorCode::Internal) => "internal",
        _ => "unspecified",
    }
}
