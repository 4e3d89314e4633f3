//! [`AgentStore`]: the agent's read-only registry storage. Tags are resolved at the origin
//! (cached a few seconds at most), manifests are cached by digest within a byte budget
//! ([`ManifestCache`]), blobs come from the local cache or the swarm. Writes never reach it:
//! the agent's router is read-only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use shoal_registry::manifest::ReferrerDescriptor;
use shoal_registry::range::ByteRange;
use shoal_registry::store::{NewManifest, Page, Reference, StoredManifest, UploadState};
use shoal_registry::{ByteStream, Digest, RegistryStore, RepoName, StoreError, Tag};

use shoal_registry::auth::forwarded_authorization;
use shoal_registry::auth::remote::RemoteAuth;
use shoal_registry::mirror::wait_for_fetch;

use crate::downloads::{Downloads, Joined};
use crate::manifest_cache::{ManifestCache, DEFAULT_MANIFEST_CACHE_BYTES};
use crate::mirror::{upstream_credentials, Registries};
use crate::origin_client::OriginClient;

/// (repository, blob) pairs the origin confirmed, so cached blobs need no round trip.
const MAX_CONFIRMED: usize = 100_000;

/// How long the origin's word that a blob or a manifest (by digest) is in a repository is
/// reused (`confirm_ttl`): a `DELETE` at the origin reaches agents within it. A confirmation
/// older than that still serves while the origin cannot be asked.
pub const DEFAULT_CONFIRM_TTL: Duration = Duration::from_secs(60);

/// The agent's storage behind the read-only registry API.
pub struct AgentStore {
    origin: OriginClient,
    downloads: Arc<Downloads>,
    manifests: ManifestCache,
    /// Blob sizes the origin confirmed in a repository, and when.
    confirmed: Mutex<HashMap<(RepoName, Digest), (u64, Instant)>>,
    confirm_ttl: Duration,
    /// With access control on, a blob is served through a repository only once the origin
    /// confirmed it belongs there (see `blob_size`).
    auth: Arc<RemoteAuth>,
    /// The upstream registries the origins pull through.
    registries: Arc<Registries>,
}

fn read_only() -> StoreError {
    StoreError::Internal("the agent is read-only".into())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Insert into a bounded map, clearing it when full (entries are cheap to refetch).
fn bounded_insert<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, max: usize, k: K, v: V) {
    if map.len() >= max {
        map.clear();
    }
    map.insert(k, v);
}

impl AgentStore {
    pub fn new(
        origin: OriginClient,
        downloads: Arc<Downloads>,
        tag_ttl: Duration,
        confirm_ttl: Duration,
        auth: Arc<RemoteAuth>,
        registries: Arc<Registries>,
    ) -> AgentStore {
        AgentStore {
            origin,
            downloads,
            manifests: ManifestCache::new(tag_ttl, confirm_ttl, DEFAULT_MANIFEST_CACHE_BYTES),
            confirmed: Mutex::new(HashMap::new()),
            confirm_ttl,
            auth,
            registries,
        }
    }

    /// Whether this request's answers for `repo` may come from (and go into) the caches: not
    /// for a client that sent upstream credentials for upstream content, so what an upstream
    /// allows one client is never served to another; the origins check those every time
    /// (and keep the upstream's decision briefly).
    /// Until the origins named their upstream registries, every repository may be one.
    fn cacheable(&self, repo: &RepoName) -> bool {
        upstream_credentials().is_none() || (self.registries.known() && !self.registries.is_upstream(repo))
    }

    /// The access control the origins publish, as this agent follows it.
    pub fn auth(&self) -> &Arc<RemoteAuth> {
        &self.auth
    }

