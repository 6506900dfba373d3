//! `GET /ws`: authenticates the upgrade request (before any WebSocket exists), picks the codec
//! from the subprotocol and hands the socket to [`crate::conn`]. A missing, malformed or forged
//! token is refused with HTTP 401; a genuine token that expired or was revoked gets the upgrade
//! and an immediate close with 4001 or 4501, which a browser can see.

use crate::{
    api::ApiError,
    auth::AuthError,
    conn::{self, ConnIdent},
    limits::Refusal,
    sessions::{Disconnect, close},
    state::Shared,
};
use axum::{
    extract::{
        Query, State,
        ws::{CloseFrame, Message, WebSocketUpgrade, rejection::WebSocketUpgradeRejection},
    },
    http::{HeaderMap, header::AUTHORIZATION},
    response::{IntoResponse, Response},
};
use bimip_proto::codec::{Codec, SUBPROTOCOL_BINARY, SUBPROTOCOL_JSON};
use serde::Deserialize;
use std::{sync::Arc, time::Duration};

/// Read buffer per connection. tungstenite's 128 KiB default is zero-filled on first read and
/// would cost ~130 KB of RSS per idle connection; larger frames still work (the buffer grows).
const READ_BUFFER: usize = 1024;
/// Bytes buffered before tungstenite writes to the socket (its default is 128 KiB). A device
/// that stopped reading holds at most about this much here besides its outbox.
const WRITE_BUFFER: usize = 32 * 1024;
/// How long a connection closed at the upgrade waits for the peer's close reply.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(2);

#[derive(Deserialize, Default)]
pub struct WsQuery {
    token: Option<String>,
    device: Option<String>,
}

pub async fn upgrade(
    State(state): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<WsQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if !state.is_accepting() {
        return ApiError::unavailable("server is shutting down").into_response();
    }
    let token = bearer(&headers).or(q.token.as_deref());
    let identity = match token
        .ok_or(AuthError::Missing)
        .and_then(|t| state.verifier.verify(t))
    {
        Ok(id) => id,
        Err(AuthError::Expired) => {
            state.metrics.auth_failures.inc();
            state.metrics.refused("token_expired");
            tracing::debug!("upgrade with an expired token: closing with 4001");
            return close_at_once(&state, ws, close::TOKEN_EXPIRED, "token expired");
        }
        Err(e) => {
            state.metrics.auth_failures.inc();
            tracing::debug!(error = %e, "upgrade refused");
            return ApiError::unauthorized(e.to_string()).into_response();
        }
    };
    if !state.revocations.allows(&identity.user, identity.iat) {
        state.metrics.auth_failures.inc();
        state.metrics.refused("revoked");
        let why = Disconnect::Revoked;
        return close_at_once(&state, ws, why.code(), why.reason());
    }
    let user: Arc<str> = Arc::from(identity.user);
    let slot = match state.conn_limits.acquire(&user) {
        Ok(slot) => slot,
        Err(Refusal::User) => {
            state.metrics.refused("user_limit");
            return ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "this user already has {} connections",
                    state.config.limits.max_connections_per_user
                ),
            )
            .into_response();
        }
        Err(Refusal::Server) => {
            state.metrics.refused("server_limit");
            return ApiError::unavailable("the server is at its connection limit").into_response();
        }
    };
    let device = match identity.device.or(q.device) {
        Some(d) => {
            if let Err(e) = bimip_proto::validate_device_id(&d) {
                return ApiError::bad_request(format!("invalid device: {e}")).into_response();
            }
            d
        }
        None => format!("dev-{:016x}", rand::random::<u64>()),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return ApiError::bad_request(format!("not a WebSocket upgrade: {e}")).into_response();
        }
    };
    let max = state.config.max_frame_bytes as usize;
    let ws = ws
        .protocols([SUBPROTOCOL_BINARY, SUBPROTOCOL_JSON])
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(max)
        .max_frame_size(max);
    let codec = Codec::from_subprotocol(ws.selected_protocol().and_then(|p| p.to_str().ok()));
    let ident = ConnIdent {
        user,
        device: Arc::from(device),
        codec,
        session: format!("{:016x}", rand::random::<u64>()),
        exp: identity.exp,
        iat: identity.iat,
        slot: Some(slot),
    };
    let connections = state.connections.clone();
    ws.on_upgrade(move |socket| connections.track_future(conn::run(state, socket, ident)))
}

/// Accepts the upgrade only to close it at once with an application close code: a browser
/// cannot read the HTTP status of a refused upgrade (it sees a bare 1006), but it can read a
/// close code. Only for tokens that are genuine but no longer usable (expired, revoked); a
/// request that is not a WebSocket upgrade gets the plain HTTP 401.
fn close_at_once(
    state: &Shared,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    code: u16,
    reason: &'static str,
) -> Response {
    let Ok(ws) = ws else {
        return ApiError::unauthorized(reason).into_response();
    };
    // The subprotocol must be echoed: a browser that asked for one fails a handshake without it
    // (1006 again, the close code unread).
    let ws = ws
        .protocols([SUBPROTOCOL_BINARY, SUBPROTOCOL_JSON])
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(READ_BUFFER)
        .max_frame_size(READ_BUFFER);
    let connections = state.connections.clone();
    ws.on_upgrade(move |mut socket| {
        connections.track_future(async move {
            let frame = Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            }));
            if socket.send(frame).await.is_err() {
                return;
            }
            // Wait for the peer's close reply (briefly): closing the TCP connection first could
            // reset it before the peer read the close frame.
            let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, async {
                while let Some(Ok(_)) = socket.recv().await {}
            })
            .await;
        })
    })
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Shared by the HTTP API: the bearer token of a request.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    bearer(headers)
}
