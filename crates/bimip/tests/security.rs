//! Security with the real binary: hostile user ids never leave the data dir, revoke and kick,
//! token expiry, revocations surviving a restart, no secret in the logs, TLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bimip_client::{Client, ClientError, ConnectOptions};
use common::*;
use serde_json::json;
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

fn hs256(claims: serde_json::Value) -> String {
    use jsonwebtoken::{EncodingKey, Header, encode};
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn now() -> i64 {
    bimip_proto::now_ms() / 1000
}

/// The close code and reason of a connection the server accepted only to close at once.
async fn closed_at_once(opts: ConnectOptions) -> (u16, String) {
    match Client::connect(opts).await {
        Err(ClientError::Closed(Some(c))) => (c.code, c.reason),
        Err(e) => panic!("expected a close right after the upgrade, got {e}"),
        Ok(_) => panic!("accepted"),
    }
}

async fn refused(opts: ConnectOptions) -> (u16, serde_json::Value) {
    match Client::connect(opts).await {
        Err(ClientError::Http { status, body }) => (
            status,
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}")),
        ),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("accepted"),
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.clone());
        if p.is_dir() {
            walk(&p, out);
        }
    }
}

#[tokio::test]
async fn hostile_user_ids_are_refused_and_nothing_is_written_outside_the_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = Server::start_in(&data, &[]);
    let hostile = [
        "..".to_string(),
        "../escape".to_string(),
        "a/b".to_string(),
        "/etc/passwd".to_string(),
        "a\\b".to_string(),
        "nul\0byte".to_string(),
        "x".repeat(10_000),
        "аlice".to_string(), // Cyrillic а
        "".to_string(),
        "..\\..\\win".to_string(),
    ];
    for id in &hostile {
        // As a token subject: 401 before the upgrade.
        let (status, body) = refused(
            ConnectOptions::new(s.url()).token(hs256(json!({"sub": id, "exp": now() + 60}))),
        )
        .await;
        assert_eq!(status, 401, "sub {id:?}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized");
        // As an HTTP recipient and sender.
        for b in [
            json!({"to": id, "text": "hi"}),
            json!({"from": id, "to": "bob", "text": "hi"}),
        ] {
            let r = http()
                .post(s.http("/v1/messages"))
                .bearer_auth(API_KEY)
                .json(&b)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "{b}");
            let v: serde_json::Value = r.json().await.expect("JSON error");
            assert_eq!(v["error"]["code"], "bad_request");
        }
        // In paths (percent-encoded, so the id arrives as is).
        let enc: String = id
            .bytes()
            .map(|b| format!("%{b:02X}"))
            .collect::<Vec<_>>()
            .concat();
        for path in [
            format!("/v1/users/{enc}/presence"),
            format!("/v1/users/{enc}/contacts"),
        ] {
            let r = http()
                .get(s.http(&path))
                .bearer_auth(API_KEY)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            assert!(matches!(status, 400 | 404), "{path}: {status}");
            let v: serde_json::Value = r.json().await.expect("JSON error");
            assert!(v["error"]["code"].is_string(), "{v}");
        }
        let r = http()
            .post(s.http(&format!("/v1/users/{enc}/revoke")))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        assert!(matches!(r.status().as_u16(), 400 | 404), "revoke {id:?}");
    }
    // Over the wire, as a message recipient.
    let (mut c, _) = s.online("alice", "phone").await;
    for id in &hostile {
        let r = c.send_message(id, "m1", b"x".to_vec()).await.unwrap();
        match answer(&mut c, r).await {
            bimip_proto::Body::Error(e) => {
                assert_eq!(e.code, bimip_proto::v1::ErrorCode::BadRequest as i32)
            }
            other => panic!("recipient {id:?}: {other:?}"),
        }
    }
    // A plain path traversal in the URL never reaches a handler with `..`.
    let r = http()
        .get(format!("http://{}/v1/users/../../etc/presence", s.addr))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert!(matches!(r.status().as_u16(), 400 | 404));
    drop(c);
    let mut entries = Vec::new();
    walk(tmp.path(), &mut entries);
    for p in entries {
        let rel = p.strip_prefix(&data).unwrap_or_else(|_| {
            if p == data {
                Path::new("")
            } else {
                panic!("{} is outside the data dir", p.display())
            }
        });
        let top = rel
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        assert!(
            matches!(
                top.as_deref(),
                None | Some("bimip") | Some("push") | Some("wal") | Some("revocations.json")
            ),
            "unexpected {}",
            p.display()
        );
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !hostile
                .iter()
                .any(|h| !h.is_empty() && name.contains(h.as_str())),
            "a file named after a hostile id: {}",
            p.display()
        );
    }
}

