//! `PushToken`: registers (or removes) the push token of the connection's own device.

use crate::{
    conn::{Conn, End},
    error::Refused,
};
use bimip_proto::v1::{self, ErrorCode};

pub(super) async fn push_token(c: &mut Conn, r: u64, _t: v1::PushToken) -> Result<(), End> {
    c.refuse(
        r,
        Refused::new(
            ErrorCode::Unavailable,
            "this frame kind is not enabled on this server version",
        ),
    )
    .await
}
