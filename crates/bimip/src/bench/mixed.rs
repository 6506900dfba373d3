//! `bench mixed`: a realistic blend for `--duration` seconds — many idle users; chatting pairs at a
//! modest total rate; typing indicators to the peer; intent churn (AWAY/BUSY); users that keep
//! disconnecting and reconnecting, catching up with RESUME (and acknowledging with a receipt)
//! on messages a poster sends them meanwhile. Reports totals, error counts by kind, chat latency,
//! and server CPU/RSS sampled over time.

use super::chat::{Cmd, Pairs, Shared};
use super::stats::{Errors, LatHist, mb, now_ns, round};
use super::{Ctx, Meter, close_all, payload};
use bimip_proto::{Body, v1};
use clap::Args;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Args, Debug)]
pub struct MixedArgs {
    /// Seconds of load.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Idle connections.
    #[arg(long, default_value_t = 1000)]
    pub idle: usize,
    /// Chatting pairs.
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Total chat msg/s over the pairs.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Typing indicators per second (total).
    #[arg(long, default_value_t = 50.0)]
    typing_rate: f64,
    /// Intent changes per second (total).
    #[arg(long, default_value_t = 10.0)]
    churn_rate: f64,
    /// Users that keep reconnecting (online 1–3 s, offline 1–3 s).
    #[arg(long, default_value_t = 20)]
    pub reconnect_users: usize,
    /// Messages per second the poster sends to the reconnecting users.
    #[arg(long, default_value_t = 50.0)]
    offline_rate: f64,
    /// Sampling interval of server CPU and RSS, seconds.
    #[arg(long, default_value_t = 1.0)]
    sample: f64,
}

const POSTER: &str = "mx_post";

struct Rc {
    reconnects: AtomicU64,
    resumed: AtomicU64,
    realtime: AtomicU64,
    posted: AtomicU64,
    posted_acks: AtomicU64,
    resume_hist: LatHist,
    login_hist: LatHist,
    errors: Errors,
}

async fn reconnector(ctx: &Ctx, rc: &Rc, user: String, n: usize, until: Instant) {
    let mut first = true;
    while Instant::now() < until {
        if !first {
            tokio::time::sleep(Duration::from_secs_f64(rand::random_range(1.0..3.0))).await;
        }
        first = false;
        let t0 = now_ns();
        let (mut w, mut r, _) = match ctx.target.connect(&user, "bench", n).await {
            Ok(x) => x,
            Err(e) => {
                rc.errors.add("connect", &e.to_string());
                continue;
            }
        };
        rc.login_hist.record_ns(n, now_ns() - t0);
        rc.reconnects.fetch_add(1, Relaxed);
        if let Err(e) = r.read_fanout(Duration::from_secs(10)).await {
            rc.errors.add("fanout", &e.to_string());
            continue;
        }
        let t_resume = now_ns();
        let rf = match w
            .send(Body::Awareness(v1::Awareness {
                to: POSTER.into(),
                status: v1::Status::Resume as i32,
                limit: 1000,
                ..Default::default()
            }))
            .await
        {
            Ok(rf) => rf,
            Err(e) => {
                rc.errors.add("write", &e.to_string());
                continue;
            }
        };
        let online_until = Instant::now() + Duration::from_secs_f64(rand::random_range(1.0..3.0));
        let mut last = 0u64;
        let mut resuming = true;
        loop {
            let left = online_until.saturating_duration_since(Instant::now());
            if left.is_zero() && !resuming {
                break;
            }
            let f = match r.recv_timeout(left.max(Duration::from_millis(1))).await {
                Ok(Some(f)) => f,
                Ok(None) if resuming && left.is_zero() => {
                    rc.errors
                        .add("resume_timeout", "no final batch while online");
                    break;
                }
                Ok(None) => {
                    if left.is_zero() {
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    rc.errors.add("read", &e.to_string());
                    break;
                }
            };
            match f.body {
                Some(Body::Batch(b)) if f.r#ref == rf => {
                    rc.resumed.fetch_add(b.messages.len() as u64, Relaxed);
                    if let Some(m) = b.messages.last() {
                        last = last.max(m.offset);
                    }
                    if !b.more {
                        resuming = false;
                        rc.resume_hist.record_ns(n, now_ns() - t_resume);
                    }
                }
                Some(Body::Message(m)) => {
                    rc.realtime.fetch_add(1, Relaxed);
                    last = last.max(m.offset);
                }
                Some(Body::Error(e)) => rc.errors.server_error(&e),
                _ => {}
            }
        }
        if last > 0 {
            let _ = w
                .send(Body::Receipt(v1::Receipt {
                    to: POSTER.into(),
                    kind: v1::ReceiptKind::Delivered as i32,
                    up_to_offset: last,
                    partition: v1::Partition::Chat as i32,
                    ..Default::default()
                }))
                .await;
        }
        w.close().await;
    }
}

