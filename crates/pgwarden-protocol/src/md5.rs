//! md5 password authentication (`AuthenticationMD5Password`).

use md5::{Digest, Md5};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What PostgreSQL stores for a password with `password_encryption = md5`:
/// `"md5" + md5(password || user)`.
pub fn stored(user: &str, password: &str) -> String {
    let mut h = Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    format!("md5{}", hex(&h.finalize()))
}

/// Whether `s` looks like a stored md5 hash (`md5` and 32 lowercase hex digits).
pub fn is_stored(s: &str) -> bool {
    s.len() == 35
        && s.starts_with("md5")
        && s[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The client's answer to a salt: `"md5" + md5(stored_without_prefix || salt)`.
pub fn response(stored: &str, salt: [u8; 4]) -> String {
    let mut h = Md5::new();
    h.update(stored.trim_start_matches("md5").as_bytes());
    h.update(salt);
    format!("md5{}", hex(&h.finalize()))
}

/// Checks a client's answer in constant time.
pub fn verify(stored: &str, salt: [u8; 4], client_response: &str) -> bool {
    let expected = response(stored, salt);
    crate::scram::constant_time_eq(expected.as_bytes(), client_response.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_and_verification() {
        // python3 -c "import hashlib; print('md5' + hashlib.md5(b'secretapp').hexdigest())"
        let s = stored("app", "secret");
        assert_eq!(s, "md56a422f785c9e20873908ce25d1736ae2");
        assert!(is_stored(&s));
        assert!(!is_stored("md5xyz"));
        let salt = [1, 2, 3, 4];
        assert!(verify(&s, salt, &response(&s, salt)));
        assert!(!verify(&s, salt, &response(&s, [4, 3, 2, 1])));
        assert!(!verify(&s, salt, "md5"));
    }
}
