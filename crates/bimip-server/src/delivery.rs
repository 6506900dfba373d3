//! The send and receipt paths shared by the WebSocket gateway and the HTTP API: validate, store
//! durably, then deliver in real time (docs/PROTOCOL.md §5 and §6).

pub use crate::error::Refused;
use crate::{hub::StoredItem, sessions::Outbound, state::Shared, webhooks::EventType};
use base64::Engine;
use bimip_proto::{
    Body,
    v1::{self, ErrorCode, Partition, ReceiptKind},
};
use bimip_store::{AckRequest, CopyTo, NewItem, QueueStore};
use bytes::Bytes;
use prost::Message as _;
use std::{future::Future, sync::Arc};

/// Sender name used for messages the backend sends without a user (HTTP API).
pub const SYSTEM_SENDER: &str = "system";

/// One message to store and deliver.
#[derive(Debug, Clone)]
pub struct SendRequest {
    /// Sending user, or [`SYSTEM_SENDER`].
    pub from: Arc<str>,
    /// Sending device ("" for the HTTP API).
    pub device: Arc<str>,
    /// The sending connection, which gets the Ack instead of a copy.
    pub conn: Option<u64>,
    pub to: String,
    pub id: String,
    pub partition: Partition,
    pub payload: Bytes,
    /// Keep a copy in the sender's own queue for its other devices (users only).
    pub sender_copy: bool,
}

impl SendRequest {
    /// Checks what the client controls: recipient charset, id, payload size, partition.
    pub fn validate(&self, max_payload: usize) -> Result<(), Refused> {
        bimip_proto::validate_user_id(&self.to)
            .map_err(|e| Refused::bad(format!("invalid recipient: {e}")))?;
        bimip_proto::validate_message_id(&self.id).map_err(|e| Refused::bad(e.to_string()))?;
        if self.payload.len() > max_payload {
            return Err(Refused::new(
                ErrorCode::TooLarge,
                format!(
                    "payload is {} bytes, at most {max_payload} are allowed",
                    self.payload.len()
                ),
            ));
        }
        match self.partition {
            Partition::Chat | Partition::Notification => Ok(()),
            Partition::Receipt => Err(Refused::bad(
                "receipts are sent as Receipt frames, not messages",
            )),
            Partition::Unspecified => Err(Refused::bad("message partition is unspecified")),
        }
    }
}

/// Stores the message in the recipient's queue (its place in order is taken before this
/// returns), then yields a future that finishes the send: waits for durability, stores the
/// sender's copy, delivers to online devices and produces the `Ack`.
pub async fn start_send(
    state: &Shared,
    req: SendRequest,
) -> Result<impl Future<Output = Result<v1::Ack, Refused>> + Send + 'static, Refused> {
    if *req.from != *SYSTEM_SENDER
        && state
            .profiles
            .blocks(&state.store, &req.to, &req.from)
            .await?
    {
        return Err(Refused::new(
            ErrorCode::Forbidden,
            "you cannot message this user",
        ));
    }
    let item = NewItem {
        partition: req.partition,
        from: req.from.to_string(),
        to: req.to.clone(),
        payload: req.payload.clone(),
        message_id: req.id.clone(),
        device: req.device.to_string(),
        peer_offset: 0,
        dedupe: true,
    };
    let to_self = *req.from == *req.to;
    // Only chat is mirrored: a notification a user sends is not one it should see pending. The
    // copy is queued by the store right behind the recipient's item (no round trip back here),
    // so both become durable together.
    let (pending, copy) = if req.sender_copy && !to_self && req.partition == Partition::Chat {
        let copy = CopyTo {
            user: req.from.to_string(),
            item: NewItem {
                dedupe: false,
                ..item.clone()
            },
        };
        let (p, c) = state
            .store
            .enqueue_append_with_copy(&req.to, item, copy)
            .await?;
        (p, Some(c))
    } else {
        (state.store.enqueue_append(&req.to, item).await?, None)
    };
    let state = state.clone();
    Ok(async move {
        let stored = pending.wait().await?;
        let ack = v1::Ack {
            id: req.id.clone(),
            offset: stored.offset,
            timestamp: stored.timestamp,
            duplicate: stored.duplicate,
        };
        if stored.duplicate {
            state.metrics.messages_duplicate.inc();
            return Ok(ack);
        }
        state.metrics.messages_stored.inc();
        let message = |offset: u64| {
            Outbound::new(v1::Frame::with(
                0,
                Body::Message(v1::Message {
                    id: req.id.clone(),
                    from: req.from.to_string(),
                    to: req.to.clone(),
                    partition: req.partition as i32,
                    payload: req.payload.clone(),
                    offset,
                    timestamp: stored.timestamp,
                    device: req.device.to_string(),
                    acknowledged: false,
                }),
            ))
        };
        // The recipient gets it as soon as it is durable in its queue; the sender's copy (for
        // its other devices) follows, and the Ack waits for both.
        let item = StoredItem {
            to: &req.to,
            from: &req.from,
            message_id: &req.id,
            offset: stored.offset,
            has_tokens: None,
            partition: req.partition,
            payload: &req.payload,
        };
        let mut delivered = state
            .hub
            .deliver_stored(item, &message(stored.offset), req.conn.filter(|_| to_self))
            .await
            .devices;
        if let Some(copy) = copy {
            let copy = copy.wait().await?;
            if state.hub.has_other(&req.from, req.conn) {
                delivered += state
                    .hub
                    .deliver_everywhere(&req.from, &message(copy.offset), req.conn)
                    .await
                    .devices;
            }
        }
        state.metrics.messages_delivered.inc_by(delivered as u64);
        if state.events.wants(EventType::MessageStored) {
            let data = serde_json::json!({
                "id": req.id,
                "from": req.from.as_ref(),
                "device": req.device.as_ref(),
                "to": req.to,
                "partition": partition_name(req.partition),
                "offset": stored.offset,
                "timestamp": stored.timestamp,
                "payload": base64::engine::general_purpose::STANDARD.encode(&req.payload),
            });
            state.events.emit(EventType::MessageStored, data).await;
        }
        Ok(ack)
    })
}

