//! `bench chat`: N online pairs u(2i) → u(2i+1). Open loop: a 5 ms ticker hands out `--rate`
//! msg/s in total, round-robin over the pairs. Closed loop (`--rate 0`): each pair keeps
//! `--window` messages in flight, the next one sent when one arrives. Latency = receive time −
//! send time (carried in the payload), in this process.
//!
//! Per pair there are three tasks: the sender's writer (fed by a command channel), the sender's
//! reader (Acks, Errors) and the receiver's reader (latency; in closed loop it refills the window).

use super::conn::{Reader, Writer};
use super::stats::{Errors, LatHist, mb, now_ns, round};
use super::{Ctx, Meter, close_all, parse_payload, payload};
use bimip_proto::{Body, v1};
use clap::Args;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// Online pairs (2 × N connections).
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Total offered msg/s (open loop); 0 = closed loop.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Messages in flight per pair in closed loop.
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// At most this many seconds to wait for in-flight messages after the measured period.
    #[arg(long, default_value_t = 10.0)]
    drain: f64,
    /// Connect the receivers to this node instead (ws://…/ws): every message crosses from the
    /// senders' node to this one (several nodes on one Redis).
    #[arg(long)]
    recipients_url: Option<String>,
    /// With --recipients-url: spread users over both nodes so that half the messages cross
    /// (pair i's sender on node i mod 2, its receiver on node (i / 2) mod 2), as random
    /// placement behind a load balancer would.
    #[arg(long)]
    spread: bool,
    /// Process id of the recipients' node: its CPU is reported and added to the server's.
    #[arg(long)]
    recipients_pid: Option<u32>,
    /// The Redis the nodes share: its CPU and commands per message are reported.
    #[arg(long)]
    redis: Option<String>,
}

/// What a pair's sender task is told to send.
#[derive(Debug, Clone, Copy)]
pub enum Cmd {
    /// A timed chat message to the peer.
    Msg,
    /// `Awareness{to: peer, status: TYPING}`.
    Typing,
    /// `Awareness{status}` (an intent: AWAY, BUSY, DND).
    Intent(v1::Status),
}

/// Counters shared by every pair's tasks.
pub struct Shared {
    pub nonce: u64,
    pub size: usize,
    pub closed_loop: bool,
    /// Measured window, ns since bench start: latencies of messages in it are recorded.
    pub meas_start: AtomicU64,
    pub meas_end: AtomicU64,
    /// Closed loop: no refill after this.
    pub send_deadline: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub received_in_window: AtomicU64,
    pub stale: AtomicU64,
    pub acks: AtomicU64,
    pub typing_sent: AtomicU64,
    pub typing_received: AtomicU64,
    pub intents_sent: AtomicU64,
    pub hist: LatHist,
    pub errors: Errors,
}

impl Shared {
    pub fn new(nonce: u64, size: usize, closed_loop: bool) -> Shared {
        Shared {
            nonce,
            size,
            closed_loop,
            meas_start: AtomicU64::new(0),
            meas_end: AtomicU64::new(u64::MAX),
            send_deadline: AtomicU64::new(u64::MAX),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            received_in_window: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            typing_sent: AtomicU64::new(0),
            typing_received: AtomicU64::new(0),
            intents_sent: AtomicU64::new(0),
            hist: LatHist::new(16),
            errors: Errors::default(),
        }
    }
}

/// Running pairs: sender i → receiver i.
pub struct Pairs {
    pub shared: Arc<Shared>,
    pub txs: Vec<mpsc::UnboundedSender<Cmd>>,
    stop: watch::Sender<bool>,
    senders: Vec<JoinHandle<Writer>>,
    readers: Vec<JoinHandle<()>>,
    recv_writers: Vec<Writer>,
}

impl Pairs {
    /// `senders[i]` sends to `receivers[i]`, whose user id is `peers[i]`.
    pub fn start(
        shared: Arc<Shared>,
        senders: Vec<(Writer, Reader)>,
        receivers: Vec<(Writer, Reader)>,
        peers: Vec<String>,
    ) -> Pairs {
        let (stop, stop_rx) = watch::channel(false);
        let mut p = Pairs {
            shared: shared.clone(),
            txs: Vec::new(),
            stop,
            senders: Vec::new(),
            readers: Vec::new(),
            recv_writers: Vec::new(),
        };
        for (i, (((sw, sr), (rw, rr)), peer)) in
            senders.into_iter().zip(receivers).zip(peers).enumerate()
        {
            let (tx, rx) = mpsc::unbounded_channel();
            p.senders.push(tokio::spawn(sender_task(
                shared.clone(),
                sw,
                rx,
                peer,
                stop_rx.clone(),
            )));
            p.readers
                .push(tokio::spawn(ack_task(shared.clone(), sr, stop_rx.clone())));
            let refill = shared.closed_loop.then(|| tx.clone());
            p.readers.push(tokio::spawn(receiver_task(
                shared.clone(),
                i,
                rr,
                refill,
                stop_rx.clone(),
            )));
            p.recv_writers.push(rw);
            p.txs.push(tx);
        }
        p
    }

