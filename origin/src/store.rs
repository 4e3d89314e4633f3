//! [`OriginStore`]: the origin's durable implementation of the registry storage interface.
//! Blob files are immutable and content-addressed; a blob becomes visible only when its
//! metadata transaction commits, after the file is fsynced and renamed into place.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use shoal_registry::manifest::ReferrerDescriptor;
use shoal_registry::range::ByteRange;
use shoal_registry::store::{file_range_stream, NewManifest, Page, Reference, StoredManifest, UploadState};
use shoal_registry::{Algorithm, ByteStream, Digest, RegistryStore, RepoName, StoreError, Tag};

use crate::fsutil;
use crate::layout::Layout;
use crate::meta::{ManifestInsert, ManifestRecord, Meta, UploadRecord};
use crate::uploads::{self, Session, Sessions};

/// Settings of the origin store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    /// An upload session untouched this long is discarded.
    pub upload_idle_timeout: Duration,
}

pub(crate) struct Inner {
    pub(crate) layout: Layout,
    pub(crate) meta: Meta,
    sessions: Sessions,
    blob_bytes: AtomicU64,
    config: StoreConfig,
}

/// The origin's storage: blob files plus redb metadata under one data directory.
#[derive(Clone)]
pub struct OriginStore {
    pub(crate) inner: Arc<Inner>,
}

/// Run blocking work (redb, file system) off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::Internal(format!("blocking task: {e}")))?
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl OriginStore {
    /// Open the data directory, recovering from whatever state a crash left, and start the
    /// expiry of idle upload sessions.
    pub async fn open(config: StoreConfig) -> Result<OriginStore, StoreError> {
        let layout = Layout::new(&config.data_dir);
        let (meta, sessions) = {
            let layout = layout.clone();
            blocking(move || crate::recovery::recover(&layout)).await?
        };
        let blob_bytes = AtomicU64::new(meta.total_blob_bytes()?);
        let inner = Arc::new(Inner { layout, meta, sessions, blob_bytes, config });
        tokio::spawn(expire_sessions(Arc::downgrade(&inner)));
        Ok(OriginStore { inner })
    }

    /// Bytes of blob content stored, for the storage metric.
    pub fn stored_bytes(&self) -> u64 {
        self.inner.blob_bytes.load(Ordering::Relaxed)
    }

    fn session(&self, repo: &RepoName, id: &str) -> Result<Arc<tokio::sync::Mutex<Session>>, StoreError> {
        let session = self.inner.sessions.get(id).ok_or(StoreError::UploadUnknown)?;
        // A session is only reachable through the repository it was opened on.
        let same_repo = session.try_lock().map(|s| &s.repo == repo).unwrap_or(true);
        if !same_repo {
            return Err(StoreError::UploadUnknown);
        }
        Ok(session)
    }

    async fn discard_session(&self, id: &str) -> Result<(), StoreError> {
        self.inner.sessions.remove(id);
        let inner = self.inner.clone();
        let id = id.to_string();
        blocking(move || {
            inner.meta.remove_upload(&id)?;
            match std::fs::remove_file(inner.layout.upload(&id)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::from_io(e)),
                _ => Ok(()),
            }
        })
        .await
    }
}

/// Periodically drop sessions idle past the configured timeout; ends with the store.
async fn expire_sessions(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let idle = strong.config.upload_idle_timeout;
        let period = (idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(60));
        let store = OriginStore { inner: strong };
        for id in store.inner.sessions.expired(idle) {
            tracing::info!(upload = %id, "upload session expired");
            if let Err(e) = store.discard_session(&id).await {
                tracing::warn!(upload = %id, error = %e, "could not discard expired upload");
            }
        }
        drop(store);
        tokio::time::sleep(period).await;
    }
}

