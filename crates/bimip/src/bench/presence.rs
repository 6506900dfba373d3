//! `bench presence`: hub `hub_K` and its K contacts `c0..c{K-1}` (set up over the HTTP API,
//! mutual) are online. The hub changes its intent `--iterations` times
//! (`Awareness{status: AWAY | BUSY alternately, details: "<nonce>-<i>"}`); every contact must
//! receive `Awareness{from: hub_K, status, details}`. Per iteration: time until all K received it;
//! per recipient: latency.

use super::conn::Reader;
use super::stats::{LatHist, now_ns, round};
use super::{Ctx, close_all};
use anyhow::bail;
use bimip_proto::{Body, v1};
use clap::Args;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};

#[derive(Args, Debug)]
pub struct PresenceArgs {
    /// Contacts (watchers) of the hub.
    #[arg(long, default_value_t = 100)]
    pub contacts: usize,
    /// Intent changes.
    #[arg(long, default_value_t = 10)]
    iterations: usize,
    /// Seconds to wait for all K per iteration.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Pause between iterations, seconds.
    #[arg(long, default_value_t = 0.3)]
    pause: f64,
}

struct Shared {
    hub: String,
    prefix: String,
    k: usize,
    t0: Vec<AtomicU64>,
    count: Vec<AtomicUsize>,
    last: Vec<AtomicU64>,
    wrong_status: AtomicU64,
    hist: LatHist,
    done: Notify,
}

fn status_of(i: usize) -> v1::Status {
    if i.is_multiple_of(2) {
        v1::Status::Away
    } else {
        v1::Status::Busy
    }
}

async fn watcher(sh: Arc<Shared>, idx: usize, mut r: Reader, mut stop: watch::Receiver<bool>) {
    let stopped = stop.changed();
    tokio::pin!(stopped);
    loop {
        let f = tokio::select! {
            _ = &mut stopped => return,
            f = r.recv() => f,
        };
        let Ok(Some(f)) = f else { return };
        let Some(Body::Awareness(a)) = f.body else {
            continue;
        };
        if a.from != sh.hub {
            continue;
        }
        let Some(i) = a
            .details
            .strip_prefix(&sh.prefix)
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if i >= sh.t0.len() {
            continue;
        }
        let now = now_ns();
        sh.hist
            .record_ns(idx, now.saturating_sub(sh.t0[i].load(Relaxed)));
        if a.status != status_of(i) as i32 {
            sh.wrong_status.fetch_add(1, Relaxed);
        }
        if sh.count[i].fetch_add(1, Relaxed) + 1 == sh.k {
            sh.last[i].store(now, Relaxed);
            sh.done.notify_one();
        }
    }
}