#[tokio::test]
async fn jwt_edge_cases_are_refused() {
    let s = Server::start(&["--jwt-issuer", "auth.test", "--jwt-audience", "chat"]);
    let good = json!({"sub": "alice", "exp": now() + 60, "iss": "auth.test", "aud": "chat"});
    let (_c, w) = Client::connect(ConnectOptions::new(s.url()).token(hs256(good)))
        .await
        .expect("good token");
    assert_eq!(w.user, "alice");
    for (what, claims) in [
        (
            "wrong iss",
            json!({"sub": "alice", "exp": now() + 60, "iss": "evil", "aud": "chat"}),
        ),
        (
            "wrong aud",
            json!({"sub": "alice", "exp": now() + 60, "iss": "auth.test", "aud": "x"}),
        ),
        (
            "no iss",
            json!({"sub": "alice", "exp": now() + 60, "aud": "chat"}),
        ),
        (
            "no aud",
            json!({"sub": "alice", "exp": now() + 60, "iss": "auth.test"}),
        ),
        (
            "no exp",
            json!({"sub": "alice", "iss": "auth.test", "aud": "chat"}),
        ),
        (
            "exp as string",
            json!({"sub": "alice", "exp": "never", "iss": "auth.test", "aud": "chat"}),
        ),
        (
            "sub not a string",
            json!({"sub": 7, "exp": now() + 60, "iss": "auth.test", "aud": "chat"}),
        ),
    ] {
        let (status, body) = refused(ConnectOptions::new(s.url()).token(hs256(claims))).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized", "{what}");
    }
}

