//! Who may pull and push: optional HTTP Basic users with pull or push rights, and what anonymous
//! clients may do. Produces the spec's `UNAUTHORIZED` (401) and `DENIED` (403).

use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::error::{ApiError, ErrorCode};

/// What a client may do.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Nothing at all.
    None,
    /// Reads only.
    Pull,
    /// Reads and writes.
    #[default]
    Push,
}

/// One user. Prefer `password_sha256` (hex of the SHA-256 of the password) in config files.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_sha256: Option<String>,
    #[serde(default)]
    pub access: Access,
}

/// The `[auth]` config section. Without it, everyone may push (a local or CI-internal registry).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// What clients without credentials may do (default: push when no users are configured,
    /// none when there are users).
    #[serde(default)]
    pub anonymous: Option<Access>,
    #[serde(default)]
    pub users: Vec<User>,
    /// The realm in the `WWW-Authenticate` challenge.
    #[serde(default = "default_realm")]
    pub realm: String,
}

fn default_realm() -> String {
    "shoal".to_string()
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { anonymous: None, users: Vec::new(), realm: default_realm() }
    }
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Compare without an early exit, so response time does not reveal how much of a hash matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl AuthConfig {
    fn anonymous_access(&self) -> Access {
        self.anonymous.unwrap_or(if self.users.is_empty() { Access::Push } else { Access::None })
    }

    /// The access granted to a request with this `Authorization` header (if any), or the error
    /// to answer. `need` is what the request requires.
    pub fn check(&self, authorization: Option<&str>, need: Access) -> Result<(), ApiError> {
        let granted = match authorization {
            Some(h) => parse_basic(h)
                .and_then(|(name, password)| self.user_access(&name, &password))
                .ok_or_else(|| self.challenge())?,
            None => self.anonymous_access(),
        };
        if granted >= need {
            return Ok(());
        }
        if authorization.is_none() {
            return Err(self.challenge());
        }
        Err(ApiError::new(ErrorCode::Denied, "requested access to the resource is denied"))
    }

    fn user_access(&self, name: &str, password: &str) -> Option<Access> {
        let given = sha256_hex(password);
        self.users.iter().find(|u| u.name == name).and_then(|u| {
            let expected = match (&u.password_sha256, &u.password) {
                (Some(h), _) => h.to_ascii_lowercase(),
                (None, Some(p)) => sha256_hex(p),
                (None, None) => return None,
            };
            constant_time_eq(given.as_bytes(), expected.as_bytes()).then_some(u.access)
        })
    }

    fn challenge(&self) -> ApiError {
        let value = format!("Basic realm=\"{}\"", self.realm.replace('"', ""));
        let mut err = ApiError::new(ErrorCode::Unauthorized, "authentication required");
        if let Ok(v) = http::HeaderValue::from_str(&value) {
            err = err.with_header(http::header::WWW_AUTHENTICATE, v);
        }
        err
    }
}

fn parse_basic(header: &str) -> Option<(String, String)> {
    let (scheme, value) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(value.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, pw: &str) -> String {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}")))
    }

    fn config() -> AuthConfig {
        AuthConfig {
            anonymous: Some(Access::Pull),
            users: vec![
                User {
                    name: "ci".into(),
                    password: Some("s3cret".into()),
                    password_sha256: None,
                    access: Access::Push,
                },
                User {
                    name: "viewer".into(),
                    password: None,
                    password_sha256: Some(sha256_hex("v")),
                    access: Access::Pull,
                },
            ],
            realm: "shoal".into(),
        }
    }

    #[test]
    fn default_is_open() {
        assert!(AuthConfig::default().check(None, Access::Push).is_ok());
    }

    #[test]
    fn users_and_anonymous() {
        let c = config();
        assert!(c.check(None, Access::Pull).is_ok());
        assert_eq!(c.check(None, Access::Push).unwrap_err().code, ErrorCode::Unauthorized);
        assert!(c.check(Some(&basic("ci", "s3cret")), Access::Push).is_ok());
        assert_eq!(
            c.check(Some(&basic("ci", "wrong")), Access::Pull).unwrap_err().code,
            ErrorCode::Unauthorized
        );
        assert!(c.check(Some(&basic("viewer", "v")), Access::Pull).is_ok());
        assert_eq!(c.check(Some(&basic("viewer", "v")), Access::Push).unwrap_err().code, ErrorCode::Denied);
        assert_eq!(c.check(Some("Basic !!!"), Access::Push).unwrap_err().code, ErrorCode::Unauthorized);
    }
}
