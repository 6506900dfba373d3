//! One task per WebSocket connection: it owns the socket and `select!`s over incoming frames,
//! its bounded outbox (frames routed to it by others), the answers of its in-flight requests and
//! the heartbeat timer. Requests are pipelined (up to `max_inflight`) and answered in order.

use crate::{
    awareness,
    error::{Refused, error_label},
    fanout, handlers,
    limits::TokenBucket,
    sessions::{ConnHandle, ConnSignal, Disconnect, Outbound, close},
    state::Shared,
};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bimip_proto::{
    Body,
    codec::{Codec, Encoded, salvage_json_ref},
    v1::{self, ErrorCode, Frame, Partition},
};
use bimip_store::QueueStore;
use futures_util::{SinkExt, StreamExt, future::BoxFuture, stream::FuturesOrdered};
use std::{collections::BTreeSet, sync::Arc, time::Duration};
use tokio::{sync::mpsc, time::Instant};

/// Who is on the other end of a connection.
pub struct ConnIdent {
    pub user: Arc<str>,
    pub device: Arc<str>,
    pub codec: Codec,
    pub session: String,
    /// Token expiry (unix seconds): the connection is closed with 4001 once it (plus the
    /// configured leeway) has passed.
    pub exp: i64,
    /// Token issue time (unix seconds), checked again against revocations after registering.
    pub iat: Option<i64>,
    /// The admission slot, given back when the connection ends.
    pub slot: Option<crate::limits::ConnSlot>,
}

/// Most frames written to the socket before one flush.
const WRITE_BATCH: usize = 64;
/// Longest wait for the close frame to be written when the server ends a connection.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the loop ended.
pub(crate) enum End {
    /// The peer closed or the socket failed; nothing more to send.
    Gone,
    /// We close with this code and reason.
    Close(u16, &'static str),
}

pub(crate) type Answer = BoxFuture<'static, Vec<Frame>>;

/// One connection's state, owned by its task. The frame handlers (`handlers/`) work on it.
pub(crate) struct Conn {
    pub(crate) state: Shared,
    socket: WebSocket,
    pub(crate) id: ConnIdent,
    pub(crate) conn_id: u64,
    /// Answers of requests in flight, in request order.
    pub(crate) inflight: FuturesOrdered<Answer>,
    last_rx: Instant,
    last_ping: Instant,
    /// This connection's registry handle (subscriptions deliver through it).
    pub(crate) handle: Option<ConnHandle>,
    /// Users this connection subscribed to (open policy), removed when it closes.
    pub(crate) subscribed: BTreeSet<String>,
    pub(crate) typing: TokenBucket,
    /// Rate limit of all data frames of this connection.
    frames: TokenBucket,
    /// Frames refused for the rate limit in the current one-second window.
    flood: (Instant, u32),
    write_timeout: Duration,
    /// When the token expires (None: too far away to matter).
    expires: Option<Instant>,
    signal: Arc<ConnSignal>,
    /// Set when a write was abandoned because the connection was told to close meanwhile.
    closing: Option<Disconnect>,
    /// The lowest offset of a chat message from another user routed to this connection in real
    /// time (0 = none yet). If the connection is then lost (no clean close), the push pipeline
    /// looks at what is unacknowledged from there on.
    first_live_offset: u64,
    /// The connection ended without a clean close: heartbeat timeout, reset, a failed or stuck
    /// write, or a full outbox. Frames routed to it may not have reached the device.
    lost: bool,
}

pub async fn run(state: Shared, socket: WebSocket, ident: ConnIdent) {
    let conn_id = state.next_conn_id();
    let (tx, rx) = mpsc::channel(state.config.outbox_frames);
    let signal = Arc::new(ConnSignal::with_max_bytes(state.config.limits.outbox_bytes));
    let limits = &state.config.limits;
    let expires = expiry_instant(ident.exp, state.verifier.leeway());
    state.metrics.connections.inc();
    state.metrics.connections_total.inc();
    let now = Instant::now();
    let mut conn = Conn {
        state: state.clone(),
        socket,
        id: ident,
        conn_id,
        inflight: FuturesOrdered::new(),
        last_rx: now,
        last_ping: now,
        handle: None,
        subscribed: BTreeSet::new(),
        typing: TokenBucket::new(state.config.presence.typing_per_second),
        frames: TokenBucket::with_burst(limits.frames_per_second, limits.frames_burst),
        flood: (now, 0),
        write_timeout: Duration::from_millis(limits.write_timeout_ms),
        expires,
        signal: signal.clone(),
        closing: None,
        first_live_offset: 0,
        lost: false,
    };
    let mut end = conn.start(tx, rx, signal).await;
    if let (End::Gone, Some(why)) = (&end, conn.closing) {
        end = End::Close(why.code(), why.reason());
    }
    if let End::Close(code, reason) = end {
        // A peer that stopped reading cannot take the close frame either: do not wait long.
        let close = conn.socket.send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })));
        let limit = CLOSE_WRITE_TIMEOUT.min(conn.write_timeout);
        let _ = Box::pin(tokio::time::timeout(limit, close)).await;
    }
    awareness::unsubscribe_all(&state, conn_id, &conn.subscribed);
    let last = state.hub.unregister(&conn.id.user, conn_id);
    if conn.lost && conn.first_live_offset > 0 {
        state
            .hub
            .connection_lost(&conn.id.user, &conn.id.device, conn.first_live_offset);
    }
    if last.is_some() {
        state.metrics.users_online.dec();
    }
    // In a cluster, whether this was the user's last connection anywhere is Redis's to say
    // (this node's own view when Redis cannot be reached).
    let gone = match state.hub.cluster() {
        Some(c) => match c.disconnected(&conn.id.user, conn_id).await {
            Ok(gone) => gone,
            Err(_) => last,
        },
        None => last,
    };
    if let Some(last_seen) = gone {
        if state.is_accepting() {
            awareness::disconnected(&state, conn.id.user.clone(), last_seen);
        } else {
            // Shutting down: the store closes once every connection is gone, so record now.
            Box::pin(awareness::record_last_seen(
                &state,
                &conn.id.user,
                last_seen,
            ))
            .await;
        }
    }
    state.metrics.connections.dec();
    tracing::debug!(user = %conn.id.user, device = %conn.id.device, "connection closed");
}

