//! `bench offline`: `off_s` sends M chat messages to the offline `off_r`, pipelined (a bounded
//! number in flight); the last Ack marks "all stored" (durable under the server's fsync mode).
//! Then `off_r` connects, reads the ONLINE fan-out (its Summary), sends RESUME and reads Batches
//! until `more=false`. Finally it acknowledges what it read (a DELIVERED receipt), so the next run
//! starts from an empty queue.

use super::conn::Reader;
use super::stats::{Errors, mb, now_ns, round};
use super::{Ctx, Meter, parse_payload, payload};
use anyhow::{anyhow, bail};
use bimip_proto::{Body, v1};
use clap::Args;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

#[derive(Args, Debug)]
pub struct OfflineArgs {
    /// Messages to queue.
    #[arg(long, default_value_t = 1000)]
    messages: u64,
    /// Messages in flight (sent, not yet acknowledged).
    #[arg(long, default_value_t = 256)]
    inflight: usize,
    /// RESUME batch size.
    #[arg(long, default_value_t = 1000)]
    limit: u32,
    /// Seconds allowed for each phase.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
}

const SENDER: &str = "off_s";
const RECEIVER: &str = "off_r";

/// RESUMEs from `SENDER` and reads every Batch until `more=false`. Returns (messages of this run,
/// stale ones, last offset, time of the first message of this run).
async fn resume_all(
    ctx: &Ctx,
    w: &mut super::conn::Writer,
    r: &mut Reader,
    limit: u32,
    timeout: Duration,
) -> anyhow::Result<(u64, u64, u64, Option<Instant>)> {
    let rf = w
        .send(Body::Awareness(v1::Awareness {
            to: SENDER.into(),
            status: v1::Status::Resume as i32,
            limit,
            ..Default::default()
        }))
        .await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let (mut got, mut stale, mut last, mut first) = (0u64, 0u64, 0u64, None);
    loop {
        let f = tokio::time::timeout_at(deadline, r.recv())
            .await
            .map_err(|_| anyhow!("RESUME: no final batch within {timeout:?}"))??;
        let Some(f) = f else {
            bail!("RESUME: the connection was closed");
        };
        match f.body {
            Some(Body::Batch(b)) if f.r#ref == rf => {
                for m in &b.messages {
                    last = last.max(m.offset);
                    match parse_payload(&m.payload) {
                        Some((n, _, _)) if n == ctx.nonce => {
                            if first.is_none() {
                                first = Some(Instant::now());
                            }
                            got += 1;
                        }
                        _ => stale += 1,
                    }
                }
                if !b.more {
                    return Ok((got, stale, last, first));
                }
            }
            Some(Body::Error(e)) if f.r#ref == rf => {
                bail!("RESUME refused: {} ({})", e.message, e.code)
            }
            _ => {}
        }
    }
}

async fn ack_up_to(w: &mut super::conn::Writer, offset: u64) -> anyhow::Result<()> {
    if offset > 0 {
        w.send(Body::Receipt(v1::Receipt {
            to: SENDER.into(),
            kind: v1::ReceiptKind::Delivered as i32,
            up_to_offset: offset,
            partition: v1::Partition::Chat as i32,
            ..Default::default()
        }))
        .await?;
    }
    Ok(())
}

