//! [`LocalNode`]: this origin's own storage seen as a cluster [`Node`], so the cluster logic
//! treats the local copy and the remote ones alike.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use shoal_registry::range::ByteRange;
use shoal_registry::{ByteStream, Digest, StoreError};

use crate::cluster::node::{BlobEntry, Holding, Node, NodeError, RecordPage, ScanPage};
use crate::cluster::record::{Record, RecordKey, RecordKind};
use crate::store::OriginStore;

/// This origin as a member of its cluster.
pub struct LocalNode {
    id: String,
    store: OriginStore,
}

impl LocalNode {
    pub fn new(id: impl Into<String>, store: OriginStore) -> Arc<LocalNode> {
        Arc::new(LocalNode { id: id.into(), store })
    }

    pub fn store(&self) -> &OriginStore {
        &self.store
    }

    fn err(&self, e: StoreError) -> NodeError {
        match e {
            StoreError::DigestMismatch { expected, .. } => NodeError::Corrupt(expected),
            StoreError::SizeMismatch { .. } => {
                NodeError::Refused { node: self.id.clone(), reason: e.to_string() }
            }
            StoreError::StorageFull => NodeError::StorageFull,
            other => NodeError::Storage { node: self.id.clone(), reason: other.to_string() },
        }
    }
}

#[async_trait]
impl Node for LocalNode {
    fn id(&self) -> &str {
        &self.id
    }

    async fn blob_stat(&self, digest: &Digest) -> Result<Option<u64>, NodeError> {
        self.store.blob_size(digest).await.map_err(|e| self.err(e))
    }

    async fn blob_peek(&self, digest: &Digest) -> Result<Holding, NodeError> {
        self.store.blob_holding(digest).await.map_err(|e| self.err(e))
    }

    async fn blob_get(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>, NodeError> {
        self.store.blob_read(digest, range).await.map_err(|e| self.err(e))
    }

    async fn blob_put(&self, digest: &Digest, size: u64, body: ByteStream) -> Result<(), NodeError> {
        match self.store.blob_put(digest, size, body).await {
            Err(StoreError::SizeMismatch { .. }) => Err(NodeError::Corrupt(digest.clone())),
            other => other.map_err(|e| self.err(e)),
        }
    }

    async fn blob_remove(&self, digest: &Digest) -> Result<bool, NodeError> {
        self.store.blob_remove(digest).await.map_err(|e| self.err(e))
    }

    async fn blob_list(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<BlobEntry>, NodeError> {
        self.store.blob_list(after, limit).await.map_err(|e| self.err(e))
    }

    async fn blob_quarantine(&self, digest: &Digest) -> Result<bool, NodeError> {
        self.store.blob_quarantine(digest).await.map_err(|e| self.err(e))
    }

    async fn blob_restore(&self, digest: &Digest) -> Result<bool, NodeError> {
        self.store.blob_restore(digest).await.map_err(|e| self.err(e))
    }

    async fn quarantine_list(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<BlobEntry>, NodeError> {
        self.store.quarantine_list(after, limit).await.map_err(|e| self.err(e))
    }

    async fn blob_purge(&self, digest: &Digest, since: u64) -> Result<Option<u64>, NodeError> {
        self.store.blob_purge(digest, since).await.map_err(|e| self.err(e))
    }

    async fn repair_pending(&self) -> Result<u64, NodeError> {
        self.store.repair_repos_len().await.map_err(|e| self.err(e))
    }

    async fn records_get(&self, repo: &str, keys: &[RecordKey]) -> Result<Vec<Option<Record>>, NodeError> {
        self.store.records_get(repo, keys).await.map_err(|e| self.err(e))
    }

    async fn records_scan(
        &self,
        repo: &str,
        kind: RecordKind,
        subject: Option<&Digest>,
    ) -> Result<Option<Vec<Record>>, NodeError> {
        self.store.records_scan(repo, kind, subject).await.map_err(|e| self.err(e))
    }

    async fn records_page(
        &self,
        repo: &str,
        kind: RecordKind,
        subject: Option<&Digest>,
        page: &ScanPage,
    ) -> Result<Option<RecordPage>, NodeError> {
        self.store.records_page(repo, kind, subject, page).await.map_err(|e| self.err(e))
    }

    async fn records_apply(&self, repo: &str, records: &[Record]) -> Result<(), NodeError> {
        self.store.records_apply(repo, records).await.map(|_| ()).map_err(|e| self.err(e))
    }

    async fn records_apply_by(
        &self,
        repo: &str,
        records: &[Record],
        deadline: std::time::Instant,
    ) -> Result<(), NodeError> {
        let applied = self.store.records_apply_by(repo, records, Some(deadline)).await;
        applied.map(|_| ()).map_err(|e| self.err(e))
    }

    async fn records_forget(&self, repo: &str, confirmed: &[Record]) -> Result<(), NodeError> {
        self.store.records_forget(repo, confirmed).await.map_err(|e| self.err(e))
    }

    async fn repos(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, NodeError> {
        self.store.repos(after, limit).await.map_err(|e| self.err(e))
    }

    async fn metainfo(&self, digest: &Digest) -> Result<Option<Bytes>, NodeError> {
        let m = self.store.metainfo(digest).await.map_err(|e| self.err(e))?;
        m.map(|m| serde_json::to_vec(&*m).map(Bytes::from))
            .transpose()
            .map_err(|e| NodeError::Storage { node: self.id.clone(), reason: e.to_string() })
    }
}