pub async fn run(ctx: &Ctx, a: MixedArgs) -> anyhow::Result<()> {
    let idle_users: Vec<String> = (0..a.idle).map(|i| format!("mx_idle{i}")).collect();
    let s_users: Vec<String> = (0..a.pairs.max(1)).map(|i| format!("mx_s{i}")).collect();
    let r_users: Vec<String> = (0..a.pairs.max(1)).map(|i| format!("mx_r{i}")).collect();
    // Pairs are contacts, so typing and intents reach the peer.
    let mut contact_errors = 0u64;
    for (s, r) in s_users.iter().zip(&r_users) {
        if let Err(e) = ctx.set_contacts(s, std::slice::from_ref(r)).await {
            if contact_errors == 0 {
                eprintln!("warning: {e}");
            }
            contact_errors += 1;
        }
    }
    let rss0 = ctx.server_rss_kb();
    let (idle, t_idle) = ctx.connect_many(&idle_users, 0).await?;
    let (senders, t_s) = ctx.connect_many(&s_users, a.idle).await?;
    let (receivers, t_r) = ctx.connect_many(&r_users, a.idle + a.pairs).await?;
    let (stop, stop_rx) = watch::channel(false);
    let mut idle_writers = Vec::with_capacity(idle.len());
    let mut tasks = Vec::new();
    for (w, mut r) in idle {
        idle_writers.push(w);
        let mut stop_rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let stopped = stop_rx.changed();
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    f = r.recv() => if !matches!(f, Ok(Some(_))) { return },
                }
            }
        }));
    }
    let (mut pw, mut pr, _) = ctx
        .target
        .connect(POSTER, "bench", a.idle + 2 * a.pairs)
        .await?;
    let rc = Arc::new(Rc {
        reconnects: AtomicU64::new(0),
        resumed: AtomicU64::new(0),
        realtime: AtomicU64::new(0),
        posted: AtomicU64::new(0),
        posted_acks: AtomicU64::new(0),
        resume_hist: LatHist::new(4),
        login_hist: LatHist::new(4),
        errors: Errors::default(),
    });
    {
        let (rc, mut stop_rx) = (rc.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            let stopped = stop_rx.changed();
            tokio::pin!(stopped);
            loop {
                let f = tokio::select! {
                    _ = &mut stopped => return,
                    f = pr.recv() => f,
                };
                match f {
                    Ok(Some(v1::Frame {
                        body: Some(Body::Ack(_)),
                        ..
                    })) => {
                        rc.posted_acks.fetch_add(1, Relaxed);
                    }
                    Ok(Some(v1::Frame {
                        body: Some(Body::Error(e)),
                        ..
                    })) => rc.errors.server_error(&e),
                    Ok(Some(_)) => {}
                    _ => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let sh = Arc::new(Shared::new(ctx.nonce, ctx.common.size, false));
    sh.meas_start.store(now_ns(), Relaxed);
    let pairs = Pairs::start(sh.clone(), senders, receivers, r_users);
    let start = Instant::now();
    let total = Duration::from_secs_f64(a.duration);
    let until = start + total;
    let rc_base = a.idle + 2 * a.pairs + 1;
    let rc_tasks = futures_util::future::join_all((0..a.reconnect_users).map(|j| {
        let rc = rc.clone();
        async move { reconnector(ctx, &rc, format!("mx_rc{j}"), rc_base + j, until).await }
    }));
    let meter = Meter::start(ctx.pid);
    let driver = async {
        let pb = ctx.progress(a.duration.ceil() as u64, "mixed s");
        let mut iv = tokio::time::interval(Duration::from_millis(5));
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut msgs, mut typing, mut churn, mut posts) = (0u64, 0u64, 0u64, 0u64);
        let (mut idx, mut tidx) = (0usize, 0usize);
        let n = pairs.txs.len();
        let mut samples = Vec::new();
        let mut next_sample = Duration::ZERO;
        let mut last_cpu = ctx.server_cpu();
        let mut last_t = Instant::now();
        loop {
            iv.tick().await;
            let el = start.elapsed();
            if el >= total {
                break;
            }
            let s = el.as_secs_f64();
            while msgs < (a.rate * s) as u64 {
                let _ = pairs.txs[idx].send(Cmd::Msg);
                idx = (idx + 1) % n;
                msgs += 1;
            }
            while typing < (a.typing_rate * s) as u64 {
                let _ = pairs.txs[tidx].send(Cmd::Typing);
                tidx = (tidx + 7) % n;
                typing += 1;
            }
            while churn < (a.churn_rate * s) as u64 {
                let st = if churn.is_multiple_of(2) {
                    v1::Status::Away
                } else {
                    v1::Status::Busy
                };
                let _ = pairs.txs[rand::random_range(0..n)].send(Cmd::Intent(st));
                churn += 1;
            }
            if a.reconnect_users > 0 {
                let mut fed = false;
                while posts < (a.offline_rate * s) as u64 {
                    let to = format!("mx_rc{}", posts as usize % a.reconnect_users);
                    let body = Body::Message(v1::Message {
                        id: format!("{:x}-p{posts}", ctx.nonce),
                        to,
                        partition: v1::Partition::Chat as i32,
                        payload: payload(ctx.nonce, now_ns(), posts, ctx.common.size),
                        ..Default::default()
                    });
                    if let Err(e) = pw.feed(body).await {
                        rc.errors.add("write", &e.to_string());
                    }
                    posts += 1;
                    rc.posted.fetch_add(1, Relaxed);
                    fed = true;
                }
                if fed && let Err(e) = pw.flush().await {
                    rc.errors.add("write", &e.to_string());
                }
            }
            if el >= next_sample {
                next_sample += Duration::from_secs_f64(a.sample.max(0.1));
                let cpu = ctx.server_cpu();
                let dt = last_t.elapsed().as_secs_f64();
                last_t = Instant::now();
                let pct = match (last_cpu, cpu) {
                    (Some(a), Some(b)) if dt > 0.0 => Some(round((b - a) / dt * 100.0, 1)),
                    _ => None,
                };
                last_cpu = cpu;
                samples.push(json!({
                    "t_s": round(s, 1),
                    "server_cpu_pct": pct,
                    "server_rss_mb": mb(ctx.server_rss_kb()),
                    "chat_delivered": sh.received.load(Relaxed),
                    "resumed": rc.resumed.load(Relaxed),
                    "errors": sh.errors.total() + rc.errors.total(),
                }));
                pb.set_position(el.as_secs());
            }
        }
        pb.finish_and_clear();
        samples
    };
    let (samples, _) = tokio::join!(driver, rc_tasks);
    let m = meter.stop();
    let rss1 = ctx.server_rss_kb();
    pairs.drain(Duration::from_secs(10)).await;
    let sent = sh.sent.load(Relaxed);
    let received = sh.received.load(Relaxed);
    let rec = json!({
        "scenario": "mixed",
        "duration_s": a.duration,
        "idle": a.idle,
        "pairs": a.pairs,
        "rate_target": a.rate,
        "typing_rate": a.typing_rate,
        "churn_rate": a.churn_rate,
        "reconnect_users": a.reconnect_users,
        "offline_rate": a.offline_rate,
        "contact_setup_errors": contact_errors,
        "login_s": round(t_idle + t_s + t_r, 2),
        "chat_sent": sent,
        "chat_received": received,
        "acks": sh.acks.load(Relaxed),
        "undelivered_at_end": sent.saturating_sub(received),
        "throughput_msg_s": round(received as f64 / a.duration, 1),
        "latency": sh.hist.summary(),
        "typing_sent": sh.typing_sent.load(Relaxed),
        "typing_received": sh.typing_received.load(Relaxed),
        "intents_sent": sh.intents_sent.load(Relaxed),
        "reconnects": rc.reconnects.load(Relaxed),
        "login_latency": rc.login_hist.summary(),
        "posted": rc.posted.load(Relaxed),
        "posted_acks": rc.posted_acks.load(Relaxed),
        "resumed_messages": rc.resumed.load(Relaxed),
        "realtime_to_reconnectors": rc.realtime.load(Relaxed),
        "resume_latency": rc.resume_hist.summary(),
        "errors": sh.errors.total() + rc.errors.total(),
        "error_kinds": {"pairs": sh.errors.json(), "reconnect": rc.errors.json()},
        "first_error": sh.errors.first().or_else(|| rc.errors.first()),
        "server_cpu_s": m.server_cpu_json(),
        "client_cpu_s": round(m.client_cpu, 2),
        "rss_before_mb": mb(rss0),
        "rss_after_mb": mb(rss1),
        "samples": samples,
    });
    let _ = stop.send(true);
    pairs.stop().await;
    for t in tasks {
        let _ = t.await;
    }
    idle_writers.push(pw);
    close_all(idle_writers).await;
    ctx.emit(rec)?;
    Ok(())
}
