//! Pull-through: the origins as a cache of upstream registries (`[[upstream]]` in the origin's
//! config). A repository whose first component names a configured upstream
//! (`docker.io/library/alpine`, see [`shoal_registry::mirror`]) is read-only to clients and
//! filled from the upstream on a miss, then kept like pushed content: manifests and tags as
//! cluster records, blobs sharded with R copies and seeded into the swarm. So an upstream
//! image costs one upstream download per cluster, whatever the number of nodes.
//!
//! - Tags are asked of the upstream at most every `tag_ttl`; the cluster's tag record carries
//!   when it was last confirmed ([`tags`]). When the upstream cannot answer, the last target is
//!   served for `serve_stale`, then the pull fails with the upstream's error.
//! - Manifests by digest are immutable: fetched once, checked against the digest.
//! - Each blob is fetched by one origin, the first in its digest's placement ranking (its
//!   primary owner): other origins ask it ([`progress`](PullThrough::progress)) and wait, so
//!   many agents asking many origins at once still cost one upstream download ([`fetch`]).
//! - Credentials: the upstream's configured ones, else anonymous; for a repository that
//!   refuses those, the client's own Basic credentials are passed on and the upstream decides.
//!   Such a repository is then marked private in the cluster (a record every origin reads):
//!   every read of it, cached or not, through any origin, needs credentials the upstream
//!   accepted within [`ACCESS_TTL`].

mod access;
pub mod fetch;
pub mod routes;
pub mod tags;

use access::Probe;
pub use access::ACCESS_TTL;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::TryStreamExt;
use shoal_registry::manifest::{parse_manifest, ReferrerDescriptor};
use shoal_registry::mirror;
use shoal_registry::range::ByteRange;
use shoal_registry::store::{NewManifest, Page, Reference, StoredManifest, UploadState};
use shoal_registry::{ByteStream, Digest, RegistryStore, RepoName, StoreError, Tag};
use shoal_upstream::{Credentials, Upstream, UpstreamError, UpstreamMetrics};

use crate::cluster::membership::Membership;
use crate::cluster::record::now_millis;
use crate::cluster::store::{ClusterStore, References};
use fetch::{Fetch, Fetches, Joined, Progress};

/// Longest a stream of a fetch in progress may take, proxied from another origin (its own
/// reader fails sooner, after a minute without bytes).
const STREAM_CALL_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// Timeout of one progress call to another origin.
const PROGRESS_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Route of the progress endpoint ([`mirror::progress_path`]): `GET` with
/// `?repo=<explicit name>[&here=1]` (`here`: fetch on this origin, do not ask the primary).
pub const PROGRESS_ROUTE: &str = "/shoal/v1/upstream/blobs/{digest}";
/// Route of the configured registry names, which agents map requests with.
pub const REGISTRIES_ROUTE: &str = mirror::REGISTRIES_PATH;

tokio::task_local! {
    /// The client's Basic credentials for the upstream, when the request carried some.
    static CLIENT_CREDENTIALS: Option<Credentials>;
}

/// Run `fut` with the client's upstream credentials visible to [`PullThrough`].
pub async fn with_client_credentials<F: std::future::Future>(
    creds: Option<Credentials>,
    fut: F,
) -> F::Output {
    CLIENT_CREDENTIALS.scope(creds, fut).await
}

fn client_credentials() -> Option<Credentials> {
    CLIENT_CREDENTIALS.try_with(Clone::clone).ok().flatten()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An access decision's key: (repository, the client's credentials fingerprint).
type AccessKey = (String, [u8; 32]);

/// How another origin is asked for a fetch's progress.
#[derive(Clone)]
pub struct Peers {
    pub membership: Arc<Membership>,
    pub http: reqwest::Client,
    /// The cluster's shared secret, sent to the fetching origin's node API (which wants a
    /// token or a node certificate when `[auth]` is on).
    pub secret: Option<String>,
}

impl Peers {
    /// A call to another origin's node API, with the cluster secret if there is one.
    fn get(&self, url: String) -> reqwest::RequestBuilder {
        let req = self.http.get(url);
        match &self.secret {
            Some(secret) => req.bearer_auth(secret),
            None => req,
        }
    }
}

