//! RESUME (awareness status 8): every chat message from the peer past this device's cursor (or
//! `from_offset`), in batches of at most `limit`, until none remain.

use crate::{
    conn::{Conn, End},
    error::Refused,
    history::{self, Page},
};
use bimip_proto::{
    Body,
    v1::{self, Frame, Partition},
};

const DEFAULT_LIMIT: u32 = 100;

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
    let mut start = (a.from_offset > 0).then_some(a.from_offset);
    loop {
        let page = Page {
            device: c.id.device.to_string(),
            partition: Partition::Chat,
            peer: Some(a.to.clone()),
            with_sent: false,
            start,
            limit: a.limit,
            default_limit: DEFAULT_LIMIT,
            newest_first: false,
        };
        let page = match history::read_page(&c.state, &c.id.user, page).await {
            Ok(p) => p,
            Err(e) => return c.refuse(r, e).await,
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
