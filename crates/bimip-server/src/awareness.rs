//! Awareness (docs/PROTOCOL.md §13): who sees whom, and the broadcasts of device state (ONLINE/OFFLINE),
//! intent (AWAY/BUSY/DND), TYPING/RECORDING and invisibility.
//!
//! Watchers come from the durable profile (contacts and blocks, `bimip_store::ProfileStore`);
//! under the `open` policy, connections that subscribed are added. A broadcast encodes its frame
//! once and offers it to each recipient connection without waiting (`ConnHandle::offer`), so a
//! change reaching 1000 watchers is 1000 non-blocking channel sends spread over 64 registry shards.

use crate::{
    cluster::{envelope, envelope::Envelope},
    config::PresencePolicy,
    error::Refused,
    sessions::{ConnHandle, Outbound, PresenceSnapshot},
    state::Shared,
};
use bimip_proto::{
    Body,
    v1::{self, ErrorCode, Status},
};
use bimip_store::{PresenceUpdate, Profile, ProfileStore};
use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

pub const TYPING_DEFAULT_TTL_MS: u32 = 5000;
pub const TYPING_MAX_TTL_MS: u32 = 30_000;

fn awareness_frame(a: v1::Awareness) -> Arc<Outbound> {
    Outbound::new(v1::Frame::with(0, Body::Awareness(a)))
}

fn intent_of(p: &Profile) -> Status {
    match p.intent {
        Status::Away | Status::Busy | Status::Dnd => p.intent,
        _ => Status::Unspecified,
    }
}

/// Sends `frame` about `user` to every watcher's online devices (and open-policy subscribers),
/// never to users it blocks or that block it. In a cluster the other nodes get the same in one
/// publish carrying the watcher list. Returns how many connections of this node got it.
async fn broadcast(state: &Shared, user: &str, profile: &Profile, frame: Arc<Outbound>) -> usize {
    let started = Instant::now();
    let recipients: BTreeSet<String> = profile.watchers();
    let mut delivered = 0;
    if state.config.presence.policy == PresencePolicy::Open {
        for (subscriber, conn) in state.hub.subscribers(user) {
            // A subscriber that is also a watcher gets it once, on every device, below.
            if recipients.contains(&*subscriber)
                || profile.blocks.contains(&*subscriber)
                || profile.blocked_by.contains(&*subscriber)
            {
                continue;
            }
            delivered += usize::from(conn.offer(&frame));
        }
    }
    let mut targets = Vec::with_capacity(recipients.len());
    for r in recipients {
        if profile.blocks.contains(&r) || profile.blocked_by.contains(&r) || r == user {
            continue;
        }
        delivered += state.hub.deliver(&r, &frame, None).devices;
        targets.push(r);
    }
    if let Some(c) = state.hub.cluster() {
        let mut env = Envelope::new(c.node(), envelope::AWARENESS).with_frame(&frame.frame);
        env.users = targets;
        env.about = user.to_string();
        env.exclude = profile
            .blocks
            .iter()
            .chain(profile.blocked_by.iter())
            .cloned()
            .collect();
        env.exclude.push(user.to_string());
        if let Err(e) = c.publish_all(&env).await {
            tracing::warn!(user, error = %e, "awareness not sent to the other nodes");
        }
    }
    state
        .metrics
        .fanout_seconds
        .observe(started.elapsed().as_secs_f64());
    if let Some(Body::Awareness(a)) = &frame.frame.body {
        state
            .metrics
            .awareness_out(status_label(a.status), delivered as u64);
    }
    delivered
}

/// Called after a connection registered. Broadcasts ONLINE (with the current intent) when the
/// user was not announced online yet — not after a reconnect within the grace period, and not
/// while invisible. In a cluster the registry in Redis decides (one node announces); when Redis
/// cannot be reached, this node's own registry does.
pub async fn connected(state: &Shared, user: &Arc<str>, conn_id: u64, device: &str) {
    let local = state.hub.announce_online(user);
    let first = match state.hub.cluster() {
        Some(c) => match c.connected(user, conn_id, device).await {
            Ok(first) => first,
            Err(_) => local,
        },
        None => local,
    };
    if first {
        announce_online(state, user).await;
    }
}

