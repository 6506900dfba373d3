//! The HTTP side of the server, on the same port as the WebSocket gateway: health, readiness,
//! Prometheus metrics, the OpenAPI document, the backend API (API key; the routes naming a user
//! also take that user's own token), the dev token route (`--dev`) and the web demo (`--web`).
//! Every error is JSON: `{"error":{"code":"...","message":"..."}}`.

mod admin;
mod dev;
mod messages;
mod presence;
mod push;

use crate::{
    auth::api_key_matches,
    delivery::{self, SYSTEM_SENDER, SendRequest},
    error::Refused,
    gateway,
    state::Shared,
};
use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use base64::Engine;
use bimip_proto::v1::{ErrorCode, Partition};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

/// An HTTP error with its JSON body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code: bad_request, unauthorized, forbidden, not_found,
    /// too_large, rate_limited, unavailable, internal.
    code: String,
    /// What went wrong, for humans.
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", m)
    }
    pub fn unauthorized(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", m)
    }
    pub fn forbidden(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::FORBIDDEN, "forbidden", m)
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "not_found", m)
    }
    pub fn unavailable(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
    }
}

impl From<Refused> for ApiError {
    fn from(r: Refused) -> ApiError {
        let (status, code) = match r.code {
            ErrorCode::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
            ErrorCode::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ErrorCode::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            ErrorCode::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ErrorCode::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ErrorCode::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ErrorCode::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ErrorCode::Internal | ErrorCode::Unspecified => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiError::new(status, code, r.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.into(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

/// Builds the router for one server.
pub fn router(state: Shared) -> Router {
    let body_limit = state.config.max_http_body_bytes;
    let mut app = Router::new();
    if state.config.dev {
        app = app.route("/dev/token", post(dev::dev_token));
    }
    if state.config.web_enabled() {
        app = app.merge(crate::web::routes());
    }
    app.route("/ws", get(gateway::upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/v1/messages", post(send_message))
        .route("/v1/users/{user}/presence", get(presence::user_presence))
        .route("/v1/presence/query", post(presence::query_presence))
        .route(
            "/v1/users/{user}/contacts",
            get(presence::list_contacts).post(presence::import_contacts),
        )
        .route(
            "/v1/users/{user}/contacts/{contact}",
            put(presence::put_contact).delete(presence::delete_contact),
        )
        .route(
            "/v1/users/{user}/blocks/{other}",
            put(presence::put_block).delete(presence::delete_block),
        )
        .route("/v1/users/{user}/messages", get(messages::history))
        .route("/v1/users/{user}/unread", get(messages::unread))
        .route("/v1/users/{user}/revoke", post(admin::revoke))
        .route("/v1/users/{user}/devices/{device}/kick", post(admin::kick))
        .route(
            "/v1/users/{user}/devices/{device}/push-token",
            put(push::put_push_token).delete(push::delete_push_token),
        )
        .route("/v1/users/{user}/devices", get(push::list_devices))
        .route("/v1/users/{user}/mutes", get(push::list_mutes))
        .route(
            "/v1/users/{user}/mutes/{other}",
            put(push::put_mute).delete(push::delete_mute),
        )
        .route("/v1/notifications", post(push::notify))
        .route("/v1/push/dead-letters", get(push::dead_letters))
        .route("/v1/push/test", post(push::test_push))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            request_timeout,
        ))
        .layer(middleware::from_fn(json_errors))
        .with_state(state)
}

/// Answers 503 (JSON) when a request, body included, takes longer than
/// `limits.http_timeout_ms`.
async fn request_timeout(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let limit = std::time::Duration::from_millis(state.config.limits.http_timeout_ms);
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            state.metrics.http_timeouts.inc();
            ApiError::unavailable(format!(
                "request timed out after {} ms",
                state.config.limits.http_timeout_ms
            ))
            .into_response()
        }
    }
}

/// Turns the plain-text errors of extractors (body too large, malformed path, ...) into the
/// JSON error body every other error has.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let text = axum::body::to_bytes(resp.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let code = match status {
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    ApiError::new(status, code, message).into_response()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "bimip",
        description = "Presence and message-delivery server for chat apps: HTTP API for app backends \
                       and clients. Backend routes need `Authorization: Bearer <api key>`; the routes \
                       that name a user in the path also take that user's own token (JWT), and refuse \
                       a token of another user with 403. Clients connect with a WebSocket to `GET /ws` \
                       (see docs/PROTOCOL.md). `POST /dev/token` exists only in development mode."
    ),
    paths(
        healthz,
        readyz,
        metrics,
        send_message,
        presence::user_presence,
        presence::query_presence,
        presence::list_contacts,
        presence::import_contacts,
        presence::put_contact,
        presence::delete_contact,
        presence::put_block,
        presence::delete_block,
        messages::history,
        messages::unread,
        dev::dev_token,
        admin::revoke,
        admin::kick,
        push::put_push_token,
        push::delete_push_token,
        push::list_devices,
        push::put_mute,
        push::delete_mute,
        push::list_mutes,
        push::notify,
        push::dead_letters,
        push::test_push
    ),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        SendMessageBody,
        SendMessageReply,
        presence::PresenceReply,
        presence::PresenceQuery,
        presence::PresenceQueryReply,
        presence::ContactsReply,
        presence::ContactView,
        presence::ContactItem,
        presence::ContactImport,
        presence::ContactBody,
        presence::ChangedReply,
        messages::HistoryReply,
        messages::HistoryMessage,
        messages::UnreadReply,
        messages::UnreadItem,
        dev::DevTokenBody,
        dev::DevTokenReply,
        admin::RevokeReply,
        admin::KickReply,
        push::PushTokenBody,
        push::PushTokenReply,
        push::DeviceRef,
        push::RemovedReply,
        push::DevicesReply,
        push::DeviceItem,
        push::ChangedReply,
        push::MutesReply,
        push::MuteItem,
        push::NotificationBody,
        push::NotificationReply,
        push::NotificationError,
        push::DeadLettersReply,
        push::DeadLetterItem,
        push::PushTestBody,
        push::PushTestReply,
        push::PushTestResult
    )),
    modifiers(&ApiKeyScheme)
)]
struct ApiDoc;

