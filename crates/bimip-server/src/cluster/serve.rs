//! The cluster's background work on one node: the subscription to this node's channel and the
//! all-nodes channel, and housekeeping (lease renewal, reaping dead nodes, announcing OFFLINE
//! for users whose grace period ended, re-registering after Redis was unavailable).

use super::{Cluster, envelope, envelope::Envelope, new_incarnation};
use crate::{
    awareness, config::PresencePolicy, fanout, sessions::Disconnect, sessions::Outbound,
    state::Shared,
};
use bimip_store::{PushStore, QueueStore, StoreError};
use futures_util::StreamExt;
use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};
use tokio::sync::Notify;

/// How often queues whose retention may be due are compacted (by whichever node looks first).
const COMPACT_EVERY: Duration = Duration::from_secs(10);
/// Users compacted per round.
const COMPACT_USERS: usize = 100;
/// How often due OFFLINE announcements and lapsed leases are looked for.
const SWEEP: Duration = Duration::from_millis(250);
/// Connections of a dead node cleaned per Redis round trip.
const REAP_BATCH: usize = 500;
/// How long one node holds the right to reap a dead one.
const REAP_LOCK_MS: u64 = 30_000;

/// Starts the subscription and housekeeping tasks of this node.
pub fn start(state: &Shared, cluster: Arc<Cluster>) {
    let restart = Arc::new(Notify::new());
    state
        .tasks
        .spawn(subscriber(state.clone(), cluster.clone(), restart.clone()));
    state
        .tasks
        .spawn(housekeeping(state.clone(), cluster, restart));
}

async fn subscriber(state: Shared, cluster: Arc<Cluster>, restart: Arc<Notify>) {
    let keys = cluster.store().keys().clone();
    let channels = [keys.node_channel(cluster.node()), keys.all_channel()];
    let mut cancelled = std::pin::pin!(state.tasks.cancelled());
    let mut first = true;
    loop {
        let sub = async {
            let mut ps = cluster.store().client().get_async_pubsub().await?;
            for ch in &channels {
                ps.subscribe(ch).await?;
            }
            Ok::<_, redis::RedisError>(ps)
        };
        match tokio::time::timeout(cluster.settings.lease, sub).await {
            Ok(Ok(ps)) => {
                cluster
                    .last_probe
                    .store(bimip_proto::now_ms(), Ordering::Release);
                if !first {
                    // Redis may have restarted, with an empty script cache.
                    let _ = cluster.load_scripts().await;
                    tracing::info!(
                        "cluster subscription back: re-sending connections their fan-out"
                    );
                    resend_fanout(&state).await;
                }
                first = false;
                let mut stream = ps.into_on_message();
                loop {
                    tokio::select! {
                        msg = stream.next() => match msg {
                            Some(m) => on_envelope(&state, &cluster, m.get_payload_bytes()),
                            None => break,
                        },
                        _ = restart.notified() => {
                            tracing::warn!("cluster subscription silent: reconnecting it");
                            break;
                        }
                        _ = &mut cancelled => return,
                    }
                }
                tracing::warn!(
                    "cluster subscription interrupted; frames from other nodes may have been missed"
                );
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "cluster subscription failed"),
            Err(_) => tracing::debug!("cluster subscription timed out"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = &mut cancelled => return,
        }
    }
}

/// Applies what another node sent.
fn on_envelope(state: &Shared, cluster: &Cluster, bytes: &[u8]) {
    let env = match Envelope::from_bytes(bytes) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, bytes = bytes.len(), "undecodable cluster message ignored");
            return;
        }
    };
    if env.kind == envelope::PROBE {
        cluster
            .last_probe
            .store(bimip_proto::now_ms(), Ordering::Release);
        return;
    }
    // This node already applied what it published to everyone.
    if env.node == cluster.node() {
        return;
    }
    let frame = || match env.frame() {
        Ok(f) => Some(Outbound::new(f)),
        Err(e) => {
            tracing::warn!(error = %e, "cluster message with an undecodable frame ignored");
            None
        }
    };
    match env.kind {
        envelope::DELIVER => {
            if let Some(f) = frame() {
                for u in &env.users {
                    state.hub.deliver(u, &f, None);
                }
            }
        }
        envelope::AWARENESS => {
            let Some(f) = frame() else { return };
            let mut n = 0;
            for u in &env.users {
                n += state.hub.deliver(u, &f, None).devices;
            }
            if state.config.presence.policy == PresencePolicy::Open {
                for (sub, conn) in state.hub.subscribers(&env.about) {
                    if !env.users.iter().any(|u| **u == *sub)
                        && !env.exclude.iter().any(|u| **u == *sub)
                    {
                        n += usize::from(conn.offer(&f));
                    }
                }
            }
            tracing::trace!(about = %env.about, connections = n, "awareness from another node");
        }
        envelope::KICK => {
            if let (Some(u), Some(why)) = (env.users.first(), Disconnect::from_index(env.why as u8))
            {
                let device = (!env.device.is_empty()).then_some(env.device.as_str());
                state.hub.kick(u, device, why);
            }
        }
        envelope::PROFILE => {
            for u in &env.users {
                state.profiles.forget(u);
            }
        }
        envelope::REVOKED => {
            if let Some(u) = env.users.first() {
                state.revocations.set_not_before(u, env.at);
                state.hub.kick(u, None, Disconnect::Revoked);
            }
        }
        other => tracing::debug!(kind = other, "unknown cluster message kind ignored"),
    }
}

