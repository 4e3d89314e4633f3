//! The origin's side of authentication: users and Basic logins (rate-limited), tokens it
//! signs at `/token`, the public keys and anonymous rules it publishes at
//! [`PUBLISHED_PATH`] for agents, and the guard of the node API (`/shoal/v1/blobs/*`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::challenge::Policy;
use super::limiter::FailedLogins;
use super::remote::Published;
use super::rules::{allowed, Access, Principal, Rule};
use super::tokens::{now_secs, rfc3339, Claims, KeySet, ResourceActions, Scope, SigningKey};
use super::users::{constant_time_eq, User};
use super::{
    parse_authorization, AccessCheck, AuthConfig, AuthError, Authorize, Credentials, Need, ServedPrincipal,
};
use crate::error::{ApiError, ErrorCode};
use crate::identity::TransportIdentity;

/// Where every origin publishes its public keys, realm, service and anonymous rules.
pub const PUBLISHED_PATH: &str = "/shoal/v1/auth";
/// The token endpoint's path (the default realm is this path on the client's host).
pub const TOKEN_PATH: &str = "/token";

/// Fetches the other origins' published keys; `None` if none answered.
pub type FetchKeys =
    Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, Option<Vec<super::tokens::Jwk>>> + Send + Sync>;

/// An origin's authentication and authorization.
pub struct Authority {
    config: AuthConfig,
    policy: Policy,
    signing: Option<SigningKey>,
    /// This origin's own keys (signing key, `token_verify_keys`).
    own: Vec<super::tokens::Jwk>,
    /// Those and the other origins' published keys.
    keys: RwLock<KeySet>,
    peers: OnceLock<FetchKeys>,
    last_peer_refresh: Mutex<Option<Instant>>,
    failures: Arc<FailedLogins>,
    recent: Mutex<HashMap<[u8; 32], Instant>>,
    /// Slow password checks running ([`MAX_PASSWORD_CHECKS`]).
    checks: Arc<tokio::sync::Semaphore>,
    cluster_secrets: Vec<[u8; 32]>,
    /// What an unknown name's password is checked against.
    decoy: Arc<login::Decoy>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("policy", &self.policy).field("keys", &self.keys()).finish()
    }
}

/// The token endpoint's answer.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct TokenReply {
    pub token: String,
    pub access_token: String,
    pub expires_in: u64,
    pub issued_at: String,
}