    /// Waits (at most `max`) until every message sent has arrived.
    pub async fn drain(&self, max: Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < max {
            if self.shared.received.load(Relaxed) >= self.shared.sent.load(Relaxed) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops every task and closes every connection.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        drop(self.txs);
        let mut writers = self.recv_writers;
        for h in self.senders {
            if let Ok(w) = h.await {
                writers.push(w);
            }
        }
        for h in self.readers {
            let _ = h.await;
        }
        close_all(writers).await;
    }
}

async fn sender_task(
    sh: Arc<Shared>,
    mut w: Writer,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    peer: String,
    mut stop: watch::Receiver<bool>,
) -> Writer {
    let mut seq = 0u64;
    // One stop waiter for the task's life (a new one per turn costs a lock on the shared notifier).
    let stopped = stop.changed();
    tokio::pin!(stopped);
    loop {
        let cmd = tokio::select! {
            _ = &mut stopped => break,
            c = rx.recv() => match c { Some(c) => c, None => break },
        };
        let mut next = Some(cmd);
        let mut n = 0;
        let mut failed = false;
        while let Some(cmd) = next {
            let body = match cmd {
                Cmd::Msg => {
                    seq += 1;
                    Body::Message(v1::Message {
                        id: format!("{:x}-{seq}", sh.nonce),
                        to: peer.clone(),
                        partition: v1::Partition::Chat as i32,
                        payload: payload(sh.nonce, now_ns(), seq, sh.size),
                        ..Default::default()
                    })
                }
                Cmd::Typing => Body::Awareness(v1::Awareness {
                    to: peer.clone(),
                    status: v1::Status::Typing as i32,
                    ttl_ms: 3000,
                    ..Default::default()
                }),
                Cmd::Intent(s) => Body::Awareness(v1::Awareness {
                    status: s as i32,
                    details: format!("bench-{:x}", sh.nonce),
                    ..Default::default()
                }),
            };
            if let Err(e) = w.feed(body).await {
                sh.errors.add("write", &e.to_string());
                failed = true;
                break;
            }
            match cmd {
                Cmd::Msg => sh.sent.fetch_add(1, Relaxed),
                Cmd::Typing => sh.typing_sent.fetch_add(1, Relaxed),
                Cmd::Intent(_) => sh.intents_sent.fetch_add(1, Relaxed),
            };
            n += 1;
            next = if n < 64 { rx.try_recv().ok() } else { None };
        }
        if failed || w.flush().await.is_err() {
            break;
        }
    }
    w
}

async fn ack_task(sh: Arc<Shared>, mut r: Reader, mut stop: watch::Receiver<bool>) {
    let stopped = stop.changed();
    tokio::pin!(stopped);
    loop {
        let f = tokio::select! {
            _ = &mut stopped => return,
            f = r.recv() => f,
        };
        match f {
            Ok(Some(v1::Frame {
                body: Some(Body::Ack(_)),
                ..
            })) => {
                sh.acks.fetch_add(1, Relaxed);
            }
            Ok(Some(v1::Frame {
                body: Some(Body::Error(e)),
                ..
            })) => sh.errors.server_error(&e),
            Ok(Some(_)) => {}
            Ok(None) => {
                sh.errors.add("closed", "a sender's connection was closed");
                return;
            }
            Err(e) => {
                sh.errors.add("read", &e.to_string());
                return;
            }
        }
    }
}

async fn receiver_task(
    sh: Arc<Shared>,
    idx: usize,
    mut r: Reader,
    refill: Option<mpsc::UnboundedSender<Cmd>>,
    mut stop: watch::Receiver<bool>,
) {
    let stopped = stop.changed();
    tokio::pin!(stopped);
    loop {
        let f = tokio::select! {
            _ = &mut stopped => return,
            f = r.recv() => f,
        };
        let frame = match f {
            Ok(Some(f)) => f,
            Ok(None) => {
                sh.errors
                    .add("closed", "a receiver's connection was closed");
                return;
            }
            Err(e) => {
                sh.errors.add("read", &e.to_string());
                return;
            }
        };
        match frame.body {
            Some(Body::Message(m)) => {
                let now = now_ns();
                match parse_payload(&m.payload) {
                    Some((nonce, sent, _)) if nonce == sh.nonce => {
                        sh.received.fetch_add(1, Relaxed);
                        let (ms, me) = (sh.meas_start.load(Relaxed), sh.meas_end.load(Relaxed));
                        let recv_in = now >= ms && now < me;
                        if recv_in {
                            sh.received_in_window.fetch_add(1, Relaxed);
                        }
                        // Open loop: every message sent in the window counts, however late it
                        // arrives; closed loop: those that arrive in the window.
                        let record = if sh.closed_loop {
                            recv_in
                        } else {
                            sent >= ms && sent < me
                        };
                        if record {
                            sh.hist.record_ns(idx, now.saturating_sub(sent));
                        }
                        if let Some(tx) = &refill
                            && now < sh.send_deadline.load(Relaxed)
                        {
                            let _ = tx.send(Cmd::Msg);
                        }
                    }
                    _ => {
                        sh.stale.fetch_add(1, Relaxed);
                    }
                }
            }
            Some(Body::Awareness(a)) if a.status == v1::Status::Typing as i32 => {
                sh.typing_received.fetch_add(1, Relaxed);
            }
            Some(Body::Error(e)) => sh.errors.server_error(&e),
            _ => {}
        }
    }
}

/// Connects `users` in order, those for which `on_other(index)` holds to `other`'s node.
async fn connect_split(
    ctx: &Ctx,
    other: &Ctx,
    users: &[String],
    offset: usize,
    on_other: impl Fn(usize) -> bool,
) -> anyhow::Result<(Vec<(Writer, Reader)>, f64)> {
    let (mine, theirs): (Vec<usize>, Vec<usize>) = (0..users.len()).partition(|&i| !on_other(i));
    let pick = |idx: &[usize]| idx.iter().map(|&i| users[i].clone()).collect::<Vec<_>>();
    let (a, ta) = ctx.connect_many(&pick(&mine), offset).await?;
    let (b, tb) = other
        .connect_many(&pick(&theirs), offset + mine.len())
        .await?;
    let mut slots: Vec<Option<(Writer, Reader)>> = (0..users.len()).map(|_| None).collect();
    for (i, c) in mine.into_iter().zip(a).chain(theirs.into_iter().zip(b)) {
        slots[i] = Some(c);
    }
    let conns = slots.into_iter().flatten().collect();
    Ok((conns, ta + tb))
}

/// The second node's CPU and Redis's counters at the start of the measured window.
struct Extra {
    node2_cpu: Option<f64>,
    redis: Option<super::redis_stats::Snapshot>,
}

type Snapshots = Option<(super::redis_stats::Snapshot, super::redis_stats::Snapshot)>;

impl Extra {
    async fn start(a: &ChatArgs) -> Extra {
        let redis = match &a.redis {
            Some(url) => super::redis_stats::snapshot(url).await.ok(),
            None => None,
        };
        Extra {
            node2_cpu: super::stats::proc_cpu_s(a.recipients_pid),
            redis,
        }
    }

