//! The gateway's edges: authentication before the upgrade, subprotocols, bad frames, size
//! limits, heartbeats, and the HTTP skeleton (health, metrics, OpenAPI, JSON errors).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bimip_client::{Client, ClientError, ConnectOptions, WsMessage};
use bimip_proto::{
    Body, Codec,
    v1::{self, ErrorCode},
};
use common::*;
use serde_json::json;
use std::time::Duration;

async fn refused(s: &Server, opts: ConnectOptions) -> (u16, serde_json::Value) {
    match Client::connect(opts).await {
        Err(ClientError::Http { status, body }) => {
            let v: serde_json::Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body}"));
            (status, v)
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("connection to {} was accepted", s.url()),
    }
}

fn hs256(claims: serde_json::Value, secret: &str) -> String {
    use jsonwebtoken::{EncodingKey, Header, encode};
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn now() -> i64 {
    bimip_proto::now_ms() / 1000
}

#[tokio::test]
async fn bad_tokens_get_401_with_a_json_error_before_the_upgrade() {
    let s = Server::start(&[]);
    let url = s.url();
    let cases = [
        ("missing", None),
        ("garbage", Some("not-a-jwt".to_string())),
        ("no exp", Some(hs256(json!({"sub": "alice"}), SECRET))),
        (
            "expired and signed with another key",
            Some(hs256(
                json!({"sub": "alice", "exp": now() - 3600}),
                "another-secret-of-length",
            )),
        ),
        (
            "wrong key",
            Some(hs256(
                json!({"sub": "alice", "exp": now() + 60}),
                "another-secret-of-length",
            )),
        ),
        (
            "bad sub",
            Some(hs256(
                json!({"sub": "../../etc", "exp": now() + 60}),
                SECRET,
            )),
        ),
        // alg=none, no signature
        (
            "alg none",
            Some(format!(
                "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
                b64url(&json!({"sub": "alice", "exp": now() + 60}).to_string())
            )),
        ),
    ];
    for (what, token) in cases {
        let mut opts = ConnectOptions::new(url.clone());
        opts.token = token;
        let (status, body) = refused(&s, opts).await;
        assert_eq!(status, 401, "{what}");
        assert_eq!(body["error"]["code"], "unauthorized", "{what}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().len() > 5,
            "{what}"
        );
    }
    // The token may also come in the query string (browsers).
    let mut opts = ConnectOptions::new(url.clone()).token(token("alice", None));
    opts.token_in_query = true;
    let (_c, w) = Client::connect(opts).await.expect("query token");
    assert_eq!(w.user, "alice");
    assert!(
        w.device.starts_with("dev-"),
        "generated device id: {}",
        w.device
    );
}

/// A genuine token past its `exp` gets the upgrade and an immediate close with 4001, which a
/// browser can read (it cannot read an HTTP 401); a plain HTTP request still gets the 401.
#[tokio::test]
async fn an_expired_token_is_closed_with_4001_after_the_upgrade() {
    let s = Server::start(&["--jwt-leeway-secs", "0"]);
    let expired = hs256(json!({"sub": "alice", "exp": now() - 60}), SECRET);
    for (in_query, codec) in [(false, Codec::Binary), (true, Codec::Json)] {
        let mut opts = ConnectOptions::new(s.url())
            .token(expired.clone())
            .codec(codec);
        opts.token_in_query = in_query;
        match Client::connect(opts).await {
            Err(ClientError::Closed(Some(c))) => {
                assert_eq!((c.code, c.reason.as_str()), (4001, "token expired"));
            }
            Err(e) => panic!("expected a 4001 close, got {e}"),
            Ok(_) => panic!("an expired token was welcomed"),
        }
    }
    let r = http()
        .get(s.http("/ws"))
        .bearer_auth(&expired)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    assert!(metric(&s, "bimip_connections_refused_total").await >= 2.0);
}

fn b64url(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test]
async fn welcome_reports_identity_and_limits_and_device_comes_from_claim_or_query() {
    let s = Server::start(&["--heartbeat-ms", "15000"]);
    let (_c, w) = s.connect("alice", "phone").await;
    assert_eq!((w.user.as_str(), w.device.as_str()), ("alice", "phone"));
    assert_eq!(w.heartbeat_ms, 15000);
    assert_eq!(w.max_frame_bytes, 65536);
    assert!(w.server_time > 0 && !w.session.is_empty() && !w.node.is_empty());
    let opts = ConnectOptions::new(s.url())
        .token(token("alice", None))
        .device("tablet");
    let (_c2, w2) = Client::connect(opts).await.unwrap();
    assert_eq!(w2.device, "tablet");
    let p = presence(&s, "alice").await;
    assert_eq!(p["devices"], 2);
}

#[tokio::test]
async fn without_a_subprotocol_the_server_speaks_binary() {
    let s = Server::start(&[]);
    let mut opts = ConnectOptions::new(s.url()).token(token("alice", Some("d")));
    opts.subprotocol = Some(None);
    let (mut c, w) = Client::connect(opts).await.expect("no subprotocol");
    assert_eq!(w.user, "alice");
    read_fanout(&mut c).await;
    c.ping().await.unwrap();
    assert!(matches!(body(&mut c).await, Body::Pong(_)));
}

#[tokio::test]
async fn garbage_frames_get_an_error_and_the_connection_keeps_working() {
    let s = Server::start(&[]);
    for codec in [Codec::Binary, Codec::Json] {
        let (mut c, _) = s.online_with("gus", "d", codec).await;
        let junk = match codec {
            Codec::Binary => WsMessage::Binary(vec![0xff, 0xff, 0xff, 0x01].into()),
            Codec::Json => WsMessage::Text(r#"{"ref":"5","message":{"to":7"#.into()),
        };
        c.send_raw(junk).await.unwrap();
        match body(&mut c).await {
            Body::Error(e) => {
                assert_eq!(e.code, ErrorCode::BadRequest as i32);
                assert!(!e.message.is_empty());
            }
            other => panic!("{codec:?}: expected Error, got {other:?}"),
        }
        // The wrong WebSocket message type for the subprotocol.
        let wrong = match codec {
            Codec::Binary => WsMessage::Text("{}".into()),
            Codec::Json => WsMessage::Binary(vec![1, 2].into()),
        };
        c.send_raw(wrong).await.unwrap();
        assert!(matches!(body(&mut c).await, Body::Error(_)));
        // Invalid but decodable requests carry the ref back.
        let r = c
            .send_message("not a user!", "id", b"x".to_vec())
            .await
            .unwrap();
        match answer(&mut c, r).await {
            Body::Error(e) => assert_eq!(e.code, ErrorCode::BadRequest as i32),
            other => panic!("{other:?}"),
        }
        let r = c.send_message("bob", "", b"x".to_vec()).await.unwrap();
        assert!(
            matches!(answer(&mut c, r).await, Body::Error(_)),
            "empty id"
        );
        let r = c.send(Body::Ack(v1::Ack::default())).await.unwrap();
        assert!(
            matches!(answer(&mut c, r).await, Body::Error(_)),
            "server-only frame"
        );
        let r = c
            .send_message("bob", "too-big", vec![b'x'; 40_000])
            .await
            .unwrap();
        match answer(&mut c, r).await {
            Body::Error(e) => assert_eq!(e.code, ErrorCode::TooLarge as i32),
            other => panic!("{other:?}"),
        }
        // Still usable.
        let a = send(&mut c, "bob", &format!("ok-{codec:?}"), "still here").await;
        assert!(a.offset > 0);
    }
}

#[tokio::test]
async fn an_oversized_frame_closes_the_connection_with_1009() {
    let s = Server::start(&["--max-frame-bytes", "4096", "--max-payload-bytes", "1024"]);
    let (mut c, _) = s.online("alice", "d").await;
    c.send_message("bob", "big", vec![b'x'; 10_000])
        .await
        .unwrap();
    while let Ok(Some(_)) = c.recv_timeout(T).await {}
    let close = c.close_info().expect("close frame");
    assert_eq!(close.code, 1009, "{close:?}");
}

#[tokio::test]
async fn a_silent_client_is_reported_offline_after_two_heartbeats() {
    let s = Server::start(&["--heartbeat-ms", "300"]);
    let (c, _) = s.connect("hal", "d").await;
    // Keep the TCP connection open but stop reading: no pongs go back.
    let (_writer, _reader) = c.split();
    assert_eq!(presence(&s, "hal").await["status"], "online");
    eventually("hal offline", Duration::from_secs(10), || async {
        let p = presence(&s, "hal").await;
        p["status"] == "offline" && p["last_seen"].as_i64().unwrap_or(0) > 0
    })
    .await;
    // A client that keeps reading (and so answers pings) stays online.
    let (mut live, _) = s.online("liv", "d").await;
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while tokio::time::Instant::now() < until {
        let _ = live.recv_timeout(Duration::from_millis(100)).await;
    }
    assert_eq!(presence(&s, "liv").await["status"], "online");
}

#[tokio::test]
async fn rs256_and_es256_keys_and_no_algorithm_confusion() {
    let dir = tempfile::tempdir().unwrap();
    let openssl = |args: &[&str]| openssl(dir.path(), args);
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        "rsa.pem",
    ]);
    openssl(&["pkey", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub"]);
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        "ec.pem",
    ]);
    openssl(&["pkey", "-in", "ec.pem", "-pubout", "-out", "ec.pub"]);
    let read = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
    for (alg, private, public) in [
        (jsonwebtoken::Algorithm::RS256, "rsa.pem", "rsa.pub"),
        (jsonwebtoken::Algorithm::ES256, "ec.pem", "ec.pub"),
    ] {
        let pubpath = dir.path().join(public);
        let data = tempfile::tempdir().unwrap();
        let cmd_args = [
            "--jwt-public-key",
            pubpath.to_str().unwrap(),
            "--jwt-issuer",
            "auth.test",
        ];
        let s = Server::start_raw(data.path(), &cmd_args);
        let key = match alg {
            jsonwebtoken::Algorithm::RS256 => {
                jsonwebtoken::EncodingKey::from_rsa_pem(&read(private))
            }
            _ => jsonwebtoken::EncodingKey::from_ec_pem(&read(private)),
        }
        .unwrap();
        let claims = json!({"sub": "alice", "exp": now() + 60, "iss": "auth.test"});
        let good = jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, &key).unwrap();
        let (_c, w) = Client::connect(ConnectOptions::new(s.url()).token(good))
            .await
            .unwrap_or_else(|e| panic!("{alg:?} token refused: {e}"));
        assert_eq!(w.user, "alice");
        // Wrong issuer.
        let bad_iss = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(alg),
            &json!({"sub": "alice", "exp": now() + 60, "iss": "evil"}),
            &key,
        )
        .unwrap();
        assert_eq!(
            refused(&s, ConnectOptions::new(s.url()).token(bad_iss))
                .await
                .0,
            401
        );
        // Algorithm confusion: HS256 signed with the public key's bytes.
        let confused = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&read(public)),
        )
        .unwrap();
        let (status, body) = refused(&s, ConnectOptions::new(s.url()).token(confused)).await;
        assert_eq!(status, 401, "{alg:?} confusion: {body}");
        // A HS256 dev token is refused too.
        assert_eq!(
            refused(&s, ConnectOptions::new(s.url()).token(token("alice", None)))
                .await
                .0,
            401
        );
    }
}