/// Broadcasts ONLINE for `user` (and emits the event).
pub async fn announce_online(state: &Shared, user: &str) {
    let profile = match state.store.profile(user).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(user = %user, error = %e, "profile unavailable; ONLINE not broadcast");
            return;
        }
    };
    presence_event(state, user, Status::Online, &profile, 0).await;
    if profile.invisible {
        return;
    }
    let frame = awareness_frame(v1::Awareness {
        from: user.to_string(),
        status: Status::Online as i32,
        intent: intent_of(&profile) as i32,
        details: profile.details.clone(),
        timestamp: bimip_proto::now_ms(),
        ..Default::default()
    });
    broadcast(state, user, &profile, frame).await;
}

/// The `presence.changed` event webhook: the user's state after a change (for the app's
/// backend, invisibility included; watchers of an invisible user are told nothing).
async fn presence_event(
    state: &Shared,
    user: &str,
    status: Status,
    profile: &Profile,
    last_seen: i64,
) {
    use crate::webhooks::EventType;
    if !state.events.wants(EventType::PresenceChanged) {
        return;
    }
    let mut data = serde_json::json!({
        "user": user,
        "status": status_label(status as i32),
        "intent": match intent_of(profile) {
            Status::Unspecified => "none",
            i => status_label(i as i32),
        },
        "details": profile.details,
        "invisible": profile.invisible,
    });
    if status == Status::Offline {
        data["last_seen"] = last_seen.into();
    }
    state.events.emit(EventType::PresenceChanged, data).await;
}

/// Records `last_seen` (advisory: written lazily, flushed at shutdown).
pub async fn record_last_seen(state: &Shared, user: &str, last_seen: i64) {
    let update = PresenceUpdate {
        last_seen: Some(last_seen),
        ..Default::default()
    };
    if let Err(e) = state.store.set_presence(user, update).await {
        tracing::warn!(user = %user, error = %e, "could not record last_seen");
    }
}

/// Called after a connection ended and it was the user's last device (`last_seen` = now):
/// records `last_seen` at once, then after the grace period, if the user is still gone,
/// broadcasts OFFLINE. In a cluster the claim in Redis makes sure one node announces it (any
/// node's sweeper does, should this one die meanwhile).
pub fn disconnected(state: &Shared, user: Arc<str>, last_seen: i64) {
    let grace = Duration::from_millis(state.config.presence.grace_ms);
    let cancelled = state.tasks.cancelled();
    let state = state.clone();
    state.clone().tasks.spawn(async move {
        record_last_seen(&state, &user, last_seen).await;
        // At shutdown every user goes; nobody is left to tell.
        tokio::select! {
            _ = tokio::time::sleep(grace) => {}
            _ = cancelled => return,
        }
        // A little less than the grace: the timer never fires early, and the clocks differ.
        let min_gone = grace.as_millis() as i64 - 5;
        let local = state.hub.announce_offline(&user, min_gone);
        let claimed = match state.hub.cluster() {
            Some(c) if !c.resync_needed() => match c.claim_offline(&user).await {
                Ok(claim) => claim,
                Err(_) => local,
            },
            _ => local,
        };
        if let Some(last_seen) = claimed {
            announce_offline(&state, &user, last_seen).await;
        }
    });
}

/// Broadcasts OFFLINE for `user` with its `last_seen` (and emits the event).
pub async fn announce_offline(state: &Shared, user: &str, last_seen: i64) {
    let profile = match state.store.profile(user).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(user = %user, error = %e, "profile unavailable; OFFLINE not broadcast");
            return;
        }
    };
    presence_event(state, user, Status::Offline, &profile, last_seen).await;
    if profile.invisible {
        return;
    }
    let frame = awareness_frame(v1::Awareness {
        from: user.to_string(),
        status: Status::Offline as i32,
        intent: intent_of(&profile) as i32,
        details: profile.details.clone(),
        last_seen,
        timestamp: bimip_proto::now_ms(),
        ..Default::default()
    });
    broadcast(state, user, &profile, frame).await;
}

