//! The agent's side: the policy and public keys the origins publish (at
//! [`super::authority::PUBLISHED_PATH`]), and the decision made from them alone: tokens are
//! verified locally (signature, expiry, audience, scope), so serving a private manifest or
//! blob, cached or not, never waits on an origin. The policy is fetched at start and
//! refreshed periodically, and at most every [`MIN_REFRESH`] when a token names an unknown
//! key (an origin rotated or a new origin joined).

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::challenge::Policy;
use super::rules::Principal;
use super::tokens::{Jwk, KeySet, TokenError};
use super::{parse_authorization, AccessCheck, Authorize, Credentials};
use crate::error::{ApiError, ErrorCode};

/// Fewest seconds between two refreshes asked for by requests (unknown key, unknown policy).
pub const MIN_REFRESH: Duration = Duration::from_secs(3);

/// How often the policy is asked for while no origin has answered yet.
pub const UNKNOWN_POLICY_RETRY: Duration = Duration::from_secs(2);

/// What an origin publishes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Published {
    /// Whether the origin controls access at all (else the agent is open too).
    pub enabled: bool,
    pub policy: Policy,
    pub keys: Vec<Jwk>,
    /// Not published: the origin answered 404 (an older build, or a URL that is not a Shoal
    /// origin). Taken as open, but never in place of a policy that controls access.
    #[serde(skip)]
    pub unpublished: bool,
}

impl Published {
    /// What an origin without `/shoal/v1/auth` (an older build) or without `[auth]` means.
    pub fn open() -> Published {
        Published {
            enabled: false,
            policy: Policy {
                tokens: false,
                realm: String::new(),
                service: String::new(),
                rules: Vec::new(),
                anonymous: super::Access::Push,
            },
            keys: Vec::new(),
            unpublished: false,
        }
    }

    /// What an origin answering 404 for the publication stands for ([`Published::unpublished`]).
    pub fn unpublished() -> Published {
        Published { unpublished: true, ..Published::open() }
    }

    /// Several origins' publications as one: the policy of the first that controls access
    /// (else the first's), every origin's keys. Access control on at one origin is on: an
    /// open policy (an origin of an older build, or a URL that is not a Shoal origin, first
    /// in the list) must not stand for it, or anonymous clients would read private
    /// repositories through the agent's node identity.
    pub fn merge(all: Vec<Published>) -> Option<Published> {
        let lead = all
            .iter()
            .position(|p| p.enabled)
            .or_else(|| all.iter().position(|p| !p.unpublished))
            .unwrap_or(0);
        let mut merged = all.get(lead)?.clone();
        for p in all {
            for k in p.keys {
                if !merged.keys.iter().any(|x| x.kid == k.kid) {
                    merged.keys.push(k);
                }
            }
        }
        Some(merged)
    }
}

struct Known {
    published: Published,
    keys: KeySet,
}

/// Fetches every origin's publication and merges them; `None` if no origin answered.
pub type FetchPolicy = Arc<dyn Fn() -> BoxFuture<'static, Option<Published>> + Send + Sync>;

/// The agent's authorizer.
pub struct RemoteAuth {
    known: RwLock<Option<Arc<Known>>>,
    fetch: FetchPolicy,
    last_refresh: Mutex<Option<Instant>>,
    refreshing: tokio::sync::Mutex<()>,
}

impl RemoteAuth {
    pub fn new(fetch: FetchPolicy) -> Arc<RemoteAuth> {
        Arc::new(RemoteAuth {
            known: RwLock::new(None),
            fetch,
            last_refresh: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        })
    }