pub async fn run(ctx: &Ctx, a: PresenceArgs) -> anyhow::Result<()> {
    let k = a.contacts.max(1);
    let iters = a.iterations.max(1);
    let hub = format!("hub_{k}");
    let users: Vec<String> = (0..k).map(|i| format!("c{i}")).collect();
    let contacts_setup = ctx.set_contacts(&hub, &users).await;
    if let Err(e) = &contacts_setup {
        eprintln!("warning: {e}");
    }
    let (watchers, t_c) = ctx.connect_many(&users, 0).await?;
    let sh = Arc::new(Shared {
        hub: hub.clone(),
        prefix: format!("{:x}-", ctx.nonce),
        k,
        t0: (0..iters).map(|_| AtomicU64::new(0)).collect(),
        count: (0..iters).map(|_| AtomicUsize::new(0)).collect(),
        last: (0..iters).map(|_| AtomicU64::new(0)).collect(),
        wrong_status: AtomicU64::new(0),
        hist: LatHist::new(16),
        done: Notify::new(),
    });
    let (stop, stop_rx) = watch::channel(false);
    let mut writers = Vec::with_capacity(k + 1);
    let mut tasks = Vec::with_capacity(k + 1);
    for (i, (w, r)) in watchers.into_iter().enumerate() {
        writers.push(w);
        tasks.push(tokio::spawn(watcher(sh.clone(), i, r, stop_rx.clone())));
    }
    let (mut hw, mut hr, _) = ctx.target.connect(&hub, "bench", k).await?;
    let _ = hr.read_fanout(Duration::from_secs(30)).await;
    // The hub's reader reports Errors (with their ref) to the driver.
    let (err_tx, mut err_rx) = mpsc::unbounded_channel::<(u64, v1::Error)>();
    {
        let mut stop_rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let stopped = stop_rx.changed();
            tokio::pin!(stopped);
            loop {
                let f = tokio::select! {
                    _ = &mut stopped => return,
                    f = hr.recv() => f,
                };
                match f {
                    Ok(Some(v1::Frame {
                        r#ref,
                        body: Some(Body::Error(e)),
                    })) => {
                        let _ = err_tx.send((r#ref, e));
                    }
                    Ok(Some(_)) => {}
                    _ => return,
                }
            }
        }));
    }
    // Let the ONLINE broadcasts of the logins settle.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let pb = ctx.progress(iters as u64, "changes");
    let mut totals: Vec<Option<f64>> = Vec::with_capacity(iters);
    let mut server_cpu = 0.0;
    let mut refused: Option<v1::Error> = None;
    for i in 0..iters {
        let s0 = ctx.server_cpu();
        sh.t0[i].store(now_ns(), Relaxed);
        let rf = hw
            .send(Body::Awareness(v1::Awareness {
                status: status_of(i) as i32,
                details: format!("{}{i}", sh.prefix),
                ..Default::default()
            }))
            .await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(a.timeout);
        let mut result = None;
        while sh.count[i].load(Relaxed) < k {
            tokio::select! {
                _ = sh.done.notified() => {}
                Some((r, e)) = err_rx.recv() => {
                    if r == rf {
                        refused = Some(e);
                        break;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if sh.count[i].load(Relaxed) >= k {
            let t0 = sh.t0[i].load(Relaxed);
            result = Some((sh.last[i].load(Relaxed).saturating_sub(t0)) as f64 / 1e6);
        }
        if let (Some(a), Some(b)) = (s0, ctx.server_cpu()) {
            server_cpu += b - a;
        }
        totals.push(result);
        pb.inc(1);
        if refused.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_secs_f64(a.pause)).await;
    }
    pb.finish_and_clear();
    let mut ok: Vec<f64> = totals.iter().flatten().copied().collect();
    ok.sort_by(f64::total_cmp);
    let median = if ok.is_empty() {
        None
    } else if ok.len() % 2 == 1 {
        Some(ok[ok.len() / 2])
    } else {
        Some((ok[ok.len() / 2 - 1] + ok[ok.len() / 2]) / 2.0)
    };
    let r2 = |v: Option<f64>| v.map(|x| round(x, 2));
    let mut rec = json!({
        "scenario": "presence",
        "contacts": k,
        "iterations": iters,
        "contacts_login_s": round(t_c, 2),
        "contacts_setup": match &contacts_setup { Ok(()) => "ok".to_string(), Err(e) => e.clone() },
        "all_received_ms": {
            "median": r2(median),
            "min": r2(ok.first().copied()),
            "max": r2(ok.last().copied()),
            "timeouts": totals.iter().filter(|t| t.is_none()).count(),
        },
        "per_recipient_latency": sh.hist.summary(),
        "wrong_status": sh.wrong_status.load(Relaxed),
        "server_cpu_s_total": round(server_cpu, 3),
    });
    if let Some(e) = &refused
        && let Value::Object(m) = &mut rec
    {
        let code = v1::ErrorCode::try_from(e.code)
            .map(|c| c.as_str_name().to_string())
            .unwrap_or_else(|_| e.code.to_string());
        m.insert(
            "error".into(),
            format!(
                "the server refused the intent change: {code}: {}",
                e.message
            )
            .into(),
        );
    }
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
    writers.push(hw);
    close_all(writers).await;
    ctx.emit(rec)?;
    if let Some(e) = refused {
        let code = v1::ErrorCode::try_from(e.code)
            .map(|c| c.as_str_name().to_string())
            .unwrap_or_else(|_| e.code.to_string());
        bail!(
            "the server answered {code} to an intent change (AWAY/BUSY): {}; this server version \
             does not support the presence scenario",
            e.message
        );
    }
    Ok(())
}