/// Offers every local connection what it is owed (the ONLINE fan-out) again: frames routed
/// while the subscription was down are in the queue. Clients drop what they already have by
/// offset.
async fn resend_fanout(state: &Shared) {
    for (user, conn) in state.hub.local_connections() {
        match state.store.pending(&user, &conn.device).await {
            Ok(p) => {
                for f in fanout::frames(p) {
                    conn.offer(&Outbound::new(f));
                }
            }
            Err(e) => {
                tracing::warn!(user = %user, error = %e, "fan-out re-send failed");
                return;
            }
        }
    }
}

async fn housekeeping(state: Shared, cluster: Arc<Cluster>, restart: Arc<Notify>) {
    let heartbeat = cluster.settings.heartbeat;
    let lease_ms = cluster.settings.lease.as_millis() as i64;
    let mut cancelled = std::pin::pin!(state.tasks.cancelled());
    let mut next_beat = Instant::now() + heartbeat;
    let mut next_compaction = Instant::now() + COMPACT_EVERY;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SWEEP) => {}
            _ = &mut cancelled => break,
        }
        if Instant::now() >= next_beat {
            next_beat = Instant::now() + heartbeat;
            beat(&state, &cluster, &restart).await;
            let linked = bimip_proto::now_ms() - cluster.linked_since.load(Ordering::Acquire);
            if linked >= lease_ms && !cluster.resync_needed() {
                adopt_orphan_jobs(&state, &cluster).await;
            }
        }
        if cluster.resync_needed() {
            continue;
        }
        if Instant::now() >= next_compaction {
            next_compaction = Instant::now() + COMPACT_EVERY;
            match cluster.store().compact_due(COMPACT_USERS).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(users = n, "compacted queues"),
                Err(e) => {
                    tracing::warn!(error = %e, "compaction of due queues failed; retried later")
                }
            }
        }
        let due: Result<(Vec<String>, Vec<String>), StoreError> = cluster.check(
            cluster
                .scripts
                .due
                .key(cluster.keys.nodes())
                .key(cluster.keys.offline_due())
                .arg(200)
                .invoke_async(&mut cluster.conn())
                .await,
        );
        let Ok((dead, users)) = due else { continue };
        // Peers could not renew while this node could not reach Redis either: give them a
        // lease's time after the link came back.
        let linked = bimip_proto::now_ms() - cluster.linked_since.load(Ordering::Acquire);
        if linked >= lease_ms {
            let me = cluster.incarnation();
            for inc in dead.iter().filter(|i| **i != *me) {
                if let Err(e) = reap(&cluster, inc).await {
                    tracing::warn!(node = %inc, error = %e, "reaping a dead node failed");
                }
            }
        }
        for user in users {
            match cluster.claim_offline(&user).await {
                Ok(Some(last_seen)) => awareness::announce_offline(&state, &user, last_seen).await,
                Ok(None) => {}
                Err(_) => break,
            }
        }
    }
}

async fn beat(state: &Shared, cluster: &Arc<Cluster>, restart: &Notify) {
    let renewed = cluster.renew_lease().await;
    if matches!(renewed, Ok(false)) {
        tracing::warn!(
            node = %cluster.incarnation(),
            "this node's lease was gone (paused or cut off from redis longer than the lease): registering again"
        );
        cluster.resync.store(true, Ordering::Release);
    }
    if renewed.is_ok()
        && cluster.resync_needed()
        && let Err(e) = resync(state, cluster).await
    {
        tracing::warn!(error = %e, "re-registering with redis failed; retrying");
        return;
    }
    if renewed.is_ok() {
        // The subscription must see this within a few heartbeats, or it is dead.
        let probe = Envelope::new(cluster.node(), envelope::PROBE);
        let r: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(cluster.keys.node_channel(cluster.node()))
            .arg(probe.to_bytes())
            .query_async(&mut cluster.conn())
            .await;
        let silent = bimip_proto::now_ms() - cluster.last_probe.load(Ordering::Acquire);
        if r.is_ok() && silent > 3 * cluster.settings.heartbeat.as_millis() as i64 + 1000 {
            restart.notify_one();
        }
    }
}

