//! HTTP plumbing shared by the providers: the process-wide rustls crypto provider, the two
//! `reqwest` clients (ALPN-negotiated for FCM and webhooks, HTTP/2-only for APNs) and
//! `Retry-After` parsing.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::SetupError;

/// Installs ring as rustls' process-wide default crypto provider. Idempotent: if a provider is
/// already installed (by an earlier call, or by the embedding program), it is kept.
///
/// The workspace builds reqwest with `rustls-no-provider`, and Cargo's feature unification
/// makes that global: **every** `reqwest::Client::build()` in the process (server, CLI, bench,
/// test helpers) panics unless a process default provider is installed first. The client
/// builders of this module call it themselves; other code that builds a `reqwest::Client`
/// should call it first too (it is cheap).
pub fn install_crypto_provider() {
    // `Err` only says a provider is already installed, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Settings shared by every provider's HTTP client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpOptions {
    /// A PEM file of extra CA certificates trusted in addition to the platform's roots (a
    /// corporate proxy's CA, or a test CA).
    pub extra_ca_file: Option<PathBuf>,
    /// Whole-request timeout. FCM's own SDKs use 15 s: shorter timeouts give up on requests
    /// that were in fact delivered and so cause duplicates.
    pub timeout: Duration,
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            extra_ca_file: None,
            timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// A client for FCM and webhooks: HTTP/1.1 or HTTP/2 as ALPN decides (`http://` URLs use
/// HTTP/1.1). Redirects are never followed.
pub fn client(opts: &HttpOptions) -> Result<reqwest::Client, SetupError> {
    build(base(opts)?)
}

/// A client for APNs: HTTP/2 only ("prior knowledge"), so `https://` offers only ALPN `h2` and
/// `http://` speaks h2c (tests). Connections are kept open and pinged while idle, as Apple
/// asks providers to keep their connections instead of reconnecting per push.
pub fn http2_client(opts: &HttpOptions) -> Result<reqwest::Client, SetupError> {
    build(
        base(opts)?
            .http2_prior_knowledge()
            .http2_keep_alive_interval(Duration::from_secs(60))
            .http2_keep_alive_timeout(Duration::from_secs(20))
            .http2_keep_alive_while_idle(true)
            .pool_idle_timeout(None),
    )
}

fn base(opts: &HttpOptions) -> Result<reqwest::ClientBuilder, SetupError> {
    install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .timeout(opts.timeout)
        .connect_timeout(opts.connect_timeout)
        // None of these services redirects, and Standard Webhooks says a redirect is a
        // failure: following one would also send signed payloads to another host.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("bimip-push/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &opts.extra_ca_file {
        let file_error = |message: String| SetupError::File {
            path: path.display().to_string(),
            message,
        };
        let pem = std::fs::read(path).map_err(|e| file_error(format!("cannot read: {e}")))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| file_error(format!("not a PEM certificate bundle: {e}")))?;
        if certs.is_empty() {
            return Err(file_error("contains no PEM certificate".into()));
        }
        // Merge: the platform's roots stay trusted.
        builder = builder.tls_certs_merge(certs);
    }
    Ok(builder)
}

fn build(builder: reqwest::ClientBuilder) -> Result<reqwest::Client, SetupError> {
    builder
        .build()
        .map_err(|e| SetupError::Invalid(format!("cannot build the HTTP client: {}", chain(&e))))
}

/// `Retry-After` of a response, as a delay from now: delta seconds or an HTTP-date (a date in
/// the past gives zero). `None` when absent or unreadable.
pub fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, SystemTime::now())
}

/// Parses a `Retry-After` value relative to `now` (RFC 9110 §10.2.3): delta seconds or any of
/// the three HTTP-date forms.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly long values saturate rather than fail.
        return Some(Duration::from_secs(
            value.parse::<u64>().unwrap_or(u64::MAX),
        ));
    }
    let at = parse_http_date(value)?;
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(at.saturating_sub(now)))
}

