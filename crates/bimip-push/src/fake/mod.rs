//! Loopback fakes of FCM ([`FakeFcm`]), APNs ([`FakeApns`]) and a webhook receiver
//! ([`FakeWebhook`]) for tests and `bimip bench push`. Each runs inside the calling process on
//! `127.0.0.1:0`, checks what it receives the way the real service does (signed credentials,
//! headers, payload limits), records requests, plays scripted replies, and stops when dropped.
//!
//! All three share the same shape:
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::time::Duration;
//! use bimip_push::fake::{FakeFcm, FcmReply};
//! let fcm = FakeFcm::start().await?;
//! let dir = tempfile::tempdir()?;
//! let config = fcm.config(dir.path())?;          // credentials file + endpoint
//! fcm.push_reply(FcmReply::Unavailable { retry_after: Some("7".into()) }); // next request
//! fcm.set_reply_for_token("dead-token", FcmReply::Unregistered);        // every request to it
//! // … send through `bimip_push::fcm::Fcm::new(&config, &Default::default())` …
//! let requests = fcm.wait_for_requests(2, Duration::from_secs(5)).await;
//! # let _ = (config, requests);
//! # Ok(()) }
//! ```
//!
//! Which reply a request gets: a rule set for its device token first
//! (`set_reply_for_token`), else the next queued reply (`push_reply`, first in first out),
//! else the default reply (`set_default_reply`, initially success).
//!
//! For benchmarks, `set_detailed_recording(false)` keeps only a count and the receive times
//! (`request_count`, `request_times`), which costs next to nothing per request.

mod apns;
mod fcm;
mod webhook;

pub use apns::{ApnsReply, ApnsRequest, FakeApns};
pub use fcm::{FakeFcm, FcmReply, FcmRequest, TokenFailure};
pub use webhook::{FakeWebhook, WebhookReply, WebhookRequest};

use std::{
    collections::{HashMap, VecDeque},
    io,
    net::SocketAddr,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, task::JoinSet};

/// Locks a mutex, ignoring poisoning (a panicking test thread must not hide the records).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Which HTTP versions a fake serves.
#[derive(Clone, Copy)]
enum Protocols {
    /// HTTP/1.1 and h2c (prior knowledge), as the client picks.
    Any,
    /// HTTP/2 only: an HTTP/1.1 request is turned away, as APNs does.
    Http2Only,
}

/// A running server. Dropping it stops the accept loop and every open connection.
struct Server {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    /// A listener on `127.0.0.1:0`, bound first so the fake knows its own URL before it
    /// builds its routes.
    async fn bind() -> io::Result<TcpListener> {
        TcpListener::bind("127.0.0.1:0").await
    }

    fn run(
        listener: TcpListener,
        router: Router,
        protocols: Protocols,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> io::Result<Server> {
        let addr = listener.local_addr()?;
        let task = tokio::spawn(accept_loop(listener, router, protocols, tls));
        Ok(Server { addr, task })
    }
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    protocols: Protocols,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    // The connections live in this set, so aborting this task (drop) ends them too.
    let mut connections = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            match tls {
                None => serve_connection(TokioIo::new(stream), router, protocols).await,
                Some(acceptor) => {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    // A client that offered no ALPN at all gets no HTTP/2 either.
                    if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                        return;
                    }
                    serve_connection(TokioIo::new(stream), router, protocols).await;
                }
            }
        });
    }
}

async fn serve_connection<I>(io: TokioIo<I>, router: Router, protocols: Protocols)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let builder = auto::Builder::new(TokioExecutor::new());
    let builder = match protocols {
        Protocols::Any => builder,
        Protocols::Http2Only => builder.http2_only(),
    };
    // Errors here are the client's doing (reset, HTTP/1 on an h2-only server): nothing to do.
    let _ = builder.serve_connection(io, service).await;
}

/// The requests a fake received: full records, or (benchmarks) only a count and the times.
struct Log<T> {
    detailed: AtomicBool,
    count: AtomicU64,
    entries: Mutex<Vec<T>>,
    times: Mutex<Vec<Instant>>,
}

impl<T: Clone> Log<T> {
    fn new() -> Log<T> {
        Log {
            detailed: AtomicBool::new(true),
            count: AtomicU64::new(0),
            entries: Mutex::new(Vec::new()),
            times: Mutex::new(Vec::new()),
        }
    }

    fn detailed(&self) -> bool {
        self.detailed.load(Ordering::Relaxed)
    }

    /// Records one request; `entry` is only built when detailed recording is on.
    fn record(&self, at: Instant, entry: impl FnOnce() -> T) {
        if self.detailed() {
            lock(&self.entries).push(entry());
        }
        lock(&self.times).push(at);
        // Counted last, so whoever sees the count also finds the entry.
        self.count.fetch_add(1, Ordering::Release);
    }

