//! Store lines (docs/ARCHITECTURE.md, "Files"): the line decoder never panics on arbitrary bytes, for every record
//! type; a line that passes base64 + CRC is exactly the canonical encoding of its payload, and a
//! decoded record re-encodes to a line that decodes to the same record.
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bimip_proto::store::{IndexRecord, Profile, QueueRecord};
use bimip_store::file::record::{LineError, decode_all, decode_line, decode_payload, encode_line};
use libfuzzer_sys::fuzz_target;

fn round_trip<M>(line: &[u8])
where
    M: prost::Message + Default + PartialEq + std::fmt::Debug,
{
    let Ok(rec) = decode_line::<M>(line) else {
        return;
    };
    let encoded = encode_line(&rec);
    assert_eq!(
        encoded.last(),
        Some(&b'\n'),
        "an encoded line ends with \\n"
    );
    assert_eq!(
        encoded.iter().filter(|&&b| b == b'\n').count(),
        1,
        "an encoded line holds exactly one \\n"
    );
    let again =
        decode_line::<M>(&encoded[..encoded.len() - 1]).expect("a re-encoded record must decode");
    assert_eq!(again, rec, "store line round trip changed the record");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(payload) = decode_payload(data) {
        // Padded base64 is decoded canonically, so an accepted line is exactly the encoding of
        // (payload ‖ CRC-32C(payload) little-endian).
        let raw = STANDARD
            .decode(data)
            .expect("an accepted line is valid base64");
        let (body, crc) = raw.split_at(raw.len() - 4);
        assert_eq!(
            body,
            payload.as_slice(),
            "payload is the line minus its CRC"
        );
        assert_eq!(
            crc,
            crc32c::crc32c(body).to_le_bytes(),
            "an accepted line carries the right CRC"
        );
        assert_eq!(
            STANDARD.encode(&raw).as_bytes(),
            data,
            "an accepted line is not the canonical encoding of its bytes"
        );
    }
    round_trip::<QueueRecord>(data);
    round_trip::<IndexRecord>(data);
    round_trip::<Profile>(data);

    // Whole-file decoding: one result per line, the unterminated tail reported as torn.
    let lines = decode_all::<QueueRecord>(data);
    let expected = data.split(|&b| b == b'\n').count() - usize::from(data.ends_with(b"\n"));
    assert_eq!(lines.len(), if data.is_empty() { 0 } else { expected });
    if let Some(last) = lines.last() {
        let torn = matches!(last.result, Err(LineError::Torn));
        assert_eq!(
            torn,
            !data.ends_with(b"\n"),
            "only an unterminated tail is torn"
        );
    }
});