#[async_trait]
impl RegistryStore for OriginStore {
    async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let inner = self.inner.clone();
        let (repo, digest) = (repo.to_string(), digest.clone());
        blocking(move || inner.meta.linked_size(&repo, &digest)).await
    }

    async fn blob_read(
        &self,
        repo: &RepoName,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<ByteStream, StoreError> {
        let size = self.blob_size(repo, digest).await?.ok_or(StoreError::BlobUnknown)?;
        let range = range.unwrap_or(ByteRange { start: 0, end: size.saturating_sub(1) });
        file_range_stream(&self.inner.layout.blob(digest), range, size).await.map_err(StoreError::from_io)
    }

    async fn blob_delete(&self, repo: &RepoName, digest: &Digest) -> Result<bool, StoreError> {
        let inner = self.inner.clone();
        let (repo, digest) = (repo.to_string(), digest.clone());
        blocking(move || inner.meta.unlink_blob(&repo, &digest)).await
    }

    async fn blob_mount(
        &self,
        repo: &RepoName,
        from: &RepoName,
        digest: &Digest,
    ) -> Result<bool, StoreError> {
        let inner = self.inner.clone();
        let (repo, from, digest) = (repo.to_string(), from.to_string(), digest.clone());
        blocking(move || inner.meta.mount(&repo, &from, &digest)).await
    }

    async fn upload_start(&self, repo: &RepoName) -> Result<UploadState, StoreError> {
        let id = uuid::Uuid::new_v4().to_string();
        let path = self.inner.layout.upload(&id);
        let inner = self.inner.clone();
        let record = UploadRecord { repo: repo.to_string(), created: now_unix() };
        {
            let (id, path) = (id.clone(), path.clone());
            blocking(move || {
                std::fs::File::create(&path).map_err(StoreError::from_io)?;
                inner.meta.add_upload(&id, &record)
            })
            .await?;
        }
        let session = Session {
            repo: repo.clone(),
            path,
            offset: 0,
            hasher: Some(Algorithm::Sha256.hasher()),
            touched: Instant::now(),
        };
        self.inner.sessions.insert(id.clone(), session);
        Ok(UploadState { id, offset: 0 })
    }

    async fn upload_status(&self, repo: &RepoName, id: &str) -> Result<UploadState, StoreError> {
        let session = self.session(repo, id)?;
        let session = session.lock().await;
        Ok(UploadState { id: id.to_string(), offset: session.offset })
    }

    async fn upload_append(
        &self,
        repo: &RepoName,
        id: &str,
        start: Option<u64>,
        len: Option<u64>,
        body: ByteStream,
    ) -> Result<UploadState, StoreError> {
        let session = self.session(repo, id)?;
        let mut session = session.lock().await;
        uploads::append(&mut session, start, len, body).await?;
        Ok(UploadState { id: id.to_string(), offset: session.offset })
    }

    async fn upload_complete(&self, repo: &RepoName, id: &str, digest: &Digest) -> Result<u64, StoreError> {
        let session = self.session(repo, id)?;
        let session = session.lock().await;
        let actual = uploads::digest_of(&session, digest.algorithm()).await?;
        if &actual != digest {
            drop(session);
            self.discard_session(id).await?;
            return Err(StoreError::DigestMismatch { expected: digest.clone(), actual });
        }
        let size = session.offset;
        let inner = self.inner.clone();
        let (repo_s, id_s, digest_c, src) =
            (repo.to_string(), id.to_string(), digest.clone(), session.path.clone());
        let new = blocking(move || {
            let dest = inner.layout.blob(&digest_c);
            std::fs::File::open(&src).and_then(|f| f.sync_all()).map_err(StoreError::from_io)?;
            fsutil::publish(&src, &dest).map_err(StoreError::from_io)?;
            inner.meta.commit_blob(&repo_s, &digest_c, size, Some(&id_s))
        })
        .await?;
        if new {
            self.inner.blob_bytes.fetch_add(size, Ordering::Relaxed);
            self.precompute_metainfo(digest);
        }
        drop(session);
        self.inner.sessions.remove(id);
        Ok(size)
    }

    async fn upload_cancel(&self, repo: &RepoName, id: &str) -> Result<(), StoreError> {
        let session = self.session(repo, id)?;
        let guard = session.lock().await;
        drop(guard);
        self.discard_session(id).await
    }

    async fn manifest_get(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<StoredManifest>, StoreError> {
        let inner = self.inner.clone();
        let repo = repo.to_string();
        let reference = reference.clone();
        blocking(move || {
            let digest = match reference {
                Reference::Digest(d) => d,
                Reference::Tag(t) => match inner.meta.tag(&repo, t.as_str())? {
                    Some(d) => d,
                    None => return Ok(None),
                },
            };
            let Some(record) = inner.meta.manifest(&repo, &digest)? else { return Ok(None) };
            let bytes = std::fs::read(inner.layout.blob(&digest)).map_err(StoreError::from_io)?;
            Ok(Some(StoredManifest { digest, media_type: record.media_type, bytes: bytes.into() }))
        })
        .await
    }

    async fn manifest_put(
        &self,
        repo: &RepoName,
        tag: Option<&Tag>,
        manifest: NewManifest,
    ) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        let repo = repo.to_string();
        let tag = tag.map(|t| t.to_string());
        let size = manifest.bytes.len() as u64;
        blocking(move || {
            let NewManifest { digest, bytes, parsed } = manifest;
            let dest = inner.layout.blob(&digest);
            let existed = dest.exists();
            fsutil::write_atomic(&inner.layout.tmp(), &dest, &bytes).map_err(StoreError::from_io)?;
            let referrer = parsed.subject.as_ref().map(|_| parsed.referrer_descriptor(&digest, size));
            inner.meta.put_manifest(ManifestInsert {
                repo: &repo,
                digest: &digest,
                record: ManifestRecord {
                    media_type: parsed.media_type.clone(),
                    size,
                    subject: parsed.subject.clone(),
                },
                blobs: &parsed.blobs,
                children: &parsed.children,
                tag: tag.as_deref(),
                referrer,
            })?;
            if !existed {
                inner.blob_bytes.fetch_add(size, Ordering::Relaxed);
            }
            Ok(())
        })
        .await
    }

    async fn manifest_delete(&self, repo: &RepoName, reference: &Reference) -> Result<bool, StoreError> {
        let inner = self.inner.clone();
        let repo = repo.to_string();
        let reference = reference.clone();
        blocking(move || match reference {
            Reference::Digest(d) => inner.meta.delete_manifest(&repo, &d),
            Reference::Tag(t) => inner.meta.delete_tag(&repo, t.as_str()),
        })
        .await
    }

    async fn tags(&self, repo: &RepoName, last: Option<&str>, limit: usize) -> Result<Page, StoreError> {
        let inner = self.inner.clone();
        let (repo, last) = (repo.to_string(), last.map(str::to_string));
        blocking(move || inner.meta.tags(&repo, last.as_deref(), limit)).await
    }

    async fn repositories(&self, last: Option<&str>, limit: usize) -> Result<Page, StoreError> {
        let inner = self.inner.clone();
        let last = last.map(str::to_string);
        blocking(move || inner.meta.repositories(last.as_deref(), limit)).await
    }

    async fn referrers(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Vec<ReferrerDescriptor>, StoreError> {
        let inner = self.inner.clone();
        let (repo, digest) = (repo.to_string(), digest.clone());
        blocking(move || inner.meta.referrers(&repo, &digest)).await
    }
}