    /// An upstream blob's size and whether the origins hold it yet, polling the progress of
    /// their fetch (starting it) until the size is known; `None` if the upstream has no such
    /// blob in that repository.
    async fn upstream_size(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<(u64, bool)>, StoreError> {
        let registry = repo.as_str().split('/').next().unwrap_or_default();
        let held = std::sync::atomic::AtomicBool::new(false);
        let size = wait_for_fetch(registry, digest, || async {
            let mut p = self.origin.upstream_progress(repo, digest).await?;
            held.store(p.complete, std::sync::atomic::Ordering::Relaxed);
            // Knowing the size is enough here: readers stream or wait in `blob_read`.
            p.complete |= p.error.is_none() && p.size.is_some();
            Ok(p)
        })
        .await?;
        Ok(size.map(|s| (s, held.load(std::sync::atomic::Ordering::Relaxed))))
    }

    /// Wait until the origins hold an upstream blob (starting its fetch there), polling its
    /// progress; `None` if the upstream has no such blob in that repository.
    async fn fetch_upstream(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let registry = repo.as_str().split('/').next().unwrap_or_default();
        wait_for_fetch(registry, digest, || self.origin.upstream_progress(repo, digest)).await
    }

    /// Whether every blob the origins hold is public: access is not controlled and they pull
    /// through no upstream registry (as far as an origin has told this agent).
    fn nothing_private(&self) -> bool {
        self.auth.enabled() == Some(false) && self.registries.known() && self.registries.names().is_empty()
    }

    pub fn downloads(&self) -> &Arc<Downloads> {
        &self.downloads
    }

    /// Join (or start) the download of `digest` through `repo`, with the client's token, or
    /// without one an anonymous token where the origins want one (plain HTTP, access control
    /// on: their node API then asks for a token).
    /// `size`: what the origins confirmed (see `Downloads::join`).
    async fn join(&self, repo: &RepoName, digest: &Digest, size: u64) -> Result<Joined, StoreError> {
        self.downloads.join(repo, digest, Some(size), forwarded_authorization()).await
    }

    /// [`join`](Self::join), for an upstream blob that no download here has yet only once the
    /// origins hold it: until their fetch commits it, no tracker knows its pieces ("blob
    /// unknown"). `BlobUnknown` if the upstream has no such blob.
    pub async fn join_held(&self, repo: &RepoName, digest: &Digest, size: u64) -> Result<Joined, StoreError> {
        let here = self.downloads.running(digest).is_some() || self.downloads.cache.contains(digest);
        if self.registries.is_upstream(repo) && !here && self.fetch_upstream(repo, digest).await?.is_none() {
            return Err(StoreError::BlobUnknown);
        }
        self.join(repo, digest, size).await
    }

    /// A cached blob, streamed with every piece checked (see `Downloads::stream_cached`).
    async fn cached_blob(&self, repo: &RepoName, digest: &Digest, range: ByteRange) -> Option<ByteStream> {
        let pieces = self.downloads.open_cached(digest).await?;
        Some(self.downloads.stream_cached(repo, pieces, range))
    }
}

#[async_trait]
impl RegistryStore for AgentStore {
    async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let key = (repo.clone(), digest.clone());
        let cacheable = self.cacheable(repo);
        let confirmed = lock(&self.confirmed).get(&key).copied().filter(|_| cacheable);
        if let Some((size, at)) = confirmed {
            if at.elapsed() < self.confirm_ttl {
                return Ok(Some(size));
            }
        }
        // Upstream content: the size as soon as the origins' fetch knows it (their `HEAD`
        // would wait for the whole fetch, longer than a call to them may take); once they hold
        // the blob, ask as for any blob.
        let asked = if self.registries.is_upstream(repo) {
            match self.upstream_size(repo, digest).await {
                Ok(Some((size, false))) => return Ok(Some(size)),
                Ok(Some((_, true))) => self.origin.blob_size(repo, digest).await,
                other => other.map(|o| o.map(|(s, _)| s)),
            }
        } else {
            self.origin.blob_size(repo, digest).await
        };
        match asked {
            Ok(Some(size)) => {
                if cacheable {
                    bounded_insert(&mut lock(&self.confirmed), MAX_CONFIRMED, key, (size, Instant::now()));
                }
                Ok(Some(size))
            }
            Ok(None) => {
                lock(&self.confirmed).remove(&key);
                Ok(None)
            }
            Err(e) if refused_client(&e) => Err(e),
            // Confirmed before, and the origin cannot be asked now: still served.
            Err(e) if confirmed.is_some() => {
                tracing::warn!(%digest, error = %e, "origin unreachable; serving a blob it confirmed before");
                Ok(confirmed.map(|(size, _)| size))
            }
            // The origin is unreachable: a blob already here is still served, unless it may be
            // private: then only through a repository the origin confirmed it in (above), or it
            // could be read through another repository's name. It may be private where access
            // is controlled, and where the origins pull through upstream registries (or this
            // agent has not heard whether they do): an upstream's private blob, fetched with a
            // client's credentials, lands in the same cache.
            Err(e) => match self.downloads.cache.get(digest).filter(|_| self.nothing_private()) {
                Some(size) => {
                    tracing::warn!(%digest, error = %e, "origin unreachable; serving the cached blob");
                    Ok(Some(size))
                }
                None => Err(e),
            },
        }
    }

