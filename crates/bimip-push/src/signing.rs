//! Standard Webhooks signatures (v1, symmetric): `webhook-signature: v1,<base64 HMAC-SHA256>`
//! over `{webhook-id}.{webhook-timestamp}.{raw body}`, with `whsec_<base64>` secrets. Used by
//! the webhook push provider, the server's event webhooks, and receivers/tests ([`verify`]).

use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Header names of the scheme.
pub const HEADER_ID: &str = "webhook-id";
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// How far a receiver accepts `webhook-timestamp` from its own clock, either way (replay
/// window).
pub const TOLERANCE_SECS: i64 = 5 * 60;

const PREFIX: &str = "whsec_";
const MIN_LEN: usize = 24;
const MAX_LEN: usize = 64;

/// A webhook signing secret. Its `Debug` output never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// A secret string that is not `whsec_<base64 of 24–64 bytes>`. The message never contains the
/// secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("a webhook secret must start with `whsec_`")]
    MissingPrefix,
    #[error("a webhook secret must be `whsec_` followed by standard base64")]
    NotBase64,
    #[error("a webhook secret must hold {MIN_LEN} to {MAX_LEN} bytes, this one holds {0}")]
    BadLength(usize),
}

impl Secret {
    /// Parses `whsec_<base64>` (standard alphabet, padded), 24 to 64 bytes as the spec asks.
    pub fn parse(s: &str) -> Result<Secret, SecretError> {
        let b64 = s
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(SecretError::MissingPrefix)?;
        let key = STANDARD.decode(b64).map_err(|_| SecretError::NotBase64)?;
        Secret::from_bytes(key)
    }

    /// A secret from raw key bytes (24 to 64).
    pub fn from_bytes(key: Vec<u8>) -> Result<Secret, SecretError> {
        if !(MIN_LEN..=MAX_LEN).contains(&key.len()) {
            return Err(SecretError::BadLength(key.len()));
        }
        Ok(Secret(key))
    }

    /// A new random 32-byte secret (for `bimip` to hand out, and for tests).
    pub fn generate() -> Secret {
        let mut key = vec![0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
        Secret(key)
    }

    /// The `whsec_<base64>` form, to show once to whoever configures the receiver.
    pub fn to_whsec(&self) -> String {
        format!("{PREFIX}{}", STANDARD.encode(&self.0))
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
        // HMAC takes keys of any length, so this cannot fail for our 24–64 byte keys.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            unreachable!("HMAC accepts any key length")
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.finalize().into_bytes().into()
    }
}

/// The `webhook-signature` value for one attempt: `v1,<base64 HMAC-SHA256>` of
/// `{id}.{timestamp_secs}.{body}`.
pub fn sign(secret: &Secret, id: &str, timestamp_secs: i64, body: &[u8]) -> String {
    format!(
        "v1,{}",
        STANDARD.encode(secret.mac(id, timestamp_secs, body))
    )
}

/// Why a delivery failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("missing or unreadable `{0}` header")]
    MissingHeader(&'static str),
    #[error("`webhook-timestamp` is not an integer")]
    BadTimestamp,
    #[error("`webhook-timestamp` is {0} s away from now, outside the ±{TOLERANCE_SECS} s window")]
    OutsideTolerance(i64),
    #[error("no `v1` signature in `webhook-signature` matches")]
    NoMatch,
}

/// Verifies one delivery: `signatures` is the `webhook-signature` value (space-separated
/// `v1,<base64>` entries; one matching entry suffices, which is how key rotation works), and
/// `timestamp` must lie within [`TOLERANCE_SECS`] of `now_secs`. The comparison is
/// constant-time.
pub fn verify(
    secret: &Secret,
    id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    now_secs: i64,
) -> Result<(), VerifyError> {
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| VerifyError::BadTimestamp)?;
    let skew = ts.saturating_sub(now_secs);
    if skew.abs() > TOLERANCE_SECS {
        return Err(VerifyError::OutsideTolerance(skew));
    }
    let expected = secret.mac(id, ts, body);
    let mut found = false;
    for entry in signatures.split_ascii_whitespace() {
        let Some(b64) = entry.strip_prefix("v1,") else {
            continue; // another scheme (e.g. v1a): not ours to check
        };
        let Ok(candidate) = STANDARD.decode(b64) else {
            continue;
        };
        // Check every entry, so the time taken does not tell which one matched.
        found |= bool::from(candidate.as_slice().ct_eq(&expected));
    }
    if found {
        Ok(())
    } else {
        Err(VerifyError::NoMatch)
    }
}

/// [`verify`] taking the three `webhook-*` headers from a request.
pub fn verify_headers(
    secret: &Secret,
    headers: &http::HeaderMap,
    body: &[u8],
    now_secs: i64,
) -> Result<(), VerifyError> {
    let get = |name: &'static str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or(VerifyError::MissingHeader(name))
    };
    verify(
        secret,
        get(HEADER_ID)?,
        get(HEADER_TIMESTAMP)?,
        get(HEADER_SIGNATURE)?,
        body,
        now_secs,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // Computed independently with Python:
    //   key = base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    //   base64.b64encode(hmac.new(key, b"msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330.{\"test\": 2432232314}",
    //                             hashlib.sha256).digest())
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const EXPECTED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn secret() -> Secret {
        Secret::parse(SECRET).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn fixed_vector() {
        assert_eq!(sign(&secret(), ID, TS, BODY), EXPECTED);
    }

    #[test]
    fn verify_accepts_good_and_rotated_signatures() {
        let s = secret();
        assert_eq!(verify(&s, ID, "1614265330", EXPECTED, BODY, TS), Ok(()));
        let rotated = format!("v1,bm90IHRoaXMgb25l v1a,xyz {EXPECTED}");
        assert_eq!(
            verify(&s, ID, "1614265330", &rotated, BODY, TS + 299),
            Ok(())
        );
    }

    #[test]
    fn verify_rejects_tampering_and_old_timestamps() {
        let s = secret();
        let ts = "1614265330";
        assert_eq!(
            verify(&s, ID, ts, EXPECTED, b"{\"test\": 1}", TS),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            verify(&s, "msg_other", ts, EXPECTED, BODY, TS),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            verify(&s, ID, ts, EXPECTED, BODY, TS + 301),
            Err(VerifyError::OutsideTolerance(-301))
        );
        assert_eq!(
            verify(&s, ID, ts, EXPECTED, BODY, TS - 301),
            Err(VerifyError::OutsideTolerance(301))
        );
        assert_eq!(
            verify(&s, ID, "soon", EXPECTED, BODY, TS),
            Err(VerifyError::BadTimestamp)
        );
        let other = Secret::generate();
        assert_eq!(
            verify(&other, ID, ts, EXPECTED, BODY, TS),
            Err(VerifyError::NoMatch)
        );
    }

    #[test]
    fn secrets_parse_strictly_and_never_show() {
        assert_eq!(
            Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").err(),
            Some(SecretError::MissingPrefix)
        );
        assert_eq!(
            Secret::parse("whsec_not base64!").err(),
            Some(SecretError::NotBase64)
        );
        assert_eq!(
            Secret::parse("whsec_c2hvcnQ=").err(),
            Some(SecretError::BadLength(5))
        );
        let s = secret();
        assert_eq!(s.to_whsec(), SECRET);
        assert_eq!(format!("{s:?}"), "Secret(…)");
        let g = Secret::generate();
        assert_eq!(Secret::parse(&g.to_whsec()), Ok(g));
    }
}