/// The registry storage of an origin with upstreams: [`ClusterStore`] plus pull-through.
pub struct PullThrough {
    inner: ClusterStore,
    upstreams: HashMap<String, Arc<Upstream>>,
    names: Vec<String>,
    fetches: Fetches,
    peers: Option<Peers>,
    metrics: UpstreamMetrics,
    /// Repositories known private here (the cluster's markers, as read or written).
    private: Mutex<HashMap<String, Instant>>,
    /// (repository, client fingerprint) → (decided at, allowed).
    access: Mutex<HashMap<AccessKey, (Instant, bool)>>,
}

/// Map an upstream's error to what the registry API answers.
fn store_error(registry: &str, e: UpstreamError) -> StoreError {
    match e {
        UpstreamError::NotFound => StoreError::ManifestUnknown,
        UpstreamError::Unauthorized(_) => StoreError::UpstreamUnauthorized { registry: registry.to_string() },
        UpstreamError::TooManyRequests { retry_after } => {
            StoreError::Throttled { retry_after_secs: retry_after.as_secs().max(1) }
        }
        UpstreamError::Unavailable(m) => StoreError::Unavailable(format!("upstream {registry}: {m}")),
        UpstreamError::Invalid(m) => {
            StoreError::Unavailable(format!("upstream {registry} answered badly: {m}"))
        }
        UpstreamError::Config(m) => StoreError::Internal(format!("upstream {registry}: {m}")),
    }
}

/// Whether an upstream failure means "cannot ask now" (serve stale) rather than an answer.
fn cannot_ask(e: &UpstreamError) -> bool {
    matches!(
        e,
        UpstreamError::Unavailable(_) | UpstreamError::TooManyRequests { .. } | UpstreamError::Invalid(_)
    )
}

impl PullThrough {
    pub fn new(
        inner: ClusterStore,
        upstreams: Vec<Arc<Upstream>>,
        peers: Option<Peers>,
        metrics: UpstreamMetrics,
    ) -> PullThrough {
        let names = upstreams.iter().map(|u| u.registry().to_string()).collect();
        PullThrough {
            inner,
            upstreams: upstreams.into_iter().map(|u| (u.registry().to_string(), u)).collect(),
            names,
            fetches: Fetches::default(),
            peers,
            metrics,
            private: Mutex::new(HashMap::new()),
            access: Mutex::new(HashMap::new()),
        }
    }

    /// The configured registry names.
    pub fn registries(&self) -> &[String] {
        &self.names
    }

