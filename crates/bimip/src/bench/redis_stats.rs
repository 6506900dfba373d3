//! What Redis did during a measured window (`bench chat --redis URL`): its CPU seconds and the
//! commands it ran, from `INFO cpu` and `INFO commandstats` before and after.

use serde_json::{Value, json};
use std::collections::BTreeMap;

pub struct Snapshot {
    cpu_s: f64,
    calls: BTreeMap<String, u64>,
}

/// Reads Redis's CPU and per-command call counts.
pub async fn snapshot(url: &str) -> anyhow::Result<Snapshot> {
    let client = redis::Client::open(url)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .arg("commandstats")
        .query_async(&mut c)
        .await?;
    let mut cpu_s = 0.0;
    let mut calls = BTreeMap::new();
    for line in info.lines() {
        if let Some(v) = line
            .strip_prefix("used_cpu_sys:")
            .or_else(|| line.strip_prefix("used_cpu_user:"))
        {
            cpu_s += v.trim().parse::<f64>().unwrap_or(0.0);
        } else if let Some(rest) = line.strip_prefix("cmdstat_")
            && let Some((cmd, stats)) = rest.split_once(':')
        {
            let n = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            calls.insert(cmd.to_string(), n);
        }
    }
    Ok(Snapshot { cpu_s, calls })
}

/// The difference of two snapshots per delivered message (the bench's own `INFO` calls are
/// left out).
pub fn per_message(before: &Snapshot, after: &Snapshot, messages: u64) -> Value {
    let m = messages.max(1) as f64;
    let mut by_cmd = serde_json::Map::new();
    let mut total = 0u64;
    for (cmd, n) in &after.calls {
        let d = n.saturating_sub(before.calls.get(cmd).copied().unwrap_or(0));
        let d = if cmd == "info" {
            d.saturating_sub(1)
        } else {
            d
        };
        if d > 0 {
            total += d;
            by_cmd.insert(cmd.clone(), json!((d as f64 / m * 100.0).round() / 100.0));
        }
    }
    let cpu = after.cpu_s - before.cpu_s;
    json!({
        "cpu_s": (cpu * 100.0).round() / 100.0,
        "cpu_us_per_msg": (cpu / m * 1e7).round() / 10.0,
        "commands_per_msg": (total as f64 / m * 100.0).round() / 100.0,
        "commands_per_msg_by_command": by_cmd,
    })
}
