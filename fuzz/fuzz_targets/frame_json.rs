//! JSON (`bimip.v1.json`) frames: decoding arbitrary UTF-8 never panics, and a frame that decodes
//! survives a JSON round trip and a binary round trip unchanged.
#![no_main]

use bimip_proto::Codec;
use bimip_proto::codec::Encoded;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(frame) = Codec::Json.decode_text(text) else {
        return;
    };
    let Encoded::Text(json) = Codec::Json.encode(&frame) else {
        panic!("the JSON codec must encode to a text message");
    };
    let again = Codec::Json
        .decode_text(&json)
        .expect("a re-encoded JSON frame must decode");
    assert_eq!(again, frame, "JSON round trip changed the frame");

    let Encoded::Binary(bytes) = Codec::Binary.encode(&frame) else {
        panic!("the binary codec must encode to a binary message");
    };
    let bin = Codec::Binary
        .decode_binary(&bytes)
        .expect("a JSON-decoded frame must survive the binary codec");
    assert_eq!(bin, frame, "binary round trip of a JSON frame changed it");
});