    /// The upstream `repo` mirrors and its path there, if it mirrors one.
    fn upstream_of<'a>(&self, repo: &'a RepoName) -> Option<(Arc<Upstream>, &'a str)> {
        let (registry, path) = mirror::split(repo.as_str(), &self.names)?;
        Some((self.upstreams.get(registry)?.clone(), path))
    }

    /// A manifest of an upstream repository by digest: from the cluster, else the upstream.
    async fn mirrored_manifest(
        &self,
        up: &Upstream,
        repo: &RepoName,
        path: &str,
        digest: &Digest,
        tag: Option<&Tag>,
    ) -> Result<Option<StoredManifest>, StoreError> {
        if let Some(m) = self.inner.manifest_get(repo, &Reference::Digest(digest.clone())).await? {
            self.metrics.cache(up.registry(), true);
            if let Some(tag) = tag {
                self.inner.write_tag(repo, tag, digest).await?;
            }
            return Ok(Some(m));
        }
        self.metrics.cache(up.registry(), false);
        let reference = digest.to_string();
        let reference = reference.as_str();
        let fetched = match self
            .call(up, repo, |c| async move { up.manifest(path, reference, c.as_ref()).await })
            .await
        {
            Ok(m) => m,
            Err(UpstreamError::NotFound) => return Ok(None),
            Err(e) => return Err(store_error(up.registry(), e)),
        };
        if &fetched.digest != digest {
            return Err(StoreError::Unavailable(format!(
                "upstream {} sent manifest {} for {digest}",
                up.registry(),
                fetched.digest
            )));
        }
        let parsed = parse_manifest(Some(&fetched.media_type), &fetched.bytes).map_err(|e| {
            StoreError::Unavailable(format!("upstream {} sent a bad manifest: {e}", up.registry()))
        })?;
        let stored = StoredManifest {
            digest: digest.clone(),
            media_type: fetched.media_type.clone(),
            bytes: fetched.bytes.clone(),
        };
        let new = NewManifest { digest: digest.clone(), bytes: fetched.bytes, parsed };
        self.inner.put_manifest(repo, tag, new, References::Fetched).await?;
        Ok(Some(stored))
    }

    /// A tag of an upstream repository (see the module docs).
    async fn mirrored_tag(
        &self,
        up: &Upstream,
        repo: &RepoName,
        path: &str,
        tag: &Tag,
    ) -> Result<Option<StoredManifest>, StoreError> {
        let known = self.inner.tag_written(repo, tag).await?;
        let confirmed = known.as_ref().map(|(_, at)| *at);
        if let (tags::Before::Fresh, Some((digest, _))) =
            (tags::before_asking(confirmed, now_millis(), up.config().tag_ttl), &known)
        {
            self.check_access(up, repo, path, Probe::Manifest(digest)).await?;
            self.metrics.cache(up.registry(), true);
            return self.inner.manifest_get(repo, &Reference::Digest(digest.clone())).await;
        }
        let t = tag.as_str();
        match self.call(up, repo, |c| async move { up.resolve_tag(path, t, c.as_ref()).await }).await {
            Ok(digest) => {
                // The tag is written anew either way: its version's time records that its
                // target was confirmed now.
                self.mirrored_manifest(up, repo, path, &digest, Some(tag)).await
            }
            Err(UpstreamError::NotFound) => Ok(None),
            Err(e) if cannot_ask(&e) => {
                match (tags::on_failure(confirmed, now_millis(), up.config().serve_stale), known) {
                    (tags::OnFailure::ServeStale, Some((digest, at))) => {
                        // A private repository's: only to credentials the upstream accepted.
                        self.require_accepted(up, repo).await?;
                        tracing::warn!(
                            registry = up.registry(), %repo, %tag, error = %e,
                            age_s = now_millis().saturating_sub(at) / 1000,
                            "upstream cannot answer; serving the tag's last known target"
                        );
                        self.metrics.stale(up.registry());
                        self.inner.manifest_get(repo, &Reference::Digest(digest)).await
                    }
                    _ => Err(store_error(up.registry(), e)),
                }
            }
            Err(e) => Err(store_error(up.registry(), e)),
        }
    }

    /// Where the fetch of `digest` into `repo` stands, starting it if nothing runs: on this
    /// origin if it is the digest's primary owner (or `here`), else on the primary, asked over
    /// HTTP (this origin fetches itself if the primary cannot be reached).
    pub async fn progress(
        &self,
        repo: &RepoName,
        digest: &Digest,
        here: bool,
    ) -> Result<Progress, StoreError> {
        let Some((up, path)) = self.upstream_of(repo) else {
            return Err(StoreError::NameUnknown);
        };
        if let Some(size) = self.inner.blob_size(repo, digest).await? {
            self.check_access(&up, repo, path, Probe::Blob(digest)).await?;
            return Ok(Progress { size: Some(size), received: size, complete: true, ..Progress::default() });
        }
        if !here {
            if let Some(p) = self.progress_at_primary(repo, digest).await {
                return Ok(p);
            }
        }
        if let Some(size) = self.link_if_held(&up, repo, path, digest).await? {
            return Ok(Progress { size: Some(size), received: size, complete: true, ..Progress::default() });
        }
        let fetch = match self.fetches.join(digest, repo.as_str()) {
            // Another repository's fetch of the same bytes: nothing of it is this repository's
            // to show (the upstream may refuse this client here). Once it has committed the
            // blob, `link_if_held` asks the upstream about this repository.
            Ok(Joined::Existing(f)) if f.repo() != repo.as_str() => return Ok(Progress::default()),
            Ok(Joined::Existing(f)) => f,
            Ok(Joined::Started(f)) => {
                self.metrics.cache(up.registry(), false);
                let (store, repo, path, digest) =
                    (self.inner.clone(), repo.clone(), path.to_string(), digest.clone());
                let (creds, private) = (client_credentials(), self.is_private(&repo).await.unwrap_or(true));
                let fetch = f.clone();
                tokio::spawn(async move {
                    let outcome = run_fetch(&store, &up, &repo, &path, &digest, creds, private, &fetch).await;
                    if let Err((e, _)) = &outcome {
                        tracing::warn!(%repo, %digest, error = %e, "upstream blob fetch failed");
                    }
                    fetch.finish(outcome);
                });
                f
            }
            // Load shed: a client told to come back (429 with Retry-After), not "unavailable".
            Err(n) => {
                tracing::warn!(running = n, "upstream fetches at their cap; a request is asked to retry");
                return Err(StoreError::Throttled { retry_after_secs: FETCHES_FULL_RETRY_SECS });
            }
        };
        Ok(fetch.progress())
    }

    /// A blob the cluster holds under another repository (a shared base layer) is linked into
    /// `repo` once the upstream confirms that this client may read it there: no bytes move.
    async fn link_if_held(
        &self,
        up: &Upstream,
        repo: &RepoName,
        path: &str,
        digest: &Digest,
    ) -> Result<Option<u64>, StoreError> {
        if self.fetches.running(digest) {
            return Ok(None);
        }
        let held = self.inner.coordinator.owners(&digest.to_string());
        let mut any = false;
        for id in held {
            if let Some(node) = self.inner.coordinator.node(&id) {
                if matches!(node.blob_stat(digest).await, Ok(Some(_))) {
                    any = true;
                    break;
                }
            }
        }
        if !any {
            return Ok(None);
        }
        match self.call(up, repo, |c| async move { up.blob_head(path, digest, c.as_ref()).await }).await {
            Ok(_) => {
                self.metrics.cache(up.registry(), true);
                self.inner.link_held(repo, digest).await
            }
            Err(UpstreamError::NotFound) => Ok(None),
            Err(e) => Err(store_error(up.registry(), e)),
        }
    }

    /// The bytes of an upstream blob while its fetch runs, for its first
    /// [`fetch::STREAM_FIRST`] requesters: from this origin's fetch, or (not `here`) the
    /// primary owner's. `None`: not streamed (not running, finished, granted to others, or a
    /// private repository): wait for the blob to be committed instead.
    pub async fn stream(
        &self,
        repo: &RepoName,
        digest: &Digest,
        here: bool,
    ) -> Result<Option<(u64, ByteStream)>, StoreError> {
        if self.upstream_of(repo).is_none() {
            return Err(StoreError::NameUnknown);
        }
        if self.inner.blob_size(repo, digest).await?.is_some() || self.is_private(repo).await? {
            return Ok(None);
        }
        if let Some(f) = self.fetches.get(digest) {
            // Only a fetch into this repository streams to its readers.
            if f.repo() != repo.as_str() {
                return Ok(None);
            }
            return Ok(f.stream().await);
        }
        if here {
            return Ok(None);
        }
        let Some(peers) = self.peers.as_ref() else { return Ok(None) };
        let Some(primary) = self.inner.coordinator.ranked(&digest.to_string()).into_iter().next() else {
            return Ok(None);
        };
        if primary == self.inner.coordinator.me() {
            return Ok(None);
        }
        let Some(base) = peers.membership.url(&primary) else { return Ok(None) };
        let url = format!("{base}{}/stream", mirror::progress_path(digest));
        let answer = peers
            .get(url)
            .query(&[("repo", repo.as_str()), ("here", "1")])
            .timeout(STREAM_CALL_TIMEOUT)
            .send()
            .await;
        match answer {
            Ok(r) if r.status() == reqwest::StatusCode::OK => {
                let Some(size) = r.content_length() else { return Ok(None) };
                let body =
                    futures_util::StreamExt::map(r.bytes_stream(), |c| c.map_err(std::io::Error::other));
                Ok(Some((size, Box::pin(body))))
            }
            _ => Ok(None),
        }
    }

    /// Ask the digest's primary owner, if that is another origin; `None`: fetch here.
    async fn progress_at_primary(&self, repo: &RepoName, digest: &Digest) -> Option<Progress> {
        let peers = self.peers.as_ref()?;
        let primary = self.inner.coordinator.ranked(&digest.to_string()).into_iter().next()?;
        if primary == self.inner.coordinator.me() {
            return None;
        }
        let base = peers.membership.url(&primary)?;
        let url = format!("{base}{}", mirror::progress_path(digest));
        let mut req =
            peers.get(url).query(&[("repo", repo.as_str()), ("here", "1")]).timeout(PROGRESS_CALL_TIMEOUT);
        if let Some(c) = client_credentials() {
            req = req.header(UPSTREAM_AUTHORIZATION, c.to_authorization());
        }
        let answer = match req.send().await {
            Ok(r) if r.status().is_success() => r.json::<Progress>().await,
            Ok(r) => {
                tracing::warn!(origin = %primary, status = %r.status(), "primary owner refused an upstream fetch; fetching here");
                return None;
            }
            Err(e) => Err(e),
        };
        match answer {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(origin = %primary, error = %e, "primary owner unreachable; fetching here");
                None
            }
        }
    }

    /// Wait until the blob is in the cluster (for a reader at this origin); its size, `None`
    /// if the upstream has no such blob in that repository.
    async fn wait_for_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let Some((up, _)) = self.upstream_of(repo) else { return Ok(None) };
        mirror::wait_for_fetch(up.registry(), digest, || self.progress(repo, digest, false)).await
    }
}

