//! Golden frames: `testdata/frames/*.json` holds one frame per file in the canonical JSON form
//! of the `bimip.v1.json` subprotocol, byte for byte as the server writes it. The same files are
//! decoded by the JavaScript client's tests, so both codecs are held to one reference.
//!
//! Every file must parse into a `Frame`, serialise back to the same text, and survive a round
//! trip through the binary encoding. The JSON examples of docs/PROTOCOL.md are checked too: each
//! must parse as a frame, and each frame the server sends there must be in canonical form.

use bimip_proto::{Codec, codec::Encoded, v1::Frame};
use prost::Message as _;
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `(file name, text)` of every golden frame, sorted by name.
fn golden_files() -> Vec<(String, String)> {
    let dir = repo_root().join("testdata/frames");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("UTF-8 file name")
            .to_string();
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        out.push((name, text));
    }
    out.sort();
    out
}

/// Parses a JSON frame the way the server does (a frame without a body is refused).
fn parse(what: &str, text: &str) -> Frame {
    Codec::Json
        .decode_text(text)
        .unwrap_or_else(|e| panic!("{what}: does not parse as a frame: {e}\n{text}"))
}

fn to_json(frame: &Frame) -> String {
    match Codec::Json.encode(frame) {
        Encoded::Text(t) => t,
        Encoded::Binary(_) => unreachable!("the JSON codec writes text"),
    }
}

fn value(what: &str, text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: not JSON: {e}\n{text}"))
}

/// Binary protobuf round trip: the same frame, and the same JSON after it.
fn check_binary_round_trip(what: &str, frame: &Frame) {
    let Encoded::Binary(bytes) = Codec::Binary.encode(frame) else {
        unreachable!("the binary codec writes bytes")
    };
    let back = Codec::Binary
        .decode_binary(&bytes)
        .unwrap_or_else(|e| panic!("{what}: binary round trip failed: {e}"));
    assert_eq!(&back, frame, "{what}: binary round trip changed the frame");
    assert_eq!(
        back.encode_to_vec(),
        bytes.as_ref(),
        "{what}: binary re-encoding"
    );
    assert_eq!(to_json(&back), to_json(frame), "{what}: JSON after binary");
}

#[test]
fn golden_frames_are_canonical_and_round_trip() {
    let files = golden_files();
    assert!(
        files.len() >= 12,
        "expected the golden frames, found {}",
        files.len()
    );
    let mut kinds = BTreeSet::new();
    let mut large_offset = false;
    for (name, text) in &files {
        assert!(
            text.ends_with('\n') && text.trim_end().lines().count() == 1,
            "{name}: one frame on one line, ending with a newline"
        );
        let frame = parse(name, text);
        let written = to_json(&frame);
        // Same JSON value, and the same text: the file is what the server writes.
        assert_eq!(
            value(name, &written),
            value(name, text),
            "{name}: JSON value"
        );
        assert_eq!(written, text.trim_end(), "{name}: canonical text");
        check_binary_round_trip(name, &frame);

        let kind = frame.kind();
        let client_kinds = [
            "message",
            "receipt",
            "awareness",
            "subscribe",
            "push_token",
            "ping",
        ];
        let server_kinds = [
            "welcome",
            "awareness",
            "message",
            "ack",
            "receipt",
            "batch",
            "summary",
            "error",
            "pong",
        ];
        if name.starts_with("client-") {
            assert!(
                client_kinds.contains(&kind),
                "{name}: a client does not send {kind}"
            );
        } else if name.starts_with("server-") {
            assert!(
                server_kinds.contains(&kind),
                "{name}: the server does not send {kind}"
            );
        } else {
            panic!("{name}: golden frame names start with client- or server-");
        }
        kinds.insert(kind);
        large_offset |= text.contains("\"9007199254740993\"");
    }
    let every_kind = [
        "welcome",
        "awareness",
        "message",
        "ack",
        "receipt",
        "batch",
        "summary",
        "subscribe",
        "push_token",
        "error",
        "ping",
        "pong",
    ];
    for k in every_kind {
        assert!(kinds.contains(k), "no golden frame has a {k} body");
    }
    assert!(
        large_offset,
        "a golden frame carries an offset past 2^53 (JavaScript numbers lose it)"
    );
}

