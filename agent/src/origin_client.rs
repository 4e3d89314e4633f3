//! The agent's HTTP client of the origins: tags, manifests, listings and blob ranges. Every
//! call has a timeout; every manifest fetched is checked against its digest. Origins form a
//! cluster that answers every request the same way, so the client holds all the configured
//! origins and fails over between them ([`Failover`]): a dead origin costs one failed attempt,
//! after which the origin that answered is asked first.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prometheus::{IntCounterVec, Opts, Registry};
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RANGE};
use reqwest::StatusCode;
use shoal_p2p::failover::{Failover, FailoverError};
use shoal_registry::manifest::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
use shoal_registry::store::StoredManifest;
use shoal_registry::ByteStream;
use shoal_registry::{Algorithm, Digest, RepoName, StoreError};

/// Every manifest type clients may ask for; the origin returns what was pushed.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Why the origin client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OriginClientError {
    #[error("no origin URL configured")]
    NoOrigins,
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Client of the origins' registry API; clones share the origin preference.
#[derive(Clone)]
pub struct OriginClient {
    origins: Arc<Failover>,
    http: reqwest::Client,
    /// For the token endpoint's anonymous GET alone: it carries no credentials, and the
    /// realm clients are given is often an ingress that redirects (http to https), which
    /// container runtimes follow; the cluster's own calls follow no redirect.
    realm_http: reqwest::Client,
    /// Budget for one blob range, on top of `timeout`, per MiB requested.
    per_mib: Duration,
    /// A client's bearer token captured for work that outlives its request (a download's
    /// origin fallback); otherwise the token of the request being handled is sent, if any.
    forward: Option<HeaderValue>,
    /// Anonymous tokens by repository, with when they stop being used (see `anonymous_token`).
    anonymous: Arc<std::sync::Mutex<std::collections::HashMap<String, (HeaderValue, std::time::Instant)>>>,
}

/// Most anonymous tokens kept (cleared when full).
const MAX_ANONYMOUS_TOKENS: usize = 10_000;

/// Largest manifest read from an origin. Origins may be configured past the spec's 4 MiB, so
/// well above that; the bound only keeps a broken answer from filling memory.
const MAX_MANIFEST_ANSWER: usize = 256 << 20;
/// Largest page of a listing (tags, referrers, catalog) read from an origin.
const MAX_LISTING_ANSWER: usize = 256 << 20;
/// Largest small JSON answer (a token, the access policy, a fetch's progress).
const MAX_SMALL_ANSWER: usize = 1 << 20;

fn unreachable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("origin unreachable: {e}"))
}

/// No origin answered: every one was down, timed out, or answered 5xx/429.
fn all_failed(e: FailoverError) -> StoreError {
    StoreError::Unavailable(format!("origins unavailable: {e}"))
}

fn unexpected(status: StatusCode) -> StoreError {
    if status.is_redirection() {
        return StoreError::Internal(format!(
            "origin answered {status}: Shoal follows no redirect between its processes; give the agent the URL the redirect names"
        ));
    }
    StoreError::Internal(format!("origin answered {status}"))
}

/// Redirects the anonymous token request follows (an ingress's http to https, a path).
const REALM_REDIRECTS: usize = 3;

/// Longest a stream of an upstream fetch in progress may take (the origin's reader fails
/// sooner, after a minute without bytes).
const UPSTREAM_STREAM_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// Header that carries a client's upstream credentials to the origins (the origins read it
/// in `shoal_origin::pullthrough`).
const UPSTREAM_AUTHORIZATION: &str = "x-shoal-upstream-authorization";

