//! Push over HTTP: device tokens, the devices of a user, mutes, notifications to many users,
//! dead letters, and a test push.
//!
//! The `{user}` routes accept the API key or the JWT of that same user (a device registering its
//! own token); `POST /v1/notifications`, the dead letters and the test push need the API key.

use super::{
    ApiError, ErrorBody, parse_json, require_api_key, require_user_or_api_key, valid_user,
};
use crate::{
    delivery::{self, SYSTEM_SENDER, SendRequest},
    push::devices::{self, Registration},
    state::Shared,
};
use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use bimip_proto::v1::{self, Partition};
use bimip_push::Outcome;
use bimip_store::{
    PushStore,
    push::{IdempotencyRecord, Job, PushKind},
};
use futures_util::{StreamExt, stream};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

/// Most recipients of one notification request.
pub const MAX_NOTIFICATION_USERS: usize = 10_000;
/// How long an `Idempotency-Key` answer is kept.
const IDEMPOTENCY_MS: i64 = 24 * 3600 * 1000;
/// Longest `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 255;
/// Stores running at once for one notification request.
const NOTIFY_CONCURRENCY: usize = 256;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushTokenBody {
    /// `fcm`, `apns` or `webhook`.
    platform: String,
    /// The device token (FCM registration token, APNs device token in hex, or an opaque
    /// string for the app's own push service).
    token: String,
    /// APNs: a development build's token, sent to Apple's sandbox.
    #[serde(default)]
    sandbox: bool,
    /// The device's locale, e.g. `en` (informational).
    #[serde(default)]
    locale: String,
}

#[derive(Serialize, ToSchema)]
pub struct PushTokenReply {
    user: String,
    device: String,
    platform: String,
    /// The token, masked (first and last four characters).
    token: String,
    /// Unix ms.
    registered_at: i64,
    /// Devices the same token was registered for before; it was removed from them.
    moved_from: Vec<DeviceRef>,
}

#[derive(Serialize, ToSchema)]
pub struct DeviceRef {
    user: String,
    device: String,
}

#[derive(Serialize, ToSchema)]
pub struct RemovedReply {
    /// Whether there was something to remove.
    removed: bool,
}

#[derive(Serialize, ToSchema)]
pub struct DevicesReply {
    user: String,
    devices: Vec<DeviceItem>,
}

#[derive(Serialize, ToSchema)]
pub struct DeviceItem {
    device: String,
    /// The device has an open WebSocket connection now.
    online: bool,
    /// `fcm`, `apns`, `webhook`, or null without a push token.
    platform: Option<String>,
    /// The push token, masked; null without one.
    token: Option<String>,
    sandbox: bool,
    locale: String,
    /// Unix ms when the token was registered (0 without one).
    registered_at: i64,
    /// Unix ms of the last push sent to the device (0 = none).
    last_push_at: i64,
}

#[derive(Serialize, ToSchema)]
pub struct ChangedReply {
    /// 1 when something changed, 0 when it already was so.
    changed: usize,
}

#[derive(Serialize, ToSchema)]
pub struct MutesReply {
    user: String,
    mutes: Vec<MuteItem>,
}

#[derive(Serialize, ToSchema)]
pub struct MuteItem {
    user: String,
    /// Unix ms.
    since: i64,
}

fn platform_from_name(s: &str) -> Result<v1::Platform, ApiError> {
    match s {
        "fcm" => Ok(v1::Platform::Fcm),
        "apns" => Ok(v1::Platform::Apns),
        "webhook" => Ok(v1::Platform::Webhook),
        other => Err(ApiError::bad_request(format!(
            "platform {other:?}: expected \"fcm\", \"apns\" or \"webhook\""
        ))),
    }
}

fn platform_name(p: i32) -> String {
    crate::push::platform_of(p)
        .map_or("unspecified", |p| p.name())
        .to_string()
}

fn valid_device(device: &str) -> Result<(), ApiError> {
    bimip_proto::validate_device_id(device).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Register the push token of a device. The same token registered for another user or device
/// is removed from there (a phone that changed hands stops getting the old user's pushes).
#[utoipa::path(put, path = "/v1/users/{user}/devices/{device}/push-token",
    request_body = PushTokenBody,
    params(("user" = String, Path, description = "user id"), ("device" = String, Path, description = "device id")),
    security(("api_key" = []), ("user_token" = [])),
    responses(
        (status = 200, description = "registered", body = PushTokenReply),
        (status = 400, description = "invalid request", body = ErrorBody),
        (status = 401, description = "missing or wrong credentials", body = ErrorBody),
        (status = 403, description = "a token of another user", body = ErrorBody),
        (status = 413, description = "token too long", body = ErrorBody),
    ))]
