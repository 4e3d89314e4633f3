//! The decision shared by origins and agents, from a policy (rules, anonymous default, token
//! mode), and the `WWW-Authenticate` challenges of refusals: `Basic realm=…`, or in token
//! mode `Bearer realm=…,service=…,scope=…[,error=…]` as Docker's token spec has it.
//!
//! Refusals, per the distribution spec and docker/distribution: no or bad credentials, or a
//! token that is expired, forged or from an unknown key: 401 `UNAUTHORIZED`; a valid token
//! without the scope: 401 `UNAUTHORIZED` with `error="insufficient_scope"` (the client may ask
//! for a wider token); a known user without the right (Basic): 403 `DENIED`.

use axum::http::{header, HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};

use super::rules::{allowed, Access, Action, Principal, Rule};
use super::tokens::Claims;
use super::Need;
use crate::error::{ApiError, ErrorCode};

/// What an origin or agent decides by.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Policy {
    /// Bearer challenges (Docker token auth) rather than Basic.
    pub tokens: bool,
    /// Token mode: an absolute URL, or empty for `/token` on the request's host. Basic mode:
    /// the realm's label.
    pub realm: String,
    pub service: String,
    pub rules: Vec<Rule>,
    /// Anonymous access where no rule matches.
    pub anonymous: Access,
}

/// Strip what would break a quoted header parameter.
fn quoted(s: &str) -> String {
    s.chars().filter(|c| *c != '"' && *c != '\\' && !c.is_control()).collect()
}

/// The scope string a request's needs ask for (`repository:a:pull,push registry:catalog:*`).
pub fn scope_of(needs: &[Need]) -> String {
    let mut repos: Vec<(&str, Vec<Action>)> = Vec::new();
    let mut catalog = false;
    for need in needs {
        match need {
            Need::Base => {}
            Need::Catalog => catalog = true,
            Need::Repo(name, action) => {
                let mut actions = vec![*action];
                // Pushing needs reading what is there; clients ask for both.
                if *action == Action::Push {
                    actions.insert(0, Action::Pull);
                }
                match repos.iter_mut().find(|(n, _)| n == name) {
                    Some((_, a)) => a.extend(actions),
                    None => repos.push((name, actions)),
                }
            }
        }
    }
    let mut parts: Vec<String> = repos
        .into_iter()
        .map(|(name, mut actions)| {
            actions.sort();
            actions.dedup();
            let list: Vec<&str> = actions.iter().map(|a| a.as_str()).collect();
            format!("repository:{name}:{}", list.join(","))
        })
        .collect();
    if catalog {
        parts.push("registry:catalog:*".to_string());
    }
    parts.join(" ")
}

impl Policy {
    /// The token endpoint's absolute URL as a client that sent `headers` reaches it.
    pub fn realm_url(&self, headers: &HeaderMap) -> String {
        if self.realm.starts_with("http://") || self.realm.starts_with("https://") {
            return self.realm.clone();
        }
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("localhost");
        let proto = headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .filter(|p| *p == "https" || *p == "http")
            .unwrap_or("http");
        format!("{proto}://{host}/token")
    }

    /// 401 `UNAUTHORIZED` with the challenge for `needs`; `error` is the token spec's
    /// `invalid_token` or `insufficient_scope`.
    pub fn challenge(
        &self,
        headers: &HeaderMap,
        needs: &[Need],
        error: Option<&str>,
        message: &str,
    ) -> ApiError {
        let value = if self.tokens {
            let mut v = format!(
                "Bearer realm=\"{}\",service=\"{}\"",
                quoted(&self.realm_url(headers)),
                quoted(&self.service)
            );
            let scope = scope_of(needs);
            if !scope.is_empty() {
                v.push_str(&format!(",scope=\"{}\"", quoted(&scope)));
            }
            if let Some(e) = error {
                v.push_str(&format!(",error=\"{e}\""));
            }
            v
        } else {
            format!("Basic realm=\"{}\"", quoted(&self.realm))
        };
        let mut err = ApiError::new(ErrorCode::Unauthorized, message);
        if let Ok(v) = HeaderValue::from_str(&value) {
            err = err.with_header(header::WWW_AUTHENTICATE, v);
        }
        err
    }

    /// Whether anonymous clients may pull anything at all (then `/v2/` answers them in Basic
    /// mode; token mode always challenges there, as clients expect to discover the realm).
    fn anonymous_may_pull_something(&self) -> bool {
        self.anonymous >= Access::Pull || self.rules.iter().any(|r| r.anonymous_pull)
    }

    /// Decide by `principal`'s rights (`default`: its access where no rule matches).
    pub fn check_rights(
        &self,
        headers: &HeaderMap,
        principal: Principal,
        default: Access,
        needs: &[Need],
    ) -> Result<Principal, ApiError> {
        let anonymous = principal == Principal::Anonymous;
        for need in needs {
            let ok = match need {
                Need::Base => !anonymous || (!self.tokens && self.anonymous_may_pull_something()),
                // With rules, the origin shows each client only what it may pull.
                Need::Catalog => match &principal {
                    Principal::Node(_) => true,
                    Principal::User(_) => default >= Access::Pull || !self.rules.is_empty(),
                    Principal::Anonymous => self.anonymous_may_pull_something(),
                },
                Need::Repo(repo, action) => allowed(&self.rules, &principal, default, repo).contains(action),
            };
            if !ok {
                return Err(if anonymous {
                    self.challenge(headers, needs, None, "authentication required")
                } else {
                    ApiError::new(ErrorCode::Denied, "requested access to the resource is denied")
                });
            }
        }
        Ok(principal)
    }

