//! The ONLINE fan-out (docs/PROTOCOL.md §4): what a device receives right after `Welcome` — pending
//! notifications in full, a per-sender summary of pending chat messages, and pending receipts
//! (cumulative per peer and kind).

use bimip_proto::{
    Body,
    v1::{self, Partition},
};
use bimip_store::{Item, PendingForDevice};
use prost::Message as _;
use std::collections::BTreeMap;

/// Notifications per Batch frame.
const NOTIFICATION_BATCH: usize = 100;

/// The frames of the fan-out, in the order they are sent: notification batch(es), summary,
/// receipt batch. Each kind is sent even when empty, so a client knows the fan-out is complete.
pub fn frames(p: PendingForDevice) -> Vec<v1::Frame> {
    let mut out = Vec::new();
    let chunks: Vec<&[Item]> = if p.notifications.is_empty() {
        vec![&[]]
    } else {
        p.notifications.chunks(NOTIFICATION_BATCH).collect()
    };
    let n = chunks.len();
    for (i, chunk) in chunks.into_iter().enumerate() {
        out.push(v1::Frame::with(
            0,
            Body::Batch(v1::Batch {
                partition: Partition::Notification as i32,
                messages: chunk.iter().map(Item::to_message).collect(),
                more: i + 1 < n,
                next_offset: chunk.last().map_or(0, |m| m.offset + 1),
                ..Default::default()
            }),
        ));
    }
    out.push(v1::Frame::with(
        0,
        Body::Summary(v1::Summary {
            senders: p
                .senders
                .iter()
                .map(|s| v1::SenderSummary {
                    from: s.from.clone(),
                    unread: s.unread,
                    first_offset: s.first_offset,
                    last_offset: s.last_offset,
                    last_message: Some(s.last.to_message()),
                })
                .collect(),
        }),
    ));
    out.push(v1::Frame::with(
        0,
        Body::Batch(v1::Batch {
            partition: Partition::Receipt as i32,
            next_offset: p.receipts.last().map_or(0, |r| r.offset + 1),
            receipts: collapse_receipts(&p.receipts),
            ..Default::default()
        }),
    ));
    out
}

/// Folds queued receipts into one per (peer, kind): the furthest `up_to_offset` and every covered
/// message id once, in order. Undecodable payloads are skipped (and logged).
pub fn collapse_receipts(items: &[Item]) -> Vec<v1::Receipt> {
    let mut by_key: BTreeMap<(String, i32), v1::Receipt> = BTreeMap::new();
    for item in items {
        let r = match v1::Receipt::decode(item.payload.clone()) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(offset = item.offset, error = %e, "queued receipt does not decode");
                continue;
            }
        };
        let entry = by_key
            .entry((r.from.clone(), r.kind))
            .or_insert_with(|| v1::Receipt {
                from: r.from.clone(),
                to: r.to.clone(),
                kind: r.kind,
                partition: r.partition,
                ..Default::default()
            });
        entry.up_to_offset = entry.up_to_offset.max(r.up_to_offset);
        entry.timestamp = entry.timestamp.max(r.timestamp);
        for id in r.message_ids {
            if !entry.message_ids.contains(&id) {
                entry.message_ids.push(id);
            }
        }
    }
    by_key.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::ReceiptKind;

    fn receipt_item(offset: u64, from: &str, kind: ReceiptKind, up_to: u64, ids: &[&str]) -> Item {
        let r = v1::Receipt {
            from: from.into(),
            to: "alice".into(),
            kind: kind as i32,
            up_to_offset: up_to,
            message_ids: ids.iter().map(|s| s.to_string()).collect(),
            timestamp: offset as i64,
            partition: Partition::Chat as i32,
        };
        Item {
            offset,
            partition: Partition::Receipt,
            from: from.into(),
            to: "alice".into(),
            payload: r.encode_to_vec().into(),
            timestamp: 0,
            acknowledged: false,
            message_id: String::new(),
            device: String::new(),
            peer_offset: 0,
        }
    }

    #[test]
    fn receipts_are_cumulative_per_peer_and_kind() {
        let items = [
            receipt_item(1, "bob", ReceiptKind::Delivered, 3, &["m1", "m2"]),
            receipt_item(2, "bob", ReceiptKind::Delivered, 5, &["m3"]),
            receipt_item(3, "bob", ReceiptKind::Read, 5, &["m1", "m2", "m3"]),
            receipt_item(4, "carol", ReceiptKind::Delivered, 9, &["x"]),
        ];
        let out = collapse_receipts(&items);
        assert_eq!(out.len(), 3);
        let bob_delivered = &out[0];
        assert_eq!(bob_delivered.up_to_offset, 5);
        assert_eq!(bob_delivered.message_ids, ["m1", "m2", "m3"]);
        assert_eq!(out[1].kind, ReceiptKind::Read as i32);
        assert_eq!(out[2].from, "carol");
    }

    #[test]
    fn empty_fanout_still_has_three_frames() {
        let f = frames(PendingForDevice::default());
        assert_eq!(f.len(), 3);
        assert_eq!(f[1].kind(), "summary");
    }
}