impl Authority {
    /// From the `[auth]` section; with `tokens`, the signing key comes from `token_key_file`
    /// or `<data_dir>/auth/token-key.pem` (created if missing). The cluster's secrets (the
    /// current one and those still accepted during a rotation) are also accepted on the node
    /// API: other origins send one when they ask about a pull-through fetch.
    pub fn new(
        config: AuthConfig,
        data_dir: &Path,
        cluster_secrets: &[String],
    ) -> Result<Authority, AuthError> {
        let signing = if config.tokens {
            Some(match &config.token_key_file {
                Some(path) => SigningKey::from_pem(
                    &std::fs::read_to_string(path)
                        .map_err(|e| AuthError::Config(format!("token_key_file {}: {e}", path.display())))?,
                )?,
                None => SigningKey::load_or_create(&data_dir.join("auth").join("token-key.pem"))?,
            })
        } else {
            None
        };
        let mut public = Vec::new();
        public.extend(signing.as_ref().map(|k| k.public.clone()));
        for path in &config.token_verify_keys {
            let text = std::fs::read_to_string(path)
                .map_err(|e| AuthError::Config(format!("token_verify_keys {}: {e}", path.display())))?;
            public.push(super::tokens::public_key_from_pem(&text)?);
        }
        if config.tokens
            && !config.realm.is_empty()
            && !config.realm.contains("://")
            && config.realm != "shoal"
        {
            return Err(AuthError::Config("auth.realm must be an absolute URL with tokens = true".into()));
        }
        let policy = Policy {
            tokens: config.tokens,
            realm: if config.tokens && !config.realm.contains("://") {
                String::new()
            } else {
                config.realm.clone()
            },
            service: config.service.clone(),
            rules: config.rules.clone(),
            anonymous: config.anonymous_access(),
        };
        let decoy = Arc::new(login::Decoy::new(&config.users));
        Ok(Authority {
            failures: Arc::new(FailedLogins::new(config.login_failures, config.login_window)),
            config,
            policy,
            signing,
            keys: RwLock::new(KeySet::new(public.clone())),
            own: public,
            peers: OnceLock::new(),
            last_peer_refresh: Mutex::new(None),
            recent: Mutex::new(HashMap::new()),
            checks: Arc::new(tokio::sync::Semaphore::new(MAX_PASSWORD_CHECKS)),
            decoy,
            cluster_secrets: cluster_secrets
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| Sha256::digest(s.as_bytes()).into())
                .collect(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled()
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Every key tokens are accepted from: this origin's and the other origins'.
    pub fn keys(&self) -> KeySet {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Accept tokens signed by the other origins' `keys` too (a client may get its token
    /// from one origin and send the next request to another).
    /// A peer key missing from `keys` (its origin did not answer this fetch) stays accepted
    /// for a token's lifetime ([`KeySet::renewed`]).
    pub fn set_peer_keys(&self, keys: Vec<super::tokens::Jwk>) {
        let mut current = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let grace = super::tokens::retired_key_grace(self.config.token_ttl);
        *current = current.renewed(self.own.iter().cloned().chain(keys), Instant::now(), grace);
    }

    /// How to fetch the other origins' keys: every `every`, and at most every
    /// [`super::remote::MIN_REFRESH`] when a token names a key this origin does not know.
    pub fn follow_peers(self: &Arc<Self>, fetch: FetchKeys, every: Duration) {
        if self.peers.set(fetch).is_err() {
            return;
        }
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(auth) = me.upgrade() else { return };
                auth.refresh_peers(false).await;
                drop(auth);
                tokio::time::sleep(every).await;
            }
        });
    }

    /// Fetch the other origins' keys; `on_demand` (an unknown key) counts against the rate
    /// limit, the periodic refresh does not.
    async fn refresh_peers(&self, on_demand: bool) {
        let Some(fetch) = self.peers.get() else { return };
        if on_demand {
            *self.last_peer_refresh.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        if let Some(keys) = fetch().await {
            self.set_peer_keys(keys);
        }
    }

    /// Verify a token, fetching the other origins' keys first if it names an unknown one.
    async fn verify(&self, token: &str) -> Result<Claims, super::tokens::TokenError> {
        let first = self.keys().verify(token, &self.policy.service);
        if first != Err(super::tokens::TokenError::UnknownKey) || self.peers.get().is_none() {
            return first;
        }
        let recent = self
            .last_peer_refresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() < super::remote::MIN_REFRESH);
        if recent {
            return first;
        }
        self.refresh_peers(true).await;
        self.keys().verify(token, &self.policy.service)
    }

    fn user(&self, name: &str) -> Option<&User> {
        self.config.users.iter().find(|u| u.name == name)
    }

    /// The access a token for `principal` gets: what was asked, narrowed to what the rules allow.
    pub fn grant(&self, principal: &Principal, default: Access, scopes: &[Scope]) -> Vec<ResourceActions> {
        let mut out: Vec<ResourceActions> = Vec::new();
        for scope in scopes {
            match scope {
                Scope::Repository { name, actions } => {
                    if name.parse::<crate::RepoName>().is_err() {
                        continue;
                    }
                    let may = allowed(&self.policy.rules, principal, default, name);
                    let granted: Vec<String> =
                        actions.iter().filter(|a| may.contains(a)).map(|a| a.as_str().to_string()).collect();
                    if granted.is_empty() {
                        continue;
                    }
                    match out.iter_mut().find(|r| r.kind == "repository" && &r.name == name) {
                        Some(r) => {
                            for g in granted {
                                if !r.actions.contains(&g) {
                                    r.actions.push(g);
                                }
                            }
                        }
                        None => out.push(ResourceActions {
                            kind: "repository".into(),
                            name: name.clone(),
                            actions: granted,
                        }),
                    }
                }
                Scope::Catalog => {
                    let ok = self
                        .policy
                        .check_rights(&HeaderMap::new(), principal.clone(), default, &[Need::Catalog])
                        .is_ok();
                    if ok && !out.iter().any(|r| r.kind == "registry") {
                        out.push(ResourceActions {
                            kind: "registry".into(),
                            name: "catalog".into(),
                            actions: vec!["*".into()],
                        });
                    }
                }
            }
        }
        out
    }

    /// Sign a token for `subject` (empty: anonymous) carrying `access`.
    pub fn issue(&self, subject: &str, access: Vec<ResourceActions>) -> Result<TokenReply, AuthError> {
        let key =
            self.signing.as_ref().ok_or_else(|| AuthError::Config("token auth is not enabled".into()))?;
        let now = now_secs();
        let ttl = self.config.token_ttl.as_secs().max(1);
        let mut jti = [0u8; 12];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut jti)
            .map_err(|_| AuthError::Random)?;
        let claims = Claims {
            iss: self.config.service.clone(),
            sub: subject.to_string(),
            aud: self.config.service.clone(),
            exp: now + ttl,
            nbf: now.saturating_sub(1),
            iat: now,
            jti: hex::encode(jti),
            access,
        };
        let token = key.sign(&claims)?;
        Ok(TokenReply { access_token: token.clone(), token, expires_in: ttl, issued_at: rfc3339(now) })
    }

