//! Credentials and the challenges upstream registries answer with: parsing
//! `WWW-Authenticate`, and the bearer tokens of Docker's token flow, kept per repository and
//! credentials until shortly before they expire, so a burst of requests fetches one token.
//! Requests that meet a `401` together share one fetch (a flight): a rollout's hundred pulls of
//! a new image asked the token server a hundred times, and public token servers throttle.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::HeaderValue;
use sha2::{Digest as _, Sha256};

/// Tokens kept (the map is cleared when full; tokens are cheap to fetch again).
pub const MAX_TOKENS: usize = 10_000;
/// A token's life when the token server does not say (Docker's spec default).
pub const DEFAULT_TOKEN_LIFE: Duration = Duration::from_secs(60);
/// Longest a token is used, whatever its server says: a day.
pub const MAX_TOKEN_LIFE: Duration = Duration::from_secs(24 * 3600);
/// A token is not used in the last part of its life (clock skew, request time).
pub const TOKEN_MARGIN: Duration = Duration::from_secs(5);

/// A user name and password: configured for an upstream, or sent by a client.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"…").finish()
    }
}

impl Credentials {
    /// From an `Authorization: Basic ...` value; `None` for anything else.
    pub fn from_authorization(value: &HeaderValue) -> Option<Credentials> {
        let v = value.to_str().ok()?.trim();
        let (scheme, rest) = v.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (username, password) = text.split_once(':')?;
        Some(Credentials { username: username.to_string(), password: password.to_string() })
    }

    /// As an `Authorization: Basic ...` value.
    pub fn to_authorization(&self) -> HeaderValue {
        let raw = format!("{}:{}", self.username, self.password);
        let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
        // Base64 is always a valid header value.
        HeaderValue::from_str(&format!("Basic {encoded}"))
            .unwrap_or_else(|_| HeaderValue::from_static("Basic"))
    }

    /// A stable, non-reversible key for decisions cached per client.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.username.as_bytes());
        h.update([0]);
        h.update(self.password.as_bytes());
        h.finalize().into()
    }
}

/// What a `401` asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
    Basic,
}

/// Parse a `WWW-Authenticate` value (`Bearer realm="...",service="...",scope="..."` or
/// `Basic realm="..."`); `None` for anything else. Never panics.
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, params) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(params);
    let get = |k: &str| params.iter().find(|(key, _)| key.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone());
    Some(Challenge::Bearer { realm: get("realm")?, service: get("service"), scope: get("scope") })
}

/// `key=value` or `key="quoted, value"` pairs separated by commas.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
        if key.is_empty() {
            return out;
        }
        if chars.next() != Some('=') {
            continue;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value =
                std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect::<String>().trim().to_string();
        }
        out.push((key.trim().to_string(), value));
    }
}

/// The answer of a token endpoint.
#[derive(serde::Deserialize)]
pub struct TokenAnswer {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl TokenAnswer {
    pub fn bearer(&self) -> Option<HeaderValue> {
        let t = self.token.as_deref().or(self.access_token.as_deref()).filter(|t| !t.is_empty())?;
        HeaderValue::from_str(&format!("Bearer {t}")).ok()
    }

    /// How long the token may be used: what the token server said, at most
    /// [`MAX_TOKEN_LIFE`] (an `expires_in` of 2^63 seconds or more overflowed the instant it
    /// ends at, a panic in the request).
    pub fn life(&self) -> Duration {
        self.expires_in.map(Duration::from_secs).unwrap_or(DEFAULT_TOKEN_LIFE).min(MAX_TOKEN_LIFE)
    }
}

/// A token's key: (repository, credentials fingerprint; zeros for anonymous).
type TokenKey = (String, [u8; 32]);

/// One token fetch that requests waiting on the same key share, with its outcome.
type Flight = Arc<tokio::sync::OnceCell<Result<HeaderValue, crate::UpstreamError>>>;

/// Bearer tokens with the instant they stop being used.
#[derive(Default)]
pub struct Tokens {
    map: Mutex<HashMap<TokenKey, (HeaderValue, Instant)>>,
    /// Fetches under way; an entry lives only while its fetch does (at most one per request
    /// waiting, so bounded by the requests in progress).
    flights: Mutex<HashMap<TokenKey, Flight>>,
}

/// Takes a flight out of the table when a request on it ends with its answer (a later `401`
/// asks again), or when the last request waiting on it is dropped unanswered (nothing left
/// behind). A dropped fetcher's flight stays while others wait on it: one of them runs the
/// fetch, and requests arriving meanwhile join it rather than start another.
struct FlightEnd<'a> {
    tokens: &'a Tokens,
    key: TokenKey,
    flight: Flight,
}

