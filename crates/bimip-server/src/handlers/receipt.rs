//! `Receipt`: a device acknowledges items (DELIVERED/READ). Applied by [`delivery::receipt`];
//! with a non-zero `ref` it is confirmed with an `Ack` carrying the device's new cursor.

use crate::{conn::Conn, delivery};
use bimip_proto::{
    Body,
    v1::{self, Frame},
};

pub(super) fn receipt(c: &mut Conn, r: u64, receipt: v1::Receipt) {
    let (state, user, device) = (c.state.clone(), c.id.user.clone(), c.id.device.clone());
    c.inflight.push_back(Box::pin(async move {
        match delivery::receipt(&state, &user, &device, receipt).await {
            Ok(next) if r != 0 => vec![Frame::with(
                r,
                Body::Ack(v1::Ack {
                    offset: next,
                    timestamp: bimip_proto::now_ms(),
                    ..Default::default()
                }),
            )],
            Ok(_) => vec![],
            Err(e) => vec![Frame::error(r, e.code, e.message)],
        }
    }));
}
