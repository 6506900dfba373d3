//! `bench push`: pushes through a fake FCM on loopback. The scenario starts its own fake FCM (in
//! this process) and, for each phase, its own server (`bimip serve` with a temporary data dir,
//! pointed at the fake, collapse window 0), registers a token for each of `--users` users (all
//! offline), then measures:
//!
//! - **throughput** (drain of the outbox): `--senders` users each send one chat message to every
//!   user while the fake's token endpoint refuses the credentials, which pauses the provider
//!   (`--push-pause-ms` = `--fill-pause-ms`): every job waits for the end of the pause, so the
//!   outbox holds `senders × users` due jobs at once; pushes per second as the fake received
//!   them, from its first request to its last, and server CPU per push over the drain;
//! - **latency** (grace 0): a sender streams chat messages at `--rate` per second for
//!   `--duration` seconds, each to the next user (after one unmeasured warm-up round over the
//!   users, so their queue files exist). For each message, the time to the fake's
//!   request is measured from the store's timestamp of the message (carried by its Ack; 1 ms
//!   resolution: "stored → provider request"), from the Ack's arrival (the message and its push
//!   job are durable by then, so the push may even come first) and from the send (which adds
//!   the store's commit).

use super::conn::{Target, Writer};
use super::stats::{Errors, round, summary};
use super::{Common, Ctx, Meter};
use anyhow::{Context, anyhow, bail};
use bimip_proto::{Body, Codec, v1};
use bimip_push::fake::{FakeFcm, TokenFailure};
use clap::Args;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;
use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

#[derive(Args, Debug)]
pub struct PushArgs {
    /// Users with a registered push token (all offline).
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Throughput phase: senders, each sending one message to every user (one job each).
    #[arg(long, default_value_t = 3)]
    senders: usize,
    /// Throughput phase: how long the provider stays paused while the outbox fills (must be
    /// longer than the fill).
    #[arg(long, default_value_t = 30_000)]
    fill_pause_ms: u64,
    /// Latency phase: chat messages (one push each) per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Latency phase: seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// The bimip binary to start [default: this one].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// One more flag for the started servers (repeatable), e.g. `--server-arg=--fsync=always`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Run only one phase: throughput or latency.
    #[arg(long)]
    only: Option<String>,
}

const SECRET: &str = "bench-push-secret-0123456789";
const API_KEY: &str = "bench-push-api-key";
/// Messages a sender has in flight.
const INFLIGHT: usize = 256;

/// A server this scenario started; SIGTERM and wait when dropped.
struct Spawned {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `bimip serve` on a free port and a fresh data dir, pushing to `fake`.
fn spawn_server(
    a: &PushArgs,
    fake: &FakeFcm,
    pause_ms: u64,
) -> anyhow::Result<(Spawned, std::net::SocketAddr)> {
    let dir = tempfile::tempdir()?;
    let creds = fake.write_credentials(dir.path())?;
    let bin = match &a.server_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?,
    };
    let mut cmd = Command::new(&bin);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--log", "warn"])
        .args(["--jwt-secret", SECRET, "--api-key", API_KEY])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--push-fcm-credentials")
        .arg(&creds)
        .args(["--push-fcm-endpoint", &fake.url()])
        .args(["--push-grace-ms", "0", "--push-collapse-ms", "0"])
        .args(["--push-pause-ms", &pause_ms.to_string()])
        .args(&a.server_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("BIMIP_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent && let Some(rest) = line.strip_prefix("bimip listening on http://") {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                sent = true;
            }
        }
    });
    let spawned = Spawned { child, _dir: dir };
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| anyhow!("the server did not start (see its log above)"))?;
    let addr = addr
        .parse()
        .with_context(|| format!("listen address {addr:?}"))?;
    Ok((spawned, addr))
}

/// The bench context of a started server.
fn ctx_for(server: &Spawned, addr: std::net::SocketAddr, common: &Common) -> Ctx {
    Ctx {
        target: Target {
            url: format!("ws://{addr}/ws"),
            addr,
            secret: SECRET.as_bytes().to_vec(),
            codec: Codec::Binary,
            sources: Vec::new(),
        },
        http: format!("http://{addr}"),
        api_key: Some(API_KEY.into()),
        pid: Some(server.child.id()),
        nonce: rand::random::<u64>() >> 16,
        common: common.clone(),
    }
}

