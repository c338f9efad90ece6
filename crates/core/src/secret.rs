//! [`Secret`]: a credential string that is redacted in `Debug`/`Display` and zeroized on drop.
//!
//! The only way to see the value is [`Secret::expose`], called where an upstream handshake is
//! written or a client's password is compared.

use std::fmt;

use zeroize::Zeroize;

/// A secret string (a password, a username of an upstream account).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The cleartext. Call only where the value is written to a peer or compared.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares with `other` in time independent of where the first difference is.
    /// (The length is not hidden: it is not the secret part.)
    pub fn constant_time_eq(&self, other: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(other).into()
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "Secret(***) ***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn compares() {
        let s = Secret::new("abc");
        assert!(s.constant_time_eq(b"abc"));
        assert!(!s.constant_time_eq(b"abd"));
        assert!(!s.constant_time_eq(b"ab"));
    }
}