    /// Decide by a verified token's claims.
    pub fn check_claims(
        &self,
        headers: &HeaderMap,
        claims: &Claims,
        needs: &[Need],
    ) -> Result<Principal, ApiError> {
        for need in needs {
            let ok = match need {
                Need::Base => true,
                Need::Catalog => claims.grants_catalog(),
                // A token never takes away what anonymous clients may do.
                Need::Repo(repo, action) => {
                    claims.grants(repo, *action)
                        || allowed(&self.rules, &Principal::Anonymous, self.anonymous, repo).contains(action)
                }
            };
            if !ok {
                return Err(self.challenge(
                    headers,
                    needs,
                    Some("insufficient_scope"),
                    "the token does not grant access to this resource",
                ));
            }
        }
        Ok(if claims.sub.is_empty() { Principal::Anonymous } else { Principal::User(claims.sub.clone()) })
    }

    /// Anonymous rights in `repo`: may a client without credentials pull it?
    pub fn anonymous_pull(&self, repo: &str) -> bool {
        allowed(&self.rules, &Principal::Anonymous, self.anonymous, repo).contains(&Action::Pull)
    }

    /// May a client without credentials pull `repo`, or with `None` some repository?
    pub fn anonymous_reads(&self, repo: Option<&str>) -> bool {
        match repo {
            Some(repo) => self.anonymous_pull(repo),
            None => self.anonymous >= super::Access::Pull || self.rules.iter().any(|r| r.anonymous_pull),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(tokens: bool) -> Policy {
        Policy {
            tokens,
            realm: String::new(),
            service: "shoal".into(),
            rules: vec![Rule { repositories: "pub/*".into(), anonymous_pull: true, ..Rule::default() }],
            anonymous: Access::None,
        }
    }

    fn host() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("reg:5000"));
        h
    }

    #[test]
    fn bearer_challenge_names_realm_service_and_scope() {
        let p = policy(true);
        let needs = [Need::Repo("priv/app".into(), Action::Push)];
        let err = p.check_rights(&host(), Principal::Anonymous, Access::None, &needs).unwrap_err();
        assert_eq!(err.code, ErrorCode::Unauthorized);
        let resp = axum::response::IntoResponse::into_response(err);
        let v = resp.headers().get(header::WWW_AUTHENTICATE).unwrap().to_str().unwrap().to_string();
        assert_eq!(
            v,
            r#"Bearer realm="http://reg:5000/token",service="shoal",scope="repository:priv/app:pull,push""#
        );
    }

    #[test]
    fn anonymous_pull_per_pattern_and_base() {
        let p = policy(true);
        let pull = |r: &str| [Need::Repo(r.into(), Action::Pull)];
        assert!(p.check_rights(&host(), Principal::Anonymous, Access::None, &pull("pub/x")).is_ok());
        assert!(p.check_rights(&host(), Principal::Anonymous, Access::None, &pull("priv/x")).is_err());
        assert!(p.check_rights(&host(), Principal::Anonymous, Access::None, &[Need::Base]).is_err());
        assert!(policy(false)
            .check_rights(&host(), Principal::Anonymous, Access::None, &[Need::Base])
            .is_ok());
        let user = Principal::User("u".into());
        let denied = p.check_rights(&host(), user, Access::None, &pull("priv/x")).unwrap_err();
        assert_eq!(denied.code, ErrorCode::Denied);
        assert!(p.anonymous_pull("pub/a") && !p.anonymous_pull("priv/a"));
    }

    #[test]
    fn a_token_for_another_repository_still_pulls_public_ones() {
        let p = policy(true);
        let claims = crate::auth::tokens::Claims {
            iss: "shoal".into(),
            sub: "u".into(),
            aud: "shoal".into(),
            exp: 0,
            nbf: 0,
            iat: 0,
            jti: String::new(),
            access: vec![],
        };
        let pull = |r: &str| [Need::Repo(r.into(), Action::Pull)];
        assert!(p.check_claims(&host(), &claims, &pull("pub/x")).is_ok());
        assert_eq!(
            p.check_claims(&host(), &claims, &pull("priv/x")).unwrap_err().code,
            ErrorCode::Unauthorized
        );
    }

    #[test]
    fn scopes_group_by_repository() {
        let needs = [
            Need::Repo("a".into(), Action::Push),
            Need::Repo("b".into(), Action::Pull),
            Need::Repo("a".into(), Action::Delete),
            Need::Catalog,
        ];
        assert_eq!(scope_of(&needs), "repository:a:pull,push,delete repository:b:pull registry:catalog:*");
    }
}