    /// What agents fetch: keys, realm (absolute, as the caller reached this origin), service,
    /// and the rules as [`Rule::published`] writes them (user lists left out, since only
    /// anonymous pull matters there; exact names hashed, so the publication lists no names).
    pub fn published(&self, headers: &HeaderMap) -> Published {
        let mut policy = self.policy.clone();
        if policy.tokens {
            policy.realm = self.policy.realm_url(headers);
        }
        policy.rules = policy.rules.iter().map(Rule::published).collect();
        Published { enabled: self.enabled(), policy, keys: self.own.clone(), unpublished: false }
    }

    /// `/token` (GET with Basic credentials or none; POST `grant_type=password`) when token
    /// auth is on, and [`PUBLISHED_PATH`] always.
    pub fn routes(self: Arc<Self>) -> Router {
        let mut router = Router::new().route(PUBLISHED_PATH, get(published));
        if self.signing.is_some() {
            router = router.route(TOKEN_PATH, get(token_get).post(token_post));
        }
        router.with_state(self)
    }

    /// Who may make a node-API request, if anyone: a cluster node by transport identity or
    /// the cluster secret ([`NodeApiCaller::Node`]); with access control off, anyone else
    /// as a client; a client with a valid token (an agent forwarding its client's token in
    /// plain-HTTP setups) that grants pull on `repo` when the request names one (the
    /// pull-through routes: a fetch of an upstream repository's blob and its bytes), else
    /// anything. Without a token, where nodes are not verified (`nodes_verified`: TLS with a
    /// cluster CA), what an anonymous client may read: pull on `repo`, or anonymous pull
    /// somewhere for the routes that name none (a blob's metainfo and seeders, by digest).
    /// An anonymous token would grant as much; with Basic auth and no node certificates
    /// (agents and trackers with no identity, no tokens to fetch) this is how agents serve
    /// public repositories. Where nodes are verified they have certificates, and a caller
    /// without one or a token gets nothing.
    pub fn node_api_caller(
        &self,
        headers: &HeaderMap,
        identity: Option<&TransportIdentity>,
        repo: Option<&str>,
        nodes_verified: bool,
    ) -> Option<NodeApiCaller> {
        if identity.is_some_and(|i| i.role.is_node()) {
            return Some(NodeApiCaller::Node);
        }
        let token =
            match parse_authorization(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())) {
                Credentials::Bearer(token) => Some(token),
                _ => None,
            };
        if let Some(token) = &token {
            let given: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            // Every secret compared, so the time tells nothing of which one matched.
            let matched =
                self.cluster_secrets.iter().fold(false, |any, secret| constant_time_eq(&given, secret) | any);
            if matched {
                return Some(NodeApiCaller::Node);
            }
        }
        if !self.enabled() {
            return Some(NodeApiCaller::Client);
        }
        let Some(token) = token else {
            return (!nodes_verified && self.policy.anonymous_reads(repo)).then_some(NodeApiCaller::Client);
        };
        let granted = self.keys().verify(&token, &self.policy.service).is_ok_and(|c| match repo {
            Some(repo) => c.grants(repo, super::Action::Pull),
            None => !c.access.is_empty(),
        });
        granted.then_some(NodeApiCaller::Client)
    }

    /// Whether [`node_api_caller`](Self::node_api_caller) lets a request go ahead where nodes
    /// are not verified.
    pub fn node_api_allows(
        &self,
        headers: &HeaderMap,
        identity: Option<&TransportIdentity>,
        repo: Option<&str>,
    ) -> bool {
        self.node_api_caller(headers, identity, repo, false).is_some()
    }

    /// Wrap `routes` (the node API) with [`node_api_caller`](Self::node_api_caller); the
    /// request carries the [`NodeApiCaller`] in its extensions.
    pub fn guard_node_api(self: &Arc<Self>, routes: Router) -> Router {
        routes.layer(axum::middleware::from_fn_with_state(self.clone(), node_api_guard))
    }
}

