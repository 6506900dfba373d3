//! `Awareness` from a client: intent (ONLINE/AWAY/BUSY/DND) and invisibility, TYPING/RECORDING,
//! and RESUME (handed to [`super::resume`]). OFFLINE is the server's to set.

use crate::{
    awareness,
    conn::{Conn, End, ack_frame},
    error::Refused,
};
use bimip_proto::v1::{self, ErrorCode, Status};

pub(super) async fn awareness(c: &mut Conn, r: u64, a: v1::Awareness) -> Result<(), End> {
    c.state
        .metrics
        .awareness_in(awareness::status_label(a.status));
    match Status::try_from(a.status) {
        Ok(Status::Resume) => super::resume::resume(c, r, a).await,
        Ok(s @ (Status::Online | Status::Away | Status::Busy | Status::Dnd)) => {
            match awareness::set_state(&c.state, &c.id.user, c.conn_id, &a, s).await {
                Ok(()) if r != 0 => c.answer_now(ack_frame(r)).await,
                Ok(()) => Ok(()),
                Err(e) => c.refuse(r, e).await,
            }
        }
        Ok(s @ (Status::Typing | Status::Recording)) => {
            // A frame refused for its peer id does not use up the connection's TYPING allowance.
            if let Err(e) = bimip_proto::validate_user_id(&a.to) {
                let message = format!("{s:?} needs the peer in `to`: {e}");
                return c.refuse(r, Refused::bad(message)).await;
            }
            if !c.typing.take() {
                let message = format!(
                    "at most {} TYPING/RECORDING frames per second",
                    c.state.config.presence.typing_per_second
                );
                return c
                    .refuse(r, Refused::new(ErrorCode::RateLimited, message))
                    .await;
            }
            match awareness::typing(&c.state, &c.id.user, &c.id.device, &a, s).await {
                Ok(_) => Ok(()),
                Err(e) => c.refuse(r, e).await,
            }
        }
        Ok(Status::Unspecified) | Err(_) => {
            c.refuse(r, Refused::bad("awareness status is missing or unknown"))
                .await
        }
        Ok(Status::Offline) => {
            c.refuse(
                r,
                Refused::bad("OFFLINE is set by the server when the last device disconnects"),
            )
            .await
        }
    }
}
