//! Binary (`bimip.v1`) frames: decoding arbitrary bytes never panics, and a frame that decodes
//! re-encodes to bytes that decode to the same value.
#![no_main]

use bimip_proto::Codec;
use bimip_proto::codec::Encoded;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = Codec::Binary.decode_binary(data) else {
        return;
    };
    let Encoded::Binary(bytes) = Codec::Binary.encode(&frame) else {
        panic!("the binary codec must encode to a binary message");
    };
    let again = Codec::Binary
        .decode_binary(&bytes)
        .expect("a re-encoded frame must decode");
    assert_eq!(again, frame, "binary round trip changed the frame");
});
