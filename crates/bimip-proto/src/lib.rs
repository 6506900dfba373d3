//! The bimip wire vocabulary shared by the server, the client library, the CLI and the tests:
//! the `bimip.v1` protobuf types (generated from `proto/` at build time), their canonical proto3
//! JSON mapping, the frame codec for both WebSocket subprotocols, and identifier validation.

pub mod codec;
pub mod ids;

/// Generated code, nested like the protobuf packages so cross-package references resolve.
#[allow(clippy::all, missing_docs)]
pub mod bimip {
    /// `bimip.v1`: the wire schema (docs/PROTOCOL.md).
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/bimip.v1.rs"));
        include!(concat!(env!("OUT_DIR"), "/bimip.v1.serde.rs"));
    }
    pub mod store {
        /// `bimip.store.v1`: the records of the embedded file store (docs/ARCHITECTURE.md).
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/bimip.store.v1.rs"));
            include!(concat!(env!("OUT_DIR"), "/bimip.store.v1.serde.rs"));
        }
    }
}

pub use bimip::store::v1 as store;
pub use bimip::v1;

pub use codec::{Codec, DecodeError};
pub use ids::{IdError, validate_device_id, validate_message_id, validate_user_id};
pub use v1::frame::Body;

/// Current time as unix milliseconds, the unit of every timestamp on the wire and on disk.
pub fn now_ms() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl v1::Frame {
    /// A frame with the given body and correlation id.
    pub fn with(r#ref: u64, body: Body) -> Self {
        v1::Frame {
            r#ref,
            body: Some(body),
        }
    }

    /// A server `Error` frame answering the frame with correlation id `r#ref`.
    pub fn error(r#ref: u64, code: v1::ErrorCode, message: impl Into<String>) -> Self {
        Self::with(
            r#ref,
            Body::Error(v1::Error {
                code: code as i32,
                message: message.into(),
            }),
        )
    }

    /// Short name of the frame's body, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match &self.body {
            None => "empty",
            Some(Body::Welcome(_)) => "welcome",
            Some(Body::Awareness(_)) => "awareness",
            Some(Body::Message(_)) => "message",
            Some(Body::Ack(_)) => "ack",
            Some(Body::Receipt(_)) => "receipt",
            Some(Body::Batch(_)) => "batch",
            Some(Body::Summary(_)) => "summary",
            Some(Body::Subscribe(_)) => "subscribe",
            Some(Body::PushToken(_)) => "push_token",
            Some(Body::Error(_)) => "error",
            Some(Body::Ping(_)) => "ping",
            Some(Body::Pong(_)) => "pong",
        }
    }
}
