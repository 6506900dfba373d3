//! The line format of both store files (docs/ARCHITECTURE.md, "Files"): standard padded Base64 of
//! (protobuf bytes ‖ CRC-32C of those bytes, little-endian), then `\n`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Why one line could not be decoded. Decoding never panics, whatever the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("bad base64: {0}")]
    Base64(String),
    #[error("too short: {0} bytes, a record needs at least 4 (the CRC)")]
    TooShort(usize),
    #[error("CRC mismatch: stored {stored:08x}, computed {computed:08x}")]
    Crc { stored: u32, computed: u32 },
    #[error("bad protobuf: {0}")]
    Protobuf(String),
    #[error("torn line: no trailing newline")]
    Torn,
}

/// Encodes one record as a complete line, `\n` included.
pub fn encode_line<M: prost::Message>(msg: &M) -> Vec<u8> {
    let mut raw = msg.encode_to_vec();
    let crc = crc32c::crc32c(&raw);
    raw.extend_from_slice(&crc.to_le_bytes());
    let mut line = STANDARD.encode(&raw).into_bytes();
    line.push(b'\n');
    line
}

/// Appends the line of `msg` to `out` (avoids one allocation per record in batches).
pub fn encode_line_into<M: prost::Message>(msg: &M, out: &mut Vec<u8>) {
    out.extend_from_slice(&encode_line(msg));
}

/// Checks base64 and CRC of one line (without its `\n`) and returns the protobuf bytes.
pub fn decode_payload(line: &[u8]) -> Result<Vec<u8>, LineError> {
    let mut raw = STANDARD
        .decode(line)
        .map_err(|e| LineError::Base64(e.to_string()))?;
    if raw.len() < 4 {
        return Err(LineError::TooShort(raw.len()));
    }
    let split = raw.len() - 4;
    let mut crc_bytes = [0u8; 4];
    crc_bytes.copy_from_slice(&raw[split..]);
    let stored = u32::from_le_bytes(crc_bytes);
    let computed = crc32c::crc32c(&raw[..split]);
    if stored != computed {
        return Err(LineError::Crc { stored, computed });
    }
    raw.truncate(split);
    Ok(raw)
}

/// Decodes one line (without its `\n`) into a record.
pub fn decode_line<M: prost::Message + Default>(line: &[u8]) -> Result<M, LineError> {
    let raw = decode_payload(line)?;
    M::decode(raw.as_slice()).map_err(|e| LineError::Protobuf(e.to_string()))
}

/// One line of a file as found on disk.
#[derive(Debug)]
pub struct RawLine<'a> {
    /// 1-based line number.
    pub number: u64,
    /// Byte offset of the line's first byte in the file.
    pub start: u64,
    /// The line without its `\n`.
    pub bytes: &'a [u8],
    /// Whether the line ended with `\n` (only the last line of a file may not).
    pub terminated: bool,
}

/// Splits file contents into lines, keeping positions so a bad tail can be cut off exactly.
pub fn split_lines(data: &[u8]) -> impl Iterator<Item = RawLine<'_>> {
    let mut pos = 0usize;
    let mut number = 0u64;
    std::iter::from_fn(move || {
        if pos >= data.len() {
            return None;
        }
        number += 1;
        let rest = &data[pos..];
        let start = pos;
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                pos += i + 1;
                Some(RawLine {
                    number,
                    start: start as u64,
                    bytes: &rest[..i],
                    terminated: true,
                })
            }
            None => {
                pos = data.len();
                Some(RawLine {
                    number,
                    start: start as u64,
                    bytes: rest,
                    terminated: false,
                })
            }
        }
    })
}

/// A decoded line or why it could not be decoded.
pub struct DecodedLine<M> {
    pub number: u64,
    pub start: u64,
    pub result: Result<M, LineError>,
}

