//! A store for the router's tests: nothing in it, every read "unknown", writes accepted
//! and dropped.

use async_trait::async_trait;

use crate::manifest::ReferrerDescriptor;
use crate::range::ByteRange;
use crate::store::{NewManifest, Page, Reference, StoredManifest, UploadState};
use crate::{ByteStream, Digest, RegistryStore, RepoName, StoreError, Tag};

/// A store with nothing in it: every read is "unknown", every write refused.
pub(super) struct Empty;

#[async_trait]
impl RegistryStore for Empty {
    async fn blob_size(&self, _: &RepoName, _: &Digest) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
    async fn blob_read(
        &self,
        _: &RepoName,
        _: &Digest,
        _: Option<ByteRange>,
    ) -> Result<ByteStream, StoreError> {
        Err(StoreError::BlobUnknown)
    }
    async fn blob_delete(&self, _: &RepoName, _: &Digest) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// A source repository named `down/...` cannot be read (its owners are down).
    async fn blob_mount(&self, _: &RepoName, from: &RepoName, _: &Digest) -> Result<bool, StoreError> {
        if from.as_str().starts_with("down/") {
            return Err(StoreError::Unavailable("the source's owners are down".into()));
        }
        Ok(false)
    }
    async fn upload_start(&self, _: &RepoName) -> Result<UploadState, StoreError> {
        Ok(UploadState { id: "u".into(), offset: 0 })
    }
    async fn upload_status(&self, _: &RepoName, _: &str) -> Result<UploadState, StoreError> {
        Err(StoreError::UploadUnknown)
    }
    async fn upload_append(
        &self,
        _: &RepoName,
        _: &str,
        _: Option<u64>,
        _: Option<u64>,
        _: ByteStream,
    ) -> Result<UploadState, StoreError> {
        Err(StoreError::UploadUnknown)
    }
    async fn upload_commit(
        &self,
        _: &RepoName,
        _: &str,
        _: &Digest,
        _: Option<u64>,
    ) -> Result<u64, StoreError> {
        Err(StoreError::UploadUnknown)
    }
    async fn upload_cancel(&self, _: &RepoName, _: &str) -> Result<(), StoreError> {
        Err(StoreError::UploadUnknown)
    }
    async fn manifest_get(&self, _: &RepoName, _: &Reference) -> Result<Option<StoredManifest>, StoreError> {
        Ok(None)
    }
    async fn manifest_put(&self, _: &RepoName, _: Option<&Tag>, _: NewManifest) -> Result<(), StoreError> {
        Ok(())
    }
    async fn manifest_delete(&self, _: &RepoName, _: &Reference) -> Result<bool, StoreError> {
        Ok(false)
    }
    async fn tags(&self, _: &RepoName, _: Option<&str>, _: usize) -> Result<Page, StoreError> {
        Err(StoreError::NameUnknown)
    }
    async fn repositories(&self, _: Option<&str>, _: usize) -> Result<Page, StoreError> {
        Ok(Page { items: vec!["private/app".into(), "public/app".into()], next: None })
    }
    async fn referrers(&self, _: &RepoName, _: &Digest) -> Result<Vec<ReferrerDescriptor>, StoreError> {
        Ok(Vec::new())
    }
}
