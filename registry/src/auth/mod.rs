//! Who may pull, push and delete what, on origins and agents.
//!
//! - [`users`]: users and password hashes (argon2 PHC, `shoal passwd`).
//! - [`rules`]: per-repository-pattern rules, first match wins; pure.
//! - [`tokens`]: ES256 JWTs in the Docker token format, signing and verification keys.
//! - [`challenge`]: the `WWW-Authenticate` answers and the decision shared by origins and
//!   agents.
//! - [`limiter`]: failed logins per user name.
//! - [`authority`]: the origin's side: Basic logins, the token endpoint, the published keys.
//! - [`remote`]: the agent's side: the origins' published policy, tokens checked offline.
//!
//! Without an `[auth]` section every request is allowed, as before.

pub mod authority;
pub mod challenge;
pub mod limiter;
pub mod remote;
pub mod rules;
pub mod tokens;
pub mod users;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::http::{HeaderMap, HeaderValue};
use serde::Deserialize;

use crate::error::ApiError;
use crate::identity::TransportIdentity;
pub use rules::{Access, Action, Principal, Rule};
pub use users::{hash_password, User};

/// Why authentication could not be set up or a token made.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("key: {0}")]
    Key(String),
    #[error("no system randomness")]
    Random,
    #[error("password hash: {0}")]
    Hash(String),
    #[error("token: {0}")]
    Token(String),
    #[error("config: {0}")]
    Config(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The `[auth]` config section of an origin.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// What clients without credentials may do where no rule matches (default: push when no
    /// users and no rules are configured, none otherwise).
    #[serde(default)]
    pub anonymous: Option<Access>,
    #[serde(default)]
    pub users: Vec<User>,
    /// Per-repository rules, first match wins.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Docker token auth: challenges say `Bearer`, the origin serves `/token`.
    #[serde(default)]
    pub tokens: bool,
    /// With `tokens`, an absolute URL of the token endpoint (default: `/token` on the host
    /// the client used); otherwise the Basic realm's label.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// The `service` of challenges and the audience of tokens.
    #[serde(default = "default_service")]
    pub service: String,
    /// PKCS#8 PEM of the token signing key (default: `auth/token-key.pem` in the data
    /// directory, created on first start).
    #[serde(default)]
    pub token_key_file: Option<PathBuf>,
    /// More public (or private) key PEM files whose tokens are accepted: keys being rotated
    /// out, or other origins' keys.
    #[serde(default)]
    pub token_verify_keys: Vec<PathBuf>,
    #[serde(default = "default_token_ttl", with = "humantime_serde")]
    pub token_ttl: Duration,
    /// Failed logins for one user name before further attempts get 429...
    #[serde(default = "default_login_failures")]
    pub login_failures: u32,
    /// ...for this long after the first of them.
    #[serde(default = "default_login_window", with = "humantime_serde")]
    pub login_window: Duration,
}

fn default_realm() -> String {
    "shoal".to_string()
}
fn default_service() -> String {
    "shoal".to_string()
}
fn default_token_ttl() -> Duration {
    tokens::DEFAULT_TOKEN_TTL
}
fn default_login_failures() -> u32 {
    5
}
fn default_login_window() -> Duration {
    Duration::from_secs(60)
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            anonymous: None,
            users: Vec::new(),
            rules: Vec::new(),
            tokens: false,
            realm: default_realm(),
            service: default_service(),
            token_key_file: None,
            token_verify_keys: Vec::new(),
            token_ttl: default_token_ttl(),
            login_failures: default_login_failures(),
            login_window: default_login_window(),
        }
    }
}

impl AuthConfig {
    /// Whether any access control is configured (else the registry is open, as before).
    pub fn enabled(&self) -> bool {
        self.anonymous.is_some() || !self.users.is_empty() || !self.rules.is_empty() || self.tokens
    }