#[tokio::test]
async fn revoke_closes_the_users_connections_and_refuses_its_tokens_also_after_a_restart() {
    let mut s = Server::start(&[]);
    let old = token("alice", Some("phone"));
    let (mut phone, _) = s.online("alice", "phone").await;
    let (mut laptop, _) = s.online("alice", "laptop").await;
    let (mut bob, _) = s.online("bob", "phone").await;
    let started = std::time::Instant::now();
    let r = admin_post(&s, "/v1/users/alice/revoke").await;
    assert_eq!(r["closed"], 2, "{r}");
    let not_before = r["not_before"].as_i64().unwrap();
    for c in [&mut phone, &mut laptop] {
        let close = wait_closed(c).await.expect("close frame");
        assert_eq!((close.code, close.reason.as_str()), (4501, "revoked"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "closed within a second"
    );
    // Bob is untouched.
    let r = bob.ping().await.unwrap();
    assert!(matches!(
        answer_any(&mut bob, r).await,
        bimip_proto::Body::Pong(_)
    ));
    // Old tokens, and tokens without iat, are refused: the upgrade is closed at once with 4501
    // (a browser cannot read an HTTP status); plain HTTP routes answer 401.
    let revoked = (4501, "revoked".to_string());
    assert_eq!(
        closed_at_once(ConnectOptions::new(s.url()).token(old.clone())).await,
        revoked
    );
    let no_iat = hs256(json!({"sub": "alice", "exp": now() + 60}));
    assert_eq!(
        closed_at_once(ConnectOptions::new(s.url()).token(no_iat)).await,
        revoked
    );
    let r = http()
        .get(s.http("/v1/users/alice/unread"))
        .bearer_auth(&old)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A token issued at not_before works.
    let fresh = hs256(json!({"sub": "alice", "exp": now() + 600, "iat": not_before}));
    Client::connect(ConnectOptions::new(s.url()).token(fresh.clone()))
        .await
        .expect("a token issued after the revoke");
    // The revoke survives a restart.
    s.restart();
    assert_eq!(
        closed_at_once(ConnectOptions::new(s.url()).token(old)).await,
        revoked
    );
    Client::connect(ConnectOptions::new(s.url()).token(fresh))
        .await
        .expect("fresh token after restart");
}

async fn answer_any(c: &mut Client, r: u64) -> bimip_proto::Body {
    c.recv_until(|f| f.r#ref == r, T)
        .await
        .unwrap()
        .body
        .unwrap()
}

#[tokio::test]
async fn kick_closes_one_device_and_an_expired_token_closes_its_connection() {
    let s = Server::start(&["--jwt-leeway-secs", "0"]);
    let (mut phone, _) = s.online("alice", "phone").await;
    let (mut laptop, _) = s.online("alice", "laptop").await;
    let r = admin_post(&s, "/v1/users/alice/devices/phone/kick").await;
    assert_eq!(r["closed"], 1, "{r}");
    let close = wait_closed(&mut phone).await.expect("close frame");
    assert_eq!((close.code, close.reason.as_str()), (4502, "kicked"));
    let p = laptop.ping().await.unwrap();
    assert!(matches!(
        answer_any(&mut laptop, p).await,
        bimip_proto::Body::Pong(_)
    ));
    // Both routes are in the OpenAPI document.
    let spec = openapi(&s).await;
    assert!(spec["paths"]["/v1/users/{user}/revoke"]["post"].is_object());
    assert!(spec["paths"]["/v1/users/{user}/devices/{device}/kick"]["post"].is_object());
    // A token that expires while connected closes the connection.
    let short = hs256(json!({"sub": "carol", "exp": now() + 2, "iat": now()}));
    let (mut c, _) = Client::connect(ConnectOptions::new(s.url()).token(short))
        .await
        .unwrap();
    let close = wait_closed(&mut c).await.expect("close frame");
    assert_eq!((close.code, close.reason.as_str()), (4001, "token expired"));
}

#[tokio::test]
async fn secrets_and_tokens_never_appear_in_debug_logs() {
    let data = tempfile::tempdir().unwrap();
    let secret = "log-secret-0123456789-SHOULD-NOT-LEAK";
    let api_key = "api-key-SHOULD-NOT-LEAK-42";
    let args = ["--jwt-secret", secret, "--api-key", api_key];
    let (mut child, addr) = spawn_logging(data.path(), "debug", &args);
    let url = format!("ws://{addr}/ws");
    let good = bimip_client::token::mint_hs256(secret.as_bytes(), "alice", None, T).unwrap();
    let wrong =
        bimip_client::token::mint_hs256(b"some-other-secret-xyz", "alice", None, T).unwrap();
    let (mut c, _) = Client::connect(ConnectOptions::new(url.clone()).token(good.clone()))
        .await
        .unwrap();
    let _ = Client::connect(ConnectOptions::new(url.clone()).token(wrong.clone())).await;
    let mut q = ConnectOptions::new(url.clone()).token(wrong.clone());
    q.token_in_query = true;
    let _ = Client::connect(q).await;
    let r = c
        .send_message("bob", "m1", b"hello".to_vec())
        .await
        .unwrap();
    let _ = c.recv_until(|f| f.r#ref == r, T).await;
    let h = http();
    for key in [api_key, "wrong-api-key-XYZ"] {
        let _ = h
            .post(format!("http://{addr}/v1/messages"))
            .bearer_auth(key)
            .json(&json!({"to": "bob", "text": "hi"}))
            .send()
            .await;
        let _ = h
            .post(format!("http://{addr}/v1/users/alice/revoke"))
            .bearer_auth(key)
            .send()
            .await;
    }
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = terminate_and_read_stderr(&mut child);
    assert!(err.contains("DEBUG"), "debug logging was on: {err}");
    for (what, s) in [
        ("JWT secret", secret),
        ("API key", api_key),
        ("wrong API key", "wrong-api-key-XYZ"),
        ("token", good.as_str()),
        ("wrong token", wrong.as_str()),
    ] {
        assert!(!err.contains(s), "the {what} appears in the log");
    }
    // Not even the signature part of a token.
    let sig = good.rsplit('.').next().unwrap();
    assert!(!err.contains(sig), "a token signature appears in the log");
}

#[tokio::test]
async fn tls_serves_https_and_wss() {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    // A throwaway CA and a leaf certificate for localhost signed by it (webpki refuses a
    // self-signed certificate used as the server's own).
    let openssl = |args: &[&str]| openssl(dir.path(), args);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "1",
                "-subj",
                "/CN=bimip test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "key.pem",
                "-out",
                "leaf.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.path().join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "1",
        "-extfile",
        "leaf.ext",
    ]);
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let data = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bimip"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log", "warn"])
        .args(["--jwt-secret", SECRET, "--api-key", API_KEY])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--data-dir")
        .arg(data.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let _kill = KillOnDrop(child);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let addr: std::net::SocketAddr = line
        .strip_prefix("bimip listening on https://")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("listening line: {line}"))
        .parse()
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.path().join("ca.pem")).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = ServerName::try_from("localhost").unwrap();
    // HTTPS GET /healthz.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector.connect(name.clone(), tcp).await.unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    let mut chunk = [0u8; 4096];
    let _ = tokio::time::timeout(T, async {
        while !resp.contains('}') {
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => resp.push_str(&String::from_utf8_lossy(&chunk[..n])),
            }
        }
    })
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"ok\""), "{resp}");
    // WSS: the WebSocket protocol over the same TLS port.
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let mut req = format!("wss://localhost:{}/ws", addr.port())
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token("alice", Some("tls")))
            .parse()
            .unwrap(),
    );
    req.headers_mut()
        .insert("sec-websocket-protocol", "bimip.v1".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    let msg = tokio::time::timeout(T, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let frame = bimip_proto::Codec::Binary
        .decode_binary(&msg.into_data())
        .unwrap();
    match frame.body {
        Some(bimip_proto::Body::Welcome(w)) => assert_eq!(w.user, "alice"),
        other => panic!("expected Welcome, got {other:?}"),
    }
    // Plain HTTP on the TLS port is not served.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("\"ok\""));
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