/// Seconds a client is told to wait when this origin runs as many upstream fetches as it may.
const FETCHES_FULL_RETRY_SECS: u64 = 5;

/// Header that carries a client's upstream credentials between Shoal's processes (agents to
/// origins, origins to the fetching origin) without touching Shoal's own `Authorization`.
pub const UPSTREAM_AUTHORIZATION: &str = "x-shoal-upstream-authorization";

/// Stream the upstream's blob into an upload session of `repo` and commit it (digest and size
/// checked, R copies, linked). Errors carry the status a client should see, if any.
#[allow(clippy::too_many_arguments)]
async fn run_fetch(
    store: &ClusterStore,
    up: &Upstream,
    repo: &RepoName,
    path: &str,
    digest: &Digest,
    creds: Option<Credentials>,
    private: bool,
    fetch: &Arc<Fetch>,
) -> fetch::Outcome {
    let attempt = |c: Option<Credentials>| async move { up.blob(path, digest, c.as_ref()).await };
    if private {
        fetch.set_private();
    }
    let first = if private { attempt(creds.clone()).await } else { attempt(None).await };
    let blob = match first {
        Err(UpstreamError::Unauthorized(_)) if !private && creds.is_some() => {
            // Only the client's credentials open it: the repository is private, recorded
            // before any byte is kept (or streamed), or nothing is fetched.
            fetch.set_private();
            let blob = attempt(creds).await;
            if blob.is_ok() {
                tracing::info!(registry = up.registry(), %repo, "private upstream repository");
                if let Err(e) = store.mark_private(repo).await {
                    return Err((format!("recording {repo} as private: {e}"), None));
                }
            }
            blob
        }
        other => other,
    };
    let blob = blob.map_err(|e| {
        let status = match &e {
            UpstreamError::NotFound => Some(404),
            UpstreamError::Unauthorized(_) => Some(401),
            UpstreamError::TooManyRequests { .. } => Some(429),
            _ => None,
        };
        (format!("upstream {}: {e}", up.registry()), status)
    })?;
    fetch.set_size(blob.size);
    let counter = fetch.clone();
    let body: ByteStream = Box::pin(blob.body.inspect_ok(move |b| counter.add_received(b.len() as u64)));
    let failed = |e: StoreError| (e.to_string(), None);
    let session = store.upload_start(repo).await.map_err(failed)?;
    fetch.set_file(store.local().upload_path(&session.id));
    let committed = async {
        store.upload_append(repo, &session.id, Some(0), Some(blob.size), body).await?;
        store.upload_complete(repo, &session.id, digest).await
    }
    .await;
    if let Err(e) = committed {
        let _ = store.upload_cancel(repo, &session.id).await;
        return Err(failed(e));
    }
    tracing::info!(registry = up.registry(), %repo, %digest, size = blob.size, "fetched from upstream");
    Ok(())
}

