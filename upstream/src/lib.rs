//! The client an origin pulls upstream registries through (pull-through caching of docker.io,
//! ghcr.io, a vendor's registry). One [`Upstream`] per `[[upstream]]` section:
//! - Docker's token flow (a `401` names a realm; a bearer token for the repository is fetched
//!   with the credentials in use and reused until it expires) and Basic authentication;
//! - the configured credentials, or a client's own passed in for a private repository;
//! - a CA per upstream besides the system's, proxies from the environment;
//! - `429` honoured: no request is sent before its `Retry-After` passes;
//! - a timeout on every wait: connecting, the answer's headers, and each read of a body.
//!
//! Manifests are checked against the digest asked for; blob bodies are streamed to the caller,
//! which checks them (the origin's upload path hashes what it stores).

mod auth;
mod config;
mod links;
mod metrics;
mod pace;
mod realm;
mod throttle;

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, StatusCode};
use shoal_registry::manifest::ReferrerDescriptor;
use shoal_registry::{ByteStream, Digest};

pub use auth::{parse_challenge, Challenge, Credentials};
pub use config::{UpstreamConfig, DEFAULT_SERVE_STALE, DEFAULT_TAG_TTL};
pub use metrics::UpstreamMetrics;
use pace::Pace;
pub use pace::MIN_BODY_RATE;

/// Connecting to an upstream gives up after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// An upstream's answer (its headers) must arrive within this long.
pub const HEADERS_TIMEOUT: Duration = Duration::from_secs(30);
/// A blob body with no new byte for this long fails.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest manifest accepted from an upstream.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// Waiting after a `429` without `Retry-After`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(10);
/// The longest `Retry-After` honoured.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Every manifest type, as clients ask for them.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.v1+prettyjws, application/json;q=0.5";

/// What went wrong at an upstream.
#[derive(Clone, Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("not found at the upstream")]
    NotFound,
    #[error("the upstream refused the credentials: {0}")]
    Unauthorized(String),
    #[error("the upstream is throttling requests; retry in {} s", retry_after.as_secs())]
    TooManyRequests { retry_after: Duration },
    #[error("{0}")]
    Unavailable(String),
    /// The upstream does not take this method here (405, 501): a `HEAD` is asked again as a
    /// `GET`.
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Config(String),
}

/// A manifest as the upstream sent it.
#[derive(Clone, Debug)]
pub struct UpstreamManifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// A blob's body, streaming, and its size from `Content-Length`.
pub struct UpstreamBlob {
    pub size: u64,
    pub body: ByteStream,
}

/// A client of one upstream registry.
pub struct Upstream {
    config: UpstreamConfig,
    configured: Option<Credentials>,
    http: reqwest::Client,
    tokens: auth::Tokens,
    /// The client token requests go out on: its resolver and redirect policy keep realms off
    /// local addresses the upstream is not on (see `realm`).
    token_http: reqwest::Client,
    /// Where the upstream is, for its realms (worked out at the first token fetch).
    place: realm::UpstreamPlace,
    /// The upstream asked for Basic credentials: send them up front from now on.
    basic: std::sync::atomic::AtomicBool,
    /// `Retry-After` windows, per credentials the requests go with.
    throttles: throttle::Throttles,
    metrics: UpstreamMetrics,
    idle_timeout: Duration,
}

impl Upstream {
    /// Reads `password_file` and `ca_file` (blocking: call at start).
    pub fn new(config: UpstreamConfig, metrics: UpstreamMetrics) -> Result<Upstream, UpstreamError> {
        Upstream::with_idle_timeout(config, metrics, BODY_IDLE_TIMEOUT)
    }