    async fn blob_read(
        &self,
        repo: &RepoName,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<ByteStream, StoreError> {
        let size = self.blob_size(repo, digest).await?.ok_or(StoreError::BlobUnknown)?;
        let range = range.unwrap_or(ByteRange { start: 0, end: size.saturating_sub(1) });
        if size == 0 {
            return Ok(Box::pin(futures_util::stream::empty()));
        }
        if let Some(stream) = self.cached_blob(repo, digest, range).await {
            return Ok(stream);
        }
        if self.registries.is_upstream(repo) && self.downloads.running(digest).is_none() {
            // The origins may still be fetching it: the first requesters get the bytes as they
            // arrive (checked against the digest at the end); the others wait, then swarm.
            let full = range.start == 0 && range.end + 1 == size;
            if full {
                if let Some((len, body)) = self.origin.upstream_stream(repo, digest).await? {
                    if len == size {
                        tracing::info!(%repo, %digest, "streaming an upstream blob while the origins fetch it");
                        return Ok(verified(body, digest.clone(), size));
                    }
                }
            }
        }
        match self.join_held(repo, digest, size).await? {
            Joined::Download(download) => Ok(self.downloads.stream(repo, download, range)),
            Joined::Cached(pieces) => Ok(self.downloads.stream_cached(repo, pieces, range)),
        }
    }

    async fn blob_delete(&self, _: &RepoName, _: &Digest) -> Result<bool, StoreError> {
        Err(read_only())
    }

    async fn blob_mount(&self, _: &RepoName, _: &RepoName, _: &Digest) -> Result<bool, StoreError> {
        Err(read_only())
    }

    async fn upload_start(&self, _: &RepoName) -> Result<UploadState, StoreError> {
        Err(read_only())
    }

    async fn upload_status(&self, _: &RepoName, _: &str) -> Result<UploadState, StoreError> {
        Err(read_only())
    }

    async fn upload_append(
        &self,
        _: &RepoName,
        _: &str,
        _: Option<u64>,
        _: Option<u64>,
        _: ByteStream,
    ) -> Result<UploadState, StoreError> {
        Err(read_only())
    }

    async fn upload_commit(
        &self,
        _: &RepoName,
        _: &str,
        _: &Digest,
        _: Option<u64>,
    ) -> Result<u64, StoreError> {
        Err(read_only())
    }

    async fn upload_cancel(&self, _: &RepoName, _: &str) -> Result<(), StoreError> {
        Err(read_only())
    }

    async fn manifest_get(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<StoredManifest>, StoreError> {
        if !self.cacheable(repo) {
            let reference = match reference {
                Reference::Digest(d) => d.to_string(),
                Reference::Tag(t) => t.to_string(),
            };
            return self.origin.manifest(repo, &reference).await;
        }
        match reference {
            Reference::Digest(d) => {
                let now = Instant::now();
                let kept = match self.manifests.by_digest(repo, d, now) {
                    Some((m, true)) => return Ok(Some(m)),
                    Some((m, false)) => Some(m),
                    None => None,
                };
                // Asked again after `confirm_ttl`: deleted at the origin, it is gone here too;
                // kept while the origin cannot be asked.
                let found = match self.origin.manifest(repo, &d.to_string()).await {
                    // Unless the origin refused this client (as for blobs, below).
                    Err(e) if kept.is_some() && !refused_client(&e) => {
                        tracing::warn!(%repo, digest = %d, error = %e, "origin unreachable; serving a manifest it confirmed before");
                        return Ok(kept);
                    }
                    other => other?,
                };
                match &found {
                    Some(m) => self.manifests.insert(repo, None, m, now),
                    None => self.manifests.remove(repo, d),
                }
                Ok(found)
            }
            Reference::Tag(t) => {
                if let Some(m) = self.manifests.by_tag(repo, t, Instant::now()) {
                    return Ok(Some(m));
                }
                // A slow answer must not replace one to a question asked after it.
                let asked = Instant::now();
                let found = match self.origin.manifest(repo, t.as_str()).await {
                    // The origins cannot be asked: where the tag last pointed, so the images
                    // a node holds still start (a pod's `imagePullPolicy: Always` resolves its
                    // tag at every start), as a manifest by digest is kept. Not for a client
                    // the origins refused.
                    Err(e) if !refused_client(&e) => {
                        match self.manifests.by_tag_kept(repo, t, shoal_registry::api::unix_now()) {
                            Some(m) => {
                                tracing::warn!(%repo, tag = %t, digest = %m.digest, error = %e,
                                "origin unreachable; serving where the tag last pointed");
                                return Ok(Some(m));
                            }
                            None => return Err(e),
                        }
                    }
                    other => other?,
                };
                match &found {
                    Some(m) => self.manifests.insert_answer(repo, Some(t), m, asked, Instant::now()),
                    // Gone at the origins: not served from memory through a later outage.
                    None => self.manifests.forget_tag(repo, t),
                }
                Ok(found)
            }
        }
    }

    async fn manifest_put(&self, _: &RepoName, _: Option<&Tag>, _: NewManifest) -> Result<(), StoreError> {
        Err(read_only())
    }

    async fn manifest_delete(&self, _: &RepoName, _: &Reference) -> Result<bool, StoreError> {
        Err(read_only())
    }

    async fn tags(&self, repo: &RepoName, last: Option<&str>, limit: usize) -> Result<Page, StoreError> {
        let path = listing_path(&format!("/v2/{repo}/tags/list"), last, limit);
        let (body, next) = self.origin.listing_page(&path).await?.ok_or(StoreError::NameUnknown)?;
        page_of(&body, "tags", limit, next)
    }

    async fn repositories(&self, last: Option<&str>, limit: usize) -> Result<Page, StoreError> {
        let path = listing_path("/v2/_catalog", last, limit);
        let (body, next) = self.origin.listing_page(&path).await?.unwrap_or_default();
        page_of(&body, "repositories", limit, next)
    }

    async fn referrers(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Vec<ReferrerDescriptor>, StoreError> {
        let Some(body) = self.origin.listing(&format!("/v2/{repo}/referrers/{digest}")).await? else {
            return Ok(Vec::new());
        };
        #[derive(serde::Deserialize)]
        struct Index {
            #[serde(default)]
            manifests: Vec<ReferrerDescriptor>,
        }
        let index: Index = serde_json::from_slice(&body)
            .map_err(|e| StoreError::Internal(format!("origin referrers: {e}")))?;
        Ok(index.manifests)
    }
}

/// Whether an origin's error refused this client (its credentials, its access), or said the
/// upstream registry failed past what the origins may serve stale, rather than told of the
/// origins themselves (down, busy): kept answers are not served past it.
fn refused_client(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Denied(_)
            | StoreError::UpstreamUnauthorized { .. }
            | StoreError::Unauthorized { .. }
            | StoreError::UpstreamFailed { .. }
    )
}

/// `body` as it arrives, hashed on the way: if its bytes do not make `digest` (or are not
/// `size` long), the stream ends with an error instead of its last chunk being the end, so a
/// client never takes a wrong blob for a complete one.
fn verified(body: ByteStream, digest: Digest, size: u64) -> ByteStream {
    use futures_util::StreamExt;
    let state = (body, digest.algorithm().hasher(), 0u64, Some(digest));
    Box::pin(futures_util::stream::unfold(state, move |(mut body, mut hasher, seen, digest)| async move {
        let want = digest?;
        match body.next().await {
            Some(Ok(chunk)) => {
                hasher.update(&chunk);
                let seen = seen + chunk.len() as u64;
                if seen > size {
                    let e = std::io::Error::other(format!("{want}: more than {size} bytes"));
                    return Some((Err(e), (body, hasher, seen, None)));
                }
                if seen == size {
                    let got = hasher.finish();
                    if got != want {
                        let e = std::io::Error::other(format!("the stream of {want} hashed to {got}"));
                        return Some((Err(e), (body, want.algorithm().hasher(), seen, None)));
                    }
                    return Some((Ok(chunk), (body, want.algorithm().hasher(), seen, None)));
                }
                Some((Ok(chunk), (body, hasher, seen, Some(want))))
            }
            Some(Err(e)) => Some((Err(e), (body, hasher, seen, None))),
            None => {
                let e =
                    std::io::Error::other(format!("the stream of {want} ended after {seen} of {size} bytes"));
                Some((Err(e), (body, hasher, seen, None)))
            }
        }
    }))
}

/// The origin's listing at `base` of `limit` items after `last`.
fn listing_path(base: &str, last: Option<&str>, limit: usize) -> String {
    format!("{base}?{}", Page::query(limit, last))
}

/// One page of a listing as the origin returned it, `next` from its `Link` (the origin caps
/// a page, and filters the catalog for its reader: counting items cannot tell what follows).
fn page_of(body: &[u8], key: &str, limit: usize, next: Option<String>) -> Result<Page, StoreError> {
    let value: serde_json::Value = if body.is_empty() {
        serde_json::json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| StoreError::Internal(format!("origin listing: {e}")))?
    };
    let mut items: Vec<String> = value
        .get(key)
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    items.truncate(limit);
    Ok(Page { items, next })
}