#[async_trait]
impl RegistryStore for PullThrough {
    async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let Some((up, path)) = self.upstream_of(repo) else {
            return self.inner.blob_size(repo, digest).await;
        };
        match self.inner.blob_size(repo, digest).await? {
            Some(size) => {
                self.check_access(&up, repo, path, Probe::Blob(digest)).await?;
                Ok(Some(size))
            }
            None => self.wait_for_blob(repo, digest).await,
        }
    }

    async fn blob_read(
        &self,
        repo: &RepoName,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<ByteStream, StoreError> {
        if self.upstream_of(repo).is_some() && self.blob_size(repo, digest).await?.is_none() {
            return Err(StoreError::BlobUnknown);
        }
        self.inner.blob_read(repo, digest, range).await
    }

    async fn blob_delete(&self, repo: &RepoName, digest: &Digest) -> Result<bool, StoreError> {
        match self.upstream_of(repo) {
            Some(_) => Err(Self::denied(repo)),
            None => self.inner.blob_delete(repo, digest).await,
        }
    }

    async fn blob_mount(
        &self,
        repo: &RepoName,
        from: &RepoName,
        digest: &Digest,
    ) -> Result<bool, StoreError> {
        if self.upstream_of(repo).is_some() {
            return Err(Self::denied(repo));
        }
        if self.upstream_of(from).is_some() && self.blob_size(from, digest).await?.is_none() {
            return Ok(false);
        }
        self.inner.blob_mount(repo, from, digest).await
    }

    async fn upload_start(&self, repo: &RepoName) -> Result<UploadState, StoreError> {
        match self.upstream_of(repo) {
            Some(_) => Err(Self::denied(repo)),
            None => self.inner.upload_start(repo).await,
        }
    }

    async fn upload_status(&self, repo: &RepoName, id: &str) -> Result<UploadState, StoreError> {
        self.inner.upload_status(repo, id).await
    }

    async fn upload_append(
        &self,
        repo: &RepoName,
        id: &str,
        start: Option<u64>,
        len: Option<u64>,
        body: ByteStream,
    ) -> Result<UploadState, StoreError> {
        self.inner.upload_append(repo, id, start, len, body).await
    }

    async fn upload_complete(&self, repo: &RepoName, id: &str, digest: &Digest) -> Result<u64, StoreError> {
        self.inner.upload_complete(repo, id, digest).await
    }

    async fn upload_cancel(&self, repo: &RepoName, id: &str) -> Result<(), StoreError> {
        self.inner.upload_cancel(repo, id).await
    }

    async fn manifest_get(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<StoredManifest>, StoreError> {
        let Some((up, path)) = self.upstream_of(repo) else {
            return self.inner.manifest_get(repo, reference).await;
        };
        match reference {
            Reference::Tag(tag) => self.mirrored_tag(&up, repo, path, tag).await,
            Reference::Digest(digest) => {
                let found = self.mirrored_manifest(&up, repo, path, digest, None).await?;
                if found.is_some() {
                    self.check_access(&up, repo, path, Probe::Manifest(digest)).await?;
                }
                Ok(found)
            }
        }
    }

    async fn manifest_put(
        &self,
        repo: &RepoName,
        tag: Option<&Tag>,
        manifest: NewManifest,
    ) -> Result<(), StoreError> {
        match self.upstream_of(repo) {
            Some(_) => Err(Self::denied(repo)),
            None => self.inner.manifest_put(repo, tag, manifest).await,
        }
    }

    async fn manifest_delete(&self, repo: &RepoName, reference: &Reference) -> Result<bool, StoreError> {
        match self.upstream_of(repo) {
            Some(_) => Err(Self::denied(repo)),
            None => self.inner.manifest_delete(repo, reference).await,
        }
    }

    /// A private mirrored repository's tags only to credentials the upstream accepted.
    async fn tags(&self, repo: &RepoName, last: Option<&str>, limit: usize) -> Result<Page, StoreError> {
        if let Some((up, _)) = self.upstream_of(repo) {
            self.require_accepted(&up, repo).await?;
        }
        self.inner.tags(repo, last, limit).await
    }

    async fn repositories(&self, last: Option<&str>, limit: usize) -> Result<Page, StoreError> {
        self.inner.repositories(last, limit).await
    }

    async fn referrers(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Vec<ReferrerDescriptor>, StoreError> {
        if let Some((up, path)) = self.upstream_of(repo) {
            self.check_access(&up, repo, path, Probe::Manifest(digest)).await?;
        }
        self.inner.referrers(repo, digest).await
    }
}
