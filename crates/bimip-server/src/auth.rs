//! Token verification for WebSocket upgrades (docs/PROTOCOL.md §1.1): HS256, RS256 or ES256 with the algorithm
//! pinned by configuration — `none` and algorithm confusion are refused by construction, `exp` is
//! required, `iss`/`aud` are checked when configured, and `sub` must be a valid user id.

use crate::config::{ConfigError, JwtConfig};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header, jwk::JwkSet};
use serde::Deserialize;

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    /// The `device` claim, if the token carries one.
    pub device: Option<String>,
    /// Token expiry (unix seconds).
    pub exp: i64,
    /// Issue time (unix seconds), if the token carries one (needed after a revoke).
    pub iat: Option<i64>,
}

/// Why a token was refused. Messages are safe to return to the client (no key material).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing token: send `Authorization: Bearer <jwt>` or `?token=<jwt>`")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token algorithm {0:?} is not the configured one")]
    WrongAlgorithm(String),
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token is missing the required claim {0:?}")]
    MissingClaim(String),
    #[error("token issuer is not accepted")]
    BadIssuer,
    #[error("token audience is not accepted")]
    BadAudience,
    #[error("no key matches the token's key id")]
    UnknownKey,
    #[error("token sub is not a valid user id: {0}")]
    BadSubject(String),
    #[error("token device claim is not a valid device id: {0}")]
    BadDevice(String),
    #[error("token was revoked")]
    Revoked,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    device: Option<String>,
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Verifies tokens against the configured key(s).
pub struct Verifier {
    keys: Vec<Key>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
}

impl Verifier {
    pub fn from_config(cfg: &JwtConfig) -> Result<Verifier, ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(m);
        let keys = if let Some(secret) = &cfg.secret {
            vec![Key {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.as_bytes()),
            }]
        } else if let Some(path) = &cfg.public_key {
            let pem = std::fs::read(path)
                .map_err(|e| invalid(format!("--jwt-public-key {}: {e}", path.display())))?;
            let (alg, key) = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                (Algorithm::RS256, k)
            } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                (Algorithm::ES256, k)
            } else {
                return Err(invalid(format!(
                    "--jwt-public-key {}: not an RSA or EC public key in PEM form",
                    path.display()
                )));
            };
            vec![Key {
                kid: None,
                alg,
                key,
            }]
        } else if let Some(path) = &cfg.jwks {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid(format!("--jwt-jwks {}: {e}", path.display())))?;
            let set: JwkSet = serde_json::from_str(&text)
                .map_err(|e| invalid(format!("--jwt-jwks {}: {e}", path.display())))?;
            let mut keys = Vec::new();
            for jwk in &set.keys {
                let alg = match &jwk.algorithm {
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                    _ => {
                        return Err(invalid(format!(
                            "--jwt-jwks {}: only RSA and EC keys are supported",
                            path.display()
                        )));
                    }
                };
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| invalid(format!("--jwt-jwks {}: {e}", path.display())))?;
                keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    alg,
                    key,
                });
            }
            if keys.is_empty() {
                return Err(invalid(format!("--jwt-jwks {}: no keys", path.display())));
            }
            keys
        } else {
            return Err(ConfigError::NoJwtKey);
        };
        Ok(Verifier {
            keys,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway: cfg.leeway_secs,
        })
    }

    /// Checks a token and returns the identity it carries. [`AuthError::Expired`] means the
    /// token is otherwise valid (signature, issuer, audience, claims): only its `exp` (plus the
    /// leeway) has passed, so the client should get a fresh token rather than give up.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        match self.verify_with(token, true) {
            // The library checks `exp` before `iss` and `aud`: check the rest before saying
            // "expired", so a forged or foreign token is never told to refresh.
            Err(AuthError::Expired) => match self.verify_with(token, false) {
                Ok(_) => Err(AuthError::Expired),
                Err(e) => Err(e),
            },
            r => r,
        }
    }

    fn verify_with(&self, token: &str, check_exp: bool) -> Result<Identity, AuthError> {
        let header = decode_header(token).map_err(map_err)?;
        let key = match header.kid.as_deref() {
            Some(kid) if self.keys.len() > 1 || self.keys[0].kid.is_some() => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or(AuthError::UnknownKey)?,
            _ => &self.keys[0],
        };
        if header.alg != key.alg {
            return Err(AuthError::WrongAlgorithm(format!("{:?}", header.alg)));
        }
        let mut v = Validation::new(key.alg);
        v.algorithms = vec![key.alg];
        // A configured issuer or audience must be present, not only match when present.
        let mut required = vec!["exp", "sub"];
        if self.issuer.is_some() {
            required.push("iss");
        }
        if self.audience.is_some() {
            required.push("aud");
        }
        v.set_required_spec_claims(&required);
        v.leeway = self.leeway;
        v.validate_exp = check_exp;
        match &self.issuer {
            Some(iss) => v.set_issuer(&[iss]),
            None => v.iss = None,
        }
        match &self.audience {
            Some(aud) => v.set_audience(&[aud]),
            None => v.validate_aud = false,
        }
        let data = decode::<Claims>(token, &key.key, &v).map_err(map_err)?;
        let claims = data.claims;
        bimip_proto::validate_user_id(&claims.sub)
            .map_err(|e| AuthError::BadSubject(e.to_string()))?;
        if let Some(d) = &claims.device {
            bimip_proto::validate_device_id(d).map_err(|e| AuthError::BadDevice(e.to_string()))?;
        }
        Ok(Identity {
            user: claims.sub,
            device: claims.device,
            exp: claims.exp,
            iat: claims.iat,
        })
    }

    /// Clock skew tolerated on `exp`, in seconds.
    pub fn leeway(&self) -> u64 {
        self.leeway
    }
}

