//! DICOM UID generation for derived objects (UUID-derived `2.25.` UIDs, PS3.5 §B.2).
//! Owns no dataset logic; never reuses or derives a UID from a source instance.

/// Implementation Class UID written into the file meta of every object desam creates (fixed).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.148189211816006051814171009530453101353";
/// Implementation Version Name (SH, ≤16 characters).
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("DESAM_", env!("CARGO_PKG_VERSION"));

/// A fresh globally unique UID: `2.25.` followed by a random 128-bit integer in decimal
/// (at most 44 characters, no leading zeros).
pub fn new_uid() -> String {
    let n: u128 = rand::random();
    format!("2.25.{n}")
}

/// True when `uid` is syntactically a valid DICOM UID (≤64 chars, digits and dots, no empty
/// component, no leading zero in a multi-digit component).
pub fn is_valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid
            .split('.')
            .all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) && !(c.len() > 1 && c.starts_with('0')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_valid_and_unique() {
        let a = new_uid();
        let b = new_uid();
        assert_ne!(a, b);
        for u in [&a, &b] {
            assert!(u.starts_with("2.25."), "{u}");
            assert!(is_valid_uid(u), "{u}");
        }
        assert!(is_valid_uid(IMPLEMENTATION_CLASS_UID));
        assert!(IMPLEMENTATION_VERSION_NAME.len() <= 16);
        assert!(!is_valid_uid("1.02.3"));
        assert!(!is_valid_uid("1..3"));
        assert!(!is_valid_uid("1.2.a"));
    }
}
