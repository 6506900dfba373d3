//! Abuse limits with the real binary: frame rate (RATE_LIMITED, then 1008 for flooding),
//! connections per user and in total (429/503 before the upgrade), slow readers (bounded memory,
//! closed, nothing lost), HTTP body size (JSON 413) and request timeouts (JSON 503), the open-files limit raised at start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bimip_client::{Client, ClientError, ConnectOptions};
use bimip_proto::{Body, v1::ErrorCode};
use common::*;
use futures_util::{StreamExt, stream};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Reads until the connection ends; the close frame, if it arrived (a server closing on a
/// client that is still sending may reset the connection before the client reads it).
#[tokio::test]
async fn frames_over_the_rate_get_rate_limited_and_a_flood_closes_with_1008() {
    let s = Server::start(&[
        "--max-frames-per-second",
        "20",
        "--frames-burst",
        "20",
        "--flood-refusals",
        "50",
    ]);
    let (mut c, _) = s.online("alice", "phone").await;
    let mut refs = Vec::new();
    for _ in 0..30 {
        refs.push(c.ping().await.unwrap());
    }
    let (mut pongs, mut limited) = (Vec::new(), Vec::new());
    while pongs.len() + limited.len() < refs.len() {
        let f = next(&mut c).await;
        match f.body {
            Some(Body::Pong(_)) => pongs.push(f.r#ref),
            Some(Body::Error(e)) => {
                assert_eq!(e.code, ErrorCode::RateLimited as i32, "{e:?}");
                limited.push(f.r#ref);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pongs.len() >= 20, "the burst is served: {pongs:?}");
    assert!(limited.len() >= 8, "the rest is refused: {limited:?}");
    let mut all: Vec<u64> = pongs.iter().chain(&limited).copied().collect();
    all.sort();
    assert_eq!(all, refs, "every frame answered once, with its own ref");
    // After a pause the bucket refills and frames are served again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = c.ping().await.unwrap();
    let f = next(&mut c).await;
    assert_eq!(f.r#ref, r);
    assert!(matches!(f.body, Some(Body::Pong(_))), "{f:?}");
    // A sustained flood closes the connection.
    for _ in 0..200 {
        if c.ping().await.is_err() {
            break;
        }
    }
    if let Some(close) = wait_closed(&mut c).await {
        assert_eq!(close.code, 1008, "{close:?}");
        assert_eq!(close.reason, "rate limit");
    }
    assert!(metric(&s, "bimip_frames_rate_limited_total").await >= 50.0);
    assert_eq!(
        metric(&s, "bimip_disconnects_total{reason=\"rate_limit\"}").await,
        1.0
    );
}

async fn refused(s: &Server, user: &str, device: &str) -> (u16, serde_json::Value) {
    let opts = ConnectOptions::new(s.url()).token(token(user, Some(device)));
    match Client::connect(opts).await {
        Err(ClientError::Http { status, body }) => (status, serde_json::from_str(&body).unwrap()),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("{user}/{device} was accepted"),
    }
}

#[tokio::test]
async fn connections_per_user_and_in_total_are_refused_before_the_upgrade() {
    let s = Server::start(&["--max-connections-per-user", "2", "--max-connections", "3"]);
    let (a1, _) = s.connect("alice", "a1").await;
    let (_a2, _) = s.connect("alice", "a2").await;
    let (status, body) = refused(&s, "alice", "a3").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    let (_b1, _) = s.connect("bob", "b1").await;
    let (status, body) = refused(&s, "carol", "c1").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    assert_eq!(
        metric(&s, "bimip_connections_refused_total{reason=\"user_limit\"}").await,
        1.0
    );
    assert_eq!(
        metric(
            &s,
            "bimip_connections_refused_total{reason=\"server_limit\"}"
        )
        .await,
        1.0
    );
    // A connection that goes away gives its slot back.
    a1.close().await.unwrap();
    let mut ok = None;
    for _ in 0..100 {
        match Client::connect(ConnectOptions::new(s.url()).token(token("alice", Some("a3")))).await
        {
            Ok(c) => {
                ok = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(
        ok.is_some(),
        "alice may connect again after one of hers left"
    );
}

/// A WebSocket client that connects (small receive buffer) and then never reads.
async fn stalled(
    s: &Server,
    user: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(s.addr).await.unwrap();
    let mut req = s.url().into_client_request().unwrap();
    let h = req.headers_mut();
    h.insert(
        "authorization",
        format!("Bearer {}", token(user, Some("stalled")))
            .parse()
            .unwrap(),
    );
    h.insert("sec-websocket-protocol", "bimip.v1".parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    ws
}

#[tokio::test]
async fn a_thousand_stalled_readers_are_closed_memory_stays_bounded_and_nothing_is_lost() {
    let n: usize = std::env::var("BIMIP_TEST_STALLED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bimip.toml");
    // A small queue cache, so the server's memory is about connections, not cached queues.
    std::fs::write(&cfg, "[store]\ncache_users = 64\n").unwrap();
    let data = tmp.path().join("data");
    let s = Server::start_in(
        &data,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--fsync",
            "never",
            "--outbox-frames",
            "64",
            "--outbox-bytes",
            "65536",
            "--write-timeout-ms",
            "2000",
            "--heartbeat-ms",
            "600000",
            "--socket-send-buffer",
            "65536",
        ],
    );
    let pid = s.pid();
    let rss_start = rss_kb(pid);
    let users: Vec<String> = (0..n).map(|i| format!("reader{i}")).collect();
    let mut readers = Vec::with_capacity(n);
    let connected: Vec<_> = stream::iter(users.iter())
        .map(|u| stalled(&s, u))
        .buffer_unordered(32)
        .collect()
        .await;
    readers.extend(connected);
    eventually("all readers registered", T, || async {
        metric(&s, "bimip_connections ").await >= n as f64
    })
    .await;
    let rss_connected = rss_kb(pid);

    // Flood every reader with 16 KiB messages from one sender over the HTTP API until the server
    // has closed them all.
    let payload = "x".repeat(16 * 1024);
    let client = http();
    let mut sent = 0usize;
    let mut rss_peak = rss_connected;
    let mut rounds = 0;
    while metric(&s, "bimip_connections ").await > 0.0 && rounds < 60 {
        let ok: usize = stream::iter(users.iter())
            .map(|u| {
                let req = client
                    .post(s.http("/v1/messages"))
                    .bearer_auth(API_KEY)
                    .json(&serde_json::json!({"to": u, "text": payload}))
                    .send();
                async move { usize::from(req.await.is_ok_and(|r| r.status() == 200)) }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .sum();
        assert_eq!(ok, n, "every send is stored, connected reader or not");
        sent += 1;
        rounds += 1;
        rss_peak = rss_peak.max(rss_kb(pid));
        if std::env::var("BIMIP_TEST_VERBOSE").is_ok() {
            eprintln!(
                "round {rounds}: connections {} slow {} delivered {} rss {} kB",
                metric(&s, "bimip_connections ").await,
                metric(&s, "bimip_slow_consumers_total").await,
                metric(&s, "bimip_messages_delivered_total").await,
                rss_kb(pid)
            );
            let ss = std::process::Command::new("ss")
                .args([
                    "-tnH",
                    "state",
                    "established",
                    &format!("( sport = :{} )", s.addr.port()),
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            eprintln!("{}", ss.lines().take(3).collect::<Vec<_>>().join("\n"));
        }
    }
    eventually(
        "every stalled reader closed",
        Duration::from_secs(30),
        || async { metric(&s, "bimip_connections ").await == 0.0 },
    )
    .await;
    let slow = metric(&s, "bimip_disconnects_total{reason=\"slow\"}").await;
    let timed_out = metric(&s, "bimip_disconnects_total{reason=\"write_timeout\"}").await;
    let rss_end = rss_kb(pid);
    eprintln!(
        "stalled readers: {n}, rounds {rounds} ({} messages of 16 KiB), closed slow {slow}, \
         write timeouts {timed_out}; server RSS: start {rss_start} kB, {n} connected \
         {rss_connected} kB, peak during flood {rss_peak} kB, after {rss_end} kB",
        rounds * n
    );
    // Closed as slow (outbox full) or, when the flood trickles in slower than the write
    // timeout, for a socket write stuck past it: either way the server let go of them.
    assert!(
        slow + timed_out >= n as f64,
        "every reader was closed (slow {slow}, write timeouts {timed_out})"
    );
    // Bounded: the outbox (64 KiB) and write buffer (32 KiB) per connection, not the 16 KiB x
    // rounds sent to each.
    let growth_mb = (rss_peak.saturating_sub(rss_connected)) / 1024;
    assert!(
        growth_mb < 400,
        "server memory grew by {growth_mb} MB while flooding stalled readers"
    );
    drop(readers);

    // Nothing was lost: a reader that comes back finds every message in its queue.
    let (mut c, _fanout) = s.online("reader7", "stalled").await;
    let (messages, _) = resume_all(&mut c, "system", 0, 1000).await;
    assert_eq!(messages.len(), sent);
    assert!(messages.iter().all(|m| m.payload.len() == payload.len()));
}

#[tokio::test]
async fn a_too_large_body_gets_a_json_413_and_a_stalled_request_a_json_503() {
    let s = Server::start(&["--max-http-body-bytes", "1024", "--http-timeout-ms", "500"]);
    let big = "y".repeat(4096);
    let r = http()
        .post(s.http("/v1/messages"))
        .bearer_auth(API_KEY)
        .json(&serde_json::json!({"to": "bob", "text": big}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let body: serde_json::Value = r.json().await.expect("a JSON body");
    assert_eq!(body["error"]["code"], "too_large", "{body}");
    // A request whose body never arrives is answered when the timeout passes.
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"to\":",
        s.addr
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let n = tcp.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if String::from_utf8_lossy(&buf).contains("}}") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to a stalled request");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("\"code\":\"unavailable\""), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(metric(&s, "bimip_http_timeouts_total").await >= 1.0);
}

/// Started with a low soft open-files limit, the server raises it to the hard limit and keeps its
/// store handle cache to a quarter of it (and says so), then serves as usual.
#[tokio::test]
async fn open_files_limit_is_raised_and_store_handles_fit_in_it() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -S -n 512 && ulimit -H -n 4000 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_bimip"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log", "info"])
        .args(["--jwt-secret", SECRET, "--api-key", API_KEY, "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stdout = child.stdout.take().unwrap();
    let mut out = BufReader::new(stdout).lines();
    let listening = out.next().unwrap().unwrap();
    assert!(listening.starts_with("bimip listening on"), "{listening}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect::<Vec<_>>();
    assert_eq!(open_files, ["4000", "4000"], "{limits}");
    let mut logged = String::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        logged.push_str(&line);
        logged.push('\n');
        if line.contains("listening") || line.contains("store opened") {
            break;
        }
    }
    assert!(
        logged.contains("store.max_open_files lowered") && logged.contains("used=1000"),
        "{logged}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