/// An HTTP-date as Unix seconds: IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the obsolete
/// RFC 850 form (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime (`Sun Nov  6 08:49:37 1994`).
pub fn parse_http_date(s: &str) -> Option<u64> {
    let parts: Vec<&str> = s.split_ascii_whitespace().collect();
    let (day, month, year, time) = match parts.as_slice() {
        [wd, day, mon, year, time, "GMT"] if wd.ends_with(',') => (
            day.parse().ok()?,
            month_number(mon)?,
            year.parse().ok()?,
            *time,
        ),
        [wd, date, time, "GMT"] if wd.ends_with(',') => {
            let mut it = date.split('-');
            let day = it.next()?.parse().ok()?;
            let mon = month_number(it.next()?)?;
            let yy: u64 = it.next()?.parse().ok()?;
            if it.next().is_some() {
                return None;
            }
            // Two-digit years: RFC 9110 says to pick the most recent past century that fits.
            let year = if yy >= 100 {
                yy
            } else if yy >= 70 {
                1900 + yy
            } else {
                2000 + yy
            };
            (day, mon, year, *time)
        }
        [_wd, mon, day, time, year] => (
            day.parse().ok()?,
            month_number(mon)?,
            year.parse().ok()?,
            *time,
        ),
        _ => return None,
    };
    let mut hms = time.split(':');
    let h: u64 = hms.next()?.parse().ok()?;
    let m: u64 = hms.next()?.parse().ok()?;
    let sec: u64 = hms.next()?.parse().ok()?;
    if hms.next().is_some() || h > 23 || m > 59 || sec > 60 || !(1..=31).contains(&day) {
        return None;
    }
    if !(1970..=9999).contains(&year) {
        return None;
    }
    let days = days_from_civil(year, month, day)?;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

fn month_number(s: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    MONTHS.iter().position(|m| *m == s).map(|i| i as u64 + 1)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (year ≥ 1970), or `None` for a day that
/// does not exist in that month.
fn days_from_civil(year: u64, month: u64, day: u64) -> Option<u64> {
    let leap = (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let len = *month_days.get(usize::try_from(month.checked_sub(1)?).ok()?)?;
    if day > len {
        return None;
    }
    let leaps_before = |y: u64| y / 4 - y / 100 + y / 400;
    let years = year - 1970;
    let days_in_years = years * 365 + leaps_before(year - 1) - leaps_before(1969);
    let days_in_months: u64 = month_days.iter().take((month - 1) as usize).sum();
    Some(days_in_years + days_in_months + day - 1)
}

/// A transport error as a short reason: the error and its causes, without the URL (an APNs URL
/// holds the device token).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The `Outcome` of a request that got no HTTP response: always temporary.
pub(crate) fn transport_error(e: reqwest::Error) -> crate::Outcome {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let e = e.without_url();
    crate::Outcome::Retry {
        after: None,
        reason: format!("{what}: {}", chain(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn retry_after_seconds() {
        assert_eq!(
            parse_retry_after("120", at(0)),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", at(5)), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("-1", at(0)), None);
        assert_eq!(parse_retry_after("1.5", at(0)), None);
        assert_eq!(parse_retry_after("", at(0)), None);
    }

    #[test]
    fn http_dates() {
        // 784111777 = 1994-11-06T08:49:37Z (`date -u -d @784111777`).
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(
            parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(
            parse_http_date("Sun Nov  6 08:49:37 1994"),
            Some(784_111_777)
        );
        // 2000-03-01 (after a leap day in a century leap year) = 951868800.
        assert_eq!(
            parse_http_date("Wed, 01 Mar 2000 00:00:00 GMT"),
            Some(951_868_800)
        );
        // 2028-02-29T12:00:00Z = 1835438400.
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2028 12:00:00 GMT"),
            Some(1_835_438_400)
        );
        assert_eq!(parse_http_date("Thu, 29 Feb 2029 12:00:00 GMT"), None);
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 UTC"), None);
        assert_eq!(parse_http_date("Sun, 06 Foo 1994 08:49:37 GMT"), None);
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 24:49:37 GMT"), None);
        assert_eq!(parse_http_date("yesterday"), None);
    }

    #[test]
    fn retry_after_date_is_relative_to_now() {
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        assert_eq!(
            parse_retry_after(date, at(784_111_777 - 30)),
            Some(Duration::from_secs(30))
        );
        // In the past: retry now.
        assert_eq!(
            parse_retry_after(date, at(784_111_777 + 30)),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn extra_ca_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let missing = dir.path().join("nope.pem");
        let opts = HttpOptions {
            extra_ca_file: Some(missing.clone()),
            ..HttpOptions::default()
        };
        let err = client(&opts)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("nope.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap_or_else(|e| panic!("{e}"));
        let opts = HttpOptions {
            extra_ca_file: Some(empty),
            ..HttpOptions::default()
        };
        let err = http2_client(&opts)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("empty.pem"), "{err}");
    }

    #[test]
    fn builders_work_without_a_preinstalled_provider() {
        // The builders install the provider themselves (no panic).
        assert!(client(&HttpOptions::default()).is_ok());
        assert!(http2_client(&HttpOptions::default()).is_ok());
    }
}
