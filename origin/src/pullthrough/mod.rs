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
mod blobs;
mod failures;
pub mod fetch;
pub mod routes;
mod serial;
pub mod tags;

use access::Probe;
pub use access::ACCESS_TTL;
pub use blobs::Peers;
use failures::{cannot_ask, store_error, upstream_failed};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::TryStreamExt;
use shoal_registry::manifest::{index_descriptors, parse_manifest, referrers_tag, ReferrerDescriptor};
use shoal_registry::mirror;
use shoal_registry::range::ByteRange;
use shoal_registry::store::{NewManifest, Page, Reference, StoredManifest, UploadState};
use shoal_registry::{ByteStream, Digest, RegistryStore, RepoName, StoreError, Tag};
use shoal_upstream::{Credentials, Upstream, UpstreamError, UpstreamMetrics};

use crate::cluster::membership::Membership;
use crate::cluster::record::now_millis;
use crate::cluster::store::{ClusterStore, References};
use fetch::{Fetch, Fetches, Joined, Progress};

/// Route of the progress endpoint ([`mirror::progress_path`]): `GET` with
/// `?repo=<explicit name>[&here=1]` (`here`: fetch on this origin, do not ask the primary).
pub const PROGRESS_ROUTE: &str = "/shoal/v1/upstream/blobs/{digest}";
/// Route of the configured registry names, which agents map requests with.
pub const REGISTRIES_ROUTE: &str = mirror::REGISTRIES_PATH;

/// What a request says about its client's credentials for upstreams.
#[derive(Clone, Debug, Default)]
pub struct ClientCredentials {
    /// The client's Basic credentials for the upstream, when the request carried some.
    pub creds: Option<Credentials>,
    /// Whether the client could send some after an upstream's `Basic` challenge: not when
    /// Shoal checks credentials itself (the client's `Authorization` is then Shoal's, never
    /// passed on), so a challenge it cannot meet is not sent.
    pub may_answer_challenge: bool,
}

tokio::task_local! {
    static CLIENT_CREDENTIALS: ClientCredentials;
}

/// Run `fut` with the client's upstream credentials visible to [`PullThrough`].
pub async fn with_client_credentials<F: std::future::Future>(creds: ClientCredentials, fut: F) -> F::Output {
    CLIENT_CREDENTIALS.scope(creds, fut).await
}

fn client_credentials() -> Option<Credentials> {
    CLIENT_CREDENTIALS.try_with(|c| c.creds.clone()).ok().flatten()
}

/// What a client the upstream `registry` refused is answered: a `Basic` challenge to send
/// credentials the upstream accepts, or, where it cannot send any (Shoal's own `[auth]` is
/// on), 403 `DENIED` saying what would open the repository. Outside a request: the challenge.
fn refused(registry: &str) -> StoreError {
    let may_answer =
        CLIENT_CREDENTIALS.try_with(|c| c.may_answer_challenge || c.creds.is_some()).unwrap_or(true);
    if may_answer {
        return StoreError::UpstreamUnauthorized { registry: registry.to_string() };
    }
    StoreError::Denied(format!(
        "{registry} refuses the origins' credentials for this repository, and with Shoal's own \
         authentication on no client's credentials are passed to it: the origins need credentials \
         for {registry} that open it (username and password_file of its [[upstream]])"
    ))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An access decision's key: (repository, the client's credentials fingerprint).
type AccessKey = (String, [u8; 32]);

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
    /// Manifest requests for one upstream manifest take turns ([`serial`]).
    manifest_turns: serial::Serial,
}

/// Why a mirrored manifest could not be had: the upstream's answer (a stale tag may be served
/// instead), or the cluster's own failure (never hidden behind a stale answer).
enum ManifestFailure {
    Upstream(UpstreamError),
    Cluster(StoreError),
}

impl From<StoreError> for ManifestFailure {
    fn from(e: StoreError) -> ManifestFailure {
        ManifestFailure::Cluster(e)
    }
}

