//! `bimip bench`: the load generator (docs/BENCHMARKS.md). Scenarios match the peers' drivers so the numbers
//! are comparable: chat, offline, idle, presence, plus a mixed blend. Each run prints a table and
//! appends one JSON line (the peers' keys where they overlap) to `--results`.

mod chat;
mod conn;
mod idle;
mod mixed;
mod offline;
mod presence;
mod push;
mod redis_stats;
mod report;
mod stats;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use conn::{Reader, Target, Writer};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
    #[command(flatten)]
    common: Common,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// N online pairs u0→u1, u2→u3 …: open loop at --rate msg/s, or closed loop (--rate 0).
    Chat(chat::ChatArgs),
    /// M messages to an offline user, then it logs in and RESUMEs.
    Offline(offline::OfflineArgs),
    /// N idle authenticated connections: logins/s and server RSS per connection.
    Idle(idle::IdleArgs),
    /// A hub with K online contacts changes its intent: time until all K saw it.
    Presence(presence::PresenceArgs),
    /// A blend: idle users, chatting pairs, typing, intent churn, reconnects with RESUME.
    Mixed(mixed::MixedArgs),
    /// Pushes through a fake FCM: starts its own server and fake; throughput and latency.
    Push(push::PushArgs),
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// WebSocket URL of the server.
    #[arg(long, global = true, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// Base URL of the HTTP API [default: derived from --url].
    #[arg(long, global = true)]
    http: Option<String>,
    /// HS256 secret the server verifies tokens with.
    #[arg(long, global = true, env = "BIMIP_JWT_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// API key for the backend HTTP API (presence scenario: contacts).
    #[arg(long, global = true, env = "BIMIP_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Server process id: its CPU seconds and RSS are reported.
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// Name of the server in the results (`server` key).
    #[arg(long, global = true, default_value = "bimip")]
    label: String,
    /// Append one JSON line per run to this file.
    #[arg(long, global = true, default_value = "bench-results.jsonl")]
    results: PathBuf,
    /// Use the JSON subprotocol (bimip.v1.json) instead of binary protobuf.
    #[arg(long, global = true)]
    json: bool,
    /// Parallel logins.
    #[arg(long, global = true, default_value_t = 200)]
    concurrency: usize,
    /// Spread connections over this many source addresses 127.0.0.1… (0 = auto: one per 12k
    /// connections; only for a loopback server).
    #[arg(long, global = true, default_value_t = 0)]
    source_addrs: usize,
    /// Approximate payload bytes of chat messages.
    #[arg(long, global = true, default_value_t = 100)]
    size: usize,
    /// Before the run, wait (at most this many seconds) until the server is idle (< 5 % of a
    /// core over 1 s); needs --server-pid. 0 = don't wait.
    #[arg(long, global = true, default_value_t = 60.0)]
    quiesce: f64,
    /// No progress bars.
    #[arg(long, global = true)]
    quiet: bool,
}

