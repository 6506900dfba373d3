//! Presence queries, contacts and blocks. The routes naming a user take the backend's API key or
//! that user's own token; the others the API key only.

use super::{
    ApiError, Caller, ErrorBody, parse_json, require_api_key, require_user_or_api_key, valid_user,
};
use crate::{awareness, state::Shared};
use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State},
    http::HeaderMap,
};
use bimip_proto::v1::{self, Status};
use bimip_store::ProfileStore;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Most users one presence query may ask about.
const MAX_QUERY_USERS: usize = 1000;
/// Most contacts one import may carry.
const MAX_IMPORT: usize = 10_000;

#[derive(Serialize, ToSchema)]
pub struct PresenceReply {
    user: String,
    /// `online` or `offline` (device state; an invisible user is `offline`).
    status: String,
    /// `away`, `busy`, `dnd`, or null when none is set.
    intent: Option<String>,
    /// Custom status text set with the intent.
    details: String,
    /// Devices connected now.
    devices: usize,
    /// Unix ms when the user was last online (0 when unknown or online now).
    last_seen: i64,
    /// Present only when asked with `include_invisible=true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    invisible: Option<bool>,
}

#[derive(Deserialize, IntoParams, Default)]
pub struct PresenceParams {
    /// Show the real state of invisible users (backend use).
    #[serde(default)]
    include_invisible: bool,
}

fn intent_name(s: i32) -> Option<String> {
    match Status::try_from(s) {
        Ok(Status::Away) => Some("away".into()),
        Ok(Status::Busy) => Some("busy".into()),
        Ok(Status::Dnd) => Some("dnd".into()),
        _ => None,
    }
}

async fn presence_of(
    state: &Shared,
    user: String,
    include_invisible: bool,
) -> Result<PresenceReply, ApiError> {
    let (a, devices) = awareness::view(state, None, &user, include_invisible).await?;
    Ok(PresenceReply {
        user,
        status: if a.status == Status::Online as i32 {
            "online"
        } else {
            "offline"
        }
        .into(),
        intent: intent_name(a.intent),
        details: a.details,
        devices,
        last_seen: a.last_seen,
        invisible: include_invisible.then_some(a.invisible),
    })
}

/// Presence of one user: device state, intent, devices online, last seen.
#[utoipa::path(get, path = "/v1/users/{user}/presence",
    params(("user" = String, Path, description = "user id"), PresenceParams),
    security(("api_key" = []), ("user_token" = [])),
    responses(
        (status = 200, description = "presence", body = PresenceReply),
        (status = 400, description = "malformed user id", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "a token of another user", body = ErrorBody),
    ))]
pub async fn user_presence(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(user): Path<String>,
    Query(p): Query<PresenceParams>,
) -> Result<Json<PresenceReply>, ApiError> {
    valid_user(&user)?;
    require_user_or_api_key(&state, &headers, &user)?;
    Ok(Json(presence_of(&state, user, p.include_invisible).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PresenceQuery {
    /// Up to 1000 user ids.
    users: Vec<String>,
    #[serde(default)]
    include_invisible: bool,
}

#[derive(Serialize, ToSchema)]
pub struct PresenceQueryReply {
    users: Vec<PresenceReply>,
}

/// Presence of many users at once (at most 1000).
#[utoipa::path(post, path = "/v1/presence/query", request_body = PresenceQuery,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "presence of each user, in the order asked", body = PresenceQueryReply),
        (status = 400, description = "malformed user id or too many users", body = ErrorBody),
        (status = 401, description = "missing or wrong API key", body = ErrorBody),
    ))]