pub async fn run(a: PushArgs, common: Common) -> anyhow::Result<()> {
    if a.users == 0 || a.rate == 0 || a.senders == 0 {
        bail!("--users, --senders and --rate must be >= 1");
    }
    let fake = FakeFcm::start().await?;
    let users: Vec<String> = (0..a.users).map(|i| format!("p{i:06}")).collect();
    let mut rec = json!({
        "scenario": "push",
        "provider": "fcm (fake, loopback)",
        "users": a.users,
        "server_args": a.server_args,
    });
    let mut last_ctx = None;
    if a.only.as_deref() != Some("throughput") {
        // One message per user per second: every user's files stay open in the store (this
        // phase measures pushes, not the first write to ten thousand new queues).
        let users = &users[..users.len().min(a.rate as usize)];
        let (server, addr) = spawn_server(&a, &fake, 60_000)?;
        let ctx = ctx_for(&server, addr, &common);
        register_tokens(&ctx, users).await?;
        rec["latency"] = latency(&ctx, &fake, users, a.rate, a.duration).await?;
        rec["latency"]["users"] = users.len().into();
        last_ctx = Some(ctx);
        drop(server);
        settle().await;
    }
    if a.only.as_deref() != Some("latency") {
        let (server, addr) = spawn_server(&a, &fake, a.fill_pause_ms)?;
        let ctx = ctx_for(&server, addr, &common);
        register_tokens(&ctx, &users).await?;
        rec["throughput"] = throughput(&ctx, &fake, &users, &a).await?;
        rec["server_rss_mb"] = super::stats::mb(ctx.server_rss_kb());
        last_ctx = Some(ctx);
        drop(server);
        settle().await;
    }
    match last_ctx {
        Some(ctx) => ctx.emit(rec),
        None => bail!("--only takes throughput or latency"),
    }
}

/// After a phase's server and data dir are gone: `sync`, so the next phase's fsyncs do not wait
/// for the write-back of the removed files.
async fn settle() {
    let _ = tokio::process::Command::new("sync").status().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
}