/// Who a node-API request came from (see [`Authority::node_api_caller`]), in its extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeApiCaller {
    /// A cluster node (its certificate, or the cluster secret); any caller with access control
    /// off.
    Node,
    /// A client: a token, or no credentials where anonymous clients may read.
    Client,
}

async fn node_api_guard(State(auth): State<Arc<Authority>>, req: Request, next: Next) -> Response {
    // The repository a pull-through route acts for: a token must grant pull on it.
    let repo = axum::extract::Query::<HashMap<String, String>>::try_from_uri(req.uri())
        .ok()
        .and_then(|q| q.0.get("repo").cloned());
    let nodes_verified = req.extensions().get::<crate::identity::NodesVerified>().is_some();
    let caller = auth.node_api_caller(
        req.headers(),
        req.extensions().get::<TransportIdentity>(),
        repo.as_deref(),
        nodes_verified,
    );
    if let Some(caller) = caller {
        let mut req = req;
        req.extensions_mut().insert(caller);
        let node = req.extensions().get::<TransportIdentity>().map(|i| Principal::Node(i.name.clone()));
        let mut resp = next.run(req).await;
        if let Some(p) = node {
            resp.extensions_mut().insert(ServedPrincipal(p));
        }
        return resp;
    }
    let mut resp = (StatusCode::UNAUTHORIZED, "this API is for cluster nodes\n").into_response();
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
    resp
}

#[async_trait]
impl Authorize for Authority {
    async fn authorize(&self, check: &AccessCheck<'_>) -> Result<Principal, ApiError> {
        if !self.enabled() {
            return super::Open.authorize(check).await;
        }
        if check.is_node_pull() {
            return Ok(Principal::Node(check.identity.map(|i| i.name.clone()).unwrap_or_default()));
        }
        let (headers, needs) = (check.headers, check.needs);
        match parse_authorization(check.authorization()) {
            Credentials::Bearer(token) => match self.verify(&token).await {
                Ok(claims) => self.policy.check_claims(headers, &claims, needs),
                Err(e) => Err(self.policy.challenge(headers, needs, Some("invalid_token"), &e.to_string())),
            },
            Credentials::Basic(name, password) => match self.login(&name, &password).await? {
                Some(user) => {
                    self.policy.check_rights(headers, Principal::User(user.name.clone()), user.access, needs)
                }
                None => Err(self.policy.challenge(headers, needs, None, "invalid username or password")),
            },
            Credentials::None => {
                self.policy.check_rights(headers, Principal::Anonymous, self.policy.anonymous, needs)
            }
            Credentials::Bad => Err(self.policy.challenge(headers, needs, None, "unsupported credentials")),
        }
    }

    fn visible(&self, principal: &Principal) -> Option<super::Visible> {
        self.visibility(principal)
    }
}

impl Authority {
    /// Where rules apply, the catalog shows a user (or an anonymous client) only the
    /// repositories it may pull; nodes and registries without rules show every name.
    fn visibility(&self, principal: &Principal) -> Option<super::Visible> {
        if !self.enabled() || self.policy.rules.is_empty() || matches!(principal, Principal::Node(_)) {
            return None;
        }
        let default = match principal {
            Principal::User(name) => self.user(name).map_or(Access::None, |u| u.access),
            _ => self.policy.anonymous,
        };
        let (rules, principal) = (self.policy.rules.clone(), principal.clone());
        Some(Arc::new(move |repo: &str| {
            allowed(&rules, &principal, default, repo).contains(&super::Action::Pull)
        }))
    }
}