pub async fn query_presence(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<PresenceQueryReply>, ApiError> {
    require_api_key(&state, &headers)?;
    let q: PresenceQuery = parse_json(&body)?;
    if q.users.len() > MAX_QUERY_USERS {
        return Err(ApiError::bad_request(format!(
            "{} users asked, at most {MAX_QUERY_USERS} per query",
            q.users.len()
        )));
    }
    for u in &q.users {
        valid_user(u).map_err(|e| ApiError::bad_request(format!("users: {}", e.message)))?;
    }
    let mut users = Vec::with_capacity(q.users.len());
    for u in q.users {
        users.push(presence_of(&state, u, q.include_invisible).await?);
    }
    Ok(Json(PresenceQueryReply { users }))
}

#[derive(Serialize, Deserialize, ToSchema, Clone)]
pub struct ContactItem {
    user: String,
    /// The contact does not see this user back.
    #[serde(default)]
    one_way: bool,
}

#[derive(Serialize, ToSchema)]
pub struct ContactsReply {
    user: String,
    /// Users this user listed, with their presence as this user may see it.
    contacts: Vec<ContactView>,
    /// Users that see this user's awareness.
    watchers: Vec<String>,
    /// Users this user blocks.
    blocks: Vec<String>,
}

/// One contact and its presence, exactly as the user would see it on the WebSocket (a
/// `Subscribe` snapshot): invisible users and users blocking this one are `offline`.
#[derive(Serialize, ToSchema)]
pub struct ContactView {
    user: String,
    /// The contact does not see this user back.
    one_way: bool,
    /// A device of the contact is connected.
    online: bool,
    /// `online`, `away`, `busy`, `dnd` (online with that intent) or `offline`.
    status: String,
    /// Custom status text set with the intent.
    details: String,
    /// Unix ms when the contact was last online (0 when unknown, online, or not visible).
    last_seen: i64,
}

impl ContactView {
    fn new(user: String, one_way: bool, seen: Option<v1::Awareness>) -> ContactView {
        // A listed contact is always seen (blocked: as offline); None only if the two sides
        // of the relation disagree after a crash, which the next change of it repairs.
        let Some(a) = seen else {
            return ContactView {
                user,
                one_way,
                online: false,
                status: "offline".into(),
                details: String::new(),
                last_seen: 0,
            };
        };
        let online = a.status == Status::Online as i32;
        let status = match (online, intent_name(a.intent)) {
            (false, _) => "offline".to_string(),
            (true, Some(intent)) => intent,
            (true, None) => "online".to_string(),
        };
        ContactView {
            user,
            one_way,
            online,
            status,
            details: a.details,
            last_seen: a.last_seen,
        }
    }
}

/// A user's contacts with their presence, its watchers and its blocks.
#[utoipa::path(get, path = "/v1/users/{user}/contacts",
    params(("user" = String, Path, description = "user id")),
    security(("api_key" = []), ("user_token" = [])),
    responses(
        (status = 200, description = "contacts", body = ContactsReply),
        (status = 400, description = "malformed user id", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "a token of another user", body = ErrorBody),
    ))]
