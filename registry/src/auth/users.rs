//! Users and their passwords: argon2 PHC strings (what `shoal passwd` prints), and the older
//! SHA-256 hex and plain forms kept for existing configs.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use ring::rand::SecureRandom as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::rules::Access;
use super::AuthError;

/// One user. Prefer `password_argon2` (from `shoal passwd`) in config files.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// The password in clear (tests, throwaway setups).
    #[serde(default)]
    pub password: Option<String>,
    /// Hex of the SHA-256 of the password (older configs).
    #[serde(default)]
    pub password_sha256: Option<String>,
    /// An argon2 PHC string, as `shoal passwd` prints it.
    #[serde(default)]
    pub password_argon2: Option<String>,
    /// What this user may do in repositories no `[[auth.rules]]` pattern matches.
    #[serde(default)]
    pub access: Access,
}

pub(crate) fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Compare without an early exit, so response time does not reveal how much matched.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl User {
    /// Whether `password` is this user's. Argon2 is deliberately slow (tens of
    /// milliseconds): call it off the async runtime.
    pub fn verify(&self, password: &str) -> bool {
        if let Some(phc) = &self.password_argon2 {
            return match PasswordHash::new(phc) {
                Ok(hash) => Argon2::default().verify_password(password.as_bytes(), &hash).is_ok(),
                Err(e) => {
                    tracing::warn!(user = %self.name, error = %e, "password_argon2 is not a PHC string");
                    false
                }
            };
        }
        let expected = match (&self.password_sha256, &self.password) {
            (Some(h), _) => h.to_ascii_lowercase(),
            (None, Some(p)) => sha256_hex(p),
            (None, None) => return false,
        };
        constant_time_eq(sha256_hex(password).as_bytes(), expected.as_bytes())
    }

    /// Whether checking this user's password is slow enough to cache a success.
    pub fn slow_hash(&self) -> bool {
        self.password_argon2.is_some()
    }
}

/// An argon2id PHC string of `password` with a fresh random salt (`shoal passwd`).
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut salt).map_err(|_| AuthError::Random)?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User {
            name: "u".into(),
            password: None,
            password_sha256: None,
            password_argon2: None,
            access: Access::Pull,
        }
    }

    #[test]
    fn argon2_round_trip() {
        let phc = hash_password("hunter2").unwrap();
        assert!(phc.starts_with("$argon2id$"));
        let u = User { password_argon2: Some(phc), ..user() };
        assert!(u.verify("hunter2"));
        assert!(!u.verify("hunter3"));
        assert!(u.slow_hash());
    }

    #[test]
    fn older_forms() {
        let plain = User { password: Some("p".into()), ..user() };
        assert!(plain.verify("p") && !plain.verify("q"));
        let hashed = User { password_sha256: Some(sha256_hex("p").to_uppercase()), ..user() };
        assert!(hashed.verify("p") && !hashed.verify("P"));
        assert!(!user().verify(""));
        let broken = User { password_argon2: Some("not-phc".into()), ..user() };
        assert!(!broken.verify("not-phc"));
    }
}
