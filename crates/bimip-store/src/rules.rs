//! Input checks both backends apply before they change anything, written once.

use crate::StoreError;

/// A valid user id, or [`StoreError::InvalidUser`].
pub(crate) fn check_user(user: &str) -> Result<(), StoreError> {
    bimip_proto::validate_user_id(user).map_err(|_| StoreError::InvalidUser(user.to_string()))
}

/// The checks of [`crate::ProfileStore::put_contacts`]: valid ids, and not listing oneself.
pub(crate) fn check_contacts(user: &str, entries: &[(String, bool)]) -> Result<(), StoreError> {
    check_user(user)?;
    for (c, _) in entries {
        check_user(c)?;
    }
    if entries.iter().any(|(c, _)| c == user) {
        return Err(StoreError::Invalid(format!(
            "user {user:?} cannot list itself as a contact"
        )));
    }
    Ok(())
}

/// The checks of [`crate::ProfileStore::set_block`]: valid ids, and not blocking oneself.
pub(crate) fn check_block(user: &str, other: &str) -> Result<(), StoreError> {
    check_user(user)?;
    check_user(other)?;
    if user == other {
        return Err(StoreError::Invalid(format!(
            "user {user:?} cannot block itself"
        )));
    }
    Ok(())
}