/// A device sets (AWAY/BUSY/DND) or clears (ONLINE) the user's intent, or toggles invisibility.
/// Stored durably, then broadcast directly to watchers (never queued), and to the user's other
/// devices so they show the same state.
pub async fn set_state(
    state: &Shared,
    user: &Arc<str>,
    conn_id: u64,
    a: &v1::Awareness,
    status: Status,
) -> Result<(), Refused> {
    let max = state.config.presence.max_details_bytes;
    if a.details.len() > max {
        return Err(Refused::new(
            ErrorCode::TooLarge,
            format!(
                "details is {} bytes, at most {max} are allowed",
                a.details.len()
            ),
        ));
    }
    let before = state.store.profile(user).await?;
    let mut update = PresenceUpdate::default();
    // An ONLINE frame whose `invisible` differs from the current state toggles invisibility and
    // keeps the intent; an ONLINE frame that does not toggle it clears the intent.
    let toggles = status == Status::Online && a.invisible != before.invisible;
    match status {
        Status::Away | Status::Busy | Status::Dnd => {
            update.intent = Some((status, a.details.clone()));
        }
        Status::Online if toggles => update.invisible = Some(a.invisible),
        Status::Online => update.intent = Some((Status::Unspecified, String::new())),
        _ => {}
    }
    // Watchers are told at once, from the state the store is about to hold, while the store makes
    // it durable (an fsynced file replacement); the setter's answer waits for the store. One
    // connection's changes are applied one after the other, so the stored state is the last one
    // broadcast.
    let now = bimip_proto::now_ms();
    let after = predicted(&before, &update, now);
    let persist = {
        let (store, user) = (state.store.clone(), user.clone());
        tokio::spawn(async move { store.set_presence(&user, update).await })
    };
    let intent = intent_of(&after);
    let frame = if after.invisible {
        if before.invisible {
            // Still invisible: watchers keep seeing OFFLINE; only own devices learn the change.
            None
        } else {
            Some(v1::Awareness {
                from: user.to_string(),
                status: Status::Offline as i32,
                last_seen: after.invisible_since,
                timestamp: now,
                ..Default::default()
            })
        }
    } else {
        // Leaving invisibility is a device-state change (ONLINE, with the intent); otherwise
        // the event names the intent that changed, or ONLINE when it was cleared.
        let appears = before.invisible || intent == Status::Unspecified;
        Some(v1::Awareness {
            from: user.to_string(),
            status: if appears { Status::Online } else { intent } as i32,
            intent: intent as i32,
            details: after.details.clone(),
            timestamp: now,
            ..Default::default()
        })
    };
    if let Some(a) = frame {
        broadcast(state, user, &after, awareness_frame(a)).await;
    }
    let shown = if intent == Status::Unspecified {
        Status::Online
    } else {
        intent
    };
    presence_event(state, user, shown, &after, 0).await;
    let own = awareness_frame(v1::Awareness {
        from: user.to_string(),
        status: match intent {
            Status::Unspecified => Status::Online,
            s => s,
        } as i32,
        intent: intent as i32,
        details: after.details.clone(),
        invisible: after.invisible,
        timestamp: now,
        ..Default::default()
    });
    state
        .hub
        .deliver_everywhere(user, &own, Some(conn_id))
        .await;
    match persist.await {
        Ok(r) => {
            let stored = r.map_err(Refused::from)?;
            state.profiles.update(user, &stored);
            profile_changed(state, user).await;
            Ok(())
        }
        Err(e) => Err(Refused::new(
            ErrorCode::Internal,
            format!("storing the change failed: {e}"),
        )),
    }
}

/// The profile after `update`, as the store computes it (intent with its details, or cleared;
/// invisibility with the time it began).
fn predicted(before: &Profile, update: &PresenceUpdate, now: i64) -> Profile {
    let mut p = before.clone();
    if let Some((status, details)) = &update.intent {
        match status {
            Status::Away | Status::Busy | Status::Dnd => {
                p.intent = *status;
                p.details = details.clone();
            }
            _ => {
                p.intent = Status::Unspecified;
                p.details.clear();
            }
        }
        p.intent_at = now;
    }
    if let Some(inv) = update.invisible
        && inv != p.invisible
    {
        p.invisible = inv;
        p.invisible_since = if inv { now } else { 0 };
    }
    p
}

