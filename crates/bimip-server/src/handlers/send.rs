//! `Message`: a send. Validated here (identity from the connection, never from the frame), then
//! stored and delivered by [`delivery::start_send`]; the `Ack` (or `Error`) is answered in
//! request order once the message is durable.

use crate::{
    conn::{Conn, End},
    delivery::{self, SendRequest},
};
use bimip_proto::{
    Body,
    v1::{self, Frame, Partition},
};

pub(super) async fn message(c: &mut Conn, r: u64, m: v1::Message) -> Result<(), End> {
    let req = SendRequest {
        from: c.id.user.clone(),
        device: c.id.device.clone(),
        conn: Some(c.conn_id),
        to: m.to,
        id: m.id,
        partition: match Partition::try_from(m.partition) {
            Ok(Partition::Unspecified) => Partition::Chat,
            Ok(p) => p,
            Err(_) => Partition::Unspecified,
        },
        payload: m.payload,
        sender_copy: true,
    };
    if let Err(e) = req.validate(c.state.config.max_payload_bytes as usize) {
        return c.refuse(r, e).await;
    }
    match delivery::start_send(&c.state, req).await {
        Ok(fut) => {
            c.inflight.push_back(Box::pin(async move {
                vec![match fut.await {
                    Ok(ack) => Frame::with(r, Body::Ack(ack)),
                    Err(e) => Frame::error(r, e.code, e.message),
                }]
            }));
            Ok(())
        }
        Err(e) => c.refuse(r, e).await,
    }
}
