//! Who may read a mirrored repository: whether the upstream marked it private (a cluster
//! record every origin reads), the calls to the upstream with the client's credentials for
//! one that is, and the upstream's recent yes or no to those credentials ([`ACCESS_TTL`]).

use super::*;

/// How long an upstream's yes or no to a client's credentials for a repository is reused.
pub const ACCESS_TTL: Duration = Duration::from_secs(60);
/// Access decisions kept (cleared when full).
const MAX_ACCESS_DECISIONS: usize = 10_000;

impl PullThrough {
    pub(super) fn denied(repo: &RepoName) -> StoreError {
        StoreError::Denied(format!("{repo} mirrors an upstream registry and is read-only"))
    }

    /// A delete in a mirrored repository: the spec's answer to a disabled delete is 405.
    pub(super) fn no_deletes(repo: &RepoName) -> StoreError {
        StoreError::Unsupported(format!("{repo} mirrors an upstream registry: nothing in it can be deleted"))
    }

    /// Whether the upstream keeps `repo` private: known here, else the cluster's marker (a
    /// repository found private through any origin is private through all, also after
    /// restarts). Fails closed: a marker that cannot be read is an error, not "public".
    pub(super) async fn is_private(&self, repo: &RepoName) -> Result<bool, StoreError> {
        if lock(&self.private).contains_key(repo.as_str()) {
            return Ok(true);
        }
        let marked = self.inner.marked_private(repo).await?;
        if marked {
            self.remember_private(repo);
        }
        Ok(marked)
    }

    pub(super) fn remember_private(&self, repo: &RepoName) {
        let mut private = lock(&self.private);
        if private.len() >= MAX_ACCESS_DECISIONS {
            // Forgetting only costs a read of the cluster's marker.
            private.clear();
        }
        private.insert(repo.as_str().to_string(), Instant::now());
    }

    pub(super) async fn mark_private(&self, repo: &RepoName) -> Result<(), StoreError> {
        self.inner.mark_private(repo).await?;
        self.remember_private(repo);
        Ok(())
    }

    /// Whether `repo`, private, was last found so here more than the upstream's
    /// `private_recheck` ago: then this caller asks the upstream without the client's
    /// credentials again ([`Self::recheck`]); the others that come meanwhile do not.
    fn recheck_due(&self, up: &Upstream, repo: &RepoName) -> bool {
        let mut private = lock(&self.private);
        match private.get_mut(repo.as_str()) {
            Some(at) if at.elapsed() >= up.config().private_recheck => {
                *at = Instant::now();
                true
            }
            _ => false,
        }
    }

    /// If `repo`'s private mark is due a recheck: `ask` (without the client's credentials),
    /// its answer taken as [`Self::recheck`] says; the answer, if one came.
    async fn recheck_if_due<T>(
        &self,
        up: &Upstream,
        repo: &RepoName,
        ask: impl std::future::Future<Output = Result<T, UpstreamError>>,
    ) -> Option<T> {
        if !self.recheck_due(up, repo) {
            return None;
        }
        let result = ask.await;
        self.recheck(repo, &result).await;
        result.ok()
    }

    /// What the upstream's answer without a client's credentials shows about a repository
    /// marked private: an answer, that it is not private any more (the mark goes, for every
    /// origin); a refusal, that it still is (found so now). A repository marked private
    /// while the configured credentials were broken, or private for a while, is served to
    /// every client again once the upstream says so.
    async fn recheck<T>(&self, repo: &RepoName, result: &Result<T, UpstreamError>) {
        match result {
            Ok(_) => {
                tracing::info!(%repo, "upstream repository no longer private");
                lock(&self.private).remove(repo.as_str());
                if let Err(e) = self.inner.unmark_private(repo).await {
                    tracing::warn!(%repo, error = %e, "could not record the repository as public again");
                }
            }
            Err(UpstreamError::Unauthorized(_)) => self.remember_private(repo),
            Err(_) => {}
        }
    }

    /// Call the upstream with the configured credentials (or none), then, if it refuses and
    /// the client sent credentials, with the client's. A repository only the client's
    /// credentials open is marked private.
    pub(super) async fn call<T, F, Fut>(
        &self,
        up: &Upstream,
        repo: &RepoName,
        f: F,
    ) -> Result<T, UpstreamError>
    where
        F: Fn(Option<Credentials>) -> Fut,
        Fut: std::future::Future<Output = Result<T, UpstreamError>>,
    {
        let client = client_credentials();
        let private = match self.is_private(repo).await {
            Ok(p) => p,
            Err(e) => return Err(UpstreamError::Unavailable(format!("repository records: {e}"))),
        };
        if private {
            if let Some(answer) = self.recheck_if_due(up, repo, f(None)).await {
                return Ok(answer);
            }
        }
        if private {
            let Some(creds) = client else {
                return Err(UpstreamError::Unauthorized("this repository needs credentials".into()));
            };
            let result = f(Some(creds.clone())).await;
            self.remember_access(repo, &creds, &result);
            return result;
        }
        match f(None).await {
            Err(UpstreamError::Unauthorized(why)) => match client {
                Some(creds) => {
                    let result = f(Some(creds.clone())).await;
                    if result.is_ok() {
                        tracing::info!(registry = up.registry(), %repo, "private upstream repository");
                        if let Err(e) = self.mark_private(repo).await {
                            // Not recorded: refuse rather than cache what could leak.
                            return Err(UpstreamError::Unavailable(format!(
                                "recording {repo} as private: {e}"
                            )));
                        }
                    }
                    self.remember_access(repo, &creds, &result);
                    result
                }
                None => Err(UpstreamError::Unauthorized(why)),
            },
            other => other,
        }
    }