/// What every scenario gets.
pub struct Ctx {
    pub target: Target,
    pub http: String,
    pub api_key: Option<String>,
    pub pid: Option<u32>,
    pub common: Common,
    /// Distinguishes this run's messages from stale ones of earlier runs.
    pub nonce: u64,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let c = args.common.clone();
    let args = match args.scenario {
        // Starts its own server and fake provider: no --url or --secret.
        Scenario::Push(a) => {
            let fut = push::run(a, c);
            return tokio::time::timeout(Duration::from_secs(1800), fut)
                .await
                .map_err(|_| anyhow!("the scenario did not finish within 1800 s"))?;
        }
        scenario => BenchArgs {
            scenario,
            common: args.common,
        },
    };
    let secret = c
        .secret
        .clone()
        .ok_or_else(|| anyhow!("--secret (or BIMIP_JWT_SECRET) is needed to mint tokens"))?;
    let rest = c
        .url
        .strip_prefix("ws://")
        .ok_or_else(|| anyhow!("--url must start with ws:// (the bench does not do TLS)"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let addr = tokio::net::lookup_host(hostport)
        .await
        .with_context(|| format!("resolving {hostport}"))?
        .next()
        .ok_or_else(|| anyhow!("{hostport} does not resolve"))?;
    let http = c
        .http
        .clone()
        .unwrap_or_else(|| format!("http://{hostport}"));
    let conns = match &args.scenario {
        Scenario::Idle(a) => a.conns,
        Scenario::Chat(a) => 2 * a.pairs,
        Scenario::Presence(a) => a.contacts + 1,
        Scenario::Mixed(a) => a.idle + 2 * a.pairs + a.reconnect_users + 1,
        Scenario::Offline(_) => 2,
        Scenario::Push(_) => 0,
    };
    let n_src = match c.source_addrs {
        // Past about half the ephemeral port range (28k ports here) the kernel's search for a
        // free local port gets slow (19k logins from one address: 2.7k/s; from two: 12.6k/s).
        0 => conns.div_ceil(12_000),
        n => n,
    };
    let sources = if n_src > 1 {
        if !addr.ip().is_loopback() {
            bail!("--source-addrs needs a loopback server address");
        }
        (0..n_src)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + i as u8)))
            .collect()
    } else {
        Vec::new()
    };
    let ctx = Ctx {
        target: Target {
            url: c.url.clone(),
            addr,
            secret: secret.into_bytes(),
            codec: if c.json {
                bimip_proto::Codec::Json
            } else {
                bimip_proto::Codec::Binary
            },
            sources,
        },
        http,
        api_key: c.api_key.clone(),
        pid: c.server_pid,
        nonce: rand::random::<u64>() >> 16,
        common: c,
    };
    stats::now_ns(); // start the payload clock
    if ctx.pid.is_some() && ctx.common.quiesce > 0.0 {
        quiesce(ctx.pid, ctx.common.quiesce).await;
    }
    // Hard upper bound on any run.
    let fut = async {
        match args.scenario {
            Scenario::Chat(a) => chat::run(&ctx, a).await,
            Scenario::Offline(a) => offline::run(&ctx, a).await,
            Scenario::Idle(a) => idle::run(&ctx, a).await,
            Scenario::Presence(a) => presence::run(&ctx, a).await,
            Scenario::Mixed(a) => mixed::run(&ctx, a).await,
            Scenario::Push(_) => Ok(()),
        }
    };
    tokio::time::timeout(Duration::from_secs(900), fut)
        .await
        .map_err(|_| anyhow!("the scenario did not finish within 900 s"))?
}

impl Ctx {
    /// Adds `server`, `transport`, `time`, prints a table and the JSON line, appends it to
    /// `--results`.
    pub fn emit(&self, mut rec: Value) -> anyhow::Result<()> {
        if let Value::Object(m) = &mut rec {
            m.insert("server".into(), self.common.label.clone().into());
            m.insert(
                "transport".into(),
                if self.common.json { "ws-json" } else { "ws" }.into(),
            );
            m.insert("time".into(), stats::timestamp().into());
        }
        report::print_table(&rec);
        let line = serde_json::to_string(&rec)?;
        println!("{line}");
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.common.results)
            .with_context(|| format!("opening {}", self.common.results.display()))?;
        writeln!(f, "{line}")?;
        Ok(())
    }

    pub fn progress(&self, len: u64, what: &str) -> ProgressBar {
        if self.common.quiet {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::new(len);
        pb.set_style(
            ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {per_sec} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.set_message(what.to_string());
        pb
    }

    pub fn spinner(&self, what: &str) -> ProgressBar {
        if self.common.quiet {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::new_spinner();
        pb.set_message(what.to_string());
        pb.enable_steady_tick(Duration::from_millis(200));
        pb
    }

    /// The same context aimed at another node (ws://host:port/ws).
    pub async fn with_url(&self, url: &str) -> anyhow::Result<Ctx> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| anyhow!("{url}: must start with ws:// (the bench does not do TLS)"))?;
        let hostport = rest.split('/').next().unwrap_or(rest);
        let addr = tokio::net::lookup_host(hostport)
            .await
            .with_context(|| format!("resolving {hostport}"))?
            .next()
            .ok_or_else(|| anyhow!("{hostport} does not resolve"))?;
        let mut target = self.target.clone();
        target.url = url.to_string();
        target.addr = addr;
        Ok(Ctx {
            target,
            http: format!("http://{hostport}"),
            api_key: self.api_key.clone(),
            pid: None,
            common: self.common.clone(),
            nonce: self.nonce,
        })
    }

    /// Connects every user (device "bench") with at most `--concurrency` handshakes at once, in
    /// order. Returns the connections and the wall time taken.
    pub async fn connect_many(
        &self,
        users: &[String],
        offset: usize,
    ) -> anyhow::Result<(Vec<(Writer, Reader)>, f64)> {
        let pb = self.progress(users.len() as u64, "logins");
        let t0 = Instant::now();
        let results: Vec<anyhow::Result<(Writer, Reader)>> =
            futures_util::stream::iter(users.iter().enumerate())
                .map(|(i, u)| {
                    let pb = pb.clone();
                    async move {
                        let r = self.target.connect(u, "bench", offset + i).await;
                        pb.inc(1);
                        r.map(|(w, r, _)| (w, r))
                    }
                })
                .buffered(self.common.concurrency.max(1))
                .collect()
                .await;
        let took = t0.elapsed().as_secs_f64();
        pb.finish_and_clear();
        let mut out = Vec::with_capacity(users.len());
        for r in results {
            out.push(r?);
        }
        Ok((out, took))
    }

    pub fn server_cpu(&self) -> Option<f64> {
        stats::proc_cpu_s(self.pid)
    }

    pub fn server_rss_kb(&self) -> Option<u64> {
        stats::proc_rss_kb(self.pid)
    }

    /// `POST /v1/users/{hub}/contacts` with every contact (mutual), replacing the list.
    pub async fn set_contacts(&self, hub: &str, contacts: &[String]) -> Result<(), String> {
        let Some(key) = &self.api_key else {
            return Err("no --api-key (BIMIP_API_KEY): contacts not set up".into());
        };
        let body = json!({
            "contacts": contacts.iter().map(|c| json!({"user": c})).collect::<Vec<_>>(),
            "replace": true,
        });
        let client = self.http_client().map_err(|e| e.to_string())?;
        let resp = client
            .post(format!("{}/v1/users/{hub}/contacts", self.http))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("POST contacts: {e}"))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(format!(
                "POST /v1/users/{hub}/contacts: HTTP {status}: {text}"
            ));
        }
        Ok(())
    }

    pub fn http_client(&self) -> anyhow::Result<reqwest::Client> {
        Ok(reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?)
    }
}