#[test]
fn golden_values_decode_to_the_expected_fields() {
    use bimip_proto::{
        Body,
        v1::{Partition, Status},
    };
    let read = |name: &str| {
        let path = repo_root().join("testdata/frames").join(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        parse(name, &text)
    };
    let Some(Body::Message(m)) = read("server-message-large-offset.json").body else {
        panic!("a message")
    };
    assert_eq!(m.offset, 9_007_199_254_740_993);
    assert_eq!(m.partition, Partition::Chat as i32);
    assert_eq!(m.payload.as_ref(), [0x00, 0x01, 0x02, 0xfd, 0xfe, 0xff]);

    let Some(Body::Awareness(a)) = read("client-awareness-resume-from-offset.json").body else {
        panic!("an awareness")
    };
    assert_eq!(a.from_offset, u64::MAX);
    assert_eq!(a.status, Status::Resume as i32);

    let f = read("server-welcome.json");
    assert_eq!(f.r#ref, 0, "frames the server sends on its own have ref 0");
}

/// The JSON examples of docs/PROTOCOL.md: every line of a `json` block that holds a frame
/// (`→ {…}` from the client, `← {…}` from the server, or a bare `{…}`) must parse. Frames the
/// server sends must be in canonical form, as the server would write them.
#[test]
fn protocol_doc_examples_parse_as_frames() {
    let path = repo_root().join("docs/PROTOCOL.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut in_json = false;
    let mut frames = 0;
    for (i, line) in doc.lines().enumerate() {
        let trimmed = line.trim();
        if let Some(lang) = trimmed.strip_prefix("```") {
            in_json = !in_json && lang == "json";
            continue;
        }
        if !in_json {
            continue;
        }
        let what = format!("docs/PROTOCOL.md line {}", i + 1);
        let (from_server, text) = if let Some(t) = trimmed.strip_prefix('←') {
            (true, t.trim())
        } else if let Some(t) = trimmed.strip_prefix('→') {
            (false, t.trim())
        } else if trimmed.starts_with('{') {
            (false, trimmed)
        } else {
            // Commentary inside a block, such as "(to ann)".
            continue;
        };
        let frame = parse(&what, text);
        if from_server {
            assert_eq!(
                value(&what, &to_json(&frame)),
                value(&what, text),
                "{what}: a frame from the server is written in canonical form"
            );
        }
        check_binary_round_trip(&what, &frame);
        frames += 1;
    }
    assert!(
        frames >= 50,
        "found only {frames} example frames in docs/PROTOCOL.md"
    );
}

/// What docs/PROTOCOL.md §2 promises about JSON input besides the canonical form.
#[test]
fn json_input_rules_of_the_protocol_doc() {
    use bimip_proto::{
        Body,
        v1::{Partition, ReceiptKind, Status},
    };
    // snake_case names, 64-bit integers as JSON numbers, enums by number.
    let f = parse(
        "lenient",
        r#"{"ref":7,"receipt":{"to":"ann","kind":2,"up_to_offset":42,"partition":1}}"#,
    );
    assert_eq!(f.r#ref, 7);
    let Some(Body::Receipt(r)) = f.body else {
        panic!("a receipt")
    };
    assert_eq!(r.kind, ReceiptKind::Read as i32);
    assert_eq!(r.up_to_offset, 42);
    assert_eq!(r.partition, Partition::Chat as i32);

    // Base64: standard or URL-safe, with or without padding.
    for payload in ["AAEC/f7/", "AAEC_f7_", "aGk=", "aGk"] {
        let text = format!(r#"{{"message":{{"id":"x","to":"b","payload":"{payload}"}}}}"#);
        parse(payload, &text);
    }
    let f = parse(
        "url-safe",
        r#"{"message":{"id":"x","to":"b","payload":"AAEC_f7_"}}"#,
    );
    let Some(Body::Message(m)) = f.body else {
        panic!("a message")
    };
    assert_eq!(m.payload.as_ref(), [0x00, 0x01, 0x02, 0xfd, 0xfe, 0xff]);

    // Unknown fields are ignored.
    let f = parse(
        "unknown field",
        r#"{"ref":"1","future":{"x":1},"ping":{"timestamp":"5","later":true}}"#,
    );
    assert!(matches!(f.body, Some(Body::Ping(_))));

    // Enum names and numbers the schema does not know, and two bodies, do not decode.
    for bad in [
        r#"{"awareness":{"status":"STATUS_SLEEPING"}}"#,
        r#"{"awareness":{"status":42}}"#,
        r#"{"ref":"1","ping":{},"pong":{}}"#,
        r#"{"ref":"1"}"#,
    ] {
        assert!(
            Codec::Json.decode_text(bad).is_err(),
            "{bad} must not decode"
        );
    }

    // In binary an unknown enum number decodes (the handler refuses it).
    let mut frame = parse("resume", r#"{"awareness":{"status":"STATUS_RESUME"}}"#);
    if let Some(Body::Awareness(a)) = frame.body.as_mut() {
        a.status = 42;
    }
    let Encoded::Binary(bytes) = Codec::Binary.encode(&frame) else {
        unreachable!("the binary codec writes bytes")
    };
    let back = Codec::Binary.decode_binary(&bytes).expect("decodes");
    let Some(Body::Awareness(a)) = back.body else {
        panic!("an awareness")
    };
    assert_eq!(a.status, 42);
    assert!(Status::try_from(a.status).is_err());
}
