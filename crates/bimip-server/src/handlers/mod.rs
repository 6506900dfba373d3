//! One module per frame kind a client sends. [`on_frame`] decodes nothing itself: it takes the
//! decoded frame from the connection loop and hands its body to the handler of its kind. A
//! handler answers through the connection (`answer_now`, `refuse`, or a future pushed onto
//! `inflight`, which keeps answers in request order); an `Err` ends the connection.

mod awareness;
mod ping;
mod push_token;
mod receipt;
mod resume;
mod send;
mod subscribe;

use crate::{
    conn::{Conn, End},
    error::Refused,
};
use bimip_proto::{
    Body,
    v1::{ErrorCode, Frame},
};

/// Handles one decoded (or undecodable) frame.
pub(crate) async fn on_frame(
    c: &mut Conn,
    decoded: Result<Frame, bimip_proto::DecodeError>,
    salvaged_ref: u64,
) -> Result<(), End> {
    let frame = match decoded {
        Ok(f) => f,
        Err(e) => {
            c.state.metrics.frame_in("invalid");
            return c
                .answer_now(Frame::error(
                    salvaged_ref,
                    ErrorCode::BadRequest,
                    e.to_string(),
                ))
                .await;
        }
    };
    c.state.metrics.frame_in(frame.kind());
    let r = frame.r#ref;
    let Some(body) = frame.body else {
        return Ok(());
    };
    match body {
        Body::Message(m) => send::message(c, r, m).await,
        Body::Receipt(receipt) => {
            receipt::receipt(c, r, receipt);
            Ok(())
        }
        Body::Awareness(a) => awareness::awareness(c, r, a).await,
        Body::Ping(p) => ping::ping(c, r, p).await,
        Body::Pong(_) => Ok(()),
        Body::Subscribe(sub) => subscribe::subscribe(c, r, sub).await,
        Body::PushToken(t) => push_token::push_token(c, r, t).await,
        Body::Welcome(_) | Body::Ack(_) | Body::Batch(_) | Body::Summary(_) | Body::Error(_) => {
            c.refuse(
                r,
                Refused::bad("this frame kind is sent by the server only"),
            )
            .await
        }
    }
}