/// CPU seconds of the server and of this process over a measured span.
pub struct Meter {
    t0: Instant,
    s0: Option<f64>,
    c0: f64,
    pid: Option<u32>,
}

pub struct Metered {
    pub wall: f64,
    pub server_cpu: Option<f64>,
    pub client_cpu: f64,
}

impl Meter {
    pub fn start(pid: Option<u32>) -> Meter {
        Meter {
            t0: Instant::now(),
            s0: stats::proc_cpu_s(pid),
            c0: stats::self_cpu_s(),
            pid,
        }
    }

    pub fn stop(&self) -> Metered {
        Metered {
            wall: self.t0.elapsed().as_secs_f64(),
            server_cpu: match (self.s0, stats::proc_cpu_s(self.pid)) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            },
            client_cpu: stats::self_cpu_s() - self.c0,
        }
    }
}

impl Metered {
    pub fn server_cpu_json(&self) -> Value {
        self.server_cpu
            .map_or(Value::Null, |c| stats::round(c, 2).into())
    }
}

/// Waits (bounded) until the server burns < 5 % of a core over one second.
async fn quiesce(pid: Option<u32>, max_s: f64) {
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < max_s {
        let Some(c0) = stats::proc_cpu_s(pid) else {
            return;
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(c1) = stats::proc_cpu_s(pid) else {
            return;
        };
        if c1 - c0 < 0.05 {
            return;
        }
    }
}

/// Closes every connection (close frames, bounded) and drops it.
pub async fn close_all(conns: Vec<Writer>) {
    futures_util::stream::iter(conns)
        .for_each_concurrent(256, |mut w| async move { w.close().await })
        .await;
}

/// The payload of a timed chat message: nonce, send time (ns since bench start), a sequence
/// number, padded to `size` bytes.
pub fn payload(nonce: u64, sent_ns: u64, seq: u64, size: usize) -> bytes::Bytes {
    let mut v = Vec::with_capacity(size.max(24));
    v.extend_from_slice(&nonce.to_le_bytes());
    v.extend_from_slice(&sent_ns.to_le_bytes());
    v.extend_from_slice(&seq.to_le_bytes());
    v.resize(size.max(24), b'x');
    v.into()
}

/// `(nonce, sent_ns, seq)` of a payload made by [`payload`].
pub fn parse_payload(p: &[u8]) -> Option<(u64, u64, u64)> {
    if p.len() < 24 {
        return None;
    }
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&p[i..i + 8]);
        u64::from_le_bytes(b)
    };
    Some((word(0), word(8), word(16)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip() {
        let p = payload(7, 123_456, 9, 100);
        assert_eq!(p.len(), 100);
        assert_eq!(parse_payload(&p), Some((7, 123_456, 9)));
        assert_eq!(parse_payload(b"short"), None);
    }
}
