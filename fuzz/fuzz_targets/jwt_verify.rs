//! Token verification (docs/PROTOCOL.md §1.1) with a fixed HS256 secret must never panic, whatever the client
//! sends, and must only ever accept a token whose `sub` (and `device`, if any) are valid ids.
//!
//! The first input byte picks the mode: even — the rest is the token as the client sent it
//! (header and signature parsing); odd — the rest is an arbitrary claims payload that the target
//! wraps in an HS256 header and signs with the right secret, so the fuzzer reaches the claims
//! checks (`exp`, `sub`, `device`) that a forged signature would never get to.
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bimip_server::auth::Verifier;
use bimip_server::config::JwtConfig;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

const SECRET: &str = "bimip-fuzz-secret-0123456789abcdef";

static VERIFIER: LazyLock<Verifier> = LazyLock::new(|| {
    let cfg = JwtConfig {
        secret: Some(SECRET.into()),
        ..JwtConfig::default()
    };
    Verifier::from_config(&cfg).expect("a fixed HS256 secret is a valid config")
});

static SIGNING_KEY: LazyLock<EncodingKey> =
    LazyLock::new(|| EncodingKey::from_secret(SECRET.as_bytes()));

/// Base64url of `{"alg":"HS256","typ":"JWT"}`.
const HS256_HEADER: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode % 2 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        text.to_owned()
    } else {
        let signing_input = format!("{HS256_HEADER}.{}", URL_SAFE_NO_PAD.encode(rest));
        let sig =
            jsonwebtoken::crypto::sign(signing_input.as_bytes(), &SIGNING_KEY, Algorithm::HS256)
                .expect("HMAC signing cannot fail");
        format!("{signing_input}.{sig}")
    };
    if let Ok(id) = VERIFIER.verify(&token) {
        assert!(
            bimip_proto::validate_user_id(&id.user).is_ok(),
            "accepted a token with an invalid sub: {:?}",
            id.user
        );
        if let Some(d) = &id.device {
            assert!(
                bimip_proto::validate_device_id(d).is_ok(),
                "accepted a token with an invalid device: {d:?}"
            );
        }
    }
});
