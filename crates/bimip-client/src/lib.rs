//! Rust client for bimip (docs/PROTOCOL.md): opens the WebSocket, checks the `Welcome`, sends frames with
//! correlation ids and reads frames in either subprotocol. Used by the CLI, the integration tests
//! and the benchmark. [`token`] mints development JWTs.

pub mod token;

use bimip_proto::v1::{self, Frame};
use bimip_proto::{Body, Codec, DecodeError, IdError};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{
    self, Message,
    client::IntoClientRequest,
    http::{HeaderValue, header},
    protocol::{CloseFrame, WebSocketConfig, frame::coding::CloseCode},
};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use bimip_proto::codec::{SUBPROTOCOL_BINARY, SUBPROTOCOL_JSON};
pub use tokio_tungstenite::tungstenite::Message as WsMessage;

/// The underlying WebSocket stream.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long [`Client::connect`] waits for the server's `Welcome`.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything that can go wrong talking to a bimip server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered the upgrade request with an HTTP error (e.g. 401); `body` is its text.
    #[error("HTTP {status}: {body}")]
    Http { status: u16, body: String },
    #[error("invalid URL {0:?}")]
    InvalidUrl(String),
    #[error("WebSocket error: {0}")]
    WebSocket(#[from] tungstenite::Error),
    #[error("undecodable frame from the server: {0}")]
    Decode(#[from] DecodeError),
    /// The first frame was not a `Welcome`.
    #[error("expected a welcome frame first, got {0}")]
    NoWelcome(String),
    /// The server closed the connection (code and reason from its close frame, if any).
    #[error("connection closed{}", fmt_close(.0))]
    Closed(Option<CloseInfo>),
    #[error("timed out waiting for a frame")]
    Timeout,
    #[error("invalid id: {0}")]
    InvalidId(#[from] IdError),
    #[error("token: {0}")]
    Token(String),
}

fn fmt_close(c: &Option<CloseInfo>) -> String {
    match c {
        Some(c) => format!(" (code {} {:?})", c.code, c.reason),
        None => String::new(),
    }
}

/// The close code and reason the server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    pub code: u16,
    pub reason: String,
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `ws://host:port/ws` (or `wss://`).
    pub url: String,
    /// The JWT; sent as `Authorization: Bearer`, or as `?token=` when `token_in_query`.
    pub token: Option<String>,
    pub token_in_query: bool,
    /// Sent as `?device=` (the token's `device` claim wins on the server).
    pub device: Option<String>,
    /// The codec to ask for; the codec actually used follows what the server negotiated.
    pub codec: Codec,
    /// Overrides the subprotocol asked for: `Some(None)` asks for none, `Some(Some(p))` for `p`.
    pub subprotocol: Option<Option<String>>,
}

impl ConnectOptions {
    /// Binary codec, no token, no device.
    pub fn new(url: impl Into<String>) -> Self {
        ConnectOptions {
            url: url.into(),
            token: None,
            token_in_query: false,
            device: None,
            codec: Codec::Binary,
            subprotocol: None,
        }
    }

    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn device(mut self, device: impl Into<String>) -> Self {
        self.device = Some(device.into());
        self
    }

    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }
}

/// One connection to the server. [`Client::split`] gives independent reader and writer halves.
pub struct Client {
    writer: ClientWriter,
    reader: ClientReader,
}

/// Sending half of a connection.
pub struct ClientWriter {
    sink: SplitSink<Ws, Message>,
    codec: Codec,
    next_ref: u64,
}

