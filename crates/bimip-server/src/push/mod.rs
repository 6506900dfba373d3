//! Push notifications: when a stored chat message or notification did not reach a device of its
//! recipient in real time, that device gets a push through its provider (FCM, APNs or the app's
//! own webhook).
//!
//! - [`decide`]: the decision, per device, made where the hub delivers a stored item
//!   ([`crate::hub::MissedDelivery`]): which devices get a job, suppression (DND, mutes, blocks),
//!   coalescing per (recipient device, sender).
//! - [`outbox`]: the durable outbox scheduler shared with event webhooks.
//! - [`dispatch`]: the dispatcher and workers: one attempt per job at a time, retries with
//!   backoff, dead letters, paused providers.
//! - [`content`]: what a push says (title, body, badge, collapse id), with no message text
//!   unless preview is on.
//! - [`devices`]: registering tokens and mutes (WebSocket and HTTP).

pub mod content;
pub mod decide;
pub mod devices;
pub mod dispatch;
pub mod outbox;

use crate::{
    config::{ConfigError, PushSettings},
    hub::Hub,
    metrics::Metrics,
    profile_cache::ProfileCache,
    tasks::Tasks,
};
use bimip_push::{Platform, Provider, apns, fcm, http::HttpOptions, webhook};
use bimip_store::Store;
use outbox::Outbox;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

/// The configured providers; a platform without configuration has none.
#[derive(Default)]
pub struct Providers {
    fcm: Option<Arc<dyn Provider>>,
    apns: Option<Arc<dyn Provider>>,
    webhook: Option<Arc<dyn Provider>>,
}

impl Providers {
    /// Builds the providers the settings configure, logging one line for each platform.
    pub fn from_settings(p: &PushSettings) -> Result<Providers, ConfigError> {
        let http = http_options(p);
        let setup = |what: &str, e: bimip_push::SetupError| {
            ConfigError::Invalid(format!("push provider {what}: {e}"))
        };
        let mut out = Providers::default();
        if let Some(credentials) = &p.fcm_credentials {
            let cfg = fcm::FcmConfig {
                credentials: credentials.clone(),
                endpoint: p.fcm_endpoint.clone(),
            };
            let f = fcm::Fcm::new(&cfg, &http).map_err(|e| setup("fcm", e))?;
            tracing::info!(endpoint = %p.fcm_endpoint, "push provider fcm: on");
            out.fcm = Some(Arc::new(f));
        } else {
            tracing::info!("push provider fcm: off (no --push-fcm-credentials)");
        }
        if let (Some(key), Some(key_id), Some(team_id), Some(topic)) =
            (&p.apns_key, &p.apns_key_id, &p.apns_team_id, &p.apns_topic)
        {
            let cfg = apns::ApnsConfig {
                key: key.clone(),
                key_id: key_id.clone(),
                team_id: team_id.clone(),
                topic: topic.clone(),
                endpoint: p.apns_endpoint.clone(),
                sandbox_endpoint: p.apns_sandbox_endpoint.clone(),
            };
            let a = apns::Apns::new(&cfg, &http).map_err(|e| setup("apns", e))?;
            tracing::info!(endpoint = %p.apns_endpoint, topic = %topic, "push provider apns: on");
            out.apns = Some(Arc::new(a));
        } else {
            tracing::info!("push provider apns: off (no --push-apns-key)");
        }
        if let (Some(url), Some(secret)) = (&p.webhook_url, &p.webhook_secret) {
            let cfg = webhook::WebhookConfig {
                url: url.clone(),
                secret: secret.clone(),
            };
            let w = webhook::WebhookProvider::new(&cfg, &http).map_err(|e| setup("webhook", e))?;
            tracing::info!(endpoint = %url_origin(url), "push provider webhook: on");
            out.webhook = Some(Arc::new(w));
        } else {
            tracing::info!("push provider webhook: off (no --push-webhook-url)");
        }
        Ok(out)
    }

    pub fn get(&self, platform: Platform) -> Option<&Arc<dyn Provider>> {
        match platform {
            Platform::Fcm => self.fcm.as_ref(),
            Platform::Apns => self.apns.as_ref(),
            Platform::Webhook => self.webhook.as_ref(),
        }
    }
}

/// The scheme, host and port of a URL, for logs: a path or query may carry a credential.
pub fn url_origin(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            let host = host.rsplit('@').next().unwrap_or(host);
            format!("{scheme}://{host}")
        }
        None => "(not a URL)".into(),
    }
}

/// HTTP settings of every provider client (and of the event webhook).
pub fn http_options(p: &PushSettings) -> HttpOptions {
    HttpOptions {
        extra_ca_file: p.ca_file.clone(),
        timeout: Duration::from_millis(p.timeout_ms),
        ..HttpOptions::default()
    }
}

/// The wire/store platform of a device token as the providers name it.
pub fn platform_of(p: i32) -> Option<Platform> {
    match bimip_proto::v1::Platform::try_from(p) {
        Ok(bimip_proto::v1::Platform::Fcm) => Some(Platform::Fcm),
        Ok(bimip_proto::v1::Platform::Apns) => Some(Platform::Apns),
        Ok(bimip_proto::v1::Platform::Webhook) => Some(Platform::Webhook),
        _ => None,
    }
}

/// The push service: shared by the hub (as its missed-delivery sink), the dispatcher, the
/// WebSocket handler and the HTTP API.
pub struct Push {
    pub(crate) settings: PushSettings,
    pub(crate) store: Store,
    pub(crate) hub: Weak<Hub>,
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) providers: Providers,
    pub(crate) profiles: Arc<ProfileCache>,
    /// Providers paused after a credential or configuration error, until (unix ms).
    pub(crate) paused: Mutex<HashMap<Platform, i64>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) tasks: Tasks,
}

/// What the push service works with, besides its settings.
pub struct Deps {
    pub store: Store,
    pub hub: Weak<Hub>,
    pub outbox: Arc<Outbox>,
    pub providers: Providers,
    pub profiles: Arc<ProfileCache>,
    pub metrics: Arc<Metrics>,
    pub tasks: Tasks,
}

impl Push {
    pub fn new(settings: PushSettings, d: Deps) -> Push {
        Push {
            settings,
            store: d.store,
            hub: d.hub,
            outbox: d.outbox,
            providers: d.providers,
            profiles: d.profiles,
            paused: Mutex::new(HashMap::new()),
            metrics: d.metrics,
            tasks: d.tasks,
        }
    }

    /// Whether the device has an open connection (it gets items over it instead of pushes).
    pub(crate) fn device_online(&self, user: &str, device: &str) -> bool {
        self.hub
            .upgrade()
            .is_some_and(|h| h.device_online(user, device))
    }

    /// Until when (unix ms) `platform` is paused, if it is.
    pub(crate) fn paused_until(&self, platform: Platform, now: i64) -> Option<i64> {
        let paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        paused.get(&platform).copied().filter(|&t| t > now)
    }

    pub(crate) fn pause(&self, platform: Platform, until: i64, reason: &str) {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        let was = paused.insert(platform, until);
        if was.is_none_or(|t| t <= bimip_proto::now_ms()) {
            tracing::error!(
                provider = platform.name(),
                reason,
                pause_ms = self.settings.pause_ms,
                "push provider paused after a credential or configuration error; jobs are kept"
            );
        }
        self.metrics.push_paused(platform.name(), true);
    }

    pub(crate) fn unpause(&self, platform: Platform) {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        if paused.remove(&platform).is_some() {
            tracing::info!(provider = platform.name(), "push provider resumed");
            self.metrics.push_paused(platform.name(), false);
        }
    }
}