pub async fn put_push_token(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((user, device)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<PushTokenReply>, ApiError> {
    valid_user(&user)?;
    valid_device(&device)?;
    require_user_or_api_key(&state, &headers, &user)?;
    let b: PushTokenBody = parse_json(&body)?;
    let reg = Registration {
        platform: platform_from_name(&b.platform)?,
        token: b.token,
        sandbox: b.sandbox,
        locale: b.locale,
    };
    let token = devices::masked(&reg.token);
    let (moved, registered_at) = devices::register(&state, &user, &device, reg).await?;
    Ok(Json(PushTokenReply {
        user,
        device,
        platform: b.platform,
        token,
        registered_at,
        moved_from: moved
            .into_iter()
            .map(|(user, device)| DeviceRef { user, device })
            .collect(),
    }))
}

/// Remove the push token of a device: it gets no more pushes.
#[utoipa::path(delete, path = "/v1/users/{user}/devices/{device}/push-token",
    params(("user" = String, Path, description = "user id"), ("device" = String, Path, description = "device id")),
    security(("api_key" = []), ("user_token" = [])),
    responses(
        (status = 200, description = "removed (or there was none)", body = RemovedReply),
        (status = 400, description = "invalid user or device id", body = ErrorBody),
        (status = 401, description = "missing or wrong credentials", body = ErrorBody),
        (status = 403, description = "a token of another user", body = ErrorBody),
    ))]
pub async fn delete_push_token(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((user, device)): Path<(String, String)>,
) -> Result<Json<RemovedReply>, ApiError> {
    valid_user(&user)?;
    valid_device(&device)?;
    require_user_or_api_key(&state, &headers, &user)?;
    let removed = devices::unregister(&state, &user, &device).await?;
    Ok(Json(RemovedReply { removed }))
}

/// The known devices of a user: those with a push token and those connected now.
#[utoipa::path(get, path = "/v1/users/{user}/devices",
    params(("user" = String, Path, description = "user id")),
    security(("api_key" = []), ("user_token" = [])),
    responses(
        (status = 200, description = "the devices, by device id", body = DevicesReply),
        (status = 401, description = "missing or wrong credentials", body = ErrorBody),
        (status = 403, description = "a token of another user", body = ErrorBody),
    ))]
pub async fn list_devices(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Result<Json<DevicesReply>, ApiError> {
    valid_user(&user)?;
    require_user_or_api_key(&state, &headers, &user)?;
    let devices = devices::list(&state, &user)
        .await?
        .into_iter()
        .map(|d| {
            let t = d.token.unwrap_or_default();
            let has = !t.token.is_empty();
            DeviceItem {
                device: d.device,
                online: d.online,
                platform: has.then(|| platform_name(t.platform)),
                token: has.then(|| devices::masked(&t.token)),
                sandbox: t.sandbox,
                locale: t.locale,
                registered_at: t.registered_at,
                last_push_at: t.last_push_at,
            }
        })
        .collect();
    Ok(Json(DevicesReply { user, devices }))
}

/// Mute chat pushes from `other` for `user` (messages are still delivered).
#[utoipa::path(put, path = "/v1/users/{user}/mutes/{other}",
    params(("user" = String, Path, description = "user id"), ("other" = String, Path, description = "the user to mute")),
    security(("api_key" = []), ("user_token" = [])),
    responses(
        (status = 200, description = "muted", body = ChangedReply),
        (status = 400, description = "invalid user id", body = ErrorBody),
        (status = 401, description = "missing or wrong credentials", body = ErrorBody),
        (status = 403, description = "a token of another user", body = ErrorBody),
    ))]
pub async fn put_mute(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((user, other)): Path<(String, String)>,
) -> Result<Json<ChangedReply>, ApiError> {
    mute(&state, &headers, user, other, true).await
}

/// Unmute: chat pushes from `other` resume.
#[utoipa::path(delete, path = "/v1/users/{user}/mutes/{other}",
    params(("user" = String, Path, description = "user id"), ("other" = String, Path, description = "the muted user")),
    security(("api_key" = []), ("user_token" = [])),
    responses(
        (status = 200, description = "unmuted", body = ChangedReply),
        (status = 400, description = "invalid user id", body = ErrorBody),
        (status = 401, description = "missing or wrong credentials", body = ErrorBody),
        (status = 403, description = "a token of another user", body = ErrorBody),
    ))]