struct ApiKeyScheme;

impl utoipa::Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The server's API key (--api-key)"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "user_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A client token (JWT) of the user named in the path: it reaches only that user's data",
                    ))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI 3.1 document of this API.
pub fn openapi_doc() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

async fn openapi() -> impl IntoResponse {
    Json(openapi_doc())
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "alive")))]
async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

/// Readiness: accepting connections (false while shutting down).
#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, description = "ready"),
    (status = 503, description = "shutting down", body = ErrorBody)
))]
async fn readyz(State(state): State<Shared>) -> Response {
    if state.is_accepting() {
        Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        ApiError::unavailable("shutting down").into_response()
    }
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
async fn metrics(State(state): State<Shared>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// Checks the backend API key.
pub(crate) fn require_api_key(state: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = state.config.api_key.as_deref() else {
        return Err(ApiError::forbidden(
            "the backend API is disabled: start the server with --api-key",
        ));
    };
    match gateway::bearer_token(headers) {
        Some(given) if api_key_matches(expected, given) => Ok(()),
        Some(_) => Err(ApiError::unauthorized("wrong API key")),
        None => Err(ApiError::unauthorized(
            "missing API key: send `Authorization: Bearer <api key>`",
        )),
    }
}

/// Checks a `{user}` route's credentials: the backend's API key, or a client token (JWT) of
/// that same user. A token of another user is refused with 403.
/// Who made an HTTP request that names a user: the backend, or that user itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Caller {
    ApiKey,
    User,
}

pub(crate) fn require_user_or_api_key(
    state: &Shared,
    headers: &HeaderMap,
    user: &str,
) -> Result<Caller, ApiError> {
    let Some(given) = gateway::bearer_token(headers) else {
        return Err(ApiError::unauthorized(
            "missing credentials: send `Authorization: Bearer <api key or the user's token>`",
        ));
    };
    if let Some(expected) = state.config.api_key.as_deref()
        && api_key_matches(expected, given)
    {
        return Ok(Caller::ApiKey);
    }
    let id = state.verifier.verify(given).map_err(|e| {
        state.metrics.auth_failures.inc();
        ApiError::unauthorized(format!("neither the API key nor a valid token: {e}"))
    })?;
    if !state.revocations.allows(&id.user, id.iat) {
        state.metrics.auth_failures.inc();
        return Err(ApiError::unauthorized(
            crate::auth::AuthError::Revoked.to_string(),
        ));
    }
    if id.user != user {
        return Err(ApiError::forbidden(
            "this token belongs to another user: a user's token reaches only its own data",
        ));
    }
    Ok(Caller::User)
}

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

pub(crate) fn valid_user(user: &str) -> Result<(), ApiError> {
    bimip_proto::validate_user_id(user).map_err(|e| ApiError::bad_request(e.to_string()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendMessageBody {
    /// Sending user; omitted = the system (no copy is kept for a sender).
    #[serde(default)]
    from: Option<String>,
    /// Recipient user id.
    to: String,
    /// Message id, unique per sender (a resend with the same id is not stored twice);
    /// generated when omitted.
    #[serde(default)]
    id: Option<String>,
    /// `chat` (default) or `notification`.
    #[serde(default)]
    partition: Option<String>,
    /// Payload as standard Base64.
    #[serde(default)]
    payload: Option<String>,
    /// Payload as UTF-8 text (instead of `payload`).
    #[serde(default)]
    text: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct SendMessageReply {
    id: String,
    /// Offset of the message in the recipient's queue.
    offset: u64,
    /// Unix ms when stored.
    timestamp: i64,
    /// True when this id was already stored from this sender (nothing new was stored).
    duplicate: bool,
}

/// Send a message or notification as a user or as the system. Same path as a WebSocket send:
/// stored durably in the recipient's queue, then delivered to its online devices.
#[utoipa::path(post, path = "/v1/messages", request_body = SendMessageBody,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "stored", body = SendMessageReply),
        (status = 400, description = "invalid request", body = ErrorBody),
        (status = 401, description = "missing or wrong API key", body = ErrorBody),
        (status = 413, description = "payload too large", body = ErrorBody),
        (status = 503, description = "storage unavailable", body = ErrorBody),
    ))]
async fn send_message(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<SendMessageReply>, ApiError> {
    require_api_key(&state, &headers)?;
    let b: SendMessageBody = parse_json(&body)?;
    let partition = match b.partition.as_deref() {
        None | Some("chat") => Partition::Chat,
        Some("notification") => Partition::Notification,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "partition {other:?}: expected \"chat\" or \"notification\""
            )));
        }
    };
    let payload = match (b.payload, b.text) {
        (Some(p), None) => base64::engine::general_purpose::STANDARD
            .decode(p)
            .map_err(|e| ApiError::bad_request(format!("payload is not standard Base64: {e}")))?
            .into(),
        (None, Some(t)) => t.into_bytes().into(),
        (None, None) => bytes::Bytes::new(),
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give either payload or text, not both",
            ));
        }
    };
    let (from, sender_copy) = match b.from {
        Some(f) => {
            valid_user(&f).map_err(|e| ApiError::bad_request(format!("from: {}", e.message)))?;
            (f, true)
        }
        None => (SYSTEM_SENDER.to_string(), false),
    };
    let req = SendRequest {
        from: from.into(),
        device: "".into(),
        conn: None,
        to: b.to,
        id: b
            .id
            .unwrap_or_else(|| format!("http-{:016x}", rand::random::<u64>())),
        partition,
        payload,
        sender_copy,
    };
    req.validate(state.config.max_payload_bytes as usize)?;
    let id = req.id.clone();
    let ack = delivery::start_send(&state, req).await?.await?;
    Ok(Json(SendMessageReply {
        id,
        offset: ack.offset,
        timestamp: ack.timestamp,
        duplicate: ack.duplicate,
    }))
}