impl Conn {
    /// Greets (boxed: its state is large and only needed once, so it must not size the
    /// future every idle connection keeps), then serves until the connection ends.
    async fn start(
        &mut self,
        tx: mpsc::Sender<Arc<Outbound>>,
        rx: mpsc::Receiver<Arc<Outbound>>,
        signal: Arc<ConnSignal>,
    ) -> End {
        if let Err(end) = Box::pin(self.greet(tx, &signal)).await {
            return end;
        }
        self.run_loop(rx, signal).await
    }

    /// Registers the connection, sends Welcome and the ONLINE fan-out.
    async fn greet(
        &mut self,
        tx: mpsc::Sender<Arc<Outbound>>,
        signal: &Arc<ConnSignal>,
    ) -> Result<(), End> {
        let cfg = &self.state.config;
        let welcome = Frame::with(
            0,
            Body::Welcome(v1::Welcome {
                user: self.id.user.to_string(),
                device: self.id.device.to_string(),
                session: self.id.session.clone(),
                server_time: bimip_proto::now_ms(),
                heartbeat_ms: cfg.heartbeat_ms,
                max_frame_bytes: cfg.max_frame_bytes,
                node: cfg.node.clone(),
            }),
        );
        // Registered before Welcome goes out (a client that saw Welcome is online for everyone
        // else) and before reading what is pending (nothing stored meanwhile is missed). Frames
        // routed here meanwhile wait in the outbox until after the fan-out.
        let handle = ConnHandle {
            id: self.conn_id,
            device: self.id.device.clone(),
            tx,
            signal: signal.clone(),
        };
        self.handle = Some(handle.clone());
        if self.state.hub.register(&self.id.user, handle) {
            self.state.metrics.users_online.inc();
        }
        // A revoke between the upgrade check and the registration above found nothing to close.
        if !self.state.revocations.allows(&self.id.user, self.id.iat) {
            self.state.metrics.disconnect("revoked");
            let why = Disconnect::Revoked;
            return Err(End::Close(why.code(), why.reason()));
        }
        if self.write_now(&welcome).await.is_err() {
            return Err(End::Gone);
        }
        awareness::connected(&self.state, &self.id.user, self.conn_id, &self.id.device).await;
        match self
            .state
            .store
            .pending(&self.id.user, &self.id.device)
            .await
        {
            Ok(pending) => {
                for f in fanout::frames(pending) {
                    if self.write(&f).await.is_err() {
                        return Err(End::Gone);
                    }
                }
                if self.flush().await.is_err() {
                    return Err(End::Gone);
                }
            }
            Err(e) => {
                let r = Refused::from(e);
                let _ = self.write_now(&Frame::error(0, r.code, r.message)).await;
            }
        }
        Ok(())
    }

