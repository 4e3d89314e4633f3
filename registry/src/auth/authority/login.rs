//! Basic logins: a user's password checked (argon2 on the blocking pool, at most
//! [`MAX_PASSWORD_CHECKS`] at once), failed attempts limited per name, successful checks
//! remembered a while. Every check that is not remembered costs one argon2 hash, whatever
//! the name: an unknown name is checked against a decoy hash, and a user with a SHA-256 or
//! plain password pays the decoy's hash besides the quick comparison, so response times do
//! not tell which names exist.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::http::header;
use sha2::{Digest as _, Sha256};

use super::Authority;
use crate::auth::rules::Access;
use crate::auth::users::User;
use crate::error::{ApiError, ErrorCode};

/// How long a successful check is remembered after its last use, so a Basic client (which
/// sends its password on every request) costs one slow hash, not one per request.
const LOGIN_CACHE_TTL: Duration = Duration::from_secs(60);
/// Remembered logins at most (cleared when full).
const LOGIN_CACHE_MAX: usize = 10_000;

/// Slow password checks (argon2: about 19 MiB and tens of milliseconds each, on the blocking
/// pool the storage also uses) running at once. Unbounded, a flood of logins under made-up
/// names took gigabytes and stalled the origin's disk work.
pub const MAX_PASSWORD_CHECKS: usize = 4;
/// How long a login waits for a password check to start before it is answered 429.
pub const PASSWORD_CHECK_WAIT: Duration = Duration::from_secs(5);

/// The longest user name a login is checked for. Longer names are wrong credentials at
/// once (no configured user can have one worth a hash), and are never stored or logged: the
/// failure table and the logs hold names as sent.
pub const MAX_LOGIN_NAME_BYTES: usize = 256;

impl Authority {
    /// Check a user's password: `Ok(Some(user))`, `Ok(None)` for wrong credentials, or 429
    /// once the name has used up its failed attempts (or too many checks wait to run). A
    /// remembered login (the same name and password checked recently) is not refused: it
    /// proves the password, and guesses under that name must not lock its owner out.
    pub async fn login(&self, name: &str, password: &str) -> Result<Option<User>, ApiError> {
        if name.len() > MAX_LOGIN_NAME_BYTES {
            return Ok(None);
        }
        let too_many = |why: &str| {
            ApiError::new(ErrorCode::TooManyRequests, format!("{why}; try again later"))
                .with_header(header::RETRY_AFTER, axum::http::HeaderValue::from_static("60"))
        };
        let refuse_if_blocked = || {
            if self.failures.blocked(name, Instant::now()) {
                tracing::warn!(user = %name, "login refused: too many failed attempts");
                return Err(too_many("too many failed logins"));
            }
            Ok(())
        };
        let user = self.user(name).cloned();
        let key: [u8; 32] = Sha256::digest(format!("{name}\0{password}").as_bytes()).into();
        // A login in use stays remembered (users are read at start only, so a remembered
        // password cannot have changed): a busy client whose entry ran out would otherwise
        // send all its requests of that moment to the argon2 checks at once.
        let cached = user.is_some() && {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            match recent.get_mut(&key) {
                Some(at) if at.elapsed() < LOGIN_CACHE_TTL => {
                    *at = Instant::now();
                    true
                }
                _ => false,
            }
        };
        if cached {
            // Proven, so let through; but the guesses under its name keep counting: clearing
            // them here (as a checked password does) gave a guesser `login_failures` more
            // tries per request of a busy real client, and for a name already blocked, five
            // more per real login.
            return Ok(user);
        }
        refuse_if_blocked()?;
        let permit = tokio::time::timeout(PASSWORD_CHECK_WAIT, self.checks.clone().acquire_owned()).await;
        let Ok(Ok(permit)) = permit else {
            tracing::warn!(user = %name, "login refused: too many password checks waiting");
            return Err(too_many("too many logins at once"));
        };
        // Failures of the checks that ran while this one waited count: concurrent guesses
        // get no more checks than one after the other (give or take the checks at once).
        refuse_if_blocked()?;
        // The permit and the failure's count go with the hash: a client that hangs up while
        // it runs (its request is dropped, the hash is not) frees no check early and still
        // spends one of its name's attempts.
        let (failures, who, now) = (self.failures.clone(), name.to_string(), Instant::now());
        let (checked, p, decoy) = (user.clone(), password.to_string(), self.decoy.clone());
        let check = move || {
            let _permit = permit;
            let ok = match &checked {
                Some(user) => check_evenly(user, &p, &decoy),
                None => {
                    let _ = decoy.user().verify(&p);
                    false
                }
            };
            if !ok {
                failures.failed(&who, &p, checked.is_some(), now);
            }
            ok
        };
        let ok = tokio::task::spawn_blocking(check).await.unwrap_or(false);
        let Some(user) = user.filter(|_| ok) else {
            if self.user(name).is_some() {
                tracing::info!(user = %name, "failed login");
            }
            return Ok(None);
        };
        self.failures.succeeded(name);
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() >= LOGIN_CACHE_MAX {
            recent.clear();
        }
        recent.insert(key, Instant::now());
        Ok(Some(user))
    }
}

/// `user`'s password check at the price of an argon2 hash: a quick (SHA-256 or plain) one pays
/// the decoy's hash too, as an unknown name does.
fn check_evenly(user: &User, password: &str, decoy: &Decoy) -> bool {
    if !user.slow_hash() {
        let _ = decoy.user().verify(password);
    }
    user.verify(password)
}

/// A user with an argon2 hash of a random password, made as the configured users' hashes
/// are ([`hash_like_users`](crate::auth::users::hash_like_users)): checked for unknown names.
/// Made on first use (a password check, on the blocking pool).
pub(super) struct Decoy {
    users: Vec<User>,
    user: OnceLock<User>,
}

impl Decoy {
    pub(super) fn new(users: &[User]) -> Decoy {
        Decoy { users: users.to_vec(), user: OnceLock::new() }
    }

    fn user(&self) -> &User {
        self.user.get_or_init(|| {
            let mut secret = [0u8; 16];
            let hash = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
                .ok()
                .and_then(|()| crate::auth::users::hash_like_users(&hex::encode(secret), &self.users).ok());
            User {
                name: String::new(),
                password: None,
                password_sha256: None,
                password_argon2: hash,
                access: Access::None,
            }
        })
    }
}
