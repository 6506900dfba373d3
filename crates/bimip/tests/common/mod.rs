//! Test harness: starts the real `bimip` binary on a free loopback port with a temporary data
//! dir, and connects real WebSocket clients to it. Every server is killed on drop.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use bimip_client::{Client, ConnectOptions};
use bimip_proto::{
    Body, Codec,
    v1::{self, Frame},
};
use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

pub const SECRET: &str = "test-secret-0123456789abcdef";
pub const API_KEY: &str = "test-api-key";
pub const T: Duration = Duration::from_secs(10);

pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    extra: Vec<String>,
    /// Whether the harness adds its HS256 secret and API key.
    base: bool,
}

impl Server {
    /// A server with a fresh data dir and the default test settings plus `extra` flags.
    pub fn start(extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut s = Server::start_in(&dir, extra);
        s._tmp = Some(tmp);
        s
    }

    /// A server on an existing data dir (the caller keeps the dir alive).
    pub fn start_in(dir: &Path, extra: &[&str]) -> Server {
        Server::launch(dir, extra, true)
    }

    /// A server with exactly these flags (besides listen address and data dir): no test secret,
    /// no API key.
    pub fn start_raw(dir: &Path, args: &[&str]) -> Server {
        Server::launch(dir, args, false)
    }