pub async fn delete_mute(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((user, other)): Path<(String, String)>,
) -> Result<Json<ChangedReply>, ApiError> {
    mute(&state, &headers, user, other, false).await
}

async fn mute(
    state: &Shared,
    headers: &HeaderMap,
    user: String,
    other: String,
    muted: bool,
) -> Result<Json<ChangedReply>, ApiError> {
    valid_user(&user)?;
    valid_user(&other)?;
    require_user_or_api_key(state, headers, &user)?;
    let changed = devices::set_mute(state, &user, &other, muted).await?;
    Ok(Json(ChangedReply {
        changed: usize::from(changed),
    }))
}

/// The users a user muted.
#[utoipa::path(get, path = "/v1/users/{user}/mutes",
    params(("user" = String, Path, description = "user id")),
    security(("api_key" = []), ("user_token" = [])),
    responses(
        (status = 200, description = "muted users, by user id", body = MutesReply),
        (status = 401, description = "missing or wrong credentials", body = ErrorBody),
        (status = 403, description = "a token of another user", body = ErrorBody),
    ))]
pub async fn list_mutes(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Result<Json<MutesReply>, ApiError> {
    valid_user(&user)?;
    require_user_or_api_key(&state, &headers, &user)?;
    let mutes = state
        .store
        .mutes(&user)
        .await
        .map_err(crate::error::Refused::from)?
        .into_iter()
        .map(|m| MuteItem {
            user: m.other,
            since: m.since,
        })
        .collect();
    Ok(Json(MutesReply { user, mutes }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NotificationBody {
    /// Recipients (at most 10,000).
    to: Vec<String>,
    title: String,
    #[serde(default)]
    body: String,
    /// String values for the app (delivered in the message and in the push).
    #[serde(default)]
    data: BTreeMap<String, String>,
    /// `normal` (default) or `high`: high bypasses DND, mutes and coalescing (OTPs, alerts).
    #[serde(default)]
    priority: Option<String>,
    /// The sending user; omitted = `system`.
    #[serde(default)]
    from: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct NotificationReply {
    /// The notification's message id (the same in every recipient's queue).
    id: String,
    recipients: usize,
    /// Recipients it was newly stored for.
    stored: usize,
    /// Recipients that already had it (a retry of the same request).
    duplicates: usize,
    /// Recipients whose store refused it (see `errors`).
    failed: usize,
    /// Up to 100 of the failures: user and reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    errors: Vec<NotificationError>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct NotificationError {
    user: String,
    error: String,
}

/// Send a notification (an OTP, an account alert) to up to 10,000 users: stored in each
/// recipient's `notification` partition, delivered at once to its online devices (and in the
/// ONLINE fan-out otherwise), and pushed to its devices without a connection. With an
/// `Idempotency-Key` header, a retried request (same key and body, within 24 h) stores nothing
/// twice and gets the first answer again; the same key with another body is refused (422).
#[utoipa::path(post, path = "/v1/notifications", request_body = NotificationBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "makes retries safe (24 h)")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "stored for the recipients", body = NotificationReply),
        (status = 400, description = "invalid request", body = ErrorBody),
        (status = 401, description = "missing or wrong API key", body = ErrorBody),
        (status = 413, description = "too many recipients or too large", body = ErrorBody),
        (status = 422, description = "idempotency key reused with another request", body = ErrorBody),
    ))]
pub async fn notify(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    require_api_key(&state, &headers)?;
    let key = idempotency_key(&headers)?;
    let request_hash = Sha256::digest(&body).to_vec();
    if let Some(key) = &key
        && let Some(rec) = state
            .store
            .idempotency(key)
            .await
            .map_err(crate::error::Refused::from)?
    {
        if rec.request_hash.as_ref() != request_hash.as_slice() {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_conflict",
                "this Idempotency-Key was used with a different request body in the last 24 hours",
            ));
        }
        let status = StatusCode::from_u16(rec.status as u16).unwrap_or(StatusCode::OK);
        let mut resp = (status, rec.response.to_vec()).into_response();
        resp.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        );
        resp.headers_mut().insert(
            "idempotent-replayed",
            axum::http::HeaderValue::from_static("true"),
        );
        return Ok(resp);
    }
    let b: NotificationBody = parse_json(&body)?;
    if b.to.is_empty() {
        return Err(ApiError::bad_request("to: at least one recipient"));
    }
    if b.to.len() > MAX_NOTIFICATION_USERS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "to: {} recipients, at most {MAX_NOTIFICATION_USERS} per request",
                b.to.len()
            ),
        ));
    }
    for u in &b.to {
        valid_user(u).map_err(|e| ApiError::bad_request(format!("to: {}", e.message)))?;
    }
    if b.title.is_empty() {
        return Err(ApiError::bad_request("title must not be empty"));
    }
    let high = match b.priority.as_deref() {
        None | Some("normal") => false,
        Some("high") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "priority {other:?}: expected \"normal\" or \"high\""
            )));
        }
    };
    let from = match &b.from {
        Some(f) => {
            valid_user(f).map_err(|e| ApiError::bad_request(format!("from: {}", e.message)))?;
            f.clone()
        }
        None => SYSTEM_SENDER.to_string(),
    };
    // A retry with the same key stores the same message id, which each queue recognizes as a
    // duplicate: even a retry after a crash before the answer was kept delivers nothing twice.
    // The key and the body together: the same key with another body (after the 24 h, or two
    // requests racing) is another notification, not a duplicate.
    let id = match &key {
        Some(k) => {
            let mut h = Sha256::new();
            h.update(k.as_bytes());
            h.update([0]);
            h.update(&request_hash);
            format!("ntf-{}", &hex::encode(h.finalize())[..32])
        }
        None => format!(
            "ntf-{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        ),
    };
    let payload = serde_json::json!({
        "title": b.title,
        "body": b.body,
        "data": b.data,
        "priority": if high { "high" } else { "normal" },
    });
    let payload: bytes::Bytes = serde_json::to_vec(&payload).unwrap_or_default().into();
    if payload.len() > state.config.max_payload_bytes as usize {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "the notification is {} bytes as stored, at most {} are allowed",
                payload.len(),
                state.config.max_payload_bytes
            ),
        ));
    }
    let mut recipients: Vec<String> = b.to;
    recipients.sort();
    recipients.dedup();
    let results: Vec<(String, Result<v1::Ack, crate::error::Refused>)> =
        stream::iter(recipients.into_iter().map(|to| {
            let req = SendRequest {
                from: from.as_str().into(),
                device: "".into(),
                conn: None,
                to: to.clone(),
                id: id.clone(),
                partition: Partition::Notification,
                payload: payload.clone(),
                sender_copy: false,
            };
            let state = state.clone();
            async move {
                let r = match delivery::start_send(&state, req).await {
                    Ok(fut) => fut.await,
                    Err(e) => Err(e),
                };
                (to, r)
            }
        }))
        .buffer_unordered(NOTIFY_CONCURRENCY)
        .collect()
        .await;
    let mut reply = NotificationReply {
        id,
        recipients: results.len(),
        stored: 0,
        duplicates: 0,
        failed: 0,
        errors: Vec::new(),
    };
    for (user, r) in results {
        match r {
            Ok(ack) if ack.duplicate => reply.duplicates += 1,
            Ok(_) => reply.stored += 1,
            Err(e) => {
                reply.failed += 1;
                if reply.errors.len() < 100 {
                    reply.errors.push(NotificationError {
                        user,
                        error: e.message,
                    });
                }
            }
        }
    }
    let json = serde_json::to_vec(&reply).unwrap_or_default();
    if let Some(key) = key
        && reply.failed == 0
    {
        let rec = IdempotencyRecord {
            key,
            request_hash: request_hash.into(),
            status: 200,
            response: json.clone().into(),
            expires_at: bimip_proto::now_ms() + IDEMPOTENCY_MS,
        };
        if let Err(e) = state.store.put_idempotency(rec).await {
            tracing::warn!(error = %e, "storing an idempotency key");
        }
    }
    let mut resp = (StatusCode::OK, json).into_response();
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let k = v
        .to_str()
        .map_err(|_| ApiError::bad_request("Idempotency-Key must be visible ASCII"))?
        .trim();
    if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ApiError::bad_request(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters"
        )));
    }
    Ok(Some(k.to_string()))
}