/// Registers every local connection under a new incarnation, announces ONLINE the users the
/// cluster thought gone, reaps the old incarnation (its users still connected here stay
/// ONLINE: they are registered again first) and re-sends the fan-out.
async fn resync(state: &Shared, cluster: &Arc<Cluster>) -> Result<(), StoreError> {
    let old = cluster.incarnation();
    let new = new_incarnation(cluster.node());
    *cluster
        .incarnation
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = new.clone();
    cluster.resync.store(false, Ordering::Release);
    cluster.load_scripts().await?;
    cluster.take_lease().await?;
    let conns = state.hub.local_connections();
    let mut announce = Vec::new();
    for (user, conn) in &conns {
        if cluster
            .connect_as(&new, user, conn.id, &conn.device)
            .await?
        {
            announce.push(user.clone());
        }
    }
    reap(cluster, &old).await?;
    cluster
        .linked_since
        .store(bimip_proto::now_ms(), Ordering::Release);
    tracing::info!(
        node = %new,
        connections = conns.len(),
        announced = announce.len(),
        "registered with redis again"
    );
    announce.dedup();
    for user in announce {
        awareness::announce_online(state, &user).await;
    }
    resend_fanout(state).await;
    Ok(())
}

/// Cleans up after a dead incarnation (or this node's own previous one): each of its
/// connections leaves the registry as if it had closed, then its index and lease go. One node
/// does it (the reap lock); the OFFLINE announcements follow from the due set.
pub(super) async fn reap(cluster: &Cluster, inc: &str) -> Result<(), StoreError> {
    let keys = &cluster.keys;
    let mut conn = cluster.conn();
    let me = cluster.incarnation();
    let locked: Option<String> = cluster.check(
        redis::cmd("SET")
            .arg(keys.reap_lock(inc))
            .arg(&*me)
            .arg("NX")
            .arg("PX")
            .arg(REAP_LOCK_MS)
            .query_async(&mut conn)
            .await,
    )?;
    if locked.is_none() {
        return Ok(());
    }
    let index = keys.node_conns(inc);
    let mut cursor = 0u64;
    let mut cleaned = 0usize;
    loop {
        let (next, pairs): (u64, Vec<(String, String)>) = cluster.check(
            redis::cmd("HSCAN")
                .arg(&index)
                .arg(cursor)
                .arg("COUNT")
                .arg(REAP_BATCH)
                .query_async(&mut conn)
                .await,
        )?;
        for (conn_id, user) in pairs {
            cluster.disconnect_as(inc, &user, &conn_id).await?;
            cleaned += 1;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let _: () = cluster.check(
        redis::pipe()
            .del(&index)
            .ignore()
            .zrem(keys.nodes(), inc)
            .ignore()
            .query_async(&mut conn)
            .await,
    )?;
    if inc != &*me && cleaned > 0 {
        tracing::info!(node = %inc, connections = cleaned, "reaped a dead node");
    }
    Ok(())
}

/// Takes over the push and event jobs of nodes that died: they are sent from here.
async fn adopt_orphan_jobs(state: &Shared, cluster: &Cluster) {
    let tags = match cluster.take_orphan_job_tags().await {
        Ok(t) if t.is_empty() => return,
        Ok(t) => t,
        Err(_) => return,
    };
    let shift = crate::push::outbox::ID_TAG_SHIFT;
    match state.store.jobs().await {
        Ok(jobs) => {
            let mine: Vec<_> = jobs
                .into_iter()
                .filter(|j| tags.contains(&(j.id >> shift)))
                .collect();
            let n = state.outbox.adopt(mine);
            if n > 0 {
                tracing::info!(tags = ?tags, jobs = n, "took over the push jobs of a dead node");
            }
        }
        Err(e) => tracing::warn!(error = %e, "reading the push jobs of a dead node failed"),
    }
}

/// A clean stop: this node's remaining registry entries and its lease go at once.
pub async fn leave(cluster: &Cluster) {
    let inc = cluster.incarnation();
    if let Err(e) = reap(cluster, &inc).await {
        tracing::warn!(error = %e, "leaving the cluster registry failed; peers reap this node after its lease");
    }
}
