//! `bench idle`: N authenticated connections (users idle0, idle1, …) opened with bounded
//! parallelism; logins/s, server RSS before and after a settle time, RSS per connection. Each
//! connection keeps a reader (which also answers the server's heartbeat pings) until it is closed.
//!
//! The load generator needs an open-files limit above N (`ulimit -n`); past ~12k connections it
//! spreads them over several 127.0.0.X source addresses (see `--source-addrs`).

use super::stats::{mb, round, self_rss_kb};
use super::{Ctx, Meter, close_all};
use clap::Args;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;
use tokio::sync::watch;

#[derive(Args, Debug)]
pub struct IdleArgs {
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Seconds to wait after the last login before measuring RSS.
    #[arg(long, default_value_t = 5.0)]
    settle: f64,
    /// Seconds to keep the connections open after the measurement.
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// User name prefix.
    #[arg(long, default_value = "idle")]
    prefix: String,
}

pub async fn run(ctx: &Ctx, a: IdleArgs) -> anyhow::Result<()> {
    let users: Vec<String> = (0..a.conns).map(|i| format!("{}{i}", a.prefix)).collect();
    let rss0 = ctx.server_rss_kb();
    let meter = Meter::start(ctx.pid);
    let (conns, took) = ctx.connect_many(&users, 0).await?;
    let m = meter.stop();
    let alive = Arc::new(AtomicUsize::new(conns.len()));
    let (stop, stop_rx) = watch::channel(false);
    let mut writers = Vec::with_capacity(conns.len());
    let mut tasks = Vec::with_capacity(conns.len());
    for (w, mut r) in conns {
        writers.push(w);
        let (alive, mut stop_rx) = (alive.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            let stopped = stop_rx.changed();
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    f = r.recv() => if !matches!(f, Ok(Some(_))) {
                        alive.fetch_sub(1, Relaxed);
                        return;
                    }
                }
            }
        }));
    }
    let sp = ctx.spinner("settling");
    tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
    sp.finish_and_clear();
    let rss1 = ctx.server_rss_kb();
    let n_alive = alive.load(Relaxed);
    let per_conn_kb = match (rss0, rss1) {
        (Some(b), Some(e)) if a.conns > 0 => Some(round((e as f64 - b as f64) / a.conns as f64, 1)),
        _ => None,
    };
    let rec = json!({
        "scenario": "idle",
        "conns": a.conns,
        "alive": n_alive,
        "login_s": round(took, 2),
        "logins_per_s": round(a.conns as f64 / took.max(1e-9), 1),
        "login_server_cpu_s": m.server_cpu_json(),
        "login_client_cpu_s": round(m.client_cpu, 2),
        "login_server_cpu_us_per_login": m.server_cpu.map(|c| round(c / a.conns.max(1) as f64 * 1e6, 1)),
        "rss_before_mb": mb(rss0),
        "rss_after_mb": mb(rss1),
        "rss_per_conn_kb": per_conn_kb,
        "client_rss_mb": mb(self_rss_kb()),
        "source_addrs": ctx.target.sources.len().max(1),
        "concurrency": ctx.common.concurrency,
    });
    ctx.emit(rec)?;
    if a.hold > 0.0 {
        let sp = ctx.spinner("holding");
        tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
        sp.finish_and_clear();
    }
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
    close_all(writers).await;
    Ok(())
}