pub async fn run(ctx: &Ctx, a: OfflineArgs) -> anyhow::Result<()> {
    let m_total = a.messages.max(1);
    let timeout = Duration::from_secs_f64(a.timeout);
    // Clean slate: whatever an earlier run left in off_r's queue is read and acknowledged now.
    {
        let (mut w, mut r, _) = ctx.target.connect(RECEIVER, "bench", 0).await?;
        let s = r.read_fanout(timeout).await?;
        let pending: u64 = s
            .senders
            .iter()
            .filter(|x| x.from == SENDER)
            .map(|x| x.unread)
            .sum();
        if pending > 0 {
            let (_, _, last, _) = resume_all(ctx, &mut w, &mut r, a.limit, timeout).await?;
            ack_up_to(&mut w, last).await?;
            // The receipt is applied before the connection's later frames; a ping round trip
            // makes sure it was.
            let rf = w
                .send(Body::Ping(v1::Ping {
                    timestamp: bimip_proto::now_ms(),
                }))
                .await?;
            while let Some(f) = r.recv_timeout(timeout).await? {
                if f.r#ref == rf && matches!(f.body, Some(Body::Pong(_))) {
                    break;
                }
            }
        }
        w.close().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Store phase.
    let (mut sw, mut sr, _) = ctx.target.connect(SENDER, "bench", 1).await?;
    let _ = sr.read_fanout(timeout).await;
    let errors = Arc::new(Errors::default());
    let permits = Arc::new(Semaphore::new(a.inflight.max(1)));
    let pb = ctx.progress(m_total, "stored");
    let meter = Meter::start(ctx.pid);
    let t_store0 = Instant::now();
    let acker = {
        let (permits, errors, pb) = (permits.clone(), errors.clone(), pb.clone());
        tokio::spawn(async move {
            let mut done = 0u64;
            while done < m_total {
                match sr.recv_timeout(timeout).await {
                    Ok(Some(f)) => match f.body {
                        Some(Body::Ack(_)) => {
                            done += 1;
                            permits.add_permits(1);
                            pb.inc(1);
                        }
                        Some(Body::Error(e)) => {
                            errors.server_error(&e);
                            done += 1;
                            permits.add_permits(1);
                        }
                        _ => {}
                    },
                    Ok(None) => {
                        errors.add("closed", "no Ack (closed or timed out)");
                        break;
                    }
                    Err(e) => {
                        errors.add("read", &e.to_string());
                        break;
                    }
                }
            }
            (done, Instant::now(), sr)
        })
    };
    for i in 0..m_total {
        permits.acquire().await?.forget();
        sw.feed(Body::Message(v1::Message {
            id: format!("{:x}-o{i}", ctx.nonce),
            to: RECEIVER.into(),
            partition: v1::Partition::Chat as i32,
            payload: payload(ctx.nonce, now_ns(), i, ctx.common.size),
            ..Default::default()
        }))
        .await?;
        if permits.available_permits() == 0 || i + 1 == m_total {
            sw.flush().await?;
        }
    }
    let (acked, t_last_ack, _sr) = acker.await?;
    let store = meter.stop();
    pb.finish_and_clear();
    let store_s = t_last_ack.duration_since(t_store0).as_secs_f64();
    let rss_with_queue = ctx.server_rss_kb();
    sw.close().await;

    // Delivery phase.
    let meter = Meter::start(ctx.pid);
    let t0 = Instant::now();
    let (mut rw, mut rr, _) = ctx.target.connect(RECEIVER, "bench", 2).await?;
    let t_login = Instant::now();
    let summary = rr.read_fanout(timeout).await?;
    let t_summary = Instant::now();
    let unread: u64 = summary
        .senders
        .iter()
        .filter(|x| x.from == SENDER)
        .map(|x| x.unread)
        .sum();
    let (got, stale, last, first) = resume_all(ctx, &mut rw, &mut rr, a.limit, timeout).await?;
    let t_all = Instant::now();
    let del = meter.stop();
    ack_up_to(&mut rw, last).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    rw.close().await;

    let after_login = t_all.duration_since(t_login).as_secs_f64();
    let rec = json!({
        "scenario": "offline",
        "messages": m_total,
        "size_b": ctx.common.size,
        "inflight": a.inflight,
        "store_s": round(store_s, 3),
        "store_msg_s": round(acked as f64 / store_s.max(1e-9), 1),
        "store_server_cpu_s": store.server_cpu_json(),
        "store_client_cpu_s": round(store.client_cpu, 2),
        "acked": acked,
        "store_errors": errors.total(),
        "error_kinds": errors.json(),
        "first_error": errors.first(),
        "summary_unread": unread,
        "received": got,
        "stale_from_earlier_runs": stale,
        "login_s": round(t_login.duration_since(t0).as_secs_f64(), 4),
        "summary_after_login_ms": round(t_summary.duration_since(t_login).as_secs_f64() * 1e3, 1),
        "first_msg_after_presence_ms": first.map(|f| round(f.duration_since(t_login).as_secs_f64() * 1e3, 1)),
        "all_after_presence_s": round(after_login, 3),
        "all_from_connect_s": round(t_all.duration_since(t0).as_secs_f64(), 3),
        "deliver_msg_s": round(got as f64 / after_login.max(1e-9), 1),
        "deliver_server_cpu_s": del.server_cpu_json(),
        "server_rss_mb_with_queue": mb(rss_with_queue),
    });
    ctx.emit(rec)?;
    if got < m_total {
        bail!("only {got} of {m_total} queued messages were delivered");
    }
    Ok(())
}
