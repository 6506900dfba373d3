//! How much CPU the fake FCM spends per request on loopback, and how many pushes per second go
//! through the FCM provider into it. Ignored by default (a measurement, not a check of
//! behaviour); run it in release mode:
//! `cargo test --release -p bimip-push --features fake --test fake_throughput -- --ignored --nocapture`
//!
//! The fake runs on its own thread (a current-thread runtime), so that thread's CPU time is
//! the fake's cost alone, whatever else the machine runs.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bimip_push::{Platform, Provider, fake::FakeFcm, fcm::Fcm, http::HttpOptions};
use tokio::sync::{mpsc, oneshot};

const TASKS: usize = 64;
const PER_TASK: usize = 1500;

/// CPU time (user + system) of the calling thread, from /proc (Linux, 10 ms ticks).
fn thread_cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // The fields after the command name (in parentheses, which may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

enum Ask {
    /// Reset the counters; answer with the fake thread's CPU time now.
    Mark(oneshot::Sender<Duration>),
    /// Answer with the request count and the fake thread's CPU time now.
    Read(oneshot::Sender<(u64, Duration)>),
}

/// Starts the fake on its own thread; returns its URL, credentials file and a control channel.
fn fake_on_its_own_thread(
    dir: std::path::PathBuf,
) -> (String, std::path::PathBuf, mpsc::UnboundedSender<Ask>) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (ask_tx, mut ask_rx) = mpsc::unbounded_channel::<Ask>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let fake = FakeFcm::start().await.unwrap();
            fake.set_detailed_recording(false);
            let credentials = fake.write_credentials(&dir).unwrap();
            ready_tx.send((fake.url(), credentials)).unwrap();
            while let Some(ask) = ask_rx.recv().await {
                match ask {
                    Ask::Mark(reply) => {
                        fake.clear_requests();
                        let _ = reply.send(thread_cpu_time());
                    }
                    Ask::Read(reply) => {
                        let _ = reply.send((fake.request_count(), thread_cpu_time()));
                    }
                }
            }
        });
    });
    let (url, credentials) = ready_rx.recv().unwrap();
    (url, credentials, ask_tx)
}

async fn mark(ask: &mpsc::UnboundedSender<Ask>) -> Duration {
    let (tx, rx) = oneshot::channel();
    ask.send(Ask::Mark(tx)).unwrap();
    rx.await.unwrap()
}

async fn report(what: &str, ask: &mpsc::UnboundedSender<Ask>, started: Instant, cpu0: Duration) {
    let (tx, rx) = oneshot::channel();
    ask.send(Ask::Read(tx)).unwrap();
    let (requests, cpu1) = rx.await.unwrap();
    let wall = started.elapsed().as_secs_f64();
    let cpu = (cpu1 - cpu0).as_secs_f64();
    eprintln!(
        "{what}: {requests} requests, {:.0}/s wall clock (client included, on a shared machine); \
         the fake used {:.1} µs of CPU per request = {:.0} requests/s per core",
        requests as f64 / wall,
        cpu * 1e6 / requests as f64,
        requests as f64 / cpu
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run in release mode"]
async fn fake_fcm_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let (url, credentials, ask) = fake_on_its_own_thread(dir.path().to_owned());
    let config = bimip_push::fcm::FcmConfig {
        credentials,
        endpoint: url.clone(),
    };
    let fcm = Arc::new(Fcm::new(&config, &HttpOptions::default()).unwrap());
    let msg = common::push(Platform::Fcm, "fcm-device-token-0001");
    assert_eq!(fcm.send(&msg).await.label(), "sent"); // token t1

    // 1. Raw HTTP/1.1 requests with a prebuilt body.
    let body = serde_json::json!({"message": {"token": "fcm-device-token-0001",
        "data": {"type": "chat", "sender": "alice", "message_id": "01JD5M", "offset": "1234",
                 "unread": "3", "count": "2"},
        "notification": {"title": "alice", "body": "New message"},
        "android": {"priority": "HIGH", "notification": {"tag": "c:alice", "channel_id": "chat"}}}})
    .to_string();
    let send_url = format!("{url}/v1/projects/{}/messages:send", FakeFcm::PROJECT_ID);
    let client = reqwest::Client::new();
    let cpu0 = mark(&ask).await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (client, url, body) = (client.clone(), send_url.clone(), body.clone());
            tokio::spawn(async move {
                for _ in 0..PER_TASK {
                    let r = client
                        .post(&url)
                        .bearer_auth("t1")
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    r.bytes().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    report("raw HTTP/1.1 requests", &ask, started, cpu0).await;

    // 1b. The same over h2c (one multiplexed connection).
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let cpu0 = mark(&ask).await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (client, url, body) = (client.clone(), send_url.clone(), body.clone());
            tokio::spawn(async move {
                for _ in 0..PER_TASK {
                    let r = client
                        .post(&url)
                        .bearer_auth("t1")
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    r.bytes().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    report("raw h2c requests", &ask, started, cpu0).await;

    // 2. Through the provider (JSON building, token cache, response mapping).
    let cpu0 = mark(&ask).await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (fcm, msg) = (fcm.clone(), msg.clone());
            tokio::spawn(async move {
                for _ in 0..PER_TASK {
                    assert_eq!(fcm.send(&msg).await.label(), "sent");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    report("pushes through the Fcm provider", &ask, started, cpu0).await;
}