/// TYPING / RECORDING to one peer: delivered to the peer's online devices only if the peer may
/// see the sender and does not block it; never stored, not echoed to the sender's devices.
pub async fn typing(
    state: &Shared,
    user: &Arc<str>,
    device: &str,
    a: &v1::Awareness,
    status: Status,
) -> Result<usize, Refused> {
    bimip_proto::validate_user_id(&a.to)
        .map_err(|e| Refused::bad(format!("{status:?} needs the peer in `to`: {e}")))?;
    let profile = state.store.profile(user).await?;
    if profile.blocked_by.contains(&a.to) {
        return Err(Refused::new(
            ErrorCode::Forbidden,
            "you cannot reach this user",
        ));
    }
    let allowed = match state.config.presence.policy {
        PresencePolicy::Contacts => profile.may_see(&a.to),
        PresencePolicy::Open => !profile.blocks.contains(&a.to),
    };
    if !allowed {
        return Err(Refused::new(
            ErrorCode::Forbidden,
            "the peer does not see your awareness (not a contact)",
        ));
    }
    let ttl = match a.ttl_ms {
        0 => TYPING_DEFAULT_TTL_MS,
        t => t.min(TYPING_MAX_TTL_MS),
    };
    let frame = awareness_frame(v1::Awareness {
        from: user.to_string(),
        to: a.to.clone(),
        status: status as i32,
        device: device.to_string(),
        ttl_ms: ttl,
        timestamp: bimip_proto::now_ms(),
        ..Default::default()
    });
    let n = state
        .hub
        .deliver_everywhere(&a.to, &frame, None)
        .await
        .devices;
    state
        .metrics
        .awareness_out(status_label(status as i32), n as u64);
    Ok(n)
}

/// Tells the other nodes that `user`'s profile changed (their cached blocks and DND go).
pub async fn profile_changed(state: &Shared, user: &str) {
    if let Some(c) = state.hub.cluster() {
        let mut env = Envelope::new(c.node(), envelope::PROFILE);
        env.users.push(user.to_string());
        if let Err(e) = c.publish_all(&env).await {
            tracing::warn!(user, error = %e, "profile change not sent to the other nodes");
        }
    }
}

/// Whether `user` is connected anywhere, with how many connections and its last seen: this
/// node's registry, or the cluster's (falling back to this node's when Redis cannot answer).
pub async fn snapshot(state: &Shared, user: &str) -> PresenceSnapshot {
    let local = state.hub.snapshot(user);
    let Some(c) = state.hub.cluster() else {
        return local;
    };
    match c.presence(user).await {
        Ok(p) => PresenceSnapshot {
            online: p.connections > 0,
            devices: p.connections,
            last_seen: p.last_seen.max(local.last_seen),
        },
        Err(_) => local,
    }
}

/// What one viewer may know of a user's awareness right now.
pub async fn view(
    state: &Shared,
    viewer: Option<&str>,
    user: &str,
    include_invisible: bool,
) -> Result<(v1::Awareness, usize), Refused> {
    let profile = state.store.profile(user).await?;
    let live = snapshot(state, user).await;
    let hidden_by_block = viewer.is_some_and(|v| profile.blocks.contains(v));
    let hidden = hidden_by_block || (profile.invisible && !include_invisible);
    let mut a = v1::Awareness {
        from: user.to_string(),
        timestamp: bimip_proto::now_ms(),
        ..Default::default()
    };
    if hidden {
        a.status = Status::Offline as i32;
        a.last_seen = if hidden_by_block {
            0
        } else {
            profile.invisible_since
        };
        return Ok((a, 0));
    }
    a.status = if live.online {
        Status::Online
    } else {
        Status::Offline
    } as i32;
    a.intent = intent_of(&profile) as i32;
    a.details = profile.details.clone();
    a.invisible = profile.invisible;
    if !live.online {
        a.last_seen = live.last_seen.max(profile.last_seen);
    }
    Ok((a, live.devices))
}