/// Decodes every line of `data`; an unterminated final line is reported as [`LineError::Torn`]
/// even if its content happens to decode (the writer never completed it).
pub fn decode_all<M: prost::Message + Default>(data: &[u8]) -> Vec<DecodedLine<M>> {
    split_lines(data)
        .map(|l| DecodedLine {
            number: l.number,
            start: l.start,
            result: if l.terminated {
                decode_line(l.bytes)
            } else {
                Err(LineError::Torn)
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bimip_proto::store::{IndexRecord, QueueRecord};
    use proptest::prelude::*;

    fn record() -> impl Strategy<Value = QueueRecord> {
        (
            any::<u64>(),
            0i32..4,
            "[a-z0-9]{0,12}",
            "[a-z0-9]{0,12}",
            proptest::collection::vec(any::<u8>(), 0..64),
            any::<i64>(),
            any::<bool>(),
            "[a-z0-9-]{0,20}",
            0i32..2,
        )
            .prop_map(
                |(offset, partition, from, to, payload, ts, ack, id, kind)| QueueRecord {
                    offset,
                    partition,
                    from,
                    to,
                    payload: payload.into(),
                    timestamp: ts,
                    acknowledged: ack,
                    message_id: id,
                    device: "d".into(),
                    kind,
                    peer_offset: offset / 2,
                },
            )
    }

    proptest! {
        #[test]
        fn round_trip(rec in record()) {
            let line = encode_line(&rec);
            prop_assert_eq!(line.last(), Some(&b'\n'));
            prop_assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            let back: QueueRecord = decode_line(&line[..line.len() - 1]).unwrap();
            prop_assert_eq!(back, rec);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_line::<QueueRecord>(&bytes);
            let _ = decode_line::<IndexRecord>(&bytes);
            let _ = decode_all::<QueueRecord>(&bytes);
        }

        #[test]
        fn random_base64_lines_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            // Valid base64 (often a valid CRC-less blob): must fail cleanly, not panic.
            let line = STANDARD.encode(&raw);
            let _ = decode_line::<QueueRecord>(line.as_bytes());
            // With a correct CRC the protobuf decoder sees random bytes.
            let mut with_crc = raw.clone();
            with_crc.extend_from_slice(&crc32c::crc32c(&raw).to_le_bytes());
            let line = STANDARD.encode(&with_crc);
            let _ = decode_line::<IndexRecord>(line.as_bytes());
        }

        #[test]
        fn flipped_byte_is_detected(rec in record(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let line = encode_line(&rec);
            let body = &line[..line.len() - 1];
            let mut raw = STANDARD.decode(body).unwrap();
            let i = pos.index(raw.len());
            raw[i] ^= 1 << bit;
            let bad = STANDARD.encode(&raw);
            prop_assert!(decode_line::<QueueRecord>(bad.as_bytes()).is_err());
        }
    }

    #[test]
    fn typed_errors() {
        assert!(matches!(
            decode_line::<QueueRecord>(b"!!!"),
            Err(LineError::Base64(_))
        ));
        assert!(matches!(
            decode_line::<QueueRecord>(b"AAA="),
            Err(LineError::TooShort(2))
        ));
        assert!(matches!(
            decode_line::<QueueRecord>(b"AAAAAQ=="),
            Err(LineError::Crc { .. })
        ));
        // A CRC-valid blob that is not a protobuf message (field 0 is invalid).
        let raw = [0u8, 0u8];
        let mut blob = raw.to_vec();
        blob.extend_from_slice(&crc32c::crc32c(&raw).to_le_bytes());
        let line = STANDARD.encode(&blob);
        assert!(matches!(
            decode_line::<QueueRecord>(line.as_bytes()),
            Err(LineError::Protobuf(_))
        ));
    }

    #[test]
    fn split_keeps_positions() {
        let lines: Vec<_> = split_lines(b"ab\ncd\nef").collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1].start, 3);
        assert_eq!(lines[1].bytes, b"cd");
        assert!(!lines[2].terminated);
        assert_eq!(lines[2].number, 3);
    }
}