    /// [`Upstream::new`] with another body idle timeout (tests).
    pub fn with_idle_timeout(
        config: UpstreamConfig,
        metrics: UpstreamMetrics,
        idle_timeout: Duration,
    ) -> Result<Upstream, UpstreamError> {
        config.validate()?;
        let configured = match (&config.username, &config.password_file) {
            (Some(username), Some(file)) => {
                let password = std::fs::read_to_string(file)
                    .map_err(|e| UpstreamError::Config(format!("password_file {}: {e}", file.display())))?;
                Some(Credentials {
                    username: username.clone(),
                    password: password.trim_end_matches(['\r', '\n']).to_string(),
                })
            }
            _ => None,
        };
        let client = |realm: Option<&realm::UpstreamPlace>| {
            let builder = shoal_tls::upstream_http_client(config.ca_file.as_deref())
                .map_err(|e| UpstreamError::Config(format!("ca_file: {e}")))?
                .connect_timeout(CONNECT_TIMEOUT);
            let builder = match realm {
                Some(place) => place.token_client(builder),
                None => builder,
            };
            builder.build().map_err(|e| UpstreamError::Config(format!("HTTP client: {e}")))
        };
        let place = realm::UpstreamPlace::for_base(config.base());
        let (http, token_http) = (client(None)?, client(Some(&place))?);
        let shared = configured.as_ref().map(Credentials::fingerprint).unwrap_or([0; 32]);
        Ok(Upstream {
            config,
            configured,
            http,
            tokens: auth::Tokens::default(),
            token_http,
            place,
            basic: Default::default(),
            throttles: throttle::Throttles::new(shared),
            metrics,
            idle_timeout,
        })
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    pub fn registry(&self) -> &str {
        &self.config.registry
    }

    /// The digest `tag` points at now: `HEAD` of the manifest (its `Docker-Content-Digest`),
    /// else (no such header, or a registry that takes no `HEAD` there) a `GET` hashed here.
    pub async fn resolve_tag(
        &self,
        repo: &str,
        tag: &str,
        client: Option<&Credentials>,
    ) -> Result<Digest, UpstreamError> {
        let url = format!("{}/v2/{repo}/manifests/{tag}", self.config.base());
        let r = match self.send(reqwest::Method::HEAD, &url, repo, client, "tag").await {
            Err(UpstreamError::MethodNotAllowed(_)) => {
                return Ok(self.manifest(repo, tag, client).await?.digest)
            }
            other => other?,
        };
        if let Some(d) = r.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()) {
            if let Ok(d) = d.parse::<Digest>() {
                return Ok(d);
            }
        }
        Ok(self.manifest(repo, tag, client).await?.digest)
    }