/// How long the upstream may take to say what a tag points at when the tag's last target
/// may still be served (`serve_stale`): then that is answered (and the upstream's answer, if
/// it comes later, is not waited for: the next request after `tag_ttl` asks again). Well
/// inside an agent's wait for an origin (`http_timeout`, 10 s): an upstream that hangs
/// (accepts, never answers) made the origin wait out its 30 s header timeout, every agent
/// gave up first, and the stale tag was never served through agents.
pub const STALE_ANSWER_AFTER: Duration = Duration::from_secs(5);

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
            manifest_turns: serial::Serial::default(),
        }
    }

    /// The configured registry names.
    pub fn registries(&self) -> &[String] {
        &self.names
    }

    /// The upstream `repo` mirrors and its path there, if it mirrors one. (A one-component
    /// Docker Hub name never gets here: [`routes::explicit_names`] gives it its `library/`.)
    fn upstream_of<'a>(&self, repo: &'a RepoName) -> Option<(Arc<Upstream>, &'a str)> {
        let (registry, path) = mirror::split(repo.as_str(), &self.names)?;
        Some((self.upstreams.get(registry)?.clone(), path))
    }

    /// This request's turn to ask the upstream about `reference` of `repo` (see [`serial`]):
    /// taken on a miss only, so answers the cluster holds never wait.
    async fn upstream_turn(&self, repo: &RepoName, reference: &str) -> Option<serial::Turn<'_>> {
        let client = client_credentials().map(|c| hex::encode(c.fingerprint())).unwrap_or_default();
        self.manifest_turns.turn(format!("{repo}\n{reference}\n{client}")).await
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
        self.mirrored_manifest_within(up, repo, path, digest, tag, None).await.map_err(|f| match f {
            ManifestFailure::Upstream(e) => store_error(up.registry(), e),
            ManifestFailure::Cluster(e) => e,
        })
    }

    /// [`mirrored_manifest`](Self::mirrored_manifest), the upstream's answer awaited `within`
    /// at most (an upstream that has not answered by then cannot), and its failures told apart
    /// from the cluster's.
    async fn mirrored_manifest_within(
        &self,
        up: &Upstream,
        repo: &RepoName,
        path: &str,
        digest: &Digest,
        tag: Option<&Tag>,
        within: Option<Duration>,
    ) -> Result<Option<StoredManifest>, ManifestFailure> {
        let stored = self.inner.manifest_get(repo, &Reference::Digest(digest.clone())).await?;
        // On a miss, after the request before this one with the same question (which may have
        // stored the answer meanwhile).
        let (stored, _turn) = match stored {
            Some(m) => (Some(m), None),
            None => {
                let turn = self.upstream_turn(repo, &digest.to_string()).await;
                (self.inner.manifest_get(repo, &Reference::Digest(digest.clone())).await?, turn)
            }
        };
        if let Some(m) = stored {
            self.metrics.cache(up.registry(), true);
            if let Some(tag) = tag {
                self.inner.write_tag(repo, tag, digest).await?;
            }
            return Ok(Some(m));
        }
        self.metrics.cache(up.registry(), false);
        let reference = digest.to_string();
        let reference = reference.as_str();
        let ask = self.call(up, repo, |c| async move { up.manifest(path, reference, c.as_ref()).await });
        let answer = match within {
            Some(within) => tokio::time::timeout(within, ask).await.unwrap_or_else(|_| {
                Err(UpstreamError::Unavailable(format!("no answer within {} s", within.as_secs())))
            }),
            None => ask.await,
        };
        let fetched = match answer {
            Ok(m) => m,
            Err(UpstreamError::NotFound) => return Ok(None),
            Err(e) => return Err(ManifestFailure::Upstream(e)),
        };
        if &fetched.digest != digest {
            return Err(ManifestFailure::Cluster(StoreError::Unavailable(format!(
                "upstream {} sent manifest {} for {digest}",
                up.registry(),
                fetched.digest
            ))));
        }
        let parsed = parse_manifest(Some(&fetched.media_type), &fetched.bytes).map_err(|e| {
            StoreError::Unavailable(format!("upstream {} sent a bad manifest: {e}", up.registry()))
        })?;
        let stored = StoredManifest {
            digest: digest.clone(),
            media_type: fetched.media_type.clone(),
            bytes: fetched.bytes.clone(),
            serve_stale_until: None,
        };
        let new = NewManifest { digest: digest.clone(), bytes: fetched.bytes, parsed };
        self.inner.put_manifest(repo, tag, new, References::Fetched).await?;
        Ok(Some(stored))
    }

    /// The upstream's referrers of `digest`: by its referrers API, else (a registry without
    /// one) from the index under its referrers tag (`<alg>-<hex>`), mirrored as any tag is.
    async fn upstream_referrers(
        &self,
        up: &Upstream,
        repo: &RepoName,
        path: &str,
        digest: &Digest,
    ) -> Result<Vec<ReferrerDescriptor>, StoreError> {
        let api = self.call(up, repo, |c| async move { up.referrers(path, digest, c.as_ref()).await }).await;
        match api {
            Ok(Some(found)) => return Ok(found),
            Ok(None) => {}
            Err(e) => return Err(store_error(up.registry(), e)),
        }
        let Ok(tag) = referrers_tag(digest).parse::<Tag>() else { return Ok(Vec::new()) };
        let Some(index) = self.mirrored_tag(up, repo, path, &tag).await? else { return Ok(Vec::new()) };
        index_descriptors(&index.bytes).map_err(|e| {
            StoreError::Unavailable(format!("upstream {} keeps a bad referrers index: {e}", up.registry()))
        })
    }

    /// A tag of an upstream repository (see the module docs).
    async fn mirrored_tag(
        &self,
        up: &Upstream,
        repo: &RepoName,
        path: &str,
        tag: &Tag,
    ) -> Result<Option<StoredManifest>, StoreError> {
        let mut known = self.inner.tag_written(repo, tag).await?;
        let mut turn = None;
        loop {
            let confirmed = known.as_ref().map(|(_, at)| *at);
            if let (tags::Before::Fresh, Some((digest, _))) =
                (tags::before_asking(confirmed, now_millis(), up.config().tag_ttl), &known)
            {
                self.check_access(up, repo, path, Probe::Manifest(digest)).await?;
                self.metrics.cache(up.registry(), true);
                let found = self.inner.manifest_get(repo, &Reference::Digest(digest.clone())).await?;
                return Ok(serve_stale_until(found, up, confirmed.unwrap_or(0)));
            }
            if turn.is_some() {
                break;
            }
            // To be asked: after the request before this one with the same question, which
            // may have confirmed the tag meanwhile.
            turn = Some(self.upstream_turn(repo, tag.as_str()).await);
            known = self.inner.tag_written(repo, tag).await?;
        }
        let confirmed = known.as_ref().map(|(_, at)| *at);
        let t = tag.as_str();
        let ask = self.call(up, repo, |c| async move { up.resolve_tag(path, t, c.as_ref()).await });
        let may_serve_stale = known.is_some()
            && tags::on_failure(confirmed, now_millis(), up.config().serve_stale)
                == tags::OnFailure::ServeStale;
        let answer = if may_serve_stale {
            tokio::time::timeout(STALE_ANSWER_AFTER, ask).await.unwrap_or_else(|_| {
                Err(UpstreamError::Unavailable(format!(
                    "no answer within {} s",
                    STALE_ANSWER_AFTER.as_secs()
                )))
            })
        } else {
            ask.await
        };
        match answer {
            Ok(digest) => {
                // The tag is written anew either way: its version's time records that its
                // target was confirmed now.
                let within = may_serve_stale.then_some(STALE_ANSWER_AFTER);
                let fetched = self.mirrored_manifest_within(up, repo, path, &digest, Some(tag), within).await;
                let stale_now = tags::on_failure(confirmed, now_millis(), up.config().serve_stale)
                    == tags::OnFailure::ServeStale;
                match (fetched, known) {
                    (Ok(found), _) => Ok(serve_stale_until(found, up, now_millis())),
                    // The tag moved, but the upstream will not send the new target (its `HEAD`
                    // answered, its `GET` is throttled, failing or slow: Docker Hub's pull
                    // limit counts only the `GET`): the last target, while it may be served.
                    // The cluster's own failures are not the upstream's: they are answered.
                    (Err(ManifestFailure::Upstream(e)), Some((old, at)))
                        if cannot_ask(&e) && stale_now && old != digest =>
                    {
                        self.serve_stale(up, repo, tag, e.to_string(), old, at).await
                    }
                    (Err(ManifestFailure::Upstream(e)), _) => Err(upstream_failed(up.registry(), e)),
                    (Err(ManifestFailure::Cluster(e)), _) => Err(e),
                }
            }
            Err(UpstreamError::NotFound) => Ok(None),
            Err(e) if cannot_ask(&e) => {
                match (tags::on_failure(confirmed, now_millis(), up.config().serve_stale), known) {
                    (tags::OnFailure::ServeStale, Some((digest, at))) => {
                        self.serve_stale(up, repo, tag, e.to_string(), digest, at).await
                    }
                    _ => Err(upstream_failed(up.registry(), e)),
                }
            }
            Err(e) => Err(store_error(up.registry(), e)),
        }
    }

    /// The tag's last known target (`digest`, confirmed at `at`), served while the upstream
    /// cannot answer for it (`error`).
    async fn serve_stale(
        &self,
        up: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        error: String,
        digest: Digest,
        at: u64,
    ) -> Result<Option<StoredManifest>, StoreError> {
        // A private repository's: only to credentials the upstream accepted.
        self.require_accepted(up, repo).await?;
        tracing::warn!(
            registry = up.registry(), %repo, %tag, error = %error,
            age_s = now_millis().saturating_sub(at) / 1000,
            "upstream cannot answer; serving the tag's last known target"
        );
        self.metrics.stale(up.registry());
        let found = self.inner.manifest_get(repo, &Reference::Digest(digest)).await?;
        Ok(serve_stale_until(found, up, at))
    }
}

