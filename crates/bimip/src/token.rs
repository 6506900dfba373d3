//! `bimip token`: mints a JWT for a user (development and testing).

use anyhow::{Context, bail};
use bimip_client::token::{Claims, PemAlgorithm, mint_hs256_claims, mint_with_pem};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct TokenArgs {
    /// User id (the `sub` claim).
    #[arg(long)]
    pub user: String,
    /// Device id (the `device` claim).
    #[arg(long)]
    pub device: Option<String>,
    /// Lifetime: 30s, 15m, 24h, 7d, or plain seconds.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// HS256 shared secret.
    #[arg(long, env = "BIMIP_JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// PEM private key file (RS256 or ES256, see --alg); used instead of --secret.
    #[arg(long)]
    pub private_key: Option<PathBuf>,
    /// Algorithm of --private-key: rs256 or es256.
    #[arg(long, default_value = "rs256")]
    pub alg: String,
    /// `iss` claim.
    #[arg(long)]
    pub issuer: Option<String>,
    /// `aud` claim.
    #[arg(long)]
    pub audience: Option<String>,
}

/// Parses `30s`, `15m`, `24h`, `7d`, `250ms` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (e.g. 30s, 15m, 24h, 7d)"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => return Ok(Duration::from_millis(n)),
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("invalid duration unit in {s:?} (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(secs))
}

pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    let mut claims = Claims::new(&args.user, args.device.as_deref(), args.ttl)?;
    claims.iss = args.issuer;
    claims.aud = args.audience;
    let token = if let Some(path) = &args.private_key {
        let alg: PemAlgorithm = args.alg.parse()?;
        let pem = std::fs::read(path)
            .with_context(|| format!("reading private key {}", path.display()))?;
        mint_with_pem(&pem, alg, &claims)?
    } else if let Some(secret) = args.secret.as_deref().filter(|s| !s.is_empty()) {
        mint_hs256_claims(secret.as_bytes(), &claims)?
    } else {
        bail!(
            "no signing key: pass --secret (or set BIMIP_JWT_SECRET) or --private-key FILE --alg rs256|es256"
        );
    };
    println!("{token}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("42"), Ok(Duration::from_secs(42)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5y").is_err());
    }
}