#[tokio::test]
async fn http_skeleton_health_metrics_openapi_and_json_errors() {
    let s = Server::start(&[]);
    let c = http();
    let get = |p: &str| c.get(s.http(p)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    let spec: serde_json::Value = get("/openapi.json").await.unwrap().json().await.unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
    for path in [
        "/v1/messages",
        "/v1/users/{user}/presence",
        "/healthz",
        "/metrics",
    ] {
        assert!(spec["paths"].get(path).is_some(), "openapi lacks {path}");
    }
    // Traffic, then metrics.
    let (mut a, _) = s.online("alice", "d").await;
    send(&mut a, "bob", "m1", "x").await;
    let text = get("/metrics").await.unwrap().text().await.unwrap();
    for name in [
        "bimip_connections ",
        "bimip_messages_stored_total 1",
        "bimip_messages_delivered_total",
        "bimip_store_fsync_seconds_bucket",
        "bimip_users_online 1",
    ] {
        assert!(text.contains(name), "metrics lack {name:?}:\n{text}");
    }
    // JSON errors everywhere.
    let r = get("/nope").await.unwrap();
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_found");
    let post = |key: Option<&str>, body: &str| {
        let mut r = c
            .post(s.http("/v1/messages"))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    let cases = [
        (None, r#"{"to":"bob","text":"x"}"#, 401, "unauthorized"),
        (
            Some("wrong"),
            r#"{"to":"bob","text":"x"}"#,
            401,
            "unauthorized",
        ),
        (Some(API_KEY), r#"{"to":"bob","text":"#, 400, "bad_request"),
        (
            Some(API_KEY),
            r#"{"to":"bad user","text":"x"}"#,
            400,
            "bad_request",
        ),
        (
            Some(API_KEY),
            r#"{"to":"bob","payload":"***"}"#,
            400,
            "bad_request",
        ),
        (
            Some(API_KEY),
            r#"{"to":"bob","partition":"receipt"}"#,
            400,
            "bad_request",
        ),
        (
            Some(API_KEY),
            r#"{"to":"bob","surprise":1}"#,
            400,
            "bad_request",
        ),
        (
            Some(API_KEY),
            r#"{"from":"../x","to":"bob"}"#,
            400,
            "bad_request",
        ),
    ];
    for (key, body, status, code) in cases {
        let r = post(key, body).await.unwrap();
        assert_eq!(r.status(), status, "{body}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{body}: {v}");
    }
    let big = format!(r#"{{"to":"bob","text":"{}"}}"#, "x".repeat(40_000));
    let r = post(Some(API_KEY), &big).await.unwrap();
    assert_eq!(r.status(), 413);
    let r = c
        .get(s.http("/v1/users/a%2Fb/presence"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn without_an_api_key_the_backend_api_is_off_and_sigterm_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_raw(dir.path(), &["--jwt-secret", SECRET]);
    let r = http()
        .post(s.http("/v1/messages"))
        .bearer_auth("anything")
        .json(&json!({"to": "bob", "text": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "forbidden");
    let (mut c, _) = s.online("alice", "d").await;
    let code = s.terminate();
    assert_eq!(code, Some(0), "clean exit on SIGTERM");
    while let Ok(Some(_)) = c.recv_timeout(T).await {}
    assert_eq!(c.close_info().map(|i| i.code), Some(1001));
}