    fn set_detailed(&self, on: bool) {
        self.detailed.store(on, Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    fn entries(&self) -> Vec<T> {
        lock(&self.entries).clone()
    }

    fn times(&self) -> Vec<Instant> {
        lock(&self.times).clone()
    }

    fn clear(&self) {
        lock(&self.entries).clear();
        lock(&self.times).clear();
        self.count.store(0, Ordering::Release);
    }

    /// Waits until `n` requests were recorded or `timeout` passed; returns the count then.
    /// It polls, so recording costs nothing extra when nobody waits.
    async fn wait_for(&self, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let count = self.count();
            if count >= n || Instant::now() >= deadline {
                return count;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Scripted replies: per-device-token rules, then a queue, then a default.
struct Script<R> {
    by_token: HashMap<String, R>,
    queue: VecDeque<R>,
    default: R,
}

impl<R: Clone> Script<R> {
    fn new(default: R) -> Script<R> {
        Script {
            by_token: HashMap::new(),
            queue: VecDeque::new(),
            default,
        }
    }

    fn next(&mut self, token: Option<&str>) -> R {
        if let Some(reply) = token.and_then(|t| self.by_token.get(t)) {
            return reply.clone();
        }
        self.queue
            .pop_front()
            .unwrap_or_else(|| self.default.clone())
    }
}

/// The script API every fake shares, over its own reply type.
struct Scripted<R>(Mutex<Script<R>>);

impl<R: Clone> Scripted<R> {
    fn new(default: R) -> Scripted<R> {
        Scripted(Mutex::new(Script::new(default)))
    }
    fn push(&self, reply: R) {
        lock(&self.0).queue.push_back(reply);
    }
    fn for_token(&self, token: &str, reply: Option<R>) {
        let mut script = lock(&self.0);
        match reply {
            Some(reply) => script.by_token.insert(token.to_owned(), reply),
            None => script.by_token.remove(token),
        };
    }
    fn set_default(&self, reply: R) {
        lock(&self.0).default = reply;
    }
    fn next(&self, token: Option<&str>) -> R {
        lock(&self.0).next(token)
    }
}

/// A JWT's three parts, decoded: header JSON, claims JSON, signing input and signature.
struct Jwt {
    header: serde_json::Value,
    claims: serde_json::Value,
    signing_input: String,
    signature: Vec<u8>,
}

impl Jwt {
    fn parse(token: &str) -> Result<Jwt, String> {
        use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a JWT (three dot-separated parts)".into());
        };
        let json = |part: &str, what: &str| -> Result<serde_json::Value, String> {
            let bytes = URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| format!("JWT {what} is not base64url"))?;
            serde_json::from_slice(&bytes).map_err(|_| format!("JWT {what} is not JSON"))
        };
        Ok(Jwt {
            header: json(h, "header")?,
            claims: json(c, "claims")?,
            signing_input: format!("{h}.{c}"),
            signature: URL_SAFE_NO_PAD
                .decode(s)
                .map_err(|_| "JWT signature is not base64url".to_owned())?,
        })
    }

    fn claim_str(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(serde_json::Value::as_str)
    }

    fn claim_i64(&self, name: &str) -> Option<i64> {
        self.claims.get(name).and_then(serde_json::Value::as_i64)
    }
}

/// A JSON response with optional `Retry-After`.
fn json_response(
    status: u16,
    body: &serde_json::Value,
    retry_after: Option<&str>,
) -> axum::response::Response {
    raw_json_response(status, body.to_string(), retry_after)
}

/// [`json_response`] for a body that is already JSON text.
fn raw_json_response(
    status: u16,
    body: String,
    retry_after: Option<&str>,
) -> axum::response::Response {
    let mut response = axum::response::Response::new(axum::body::Body::from(body));
    *response.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Some(value) = retry_after.and_then(|v| http::HeaderValue::from_str(v).ok()) {
        headers.insert(http::header::RETRY_AFTER, value);
    }
    response
}

/// The recording and script methods every fake has, over its own request and reply types.
macro_rules! common_api {
    ($fake:ident, $reply:ident, $request:ident) => {
        impl $fake {
            /// Queues a reply for the next request that has no per-token rule (first in, first
            /// out).
            pub fn push_reply(&self, reply: $reply) {
                self.state.script.push(reply);
            }

            /// Queues several replies, in order.
            pub fn push_replies(&self, replies: impl IntoIterator<Item = $reply>) {
                for reply in replies {
                    self.state.script.push(reply);
                }
            }

            /// Answers every request for this device token with `reply` (takes precedence over
            /// the queue), until [`Self::clear_reply_for_token`].
            pub fn set_reply_for_token(&self, token: &str, reply: $reply) {
                self.state.script.for_token(token, Some(reply));
            }

            /// Removes the rule of [`Self::set_reply_for_token`].
            pub fn clear_reply_for_token(&self, token: &str) {
                self.state.script.for_token(token, None);
            }

            /// The reply when no rule and no queued reply applies (initially success).
            pub fn set_default_reply(&self, reply: $reply) {
                self.state.script.set_default(reply);
            }

            /// Every request received so far (with detailed recording on), oldest first.
            pub fn requests(&self) -> Vec<$request> {
                self.state.log.entries()
            }

            /// How many requests were received (always counted).
            pub fn request_count(&self) -> u64 {
                self.state.log.count()
            }

            /// When each request was received (always recorded), oldest first.
            pub fn request_times(&self) -> Vec<std::time::Instant> {
                self.state.log.times()
            }

            /// Waits until at least `n` requests were received or `timeout` passed, and returns
            /// the recorded requests then (check their number).
            pub async fn wait_for_requests(
                &self,
                n: usize,
                timeout: std::time::Duration,
            ) -> Vec<$request> {
                self.state.log.wait_for(n as u64, timeout).await;
                self.state.log.entries()
            }

            /// Waits until at least `n` requests were received or `timeout` passed; returns the
            /// count then. Works with detailed recording off (benchmarks).
            pub async fn wait_for_count(&self, n: u64, timeout: std::time::Duration) -> u64 {
                self.state.log.wait_for(n, timeout).await
            }

            /// On (default): keep every request. Off: keep only the count and receive times,
            /// so the fake is never the bottleneck of a benchmark.
            pub fn set_detailed_recording(&self, on: bool) {
                self.state.log.set_detailed(on);
            }

            /// Forgets the requests recorded so far (and resets the count).
            pub fn clear_requests(&self) {
                self.state.log.clear();
            }

            /// The address the fake listens on (`127.0.0.1:<port>`).
            pub fn addr(&self) -> std::net::SocketAddr {
                self.server.addr
            }
        }
    };
}
pub(crate) use common_api;