    pub(super) fn remember_access<T>(
        &self,
        repo: &RepoName,
        creds: &Credentials,
        result: &Result<T, UpstreamError>,
    ) {
        let Some(allowed) = access_shown(result) else { return };
        let mut access = lock(&self.access);
        if access.len() >= MAX_ACCESS_DECISIONS {
            access.clear();
        }
        access.insert((repo.as_str().to_string(), creds.fingerprint()), (Instant::now(), allowed));
    }

    /// Whether the upstream accepted the client's credentials for `repo` when last asked,
    /// within the upstream's `serve_stale`: what serving a private repository's content
    /// needs while the upstream cannot be asked (its stale tags, its cached blobs). Not
    /// longer: a user the upstream dropped must not read on through every outage.
    pub(super) fn accepted_before(&self, up: &Upstream, repo: &RepoName) -> bool {
        let Some(creds) = client_credentials() else { return false };
        let key = (repo.as_str().to_string(), creds.fingerprint());
        lock(&self.access)
            .get(&key)
            .is_some_and(|&(at, allowed)| allowed && at.elapsed() < up.config().serve_stale)
    }

    /// For a private repository, [`accepted_before`](Self::accepted_before) or the error to
    /// answer; nothing for a public one.
    pub(super) async fn require_accepted(&self, up: &Upstream, repo: &RepoName) -> Result<(), StoreError> {
        if self.is_private(repo).await? && !self.accepted_before(up, repo) {
            return Err(refused(up.registry()));
        }
        Ok(())
    }

    /// Before serving cached content of a private repository: the client's credentials must
    /// have been accepted by the upstream within [`ACCESS_TTL`] (asked now if not, with a
    /// `HEAD` of `probe`: a blob, or a manifest, which registries serve only as manifests),
    /// or, while the upstream cannot be asked, at any time before.
    pub(super) async fn check_access(
        &self,
        up: &Upstream,
        repo: &RepoName,
        path: &str,
        probe: Probe<'_>,
    ) -> Result<(), StoreError> {
        if !self.is_private(repo).await? {
            return Ok(());
        }
        if self.recheck_if_due(up, repo, ask(up, path, probe, None)).await.is_some() {
            return Ok(());
        }
        let unauthorized = || refused(up.registry());
        let creds = client_credentials().ok_or_else(unauthorized)?;
        let key = (repo.as_str().to_string(), creds.fingerprint());
        if let Some((at, allowed)) = lock(&self.access).get(&key).copied() {
            if at.elapsed() < ACCESS_TTL {
                return if allowed { Ok(()) } else { Err(unauthorized()) };
            }
        }
        let result = ask(up, path, probe, Some(&creds)).await;
        self.remember_access(repo, &creds, &result);
        match result {
            Ok(_) => Ok(()),
            // The upstream cannot be asked now (down, throttling): credentials it accepted
            // before still read what is cached, as a private tag is served stale then.
            Err(
                UpstreamError::Unavailable(_)
                | UpstreamError::TooManyRequests { .. }
                | UpstreamError::MethodNotAllowed(_),
            ) if self.accepted_before(up, repo) => Ok(()),
            // Not found with these credentials is no proof of access: registries that hide
            // private repositories answer 404 to users without it. A blob's is BLOB_UNKNOWN.
            Err(UpstreamError::NotFound) if matches!(probe, Probe::Blob(_)) => Err(StoreError::BlobUnknown),
            Err(e) => Err(store_error(up.registry(), e)),
        }
    }
}

/// A `HEAD` of what `probe` names, with `creds` (the configured credentials without them).
async fn ask(
    up: &Upstream,
    path: &str,
    probe: Probe<'_>,
    creds: Option<&Credentials>,
) -> Result<(), UpstreamError> {
    match probe {
        Probe::Blob(digest) => up.blob_head(path, digest, creds).await.map(|_| ()),
        Probe::Manifest(digest) => up.resolve_tag(path, &digest.to_string(), creds).await.map(|_| ()),
    }
}

/// What [`PullThrough::check_access`] asks the upstream about.
#[derive(Clone, Copy, Debug)]
pub(super) enum Probe<'a> {
    Blob(&'a Digest),
    Manifest(&'a Digest),
}

/// What an upstream's answer to a client's credentials shows about their access to a private
/// repository: allowed (an answer), refused (401), or nothing (a 404 proves nothing, since
/// registries that hide private repositories answer it to users without access; nor does an
/// outage).
fn access_shown<T>(result: &Result<T, UpstreamError>) -> Option<bool> {
    match result {
        Ok(_) => Some(true),
        Err(UpstreamError::Unauthorized(_)) => Some(false),
        Err(_) => None,
    }
}

#[cfg(test)]
mod access_tests {
    use super::*;

    #[test]
    pub(super) fn only_an_answer_shows_access_to_a_private_repository() {
        assert_eq!(access_shown(&Ok::<(), _>(())), Some(true));
        assert_eq!(access_shown::<()>(&Err(UpstreamError::Unauthorized("no".into()))), Some(false));
        assert_eq!(access_shown::<()>(&Err(UpstreamError::NotFound)), None, "a hiding registry's 404");
        assert_eq!(access_shown::<()>(&Err(UpstreamError::Unavailable("down".into()))), None);
    }
}