async fn register_tokens(ctx: &Ctx, users: &[String]) -> anyhow::Result<()> {
    let client = ctx.http_client()?;
    let pb = ctx.progress(users.len() as u64, "tokens");
    let results: Vec<anyhow::Result<()>> = futures_util::stream::iter(users)
        .map(|u| {
            let (client, pb) = (client.clone(), pb.clone());
            async move {
                let resp = client
                    .put(format!(
                        "{}/v1/users/{u}/devices/phone/push-token",
                        ctx.http
                    ))
                    .bearer_auth(API_KEY)
                    .json(&json!({"platform": "fcm", "token": format!("bench-token-{u}")}))
                    .send()
                    .await?;
                pb.inc(1);
                if !resp.status().is_success() {
                    bail!("registering {u}: HTTP {}", resp.status());
                }
                Ok(())
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    pb.finish_and_clear();
    results.into_iter().collect()
}

/// One sender's connection: sends, and a task that reads its Acks.
struct Sender {
    w: Writer,
    acked: Arc<tokio::sync::Semaphore>,
    /// Ack ref → when it arrived, and the message's store timestamp (unix ms) it carried.
    acks: Arc<Mutex<HashMap<u64, (Instant, i64)>>>,
    errors: Arc<Errors>,
    reader: tokio::task::JoinHandle<()>,
}

impl Sender {
    async fn connect(ctx: &Ctx, user: &str, n: usize) -> anyhow::Result<Sender> {
        let (w, mut r, _) = ctx.target.connect(user, "bench", n).await?;
        r.read_fanout(Duration::from_secs(10)).await?;
        let acked = Arc::new(tokio::sync::Semaphore::new(0));
        let acks: Arc<Mutex<HashMap<u64, (Instant, i64)>>> = Arc::default();
        let errors = Arc::new(Errors::default());
        let reader = {
            let (acked, acks, errors) = (acked.clone(), acks.clone(), errors.clone());
            tokio::spawn(async move {
                while let Ok(Some(f)) = r.recv().await {
                    match &f.body {
                        Some(Body::Ack(a)) => {
                            if let Ok(mut m) = acks.lock() {
                                m.insert(f.r#ref, (Instant::now(), a.timestamp));
                            }
                            acked.add_permits(1);
                        }
                        Some(Body::Error(e)) => {
                            errors.server_error(e);
                            acked.add_permits(1);
                        }
                        _ => {}
                    }
                }
            })
        };
        Ok(Sender {
            w,
            acked,
            acks,
            errors,
            reader,
        })
    }

    fn message(to: &str, id: String) -> Body {
        Body::Message(v1::Message {
            id,
            to: to.to_string(),
            payload: bytes::Bytes::from_static(b"push bench"),
            ..Default::default()
        })
    }
}

/// Fills the outbox while the grace period holds the pushes back, then measures the drain.
async fn throughput(
    ctx: &Ctx,
    fake: &FakeFcm,
    users: &[String],
    a: &PushArgs,
) -> anyhow::Result<serde_json::Value> {
    fake.set_detailed_recording(false);
    fake.clear_requests();
    // The first push finds the credentials refused and pauses the provider; every job then
    // waits for the end of the pause.
    fake.fail_token_requests(Some(TokenFailure::InvalidGrant));
    let expected = (a.senders * users.len()) as u64;
    let t0 = Instant::now();
    let pb = ctx.progress(expected, "fill");
    let fills = (0..a.senders).map(|k| {
        let pb = pb.clone();
        async move {
            let mut s = Sender::connect(ctx, &format!("push_s{k}"), k).await?;
            for (i, to) in users.iter().enumerate() {
                if i >= INFLIGHT {
                    s.acked.acquire().await?.forget();
                }
                s.w.send(Sender::message(to, format!("pt-{}-{k}-{i}", ctx.nonce)))
                    .await?;
                pb.inc(1);
            }
            let left = users.len().min(INFLIGHT) as u32;
            s.acked.acquire_many(left).await?.forget();
            s.reader.abort();
            anyhow::Ok(s.errors.total())
        }
    });
    let errors: u64 = futures_util::future::try_join_all(fills)
        .await?
        .into_iter()
        .sum();
    let fill_s = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    fake.fail_token_requests(None);
    if fill_s * 1000.0 >= a.fill_pause_ms as f64 {
        eprintln!(
            "warning: the fill took {fill_s:.1} s, longer than the pause: pushes overlapped it"
        );
    }
    let sp = ctx.spinner("drain");
    let wait = Duration::from_millis(a.fill_pause_ms).saturating_sub(t0.elapsed());
    tokio::time::sleep(wait.saturating_sub(Duration::from_millis(500))).await;
    let meter = Meter::start(ctx.pid);
    let got = fake
        .wait_for_count(expected, Duration::from_secs(600))
        .await;
    let m = meter.stop();
    sp.finish_and_clear();
    let times = fake.request_times();
    let span = match (times.first(), times.last()) {
        (Some(a), Some(b)) if b > a => (*b - *a).as_secs_f64(),
        _ => 0.0,
    };
    let rate = if span > 0.0 { got as f64 / span } else { 0.0 };
    Ok(json!({
        "jobs": expected,
        "fill_s": round(fill_s, 2),
        "pushes": got,
        "drain_s": round(span, 3),
        "pushes_per_s": round(rate, 0),
        "server_cpu_s": m.server_cpu_json(),
        "server_cpu_us_per_push": m.server_cpu.map(|c| round(c * 1e6 / got.max(1) as f64, 1)),
        "client_cpu_s": round(m.client_cpu, 2),
        "errors": errors,
    }))
}

/// Chat messages at `rate`/s to offline users; time from the Ack (and from the send) to the
/// fake's request.
async fn latency(
    ctx: &Ctx,
    fake: &FakeFcm,
    users: &[String],
    rate: u64,
    duration: f64,
) -> anyhow::Result<serde_json::Value> {
    fake.set_detailed_recording(true);
    fake.clear_requests();
    let s = Sender::connect(ctx, "push_sender", 0).await?;
    // Warm-up, not measured: one message to every user at the same rate, so each user's queue
    // files exist and are open (a first write creates folders and files).
    let warm: Mutex<HashMap<String, (u64, Instant)>> = Mutex::default();
    let (warmed, s) = send_paced(ctx, s, users, rate, users.len() as u64, &warm).await?;
    fake.wait_for_count(warmed, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    fake.clear_requests();
    let sent: Arc<Mutex<HashMap<String, (u64, Instant)>>> = Arc::default();
    let meter = Meter::start(ctx.pid);
    let total = (rate as f64 * duration).round() as u64;
    let (n, s) = send_paced(ctx, s, users, rate, total, &sent).await?;
    let got = fake
        .wait_for_count(n, Duration::from_secs(60 + duration as u64))
        .await;
    let m = meter.stop();
    s.reader.abort();
    let sent = sent.lock().map_err(|_| anyhow!("send map poisoned"))?;
    let acks = s.acks.lock().map_err(|_| anyhow!("ack map poisoned"))?;
    let new_hist = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3);
    let (mut from_ack, mut from_send, mut from_stored) = (new_hist()?, new_hist()?, new_hist()?);
    let mut before_ack = 0u64;
    // The fake's receive instants on the wall clock, to compare with the store's timestamps.
    let (i0, w0) = (Instant::now(), bimip_proto::now_ms());
    let wall_ms = |t: Instant| {
        if t >= i0 {
            w0 + (t - i0).as_millis() as i64
        } else {
            w0 - (i0 - t).as_millis() as i64
        }
    };
    for req in fake.requests() {
        let id = req.message()["data"]["message_id"].as_str().unwrap_or("");
        let Some((r, t_send)) = sent.get(id) else {
            continue;
        };
        let us = |t0: Instant| req.received.saturating_duration_since(t0).as_micros() as u64;
        from_send.saturating_record(us(*t_send).max(1));
        if let Some((t_ack, stored_ms)) = acks.get(r) {
            if req.received < *t_ack {
                before_ack += 1;
            }
            from_ack.saturating_record(us(*t_ack).max(1));
            let ms = (wall_ms(req.received) - stored_ms).max(0) as u64;
            from_stored.saturating_record((ms * 1000).max(1));
        }
    }
    Ok(json!({
        "rate": rate,
        "duration_s": duration,
        "sent": n,
        "pushes": got,
        "stored_to_push": summary(&from_stored),
        "ack_to_push": summary(&from_ack),
        "pushed_before_ack": before_ack,
        "send_to_push": summary(&from_send),
        "server_cpu_s": m.server_cpu_json(),
        "server_cpu_us_per_push": m.server_cpu.map(|c| round(c * 1e6 / got.max(1) as f64, 1)),
        "errors": s.errors.json(),
    }))
}

/// Sends `total` messages at `rate` per second (in 1 ms ticks), each to the next user.
async fn send_paced(
    ctx: &Ctx,
    mut s: Sender,
    users: &[String],
    rate: u64,
    total: u64,
    sent: &Mutex<HashMap<String, (u64, Instant)>>,
) -> anyhow::Result<(u64, Sender)> {
    let pb = ctx.progress(total, "messages");
    let t0 = Instant::now();
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while seq < total {
        tick.tick().await;
        let due = ((t0.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        if due <= seq {
            continue;
        }
        while seq < due {
            let to = &users[seq as usize % users.len()];
            let id = format!("pl-{}-{}", ctx.nonce, rand::random::<u64>() >> 12);
            let now = Instant::now();
            let r = s.w.feed(Sender::message(to, id.clone())).await?;
            sent.lock()
                .map_err(|_| anyhow!("send map poisoned"))?
                .insert(id, (r, now));
            seq += 1;
        }
        s.w.flush().await?;
        pb.set_position(seq);
    }
    pb.finish_and_clear();
    Ok((seq, s))
}
