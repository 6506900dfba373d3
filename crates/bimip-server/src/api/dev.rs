//! `POST /dev/token`, in development mode only (`bimip serve --dev`): mints a client token for
//! any user, so the web demo can sign in without an app backend. Only callers on the loopback
//! interface are served; without `--dev` the route does not exist (404).

use super::{ApiError, ErrorBody, parse_json, valid_user};
use crate::state::Shared;
use axum::{
    Json,
    body::Bytes,
    extract::{ConnectInfo, State},
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use utoipa::ToSchema;

/// How long a dev token is valid.
const DEV_TOKEN_TTL_SECS: i64 = 24 * 3600;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DevTokenBody {
    /// The user to sign in as (any valid user id).
    user: String,
    /// Device id written into the token; omitted = the client names its device.
    #[serde(default)]
    device: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct DevTokenReply {
    /// HS256 JWT for `GET /ws` and the user's HTTP routes.
    token: String,
    user: String,
    /// Unix seconds when the token expires (24 h from now).
    expires_at: i64,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: i64,
    iat: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Development mode only: a 24-hour token for any user, signed with the server's HS256 secret.
/// Refused (403) unless the caller connects from the loopback interface.
#[utoipa::path(post, path = "/dev/token", request_body = DevTokenBody,
    responses(
        (status = 200, description = "a token", body = DevTokenReply),
        (status = 400, description = "invalid user or device id", body = ErrorBody),
        (status = 403, description = "not a loopback caller, or the server has no HS256 secret", body = ErrorBody),
        (status = 404, description = "the server is not in development mode", body = ErrorBody),
    ))]
pub async fn dev_token(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Result<Json<DevTokenReply>, ApiError> {
    // Behind a proxy on the same machine every caller looks local: dev mode is for a laptop.
    if !peer.ip().is_loopback() {
        return Err(ApiError::forbidden(
            "dev tokens are minted only for callers on this machine (loopback)",
        ));
    }
    let b: DevTokenBody = parse_json(&body)?;
    valid_user(&b.user)?;
    if let Some(d) = &b.device {
        bimip_proto::validate_device_id(d)
            .map_err(|e| ApiError::bad_request(format!("device: {e}")))?;
    }
    let Some(secret) = state.config.jwt.secret.as_deref() else {
        return Err(ApiError::forbidden(
            "dev tokens need an HS256 secret; this server verifies tokens with a public key",
        ));
    };
    let iat = bimip_proto::now_ms() / 1000;
    let expires_at = iat + DEV_TOKEN_TTL_SECS;
    let claims = Claims {
        sub: &b.user,
        exp: expires_at,
        iat,
        device: b.device.as_deref(),
        iss: state.config.jwt.issuer.as_deref(),
        aud: state.config.jwt.audience.as_deref(),
    };
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("signing the token: {e}"),
        )
    })?;
    tracing::debug!(user = %b.user, "dev token minted");
    Ok(Json(DevTokenReply {
        token,
        user: b.user,
        expires_at,
    }))
}