impl Drop for FlightEnd<'_> {
    fn drop(&mut self) {
        let mut flights = self.tokens.flights.lock().unwrap_or_else(|p| p.into_inner());
        // The table's reference and this one: no other request waits.
        let alone = Arc::strong_count(&self.flight) <= 2;
        if flights.get(&self.key).is_some_and(|f| Arc::ptr_eq(f, &self.flight))
            && (self.flight.initialized() || alone)
        {
            flights.remove(&self.key);
        }
    }
}

impl Tokens {
    pub fn get(&self, repo: &str, key: [u8; 32]) -> Option<HeaderValue> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(repo.to_string(), key)).filter(|(_, until)| Instant::now() < *until).map(|(v, _)| v.clone())
    }

    pub fn put(&self, repo: &str, key: [u8; 32], token: HeaderValue, life: Duration) {
        let life = life.min(MAX_TOKEN_LIFE);
        let usable = life.saturating_sub(TOKEN_MARGIN.min(life / 2));
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TOKENS {
            map.clear();
        }
        map.insert((repo.to_string(), key), (token, Instant::now() + usable));
    }

    pub fn forget(&self, repo: &str, key: [u8; 32]) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).remove(&(repo.to_string(), key));
    }

    /// A new token for `repo` and `key` after a request sent with `sent` (or none) met a
    /// `401`: a token put since is used as it is; otherwise one `fetch` runs for every request
    /// that asks meanwhile, and they all get its outcome (its error too: the token server
    /// said it once). Waiting is bounded by the fetch's own timeouts; if the request running
    /// the fetch is dropped, a waiter runs it.
    pub async fn refresh<F, Fut>(
        &self,
        repo: &str,
        key: [u8; 32],
        sent: Option<&HeaderValue>,
        fetch: F,
    ) -> Result<HeaderValue, crate::UpstreamError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(HeaderValue, Duration), crate::UpstreamError>>,
    {
        if let Some(token) = self.get(repo, key).filter(|t| Some(t) != sent) {
            return Ok(token);
        }
        let k = (repo.to_string(), key);
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            flights.entry(k.clone()).or_default().clone()
        };
        let end = FlightEnd { tokens: self, key: k, flight };
        end.flight
            .get_or_init(|| async {
                self.forget(repo, key);
                let (token, life) = fetch().await?;
                self.put(repo, key, token.clone(), life);
                Ok(token)
            })
            .await
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_that_claims_to_live_for_ever_is_kept_a_day() {
        let answer = TokenAnswer { token: Some("t".into()), access_token: None, expires_in: Some(u64::MAX) };
        assert_eq!(answer.life(), MAX_TOKEN_LIFE);
        let tokens = Tokens::default();
        let bearer = answer.bearer().unwrap();
        tokens.put("r", [0; 32], bearer.clone(), Duration::MAX);
        assert_eq!(tokens.get("r", [0; 32]), Some(bearer));
    }

    #[test]
    fn challenges_parse() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"bearer realm="r", scope="repository:a:pull,push""#),
            Some(Challenge::Bearer {
                realm: "r".into(),
                service: None,
                scope: Some("repository:a:pull,push".into())
            })
        );
        assert_eq!(parse_challenge("Basic realm=\"x\""), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Basic"), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Bearer service=\"x\""), None);
        assert_eq!(parse_challenge("Negotiate abc"), None);
        for junk in [
            "",
            "Bearer",
            "Bearer realm",
            "Bearer realm=\"unterminated",
            "Bearer ,,,=,\"",
            "Bearer realm=\"\\",
        ] {
            let _ = parse_challenge(junk);
        }
    }

    #[test]
    fn basic_credentials_round_trip_and_hide_the_password() {
        let c = Credentials { username: "alice".into(), password: "s:e cret".into() };
        assert_eq!(Credentials::from_authorization(&c.to_authorization()), Some(c.clone()));
        assert!(!format!("{c:?}").contains("cret"));
        assert_eq!(Credentials::from_authorization(&HeaderValue::from_static("Bearer abc")), None);
        assert_eq!(Credentials::from_authorization(&HeaderValue::from_static("Basic !!!")), None);
        assert_ne!(
            c.fingerprint(),
            Credentials { username: "alice".into(), password: "x".into() }.fingerprint()
        );
    }

    #[tokio::test]
    async fn a_refresh_uses_a_newer_token_and_survives_its_fetcher_being_dropped() {
        let t = Tokens::default();
        let old = HeaderValue::from_static("Bearer old");
        let new = HeaderValue::from_static("Bearer new");
        t.put("a", [0; 32], new.clone(), Duration::from_secs(60));
        // Sent with the old token, a newer one is in: no fetch.
        let got = t.refresh("a", [0; 32], Some(&old), || async { panic!("fetched") }).await;
        assert_eq!(got.unwrap(), new);
        // Sent with the newest token: it failed, so a fetch runs.
        let fresh = HeaderValue::from_static("Bearer fresh");
        let f = fresh.clone();
        let got = t.refresh("a", [0; 32], Some(&new), || async move { Ok((f, Duration::from_secs(60))) });
        assert_eq!(got.await.unwrap(), fresh);
        // A fetcher dropped mid-fetch leaves no flight behind, and the next request fetches.
        let hung = t.refresh("b", [0; 32], None, std::future::pending);
        assert!(tokio::time::timeout(Duration::from_millis(20), hung).await.is_err());
        assert!(t.flights.lock().unwrap().is_empty());
        let got = t.refresh("b", [0; 32], None, || async { Err(crate::UpstreamError::NotFound) });
        assert!(matches!(got.await, Err(crate::UpstreamError::NotFound)));
        assert!(t.flights.lock().unwrap().is_empty());
        assert!(t.get("b", [0; 32]).is_none());
    }

    /// A fetcher dropped while another request waits on its flight: the waiter runs the
    /// fetch, and a request arriving meanwhile joins that flight instead of starting another.
    #[tokio::test]
    async fn a_dropped_fetchers_flight_is_taken_over_and_joined() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let t = Tokens::default();
        let fetches = AtomicUsize::new(0);
        let (release, released) = tokio::sync::watch::channel(false);
        let fetch = || {
            fetches.fetch_add(1, Ordering::SeqCst);
            let mut released = released.clone();
            async move {
                let _ = released.wait_for(|r| *r).await;
                Ok((HeaderValue::from_static("Bearer t"), Duration::from_secs(60)))
            }
        };
        let first = t.refresh("c", [0; 32], None, fetch);
        let second = t.refresh("c", [0; 32], None, fetch);
        let third = t.refresh("c", [0; 32], None, fetch);
        tokio::pin!(first, second, third);
        // The first starts the fetch, the second waits on it; then the first is dropped.
        assert!(tokio::time::timeout(Duration::from_millis(10), &mut first).await.is_err());
        assert!(tokio::time::timeout(Duration::from_millis(10), &mut second).await.is_err());
        first.set(t.refresh("c", [0; 32], None, fetch));
        assert!(!t.flights.lock().unwrap().is_empty(), "the waited-on flight left the table");
        let _ = release.send(true);
        let (a, b, c) = tokio::join!(first, second, third);
        assert!(a.is_ok() && b.is_ok() && c.is_ok());
        assert_eq!(fetches.load(Ordering::SeqCst), 2, "the dropped fetch and the one that took over");
        assert!(t.flights.lock().unwrap().is_empty());
    }

    #[test]
    fn tokens_expire_before_their_end() {
        let t = Tokens::default();
        t.put("a", [0; 32], HeaderValue::from_static("Bearer x"), Duration::from_secs(60));
        assert!(t.get("a", [0; 32]).is_some());
        assert!(t.get("a", [1; 32]).is_none());
        assert!(t.get("b", [0; 32]).is_none());
        t.put("c", [0; 32], HeaderValue::from_static("Bearer y"), Duration::ZERO);
        assert!(t.get("c", [0; 32]).is_none());
        t.forget("a", [0; 32]);
        assert!(t.get("a", [0; 32]).is_none());
    }
}