    /// A manifest by tag or digest; by digest, the bytes must match it.
    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
        client: Option<&Credentials>,
    ) -> Result<UpstreamManifest, UpstreamError> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.config.base());
        let r = self.send(reqwest::Method::GET, &url, repo, client, "manifest").await?;
        if r.content_length().is_some_and(|n| n > MAX_MANIFEST_BYTES as u64) {
            return Err(UpstreamError::Invalid(format!("manifest over {MAX_MANIFEST_BYTES} bytes")));
        }
        let content_type = r.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
        let bytes = self.read_limited(r, MAX_MANIFEST_BYTES).await?;
        let expected = reference.parse::<Digest>().ok();
        let digest = Digest::of(
            expected.as_ref().map_or(shoal_registry::Algorithm::Sha256, |d| d.algorithm()),
            &bytes,
        );
        if expected.as_ref().is_some_and(|e| e != &digest) {
            return Err(UpstreamError::Invalid(format!("manifest {reference} arrived as {digest}")));
        }
        // The manifest's own `mediaType` first (the answer's Content-Type may be a generic
        // one, `application/octet-stream` say), then a Content-Type that names a manifest
        // kind, then its shape: an index lists `manifests`.
        let body = serde_json::from_slice::<serde_json::Value>(&bytes).ok();
        let media_type = body
            .as_ref()
            .and_then(|b| b.get("mediaType")?.as_str().map(str::to_string))
            .or_else(|| {
                content_type
                    .map(|c| c.split(';').next().unwrap_or("").trim().to_string())
                    .filter(|c| c.starts_with("application/vnd."))
            })
            .unwrap_or_else(|| match body.as_ref().and_then(|b| b.get("manifests")) {
                Some(_) => "application/vnd.oci.image.index.v1+json".to_string(),
                None => "application/vnd.oci.image.manifest.v1+json".to_string(),
            });
        Ok(UpstreamManifest { digest, media_type, bytes })
    }

    /// The referrers of `digest` by the upstream's referrers API, every page of it (the
    /// spec's `Link: <...>; rel="next"`, on the upstream's own host, up to
    /// [`MAX_REFERRER_PAGES`], pages after the first within [`REFERRER_PAGES_WITHIN`]: a
    /// slow later page ends the list with what was read, rather than the caller's deadline
    /// dropping every page); `None` where the registry answers 404 (no such API: the
    /// referrers tag schema is the caller's to read).
    pub async fn referrers(
        &self,
        repo: &str,
        digest: &Digest,
        client: Option<&Credentials>,
    ) -> Result<Option<Vec<ReferrerDescriptor>>, UpstreamError> {
        let later_by = tokio::time::Instant::now() + REFERRER_PAGES_WITHIN;
        let mut url = format!("{}/v2/{repo}/referrers/{digest}", self.config.base());
        let mut found: Vec<ReferrerDescriptor> = Vec::new();
        // By digest, in a set: a 4 MiB page lists some 40,000 descriptors.
        let mut seen = std::collections::HashSet::new();
        for page in 0..MAX_REFERRER_PAGES {
            let read = async {
                let r = self.send(reqwest::Method::GET, &url, repo, client, "referrers").await?;
                if r.content_length().is_some_and(|n| n > MAX_MANIFEST_BYTES as u64) {
                    return Err(UpstreamError::Invalid(format!(
                        "referrers of {digest} over {MAX_MANIFEST_BYTES} bytes"
                    )));
                }
                let next = r
                    .headers()
                    .get_all(reqwest::header::LINK)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(|link| links::next_page(self.config.base(), &url, link));
                Ok((self.read_limited(r, MAX_MANIFEST_BYTES).await?, next))
            };
            let read = if page == 0 {
                read.await
            } else {
                match tokio::time::timeout_at(later_by, read).await {
                    Ok(read) => read,
                    Err(_) => {
                        tracing::warn!(%repo, %digest, page, "upstream referrers: a later page too slow; listing what was read");
                        return Ok(Some(found));
                    }
                }
            };
            let (bytes, next) = match read {
                Err(UpstreamError::NotFound) if page == 0 => return Ok(None),
                // A later page gone (the list changed under the cursor): what was read.
                Err(UpstreamError::NotFound) => return Ok(Some(found)),
                other => other?,
            };
            let listed = shoal_registry::manifest::index_descriptors(&bytes)
                .map_err(|e| UpstreamError::Invalid(format!("referrers of {digest}: {e}")))?;
            found.extend(listed.into_iter().filter(|d| seen.insert(d.digest.clone())));
            match next {
                Some(next) if next != url => url = next,
                _ => return Ok(Some(found)),
            }
        }
        tracing::warn!(%repo, %digest, pages = MAX_REFERRER_PAGES, "upstream referrers cut at the page limit");
        Ok(Some(found))
    }

    /// A blob's body (redirects to object storage followed); returns when headers arrive.
    pub async fn blob(
        &self,
        repo: &str,
        digest: &Digest,
        client: Option<&Credentials>,
    ) -> Result<UpstreamBlob, UpstreamError> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.config.base());
        let r = self.send(reqwest::Method::GET, &url, repo, client, "blob").await?;
        let size = match r
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
        {
            Some(size) => size,
            // A chunked answer (some object stores and proxies send one): the registry's own
            // `HEAD` gives the size; the commit checks it with the digest.
            None => match self.blob_head_size(repo, digest, client).await {
                Ok(Some(size)) => size,
                Ok(None) => {
                    return Err(UpstreamError::Invalid(format!(
                        "blob {digest} came without Content-Length, and so did its HEAD"
                    )))
                }
                Err(e) => {
                    return Err(UpstreamError::Invalid(format!(
                        "blob {digest} came without Content-Length, and its HEAD failed: {e}"
                    )))
                }
            },
        };
        let (registry, metrics, idle) =
            (self.registry().to_string(), self.metrics.clone(), self.idle_timeout);
        let stream = r.bytes_stream();
        let state = Some((Box::pin(stream), Pace::new(idle)));
        let body = futures_util::stream::unfold(state, move |state| {
            let (registry, metrics) = (registry.clone(), metrics.clone());
            async move {
                let (mut stream, mut pace) = state?;
                match tokio::time::timeout(idle, stream.next()).await {
                    Ok(Some(Ok(chunk))) => {
                        metrics.bytes(&registry, chunk.len() as u64);
                        if let Err(e) = pace.count(chunk.len() as u64) {
                            return Some((Err(std::io::Error::new(std::io::ErrorKind::TimedOut, e)), None));
                        }
                        Some((Ok(chunk), Some((stream, pace))))
                    }
                    Ok(Some(Err(e))) => Some((Err(std::io::Error::other(e)), None)),
                    Ok(None) => None,
                    Err(_) => Some((
                        Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("upstream sent no byte for {} s", idle.as_secs()),
                        )),
                        None,
                    )),
                }
            }
        });
        Ok(UpstreamBlob { size, body: Box::pin(body) })
    }

    /// `HEAD` of a blob: its size if this client may read it.
    pub async fn blob_head(
        &self,
        repo: &str,
        digest: &Digest,
        client: Option<&Credentials>,
    ) -> Result<u64, UpstreamError> {
        Ok(self.blob_head_size(repo, digest, client).await?.unwrap_or(0))
    }

    /// `HEAD` of a blob: its `Content-Length`, if the answer had one.
    async fn blob_head_size(
        &self,
        repo: &str,
        digest: &Digest,
        client: Option<&Credentials>,
    ) -> Result<Option<u64>, UpstreamError> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.config.base());
        let r = self.send(reqwest::Method::HEAD, &url, repo, client, "blob_head").await?;
        Ok(r.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()))
    }

    /// Read at most `limit` bytes of a body (each read bounded by the idle timeout).
    async fn read_limited(&self, r: reqwest::Response, limit: usize) -> Result<Bytes, UpstreamError> {
        let mut out = Vec::new();
        let mut stream = r.bytes_stream();
        let mut pace = Pace::new(self.idle_timeout);
        loop {
            match tokio::time::timeout(self.idle_timeout, stream.next()).await {
                Ok(Some(Ok(chunk))) => {
                    if out.len() + chunk.len() > limit {
                        return Err(UpstreamError::Invalid(format!("answer over {limit} bytes")));
                    }
                    out.extend_from_slice(&chunk);
                    pace.count(chunk.len() as u64).map_err(UpstreamError::Unavailable)?;
                }
                Ok(Some(Err(e))) => {
                    return Err(UpstreamError::Unavailable(format!("reading the answer: {e}")))
                }
                Ok(None) => return Ok(Bytes::from(out)),
                Err(_) => return Err(UpstreamError::Unavailable("the upstream stopped sending".into())),
            }
        }
    }

    /// The credentials of a request: the client's, else the configured ones.
    fn credentials<'a>(&'a self, client: Option<&'a Credentials>) -> Option<&'a Credentials> {
        client.or(self.configured.as_ref())
    }

    /// Send a request, answering the upstream's challenge once; a success status, or the
    /// error it means.
    async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        repo: &str,
        client: Option<&Credentials>,
        kind: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        let result = self.send_inner(method, url, repo, client).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(UpstreamError::NotFound) => "not_found",
            Err(UpstreamError::Unauthorized(_)) => "unauthorized",
            Err(UpstreamError::TooManyRequests { .. }) => "throttled",
            Err(_) => "error",
        };
        self.metrics.request(self.registry(), kind, outcome);
        result
    }

    async fn send_inner(
        &self,
        method: reqwest::Method,
        url: &str,
        repo: &str,
        client: Option<&Credentials>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let creds = self.credentials(client);
        let key = creds.map(Credentials::fingerprint).unwrap_or([0; 32]);
        self.check_throttle(&key)?;
        let bearer = self.tokens.get(repo, key);
        let authorization = bearer.clone().or_else(|| {
            creds
                .filter(|_| self.basic.load(std::sync::atomic::Ordering::Relaxed))
                .map(Credentials::to_authorization)
        });
        let r = self.once(method.clone(), url, authorization).await?;
        if r.status() != StatusCode::UNAUTHORIZED {
            return self.checked(r, &key);
        }
        // The first challenge Shoal can answer, of however many the upstream sent (one may be
        // a scheme such as Negotiate first).
        let challenge = r
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(parse_challenge);
        let authorization = match challenge {
            Some(Challenge::Bearer { realm, service, scope }) => {
                let fetch = || self.token(&realm, service.as_deref(), scope.as_deref(), repo, creds, &key);
                self.tokens.refresh(repo, key, bearer.as_ref(), fetch).await?
            }
            Some(Challenge::Basic) => match creds {
                Some(c) => {
                    self.basic.store(true, std::sync::atomic::Ordering::Relaxed);
                    c.to_authorization()
                }
                None => return Err(UpstreamError::Unauthorized("the upstream wants credentials".into())),
            },
            None => return Err(UpstreamError::Unauthorized("401 without a usable challenge".into())),
        };
        let r = self.once(method, url, Some(authorization)).await?;
        self.checked(r, &key)
    }

    /// A bearer token for `repo` from the token endpoint `realm`, with its life.
    async fn token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
        repo: &str,
        creds: Option<&Credentials>,
        key: &[u8; 32],
    ) -> Result<(HeaderValue, Duration), UpstreamError> {
        if !self.place.allows_realm(self.config.base(), realm, CONNECT_TIMEOUT).await {
            tracing::warn!(
                registry = self.registry(), realm,
                "the upstream's token realm is on this host or a link-local address (a cloud metadata service, say); not asked"
            );
            return Err(UpstreamError::Unauthorized(format!(
                "the upstream's token realm {realm} is a local address the upstream is not on; not asked"
            )));
        }
        if !realm_may_have_credentials(self.config.base(), realm, creds.is_some()) {
            tracing::warn!(
                registry = self.registry(), realm,
                "the upstream's token realm is not https: no credentials sent there (fix the registry's external URL)"
            );
            return Err(UpstreamError::Unauthorized(format!(
                "the upstream's token realm {realm} is not https; refusing to send credentials there"
            )));
        }
        let pull = format!("repository:{repo}:pull");
        let mut query = vec![("scope", scope.unwrap_or(&pull))];
        if let Some(s) = service {
            query.push(("service", s));
        }
        let mut req = self.token_http.get(realm).query(&query);
        if let Some(c) = creds {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let sent = tokio::time::timeout(HEADERS_TIMEOUT, req.send()).await;
        let r = match sent {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.metrics.request(self.registry(), "token", "error");
                return Err(UpstreamError::Unavailable(format!("token endpoint {realm}: {e}")));
            }
            Err(_) => {
                self.metrics.request(self.registry(), "token", "error");
                return Err(UpstreamError::Unavailable(format!("token endpoint {realm} did not answer")));
            }
        };
        let status = r.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            self.metrics.request(self.registry(), "token", "unauthorized");
            return Err(UpstreamError::Unauthorized(format!("token endpoint answered {status}")));
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            self.metrics.request(self.registry(), "token", "throttled");
            return Err(self.throttle(&r, key));
        }
        if !status.is_success() {
            self.metrics.request(self.registry(), "token", "error");
            return Err(UpstreamError::Unavailable(format!("token endpoint answered {status}")));
        }
        let body = self.read_limited(r, 1024 * 1024).await?;
        let answer: auth::TokenAnswer = serde_json::from_slice(&body)
            .map_err(|e| UpstreamError::Invalid(format!("token answer: {e}")))?;
        let token =
            answer.bearer().ok_or_else(|| UpstreamError::Invalid("token answer without a token".into()))?;
        self.metrics.request(self.registry(), "token", "ok");
        Ok((token, answer.life()))
    }

    /// One request, its headers within [`HEADERS_TIMEOUT`].
    async fn once(
        &self,
        method: reqwest::Method,
        url: &str,
        authorization: Option<HeaderValue>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut req = self.http.request(method, url).header(ACCEPT, MANIFEST_ACCEPT);
        if let Some(a) = authorization {
            req = req.header(AUTHORIZATION, a);
        }
        match tokio::time::timeout(HEADERS_TIMEOUT, req.send()).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(UpstreamError::Unavailable(format!("{}: {e}", self.registry()))),
            Err(_) => Err(UpstreamError::Unavailable(format!(
                "{} did not answer within {} s",
                self.registry(),
                HEADERS_TIMEOUT.as_secs()
            ))),
        }
    }

    /// A success answer, or the error its status means (a 429 throttles requests with the
    /// credentials of `key`).
    fn checked(&self, r: reqwest::Response, key: &[u8; 32]) -> Result<reqwest::Response, UpstreamError> {
        let status = r.status();
        match status {
            s if s.is_success() => Ok(r),
            StatusCode::NOT_FOUND => Err(UpstreamError::NotFound),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Err(UpstreamError::Unauthorized(format!("{} answered {status}", self.registry())))
            }
            StatusCode::TOO_MANY_REQUESTS => Err(self.throttle(&r, key)),
            s @ (StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED) => {
                Err(UpstreamError::MethodNotAllowed(format!("{} answered {s}", self.registry())))
            }
            s => Err(UpstreamError::Unavailable(format!("{} answered {s}", self.registry()))),
        }
    }

    /// Remember a `429`'s `Retry-After` for the credentials of `key`; the error to return.
    fn throttle(&self, r: &reqwest::Response, key: &[u8; 32]) -> UpstreamError {
        let wait = retry_after(r.headers()).unwrap_or(DEFAULT_RETRY_AFTER);
        self.metrics.throttled(self.registry());
        tracing::warn!(registry = self.registry(), retry_after_s = wait.as_secs(), "upstream answered 429");
        self.throttles.remember(key, Instant::now(), wait);
        UpstreamError::TooManyRequests { retry_after: wait }
    }

    /// Within a `Retry-After` window of the credentials of `key`: refuse without sending
    /// anything.
    fn check_throttle(&self, key: &[u8; 32]) -> Result<(), UpstreamError> {
        match self.throttles.left(key, Instant::now()) {
            Some(left) => Err(UpstreamError::TooManyRequests { retry_after: left }),
            None => Ok(()),
        }
    }
}