pub async fn list_contacts(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Result<Json<ContactsReply>, ApiError> {
    valid_user(&user)?;
    require_user_or_api_key(&state, &headers, &user)?;
    let p = state
        .store
        .profile(&user)
        .await
        .map_err(crate::error::Refused::from)?;
    let mut contacts = Vec::with_capacity(p.contacts.len());
    for (c, one_way) in &p.contacts {
        let seen = awareness::seen_by(&state, &user, c).await?;
        contacts.push(ContactView::new(c.clone(), *one_way, seen));
    }
    Ok(Json(ContactsReply {
        contacts,
        watchers: p.watchers().into_iter().collect(),
        blocks: p.blocks.iter().cloned().collect(),
        user,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContactImport {
    /// Contacts to add (or update).
    contacts: Vec<ContactItem>,
    /// Also remove the user's contacts that are not in this list.
    #[serde(default)]
    replace: bool,
}

#[derive(Serialize, ToSchema)]
pub struct ChangedReply {
    /// Entries added, changed or removed.
    changed: usize,
}

/// Bulk import of a contact list in one call (at most 10,000 entries).
#[utoipa::path(post, path = "/v1/users/{user}/contacts", request_body = ContactImport,
    params(("user" = String, Path, description = "user id")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "imported", body = ChangedReply),
        (status = 400, description = "malformed ids or body", body = ErrorBody),
    ))]
pub async fn import_contacts(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(user): Path<String>,
    body: Bytes,
) -> Result<Json<ChangedReply>, ApiError> {
    require_api_key(&state, &headers)?;
    valid_user(&user)?;
    let b: ContactImport = parse_json(&body)?;
    if b.contacts.len() > MAX_IMPORT {
        return Err(ApiError::bad_request(format!(
            "{} contacts, at most {MAX_IMPORT} per import",
            b.contacts.len()
        )));
    }
    for c in &b.contacts {
        valid_user(&c.user)
            .map_err(|e| ApiError::bad_request(format!("contacts: {}", e.message)))?;
        if c.user == user {
            return Err(ApiError::bad_request(
                "a user cannot list itself as a contact",
            ));
        }
    }
    let entries = b
        .contacts
        .into_iter()
        .map(|c| (c.user, c.one_way))
        .collect();
    let changed = state
        .store
        .put_contacts(&user, entries, b.replace)
        .await
        .map_err(crate::error::Refused::from)?;
    Ok(Json(ChangedReply { changed }))
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ContactBody {
    /// The contact does not see this user back (default: mutual).
    #[serde(default)]
    one_way: bool,
}

/// Add or update one contact. Contacts are mutual for presence unless `one_way` is true. With a
/// user's own token only when `presence.user_contacts` is on (`--dev` or `--user-contacts`).
#[utoipa::path(put, path = "/v1/users/{user}/contacts/{contact}", request_body(content = ContactBody, description = "optional"),
    params(("user" = String, Path), ("contact" = String, Path)),
    security(("api_key" = []), ("user_token" = [])),
    responses(
        (status = 200, description = "stored", body = ChangedReply),
        (status = 400, description = "malformed ids or body", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "a token of another user, or a user's own token while `presence.user_contacts` is off", body = ErrorBody),
    ))]
pub async fn put_contact(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((user, contact)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<ChangedReply>, ApiError> {
    valid_user(&user)?;
    valid_user(&contact)?;
    let caller = require_user_or_api_key(&state, &headers, &user)?;
    if caller == Caller::User && !state.config.user_contacts_enabled() {
        return Err(ApiError::forbidden(
            "users may not add contacts with their own token on this server \
             (presence.user_contacts is off): add them from the backend with the API key",
        ));
    }
    if user == contact {
        return Err(ApiError::bad_request(
            "a user cannot list itself as a contact",
        ));
    }
    let b: ContactBody = if body.iter().all(|b| b.is_ascii_whitespace()) {
        ContactBody::default()
    } else {
        parse_json(&body)?
    };
    let changed = state
        .store
        .put_contacts(&user, vec![(contact, b.one_way)], false)
        .await
        .map_err(crate::error::Refused::from)?;
    Ok(Json(ChangedReply { changed }))
}

/// Remove one contact (both directions of the relation).
#[utoipa::path(delete, path = "/v1/users/{user}/contacts/{contact}",
    params(("user" = String, Path), ("contact" = String, Path)),
    security(("api_key" = []), ("user_token" = [])),
    responses(
        (status = 200, description = "removed (changed=0 when it was not a contact)", body = ChangedReply),
        (status = 400, description = "malformed ids", body = ErrorBody),
        (status = 401, description = "missing or invalid credentials", body = ErrorBody),
        (status = 403, description = "a token of another user", body = ErrorBody),
    ))]
pub async fn delete_contact(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((user, contact)): Path<(String, String)>,
) -> Result<Json<ChangedReply>, ApiError> {
    valid_user(&user)?;
    valid_user(&contact)?;
    require_user_or_api_key(&state, &headers, &user)?;
    let existed = state
        .store
        .remove_contact(&user, &contact)
        .await
        .map_err(crate::error::Refused::from)?;
    Ok(Json(ChangedReply {
        changed: usize::from(existed),
    }))
}

async fn block(
    state: &Shared,
    headers: &HeaderMap,
    user: String,
    other: String,
    blocked: bool,
) -> Result<Json<ChangedReply>, ApiError> {
    valid_user(&user)?;
    valid_user(&other)?;
    require_user_or_api_key(state, headers, &user)?;
    if user == other {
        return Err(ApiError::bad_request("a user cannot block itself"));
    }
    let changed = state
        .store
        .set_block(&user, &other, blocked)
        .await
        .map_err(crate::error::Refused::from)?;
    state
        .profiles
        .refresh(&state.store, &user)
        .await
        .map_err(crate::error::Refused::from)?;
    crate::awareness::profile_changed(state, &user).await;
    Ok(Json(ChangedReply {
        changed: usize::from(changed),
    }))
}

/// Block a user: its messages and typing are refused and it sees this user as OFFLINE.
#[utoipa::path(put, path = "/v1/users/{user}/blocks/{other}",
    params(("user" = String, Path), ("other" = String, Path)),
    security(("api_key" = []), ("user_token" = [])),
    responses(
        (status = 200, description = "blocked", body = ChangedReply),
        (status = 400, description = "malformed ids", body = ErrorBody),
        (status = 403, description = "a token of another user", body = ErrorBody),
    ))]
pub async fn put_block(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((user, other)): Path<(String, String)>,
) -> Result<Json<ChangedReply>, ApiError> {
    block(&state, &headers, user, other, true).await
}

/// Unblock a user.
#[utoipa::path(delete, path = "/v1/users/{user}/blocks/{other}",
    params(("user" = String, Path), ("other" = String, Path)),
    security(("api_key" = []), ("user_token" = [])),
    responses(
        (status = 200, description = "unblocked", body = ChangedReply),
        (status = 400, description = "malformed ids", body = ErrorBody),
        (status = 403, description = "a token of another user", body = ErrorBody),
    ))]
pub async fn delete_block(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((user, other)): Path<(String, String)>,
) -> Result<Json<ChangedReply>, ApiError> {
    block(&state, &headers, user, other, false).await
}
