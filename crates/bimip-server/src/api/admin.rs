//! Revoking a user's tokens and kicking devices (API key).

use super::{ApiError, ErrorBody, require_api_key, valid_user};
use crate::{sessions::Disconnect, state::Shared};
use axum::{
    Json,
    extract::{Path, State},
    http::HeaderMap,
};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Serialize, ToSchema)]
pub struct RevokeReply {
    user: String,
    /// Tokens of this user are accepted again only with `iat` >= this (unix seconds); tokens
    /// without `iat` are refused from now on.
    not_before: i64,
    /// Connections told to close (4501 "revoked").
    closed: usize,
}

#[derive(Serialize, ToSchema)]
pub struct KickReply {
    user: String,
    device: String,
    /// Connections told to close (4502 "kicked").
    closed: usize,
}

/// Revoke a user's sessions: every token of the user issued up to now (by `iat`; tokens
/// without `iat` too) is refused from now on, also after a restart, and all the user's
/// connections are closed with 4501 "revoked".
#[utoipa::path(post, path = "/v1/users/{user}/revoke",
    params(("user" = String, Path, description = "user id")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "revoked", body = RevokeReply),
        (status = 400, description = "malformed user id", body = ErrorBody),
        (status = 401, description = "missing or wrong API key", body = ErrorBody),
        (status = 503, description = "the revocation could not be stored", body = ErrorBody),
    ))]
pub async fn revoke(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Result<Json<RevokeReply>, ApiError> {
    require_api_key(&state, &headers)?;
    valid_user(&user)?;
    let not_before = state.revocations.revoke(&user).await.map_err(|e| {
        tracing::error!(error = %e, "storing a revocation");
        ApiError::unavailable("the revocation could not be stored")
    })?;
    state.metrics.revocations.inc();
    state.revocations.announce(&state, &user, not_before).await;
    let closed = state
        .hub
        .kick_everywhere(&user, None, Disconnect::Revoked)
        .await;
    tracing::info!(user = %user, not_before, closed, "tokens revoked");
    Ok(Json(RevokeReply {
        user,
        not_before,
        closed,
    }))
}

/// Kick one device: its connections are closed with 4502 "kicked" (it may reconnect with a
/// valid token; revoke the user to refuse its tokens).
#[utoipa::path(post, path = "/v1/users/{user}/devices/{device}/kick",
    params(("user" = String, Path, description = "user id"),
           ("device" = String, Path, description = "device id")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "kicked (closed may be 0 when the device was not connected)", body = KickReply),
        (status = 400, description = "malformed user or device id", body = ErrorBody),
        (status = 401, description = "missing or wrong API key", body = ErrorBody),
    ))]
pub async fn kick(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((user, device)): Path<(String, String)>,
) -> Result<Json<KickReply>, ApiError> {
    require_api_key(&state, &headers)?;
    valid_user(&user)?;
    bimip_proto::validate_device_id(&device).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let closed = state
        .hub
        .kick_everywhere(&user, Some(&device), Disconnect::Kicked)
        .await;
    tracing::info!(user = %user, device = %device, closed, "device kicked");
    Ok(Json(KickReply {
        user,
        device,
        closed,
    }))
}