/// `found`, answered for a tag its upstream confirmed at `confirmed` (Unix milliseconds),
/// with until when a node may serve it from what it kept: `serve_stale` past that. Agents
/// keep it with the tag, and past it serve their kept target no more while the origins
/// cannot be asked (an upstream that hangs past `serve_stale` holds the origin's answer past
/// an agent's wait, which the agent takes for an outage of the origins).
fn serve_stale_until(found: Option<StoredManifest>, up: &Upstream, confirmed: u64) -> Option<StoredManifest> {
    let until = (confirmed / 1000).saturating_add(up.config().serve_stale.as_secs());
    found.map(|m| StoredManifest { serve_stale_until: Some(until), ..m })
}

/// Header that carries a client's upstream credentials between Shoal's processes (agents to
/// origins, origins to the fetching origin) without touching Shoal's own `Authorization`.
pub const UPSTREAM_AUTHORIZATION: &str = "x-shoal-upstream-authorization";

#[async_trait]
impl RegistryStore for PullThrough {
    async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let Some((up, path)) = self.upstream_of(repo) else {
            return self.inner.blob_size(repo, digest).await;
        };
        let size = match self.inner.blob_size(repo, digest).await? {
            Some(size) => Some(size),
            None => self.wait_for_blob(repo, digest).await?,
        };
        // Also after waiting: a fetch that ended while this caller looked on (with another
        // client's credentials) may have just marked the repository private.
        if size.is_some() {
            self.check_access(&up, repo, path, Probe::Blob(digest)).await?;
        }
        Ok(size)
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
            Some(_) => Err(Self::no_deletes(repo)),
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
        if self.upstream_of(from).is_some() {
            // A source this client may not read (a private upstream repository without its
            // credentials), or cannot be asked now, is no mount: the spec's answer is a new
            // upload session (202), and buildkit pushes of an image built FROM a private
            // mirrored base mount from it.
            match self.blob_size(from, digest).await {
                Ok(Some(_)) => {}
                Ok(None) => return Ok(false),
                Err(e) => {
                    tracing::debug!(%from, %digest, error = %e, "mount source not readable; a new upload instead");
                    return Ok(false);
                }
            }
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

    async fn upload_commit(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        body_from: Option<u64>,
    ) -> Result<u64, StoreError> {
        self.inner.upload_commit(repo, id, digest, body_from).await
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
            Some(_) => Err(Self::no_deletes(repo)),
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
        let Some((up, path)) = self.upstream_of(repo) else {
            return self.inner.referrers(repo, digest).await;
        };
        match self.check_access(&up, repo, path, Probe::Manifest(digest)).await {
            Ok(()) => {}
            // The referrers API never answers 404 (spec, "Listing Referrers"): a subject
            // the upstream lacks has none, and nothing held here is shown for it.
            Err(StoreError::ManifestUnknown) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
        // What the cluster holds (referrers mirrored before), and what the upstream lists
        // within `STALE_ANSWER_AFTER` (an upstream that hangs must not hold an admission
        // webhook's signature check for its 30 s head timeout).
        let mut found = self.inner.referrers(repo, digest).await?;
        let theirs =
            tokio::time::timeout(STALE_ANSWER_AFTER, self.upstream_referrers(&up, repo, path, digest))
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::Unavailable(format!(
                        "no answer within {} s",
                        STALE_ANSWER_AFTER.as_secs()
                    )))
                });
        match theirs {
            Ok(theirs) => {
                // By digest, in a set: a 4 MiB answer lists some 40,000 descriptors.
                let mut held: std::collections::HashSet<Digest> =
                    found.iter().map(|f| f.digest.clone()).collect();
                found.extend(theirs.into_iter().filter(|d| held.insert(d.digest.clone())));
            }
            // The upstream cannot answer now: what the cluster holds.
            Err(e) => {
                tracing::warn!(registry = up.registry(), %repo, %digest, error = %e, "the upstream's referrers could not be listed")
            }
        }
        Ok(found)
    }
}