/// Receiving half of a connection.
pub struct ClientReader {
    stream: SplitStream<Ws>,
    codec: Codec,
    close: Option<CloseInfo>,
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn build_url(opts: &ConnectOptions) -> String {
    let mut params = Vec::new();
    if opts.token_in_query
        && let Some(t) = &opts.token
    {
        params.push(format!("token={}", percent_encode(t)));
    }
    if let Some(d) = &opts.device {
        params.push(format!("device={}", percent_encode(d)));
    }
    if params.is_empty() {
        return opts.url.clone();
    }
    let sep = if opts.url.contains('?') { '&' } else { '?' };
    format!("{}{}{}", opts.url, sep, params.join("&"))
}

impl Client {
    /// Opens the WebSocket, authenticates and reads the `Welcome`.
    pub async fn connect(opts: ConnectOptions) -> Result<(Client, v1::Welcome), ClientError> {
        let url = build_url(&opts);
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| ClientError::InvalidUrl(format!("{url}: {e}")))?;
        if let Some(t) = &opts.token
            && !opts.token_in_query
        {
            let v = HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|_| ClientError::Token("the token is not a valid header value".into()))?;
            req.headers_mut().insert(header::AUTHORIZATION, v);
        }
        let asked = match &opts.subprotocol {
            Some(p) => p.clone(),
            None => Some(opts.codec.subprotocol().to_string()),
        };
        if let Some(p) = &asked {
            let v = HeaderValue::from_str(p)
                .map_err(|_| ClientError::InvalidUrl(format!("bad subprotocol {p:?}")))?;
            req.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, v);
        }
        let config = WebSocketConfig::default()
            .read_buffer_size(4 * 1024)
            .write_buffer_size(0);
        let (ws, resp) =
            match tokio_tungstenite::connect_async_with_config(req, Some(config), true).await {
                Ok(x) => x,
                Err(tungstenite::Error::Http(resp)) => {
                    let status = resp.status().as_u16();
                    let body = resp
                        .body()
                        .as_deref()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default();
                    return Err(ClientError::Http { status, body });
                }
                Err(e) => return Err(e.into()),
            };
        // Without a negotiated subprotocol the server speaks binary (docs/PROTOCOL.md §1.3).
        let negotiated = resp
            .headers()
            .get(header::SEC_WEBSOCKET_PROTOCOL)
            .and_then(|v| v.to_str().ok());
        let codec = Codec::from_subprotocol(negotiated);
        let (sink, stream) = ws.split();
        let mut client = Client {
            writer: ClientWriter {
                sink,
                codec,
                next_ref: 1,
            },
            reader: ClientReader {
                stream,
                codec,
                close: None,
            },
        };
        match client.reader.recv_timeout(WELCOME_TIMEOUT).await? {
            Some(Frame {
                body: Some(Body::Welcome(w)),
                ..
            }) => Ok((client, w)),
            Some(other) => Err(ClientError::NoWelcome(format!("{other:?}"))),
            None => Err(ClientError::Closed(client.reader.close.clone())),
        }
    }

    /// Independent halves, e.g. for a reader task and a writer task.
    pub fn split(self) -> (ClientWriter, ClientReader) {
        (self.writer, self.reader)
    }

    pub fn writer(&mut self) -> &mut ClientWriter {
        &mut self.writer
    }

    pub fn reader(&mut self) -> &mut ClientReader {
        &mut self.reader
    }

    /// The codec in use (what the server negotiated).
    pub fn codec(&self) -> Codec {
        self.writer.codec
    }

    /// Sends `body` with the next correlation id (1, 2, …) and returns that id.
    pub async fn send(&mut self, body: Body) -> Result<u64, ClientError> {
        self.writer.send(body).await
    }

    /// Sends a frame as is (its `ref` is not changed).
    pub async fn send_frame(&mut self, frame: Frame) -> Result<(), ClientError> {
        self.writer.send_frame(frame).await
    }

    /// Sends a WebSocket message as is (e.g. garbage, for tests).
    pub async fn send_raw(&mut self, msg: Message) -> Result<(), ClientError> {
        self.writer.send_raw(msg).await
    }

    /// The next frame; `None` once the server closed the connection. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Option<Frame>, ClientError> {
        self.reader.recv().await
    }

    /// Like [`Client::recv`], failing with [`ClientError::Timeout`] after `timeout`.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Frame>, ClientError> {
        self.reader.recv_timeout(timeout).await
    }

    /// The first frame matching `pred` within `timeout`, skipping others.
    pub async fn recv_until(
        &mut self,
        pred: impl FnMut(&Frame) -> bool,
        timeout: Duration,
    ) -> Result<Frame, ClientError> {
        self.reader.recv_until(pred, timeout).await
    }

    /// The close code and reason the server sent, once it closed.
    pub fn close_info(&self) -> Option<&CloseInfo> {
        self.reader.close_info()
    }

    /// Closes with code 1000 and waits (briefly) for the server's close reply.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.writer.close_frame().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            match tokio::time::timeout_at(deadline, self.reader.stream.next()).await {
                Err(_) | Ok(None) | Ok(Some(Err(_))) => return Ok(()),
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// `Message{id, to, payload}` in the chat partition.
    pub async fn send_message(
        &mut self,
        to: &str,
        id: &str,
        payload: impl Into<Bytes>,
    ) -> Result<u64, ClientError> {
        self.writer.send_message(to, id, payload).await
    }

    /// `Receipt{to, kind, up_to_offset, partition}`.
    pub async fn receipt(
        &mut self,
        to: &str,
        kind: v1::ReceiptKind,
        up_to_offset: u64,
        partition: v1::Partition,
    ) -> Result<u64, ClientError> {
        self.writer.receipt(to, kind, up_to_offset, partition).await
    }

    /// `Awareness{status: RESUME, to: peer, from_offset, limit}` (0 = server defaults).
    pub async fn resume(
        &mut self,
        peer: &str,
        from_offset: u64,
        limit: u32,
    ) -> Result<u64, ClientError> {
        self.writer.resume(peer, from_offset, limit).await
    }

    /// `Awareness` as given.
    pub async fn awareness(&mut self, a: v1::Awareness) -> Result<u64, ClientError> {
        self.writer.awareness(a).await
    }

    /// `Subscribe{users, unsubscribe}`.
    pub async fn subscribe(
        &mut self,
        users: Vec<String>,
        unsubscribe: bool,
    ) -> Result<u64, ClientError> {
        self.writer.subscribe(users, unsubscribe).await
    }

    /// A protocol-level `Ping` (answered with `Pong`).
    pub async fn ping(&mut self) -> Result<u64, ClientError> {
        self.writer.ping().await
    }
}

