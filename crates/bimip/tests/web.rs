//! The web side with the real binary: the demo's static files (`--dev`, `--web`), the dev token
//! route, and no `?token=` in any log line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bimip_client::{Client, ClientError, ConnectOptions};
use common::*;
use serde_json::{Value, json};
use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

const CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; style-src 'self' 'unsafe-inline'";

async fn get(s: &Server, path: &str) -> reqwest::Response {
    http().get(s.http(path)).send().await.unwrap()
}

async fn dev_token(s: &Server, body: Value) -> (u16, Value) {
    let r = http()
        .post(s.http("/dev/token"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn the_demo_is_served_in_dev_mode_with_its_security_headers() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_raw(dir.path(), &["--dev"]);
    let r = get(&s, "/").await;
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["content-security-policy"], CSP);
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["cache-control"], "no-cache");
    let etag = h["etag"].to_str().unwrap().to_string();
    let html = r.text().await.unwrap();
    assert!(html.to_lowercase().contains("<html"), "{html}");
    // A second load with the ETag is a 304 without a body.
    let r = http()
        .get(s.http("/"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    // Assets: hashed names are cached for good; a missing one is a JSON 404.
    let names = asset_names(&html);
    for name in &names {
        let r = get(&s, name).await;
        assert_eq!(r.status(), 200, "{name}");
        assert_eq!(
            r.headers()["cache-control"],
            "public, max-age=31536000, immutable"
        );
        assert_eq!(r.headers()["content-security-policy"], CSP);
    }
    let r = get(&s, "/assets/no-such-file.js").await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_found");
    let r = get(&s, "/assets/../dev.toml").await;
    assert_eq!(r.status(), 404);
}

/// `/assets/...` names an index.html refers to.
fn asset_names(html: &str) -> Vec<String> {
    html.split(['"', '\''])
        .filter(|p| p.starts_with("/assets/") || p.starts_with("assets/"))
        .map(|p| format!("/{}", p.trim_start_matches('/')))
        .collect()
}

#[tokio::test]
async fn the_demo_is_off_without_dev_or_web_and_on_with_web() {
    let off = Server::start(&[]);
    for path in ["/", "/index.html", "/assets/app.js", "/dev/token"] {
        let r = get(&off, path).await;
        assert_eq!(r.status(), 404, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "not_found", "{path}");
    }
    let on = Server::start(&["--web"]);
    let r = get(&on, "/").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-security-policy"], CSP);
    // --web alone serves the demo but mints no tokens.
    assert_eq!(dev_token(&on, json!({"user": "alice"})).await.0, 404);
    let dir = tempfile::tempdir().unwrap();
    let dev_off = Server::start_raw(dir.path(), &["--dev", "--web=false"]);
    assert_eq!(get(&dev_off, "/").await.status(), 404);
    assert_eq!(
        dev_token(&dev_off, json!({"user": "alice"})).await.0,
        200,
        "the dev token route does not depend on the demo"
    );
}

#[tokio::test]
async fn the_dev_token_route_mints_tokens_the_server_accepts_only_in_dev_mode() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_raw(dir.path(), &["--dev"]);
    let (st, v) = dev_token(&s, json!({"user": "alice", "device": "web-1"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["user"], "alice");
    let now = bimip_proto::now_ms() / 1000;
    let exp = v["expires_at"].as_i64().unwrap();
    assert!((now + 24 * 3600 - exp).abs() < 60, "24 h: {exp}");
    let token = v["token"].as_str().unwrap().to_string();
    let mut opts = ConnectOptions::new(s.url()).token(token.clone());
    opts.token_in_query = true;
    let (_c, w) = Client::connect(opts).await.unwrap();
    assert_eq!((w.user.as_str(), w.device.as_str()), ("alice", "web-1"));
    // The token reaches the user's own HTTP routes, and only those.
    let r = http()
        .get(s.http("/v1/users/alice/unread"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http()
        .get(s.http("/v1/users/bob/unread"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Without a device the client names its own.
    let (st, v) = dev_token(&s, json!({"user": "bob"})).await;
    assert_eq!(st, 200, "{v}");
    for (body, what) in [
        (json!({"user": "a/b"}), "bad user"),
        (json!({"user": "bob", "device": "x y"}), "bad device"),
        (json!({"name": "bob"}), "unknown field"),
    ] {
        let (st, v) = dev_token(&s, body).await;
        assert_eq!(st, 400, "{what}: {v}");
        assert_eq!(v["error"]["code"], "bad_request", "{what}");
    }
    // In the OpenAPI document, marked as dev only.
    let spec: Value = get(&s, "/openapi.json").await.json().await.unwrap();
    assert!(spec["paths"]["/dev/token"]["post"].is_object());
}

#[tokio::test]
async fn the_dev_token_route_refuses_callers_that_are_not_on_loopback() {
    // Bound to every interface and called on a non-loopback address of this machine, if it
    // has one.
    let Some(ip) = local_non_loopback_ip() else {
        eprintln!("no non-loopback address here: skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (mut child, port, _out) = spawn_collecting(&[
        "--dev",
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    let r = http()
        .post(format!("http://{ip}:{port}/dev/token"))
        .json(&json!({"user": "alice"}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"]["code"], "forbidden");
}

/// An address of this machine other than loopback (the one a UDP socket would send from).
fn local_non_loopback_ip() -> Option<std::net::IpAddr> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.connect("192.0.2.1:9").ok()?;
    let ip = sock.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// Starts `bimip serve` with these flags (no harness defaults), waits for the listening line and
/// returns the child, the port, and a handle on everything it prints on stdout.
fn spawn_collecting(args: &[&str]) -> (Child, u16, std::sync::Arc<std::sync::Mutex<String>>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bimip"));
    cmd.arg("serve")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("BIMIP_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = out.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("bimip listening on http://") {
                let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                let _ = tx.send(addr);
            }
            let mut o = sink.lock().unwrap();
            o.push_str(&line);
            o.push('\n');
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("listening line");
    let port = addr.rsplit(':').next().unwrap().parse().unwrap();
    (child, port, out)
}

#[tokio::test]
async fn dev_mode_prints_the_demo_url() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (mut child, port, out) =
        spawn_collecting(&["--dev", "--listen", "127.0.0.1:0", "--data-dir", data]);
    let want = format!("open http://127.0.0.1:{port}/ in two browser windows");
    eventually("the demo URL printed", T, || {
        let printed = out.lock().unwrap().contains(&want);
        async move { printed }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    // Without the demo, no URL.
    let (mut child, _, out) = spawn_collecting(&[
        "--dev",
        "--web=false",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data,
    ]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(!out.lock().unwrap().contains("web demo"));
}

/// Browsers pass the token in the query string: it must not reach the log at the most verbose
/// level, whatever happens to the connection (welcomed, refused, closed as expired or revoked).
#[tokio::test]
async fn a_query_token_never_appears_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--jwt-secret", SECRET, "--api-key", API_KEY];
    let (mut child, addr) = spawn_logging(
        dir.path(),
        "trace",
        &[&args[..], &["--jwt-leeway-secs", "0", "--dev"]].concat(),
    );
    let url = format!("ws://{addr}/ws");
    let good = token("alice", Some("web"));
    let expired = {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let now = bimip_proto::now_ms() / 1000;
        encode(
            &Header::default(),
            &json!({"sub": "carol", "exp": now - 60, "iat": now - 120}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let forged = bimip_client::token::mint_hs256(b"not-the-secret-at-all", "bob", None, T).unwrap();
    let query = |t: &str| {
        let mut o = ConnectOptions::new(url.clone()).token(t.to_string());
        o.token_in_query = true;
        o
    };
    let (mut c, _) = Client::connect(query(&good)).await.unwrap();
    let r = c.send_message("bob", "m1", b"hi".to_vec()).await.unwrap();
    let _ = c.recv_until(|f| f.r#ref == r, T).await;
    assert!(matches!(
        Client::connect(query(&expired)).await,
        Err(ClientError::Closed(_))
    ));
    assert!(matches!(
        Client::connect(query(&forged)).await,
        Err(ClientError::Http { status: 401, .. })
    ));
    // The dev route's answer carries a token; it must not be logged either.
    let minted: Value = http()
        .post(format!("http://{addr}/dev/token"))
        .json(&json!({"user": "dave"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let minted = minted["token"].as_str().unwrap().to_string();
    // A plain HTTP request with the token in the query (the demo never does this, a user might).
    let _ = http()
        .get(format!("http://{addr}/ws?token={good}"))
        .send()
        .await;
    let revoked = token("alice", Some("web2"));
    let _ = http()
        .post(format!("http://{addr}/v1/users/alice/revoke"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert!(wait_closed(&mut c).await.is_some());
    assert!(matches!(
        Client::connect(query(&revoked)).await,
        Err(ClientError::Closed(_))
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = terminate_and_read_stderr(&mut child);
    assert!(log.contains("TRACE"), "trace logging was on: {log}");
    for (what, t) in [
        ("token", &good),
        ("expired token", &expired),
        ("forged token", &forged),
        ("minted token", &minted),
        ("revoked token", &revoked),
    ] {
        let sig = t.rsplit('.').next().unwrap();
        assert!(!log.contains(sig), "the {what} appears in the log");
    }
    assert!(
        !log.contains("token=ey"),
        "a query token appears in the log"
    );
}
