//! [`Node`]: what one origin can do for the cluster, whether it is this process
//! ([`crate::cluster::local::LocalNode`]) or another origin over the internal API
//! ([`crate::cluster::remote::RemoteNode`]). The cluster logic is written once against it.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use shoal_registry::range::ByteRange;
use shoal_registry::{ByteStream, Digest};

use crate::cluster::record::{Record, RecordKey, RecordKind};

/// Why a node could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The node did not answer (down, partitioned, timed out): try another replica.
    #[error("origin {node} unreachable: {reason}")]
    Unreachable { node: String, reason: String },
    /// The node answered with a refusal that another replica would repeat.
    #[error("origin {node} refused: {reason}")]
    Refused { node: String, reason: String },
    /// The node refused records whose versions are too far ahead of its wall clock (see
    /// `record::MAX_CLOCK_AHEAD`): one of the two clocks is wrong, and which one decides
    /// whether the write may go elsewhere (see `Coordinator::place`).
    #[error("origin {node} refused a version too far ahead of its clock: {reason}")]
    ClockRefused { node: String, reason: String },
    /// Content did not match its digest or declared size.
    #[error("content does not match {0}")]
    Corrupt(Digest),
    #[error("origin storage is full")]
    StorageFull,
    #[error("storage failure on {node}: {reason}")]
    Storage { node: String, reason: String },
}

/// A blob file held by a node, as listed for repair and garbage collection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobEntry {
    pub digest: Digest,
    pub size: u64,
    /// When this node stored it (ms since the epoch); garbage collection's grace starts here.
    pub stored_millis: u64,
}

/// Where one page of a record scan starts and how much it may hold: the internal API pages
/// scans so that a repository with many large manifests never answers more than one
/// response may carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanPage {
    /// The key name (digest or tag) the previous page ended with.
    pub after: Option<String>,
    /// The stored JSON a page may hold; a single record larger than this is a page alone.
    pub max_bytes: usize,
    /// The records a page may hold (a listing's page needs about as many as it shows).
    pub max_records: usize,
}

impl ScanPage {
    /// Everything in one page: in-process scans.
    pub const ALL: ScanPage = ScanPage { after: None, max_bytes: usize::MAX, max_records: usize::MAX };

    /// A page of at most `max_bytes` of stored JSON, any number of records.
    pub fn of_bytes(max_bytes: usize) -> ScanPage {
        ScanPage { after: None, max_bytes, max_records: usize::MAX }
    }
}

/// One page of a record scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordPage {
    pub records: Vec<Record>,
    /// Records follow this page's last one.
    pub more: bool,
}

/// Whether a node holds a blob, as [`Node::blob_peek`] tells without changing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holding {
    /// Held, with its size.
    Held(u64),
    /// Set aside by garbage collection (see [`Node::blob_quarantine`]).
    Quarantined,
    Absent,
}