/// A 429's `Retry-After` (seconds or an HTTP date), at most [`MAX_RETRY_AFTER`].
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let wait = parse_retry_after(headers.get(RETRY_AFTER)?.to_str().ok()?)?;
    Some(wait.min(MAX_RETRY_AFTER))
}

/// `Retry-After` as seconds or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v.trim()).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// Whether credentials may go to the token `realm` an upstream at `base` names: never in the
/// clear from an upstream reached over TLS (a hostile or misconfigured challenge would take
/// the password, or a client's).
fn realm_may_have_credentials(base: &str, realm: &str, credentials: bool) -> bool {
    let https = |url: &str| url.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://"));
    !credentials || !https(base) || https(realm)
}

/// Pages of an upstream's referrers list followed at most (each up to `MAX_MANIFEST_BYTES`).
pub const MAX_REFERRER_PAGES: usize = 16;
/// How long after the first page's request later pages are read: well inside the origin's
/// `STALE_ANSWER_AFTER` (5 s) for the whole list.
pub const REFERRER_PAGES_WITHIN: Duration = Duration::from_secs(3);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_to_a_plain_http_realm_only_from_a_plain_http_upstream() {
        let (tls, plain) = ("https://registry.example", "http://registry.example:5000");
        assert!(realm_may_have_credentials(tls, "https://auth.example/token", true));
        assert!(realm_may_have_credentials(tls, "HTTPS://auth.example/token", true));
        assert!(!realm_may_have_credentials(tls, "http://auth.example/token", true));
        assert!(!realm_may_have_credentials(tls, "http://127.0.0.1/token", true));
        assert!(realm_may_have_credentials(tls, "http://auth.example/token", false), "anonymous");
        assert!(realm_may_have_credentials(plain, "http://auth.example/token", true));
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let d = parse_retry_after(&later).unwrap();
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120), "{d:?}");
        assert_eq!(parse_retry_after(&httpdate::fmt_http_date(SystemTime::UNIX_EPOCH)), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon"), None);
    }
}
