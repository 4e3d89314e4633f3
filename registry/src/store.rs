//! The storage interface the API is written against. The origin implements it over files and
//! redb; the agent (later) over the swarm. The API layer owns protocol rules, the store owns
//! durability and atomicity.

use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;

use crate::digest::Digest;
use crate::error::StoreError;
use crate::manifest::{ParsedManifest, ReferrerDescriptor};
use crate::name::{RepoName, Tag};
use crate::range::ByteRange;

/// A body of bytes arriving from, or going to, the network.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// Read size when streaming a stored file: each read is a hop to the blocking pool, and
/// 1 MiB made pulls ~10% faster than 256 KiB (see docs/benchmarks.md).
pub const FILE_READ_CHUNK: usize = 1024 * 1024;

/// Stream `range` of a blob file of `size` bytes to a client (origin storage, agent cache).
pub async fn file_range_stream(
    path: &std::path::Path,
    range: ByteRange,
    size: u64,
) -> std::io::Result<ByteStream> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(std::io::SeekFrom::Start(range.start)).await?;
    let len = if size == 0 { 0 } else { range.len() };
    Ok(Box::pin(tokio_util::io::ReaderStream::with_capacity(file.take(len), FILE_READ_CHUNK)))
}

/// A tag or a digest, as in `/manifests/<reference>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

/// Where an upload session stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadState {
    pub id: String,
    /// Bytes received so far.
    pub offset: u64,
}

/// A stored manifest, exactly as it was pushed.
#[derive(Clone, Debug)]
pub struct StoredManifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
    /// Answered by tag for a repository of an upstream registry: until when (Unix seconds)
    /// a node may serve the tag's target it kept while the origins cannot be asked (the
    /// upstream's last confirmation plus `serve_stale`). `None`: no limit (pushed content,
    /// or an answer by digest).
    pub serve_stale_until: Option<u64>,
}

/// A manifest ready to be stored: validated and hashed by the API layer.
#[derive(Clone, Debug)]
pub struct NewManifest {
    pub digest: Digest,
    pub bytes: Bytes,
    pub parsed: ParsedManifest,
}

/// One page of a sorted listing, and where the next one starts (after `next`), if more follow.
/// `next` is usually the page's last item, but not always: a page filtered for its reader (the
/// catalog) may hide its own last item, or all of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<String>,
    pub next: Option<String>,
}

impl Page {
    /// The query of a listing's page: `n=<limit>`, and `&last=<last>` percent-encoded (`last`
    /// comes from clients: pasted as it is, `a&n=1` or `#` changed the query).
    pub fn query(limit: usize, last: Option<&str>) -> String {
        let mut pairs = vec![("n", limit.to_string())];
        if let Some(last) = last {
            pairs.push(("last", last.to_string()));
        }
        serde_urlencoded::to_string(&pairs).unwrap_or_else(|_| format!("n={limit}"))
    }

    /// The first `limit` of `items` (sorted, each after the previous page), with the next
    /// page after the last of them if any were left out.
    pub fn cut(mut items: Vec<String>, limit: usize) -> Page {
        let more = items.len() > limit;
        items.truncate(limit);
        let next = if more { items.last().cloned() } else { None };
        Page { items, next }
    }
}

/// Storage behind the registry API. Every method is repository-scoped where the spec is.
#[async_trait]
pub trait RegistryStore: Send + Sync + 'static {
    /// Size of a blob linked into `repo`, or `None`.
    async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, StoreError>;

    /// Bytes of a blob linked into `repo` (a part of it with `range`).
    async fn blob_read(
        &self,
        repo: &RepoName,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<ByteStream, StoreError>;

    /// Unlink a blob from `repo`; `false` if it was not linked.
    async fn blob_delete(&self, repo: &RepoName, digest: &Digest) -> Result<bool, StoreError>;

    /// Link a blob of `from` into `repo`; `false` if `from` does not have it.
    async fn blob_mount(&self, repo: &RepoName, from: &RepoName, digest: &Digest)
        -> Result<bool, StoreError>;

    /// Open an upload session.
    async fn upload_start(&self, repo: &RepoName) -> Result<UploadState, StoreError>;

    /// Where a session stands.
    async fn upload_status(&self, repo: &RepoName, id: &str) -> Result<UploadState, StoreError>;

    /// Append a chunk. `start`, when given, must equal the current offset; `len`, when given, is
    /// the exact chunk length and the chunk is applied whole or not at all. Without `len` the
    /// bytes that arrived are kept even if the stream fails, so the client can resume.
    async fn upload_append(
        &self,
        repo: &RepoName,
        id: &str,
        start: Option<u64>,
        len: Option<u64>,
        body: ByteStream,
    ) -> Result<UploadState, StoreError>;

    /// Verify the upload's content against `digest` and commit it as a blob of `repo`. On a
    /// digest mismatch the session is discarded and nothing is stored.
    async fn upload_complete(&self, repo: &RepoName, id: &str, digest: &Digest) -> Result<u64, StoreError> {
        self.upload_commit(repo, id, digest, None).await
    }

    /// [`upload_complete`](Self::upload_complete) for a final `PUT` whose body was appended
    /// from offset `body_from`: if the commit fails with the session still open (a full
    /// disk), the session is cut back there, under the lock the commit held, so the client
    /// can send the same `PUT` again (appended twice, the digest no longer matched).
    async fn upload_commit(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        body_from: Option<u64>,
    ) -> Result<u64, StoreError>;

    /// Abandon a session and its data.
    async fn upload_cancel(&self, repo: &RepoName, id: &str) -> Result<(), StoreError>;

    /// A manifest of `repo` by tag or digest.
    async fn manifest_get(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<StoredManifest>, StoreError>;

    /// Store a manifest (and point `tag` at it). Fails with `ManifestBlobUnknown` if a blob or
    /// child manifest it references is not in `repo`.
    async fn manifest_put(
        &self,
        repo: &RepoName,
        tag: Option<&Tag>,
        manifest: NewManifest,
    ) -> Result<(), StoreError>;

    /// Delete a manifest by digest (and every tag pointing at it), or just a tag.
    async fn manifest_delete(&self, repo: &RepoName, reference: &Reference) -> Result<bool, StoreError>;

    /// Tags of `repo` after `last`, at most `limit`; `NameUnknown` for an unknown repository.
    async fn tags(&self, repo: &RepoName, last: Option<&str>, limit: usize) -> Result<Page, StoreError>;

    /// Repository names after `last`, at most `limit`.
    async fn repositories(&self, last: Option<&str>, limit: usize) -> Result<Page, StoreError>;

    /// Manifests of `repo` whose subject is `digest`.
    async fn referrers(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Vec<ReferrerDescriptor>, StoreError>;
}

#[cfg(test)]
mod page_tests {
    use super::Page;

    #[test]
    fn a_page_query_keeps_a_clients_last_in_its_place() {
        assert_eq!(Page::query(10, None), "n=10");
        assert_eq!(Page::query(10, Some("team/app")), "n=10&last=team%2Fapp");
        // Pasted as it was, this `last` set `n` (and a `#` cut the query short).
        assert_eq!(Page::query(10, Some("x&n=1#y")), "n=10&last=x%26n%3D1%23y");
    }
}
