//! Upstream blobs: where a fetch stands (here, or asked of the digest's primary owner), the
//! fetch itself (the upstream's bytes into an upload session, committed like a push), its
//! bytes for the first readers while they arrive, and a blob the cluster holds already linked
//! into another mirrored repository without moving bytes.

use super::*;

/// Longest a stream of a fetch in progress may take, proxied from another origin (its own
/// reader fails sooner, after a minute without bytes). Its answer's head must come within
/// [`PROGRESS_CALL_TIMEOUT`].
const STREAM_CALL_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// Timeout of one progress call to another origin, and of the head of a stream's answer.
const PROGRESS_CALL_TIMEOUT: Duration = Duration::from_secs(10);

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

impl PullThrough {
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
            if let Some(p) = self.progress_at_primary(repo, digest).await? {
                return Ok(p);
            }
        }
        if let Some(size) = self.link_if_held(&up, repo, path, digest).await? {
            return Ok(Progress { size: Some(size), received: size, complete: true, ..Progress::default() });
        }
        let client = client_credentials().map(|c| c.fingerprint());
        let fetch = match self.fetches.join(digest, repo.as_str(), client) {
            // Another repository's fetch of the same bytes: nothing of it is this repository's
            // to show (the upstream may refuse this client here), but for how many bytes have
            // come, so a waiter on a long fetch (a shared multi-GB base layer) does not take it
            // for a stalled one. Once it has committed the blob, `link_if_held` asks the
            // upstream about this repository.
            Ok(Joined::Existing(f)) if f.repo() != repo.as_str() => {
                return Ok(Progress { received: f.progress().received, ..Progress::default() })
            }
            // Another client's fetch of a private blob: nothing of it (not even its size) is
            // shown to this client before the upstream says it may read the blob. Found
            // private but not yet recorded so (a moment after the upstream's refusal of the
            // anonymous attempt): nothing is shown yet.
            Ok(Joined::Existing(f)) if f.client() != client && f.is_private() => {
                if !self.is_private(repo).await? {
                    return Ok(Progress::default());
                }
                self.check_access(&up, repo, path, Probe::Blob(digest)).await?;
                f
            }
            Ok(Joined::Existing(f)) => f,
            Ok(Joined::Started(f)) => {
                self.metrics.cache(up.registry(), false);
                let (store, repo, path, digest) =
                    (self.inner.clone(), repo.clone(), path.to_string(), digest.clone());
                // Nothing awaited between the fetch's registration and its task: a request
                // dropped there (a client or a calling origin giving up while the cluster's
                // private marker was read) left a fetch that never ran and never ended, the
                // digest stuck at "no progress" on this origin and a fetch slot lost.
                let known_private = lock(&self.private).contains_key(repo.as_str());
                let creds = client_credentials();
                let fetch = f.clone();
                tokio::spawn(async move {
                    let private = known_private || store.marked_private(&repo).await.unwrap_or(true);
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
    pub(super) async fn link_if_held(
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
        let send = peers
            .get(url)
            .query(&[("repo", repo.as_str()), ("here", "1")])
            .timeout(STREAM_CALL_TIMEOUT)
            .send();
        // The answer's head comes as soon as the primary looked (its progress call's work);
        // bounded apart from the long body, so a request the HTTP client's pool loses (see
        // `shoal_tls::http_client`) or a hung primary costs this reader seconds, not hours.
        match tokio::time::timeout(PROGRESS_CALL_TIMEOUT, send).await {
            Ok(Ok(r)) if r.status() == reqwest::StatusCode::OK => {
                let Some(size) = r.content_length() else { return Ok(None) };
                let body =
                    futures_util::StreamExt::map(r.bytes_stream(), |c| c.map_err(std::io::Error::other));
                Ok(Some((size, Box::pin(body))))
            }
            _ => Ok(None),
        }
    }

    /// Ask the digest's primary owner, if that is another origin; `Ok(None)`: fetch here. A
    /// primary's 429 (at its cap of fetches, or the upstream throttling it) is passed on with
    /// its `Retry-After`: fetching here instead would take each digest from the upstream once
    /// per origin, past the cap or the upstream's limit.
    pub(super) async fn progress_at_primary(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<Progress>, StoreError> {
        let Some(peers) = self.peers.as_ref() else { return Ok(None) };
        let Some(primary) = self.inner.coordinator.ranked(&digest.to_string()).into_iter().next() else {
            return Ok(None);
        };
        if primary == self.inner.coordinator.me() {
            return Ok(None);
        }
        let Some(base) = peers.membership.url(&primary) else { return Ok(None) };
        let url = format!("{base}{}", mirror::progress_path(digest));
        let mut req =
            peers.get(url).query(&[("repo", repo.as_str()), ("here", "1")]).timeout(PROGRESS_CALL_TIMEOUT);
        if let Some(c) = client_credentials() {
            req = req.header(UPSTREAM_AUTHORIZATION, c.to_authorization());
        }
        let answer = match req.send().await {
            Ok(r) if r.status().is_success() => r.json::<Progress>().await,
            Ok(r) if r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                let retry_after_secs =
                    shoal_upstream::retry_after(r.headers()).map_or(FETCHES_FULL_RETRY_SECS, |d| d.as_secs());
                return Err(StoreError::Throttled { retry_after_secs });
            }
            Ok(r) => {
                tracing::warn!(origin = %primary, status = %r.status(), "primary owner refused an upstream fetch; fetching here");
                return Ok(None);
            }
            Err(e) => Err(e),
        };
        match answer {
            Ok(p) => Ok(Some(p)),
            Err(e) => {
                tracing::warn!(origin = %primary, error = %e, "primary owner unreachable; fetching here");
                Ok(None)
            }
        }
    }

    /// Wait until the blob is in the cluster (for a reader at this origin); its size, `None`
    /// if the upstream has no such blob in that repository.
    pub(super) async fn wait_for_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, StoreError> {
        let Some((up, _)) = self.upstream_of(repo) else { return Ok(None) };
        mirror::wait_for_fetch(up.registry(), digest, || self.progress(repo, digest, false)).await.map_err(
            |e| match e {
                StoreError::UpstreamUnauthorized { registry } => super::refused(&registry),
                other => other,
            },
        )
    }
}

/// Seconds a client is told to wait when this origin runs as many upstream fetches as it may.
const FETCHES_FULL_RETRY_SECS: u64 = 5;

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
    let session = store.fetch_start(repo).await.map_err(failed)?;
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