    fn current(&self) -> Option<Arc<Known>> {
        self.known.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replace the policy. A key the origins no longer publish (one of them did not answer
    /// this fetch) stays accepted for a token's lifetime ([`KeySet::renewed`]).
    pub fn set(&self, published: Published) {
        let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
        let before = known.as_ref().map(|k| k.keys.clone()).unwrap_or_default();
        let keys = before.renewed(published.keys.clone(), Instant::now(), super::tokens::RETIRED_KEY_GRACE);
        *known = Some(Arc::new(Known { published, keys }));
    }

    /// Fetch the policy now; `false` if no origin answered (the old one stays). Origins that
    /// only answer 404 (none of those that control access reachable) do not open an agent
    /// whose policy controls access: that counts as no answer.
    pub async fn refresh(&self) -> bool {
        let _one = self.refreshing.lock().await;
        match (self.fetch)().await {
            Some(p) if p.unpublished && self.enabled() == Some(true) => {
                tracing::warn!(
                    "only origins without a published access policy answered; keeping the last one"
                );
                false
            }
            Some(p) => {
                self.set(p);
                true
            }
            None => false,
        }
    }

    /// Refresh unless one ran within [`MIN_REFRESH`].
    async fn refresh_soon(&self) {
        let recent = self
            .last_refresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() < MIN_REFRESH);
        if !recent {
            *self.last_refresh.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            self.refresh().await;
        }
    }

    /// Refresh every `every` for as long as the agent runs, and every
    /// [`UNKNOWN_POLICY_RETRY`] at most until an origin has answered once (the agent answers
    /// 503 and is not ready until then).
    pub fn spawn_refresh(self: &Arc<Self>, every: Duration) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(auth) = me.upgrade() else { return };
                if !auth.refresh().await {
                    tracing::warn!("no origin answered for the authorization policy; keeping the last one");
                }
                let wait = if auth.enabled().is_some() { every } else { every.min(UNKNOWN_POLICY_RETRY) };
                drop(auth);
                tokio::time::sleep(wait).await;
            }
        });
    }

    /// The policy in force, if known.
    pub fn policy(&self) -> Option<Policy> {
        self.current().filter(|k| k.published.enabled).map(|k| k.published.policy.clone())
    }

    /// Whether access control is on (`None`: not known yet).
    pub fn enabled(&self) -> Option<bool> {
        self.current().map(|k| k.published.enabled)
    }

    /// [`enabled`](Self::enabled), asking the origins first if it is not known yet (at most
    /// once per [`MIN_REFRESH`]), as a request's authorization does.
    pub async fn enabled_now(&self) -> Option<bool> {
        if self.current().is_none() {
            self.refresh_soon().await;
        }
        self.enabled()
    }
}