    async fn run_loop(
        &mut self,
        mut rx: mpsc::Receiver<Arc<Outbound>>,
        signal: Arc<ConnSignal>,
    ) -> End {
        let heartbeat = Duration::from_millis(self.state.config.heartbeat_ms as u64);
        let max_inflight = self.state.config.max_inflight;
        // One timer and one close-signal future for the connection's life, not one per loop turn:
        // the timer is armed for the next ping or for when the peer would count as gone, and
        // re-armed only when it fires (last_rx moves forward meanwhile, so firing early is fine).
        let next_check = |c: &Conn| {
            let at = (c.last_ping + heartbeat).min(c.last_rx + 2 * heartbeat);
            c.expires.map_or(at, |exp| at.min(exp))
        };
        let timer = tokio::time::sleep_until(next_check(self));
        tokio::pin!(timer);
        let closed = signal.closed();
        tokio::pin!(closed);
        loop {
            tokio::select! {
                why = &mut closed => {
                    if why == Disconnect::Slow {
                        self.state.metrics.slow_consumers.inc();
                        self.lost = true;
                    }
                    self.state.metrics.disconnect(why.label());
                    return End::Close(why.code(), why.reason());
                }
                msg = self.socket.recv(), if self.inflight.len() < max_inflight => {
                    let Some(msg) = msg else {
                        self.lost = true;
                        return End::Gone;
                    };
                    self.last_rx = Instant::now();
                    if matches!(msg, Ok(Message::Binary(_) | Message::Text(_))) && !self.frames.take() {
                        let r = match &msg {
                            Ok(Message::Binary(data)) => salvage_binary_ref(data),
                            Ok(Message::Text(text)) => salvage_json_ref(text.as_str()),
                            _ => 0,
                        };
                        if let Err(end) = self.rate_limited(r).await {
                            return end;
                        }
                        continue;
                    }
                    match msg {
                        Ok(Message::Binary(data)) => {
                            let decoded = self.id.codec.decode_binary(&data);
                            let r = salvage_binary_ref(&data);
                            if let Err(end) = Box::pin(handlers::on_frame(self, decoded, r)).await {
                                return end;
                            }
                        }
                        Ok(Message::Text(text)) => {
                            let decoded = self.id.codec.decode_text(text.as_str());
                            let r = salvage_json_ref(text.as_str());
                            if let Err(end) = Box::pin(handlers::on_frame(self, decoded, r)).await {
                                return end;
                            }
                        }
                        Ok(Message::Ping(_) | Message::Pong(_)) => {}
                        Ok(Message::Close(_)) => {
                            // tungstenite queued the close reply; flushing completes the handshake.
                            let _ = self.flush().await;
                            return End::Gone;
                        }
                        Err(e) => {
                            self.lost = true;
                            return read_error(e);
                        }
                    }
                }
                Some(out) = rx.recv() => {
                    self.signal.release(out.size());
                    if self.feed(&out).await.is_err() {
                        return End::Gone;
                    }
                    let mut n = 1;
                    while n < WRITE_BATCH {
                        let Ok(out) = rx.try_recv() else { break };
                        self.signal.release(out.size());
                        if self.feed(&out).await.is_err() {
                            return End::Gone;
                        }
                        n += 1;
                    }
                    if self.flush().await.is_err() {
                        return End::Gone;
                    }
                }
                Some(frames) = self.inflight.next(), if !self.inflight.is_empty() => {
                    for f in &frames {
                        if self.write(f).await.is_err() {
                            return End::Gone;
                        }
                    }
                    if self.flush().await.is_err() {
                        return End::Gone;
                    }
                }
                _ = &mut timer => {
                    let now = Instant::now();
                    if self.expires.is_some_and(|exp| now >= exp) {
                        tracing::debug!(user = %self.id.user, "token expired");
                        self.state.metrics.disconnect("token_expired");
                        return End::Close(close::TOKEN_EXPIRED, "token expired");
                    }
                    if now >= self.last_rx + 2 * heartbeat {
                        tracing::debug!(user = %self.id.user, "heartbeat timeout");
                        self.lost = true;
                        return End::Close(1001, "heartbeat timeout");
                    }
                    if now >= self.last_ping + heartbeat {
                        self.last_ping = now;
                        if self.send_raw(Message::Ping(Default::default())).await.is_err() {
                            return End::Gone;
                        }
                    }
                    timer.as_mut().reset(next_check(self));
                }
            }
        }
    }

