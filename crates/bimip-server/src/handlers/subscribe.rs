//! `Subscribe`: snapshots of the requested users' awareness, and under the `open` policy live
//! changes too (see [`awareness::subscribe`]).

use crate::{
    awareness,
    conn::{Conn, End, ack_frame},
};
use bimip_proto::{
    Body,
    v1::{self, Frame},
};

pub(super) async fn subscribe(c: &mut Conn, r: u64, sub: v1::Subscribe) -> Result<(), End> {
    let Some(handle) = c.handle.clone() else {
        return Ok(());
    };
    match awareness::subscribe(&c.state, &c.id.user, &handle, &mut c.subscribed, sub).await {
        Ok((snapshots, refusal)) => {
            for a in snapshots {
                c.answer_now(Frame::with(r, Body::Awareness(a))).await?;
            }
            match refusal {
                Some(e) => c.refuse(r, e).await,
                None if r != 0 => c.answer_now(ack_frame(r)).await,
                None => Ok(()),
            }
        }
        Err(e) => c.refuse(r, e).await,
    }
}
