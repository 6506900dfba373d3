//! User ids become folder and file names in the store (docs/PROTOCOL.md §12): whatever `validate_user_id`
//! accepts must be safe as a path component.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if bimip_proto::validate_user_id(s).is_ok() {
        assert!(!s.contains('/'), "accepted a user id with '/': {s:?}");
        assert!(!s.contains('\0'), "accepted a user id with NUL: {s:?}");
        assert!(
            !s.starts_with('.'),
            "accepted a user id starting with '.': {s:?}"
        );
        assert!(
            (1..=128).contains(&s.len()),
            "accepted a user id of {} bytes",
            s.len()
        );
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._@+-".contains(&b)),
            "accepted a user id outside [A-Za-z0-9._@+-]: {s:?}"
        );
    }
});