    /// What anonymous clients may do where no rule matches.
    pub fn anonymous_access(&self) -> Access {
        self.anonymous.unwrap_or(if self.users.is_empty() && self.rules.is_empty() {
            Access::Push
        } else {
            Access::None
        })
    }
}

/// What one request needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// `GET /v2/`: any authenticated client (or anonymous, where anonymous may pull).
    Base,
    /// `GET /v2/_catalog`.
    Catalog,
    /// An action on a repository.
    Repo(String, Action),
}

/// A request's credentials and transport identity, and what it needs.
pub struct AccessCheck<'a> {
    pub headers: &'a HeaderMap,
    pub identity: Option<&'a TransportIdentity>,
    pub needs: &'a [Need],
}

impl AccessCheck<'_> {
    pub fn authorization(&self) -> Option<&str> {
        self.headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok())
    }

    /// A cluster process the transport vouched for, asking only to read (listing repository
    /// names included: a node may pull every repository anyway).
    pub fn is_node_pull(&self) -> bool {
        self.identity.is_some_and(|i| i.role.is_node())
            && self
                .needs
                .iter()
                .all(|n| matches!(n, Need::Base | Need::Catalog | Need::Repo(_, Action::Pull)))
    }
}

/// Whether a repository name may be shown (in the catalog) to a principal.
pub type Visible = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Decides whether a request may go ahead; the principal it acts as, or the error to answer.
#[async_trait]
pub trait Authorize: Send + Sync + 'static {
    async fn authorize(&self, check: &AccessCheck<'_>) -> Result<Principal, ApiError>;

    /// Which repositories the catalog shows `principal`; `None`: every one.
    fn visible(&self, _principal: &Principal) -> Option<Visible> {
        None
    }
}

/// Everything allowed (no `[auth]`): the registry as it was.
pub struct Open;

#[async_trait]
impl Authorize for Open {
    async fn authorize(&self, check: &AccessCheck<'_>) -> Result<Principal, ApiError> {
        Ok(match check.identity {
            Some(id) if id.role.is_node() => Principal::Node(id.name.clone()),
            _ => Principal::Anonymous,
        })
    }
}

/// The authorizer a router uses; the default allows everything.
#[derive(Clone)]
pub struct AuthGate(pub Arc<dyn Authorize>);

impl Default for AuthGate {
    fn default() -> Self {
        AuthGate(Arc::new(Open))
    }
}

impl std::fmt::Debug for AuthGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthGate")
    }
}

/// The principal a request was served for, put on the response as an extension so the
/// request log can name it.
#[derive(Clone, Debug)]
pub struct ServedPrincipal(pub Principal);

tokio::task_local! {
    /// The client's bearer token while a request it authorized is handled: an agent forwards
    /// it to the origin for a private repository when no transport identity vouches for the
    /// agent itself (plain HTTP).
    pub static FORWARD_AUTHORIZATION: Option<HeaderValue>;
}

/// The token to forward to an origin, if the current request carries one.
pub fn forwarded_authorization() -> Option<HeaderValue> {
    FORWARD_AUTHORIZATION.try_with(Clone::clone).ok().flatten()
}

/// The credentials of an `Authorization` header.
#[derive(Debug, PartialEq, Eq)]
pub enum Credentials {
    None,
    Basic(String, String),
    Bearer(String),
    /// A header in a scheme we do not know, or malformed.
    Bad,
}

pub fn parse_authorization(header: Option<&str>) -> Credentials {
    use base64::Engine as _;
    let Some(header) = header else { return Credentials::None };
    let Some((scheme, value)) = header.trim().split_once(' ') else { return Credentials::Bad };
    let value = value.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Credentials::Bearer(value.to_string());
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return Credentials::Bad;
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(value) else {
        return Credentials::Bad;
    };
    let Ok(text) = String::from_utf8(decoded) else { return Credentials::Bad };
    match text.split_once(':') {
        Some((u, p)) => Credentials::Basic(u.to_string(), p.to_string()),
        None => Credentials::Bad,
    }
}