#[derive(Deserialize, IntoParams)]
pub struct DeadLetterParams {
    /// Most entries returned, newest first (default 100, at most 10,000).
    #[serde(default)]
    limit: Option<usize>,
}

#[derive(Serialize, ToSchema)]
pub struct DeadLettersReply {
    dead_letters: Vec<DeadLetterItem>,
}

#[derive(Serialize, ToSchema)]
pub struct DeadLetterItem {
    /// The job's id.
    id: u64,
    /// Unix ms when it was given up on.
    at: i64,
    /// `max_attempts`, `max_age`, `invalid`, `provider_disabled`.
    reason: String,
    /// `fcm`, `apns`, `webhook`, or `events` (an event webhook).
    provider: String,
    /// `chat`, `notification`, `test`, or the event type.
    kind: String,
    /// The recipient (pushes).
    user: String,
    device: String,
    /// The sender (pushes).
    from: String,
    attempts: u32,
    /// The provider's last answer.
    last_error: String,
    /// Unix ms when the job was created.
    created_at: i64,
}

/// Push and event jobs that were given up on, newest first.
#[utoipa::path(get, path = "/v1/push/dead-letters",
    params(DeadLetterParams),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "dead letters, newest first", body = DeadLettersReply),
        (status = 401, description = "missing or wrong API key", body = ErrorBody),
    ))]
