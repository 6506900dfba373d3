//! Prometheus metrics, rendered at `GET /metrics`.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// All counters of one server. Cheap to update from any task (atomics).
pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub connections_total: Counter,
    pub users_online: Gauge,
    pub auth_failures: Counter,
    pub frames_in: Family<KindLabel, Counter>,
    pub frame_errors: Family<KindLabel, Counter>,
    pub messages_stored: Counter,
    pub messages_duplicate: Counter,
    pub messages_delivered: Counter,
    pub receipts_routed: Counter,
    pub slow_consumers: Counter,
    pub fsync_seconds: Histogram,
    pub fsync_batch_appends: Histogram,
    pub awareness_in: Family<StatusLabel, Counter>,
    pub awareness_out: Family<StatusLabel, Counter>,
    pub subscriptions: Gauge,
    pub fanout_seconds: Histogram,
    pub compactions: Counter,
    pub compaction_dropped: Counter,
    pub compaction_dropped_unacked: Counter,
    pub compaction_seconds: Histogram,
    pub frames_rate_limited: Counter,
    pub connections_refused: Family<ReasonLabel, Counter>,
    pub disconnects: Family<ReasonLabel, Counter>,
    pub http_timeouts: Counter,
    pub revocations: Counter,
    pub push: Family<PushLabel, Counter>,
    pub push_dead_letters: Family<PushReasonLabel, Counter>,
    pub push_tokens: Family<ReasonLabel, Counter>,
    pub push_outbox_jobs: Gauge,
    pub push_outbox_oldest_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub push_provider_paused: Family<ProviderLabel, Gauge>,
    pub webhook_events: Family<EventLabel, Counter>,
    pub push_dispatch_delay_seconds: Histogram,
    pub push_request_seconds: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushLabel {
    pub provider: &'static str,
    pub outcome: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushReasonLabel {
    pub provider: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    pub provider: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    pub event: &'static str,
    pub outcome: &'static str,
}

/// A label value from a closed set, so a value read back from storage cannot grow the metric's
/// label space.
fn known(value: &str, set: &[&'static str]) -> &'static str {
    set.iter()
        .find(|v| **v == value)
        .copied()
        .unwrap_or("other")
}

const PROVIDERS: [&str; 5] = ["fcm", "apns", "webhook", "events", "none"];
const EVENTS: [&str; 4] = [
    "presence.changed",
    "message.stored",
    "message.delivered",
    "message.read",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("bimip");
        let m = Metrics {
            connections: Gauge::default(),
            connections_total: Counter::default(),
            users_online: Gauge::default(),
            auth_failures: Counter::default(),
            frames_in: Family::default(),
            frame_errors: Family::default(),
            messages_stored: Counter::default(),
            messages_duplicate: Counter::default(),
            messages_delivered: Counter::default(),
            receipts_routed: Counter::default(),
            slow_consumers: Counter::default(),
            // 50 µs .. ~1.6 s
            fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            fsync_batch_appends: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            awareness_in: Family::default(),
            awareness_out: Family::default(),
            subscriptions: Gauge::default(),
            // 10 µs .. ~160 ms
            fanout_seconds: Histogram::new(exponential_buckets(0.000_01, 2.0, 15)),
            compactions: Counter::default(),
            compaction_dropped: Counter::default(),
            compaction_dropped_unacked: Counter::default(),
            // 100 µs .. ~3 s
            compaction_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            frames_rate_limited: Counter::default(),
            connections_refused: Family::default(),
            disconnects: Family::default(),
            http_timeouts: Counter::default(),
            revocations: Counter::default(),
            push: Family::default(),
            push_dead_letters: Family::default(),
            push_tokens: Family::default(),
            push_outbox_jobs: Gauge::default(),
            push_outbox_oldest_seconds: Gauge::default(),
            push_provider_paused: Family::default(),
            webhook_events: Family::default(),
            // 100 µs .. ~3 s
            push_dispatch_delay_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            push_request_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Open WebSocket connections",
            m.connections.clone(),
        );
        registry.register(
            "connections_opened",
            "WebSocket connections accepted",
            m.connections_total.clone(),
        );
        registry.register(
            "users_online",
            "Users with at least one connected device",
            m.users_online.clone(),
        );
        registry.register(
            "auth_failures",
            "Upgrades refused for a bad, expired or missing token",
            m.auth_failures.clone(),
        );
        registry.register(
            "frames_in",
            "Frames received, by body kind",
            m.frames_in.clone(),
        );
        registry.register(
            "frame_errors",
            "Error frames sent, by error code",
            m.frame_errors.clone(),
        );
        registry.register(
            "messages_stored",
            "Messages stored in a recipient's queue",
            m.messages_stored.clone(),
        );
        registry.register(
            "messages_duplicate",
            "Sends answered as duplicates (same sender and id)",
            m.messages_duplicate.clone(),
        );
        registry.register(
            "messages_delivered",
            "Message frames handed to online devices in real time",
            m.messages_delivered.clone(),
        );
        registry.register(
            "receipts_routed",
            "Receipts sent to or queued for original senders",
            m.receipts_routed.clone(),
        );
        registry.register(
            "slow_consumers",
            "Connections closed because their outbound buffer was full",
            m.slow_consumers.clone(),
        );
        registry.register(
            "store_fsync_seconds",
            "Duration of one store fsync round",
            m.fsync_seconds.clone(),
        );
        registry.register(
            "store_fsync_batch_appends",
            "Appends covered by one fsync round (group commit)",
            m.fsync_batch_appends.clone(),
        );
        registry.register(
            "awareness_in",
            "Awareness frames received from clients, by status",
            m.awareness_in.clone(),
        );
        registry.register(
            "awareness_out",
            "Awareness frames delivered to connections, by status",
            m.awareness_out.clone(),
        );
        registry.register(
            "subscriptions",
            "Live presence subscriptions (open policy)",
            m.subscriptions.clone(),
        );
        registry.register(
            "awareness_fanout_seconds",
            "Time to hand one awareness change to every recipient connection",
            m.fanout_seconds.clone(),
        );
        registry.register(
            "frames_rate_limited",
            "Frames refused with RATE_LIMITED (over limits.frames_per_second)",
            m.frames_rate_limited.clone(),
        );
        registry.register(
            "connections_refused",
            "Upgrades refused before the WebSocket exists, by reason (user_limit, server_limit, revoked)",
            m.connections_refused.clone(),
        );
        registry.register(
            "disconnects",
            "Connections closed by the server, by reason (rate_limit, slow, write_timeout, revoked, kicked, token_expired, shutdown)",
            m.disconnects.clone(),
        );
        registry.register(
            "http_timeouts",
            "HTTP requests answered 503 for taking longer than limits.http_timeout_ms",
            m.http_timeouts.clone(),
        );
        registry.register(
            "revocations",
            "Users whose tokens were revoked through the API",
            m.revocations.clone(),
        );
        registry.register(
            "push",
            "Push decisions and attempts, by provider, outcome (queued, suppressed, skipped, sent, retry, token_removed, paused) and reason",
            m.push.clone(),
        );
        registry.register(
            "push_dead_letters",
            "Push and event jobs given up on, by provider and reason",
            m.push_dead_letters.clone(),
        );
        registry.register(
            "push_tokens",
            "Push token registrations and removals",
            m.push_tokens.clone(),
        );
        registry.register(
            "push_outbox_jobs",
            "Jobs waiting in the push and event outbox",
            m.push_outbox_jobs.clone(),
        );
        registry.register(
            "push_outbox_oldest_seconds",
            "Age of the oldest job waiting in the outbox",
            m.push_outbox_oldest_seconds.clone(),
        );
        registry.register(
            "push_provider_paused",
            "1 while a push provider is paused after a credential or configuration error",
            m.push_provider_paused.clone(),
        );
        registry.register(
            "push_dispatch_delay_seconds",
            "From the moment a push job fell due to the start of its attempt",
            m.push_dispatch_delay_seconds.clone(),
        );
        registry.register(
            "push_request_seconds",
            "Duration of one provider request (token refresh included)",
            m.push_request_seconds.clone(),
        );
        registry.register(
            "webhook_events",
            "Event webhook jobs, by event and outcome (queued, sent, retry, gone, dead_letter)",
            m.webhook_events.clone(),
        );
        registry.register(
            "store_compactions",
            "Queue files rewritten by retention or max_queue_items",
            m.compactions.clone(),
        );
        registry.register(
            "store_compaction_dropped_items",
            "Items dropped by compaction",
            m.compaction_dropped.clone(),
        );
        registry.register(
            "store_dropped_unacknowledged",
            "Unacknowledged items dropped because a queue exceeded max_queue_items",
            m.compaction_dropped_unacked.clone(),
        );
        registry.register(
            "store_compaction_seconds",
            "Duration of one queue compaction",
            m.compaction_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    pub fn frame_in(&self, kind: &'static str) {
        self.frames_in.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn awareness_in(&self, status: &'static str) {
        self.awareness_in
            .get_or_create(&StatusLabel { status })
            .inc();
    }

    pub fn awareness_out(&self, status: &'static str, n: u64) {
        self.awareness_out
            .get_or_create(&StatusLabel { status })
            .inc_by(n);
    }

    pub fn disconnect(&self, reason: &'static str) {
        self.disconnects
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn push_outcome(&self, provider: &str, outcome: &'static str, reason: &'static str) {
        self.push
            .get_or_create(&PushLabel {
                provider: known(provider, &PROVIDERS),
                outcome,
                reason,
            })
            .inc();
    }

    pub fn push_dead_letter(&self, provider: &str, reason: &'static str) {
        self.push_dead_letters
            .get_or_create(&PushReasonLabel {
                provider: known(provider, &PROVIDERS),
                reason,
            })
            .inc();
    }

    pub fn push_tokens(&self, what: &'static str) {
        self.push_tokens
            .get_or_create(&ReasonLabel { reason: what })
            .inc();
    }

    pub fn push_paused(&self, provider: &str, paused: bool) {
        self.push_provider_paused
            .get_or_create(&ProviderLabel {
                provider: known(provider, &PROVIDERS),
            })
            .set(i64::from(paused));
    }

    pub fn push_outbox(&self, jobs: i64, oldest_seconds: f64) {
        self.push_outbox_jobs.set(jobs);
        self.push_outbox_oldest_seconds.set(oldest_seconds);
    }

    pub fn webhook_event(&self, event: &str, outcome: &'static str) {
        self.webhook_events
            .get_or_create(&EventLabel {
                event: known(event, &EVENTS),
                outcome,
            })
            .inc();
    }

    pub fn frame_error(&self, kind: &'static str) {
        self.frame_errors.get_or_create(&KindLabel { kind }).inc();
    }
}

/// Feeds store timings into the metrics.
pub struct StoreMetrics(pub std::sync::Arc<Metrics>);

impl bimip_store::StoreObserver for StoreMetrics {
    fn fsync(&self, took: Duration, appends: usize) {
        self.0.fsync_seconds.observe(took.as_secs_f64());
        self.0.fsync_batch_appends.observe(appends as f64);
    }

    fn compacted(&self, _user: &str, dropped: u64, _kept: u64, took: Duration) {
        self.0.compactions.inc();
        self.0.compaction_dropped.inc_by(dropped);
        self.0.compaction_seconds.observe(took.as_secs_f64());
    }

    fn dropped_unacked(&self, _user: &str, n: u64) {
        self.0.compaction_dropped_unacked.inc_by(n);
    }
}
