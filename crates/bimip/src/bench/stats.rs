//! Measurement helpers: process CPU and RSS from /proc, latency histograms, counters.

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::OnceLock;
use std::time::Instant;

/// Clock ticks per second of /proc/PID/stat times (USER_HZ, 100 on Linux).
const CLK_TCK: f64 = 100.0;

/// utime + stime of a process in seconds (`None` without a pid or when it is gone).
pub fn proc_cpu_s(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => return None,
    };
    cpu_from_stat(&std::fs::read_to_string(path).ok()?)
}

/// utime + stime of this process in seconds.
pub fn self_cpu_s() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| cpu_from_stat(&s))
        .unwrap_or(0.0)
}

fn cpu_from_stat(stat: &str) -> Option<f64> {
    // The command name may contain spaces; fields after ")" start at state (field 3).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / CLK_TCK)
}

/// VmRSS of a process in KiB.
pub fn proc_rss_kb(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => return None,
    };
    rss_from_status(&std::fs::read_to_string(path).ok()?)
}

pub fn self_rss_kb() -> Option<u64> {
    rss_from_status(&std::fs::read_to_string("/proc/self/status").ok()?)
}

fn rss_from_status(s: &str) -> Option<u64> {
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Monotonic nanoseconds since the bench process started (the clock in every payload).
pub fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

pub fn round(v: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (v * m).round() / m
}

pub fn mb(kb: Option<u64>) -> Value {
    kb.map_or(Value::Null, |k| json!(round(k as f64 / 1024.0, 1)))
}

/// A latency histogram in microseconds (1 µs … 10 min, 3 significant digits), sharded so many
/// tasks can record without contending on one lock.
pub struct LatHist {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl LatHist {
    pub fn new(shards: usize) -> LatHist {
        LatHist {
            shards: (0..shards.max(1)).map(|_| Mutex::new(new_hist())).collect(),
        }
    }

    pub fn record_ns(&self, shard: usize, ns: u64) {
        let us = (ns / 1000).clamp(1, 600_000_000);
        if let Ok(mut h) = self.shards[shard % self.shards.len()].lock() {
            h.saturating_record(us);
        }
    }

    pub fn merged(&self) -> Histogram<u64> {
        let mut all = new_hist();
        for s in &self.shards {
            if let Ok(h) = s.lock() {
                let _ = all.add(&*h);
            }
        }
        all
    }

    /// `{"n", "p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms"}`, the peers' latency object.
    pub fn summary(&self) -> Value {
        summary(&self.merged())
    }
}

fn new_hist() -> Histogram<u64> {
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

pub fn summary(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"n": 0, "p50_ms": null, "p90_ms": null, "p99_ms": null, "max_ms": null, "mean_ms": null});
    }
    let ms = |us: u64| round(us as f64 / 1000.0, 3);
    json!({
        "n": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "max_ms": ms(h.max()),
        "mean_ms": round(h.mean() / 1000.0, 3),
    })
}

/// Error counts by kind (server error code or local failure).
#[derive(Default)]
pub struct Errors {
    by_kind: Mutex<BTreeMap<String, u64>>,
    first: Mutex<Option<String>>,
}

impl Errors {
    pub fn add(&self, kind: &str, message: &str) {
        if let Ok(mut m) = self.by_kind.lock() {
            *m.entry(kind.to_string()).or_default() += 1;
        }
        if let Ok(mut f) = self.first.lock()
            && f.is_none()
        {
            *f = Some(format!("{kind}: {message}"));
        }
    }

    pub fn server_error(&self, e: &bimip_proto::v1::Error) {
        let kind = bimip_proto::v1::ErrorCode::try_from(e.code)
            .map(|c| c.as_str_name().to_string())
            .unwrap_or_else(|_| format!("code {}", e.code));
        self.add(&kind, &e.message);
    }

    pub fn total(&self) -> u64 {
        self.by_kind.lock().map(|m| m.values().sum()).unwrap_or(0)
    }

    pub fn json(&self) -> Value {
        let m = self.by_kind.lock().map(|m| m.clone()).unwrap_or_default();
        json!(m)
    }

    pub fn first(&self) -> Option<String> {
        self.first.lock().ok().and_then(|f| f.clone())
    }
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) for the `time` key.
pub fn timestamp() -> String {
    let full = crate::inspect::format_ts_ms(bimip_proto::now_ms());
    full.get(..19).unwrap_or(&full).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "123 (a b) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0";
        assert_eq!(cpu_from_stat(stat), Some(4.0));
        assert_eq!(rss_from_status("Name: x\nVmRSS:\t  2048 kB\n"), Some(2048));
        assert!(self_cpu_s() >= 0.0);
        assert!(self_rss_kb().is_some());
    }

    #[test]
    fn histogram_summary() {
        let h = LatHist::new(4);
        for i in 1..=100u64 {
            h.record_ns(i as usize, i * 1_000_000);
        }
        let s = h.summary();
        assert_eq!(s["n"], 100);
        assert!((s["p50_ms"].as_f64().unwrap_or(0.0) - 50.0).abs() < 0.1);
        assert!((s["max_ms"].as_f64().unwrap_or(0.0) - 100.0).abs() < 0.1);
    }

    #[test]
    fn timestamp_shape() {
        let t = timestamp();
        assert_eq!(t.len(), 19);
        assert_eq!(&t[10..11], "T");
    }
}