pub async fn dead_letters(
    State(state): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<DeadLetterParams>,
) -> Result<Json<DeadLettersReply>, ApiError> {
    require_api_key(&state, &headers)?;
    let limit = q
        .limit
        .unwrap_or(100)
        .min(bimip_store::push::MAX_DEAD_LETTERS);
    let list = state
        .store
        .dead_letters(limit)
        .await
        .map_err(crate::error::Refused::from)?;
    let dead_letters = list
        .into_iter()
        .map(|d| {
            let job = d.job.unwrap_or_default();
            let (kind, user, device, from) = match &job.job {
                Some(Job::Push(p)) => (
                    match PushKind::try_from(p.kind) {
                        Ok(PushKind::Chat) => "chat",
                        Ok(PushKind::Notification) => "notification",
                        Ok(PushKind::Test) => "test",
                        Err(_) => "unknown",
                    }
                    .to_string(),
                    p.user.clone(),
                    p.device.clone(),
                    p.from.clone(),
                ),
                Some(Job::Event(e)) => (
                    e.r#type.clone(),
                    String::new(),
                    String::new(),
                    String::new(),
                ),
                None => (String::new(), String::new(), String::new(), String::new()),
            };
            DeadLetterItem {
                id: job.id,
                at: d.at,
                reason: d.reason,
                provider: d.provider,
                kind,
                user,
                device,
                from,
                attempts: job.attempts,
                last_error: job.last_error,
                created_at: job.created_at,
            }
        })
        .collect();
    Ok(Json(DeadLettersReply { dead_letters }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushTestBody {
    user: String,
    /// Only this device (default: every device of the user with a token).
    #[serde(default)]
    device: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct PushTestReply {
    user: String,
    results: Vec<PushTestResult>,
}

#[derive(Serialize, ToSchema)]
pub struct PushTestResult {
    device: String,
    platform: String,
    /// `sent`, `retry`, `drop_token`, `invalid` or `provider_config`.
    outcome: String,
    /// The provider's receipt or reason.
    detail: String,
}

/// Send a test push to a user's devices now (outside the outbox, no retries) and report what
/// each provider answered. Nothing is stored and no token is removed.
#[utoipa::path(post, path = "/v1/push/test", request_body = PushTestBody,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "the providers' answers", body = PushTestReply),
        (status = 400, description = "invalid request", body = ErrorBody),
        (status = 401, description = "missing or wrong API key", body = ErrorBody),
        (status = 404, description = "the user (or device) has no push token", body = ErrorBody),
    ))]
pub async fn test_push(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<PushTestReply>, ApiError> {
    require_api_key(&state, &headers)?;
    let b: PushTestBody = parse_json(&body)?;
    valid_user(&b.user)?;
    if let Some(d) = &b.device {
        valid_device(d)?;
    }
    let results = state
        .push
        .test(&b.user, b.device.as_deref())
        .await
        .map_err(crate::error::Refused::from)?;
    if results.is_empty() {
        return Err(ApiError::not_found(match &b.device {
            Some(d) => format!("device {d:?} of {:?} has no push token", b.user),
            None => format!("{:?} has no device with a push token", b.user),
        }));
    }
    Ok(Json(PushTestReply {
        user: b.user,
        results: results
            .into_iter()
            .map(|(device, platform, outcome)| {
                let detail = match &outcome {
                    Outcome::Sent { receipt } => receipt.clone(),
                    Outcome::Retry { reason, .. }
                    | Outcome::DropToken { reason, .. }
                    | Outcome::Invalid { reason }
                    | Outcome::ProviderConfig { reason } => reason.clone(),
                };
                PushTestResult {
                    device,
                    platform,
                    outcome: outcome.label().to_string(),
                    detail,
                }
            })
            .collect(),
    }))
}