/// An origin's refusal that the client must see as such (an upstream's 401 asks the client for
/// credentials; 403 and 429 pass through), else [`unexpected`].
fn refusal_of(r: &reqwest::Response) -> StoreError {
    let header = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok());
    if let Some(registry) = header(shoal_registry::error::UPSTREAM_FAILURE_HEADER) {
        return StoreError::UpstreamFailed {
            registry: registry.to_string(),
            reason: format!("the origins answered {}", r.status()),
            retry_after_secs: (r.status() == StatusCode::TOO_MANY_REQUESTS).then(|| {
                header(reqwest::header::RETRY_AFTER.as_str()).and_then(|v| v.parse().ok()).unwrap_or(10)
            }),
        };
    }
    match r.status() {
        StatusCode::UNAUTHORIZED => {
            let challenge = r.headers().get(reqwest::header::WWW_AUTHENTICATE).and_then(|v| v.to_str().ok());
            // The origins' own token auth (a token that expired on the way, say): its
            // challenge as it is, so the client fetches a new token at the realm.
            if let Some(bearer) = challenge.filter(|c| c.len() > 7 && c[..7].eq_ignore_ascii_case("bearer "))
            {
                return StoreError::Unauthorized { challenge: bearer.to_string() };
            }
            let realm = challenge
                .and_then(|v| v.split_once("realm=\""))
                .and_then(|(_, rest)| rest.split('"').next())
                .map_or_else(|| "upstream".to_string(), str::to_string);
            StoreError::UpstreamUnauthorized { registry: realm }
        }
        StatusCode::FORBIDDEN => StoreError::Denied("the origin refused this repository".into()),
        StatusCode::TOO_MANY_REQUESTS => StoreError::Throttled {
            retry_after_secs: r
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(10),
        },
        s => unexpected(s),
    }
}

/// [`refusal_of`], with a 403's message as the origin gave it (it says why: a private
/// upstream repository under Shoal's tokens names the settings that would open it).
async fn refusal(r: reqwest::Response) -> StoreError {
    let err = refusal_of(&r);
    if !matches!(err, StoreError::Denied(_)) {
        return err;
    }
    let body = shoal_tls::read_body(r, MAX_SMALL_ANSWER, false).await.ok();
    let message = body
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_string));
    message.map_or(err, StoreError::Denied)
}

impl OriginClient {
    /// A client of `urls` (base URLs, tried in this order until one answers), with `timeout` for
    /// connecting and for each read. Failed attempts are counted in
    /// `shoal_agent_origin_failures_total{origin}` in `registry`.
    pub fn new(
        urls: Vec<String>,
        timeout: Duration,
        registry: &Registry,
    ) -> Result<OriginClient, OriginClientError> {
        let failures = IntCounterVec::new(
            Opts::new(
                "shoal_agent_origin_failures_total",
                "Requests to an origin that failed (connection error, timeout, 5xx, 429) and moved on",
            ),
            &["origin"],
        )?;
        registry.register(Box::new(failures.clone()))?;
        OriginClient::with_failures(urls, timeout, failures)
    }

    /// [`new`](Self::new) with the failure counter supplied (unregistered in tests).
    pub fn with_failures(
        urls: Vec<String>,
        timeout: Duration,
        failures: IntCounterVec,
    ) -> Result<OriginClient, OriginClientError> {
        let origins = Failover::new(urls).map_err(|_| OriginClientError::NoOrigins)?.count_failures(failures);
        let http = shoal_tls::http_client().connect_timeout(timeout).read_timeout(timeout).build()?;
        let realm_http = shoal_tls::http_client()
            .connect_timeout(timeout)
            .read_timeout(timeout)
            .redirect(reqwest::redirect::Policy::limited(REALM_REDIRECTS))
            .build()?;
        Ok(OriginClient {
            origins: Arc::new(origins),
            http,
            realm_http,
            per_mib: Duration::from_millis(200),
            forward: None,
            anonymous: Default::default(),
        })
    }

    /// This client with `token` (if any) kept for later calls, outside a request's scope.
    pub fn with_credentials(&self, token: Option<HeaderValue>) -> OriginClient {
        OriginClient { forward: token, ..self.clone() }
    }

    /// `request` with the client's bearer token: an agent without a transport identity reads
    /// a private repository at the origin with the token it has already verified.
    fn authed(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let request = match crate::mirror::upstream_credentials() {
            Some(basic) => request.header(UPSTREAM_AUTHORIZATION, basic),
            None => request,
        };
        match self.forward.clone().or_else(shoal_registry::auth::forwarded_authorization) {
            Some(token) => request.header(AUTHORIZATION, token),
            None => request,
        }
    }

