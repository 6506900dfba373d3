//! Identifier rules. User ids become folder and file names in the store, so the charset is strict
//! (docs/PROTOCOL.md §12): `[A-Za-z0-9_@+-][A-Za-z0-9._@+-]{0,127}` — no `/`, no NUL, no leading dot.

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} bytes long, at most {max} are allowed")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error(
        "{what} contains {found:?} at byte {at}; allowed: A-Z a-z 0-9 . _ @ + - (not starting with '.')"
    )]
    BadChar {
        what: &'static str,
        found: char,
        at: usize,
    },
    /// Message ids accept any UTF-8 but control characters, so the charset above does not apply.
    #[error(
        "{what} contains the control character {found:?} at byte {at}; any other UTF-8 is allowed"
    )]
    ControlChar {
        what: &'static str,
        found: char,
        at: usize,
    },
}

const MAX_USER_ID: usize = 128;
const MAX_MESSAGE_ID: usize = 128;
const MAX_DEVICE_ID: usize = 128;

fn allowed(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'@' | b'+' | b'-')
}

fn check_charset(what: &'static str, s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { what });
    }
    if s.len() > max {
        return Err(IdError::TooLong {
            what,
            len: s.len(),
            max,
        });
    }
    for (at, c) in s.char_indices() {
        let ok = c.is_ascii() && allowed(c as u8) && !(at == 0 && c == '.');
        if !ok {
            return Err(IdError::BadChar { what, found: c, at });
        }
    }
    Ok(())
}

/// Checks a user id against the charset above.
pub fn validate_user_id(s: &str) -> Result<(), IdError> {
    check_charset("user id", s, MAX_USER_ID)
}

/// Device ids follow the user-id charset: they appear in the index file and in logs.
pub fn validate_device_id(s: &str) -> Result<(), IdError> {
    check_charset("device id", s, MAX_DEVICE_ID)
}

/// Message ids are client-chosen, non-empty and at most 128 bytes; any UTF-8 without control
/// characters is accepted.
pub fn validate_message_id(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { what: "message id" });
    }
    if s.len() > MAX_MESSAGE_ID {
        return Err(IdError::TooLong {
            what: "message id",
            len: s.len(),
            max: MAX_MESSAGE_ID,
        });
    }
    if let Some((at, c)) = s.char_indices().find(|(_, c)| c.is_control()) {
        return Err(IdError::ControlChar {
            what: "message id",
            found: c,
            at,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_message_id_refusal_names_its_own_rule() {
        let Err(e) = validate_message_id("a\u{7}b") else {
            panic!("a control character in a message id was accepted");
        };
        let e = e.to_string();
        assert!(e.contains("control character"), "{e}");
        assert!(!e.contains("A-Z"), "{e}");
        assert!(validate_message_id("héllo wörld 👋").is_ok());
    }

    #[test]
    fn accepts_the_spec_charset() {
        for ok in [
            "alice",
            "a",
            "A.b_c@d+e-f",
            "0",
            "_x",
            "-",
            "user@example.com",
        ] {
            assert_eq!(validate_user_id(ok), Ok(()), "{ok}");
        }
        assert!(validate_user_id(&"x".repeat(128)).is_ok());
    }

    #[test]
    fn refuses_path_tricks_and_lookalikes() {
        for bad in [
            "", ".", "..", ".hidden", "a/b", "a\\b", "a\0b", "a b", "аlice", "a:b", "x\n",
        ] {
            assert!(validate_user_id(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(validate_user_id(&"x".repeat(129)).is_err());
    }

    #[test]
    fn message_ids() {
        assert!(validate_message_id("m-1 ü").is_ok());
        assert!(validate_message_id("").is_err());
        assert!(validate_message_id(&"x".repeat(129)).is_err());
        assert!(validate_message_id("a\nb").is_err());
    }

    proptest! {
        #[test]
        fn valid_ids_are_safe_path_components(s in "\\PC{0,140}") {
            if validate_user_id(&s).is_ok() {
                prop_assert!(!s.contains('/') && !s.contains('\0') && !s.starts_with('.'));
                prop_assert!(s.len() <= 128 && !s.is_empty());
            }
        }
    }
}