/// `Subscribe{users, unsubscribe}`: answers at once with the current awareness of each permitted
/// user; under the `open` policy also registers the connection for live changes. Users the
/// subscriber may not see are named in one FORBIDDEN error after the snapshots.
pub async fn subscribe(
    state: &Shared,
    user: &Arc<str>,
    conn: &ConnHandle,
    subscribed: &mut BTreeSet<String>,
    mut s: v1::Subscribe,
) -> Result<(Vec<v1::Awareness>, Option<Refused>), Refused> {
    for u in &s.users {
        bimip_proto::validate_user_id(u).map_err(|e| Refused::bad(format!("users: {e}")))?;
    }
    // A name listed twice counts once against the limit and gets one snapshot.
    let mut seen = BTreeSet::new();
    s.users.retain(|u| seen.insert(u.clone()));
    if s.unsubscribe {
        for u in &s.users {
            if subscribed.remove(u) {
                state.hub.unsubscribe(u, conn.id);
                state.metrics.subscriptions.dec();
            }
        }
        return Ok((vec![], None));
    }
    let max = state.config.presence.max_subscriptions;
    let new = s.users.iter().filter(|u| !subscribed.contains(*u)).count();
    if subscribed.len() + new > max {
        return Err(Refused::new(
            ErrorCode::TooLarge,
            format!(
                "subscription limit reached: {} + {new} > {max} per connection",
                subscribed.len()
            ),
        ));
    }
    let mut snapshots = Vec::with_capacity(s.users.len());
    let mut refused = Vec::new();
    for target in &s.users {
        let profile = state.store.profile(target).await?;
        let blocked = profile.blocks.contains(&**user);
        if !may_ask(state, &profile, user) {
            refused.push(target.clone());
            continue;
        }
        let (a, _) = view(state, Some(user), target, false).await?;
        snapshots.push(a);
        if !blocked
            && state.config.presence.policy == PresencePolicy::Open
            && subscribed.insert(target.clone())
        {
            state.hub.subscribe(target, user, conn);
            state.metrics.subscriptions.inc();
        }
    }
    let refusal = (!refused.is_empty()).then(|| {
        Refused::new(
            ErrorCode::Forbidden,
            format!("not allowed to see (not a contact): {}", refused.join(", ")),
        )
    });
    Ok((snapshots, refusal))
}

/// Whether `viewer` may ask for the awareness of the user whose profile this is: a watcher
/// (contacts policy) or anyone (open policy). A user it blocks may ask too, and sees OFFLINE.
fn may_ask(state: &Shared, profile: &Profile, viewer: &str) -> bool {
    match state.config.presence.policy {
        PresencePolicy::Contacts => profile.may_see(viewer) || profile.blocks.contains(viewer),
        PresencePolicy::Open => true,
    }
}

/// What `viewer` would get from a `Subscribe` for `target` (None: refused, not allowed to see).
pub async fn seen_by(
    state: &Shared,
    viewer: &str,
    target: &str,
) -> Result<Option<v1::Awareness>, Refused> {
    let profile = state.store.profile(target).await?;
    if !may_ask(state, &profile, viewer) {
        return Ok(None);
    }
    let (a, _) = view(state, Some(viewer), target, false).await?;
    Ok(Some(a))
}

/// Removes every subscription of a closing connection.
pub fn unsubscribe_all(state: &Shared, conn_id: u64, subscribed: &BTreeSet<String>) {
    for u in subscribed {
        state.hub.unsubscribe(u, conn_id);
        state.metrics.subscriptions.dec();
    }
}

pub fn status_label(status: i32) -> &'static str {
    match Status::try_from(status) {
        Ok(Status::Online) => "online",
        Ok(Status::Offline) => "offline",
        Ok(Status::Away) => "away",
        Ok(Status::Busy) => "busy",
        Ok(Status::Dnd) => "dnd",
        Ok(Status::Typing) => "typing",
        Ok(Status::Recording) => "recording",
        Ok(Status::Resume) => "resume",
        _ => "unspecified",
    }
}
