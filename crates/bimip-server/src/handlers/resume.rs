//! RESUME (awareness status 8): every chat message from the peer past this device's cursor (or
//! `from_offset`), in batches of at most `limit`, until none remain.

use crate::{
    conn::{Conn, End},
    error::Refused,
};
use bimip_proto::{
    Body,
    v1::{self, Frame, Partition},
};
use bimip_store::{QueueStore, ReadRequest};

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

pub(super) async fn resume(c: &mut Conn, r: u64, a: v1::Awareness) -> Result<(), End> {
    if let Err(e) = bimip_proto::validate_user_id(&a.to) {
        return c
            .refuse(
                r,
                Refused::bad(format!("RESUME needs the peer in `to`: {e}")),
            )
            .await;
    }
    // Answers to earlier requests (sends, receipts) go first: a RESUME after a receipt must see
    // the receipt applied.
    c.drain_inflight().await?;
    let limit = match a.limit {
        0 => DEFAULT_LIMIT,
        l => l.min(MAX_LIMIT),
    } as usize;
    let mut start = (a.from_offset > 0).then_some(a.from_offset);
    loop {
        let req = ReadRequest {
            device: c.id.device.to_string(),
            partition: Partition::Chat,
            peer: Some(a.to.clone()),
            start,
            limit,
        };
        let page = match c.state.store.read(&c.id.user, req).await {
            Ok(p) => p,
            Err(e) => return c.refuse(r, Refused::from(e)).await,
        };
        let more = page.more;
        let frame = Frame::with(
            r,
            Body::Batch(v1::Batch {
                partition: Partition::Chat as i32,
                contact: a.to.clone(),
                messages: page.items.iter().map(|i| i.to_message()).collect(),
                more,
                next_offset: page.next_offset,
                receipts: vec![],
            }),
        );
        c.answer_now(frame).await?;
        if !more {
            return Ok(());
        }
        start = Some(page.next_offset);
    }
}