/// Applies a device's receipt and routes the resulting `Receipt` to the original sender (in real
/// time when one of its devices is online, else into its receipt partition). Returns the device's
/// cursor after the receipt.
pub async fn receipt(
    state: &Shared,
    user: &Arc<str>,
    device: &str,
    r: v1::Receipt,
) -> Result<u64, Refused> {
    let partition = match Partition::try_from(r.partition) {
        Ok(Partition::Unspecified) => Partition::Chat,
        Ok(p) => p,
        Err(_) => return Err(Refused::bad(format!("unknown partition {}", r.partition))),
    };
    let kind = match ReceiptKind::try_from(r.kind) {
        Ok(ReceiptKind::Unspecified) if partition != Partition::Chat => ReceiptKind::Delivered,
        Ok(ReceiptKind::Unspecified) | Err(_) => {
            return Err(Refused::bad(
                "receipt kind must be RECEIPT_KIND_DELIVERED or RECEIPT_KIND_READ",
            ));
        }
        Ok(k) => k,
    };
    if r.up_to_offset == 0 {
        return Err(Refused::bad("up_to_offset must be >= 1"));
    }
    let peer = if r.to.is_empty() {
        if partition == Partition::Chat {
            return Err(Refused::bad("a chat receipt names the sender in `to`"));
        }
        None
    } else {
        bimip_proto::validate_user_id(&r.to)
            .map_err(|e| Refused::bad(format!("invalid `to`: {e}")))?;
        Some(r.to.clone())
    };
    let outcome = state
        .store
        .acknowledge(
            user,
            AckRequest {
                device: device.to_string(),
                partition,
                peer: peer.clone(),
                kind,
                up_to_offset: r.up_to_offset,
            },
        )
        .await?;
    if partition == Partition::Chat
        && let (Some(peer), Some(last)) = (&peer, outcome.covered.last())
    {
        let t = match kind {
            ReceiptKind::Read => EventType::MessageRead,
            _ => EventType::MessageDelivered,
        };
        if state.events.wants(t) {
            let data = serde_json::json!({
                "from": user.as_ref(),
                "device": device,
                "to": peer,
                "up_to_offset": last.0,
                "message_ids": outcome.covered.iter().map(|(_, id)| id.as_str()).collect::<Vec<_>>(),
            });
            state.events.emit(t, data).await;
        }
    }
    if partition == Partition::Chat
        && let (Some(peer), Some(last)) = (peer, outcome.covered.last())
        && peer != SYSTEM_SENDER
    {
        let receipt = v1::Receipt {
            from: user.to_string(),
            to: peer.clone(),
            kind: kind as i32,
            up_to_offset: last.0,
            message_ids: outcome.covered.iter().map(|(_, id)| id.clone()).collect(),
            timestamp: bimip_proto::now_ms(),
            partition: Partition::Chat as i32,
        };
        let frame = Outbound::new(v1::Frame::with(0, Body::Receipt(receipt.clone())));
        let delivered = state.hub.deliver_everywhere(&peer, &frame, None).await;
        if delivered.devices == 0 {
            let item = NewItem {
                partition: Partition::Receipt,
                from: user.to_string(),
                to: peer.clone(),
                payload: receipt.encode_to_vec().into(),
                message_id: String::new(),
                device: device.to_string(),
                peer_offset: 0,
                dedupe: false,
            };
            state.store.append(&peer, item).await?;
        }
        state.metrics.receipts_routed.inc();
    }
    Ok(outcome.next_offset)
}

/// The partition's name in JSON (HTTP API, event webhooks).
pub fn partition_name(p: Partition) -> &'static str {
    match p {
        Partition::Chat => "chat",
        Partition::Notification => "notification",
        Partition::Receipt => "receipt",
        Partition::Unspecified => "unspecified",
    }
}
