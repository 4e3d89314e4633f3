//! Whom a download asks the origins as: the client requests that joined it, each through the
//! repository it asked for with its own credentials. Without node TLS the origins' node API
//! wants a client's token, which lives 5 minutes, and a download can take longer; so the
//! newest joiner is asked as first, then the ones before it, then anonymously.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use axum::http::HeaderValue;
use bytes::Bytes;
use shoal_p2p::swarm::Fallback;
use shoal_registry::{Digest, RepoName, StoreError};

use super::{Download, Downloads};
use crate::origin_client::OriginClient;

/// Whom a download's origin fallback asks as: a client request that joined it, through the
/// repository it asked for (confirmed by the origins to hold the blob) with its own
/// credentials (`None`: an anonymous client, asked as with an agent-fetched anonymous token).
#[derive(Clone, PartialEq)]
pub(super) struct Asker {
    pub(super) repo: RepoName,
    pub(super) client: Option<HeaderValue>,
}

/// Most [`Asker`]s a download keeps: the newest, and a few before it in case the newest
/// client's token expires first.
const MAX_ASKERS: usize = 4;

impl Download {
    pub(super) fn askers(&self) -> std::sync::MutexGuard<'_, Vec<Asker>> {
        self.askers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A client request joined: the fallback asks as it first from now on (its token is the
    /// newest; a client whose token expired during a long download retries with a new one).
    pub(super) fn asked_by(&self, asker: Asker) {
        let mut askers = self.askers();
        askers.retain(|a| *a != asker);
        askers.insert(0, asker);
        askers.truncate(MAX_ASKERS);
    }

    /// The origins refused `asker`'s credentials (an expired token): not asked as again,
    /// unless it is the last one left.
    fn refused(&self, asker: &Asker) {
        let mut askers = self.askers();
        if askers.len() > 1 {
            askers.retain(|a| a != asker);
        }
    }

    /// The origins could not answer as `asker` (503, a timeout, 429): that may be its
    /// repository's alone (its metadata owners down while the blob's are up), so the askers
    /// through that repository go last, and the next attempt (after the fallback's back-off)
    /// asks through another. Nothing more is asked now: in an outage of the origins
    /// themselves, every asker would get the same answer.
    fn unanswered(&self, asker: &Asker) {
        // A stable sort: the order within each group is kept.
        self.askers().sort_by_key(|a| a.repo == asker.repo);
    }
}

/// Fetches missing ranges straight from an origin as the clients reading the download:
/// through the newest one's repository with its credentials, then (its token expired, its
/// access revoked, the blob unlinked from its repository) as the ones before it, then
/// anonymously through each of their repositories (a public repository needs no client
/// token). Without node TLS the origins' node API wants a client's token, which lives 5
/// minutes; a download can take longer. Holds the download weakly: a fetch still running
/// when the download ends does not keep its pieces (and so a cached blob's pin).
pub(super) struct OriginFallback {
    pub(super) downloads: Arc<Downloads>,
    pub(super) download: std::sync::Weak<Download>,
    pub(super) digest: Digest,
}

/// Whether an origin's answer refused this client or this repository only (another asker may
/// be served), rather than telling of the origins themselves (down, busy: the same for all).
fn refused_to_asker(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Unauthorized { .. }
            | StoreError::UpstreamUnauthorized { .. }
            | StoreError::Denied(_)
            | StoreError::BlobUnknown
    )
}

#[async_trait]
impl Fallback for OriginFallback {
    async fn fetch(&self, offset: u64, len: u64) -> Result<Bytes, String> {
        let digest = &self.digest;
        let fetch = |origin: OriginClient, repo: RepoName| async move {
            origin.blob_range(&repo, digest, offset, len).await
        };
        self.downloads.as_clients(&self.download, fetch).await.map_err(|e| e.to_string())
    }
}

impl Downloads {
    /// What a download's origin calls for `repo` carry: the client's credentials, or for a
    /// client that sent none an anonymous token where the origins want one (tokens on, plain
    /// HTTP: their node API then asks for a token). Asked when a download starts or is
    /// joined, and by its fallback, not for every cached read, so a cached blob is served
    /// while the token endpoint is down.
    pub(super) async fn credentials(
        &self,
        repo: &RepoName,
        client: Option<HeaderValue>,
    ) -> Option<HeaderValue> {
        if client.is_some() {
            return client;
        }
        let policy = self.auth.policy().filter(|p| p.tokens)?;
        self.origin.anonymous_token(&policy.realm, &policy.service, repo).await
    }

    /// `op` on an origin client with the credentials of the clients reading `download`, each
    /// through its own repository: the newest first, then (refused: its token expired, its
    /// access revoked, the blob unlinked from its repository) the ones before it, then
    /// anonymously through each of their repositories (see [`OriginFallback`]). Any other
    /// error (down, busy) is the answer, and its repository's askers go last for the next
    /// call (see [`Download::unanswered`]). Holds the download
    /// only to read and update its askers: not while it waits on an origin.
    pub(super) async fn as_clients<T, F, Fut>(
        &self,
        download: &std::sync::Weak<Download>,
        op: F,
    ) -> Result<T, StoreError>
    where
        F: Fn(OriginClient, RepoName) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let ended = || StoreError::Unavailable("the download has ended".into());
        let askers = download.upgrade().ok_or_else(ended)?.askers().clone();
        let mut refused = None;
        for asker in &askers {
            let credentials = self.credentials(&asker.repo, asker.client.clone()).await;
            match op(self.origin.with_credentials(credentials), asker.repo.clone()).await {
                Err(e) if refused_to_asker(&e) => {
                    if let Some(download) = download.upgrade() {
                        download.refused(asker);
                    }
                    refused = Some(e);
                }
                Err(e) => {
                    if let Some(download) = download.upgrade() {
                        download.unanswered(asker);
                    }
                    return Err(e);
                }
                ok => return ok,
            }
        }
        let mut anonymous: Vec<&RepoName> = Vec::new();
        for asker in askers.iter().filter(|a| a.client.is_some()) {
            if !anonymous.contains(&&asker.repo) {
                anonymous.push(&asker.repo);
            }
        }
        for repo in anonymous {
            let credentials = self.credentials(repo, None).await;
            match op(self.origin.with_credentials(credentials), repo.clone()).await {
                Err(e) if refused_to_asker(&e) => refused = Some(e),
                other => return other,
            }
        }
        Err(refused.unwrap_or_else(|| StoreError::Unavailable("no client to ask the origins as".into())))
    }
}
