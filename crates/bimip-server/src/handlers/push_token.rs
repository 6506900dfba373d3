//! `PushToken`: registers (or removes) the push token of the connection's own device; answered
//! with an `Ack`. The push pipeline sends to it while the device has no open connection.

use crate::{
    conn::{Conn, End, ack_frame},
    push,
};
use bimip_proto::v1;

pub(super) async fn push_token(c: &mut Conn, r: u64, t: v1::PushToken) -> Result<(), End> {
    let result = if t.remove {
        push::devices::unregister(&c.state, &c.id.user, &c.id.device)
            .await
            .map(|_| ())
    } else {
        let reg = push::devices::Registration::from_wire(&t);
        push::devices::register(&c.state, &c.id.user, &c.id.device, reg)
            .await
            .map(|_| ())
    };
    match result {
        Ok(_) => c.answer_now(ack_frame(r)).await,
        Err(e) => c.refuse(r, e).await,
    }
}