/// How this origin reaches itself and the other origins.
#[async_trait]
pub trait Node: Send + Sync + 'static {
    /// The node's cluster id (its advertised `host:port`).
    fn id(&self) -> &str;

    /// Size of the blob file if this node holds it. A quarantined copy is brought back
    /// (whoever asks needs it: a read through a live link, a copy being placed).
    async fn blob_stat(&self, digest: &Digest) -> Result<Option<u64>, NodeError>;

    /// Whether this node holds the blob, without bringing a quarantined copy back: for
    /// repair, which must leave a blob garbage collection is setting aside to it.
    async fn blob_peek(&self, digest: &Digest) -> Result<Holding, NodeError>;

    /// The blob's bytes (or a range of them) if this node holds it.
    async fn blob_get(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>, NodeError>;

    /// Store a blob of `size` bytes. The node verifies digest and size before the blob becomes
    /// visible, and makes it durable before answering.
    async fn blob_put(&self, digest: &Digest, size: u64, body: ByteStream) -> Result<(), NodeError>;

    /// Drop this node's copy; `false` if it had none.
    async fn blob_remove(&self, digest: &Digest) -> Result<bool, NodeError>;

    /// Blobs held, in digest order, after `after`, at most `limit`.
    async fn blob_list(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<BlobEntry>, NodeError>;

    /// Set this node's copy aside for garbage collection: unlisted and unserved, but brought
    /// back by anything that asks for the blob; `false` if it had no copy.
    async fn blob_quarantine(&self, digest: &Digest) -> Result<bool, NodeError>;

    /// Bring a quarantined copy back; `false` if none was quarantined.
    async fn blob_restore(&self, digest: &Digest) -> Result<bool, NodeError>;

    /// Quarantined blobs, in digest order, after `after`, at most `limit`; `stored_millis` is
    /// when each was set aside.
    async fn quarantine_list(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<BlobEntry>, NodeError>;

    /// Delete a quarantined copy set aside exactly at `since`; its size if it was deleted.
    async fn blob_purge(&self, digest: &Digest, since: u64) -> Result<Option<u64>, NodeError>;

    /// Repositories in this node's repair queue: records it could not place on their owners
    /// yet, which garbage collection waits for (its marks read repositories from their
    /// owners). Blobs still to be copied do not count: a mark lists every live origin's
    /// blobs, and a disk too full to take a copy must not stop the collection that frees it.
    async fn repair_pending(&self) -> Result<u64, NodeError>;

    /// The records for `keys` of `repo` (same order; `None` where the node has none).
    async fn records_get(&self, repo: &str, keys: &[RecordKey]) -> Result<Vec<Option<Record>>, NodeError>;

    /// Every record of one kind in `repo`, tombstones included; `subject` keeps only manifests
    /// that refer to it. `None` when the node has no record of the repository at all.
    async fn records_scan(
        &self,
        repo: &str,
        kind: RecordKind,
        subject: Option<&Digest>,
    ) -> Result<Option<Vec<Record>>, NodeError>;

    /// One page of [`Node::records_scan`], for the internal API. Nodes that hold their
    /// records in memory (tests) answer everything in one page, `after` or not, as origins of
    /// releases before paging do: callers drop what a page repeats.
    async fn records_page(
        &self,
        repo: &str,
        kind: RecordKind,
        subject: Option<&Digest>,
        _page: &ScanPage,
    ) -> Result<Option<RecordPage>, NodeError> {
        Ok(self.records_scan(repo, kind, subject).await?.map(|records| RecordPage { records, more: false }))
    }

    /// Merge records into `repo`: each replaces the stored one only if its version is newer.
    async fn records_apply(&self, repo: &str, records: &[Record]) -> Result<(), NodeError>;

    /// [`records_apply`](Self::records_apply) that commits nothing past `deadline`, on the
    /// node that stores them (a caller's timeout only stops its waiting): a write that relies
    /// on links read must land within garbage collection's deadline of the read or not at
    /// all (`cluster::gc::READ_TO_WRITE_DEADLINE`). This default checks around the apply.
    async fn records_apply_by(
        &self,
        repo: &str,
        records: &[Record],
        deadline: std::time::Instant,
    ) -> Result<(), NodeError> {
        let late =
            || NodeError::Unreachable { node: self.id().to_string(), reason: "deadline passed".into() };
        if std::time::Instant::now() >= deadline {
            return Err(late());
        }
        self.records_apply(repo, records).await
    }

    /// Forget exactly these records of `repo` (key and version; after its owners confirmed
    /// their copies): a record that changed since is kept, as is the repository if any record
    /// remains.
    async fn records_forget(&self, repo: &str, confirmed: &[Record]) -> Result<(), NodeError>;

    /// Repository names this node holds records for, in order, after `after`, at most `limit`.
    async fn repos(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, NodeError>;

    /// The blob's metainfo JSON (piece length and chaining values) if this node holds the blob.
    async fn metainfo(&self, digest: &Digest) -> Result<Option<bytes::Bytes>, NodeError>;
}