async fn published(State(auth): State<Arc<Authority>>, headers: HeaderMap) -> Response {
    Json(auth.published(&headers)).into_response()
}

/// Scopes one token request is granted at most; the rest are not granted. Clients ask for one
/// to a few (a push with mounts: the target and each source); every scope granted is a search
/// of those granted before, and a line in the token, so thousands in one request (a query
/// string may hold about 13,000) cost the server quadratic time and the client a huge token.
pub const MAX_TOKEN_SCOPES: usize = 64;

/// Every `scope` parameter (repeatable; each may hold several scopes separated by spaces), the
/// first [`MAX_TOKEN_SCOPES`] of them.
fn scopes_of(pairs: &[(String, String)]) -> Vec<Scope> {
    pairs
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').filter_map(Scope::parse))
        .take(MAX_TOKEN_SCOPES)
        .collect()
}

fn token_error(err: ApiError, basic_realm: &str) -> Response {
    let mut resp = err.into_response();
    if resp.status() == StatusCode::UNAUTHORIZED {
        if let Ok(v) =
            axum::http::HeaderValue::from_str(&format!("Basic realm=\"{}\"", basic_realm.replace('"', "")))
        {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
    }
    resp
}

/// Issue a token for `who` (None: anonymous) with the scopes asked, as JSON.
fn reply(auth: &Authority, who: Option<User>, scopes: &[Scope]) -> Response {
    let (principal, default) = match &who {
        Some(u) => (Principal::User(u.name.clone()), u.access),
        None => (Principal::Anonymous, auth.policy.anonymous),
    };
    let access = auth.grant(&principal, default, scopes);
    let subject = who.map(|u| u.name).unwrap_or_default();
    match auth.issue(&subject, access) {
        Ok(t) => {
            let mut resp = Json(t).into_response();
            resp.extensions_mut().insert(ServedPrincipal(principal));
            resp
        }
        Err(e) => ApiError::new(ErrorCode::Unknown, e.to_string()).into_response(),
    }
}

async fn token_get(State(auth): State<Arc<Authority>>, request: Request) -> Response {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(request.uri().query().unwrap_or("")).unwrap_or_default();
    let scopes = scopes_of(&pairs);
    let header = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match parse_authorization(header) {
        Credentials::None => reply(&auth, None, &scopes),
        Credentials::Basic(name, password) => match auth.login(&name, &password).await {
            Ok(Some(user)) => reply(&auth, Some(user), &scopes),
            Ok(None) => token_error(
                ApiError::new(ErrorCode::Unauthorized, "invalid username or password"),
                &auth.config.realm,
            ),
            Err(e) => e.into_response(),
        },
        _ => token_error(
            ApiError::new(ErrorCode::Unauthorized, "send Basic credentials or none"),
            &auth.config.realm,
        ),
    }
}

/// containerd's OAuth path: `grant_type=password` with `username`, `password`, `scope`.
async fn token_post(State(auth): State<Arc<Authority>>, body: Bytes) -> Response {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let get = |k: &str| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    if get("grant_type") != Some("password") {
        return (StatusCode::BAD_REQUEST, Json(serde_json::json!({"error": "unsupported_grant_type"})))
            .into_response();
    }
    let scopes = scopes_of(&pairs);
    match auth.login(get("username").unwrap_or(""), get("password").unwrap_or("")).await {
        Ok(Some(user)) => reply(&auth, Some(user), &scopes),
        Ok(None) => {
            (StatusCode::UNAUTHORIZED, Json(serde_json::json!({"error": "invalid_grant"}))).into_response()
        }
        Err(e) => e.into_response(),
    }
}

mod login;
pub use login::{MAX_LOGIN_NAME_BYTES, MAX_PASSWORD_CHECKS, PASSWORD_CHECK_WAIT};

#[cfg(test)]
mod tests;