/// Encodes a frame into the WebSocket message type of `codec`.
pub fn encode_message(codec: Codec, frame: &Frame) -> Message {
    match codec.encode(frame) {
        bimip_proto::codec::Encoded::Binary(b) => Message::Binary(b),
        bimip_proto::codec::Encoded::Text(t) => Message::Text(t.into()),
    }
}

async fn write<S>(sink: &mut S, msg: Message) -> Result<(), ClientError>
where
    S: Sink<Message, Error = tungstenite::Error> + Unpin,
{
    sink.send(msg).await.map_err(ClientError::from)
}

/// Reads the next frame from any WebSocket stream: `None` once the connection is closed (the
/// close code, if one came, is kept in `close`). Cancel-safe. Also used by the bench's own
/// connection type.
pub async fn read_frame<S>(
    stream: &mut S,
    codec: Codec,
    close: &mut Option<CloseInfo>,
) -> Result<Option<Frame>, ClientError>
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    loop {
        // `next()` is the only await point: dropping this future loses nothing.
        let msg = match stream.next().await {
            None => return Ok(None),
            Some(Ok(m)) => m,
            Some(Err(
                tungstenite::Error::ConnectionClosed
                | tungstenite::Error::AlreadyClosed
                | tungstenite::Error::Protocol(
                    tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                ),
            )) => return Ok(None),
            Some(Err(e)) => return Err(e.into()),
        };
        match msg {
            Message::Binary(b) => return Ok(Some(codec.decode_binary(&b)?)),
            Message::Text(t) => return Ok(Some(codec.decode_text(t.as_str())?)),
            Message::Close(f) => {
                if close.is_none() {
                    *close = Some(match f {
                        Some(f) => CloseInfo {
                            code: u16::from(f.code),
                            reason: f.reason.to_string(),
                        },
                        None => CloseInfo {
                            code: 1005,
                            reason: String::new(),
                        },
                    });
                }
            }
            // Pongs to the server's pings are queued by tungstenite and flushed on the next read.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}

impl ClientWriter {
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// The correlation id the next [`ClientWriter::send`] will use.
    pub fn next_ref(&self) -> u64 {
        self.next_ref
    }

    /// Sends `body` with the next correlation id and returns that id.
    pub async fn send(&mut self, body: Body) -> Result<u64, ClientError> {
        let r = self.next_ref;
        self.next_ref += 1;
        self.send_frame(Frame::with(r, body)).await?;
        Ok(r)
    }

    pub async fn send_frame(&mut self, frame: Frame) -> Result<(), ClientError> {
        let msg = encode_message(self.codec, &frame);
        write(&mut self.sink, msg).await
    }

    pub async fn send_raw(&mut self, msg: Message) -> Result<(), ClientError> {
        write(&mut self.sink, msg).await
    }

    /// Sends a close frame with code 1000.
    pub async fn close_frame(&mut self) -> Result<(), ClientError> {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        match self.sink.send(Message::Close(Some(frame))).await {
            Ok(())
            | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn send_message(
        &mut self,
        to: &str,
        id: &str,
        payload: impl Into<Bytes>,
    ) -> Result<u64, ClientError> {
        self.send(Body::Message(v1::Message {
            id: id.to_string(),
            to: to.to_string(),
            partition: v1::Partition::Chat as i32,
            payload: payload.into(),
            ..Default::default()
        }))
        .await
    }

    pub async fn receipt(
        &mut self,
        to: &str,
        kind: v1::ReceiptKind,
        up_to_offset: u64,
        partition: v1::Partition,
    ) -> Result<u64, ClientError> {
        self.send(Body::Receipt(v1::Receipt {
            to: to.to_string(),
            kind: kind as i32,
            up_to_offset,
            partition: partition as i32,
            ..Default::default()
        }))
        .await
    }

    pub async fn resume(
        &mut self,
        peer: &str,
        from_offset: u64,
        limit: u32,
    ) -> Result<u64, ClientError> {
        self.awareness(v1::Awareness {
            to: peer.to_string(),
            status: v1::Status::Resume as i32,
            from_offset,
            limit,
            ..Default::default()
        })
        .await
    }

    pub async fn awareness(&mut self, a: v1::Awareness) -> Result<u64, ClientError> {
        self.send(Body::Awareness(a)).await
    }

    pub async fn subscribe(
        &mut self,
        users: Vec<String>,
        unsubscribe: bool,
    ) -> Result<u64, ClientError> {
        self.send(Body::Subscribe(v1::Subscribe { users, unsubscribe }))
            .await
    }

    pub async fn ping(&mut self) -> Result<u64, ClientError> {
        self.send(Body::Ping(v1::Ping {
            timestamp: bimip_proto::now_ms(),
        }))
        .await
    }
}

impl ClientReader {
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// The next frame; `None` once the server closed the connection. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Option<Frame>, ClientError> {
        read_frame(&mut self.stream, self.codec, &mut self.close).await
    }

    /// Like [`ClientReader::recv`], failing with [`ClientError::Timeout`] after `timeout`.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Frame>, ClientError> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// The first frame matching `pred` within `timeout`, skipping others.
    pub async fn recv_until(
        &mut self,
        mut pred: impl FnMut(&Frame) -> bool,
        timeout: Duration,
    ) -> Result<Frame, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.recv()).await {
                Err(_) => return Err(ClientError::Timeout),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(None)) => return Err(ClientError::Closed(self.close.clone())),
                Ok(Ok(Some(f))) if pred(&f) => return Ok(f),
                Ok(Ok(Some(_))) => {}
            }
        }
    }

    pub fn close_info(&self) -> Option<&CloseInfo> {
        self.close.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_query_parameters() {
        let mut o = ConnectOptions::new("ws://h:1/ws")
            .token("a.b-c_d")
            .device("d 1");
        assert_eq!(build_url(&o), "ws://h:1/ws?device=d%201");
        o.token_in_query = true;
        assert_eq!(build_url(&o), "ws://h:1/ws?token=a.b-c_d&device=d%201");
        o.device = None;
        o.url = "ws://h:1/ws?x=1".into();
        assert_eq!(build_url(&o), "ws://h:1/ws?x=1&token=a.b-c_d");
    }

    #[test]
    fn encodes_by_codec() {
        let f = Frame::with(1, Body::Ping(v1::Ping { timestamp: 5 }));
        assert!(matches!(
            encode_message(Codec::Binary, &f),
            Message::Binary(_)
        ));
        assert!(matches!(encode_message(Codec::Json, &f), Message::Text(_)));
    }

    #[tokio::test]
    async fn http_errors_before_upgrade_are_reported() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let body = r#"{"error":"unauthorized"}"#;
                let resp = format!(
                    "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        let err = Client::connect(ConnectOptions::new(format!("ws://{addr}/ws")))
            .await
            .err()
            .expect("must fail");
        match err {
            ClientError::Http { status, body } => {
                assert_eq!(status, 401);
                assert!(body.contains("unauthorized"), "{body}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// A one-connection fake server: negotiates the asked subprotocol, sends a Welcome, answers
    /// Ping with Pong (same ref), then closes with 4001 "bye" on any other frame.
    #[allow(clippy::result_large_err)]
    async fn fake_server() -> std::net::SocketAddr {
        use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            let Ok((s, _)) = l.accept().await else { return };
            let mut proto = None;
            let cb = |req: &Request, mut resp: Response| {
                assert!(
                    req.headers().get("authorization").is_some() || req.uri().query().is_some()
                );
                if let Some(p) = req.headers().get(header::SEC_WEBSOCKET_PROTOCOL) {
                    proto = p.to_str().ok().map(str::to_string);
                    resp.headers_mut()
                        .insert(header::SEC_WEBSOCKET_PROTOCOL, p.clone());
                }
                Ok(resp)
            };
            let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(s, cb).await else {
                return;
            };
            let codec = Codec::from_subprotocol(proto.as_deref());
            let welcome = Frame::with(
                0,
                Body::Welcome(v1::Welcome {
                    user: "alice".into(),
                    ..Default::default()
                }),
            );
            let _ = ws.send(encode_message(codec, &welcome)).await;
            let _ = ws.send(Message::Ping(Bytes::from_static(b"hb"))).await;
            while let Some(Ok(m)) = ws.next().await {
                let f = match m {
                    Message::Binary(b) => codec.decode_binary(&b),
                    Message::Text(t) => codec.decode_text(t.as_str()),
                    _ => continue,
                };
                match f {
                    Ok(Frame {
                        r#ref,
                        body: Some(Body::Ping(p)),
                    }) => {
                        let pong = Frame::with(
                            r#ref,
                            Body::Pong(v1::Pong {
                                timestamp: p.timestamp,
                            }),
                        );
                        let _ = ws.send(encode_message(codec, &pong)).await;
                    }
                    _ => {
                        let _ = ws
                            .close(Some(CloseFrame {
                                code: CloseCode::from(4001),
                                reason: "bye".into(),
                            }))
                            .await;
                    }
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn round_trip_with_fake_server_in_both_codecs() {
        for (codec, in_query) in [(Codec::Binary, false), (Codec::Json, true)] {
            let addr = fake_server().await;
            let mut o = ConnectOptions::new(format!("ws://{addr}/ws"))
                .token("t")
                .codec(codec);
            o.token_in_query = in_query;
            let (mut c, w) = Client::connect(o).await.expect("connect");
            assert_eq!(w.user, "alice");
            assert_eq!(c.codec(), codec);
            assert_eq!(c.ping().await.expect("ping"), 1);
            assert_eq!(c.ping().await.expect("ping"), 2);
            let f = c
                .recv_until(|f| f.r#ref == 2, Duration::from_secs(5))
                .await
                .expect("pong 2");
            assert!(matches!(f.body, Some(Body::Pong(_))));
            c.send_message("bob", "m1", &b"x"[..]).await.expect("send");
            assert!(
                c.recv_timeout(Duration::from_secs(5))
                    .await
                    .expect("closed")
                    .is_none()
            );
            let info = c.close_info().expect("close info");
            assert_eq!((info.code, info.reason.as_str()), (4001, "bye"));
        }
    }
}
