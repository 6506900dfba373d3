//! Registering and removing the push token of a device (from the device over the WebSocket, or
//! by the app's backend or the device over HTTP), listing a user's devices, and mutes.

use crate::{error::Refused, state::Shared};
use bimip_proto::v1::{self, ErrorCode};
use bimip_store::{PushStore, push::DeviceToken};

/// Longest token accepted (FCM tokens are ~160 bytes, APNs 64 hex digits; webhook tokens are
/// opaque and may carry an endpoint).
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Longest locale tag accepted.
const MAX_LOCALE_BYTES: usize = 35;

/// A token to register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub platform: v1::Platform,
    pub token: String,
    pub sandbox: bool,
    pub locale: String,
}

impl Registration {
    pub fn from_wire(t: &v1::PushToken) -> Registration {
        Registration {
            platform: v1::Platform::try_from(t.platform).unwrap_or(v1::Platform::Unspecified),
            token: t.token.clone(),
            sandbox: t.sandbox,
            locale: t.locale.clone(),
        }
    }

    /// Checks what the client controls.
    pub fn validate(&self) -> Result<(), Refused> {
        if self.platform == v1::Platform::Unspecified {
            return Err(Refused::bad(
                "platform must be fcm, apns or webhook (PLATFORM_FCM, PLATFORM_APNS, PLATFORM_WEBHOOK)",
            ));
        }
        if self.token.is_empty() {
            return Err(Refused::bad("token is empty"));
        }
        if self.token.len() > MAX_TOKEN_BYTES {
            return Err(Refused::new(
                ErrorCode::TooLarge,
                format!(
                    "token is {} bytes, at most {MAX_TOKEN_BYTES} are allowed",
                    self.token.len()
                ),
            ));
        }
        if self.token.chars().any(char::is_control) {
            return Err(Refused::bad("token contains control characters"));
        }
        if self.locale.len() > MAX_LOCALE_BYTES
            || !self
                .locale
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Refused::bad(
                "locale must be a language tag such as en or pt-BR (at most 35 characters)",
            ));
        }
        Ok(())
    }
}

/// Registers the token of `user`'s `device`. Returns the devices (user, device) the same token
/// was removed from, and the registration time (unix ms).
pub async fn register(
    state: &Shared,
    user: &str,
    device: &str,
    reg: Registration,
) -> Result<(Vec<(String, String)>, i64), Refused> {
    reg.validate()?;
    let registered_at = bimip_proto::now_ms();
    let token = DeviceToken {
        user: user.to_string(),
        device: device.to_string(),
        platform: reg.platform as i32,
        token: reg.token,
        sandbox: reg.sandbox,
        locale: reg.locale,
        registered_at,
        last_push_at: 0,
    };
    let moved = state.store.put_device_token(token).await?;
    for (u, d) in &moved {
        tracing::info!(user = %u, device = %d, to_user = %user, to_device = %device,
            "push token moved to another device");
    }
    state.metrics.push_tokens("registered");
    Ok((moved, registered_at))
}

/// Removes the token of `user`'s `device`. Returns whether there was one.
pub async fn unregister(state: &Shared, user: &str, device: &str) -> Result<bool, Refused> {
    let removed = state.store.remove_device_token(user, device, None).await?;
    if removed {
        state.metrics.push_tokens("removed");
    }
    Ok(removed)
}

/// A device as `GET /v1/users/{user}/devices` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView {
    pub device: String,
    pub online: bool,
    pub token: Option<DeviceToken>,
}

/// Every known device of `user`: those with a token and those with an open connection (on
/// any node of a cluster).
pub async fn list(state: &Shared, user: &str) -> Result<Vec<DeviceView>, Refused> {
    let mut connected: Vec<String> = state
        .hub
        .devices(user)
        .iter()
        .map(|d| d.to_string())
        .collect();
    if let Some(c) = state.hub.cluster()
        && let Ok(p) = c.presence(user).await
    {
        connected.extend(p.devices);
    }
    connected.sort();
    connected.dedup();
    let mut out: Vec<DeviceView> = state
        .store
        .device_tokens(user)
        .await?
        .into_iter()
        .map(|t| DeviceView {
            device: t.device.clone(),
            online: connected.contains(&t.device),
            token: Some(t),
        })
        .collect();
    for d in connected {
        if !out.iter().any(|v| v.device == d) {
            out.push(DeviceView {
                device: d,
                online: true,
                token: None,
            });
        }
    }
    out.sort_by(|a, b| a.device.cmp(&b.device));
    Ok(out)
}

/// A token as it may be shown: its first and last four characters.
pub fn masked(token: &str) -> String {
    let chars: Vec<char> = token.chars().collect();
    if chars.len() <= 12 {
        return "…".into();
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

/// `user` mutes or unmutes chat pushes from `other`. Returns whether it changed.
pub async fn set_mute(
    state: &Shared,
    user: &str,
    other: &str,
    muted: bool,
) -> Result<bool, Refused> {
    if user == other {
        return Err(Refused::bad("a user cannot mute itself"));
    }
    Ok(state.store.set_mute(user, other, muted).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_only_the_ends() {
        assert_eq!(masked("abcdefghijklmnop"), "abcd…mnop");
        assert_eq!(masked("short"), "…");
    }

    #[test]
    fn registrations_are_checked() {
        let ok = Registration {
            platform: v1::Platform::Fcm,
            token: "tok".into(),
            sandbox: false,
            locale: "pt-BR".into(),
        };
        assert!(ok.validate().is_ok());
        let mut bad = ok.clone();
        bad.platform = v1::Platform::Unspecified;
        assert!(bad.validate().is_err());
        let mut bad = ok.clone();
        bad.token = "x".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(bad.validate().map_err(|e| e.code), Err(ErrorCode::TooLarge));
        let mut bad = ok.clone();
        bad.locale = "en;rm -rf".into();
        assert!(bad.validate().is_err());
        let mut bad = ok;
        bad.token = "a\nb".into();
        assert!(bad.validate().is_err());
    }
}