    fn launch(dir: &Path, extra: &[&str], base: bool) -> Server {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (child, addr) =
            spawn(dir, &extra, base).unwrap_or_else(|e| panic!("server start: {e}"));
        Server {
            child: Some(child),
            addr,
            dir: dir.to_path_buf(),
            _tmp: None,
            extra,
            base,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops (SIGTERM) and starts again on the same data dir and port settings.
    pub fn restart(&mut self) {
        self.terminate();
        let (child, addr) = spawn(&self.dir, &self.extra, self.base)
            .unwrap_or_else(|e| panic!("server restart: {e}"));
        self.child = Some(child);
        self.addr = addr;
    }

    /// Starts again after a kill (the data dir is reused).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "server still running");
        let (child, addr) = spawn(&self.dir, &self.extra, self.base)
            .unwrap_or_else(|e| panic!("server restart: {e}"));
        self.child = Some(child);
        self.addr = addr;
    }

    pub async fn connect(&self, user: &str, device: &str) -> (Client, v1::Welcome) {
        self.connect_with(user, device, Codec::Binary).await
    }

    pub async fn connect_with(
        &self,
        user: &str,
        device: &str,
        codec: Codec,
    ) -> (Client, v1::Welcome) {
        let opts = ConnectOptions::new(self.url())
            .token(token(user, Some(device)))
            .codec(codec);
        Client::connect(opts).await.expect("connect")
    }

    /// Connects and reads the ONLINE fan-out (notification batch(es), summary, receipt batch).
    pub async fn online(&self, user: &str, device: &str) -> (Client, Fanout) {
        self.online_with(user, device, Codec::Binary).await
    }

    pub async fn online_with(&self, user: &str, device: &str, codec: Codec) -> (Client, Fanout) {
        let (mut c, _) = self.connect_with(user, device, codec).await;
        let f = read_fanout(&mut c).await;
        (c, f)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn spawn(dir: &Path, extra: &[String], base: bool) -> Result<(Child, SocketAddr), String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bimip"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--log", "warn"]);
    if base {
        cmd.args(["--jwt-secret", SECRET, "--api-key", API_KEY]);
    }
    cmd.arg("--data-dir")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("BIMIP_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut sent = false;
        // Keep draining stdout so the server never blocks on a full pipe.
        while let Some(Ok(line)) = lines.next() {
            if !sent && let Some(rest) = line.strip_prefix("bimip listening on http://") {
                let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                let _ = tx.send(addr);
                sent = true;
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => Ok((child, addr.parse().map_err(|e| format!("{addr}: {e}"))?)),
        Err(_) => {
            let _ = child.kill();
            let status = child.wait().map_err(|e| e.to_string())?;
            Err(format!("server did not start ({status})"))
        }
    }
}

pub fn token(user: &str, device: Option<&str>) -> String {
    bimip_client::token::mint_hs256(SECRET.as_bytes(), user, device, Duration::from_secs(3600))
        .expect("token")
}

/// What a device gets right after Welcome.
#[derive(Debug, Default)]
pub struct Fanout {
    pub notifications: Vec<v1::Message>,
    pub summary: v1::Summary,
    pub receipts: v1::Batch,
}

pub async fn read_fanout(c: &mut Client) -> Fanout {
    let mut f = Fanout::default();
    loop {
        match body(c).await {
            Body::Batch(b) if b.partition == v1::Partition::Notification as i32 => {
                let more = b.more;
                f.notifications.extend(b.messages);
                if !more {
                    break;
                }
            }
            other => panic!("expected the notification batch, got {other:?}"),
        }
    }
    match body(c).await {
        Body::Summary(s) => f.summary = s,
        other => panic!("expected the summary, got {other:?}"),
    }
    match body(c).await {
        Body::Batch(b) if b.partition == v1::Partition::Receipt as i32 => f.receipts = b,
        other => panic!("expected the receipt batch, got {other:?}"),
    }
    f
}

/// The next frame's body (panics on timeout or close).
pub async fn body(c: &mut Client) -> Body {
    next(c).await.body.expect("frame has a body")
}

pub async fn next(c: &mut Client) -> Frame {
    match c.recv_timeout(T).await {
        Ok(Some(f)) => f,
        Ok(None) => panic!("connection closed: {:?}", c.close_info()),
        Err(e) => panic!("no frame: {e}"),
    }
}

/// Waits for the Ack (or Error) answering `r`, skipping other frames.
pub async fn answer(c: &mut Client, r: u64) -> Body {
    let f = c
        .recv_until(
            |f| f.r#ref == r && matches!(f.body, Some(Body::Ack(_)) | Some(Body::Error(_))),
            T,
        )
        .await
        .expect("answer");
    f.body.expect("body")
}

pub async fn ack(c: &mut Client, r: u64) -> v1::Ack {
    match answer(c, r).await {
        Body::Ack(a) => a,
        other => panic!("expected Ack for ref {r}, got {other:?}"),
    }
}

pub async fn send(c: &mut Client, to: &str, id: &str, text: &str) -> v1::Ack {
    let r = c
        .send_message(to, id, text.as_bytes().to_vec())
        .await
        .expect("send");
    ack(c, r).await
}

/// Next incoming chat message (skipping other frames).
pub async fn message(c: &mut Client) -> v1::Message {
    match c
        .recv_until(|f| matches!(f.body, Some(Body::Message(_))), T)
        .await
        .expect("message")
        .body
    {
        Some(Body::Message(m)) => m,
        _ => unreachable!(),
    }
}

/// RESUME with `peer`: every batch until `more=false`, messages concatenated.
pub async fn resume_all(
    c: &mut Client,
    peer: &str,
    from: u64,
    limit: u32,
) -> (Vec<v1::Message>, usize) {
    let r = c.resume(peer, from, limit).await.expect("resume");
    let mut out = Vec::new();
    let mut batches = 0;
    loop {
        let f = c
            .recv_until(|f| f.r#ref == r, T)
            .await
            .expect("resume answer");
        match f.body {
            Some(Body::Batch(b)) => {
                assert_eq!(b.contact, peer);
                batches += 1;
                out.extend(b.messages);
                if !b.more {
                    return (out, batches);
                }
            }
            other => panic!("expected Batch, got {other:?}"),
        }
    }
}

pub fn text(m: &v1::Message) -> String {
    String::from_utf8_lossy(&m.payload).into_owned()
}

pub fn http() -> reqwest::Client {
    // reqwest is built without a default TLS crypto provider: the process installs one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// Polls until `f` returns true (for eventually-true facts, never for timing assertions).
/// The sum of the samples of a Prometheus metric (all label sets) on `/metrics`.
#[allow(dead_code)]
pub async fn metric(s: &Server, name: &str) -> f64 {
    let text = http()
        .get(s.http("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An admin POST (API key) to `path`, answered with a JSON body.
#[allow(dead_code)]
pub async fn admin_post(s: &Server, path: &str) -> serde_json::Value {
    http()
        .post(s.http(path))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub async fn presence(s: &Server, user: &str) -> serde_json::Value {
    http()
        .get(s.http(&format!("/v1/users/{user}/presence")))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("presence request")
        .json()
        .await
        .expect("presence json")
}

/// Reads until the server closes the connection; the close code and reason it sent, if any.
/// Panics when the connection stays open.
pub async fn wait_closed(c: &mut Client) -> Option<bimip_client::CloseInfo> {
    loop {
        match c.recv_timeout(T).await {
            Ok(Some(_)) => continue,
            Ok(None) => return c.close_info().cloned(),
            Err(bimip_client::ClientError::Timeout) => panic!("the connection was not closed"),
            Err(_) => return None,
        }
    }
}

/// Runs the `openssl` command in `dir` (scripts/test installs it when missing).
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed (scripts/test installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The server's OpenAPI document.
pub async fn openapi(s: &Server) -> serde_json::Value {
    http()
        .get(s.http("/openapi.json"))
        .send()
        .await
        .expect("GET /openapi.json")
        .json()
        .await
        .expect("OpenAPI JSON")
}

/// Starts `bimip serve` on a free port with `--log level`, `args` and `dir` as its data dir, its
/// stderr captured (read it with [`terminate_and_read_stderr`]); returns it and its `host:port`
/// once it listens. Its stdout keeps being drained.
pub fn spawn_logging(dir: &Path, level: &str, args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bimip"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log", level])
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("start bimip serve");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("read the listening line");
    let addr = line
        .strip_prefix("bimip listening on http://")
        .and_then(|r| r.split_whitespace().next())
        .expect("listening line")
        .to_string();
    std::thread::spawn(move || for _ in stdout.lines() {});
    (child, addr)
}

/// Stops a server started by hand with SIGTERM and returns everything it wrote to stderr.
pub fn terminate_and_read_stderr(child: &mut std::process::Child) -> String {
    use std::io::Read;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let _ = child.wait();
    err
}

/// An HTTP request with the API key; the status and the JSON body (Null when there is none).
pub async fn api(
    s: &Server,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut r = http().request(method, s.http(path)).bearer_auth(API_KEY);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

/// `user` adds `other` as a contact (mutual), through the API.
pub async fn contact(s: &Server, user: &str, other: &str) {
    let (st, v) = api(
        s,
        reqwest::Method::PUT,
        &format!("/v1/users/{user}/contacts/{other}"),
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
}
