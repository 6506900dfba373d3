//! What nodes send each other over Redis pub/sub. Internal to a cluster of the same version;
//! protobuf so that a node of the next version can add fields without breaking this one.

use bimip_proto::v1::Frame;
use bytes::Bytes;
use prost::Message;

/// Offer `frame` to the local connections of each user in `users`.
pub const DELIVER: u32 = 1;
/// An awareness change of `about`: offer `frame` to the local connections of each user in
/// `users` (its watchers) and, under the open policy, to the local subscribers of `about` that
/// are neither in `users` nor in `exclude` (blocked either way).
pub const AWARENESS: u32 = 2;
/// Close the local connections of `users[0]` (only `device`'s when set); `why` is the reason.
pub const KICK: u32 = 3;
/// The profile of each user in `users` changed: drop cached copies.
pub const PROFILE: u32 = 4;
/// `users[0]` was revoked at `at` (its `not_before`, unix seconds).
pub const REVOKED: u32 = 5;
/// A node's liveness probe of its own subscription.
pub const PROBE: u32 = 6;

#[derive(Clone, PartialEq, Message)]
pub struct Envelope {
    /// The sending node's name.
    #[prost(string, tag = "1")]
    pub node: String,
    #[prost(uint32, tag = "2")]
    pub kind: u32,
    #[prost(string, repeated, tag = "3")]
    pub users: Vec<String>,
    /// An encoded `bimip.v1.Frame`.
    #[prost(bytes = "bytes", tag = "4")]
    pub frame: Bytes,
    #[prost(string, tag = "5")]
    pub about: String,
    #[prost(string, repeated, tag = "6")]
    pub exclude: Vec<String>,
    #[prost(string, tag = "7")]
    pub device: String,
    #[prost(uint32, tag = "8")]
    pub why: u32,
    #[prost(int64, tag = "9")]
    pub at: i64,
}

impl Envelope {
    pub fn new(node: &str, kind: u32) -> Envelope {
        Envelope {
            node: node.to_string(),
            kind,
            ..Default::default()
        }
    }

    pub fn with_frame(mut self, frame: &Frame) -> Envelope {
        self.frame = frame.encode_to_vec().into();
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    pub fn from_bytes(b: &[u8]) -> Result<Envelope, prost::DecodeError> {
        Envelope::decode(b)
    }

    /// The carried frame, decoded.
    pub fn frame(&self) -> Result<Frame, prost::DecodeError> {
        Frame::decode(self.frame.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut e = Envelope::new("n1", AWARENESS).with_frame(&Frame::default());
        e.users = vec!["a".into(), "b".into()];
        e.about = "c".into();
        let back = Envelope::from_bytes(&e.to_bytes()).expect("decodes");
        assert_eq!(back, e);
        assert!(Envelope::from_bytes(b"\xff\xff\xff").is_err());
    }
}
