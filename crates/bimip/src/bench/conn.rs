//! A lean WebSocket connection for the load generator: the same handshake as `bimip-client`
//! (bearer token, subprotocol, `Welcome` first), but over a TCP socket we bind ourselves (so
//! connections can be spread over several 127.0.0.X source addresses), with `feed`/`flush` so a
//! burst of frames costs one write.

use anyhow::{Context, anyhow, bail};
use bimip_proto::{Body, Codec, v1, v1::Frame};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{
    self, Message,
    client::IntoClientRequest,
    http::{HeaderValue, header},
    protocol::{CloseFrame, WebSocketConfig, frame::coding::CloseCode},
};

type Ws = WebSocketStream<TcpStream>;

/// Where to connect and how to authenticate.
#[derive(Clone)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
    pub secret: Vec<u8>,
    pub codec: Codec,
    /// Source addresses to spread connections over (empty: let the kernel choose).
    pub sources: Vec<IpAddr>,
}

pub struct Writer {
    sink: SplitSink<Ws, Message>,
    codec: Codec,
    next_ref: u64,
}

pub struct Reader {
    stream: SplitStream<Ws>,
    codec: Codec,
}

impl Target {
    /// Connects as `user`/`device` (connection number `n` picks the source address) and reads the
    /// `Welcome`.
    pub async fn connect(
        &self,
        user: &str,
        device: &str,
        n: usize,
    ) -> anyhow::Result<(Writer, Reader, v1::Welcome)> {
        let token = bimip_client::token::mint_hs256(
            &self.secret,
            user,
            Some(device),
            Duration::from_secs(86_400),
        )
        .map_err(|e| anyhow!("minting a token for {user}: {e}"))?;
        let mut req = self
            .url
            .as_str()
            .into_client_request()
            .with_context(|| format!("bad URL {}", self.url))?;
        req.headers_mut().insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}"))?,
        );
        req.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(self.codec.subprotocol()),
        );
        let socket = if self.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if !self.sources.is_empty() {
            let src = self.sources[n % self.sources.len()];
            socket
                .bind(SocketAddr::new(src, 0))
                .with_context(|| format!("binding to {src}"))?;
        }
        let tcp = socket
            .connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        tcp.set_nodelay(true)?;
        let config = WebSocketConfig::default()
            .read_buffer_size(4 * 1024)
            .write_buffer_size(0);
        let (ws, resp) =
            match tokio_tungstenite::client_async_with_config(req, tcp, Some(config)).await {
                Ok(x) => x,
                Err(tungstenite::Error::Http(resp)) => {
                    let body = resp
                        .body()
                        .as_deref()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default();
                    bail!("{user}: HTTP {}: {body}", resp.status().as_u16());
                }
                Err(e) => return Err(anyhow!("{user}: WebSocket handshake: {e}")),
            };
        let codec = Codec::from_subprotocol(
            resp.headers()
                .get(header::SEC_WEBSOCKET_PROTOCOL)
                .and_then(|v| v.to_str().ok()),
        );
        let (sink, stream) = ws.split();
        let writer = Writer {
            sink,
            codec,
            next_ref: 1,
        };
        let mut reader = Reader { stream, codec };
        let first = tokio::time::timeout(Duration::from_secs(30), reader.recv())
            .await
            .map_err(|_| anyhow!("{user}: no Welcome within 30 s"))??;
        match first {
            Some(Frame {
                body: Some(Body::Welcome(w)),
                ..
            }) => Ok((writer, reader, w)),
            Some(other) => bail!("{user}: expected Welcome, got {}", other.kind()),
            None => bail!("{user}: closed before Welcome"),
        }
    }
}

fn encode(codec: Codec, frame: &Frame) -> Message {
    match codec.encode(frame) {
        bimip_proto::codec::Encoded::Binary(b) => Message::Binary(b),
        bimip_proto::codec::Encoded::Text(t) => Message::Text(t.into()),
    }
}

impl Writer {
    /// Queues `body` with the next correlation id without writing; returns the id.
    pub async fn feed(&mut self, body: Body) -> anyhow::Result<u64> {
        let r = self.next_ref;
        self.next_ref += 1;
        let msg = encode(self.codec, &Frame::with(r, body));
        self.sink.feed(msg).await?;
        Ok(r)
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.sink.flush().await?;
        Ok(())
    }

    /// Sends `body` at once; returns its correlation id.
    pub async fn send(&mut self, body: Body) -> anyhow::Result<u64> {
        let r = self.feed(body).await?;
        self.flush().await?;
        Ok(r)
    }

    /// Close frame 1000, bounded by one second.
    pub async fn close(&mut self) {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            self.sink.send(Message::Close(Some(frame))),
        )
        .await;
    }
}

impl Reader {
    /// The next frame; `None` once the connection is closed. Cancel-safe.
    pub async fn recv(&mut self) -> anyhow::Result<Option<Frame>> {
        let mut close = None;
        Ok(bimip_client::read_frame(&mut self.stream, self.codec, &mut close).await?)
    }

    /// Like [`Reader::recv`], with a deadline; `Ok(None)` also on timeout.
    pub async fn recv_timeout(&mut self, t: Duration) -> anyhow::Result<Option<Frame>> {
        match tokio::time::timeout(t, self.recv()).await {
            Ok(r) => r,
            Err(_) => Ok(None),
        }
    }

    /// Reads the ONLINE fan-out up to and including the `Summary` (bounded by `t`).
    pub async fn read_fanout(&mut self, t: Duration) -> anyhow::Result<v1::Summary> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let f = tokio::time::timeout_at(deadline, self.recv())
                .await
                .map_err(|_| anyhow!("no Summary within {t:?} of Welcome"))??;
            match f {
                Some(Frame {
                    body: Some(Body::Summary(s)),
                    ..
                }) => return Ok(s),
                Some(_) => {}
                None => bail!("closed during the ONLINE fan-out"),
            }
        }
    }
}