#[async_trait]
impl Authorize for RemoteAuth {
    async fn authorize(&self, check: &AccessCheck<'_>) -> Result<Principal, ApiError> {
        let known = match self.current() {
            Some(k) => k,
            None => {
                self.refresh_soon().await;
                self.current().ok_or_else(|| {
                    ApiError::new(ErrorCode::Unknown, "the origins' authorization policy is not known yet")
                        .with_status(axum::http::StatusCode::SERVICE_UNAVAILABLE)
                })?
            }
        };
        if !known.published.enabled {
            return super::Open.authorize(check).await;
        }
        if check.is_node_pull() {
            return Ok(Principal::Node(check.identity.map(|i| i.name.clone()).unwrap_or_default()));
        }
        let policy = &known.published.policy;
        let (headers, needs) = (check.headers, check.needs);
        match parse_authorization(check.authorization()) {
            Credentials::Bearer(token) => {
                let mut verified = known.keys.verify(&token, &policy.service);
                if verified == Err(TokenError::UnknownKey) {
                    self.refresh_soon().await;
                    if let Some(fresh) = self.current() {
                        verified = fresh.keys.verify(&token, &policy.service);
                    }
                }
                match verified {
                    Ok(claims) => policy.check_claims(headers, &claims, needs),
                    Err(e) => Err(policy.challenge(headers, needs, Some("invalid_token"), &e.to_string())),
                }
            }
            // Agents hold no passwords: Basic credentials count for nothing here.
            _ => policy.check_rights(headers, Principal::Anonymous, policy.anonymous, needs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::rules::{Access, Action, Rule};
    use crate::auth::tokens::{now_secs, Claims, ResourceActions, SigningKey};
    use crate::auth::Need;
    use axum::http::{header, HeaderMap};

    fn published(key: &SigningKey) -> Published {
        Published {
            enabled: true,
            policy: Policy {
                tokens: true,
                realm: "http://origin:5000/token".into(),
                service: "shoal".into(),
                rules: vec![Rule { repositories: "pub/*".into(), anonymous_pull: true, ..Rule::default() }],
                anonymous: Access::None,
            },
            keys: vec![key.public.clone()],
            unpublished: false,
        }
    }

    fn token(key: &SigningKey, repo: &str) -> String {
        let now = now_secs();
        key.sign(&Claims {
            iss: "shoal".into(),
            sub: "alice".into(),
            aud: "shoal".into(),
            exp: now + 60,
            nbf: now - 1,
            iat: now,
            jti: "j".into(),
            access: vec![ResourceActions {
                kind: "repository".into(),
                name: repo.into(),
                actions: vec!["pull".into()],
            }],
        })
        .unwrap()
    }

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        h
    }

    #[tokio::test]
    async fn decides_offline_and_refreshes_on_an_unknown_key() {
        let (old, _) = SigningKey::generate().unwrap();
        let (new, _) = SigningKey::generate().unwrap();
        let fetched = Arc::new(Mutex::new(published(&old)));
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (f, c) = (fetched.clone(), calls.clone());
        let auth = RemoteAuth::new(Arc::new(move || {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let p = f.lock().unwrap().clone();
            Box::pin(async move { Some(p) })
        }));
        let pull = |r: &str| vec![Need::Repo(r.into(), Action::Pull)];
        // Unknown policy: fetched on first use.
        let none = HeaderMap::new();
        let anon_pub =
            auth.authorize(&AccessCheck { headers: &none, identity: None, needs: &pull("pub/a") }).await;
        assert_eq!(anon_pub.unwrap(), Principal::Anonymous);
        let anon_priv =
            auth.authorize(&AccessCheck { headers: &none, identity: None, needs: &pull("priv/a") }).await;
        assert_eq!(anon_priv.unwrap_err().code, ErrorCode::Unauthorized);
        let h = bearer(&token(&old, "priv/a"));
        assert!(auth
            .authorize(&AccessCheck { headers: &h, identity: None, needs: &pull("priv/a") })
            .await
            .is_ok());
        let wrong_scope =
            auth.authorize(&AccessCheck { headers: &h, identity: None, needs: &pull("priv/b") }).await;
        assert_eq!(wrong_scope.unwrap_err().code, ErrorCode::Unauthorized);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A new origin key appears: the first token signed with it triggers a refresh...
        let mut with_new = published(&old);
        with_new.keys.push(new.public.clone());
        *fetched.lock().unwrap() = with_new;
        *auth.last_refresh.lock().unwrap() = None;
        let h = bearer(&token(&new, "priv/a"));
        assert!(auth
            .authorize(&AccessCheck { headers: &h, identity: None, needs: &pull("priv/a") })
            .await
            .is_ok());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
        // ...but a stream of unknown keys does not hammer the origins.
        let (stranger, _) = SigningKey::generate().unwrap();
        let h = bearer(&token(&stranger, "priv/a"));
        for _ in 0..3 {
            assert!(auth
                .authorize(&AccessCheck { headers: &h, identity: None, needs: &pull("priv/a") })
                .await
                .is_err());
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// Origins A and B each sign with their own key; B misses one fetch (restarting): the
    /// tokens it signed still pull through the agent.
    #[tokio::test]
    async fn a_key_of_an_origin_that_missed_a_fetch_still_verifies() {
        let (a, _) = SigningKey::generate().unwrap();
        let (b, _) = SigningKey::generate().unwrap();
        let auth = RemoteAuth::new(Arc::new(|| Box::pin(async { None })));
        auth.set(Published::merge(vec![published(&a), published(&b)]).unwrap());
        auth.set(Published::merge(vec![published(&a)]).unwrap());
        let h = bearer(&token(&b, "priv/a"));
        let pull = vec![Need::Repo("priv/a".into(), Action::Pull)];
        let got = auth.authorize(&AccessCheck { headers: &h, identity: None, needs: &pull }).await;
        assert!(got.is_ok(), "{got:?}");
    }

    #[test]
    fn merge_unions_keys() {
        let (a, _) = SigningKey::generate().unwrap();
        let (b, _) = SigningKey::generate().unwrap();
        let merged = Published::merge(vec![published(&a), published(&b), published(&a)]).unwrap();
        assert_eq!(merged.keys.len(), 2);
        assert!(Published::merge(vec![]).is_none());
    }

    /// An open publication first in the list (an origin of an older build, which answers
    /// 404) does not open an agent whose other origins control access. Before, the merge
    /// kept the first's policy (anonymous push) with access control on.
    #[test]
    fn an_open_origin_first_does_not_open_the_policy() {
        let (a, _) = SigningKey::generate().unwrap();
        let merged = Published::merge(vec![Published::open(), published(&a)]).unwrap();
        assert!(merged.enabled);
        assert_eq!(merged.policy, published(&a).policy);
        let open = Published::merge(vec![Published::open(), Published::open()]).unwrap();
        assert_eq!(open, Published::open());
        let explicit = Published::merge(vec![Published::unpublished(), Published::open()]).unwrap();
        assert!(!explicit.unpublished, "an explicit publication leads an unpublished one");
    }

    /// An agent whose origins control access is not opened by a refresh that reached only an
    /// origin answering 404 (an older build, a URL that is no Shoal origin): before, the
    /// agent let anonymous clients do everything until a later refresh. A publication that
    /// says access control is off does open it.
    #[tokio::test]
    async fn only_unpublished_answers_do_not_open_a_controlled_agent() {
        let (a, _) = SigningKey::generate().unwrap();
        let answers = Arc::new(Mutex::new(vec![published(&a)]));
        let fetch: FetchPolicy = {
            let answers = answers.clone();
            Arc::new(move || {
                let answers = answers.lock().unwrap().clone();
                Box::pin(async move { Published::merge(answers) })
            })
        };
        let auth = RemoteAuth::new(fetch);
        assert!(auth.refresh().await);
        assert_eq!(auth.enabled(), Some(true));
        *answers.lock().unwrap() = vec![Published::unpublished()];
        assert!(!auth.refresh().await, "taken as no answer");
        assert_eq!(auth.enabled(), Some(true), "still controlled");
        *answers.lock().unwrap() = vec![Published::open()];
        assert!(auth.refresh().await);
        assert_eq!(auth.enabled(), Some(false), "turned off at the origins: open");
    }
}
