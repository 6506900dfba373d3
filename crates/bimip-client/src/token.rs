//! Minting JWTs the server accepts (docs/PROTOCOL.md §1.1): HS256 with a shared secret, or RS256/ES256 with a
//! PEM private key. Meant for development, tests and the benchmark.

use crate::ClientError;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The claims bimip reads from a token: `sub` is the user id, `device` the optional device id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    /// Expiry, unix seconds (required by the server).
    pub exp: u64,
    /// Issued at, unix seconds.
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

impl Claims {
    /// Claims for `user` (and `device`) valid from now for `ttl`. Checks the ids.
    pub fn new(user: &str, device: Option<&str>, ttl: Duration) -> Result<Claims, ClientError> {
        bimip_proto::validate_user_id(user)?;
        if let Some(d) = device {
            bimip_proto::validate_device_id(d)?;
        }
        let iat = unix_now();
        Ok(Claims {
            sub: user.to_string(),
            exp: iat.saturating_add(ttl.as_secs().max(1)),
            iat,
            device: device.map(str::to_string),
            iss: None,
            aud: None,
        })
    }

    fn check(&self) -> Result<(), ClientError> {
        bimip_proto::validate_user_id(&self.sub)?;
        if let Some(d) = &self.device {
            bimip_proto::validate_device_id(d)?;
        }
        Ok(())
    }
}

/// Signature algorithm of a PEM private key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemAlgorithm {
    Rs256,
    Es256,
}

impl std::str::FromStr for PemAlgorithm {
    type Err = ClientError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "rs256" => Ok(PemAlgorithm::Rs256),
            "es256" => Ok(PemAlgorithm::Es256),
            other => Err(ClientError::Token(format!(
                "unsupported algorithm {other:?} (expected rs256 or es256)"
            ))),
        }
    }
}

/// An HS256 token for `user` (and `device`), valid for `ttl`.
pub fn mint_hs256(
    secret: &[u8],
    user: &str,
    device: Option<&str>,
    ttl: Duration,
) -> Result<String, ClientError> {
    mint_hs256_claims(secret, &Claims::new(user, device, ttl)?)
}

/// An HS256 token carrying `claims` (for issuer/audience or custom expiry).
pub fn mint_hs256_claims(secret: &[u8], claims: &Claims) -> Result<String, ClientError> {
    claims.check()?;
    if secret.is_empty() {
        return Err(ClientError::Token("the HS256 secret is empty".into()));
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| ClientError::Token(e.to_string()))
}

/// A token signed with a PEM private key (PKCS#8 or PKCS#1 for RSA, PKCS#8 or SEC1 for EC).
pub fn mint_with_pem(
    pem_private_key: &[u8],
    alg: PemAlgorithm,
    claims: &Claims,
) -> Result<String, ClientError> {
    claims.check()?;
    let (key, alg) = match alg {
        PemAlgorithm::Rs256 => (EncodingKey::from_rsa_pem(pem_private_key), Algorithm::RS256),
        PemAlgorithm::Es256 => (EncodingKey::from_ec_pem(pem_private_key), Algorithm::ES256),
    };
    let key = key.map_err(|e| ClientError::Token(format!("bad PEM private key: {e}")))?;
    jsonwebtoken::encode(&Header::new(alg), claims, &key)
        .map_err(|e| ClientError::Token(e.to_string()))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation, decode};

    #[test]
    fn hs256_round_trip() {
        let t = mint_hs256(b"s3cret", "alice", Some("d1"), Duration::from_secs(60)).expect("mint");
        let got = decode::<Claims>(
            &t,
            &DecodingKey::from_secret(b"s3cret"),
            &Validation::new(Algorithm::HS256),
        )
        .expect("valid token");
        assert_eq!(got.claims.sub, "alice");
        assert_eq!(got.claims.device.as_deref(), Some("d1"));
        assert!(got.claims.exp > got.claims.iat);
        assert!(
            decode::<Claims>(
                &t,
                &DecodingKey::from_secret(b"other"),
                &Validation::new(Algorithm::HS256)
            )
            .is_err()
        );
    }

    #[test]
    fn rejects_bad_ids_and_empty_secret() {
        assert!(mint_hs256(b"s", "", None, Duration::from_secs(60)).is_err());
        assert!(mint_hs256(b"s", "a/b", None, Duration::from_secs(60)).is_err());
        assert!(mint_hs256(b"", "alice", None, Duration::from_secs(60)).is_err());
    }

    #[test]
    fn pem_round_trips_with_issuer_and_audience() {
        for (alg, private, public, jalg) in [
            (
                PemAlgorithm::Es256,
                &include_bytes!("../testdata/es256-private.pem")[..],
                &include_bytes!("../testdata/es256-public.pem")[..],
                Algorithm::ES256,
            ),
            (
                PemAlgorithm::Rs256,
                &include_bytes!("../testdata/rs256-private.pem")[..],
                &include_bytes!("../testdata/rs256-public.pem")[..],
                Algorithm::RS256,
            ),
        ] {
            let mut claims = Claims::new("bob", None, Duration::from_secs(600)).expect("claims");
            claims.iss = Some("issuer".into());
            claims.aud = Some("bimip".into());
            let t = mint_with_pem(private, alg, &claims).expect("mint");
            let key = match alg {
                PemAlgorithm::Es256 => DecodingKey::from_ec_pem(public),
                PemAlgorithm::Rs256 => DecodingKey::from_rsa_pem(public),
            }
            .expect("public key");
            let mut v = Validation::new(jalg);
            v.set_issuer(&["issuer"]);
            v.set_audience(&["bimip"]);
            let got = decode::<Claims>(&t, &key, &v).expect("valid token");
            assert_eq!(got.claims, claims);
        }
        assert!(
            mint_with_pem(
                b"not a key",
                PemAlgorithm::Es256,
                &Claims::new("bob", None, Duration::from_secs(1)).expect("claims")
            )
            .is_err()
        );
        assert!("RS256".parse::<PemAlgorithm>().is_ok());
        assert!("none".parse::<PemAlgorithm>().is_err());
    }
}