    /// Waits for every request in flight and writes its answers.
    pub(crate) async fn drain_inflight(&mut self) -> Result<(), End> {
        while let Some(frames) = self.inflight.next().await {
            for f in &frames {
                self.write(f).await.map_err(|_| End::Gone)?;
            }
        }
        self.flush().await.map_err(|_| End::Gone)
    }

    /// A frame over the rate limit: refused with RATE_LIMITED and its ref, not processed. Too
    /// many refusals within one second close the connection (1008).
    pub(crate) async fn rate_limited(&mut self, r: u64) -> Result<(), End> {
        self.state.metrics.frames_rate_limited.inc();
        let now = Instant::now();
        if now.duration_since(self.flood.0) >= Duration::from_secs(1) {
            self.flood = (now, 0);
        }
        self.flood.1 += 1;
        let limits = &self.state.config.limits;
        if self.flood.1 > limits.flood_refusals {
            tracing::debug!(user = %self.id.user, device = %self.id.device, "closed for flooding");
            self.state.metrics.disconnect("rate_limit");
            return Err(End::Close(1008, "rate limit"));
        }
        let message = format!(
            "at most {} frames per second (burst {})",
            limits.frames_per_second, limits.frames_burst
        );
        self.refuse(r, Refused::new(ErrorCode::RateLimited, message))
            .await
    }

    pub(crate) async fn refuse(&mut self, r: u64, e: Refused) -> Result<(), End> {
        self.answer_now(Frame::error(r, e.code, e.message)).await
    }

    /// Sends a frame now, after the answers of requests still in flight (answers keep request
    /// order).
    pub(crate) async fn answer_now(&mut self, frame: Frame) -> Result<(), End> {
        if let Some(Body::Error(e)) = &frame.body {
            self.state.metrics.frame_error(error_label(e.code));
        }
        if self.inflight.is_empty() {
            return self.write_now(&frame).await.map_err(|_| End::Gone);
        }
        self.inflight
            .push_back(Box::pin(std::future::ready(vec![frame])));
        Ok(())
    }

    fn message(&self, frame: &Frame) -> Message {
        to_ws(self.id.codec.encode(frame))
    }

    async fn write(&mut self, frame: &Frame) -> Result<(), axum::Error> {
        let m = self.message(frame);
        let (t, sig) = (self.write_timeout, self.signal.clone());
        let r = guarded(&sig, t, self.socket.feed(m)).await;
        self.timed(r)
    }

    async fn write_now(&mut self, frame: &Frame) -> Result<(), axum::Error> {
        let m = self.message(frame);
        self.send_raw(m).await
    }

    async fn send_raw(&mut self, m: Message) -> Result<(), axum::Error> {
        let (t, sig) = (self.write_timeout, self.signal.clone());
        let r = guarded(&sig, t, self.socket.send(m)).await;
        self.timed(r)
    }

    async fn flush(&mut self) -> Result<(), axum::Error> {
        let (t, sig) = (self.write_timeout, self.signal.clone());
        let r = guarded(&sig, t, self.socket.flush()).await;
        self.timed(r)
    }

