//! Frame codec for the two WebSocket subprotocols: `bimip.v1` (binary protobuf) and
//! `bimip.v1.json` (canonical proto3 JSON in text frames). Same semantics on both.

use crate::v1::Frame;
use prost::Message as _;

/// Subprotocol name of binary protobuf frames (also the default without a subprotocol).
pub const SUBPROTOCOL_BINARY: &str = "bimip.v1";
/// Subprotocol name of JSON text frames.
pub const SUBPROTOCOL_JSON: &str = "bimip.v1.json";

/// How frames are encoded on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Binary,
    Json,
}

/// One encoded frame, ready for a WebSocket message of the matching type.
#[derive(Debug, Clone)]
pub enum Encoded {
    Binary(bytes::Bytes),
    Text(String),
}

/// Why an incoming frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid protobuf frame: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("invalid JSON frame: {0}")]
    Json(#[from] serde_json::Error),
    #[error("a {got} WebSocket message was sent on a {expected} connection")]
    WrongMessageType {
        got: &'static str,
        expected: &'static str,
    },
    #[error("the frame has no body")]
    NoBody,
}

impl Codec {
    /// The codec for a negotiated subprotocol; none (or an unknown one) means binary.
    pub fn from_subprotocol(p: Option<&str>) -> Codec {
        match p {
            Some(SUBPROTOCOL_JSON) => Codec::Json,
            _ => Codec::Binary,
        }
    }

    pub fn subprotocol(self) -> &'static str {
        match self {
            Codec::Binary => SUBPROTOCOL_BINARY,
            Codec::Json => SUBPROTOCOL_JSON,
        }
    }

    pub fn encode(self, frame: &Frame) -> Encoded {
        match self {
            Codec::Binary => Encoded::Binary(frame.encode_to_vec().into()),
            // Serializing a generated message to JSON cannot fail (no maps with non-string keys).
            Codec::Json => Encoded::Text(serde_json::to_string(frame).unwrap_or_default()),
        }
    }

    /// Decodes a binary WebSocket message.
    pub fn decode_binary(self, data: &[u8]) -> Result<Frame, DecodeError> {
        match self {
            Codec::Binary => check(Frame::decode(data)?),
            Codec::Json => Err(DecodeError::WrongMessageType {
                got: "binary",
                expected: "text (bimip.v1.json)",
            }),
        }
    }

    /// Decodes a text WebSocket message.
    pub fn decode_text(self, text: &str) -> Result<Frame, DecodeError> {
        match self {
            Codec::Json => check(serde_json::from_str(text)?),
            Codec::Binary => Err(DecodeError::WrongMessageType {
                got: "text",
                expected: "binary (bimip.v1)",
            }),
        }
    }
}

fn check(frame: Frame) -> Result<Frame, DecodeError> {
    if frame.body.is_none() {
        return Err(DecodeError::NoBody);
    }
    Ok(frame)
}

/// Best-effort correlation id of an undecodable JSON frame, so its `Error` can carry the `ref`.
pub fn salvage_json_ref(text: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| match v.get("ref") {
            Some(serde_json::Value::String(s)) => s.parse().ok(),
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            _ => None,
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{self, frame::Body};
    use proptest::prelude::*;

    fn sample() -> Frame {
        Frame::with(
            7,
            Body::Message(v1::Message {
                id: "m1".into(),
                to: "bob".into(),
                partition: v1::Partition::Chat as i32,
                payload: bytes::Bytes::from_static(b"hi"),
                offset: u64::MAX,
                ..Default::default()
            }),
        )
    }

    #[test]
    fn json_is_canonical_proto3() {
        let Encoded::Text(t) = Codec::Json.encode(&sample()) else {
            panic!("json codec makes text")
        };
        let v: serde_json::Value = serde_json::from_str(&t).expect("valid json");
        assert_eq!(v["ref"], "7", "64-bit integers are strings");
        assert_eq!(v["message"]["partition"], "PARTITION_CHAT");
        assert_eq!(v["message"]["payload"], "aGk=");
        assert_eq!(v["message"]["offset"], "18446744073709551615");
        assert_eq!(Codec::Json.decode_text(&t).expect("round trip"), sample());
    }

    #[test]
    fn json_accepts_numbers_and_enum_numbers() {
        let f = Codec::Json
            .decode_text(
                r#"{"ref":3,"message":{"id":"x","to":"b","partition":1,"unknownField":1}}"#,
            )
            .expect("lenient input");
        assert_eq!(f.r#ref, 3);
    }

    #[test]
    fn binary_round_trip_and_errors() {
        let Encoded::Binary(b) = Codec::Binary.encode(&sample()) else {
            panic!("binary codec makes bytes")
        };
        assert_eq!(
            Codec::Binary.decode_binary(&b).expect("round trip"),
            sample()
        );
        assert!(matches!(
            Codec::Binary.decode_binary(&[]),
            Err(DecodeError::NoBody)
        ));
        assert!(Codec::Binary.decode_binary(&[0xff, 0xff, 0xff]).is_err());
        assert!(Codec::Binary.decode_text("{}").is_err());
        assert!(Codec::Json.decode_text("{").is_err());
        assert_eq!(salvage_json_ref(r#"{"ref":"42","message":7}"#), 42);
    }

    proptest! {
        #[test]
        fn binary_decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Codec::Binary.decode_binary(&data);
        }

        #[test]
        fn json_decoder_never_panics(text in "\\PC{0,256}") {
            let _ = Codec::Json.decode_text(&text);
            let _ = salvage_json_ref(&text);
        }

        #[test]
        fn json_decoder_never_panics_on_frame_shaped_input(
            r in any::<u64>(), id in "\\PC{0,20}", to in "\\PC{0,20}", part in -3i64..6, pl in "[A-Za-z0-9+/=]{0,12}"
        ) {
            let text = format!(r#"{{"ref":"{r}","message":{{"id":{id:?},"to":{to:?},"partition":{part},"payload":"{pl}"}}}}"#);
            let _ = Codec::Json.decode_text(&text);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn deeply_nested_json_is_refused_without_overflow(depth in 1usize..20_000, obj in any::<bool>()) {
            let (open, close) = if obj { (r#"{"message":"#, "}") } else { ("[", "]") };
            let text = format!("{}1{}", open.repeat(depth), close.repeat(depth));
            let _ = Codec::Json.decode_text(&text);
            let _ = salvage_json_ref(&text);
        }

        #[test]
        fn deeply_nested_protobuf_is_refused_without_overflow(depth in 1usize..5_000) {
            // Field 7 (batch) → field 3 (message) → ... as nested length-delimited fields.
            let mut data: Vec<u8> = vec![];
            for i in 0..depth {
                let tag = if i % 2 == 0 { 0x1a } else { 0x3a };
                let mut outer = vec![tag];
                prost::encoding::encode_varint(data.len() as u64, &mut outer);
                outer.extend_from_slice(&data);
                data = outer;
            }
            let _ = Codec::Binary.decode_binary(&data);
        }

        #[test]
        fn huge_repeated_fields_decode_or_fail_cleanly(n in 0usize..20_000, field in 1u8..16) {
            // A Batch (field 7) whose body repeats one length-delimited field n times.
            let mut body = Vec::with_capacity(n * 3);
            for _ in 0..n {
                body.extend_from_slice(&[(field << 3) | 2, 1, b'x']);
            }
            let mut data = vec![0x3a];
            prost::encoding::encode_varint(body.len() as u64, &mut data);
            data.extend_from_slice(&body);
            let _ = Codec::Binary.decode_binary(&data);
        }
    }
}
