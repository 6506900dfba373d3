//! `Ping`: answered with a `Pong` carrying the same timestamp (protocol-level keepalive for
//! clients that cannot see WebSocket pings, such as browsers).

use crate::conn::{Conn, End};
use bimip_proto::{
    Body,
    v1::{self, Frame},
};

pub(super) async fn ping(c: &mut Conn, r: u64, p: v1::Ping) -> Result<(), End> {
    c.answer_now(Frame::with(
        r,
        Body::Pong(v1::Pong {
            timestamp: p.timestamp,
        }),
    ))
    .await
}