    async fn stop(self, a: &ChatArgs) -> (Option<f64>, Snapshots) {
        let cpu = self
            .node2_cpu
            .zip(super::stats::proc_cpu_s(a.recipients_pid))
            .map(|(x, y)| y - x);
        let redis = match (&a.redis, self.redis) {
            (Some(url), Some(before)) => super::redis_stats::snapshot(url)
                .await
                .ok()
                .map(|after| (before, after)),
            _ => None,
        };
        (cpu, redis)
    }
}

pub async fn run(ctx: &Ctx, a: ChatArgs) -> anyhow::Result<()> {
    let n = a.pairs.max(1);
    let closed = a.rate <= 0.0;
    let window = a.window.max(1);
    let send_users: Vec<String> = (0..n).map(|i| format!("u{}", 2 * i)).collect();
    let recv_users: Vec<String> = (0..n).map(|i| format!("u{}", 2 * i + 1)).collect();
    let ((senders, t_s), (receivers, t_r)) = match &a.recipients_url {
        Some(url) => {
            let other = ctx.with_url(url).await?;
            if a.spread {
                (
                    connect_split(ctx, &other, &send_users, 0, |i| i % 2 == 1).await?,
                    connect_split(ctx, &other, &recv_users, n, |i| (i / 2) % 2 == 1).await?,
                )
            } else {
                (
                    ctx.connect_many(&send_users, 0).await?,
                    other.connect_many(&recv_users, n).await?,
                )
            }
        }
        None => (
            ctx.connect_many(&send_users, 0).await?,
            ctx.connect_many(&recv_users, n).await?,
        ),
    };
    // Let the ONLINE fan-outs and login traffic settle.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let sh = Arc::new(Shared::new(ctx.nonce, ctx.common.size, closed));
    let t0 = now_ns();
    let warm_ns = (a.warmup * 1e9) as u64;
    let dur_ns = (a.duration * 1e9) as u64;
    sh.meas_start.store(t0 + warm_ns, Relaxed);
    sh.meas_end.store(t0 + warm_ns + dur_ns, Relaxed);
    sh.send_deadline.store(t0 + warm_ns + dur_ns, Relaxed);
    let pairs = Pairs::start(sh.clone(), senders, receivers, recv_users);

    let pb = ctx.progress((a.warmup + a.duration).ceil() as u64, "chat s");
    let start = Instant::now();
    let total = Duration::from_secs_f64(a.warmup + a.duration);
    let warm = Duration::from_secs_f64(a.warmup);
    let mut meter = None;
    let mut extra = None;
    let mut sent_at_start = 0;
    let mut sent_in_window = None;
    if closed {
        for tx in &pairs.txs {
            for _ in 0..window {
                let _ = tx.send(Cmd::Msg);
            }
        }
        tokio::time::sleep(warm).await;
        meter = Some(Meter::start(ctx.pid));
        extra = Some(Extra::start(&a).await);
        while start.elapsed() < total {
            tokio::time::sleep(Duration::from_millis(250).min(total - start.elapsed())).await;
            pb.set_position(start.elapsed().as_secs());
        }
    } else {
        let mut iv = tokio::time::interval(Duration::from_millis(5));
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut issued = 0u64;
        let mut idx = 0usize;
        loop {
            iv.tick().await;
            let el = start.elapsed();
            if el >= total {
                break;
            }
            if meter.is_none() && el >= warm {
                meter = Some(Meter::start(ctx.pid));
                extra = Some(Extra::start(&a).await);
                sent_at_start = issued;
            }
            let due = (a.rate * el.as_secs_f64()) as u64;
            while issued < due {
                let _ = pairs.txs[idx].send(Cmd::Msg);
                idx = (idx + 1) % n;
                issued += 1;
            }
            pb.set_position(el.as_secs());
        }
        sent_in_window = Some(issued - sent_at_start);
    }
    let m = meter.unwrap_or_else(|| Meter::start(ctx.pid)).stop();
    let extra = match extra {
        Some(e) => Some(e.stop(&a).await),
        None => None,
    };
    pb.finish_and_clear();
    let rss = ctx.server_rss_kb();
    pairs.drain(Duration::from_secs_f64(a.drain)).await;
    // Late duplicates or stragglers have a moment to show up in the counters.
    let sent = sh.sent.load(Relaxed);
    let received = sh.received.load(Relaxed);
    let in_window = sh.received_in_window.load(Relaxed);
    let lost = sent.saturating_sub(received);
    let rec = json!({
        "scenario": "chat",
        "pairs": n,
        "mode": if closed { "closed" } else { "open" },
        "rate_target": if closed { json!(null) } else { json!(a.rate) },
        "window": if closed { json!(window) } else { json!(null) },
        "size_b": ctx.common.size,
        "duration_s": a.duration,
        "warmup_s": a.warmup,
        "login_s": round(t_s + t_r, 2),
        "logins_per_s": round(2.0 * n as f64 / (t_s + t_r), 1),
        "received_measured": in_window,
        "sent_measured": sent_in_window,
        "throughput_msg_s": round(in_window as f64 / a.duration, 1),
        "sent_total": sent,
        "received_total": received,
        "undelivered_at_end": lost,
        "acks": sh.acks.load(Relaxed),
        "errors": sh.errors.total(),
        "error_kinds": sh.errors.json(),
        "first_error": sh.errors.first(),
        "stale_from_earlier_runs": sh.stale.load(Relaxed),
        "server_rss_mb": mb(rss),
        "wall_s": round(m.wall, 3),
        "server_cpu_s": m.server_cpu_json(),
        "client_cpu_s": round(m.client_cpu, 2),
        "server_cpu_us_per_msg": m.server_cpu.filter(|_| in_window > 0)
            .map(|c| round(c / in_window as f64 * 1e6, 1)),
        "client_cpu_us_per_msg": (in_window > 0).then(|| round(m.client_cpu / in_window as f64 * 1e6, 1)),
        "latency": sh.hist.summary(),
    });
    let mut rec = rec;
    if let Some((node2_cpu, redis)) = extra {
        let both = m.server_cpu.zip(node2_cpu).map(|(a, b)| a + b);
        rec["recipients_node"] = json!(a.recipients_url);
        rec["spread"] = json!(a.spread);
        rec["recipients_cpu_s"] = json!(node2_cpu.map(|c| round(c, 2)));
        rec["nodes_cpu_us_per_msg"] = json!(
            both.filter(|_| in_window > 0)
                .map(|c| round(c / in_window as f64 * 1e6, 1))
        );
        if let (Some((b, a2)), true) = (redis, in_window > 0) {
            rec["redis"] = super::redis_stats::per_message(&b, &a2, in_window);
        }
    }
    pairs.stop().await;
    ctx.emit(rec)?;
    Ok(())
}