    async fn feed(&mut self, out: &Outbound) -> Result<(), axum::Error> {
        if let Some(Body::Message(m)) = &out.frame.body
            && m.partition == Partition::Chat as i32
            && (self.first_live_offset == 0 || m.offset < self.first_live_offset)
            && *m.from != *self.id.user
        {
            self.first_live_offset = m.offset;
        }
        let m = to_ws(out.encoded(self.id.codec).clone());
        let (t, sig) = (self.write_timeout, self.signal.clone());
        let r = guarded(&sig, t, self.socket.feed(m)).await;
        self.timed(r)
    }

    /// The outcome of a guarded write: a write that made no progress for `write_timeout` (the
    /// peer stopped reading) or was overtaken by a close request ends the connection.
    fn timed(&mut self, r: Guarded) -> Result<(), axum::Error> {
        let r = match r {
            Ok(r) => r,
            Err(why) => {
                if why == Disconnect::Slow {
                    self.state.metrics.slow_consumers.inc();
                    self.lost = true;
                }
                self.state.metrics.disconnect(why.label());
                self.closing = Some(why);
                return Err(axum::Error::new(std::io::Error::other(
                    "connection told to close during a write",
                )));
            }
        };
        if !matches!(r, Ok(Ok(()))) {
            self.lost = true;
        }
        r.unwrap_or_else(|_| {
            tracing::debug!(user = %self.id.user, device = %self.id.device, "socket write timed out");
            self.state.metrics.disconnect("write_timeout");
            Err(axum::Error::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "socket write timed out",
            )))
        })
    }
}

type Guarded = Result<Result<Result<(), axum::Error>, tokio::time::error::Elapsed>, Disconnect>;

/// Runs a socket write for at most `limit`, giving up at once when the connection is told to
/// close (a slow consumer blocked in a write must not wait for the timeout).
async fn guarded(
    signal: &ConnSignal,
    limit: Duration,
    write: impl std::future::Future<Output = Result<(), axum::Error>>,
) -> Guarded {
    let mut write = std::pin::pin!(write);
    // Most writes complete at once (buffer or socket has room): no timer, no close-signal waiter.
    if let Some(r) = futures_util::FutureExt::now_or_never(write.as_mut()) {
        return Ok(Ok(r));
    }
    tokio::select! {
        r = tokio::time::timeout(limit, write) => Ok(r),
        why = signal.closed() => Err(why),
    }
}

/// The instant a token expiring at `exp` (unix seconds) stops being valid, `leeway` included;
/// None when it is too far away to represent.
fn expiry_instant(exp: i64, leeway: u64) -> Option<Instant> {
    let now_ms = bimip_proto::now_ms();
    let end_ms = exp
        .saturating_add(leeway.min(i64::MAX as u64) as i64)
        .saturating_mul(1000);
    let left = Duration::from_millis(end_ms.saturating_sub(now_ms).max(0) as u64);
    Instant::now().checked_add(left)
}

/// A bare Ack confirming a frame that has no other answer (receipts, awareness changes).
pub(crate) fn ack_frame(r: u64) -> Frame {
    Frame::with(
        r,
        Body::Ack(v1::Ack {
            timestamp: bimip_proto::now_ms(),
            ..Default::default()
        }),
    )
}

fn to_ws(e: Encoded) -> Message {
    match e {
        Encoded::Binary(b) => Message::Binary(b),
        Encoded::Text(t) => Message::Text(t.into()),
    }
}

fn read_error(e: axum::Error) -> End {
    let inner = e.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(c)) => {
            tracing::debug!(error = %c, "frame over the size limit");
            End::Close(1009, "frame too large")
        }
        Some(tungstenite::Error::Protocol(_)) => End::Close(1002, "protocol error"),
        _ => End::Gone,
    }
}

/// The `ref` of an undecodable binary frame, if its first field can still be read.
pub(crate) fn salvage_binary_ref(data: &[u8]) -> u64 {
    #[derive(Clone, PartialEq, prost::Message)]
    struct RefOnly {
        #[prost(uint64, tag = "1")]
        r#ref: u64,
    }
    <RefOnly as prost::Message>::decode(data)
        .map(|f| f.r#ref)
        .unwrap_or(0)
}
