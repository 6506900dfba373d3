//! Reading pages of a user's queue: RESUME on the WebSocket and `GET /v1/users/{user}/messages`
//! both read through here, so they page, clamp and start the same way.

use crate::{error::Refused, state::Shared};
use bimip_proto::v1::Partition;
use bimip_store::{QueueStore, ReadBatch, ReadRequest};

/// Most items in one page.
pub const MAX_LIMIT: u32 = 1000;

/// One page to read.
pub struct Page {
    /// The reading device: where a page without `start` begins (its cursor). Empty for the
    /// HTTP API, which always gives a start.
    pub device: String,
    pub partition: Partition,
    /// Messages from this sender (None: every item of the partition).
    pub peer: Option<String>,
    /// Also the user's own copies of what it sent to `peer` (both sides of the conversation).
    pub with_sent: bool,
    pub start: Option<u64>,
    /// Asked limit; 0 = `default_limit`; at most [`MAX_LIMIT`].
    pub limit: u32,
    pub default_limit: u32,
    pub newest_first: bool,
}

/// Reads one page of `user`'s queue.
pub async fn read_page(state: &Shared, user: &str, page: Page) -> Result<ReadBatch, Refused> {
    let limit = match page.limit {
        0 => page.default_limit,
        l => l.min(MAX_LIMIT),
    } as usize;
    let req = ReadRequest {
        device: page.device,
        partition: page.partition,
        peer: page.peer,
        start: page.start,
        limit,
        with_sent: page.with_sent,
        newest_first: page.newest_first,
    };
    Ok(state.store.read(user, req).await?)
}
