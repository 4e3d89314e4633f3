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
                // The hash's own variant, version and cost are used (from the PHC string).
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
    hash_with(&Argon2::default(), password)
}

fn hash_with(argon: &Argon2<'_>, password: &str) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut salt).map_err(|_| AuthError::Random)?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    argon
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// The argon2 variant, version and cost of a PHC string, if it is an argon2 one.
fn argon2_of(phc: &str) -> Option<(argon2::Params, argon2::Algorithm, argon2::Version)> {
    let hash = PasswordHash::new(phc).ok()?;
    let algorithm = argon2::Algorithm::try_from(hash.algorithm).ok()?;
    let version = hash.version.map_or(Ok(argon2::Version::default()), argon2::Version::try_from).ok()?;
    let params = argon2::Params::try_from(&hash).ok()?;
    Some((params, algorithm, version))
}

/// A PHC string of `password` made as most of `users`' argon2 hashes were (the costliest of
/// those tied; argon2's defaults when none is), so checking it costs what checking one of
/// theirs does: an unknown name is checked against such a hash, and with argon2's defaults a
/// user whose hash another tool made costlier answered a wrong password measurably slower
/// than an unknown name, which told the names apart.
pub fn hash_like_users(password: &str, users: &[User]) -> Result<String, AuthError> {
    let mut counts: Vec<(argon2::Params, argon2::Algorithm, argon2::Version, usize)> = Vec::new();
    for (params, algorithm, version) in
        users.iter().filter_map(|u| u.password_argon2.as_deref()).filter_map(argon2_of)
    {
        match counts.iter_mut().find(|(p, a, v, _)| *p == params && *a == algorithm && *v == version) {
            Some(entry) => entry.3 += 1,
            None => counts.push((params, algorithm, version, 1)),
        }
    }
    let cost = |p: &argon2::Params| u64::from(p.m_cost()) * u64::from(p.t_cost()) * u64::from(p.p_cost());
    let most = counts.into_iter().max_by_key(|(p, _, _, n)| (*n, cost(p)));
    match most {
        Some((params, algorithm, version, _)) => {
            hash_with(&Argon2::new(algorithm, version, params), password)
        }
        None => hash_password(password),
    }
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

    /// The decoy hash is made as most users' are (the costliest of those tied), with
    /// argon2's defaults only when no user has an argon2 hash.
    #[test]
    fn the_decoy_is_hashed_as_most_users_are() {
        let with = |m: u32, t: u32, algorithm: argon2::Algorithm| {
            let params = argon2::Params::new(m, t, 1, None).unwrap();
            let phc = hash_with(&Argon2::new(algorithm, argon2::Version::V0x13, params), "pw").unwrap();
            User { password_argon2: Some(phc), ..user() }
        };
        let made = |users: &[User]| argon2_of(&hash_like_users("secret", users).unwrap()).unwrap();
        let (cheap, costly) = ((1024, 1), (2048, 3));
        let users = [
            with(costly.0, costly.1, argon2::Algorithm::Argon2i),
            with(costly.0, costly.1, argon2::Algorithm::Argon2i),
            with(cheap.0, cheap.1, argon2::Algorithm::Argon2id),
            User { password: Some("plain".into()), ..user() },
        ];
        let (params, algorithm, _) = made(&users);
        assert_eq!((params.m_cost(), params.t_cost(), algorithm), (2048, 3, argon2::Algorithm::Argon2i));
        // A tie: the costlier.
        let tied = [
            with(cheap.0, cheap.1, argon2::Algorithm::Argon2id),
            with(costly.0, costly.1, argon2::Algorithm::Argon2id),
        ];
        assert_eq!(made(&tied).0.m_cost(), 2048);
        // No argon2 user: the defaults.
        let defaults = argon2::Params::default();
        assert_eq!(made(&[user()]).0.m_cost(), defaults.m_cost());
        // What the decoy is checked with verifies as any user's hash does.
        let decoy = User { password_argon2: Some(hash_like_users("secret", &users).unwrap()), ..user() };
        assert!(decoy.verify("secret") && !decoy.verify("guess"));
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