fn map_err(e: jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => AuthError::Expired,
        K::InvalidSignature => AuthError::BadSignature,
        K::InvalidAlgorithm | K::InvalidAlgorithmName => {
            AuthError::WrongAlgorithm("not allowed".into())
        }
        K::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
        K::InvalidIssuer => AuthError::BadIssuer,
        K::InvalidAudience => AuthError::BadAudience,
        K::Json(err) if err.to_string().contains("missing field") => {
            AuthError::MissingClaim(err.to_string())
        }
        _ => AuthError::Malformed(e.to_string()),
    }
}

/// Constant-time comparison of an API key.
pub fn api_key_matches(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn hs(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("encode")
    }

    fn verifier() -> Verifier {
        Verifier::from_config(&JwtConfig {
            secret: Some(SECRET.into()),
            ..Default::default()
        })
        .expect("config")
    }

    fn exp() -> i64 {
        bimip_proto::now_ms() / 1000 + 3600
    }

    #[test]
    fn accepts_a_good_token() {
        let id = verifier()
            .verify(&hs(
                json!({"sub": "alice", "exp": exp(), "device": "phone"}),
            ))
            .expect("valid");
        assert_eq!(id.user, "alice");
        assert_eq!(id.device.as_deref(), Some("phone"));
    }

    #[test]
    fn refuses_bad_tokens() {
        let v = verifier();
        assert!(matches!(
            v.verify(&hs(json!({"sub": "alice", "exp": 1000}))),
            Err(AuthError::Expired)
        ));
        assert!(matches!(
            v.verify(&hs(json!({"sub": "alice"}))),
            Err(AuthError::MissingClaim(_))
        ));
        assert!(matches!(
            v.verify(&hs(json!({"sub": "../etc", "exp": exp()}))),
            Err(AuthError::BadSubject(_))
        ));
        // alg none: header {"alg":"none"}, no signature
        let none = format!(
            "{}.{}.",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", "eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0"
        );
        assert!(v.verify(&none).is_err());
        let other = encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "alice", "exp": exp()}),
            &EncodingKey::from_secret(b"another secret of enough length"),
        )
        .expect("encode");
        assert!(matches!(v.verify(&other), Err(AuthError::BadSignature)));
        assert!(v.verify("garbage").is_err());
        let hs384 = encode(
            &Header::new(Algorithm::HS384),
            &json!({"sub": "alice", "exp": exp()}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("encode");
        assert!(matches!(
            v.verify(&hs384),
            Err(AuthError::WrongAlgorithm(_))
        ));
    }

    #[test]
    fn expired_means_otherwise_valid() {
        let v = Verifier::from_config(&JwtConfig {
            secret: Some(SECRET.into()),
            issuer: Some("auth".into()),
            leeway_secs: 0,
            ..Default::default()
        })
        .expect("config");
        let old = bimip_proto::now_ms() / 1000 - 60;
        assert!(matches!(
            v.verify(&hs(json!({"sub": "a", "exp": old, "iss": "auth"}))),
            Err(AuthError::Expired)
        ));
        // Expired and from another issuer: the issuer is what is wrong.
        assert!(matches!(
            v.verify(&hs(json!({"sub": "a", "exp": old, "iss": "evil"}))),
            Err(AuthError::BadIssuer)
        ));
        assert!(matches!(
            v.verify(&hs(json!({"sub": "../x", "exp": old, "iss": "auth"}))),
            Err(AuthError::BadSubject(_))
        ));
    }

    #[test]
    fn checks_issuer_and_audience() {
        let v = Verifier::from_config(&JwtConfig {
            secret: Some(SECRET.into()),
            issuer: Some("https://auth.example".into()),
            audience: Some("chat".into()),
            ..Default::default()
        })
        .expect("config");
        let ok = json!({"sub": "a", "exp": exp(), "iss": "https://auth.example", "aud": "chat"});
        assert!(v.verify(&hs(ok)).is_ok());
        let bad_iss = json!({"sub": "a", "exp": exp(), "iss": "x", "aud": "chat"});
        assert!(matches!(v.verify(&hs(bad_iss)), Err(AuthError::BadIssuer)));
        let no_iss = json!({"sub": "a", "exp": exp(), "aud": "chat"});
        assert!(
            v.verify(&hs(no_iss)).is_err(),
            "a configured issuer is required"
        );
        let no_aud = json!({"sub": "a", "exp": exp(), "iss": "https://auth.example"});
        assert!(
            v.verify(&hs(no_aud)).is_err(),
            "a configured audience is required"
        );
        let bad_aud = json!({"sub": "a", "exp": exp(), "iss": "https://auth.example", "aud": "x"});
        assert!(matches!(
            v.verify(&hs(bad_aud)),
            Err(AuthError::BadAudience)
        ));
    }

    mod fuzz {
        use super::*;
        use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<f64>().prop_map(serde_json::Value::from),
                ".{0,40}".prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(4, 32, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6)
                        .prop_map(serde_json::Value::from),
                    proptest::collection::btree_map(
                        prop_oneof![
                            Just("alg".to_string()),
                            Just("sub".to_string()),
                            Just("exp".to_string()),
                            Just("iat".to_string()),
                            Just("kid".to_string()),
                            Just("device".to_string()),
                            "[a-z]{1,6}"
                        ],
                        inner,
                        0..6
                    )
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn random_strings_are_refused(s in ".{0,300}") {
                prop_assert!(verifier().verify(&s).is_err());
            }

            #[test]
            fn random_base64_segments_are_refused(
                parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 0..5)
            ) {
                let t = parts.iter().map(|p| B64.encode(p)).collect::<Vec<_>>().join(".");
                prop_assert!(verifier().verify(&t).is_err());
            }

            #[test]
            fn random_header_and_payload_json_is_refused(
                header in json_value(), payload in json_value(), sig in proptest::collection::vec(any::<u8>(), 0..64)
            ) {
                let t = format!(
                    "{}.{}.{}",
                    B64.encode(header.to_string()),
                    B64.encode(payload.to_string()),
                    B64.encode(sig)
                );
                // Without the secret's signature nothing is accepted, whatever the JSON says.
                prop_assert!(verifier().verify(&t).is_err());
            }

            #[test]
            fn signed_random_claims_never_panic_and_only_valid_ones_pass(payload in json_value()) {
                let t = encode(
                    &Header::new(Algorithm::HS256),
                    &payload,
                    &EncodingKey::from_secret(SECRET.as_bytes()),
                );
                if let Ok(t) = t
                    && let Ok(id) = verifier().verify(&t)
                {
                    prop_assert!(bimip_proto::validate_user_id(&id.user).is_ok());
                    prop_assert!(id.exp + 30 >= bimip_proto::now_ms() / 1000);
                }
            }
        }
    }

    #[test]
    fn api_keys_compare() {
        assert!(api_key_matches("k1", "k1"));
        assert!(!api_key_matches("k1", "k2"));
        assert!(!api_key_matches("k1", "k11"));
    }
}
