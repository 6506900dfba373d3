//! A user's queue over HTTP: conversation history in pages, and unread counts. For apps (and
//! the web demo) that show a chat before or without a WebSocket; the API key or the user's own
//! token.

use super::{ApiError, ErrorBody, require_user_or_api_key, valid_user};
use crate::{
    history::{self, Page},
    state::Shared,
};
use axum::{
    Json,
    extract::{Path, Query, State},
    http::HeaderMap,
};
use base64::Engine;
use bimip_proto::v1::Partition;
use bimip_store::{Item, QueueStore};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Messages in one page when `limit` is left out.
const DEFAULT_LIMIT: u32 = 50;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryParams {
    /// The other user of the conversation: messages from it, and the user's own copies of what
    /// it sent to it. Left out: every item of the partition in the user's queue.
    #[serde(default)]
    contact: Option<String>,
    /// `chat` (default) or `notification`.
    #[serde(default)]
    partition: Option<String>,
    /// First offset of the page, inclusive: the oldest with `order=asc` (default 1), the newest
    /// with `order=desc` (default: the newest message). Take it from `next_offset`.
    #[serde(default)]
    from_offset: Option<u64>,
    /// Messages per page: default 50, at most 1000.
    #[serde(default)]
    limit: Option<u32>,
    /// `asc` (default, oldest first) or `desc` (newest first).
    #[serde(default)]
    order: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct HistoryMessage {
    /// Offset in this user's queue.
    offset: u64,
    /// The message id the sender gave it.
    id: String,
    from: String,
    to: String,
    /// Unix ms when stored.
    timestamp: i64,
    /// The payload, standard Base64.
    payload: String,
    /// The payload as text, when it is valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    /// The sending device ("" for the system or the HTTP API).
    device: String,
    /// A device of this user acknowledged it (messages from others only).
    acknowledged: bool,
    /// For the user's own copy of a message it sent: the offset the message has in the
    /// recipient's queue, which the recipient's receipts name.
    #[serde(skip_serializing_if = "Option::is_none")]
    peer_offset: Option<u64>,
}

impl From<Item> for HistoryMessage {
    fn from(i: Item) -> HistoryMessage {
        HistoryMessage {
            offset: i.offset,
            text: std::str::from_utf8(&i.payload).ok().map(str::to_string),
            payload: base64::engine::general_purpose::STANDARD.encode(&i.payload),
            id: i.message_id,
            from: i.from,
            to: i.to,
            timestamp: i.timestamp,
            device: i.device,
            acknowledged: i.acknowledged,
            peer_offset: (i.peer_offset > 0).then_some(i.peer_offset),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct HistoryReply {
    /// In the order asked.
    messages: Vec<HistoryMessage>,
    /// `from_offset` of the next page; null when there is none.
    next_offset: Option<u64>,
}

/// A page of the user's conversation with `contact`: both directions, as stored in the user's
/// queue (what RESUME reads, plus the user's own copies). Reading moves no cursor; send receipts
/// on the WebSocket for that.
#[utoipa::path(get, path = "/v1/users/{user}/messages",
    params(("user" = String, Path, description = "user id"), HistoryParams),
    security(("api_key" = []), ("user_token" = [])),
    responses(
        (status = 200, description = "one page", body = HistoryReply),
        (status = 400, description = "malformed user id or parameter", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "a token of another user", body = ErrorBody),
        (status = 503, description = "storage unavailable", body = ErrorBody),
    ))]
pub async fn history(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(user): Path<String>,
    Query(q): Query<HistoryParams>,
) -> Result<Json<HistoryReply>, ApiError> {
    valid_user(&user)?;
    require_user_or_api_key(&state, &headers, &user)?;
    if let Some(c) = &q.contact {
        valid_user(c).map_err(|e| ApiError::bad_request(format!("contact: {}", e.message)))?;
    }
    let partition = match q.partition.as_deref() {
        None | Some("chat") => Partition::Chat,
        Some("notification") => Partition::Notification,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "partition {other:?}: expected \"chat\" or \"notification\""
            )));
        }
    };
    let newest_first = match q.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "order {other:?}: expected \"asc\" or \"desc\""
            )));
        }
    };
    // 0 is no offset: ascending starts at the oldest, descending at the newest.
    let start = match (q.from_offset.filter(|&o| o > 0), newest_first) {
        (Some(o), _) => Some(o),
        (None, false) => Some(1),
        (None, true) => None,
    };
    let page = Page {
        device: String::new(),
        partition,
        with_sent: q.contact.is_some() && partition == Partition::Chat,
        peer: q.contact,
        start,
        limit: q.limit.unwrap_or(0),
        default_limit: DEFAULT_LIMIT,
        newest_first,
    };
    let batch = history::read_page(&state, &user, page).await?;
    Ok(Json(HistoryReply {
        next_offset: batch.more.then_some(batch.next_offset),
        messages: batch.items.into_iter().map(HistoryMessage::from).collect(),
    }))
}

#[derive(Serialize, ToSchema)]
pub struct UnreadItem {
    /// The sender.
    from: String,
    /// Chat messages from it that no device of the user acknowledged.
    count: u64,
    first_offset: u64,
    last_offset: u64,
}

#[derive(Serialize, ToSchema)]
pub struct UnreadReply {
    /// One entry per sender with unread messages, ordered by sender.
    unread: Vec<UnreadItem>,
    /// The sum of the counts (a badge).
    total: u64,
}

/// Unread chat per sender: messages past the furthest cursor (delivered or read) of any of the
/// user's devices. Page them with `GET /v1/users/{user}/messages?contact=...&from_offset=first_offset`.
#[utoipa::path(get, path = "/v1/users/{user}/unread",
    params(("user" = String, Path, description = "user id")),
    security(("api_key" = []), ("user_token" = [])),
    responses(
        (status = 200, description = "unread counts", body = UnreadReply),
        (status = 400, description = "malformed user id", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "a token of another user", body = ErrorBody),
        (status = 503, description = "storage unavailable", body = ErrorBody),
    ))]
pub async fn unread(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Result<Json<UnreadReply>, ApiError> {
    valid_user(&user)?;
    require_user_or_api_key(&state, &headers, &user)?;
    let u = state
        .store
        .unread(&user)
        .await
        .map_err(crate::error::Refused::from)?;
    Ok(Json(UnreadReply {
        unread: u
            .senders
            .into_iter()
            .map(|s| UnreadItem {
                from: s.from,
                count: s.unread,
                first_offset: s.first_offset,
                last_offset: s.last_offset,
            })
            .collect(),
        total: u.total,
    }))
}