    /// An anonymous token for pulling `repo`, from the token endpoint at `realm`, as a Docker
    /// client would get one: what an agent without a transport identity shows the origins'
    /// node API (`/shoal/v1/blobs/*`) when it fetches a public blob for an anonymous client.
    /// Kept until shortly before it expires.
    pub async fn anonymous_token(&self, realm: &str, service: &str, repo: &RepoName) -> Option<HeaderValue> {
        let now = std::time::Instant::now();
        let key = repo.to_string();
        {
            let cache = self.anonymous.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((token, until)) = cache.get(&key) {
                if now < *until {
                    return Some(token.clone());
                }
            }
        }
        let scope = format!("repository:{repo}:pull");
        let r = self
            .realm_http
            .get(realm)
            .query(&[("service", service), ("scope", scope.as_str())])
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .ok()?;
        if r.status() != StatusCode::OK {
            tracing::debug!(status = %r.status(), %repo, "no anonymous token");
            return None;
        }
        #[derive(serde::Deserialize)]
        struct Reply {
            token: String,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let reply: Reply =
            serde_json::from_slice(&shoal_tls::read_body(r, MAX_SMALL_ANSWER, false).await.ok()?).ok()?;
        let value = HeaderValue::from_str(&format!("Bearer {}", reply.token)).ok()?;
        let life = Duration::from_secs(reply.expires_in.unwrap_or(60).saturating_sub(30).max(1));
        let mut cache = self.anonymous.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_ANONYMOUS_TOKENS {
            cache.clear();
        }
        cache.insert(key, (value.clone(), now + life));
        Some(value)
    }

    /// Every origin's published authorization policy, merged; `None` if none answered. An
    /// origin that does not publish one (404) has no access control.
    pub async fn auth_policy(&self) -> Option<shoal_registry::auth::remote::Published> {
        use shoal_registry::auth::remote::Published;
        let path = shoal_registry::auth::authority::PUBLISHED_PATH;
        let asks = self.origins.urls().iter().map(|base| {
            let request = self.http.get(format!("{base}{path}")).timeout(Duration::from_secs(5));
            async move {
                let r = request.send().await.ok()?;
                match r.status() {
                    StatusCode::OK => {
                        serde_json::from_slice(&shoal_tls::read_body(r, MAX_SMALL_ANSWER, false).await.ok()?)
                            .ok()
                    }
                    StatusCode::NOT_FOUND => Some(Published::unpublished()),
                    _ => None,
                }
            }
        });
        let answers = futures_util::future::join_all(asks).await.into_iter().flatten().collect();
        Published::merge(answers)
    }

    /// The origin requests go to first: the one that answered last.
    pub fn preferred(&self) -> &str {
        self.origins.preferred()
    }

    /// Every configured origin, in configuration order.
    pub fn origins(&self) -> &[String] {
        self.origins.urls()
    }

    /// A manifest by tag or digest; the digest of what arrives is verified.
    pub async fn manifest(
        &self,
        repo: &RepoName,
        reference: &str,
    ) -> Result<Option<StoredManifest>, StoreError> {
        let r = self
            .origins
            .send(|base| {
                self.authed(self.http.get(format!("{base}/v2/{repo}/manifests/{reference}")))
                    .header(ACCEPT, MANIFEST_ACCEPT)
            })
            .await
            .map_err(all_failed)?;
        match r.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            _ => return Err(refusal(r).await),
        }
        let media_type = r
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| OCI_MANIFEST.to_string());
        let claimed =
            r.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_string);
        // Seconds left, made a time by this node's clock.
        let serve_stale_until = r
            .headers()
            .get(shoal_registry::api::SERVE_STALE_FOR_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|left| shoal_registry::api::unix_now().saturating_add(left));
        let bytes = shoal_tls::read_body(r, MAX_MANIFEST_ANSWER, false).await.map_err(unreachable)?;
        let expected: Option<Digest> = match reference.parse::<Digest>() {
            Ok(d) => Some(d),
            Err(_) => claimed.and_then(|c| c.parse().ok()),
        };
        let algorithm = expected.as_ref().map_or(Algorithm::Sha256, |d| d.algorithm());
        let digest = Digest::of(algorithm, &bytes);
        if expected.is_some_and(|e| e != digest) {
            return Err(StoreError::Internal(format!(
                "origin sent a manifest that does not match {reference}"
            )));
        }
        let known = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST];
        let media_type =
            known.iter().find(|k| media_type.starts_with(*k)).map_or(media_type.clone(), |k| k.to_string());
        Ok(Some(StoredManifest { digest, media_type, bytes, serve_stale_until }))
    }

    /// Size of a blob as the origin serves it through `repo` (which enforces repository links).
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let r = self
            .origins
            .send(|base| self.authed(self.http.head(format!("{base}/v2/{repo}/blobs/{digest}"))))
            .await
            .map_err(all_failed)?;
        match r.status() {
            // Read the header itself: for HEAD, reqwest's content_length() is the (empty) body's.
            StatusCode::OK => r
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .map(Some)
                .ok_or_else(|| StoreError::Internal("origin sent no Content-Length for a blob".into())),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(refusal(r).await),
        }
    }

    /// `len` bytes of a blob from `offset`, in full or an error. Failover covers starting the
    /// request; a body that breaks midway is an error for the caller (the swarm retries).
    pub async fn blob_range(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, StoreError> {
        let budget = Duration::from_secs(10) + self.per_mib * (len / (1 << 20)) as u32;
        let range = format!("bytes={}-{}", offset, offset + len - 1);
        let r = self
            .origins
            .send(|base| {
                let url = format!("{base}/v2/{repo}/blobs/{digest}");
                self.authed(self.http.get(url)).header(RANGE, range.as_str()).timeout(budget)
            })
            .await
            .map_err(all_failed)?;
        let status = r.status();
        if status != StatusCode::PARTIAL_CONTENT && !(status == StatusCode::OK && offset == 0) {
            // A refused token (one that expired during a download) as such: see `refusal`.
            return Err(if status == StatusCode::NOT_FOUND {
                StoreError::BlobUnknown
            } else {
                refusal(r).await
            });
        }
        // Read no more than asked for: a proxy in front of an origin that ignores `Range` and
        // answers 200 would otherwise have the whole blob buffered here.
        let want = usize::try_from(len).map_err(|_| StoreError::Internal("range too large".into()))?;
        let bytes = shoal_tls::read_body(r, want, true).await.map_err(unreachable)?;
        if bytes.len() < want {
            return Err(StoreError::Internal(format!("origin sent {} of {len} bytes", bytes.len())));
        }
        Ok(bytes)
    }

    /// A listing endpoint (tags, catalog, referrers) as raw JSON, `None` on 404.
    pub async fn listing(&self, path_and_query: &str) -> Result<Option<Bytes>, StoreError> {
        Ok(self.listing_page(path_and_query).await?.map(|(body, _)| body))
    }

    /// [`listing`](Self::listing), with the `last` of the next page its `Link` names, if any.
    pub async fn listing_page(
        &self,
        path_and_query: &str,
    ) -> Result<Option<(Bytes, Option<String>)>, StoreError> {
        let r = self
            .origins
            .send(|base| self.authed(self.http.get(format!("{base}{path_and_query}"))))
            .await
            .map_err(all_failed)?;
        match r.status() {
            StatusCode::OK => {
                let next =
                    r.headers().get(reqwest::header::LINK).and_then(|v| v.to_str().ok()).and_then(next_last);
                Ok(Some((
                    shoal_tls::read_body(r, MAX_LISTING_ANSWER, false).await.map_err(unreachable)?,
                    next,
                )))
            }
            StatusCode::NOT_FOUND => Ok(None),
            // A private upstream repository's challenge reaches the client, as for manifests.
            _ => Err(refusal(r).await),
        }
    }

    /// The upstream registries the origins pull through (none from origins that predate it).
    pub async fn upstream_registries(&self) -> Result<Vec<String>, StoreError> {
        let Some(body) = self.listing(shoal_registry::mirror::REGISTRIES_PATH).await? else {
            return Ok(Vec::new());
        };
        let list: shoal_registry::mirror::Registries = serde_json::from_slice(&body)
            .map_err(|e| StoreError::Internal(format!("origin registries: {e}")))?;
        Ok(list.registries)
    }

    /// Where the origins' fetch of an upstream blob stands, starting it if none runs.
    pub async fn upstream_progress(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<shoal_registry::mirror::Progress, StoreError> {
        let path = shoal_registry::mirror::progress_path(digest);
        let r = self
            .origins
            .send(|base| {
                self.authed(self.http.get(format!("{base}{path}")).query(&[("repo", repo.as_str())]))
            })
            .await
            .map_err(all_failed)?;
        match r.status() {
            StatusCode::OK => {}
            // Not a blob the origins can fetch (the repository is not mirrored there, the
            // upstream lacks it): the client's 404, not a 500.
            StatusCode::NOT_FOUND => return Err(StoreError::BlobUnknown),
            _ => return Err(refusal(r).await),
        }
        let body = shoal_tls::read_body(r, MAX_SMALL_ANSWER, false).await.map_err(unreachable)?;
        serde_json::from_slice(&body).map_err(|e| StoreError::Internal(format!("origin progress: {e}")))
    }

    /// The bytes of an upstream blob as the origins' fetch receives them, if this agent is one
    /// of its first requesters; `None` otherwise (wait for the blob, then read it as usual).
    pub async fn upstream_stream(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<(u64, ByteStream)>, StoreError> {
        let path = format!("{}/stream", shoal_registry::mirror::progress_path(digest));
        let r = self
            .origins
            .send(|base| {
                self.authed(self.http.get(format!("{base}{path}")).query(&[("repo", repo.as_str())]))
                    .timeout(UPSTREAM_STREAM_TIMEOUT)
            })
            .await
            .map_err(all_failed)?;
        match r.status() {
            StatusCode::OK => {
                let Some(size) = r.content_length() else { return Ok(None) };
                let body =
                    futures_util::StreamExt::map(r.bytes_stream(), |c| c.map_err(std::io::Error::other));
                Ok(Some((size, Box::pin(body))))
            }
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(refusal(r).await),
        }
    }

    /// A blob's metainfo JSON, straight from the origin.
    pub async fn metainfo(&self, digest: &Digest) -> Result<Option<Bytes>, StoreError> {
        self.listing(&shoal_p2p::tracker_client::metainfo_path(digest)).await
    }
}
/// The `last` parameter of a `Link: <...?n=N&last=X>; rel="next"` header.
fn next_last(link: &str) -> Option<String> {
    let target = link.split(';').next()?.trim().strip_prefix('<')?.strip_suffix('>')?;
    let url = reqwest::Url::parse("http://origin").ok()?.join(target).ok()?;
    let last = url.query_pairs().find(|(k, _)| k == "last")?.1.into_owned();
    (!last.is_empty()).then_some(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The anonymous token comes through a redirecting realm (an ingress sending http to
    /// https, say), as container runtimes get theirs; the cluster's own calls follow none.
    #[tokio::test]
    async fn an_anonymous_token_is_fetched_through_a_redirecting_realm() {
        use axum::routing::get;
        let app = axum::Router::new()
            .route("/old-token", get(|| async { axum::response::Redirect::permanent("/token") }))
            .route("/token", get(|| async { axum::Json(serde_json::json!({"token": "t0k3n"})) }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let failures = IntCounterVec::new(prometheus::Opts::new("f", "f"), &["origin"]).unwrap();
        let client =
            OriginClient::with_failures(vec![base.clone()], Duration::from_secs(5), failures).unwrap();
        let repo: RepoName = "team/app".parse().unwrap();
        let token = client.anonymous_token(&format!("{base}/old-token"), "shoal", &repo).await;
        assert_eq!(token.as_ref().and_then(|t| t.to_str().ok()), Some("Bearer t0k3n"));
    }

    /// A listing the origin refuses with a challenge (a private upstream repository's tags)
    /// is the client's challenge, not a 500 it could never answer with credentials.
    #[tokio::test]
    async fn a_refused_listing_carries_the_challenge() {
        use axum::routing::get;
        let refuse = || async {
            (StatusCode::UNAUTHORIZED, [(reqwest::header::WWW_AUTHENTICATE, "Basic realm=\"ghcr.io\"")], "")
        };
        let bearer = "Bearer realm=\"http://o/token\",service=\"shoal\",scope=\"repository:team/x:pull\"";
        let app = axum::Router::new()
            .route("/v2/ghcr.io/a/b/tags/list", get(refuse))
            .route("/v2/ghcr.io/a/c/tags/list", get(|| async { StatusCode::FORBIDDEN }))
            .route(
                "/v2/ghcr.io/a/d/tags/list",
                get(|| async {
                    let body = r#"{"errors":[{"code":"DENIED","message":"ghcr.io refuses the origins' credentials"}]}"#;
                    (StatusCode::FORBIDDEN, body)
                }),
            )
            .route(
                "/v2/team/x/tags/list",
                get(move || async move {
                    (StatusCode::UNAUTHORIZED, [(reqwest::header::WWW_AUTHENTICATE, bearer)], "")
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let failures = IntCounterVec::new(prometheus::Opts::new("f", "f"), &["origin"]).unwrap();
        let client = OriginClient::with_failures(vec![base], Duration::from_secs(5), failures).unwrap();
        let err = client.listing_page("/v2/ghcr.io/a/b/tags/list").await.unwrap_err();
        assert!(
            matches!(&err, StoreError::UpstreamUnauthorized { registry } if registry == "ghcr.io"),
            "{err:?}"
        );
        let err = client.listing_page("/v2/ghcr.io/a/c/tags/list").await.unwrap_err();
        assert!(matches!(err, StoreError::Denied(_)), "{err:?}");
        // The origin's reason reaches the client (it names what would open the repository).
        let err = client.listing_page("/v2/ghcr.io/a/d/tags/list").await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Denied(m) if m == "ghcr.io refuses the origins' credentials"),
            "{err:?}"
        );
        // The origins' own token challenge (a token that expired on the way) reaches the
        // client as it is, not as a Basic challenge with the rest of it in the realm.
        let err = client.listing_page("/v2/team/x/tags/list").await.unwrap_err();
        assert!(matches!(&err, StoreError::Unauthorized { challenge } if challenge == bearer), "{err:?}");
    }

    /// The origins cannot fetch an upstream blob (the repository is not mirrored there, or
    /// their upstream lacks it): the client's 404 BLOB_UNKNOWN, not a 500.
    #[tokio::test]
    async fn an_upstream_blob_the_origins_do_not_know_is_unknown() {
        let digest = Digest::of(shoal_registry::Algorithm::Sha256, b"x");
        let path = shoal_registry::mirror::progress_path(&digest);
        let app = axum::Router::new().route(&path, axum::routing::get(|| async { StatusCode::NOT_FOUND }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let failures = IntCounterVec::new(prometheus::Opts::new("f", "f"), &["origin"]).unwrap();
        let client = OriginClient::with_failures(vec![base], Duration::from_secs(5), failures).unwrap();
        let repo: RepoName = "docker.io/library/x".parse().unwrap();
        let err = client.upstream_progress(&repo, &digest).await.unwrap_err();
        assert!(matches!(err, StoreError::BlobUnknown), "{err:?}");
    }

    /// An origin (or a proxy before it) that ignores `Range` and answers a whole 256 MiB blob
    /// with 200: the agent reads what it asked for and stops, it does not buffer the blob.
    #[tokio::test]
    async fn a_range_answered_with_the_whole_blob_is_read_only_as_far_as_asked() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let sent = Arc::new(AtomicU64::new(0));
        let counted = sent.clone();
        let whole = move || {
            let counted = counted.clone();
            async move {
                let chunks = futures_util::StreamExt::map(futures_util::stream::iter(0..256u32), move |_| {
                    counted.fetch_add(1 << 20, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(Bytes::from(vec![7u8; 1 << 20]))
                });
                axum::body::Body::from_stream(chunks)
            }
        };
        let digest = Digest::of(shoal_registry::Algorithm::Sha256, b"x");
        let app =
            axum::Router::new().route(&format!("/v2/team/app/blobs/{digest}"), axum::routing::get(whole));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let failures = IntCounterVec::new(prometheus::Opts::new("f", "f"), &["origin"]).unwrap();
        let client = OriginClient::with_failures(vec![base], Duration::from_secs(5), failures).unwrap();
        let repo: RepoName = "team/app".parse().unwrap();
        let got = client.blob_range(&repo, &digest, 0, 1 << 20).await.unwrap();
        assert_eq!(got.len(), 1 << 20);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sent = sent.load(Ordering::SeqCst);
        assert!(sent < 64 << 20, "the origin got {} MiB out of the agent", sent >> 20);
    }

    #[test]
    fn the_next_page_starts_where_the_link_says() {
        assert_eq!(next_last("</v2/_catalog?n=2&last=team/b>; rel=\"next\"").as_deref(), Some("team/b"));
        assert_eq!(next_last("</v2/a/tags/list?last=v%2B1&n=5>; rel=\"next\"").as_deref(), Some("v+1"));
        assert_eq!(next_last("</v2/_catalog?n=2>; rel=\"next\""), None);
        assert_eq!(next_last("garbage"), None);
    }
}
