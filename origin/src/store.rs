//! [`OriginStore`]: what one origin keeps on its own disk: upload sessions, blob files and
//! the repository records it holds. Blob files are immutable and content-addressed; a blob
//! becomes visible only when its metadata transaction commits, after the file is fsynced and
//! renamed into place. The cluster layer (`cluster::store`) builds the registry on top.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shoal_registry::range::ByteRange;
use shoal_registry::store::file_range_stream;
use shoal_registry::{ByteStream, Digest, StoreError};

use crate::cluster::node::{BlobEntry, Holding, RecordPage, ScanPage};
use crate::cluster::record::{Record, RecordKey, RecordKind};
use crate::fsutil;
use crate::layout::Layout;
use crate::meta::Meta;
use crate::uploads::{self, Session, Sessions};

mod sessions;
use sessions::expire_sessions;
pub use sessions::{upload_home, Opener};

/// Settings of the origin store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    /// An upload session untouched this long is discarded.
    pub upload_idle_timeout: Duration,
    /// Upload sessions open at once; more get `TooManyUploads` (each holds a file and disk).
    pub max_upload_sessions: usize,
}

/// Default cap on open upload sessions: far above what a CI fleet keeps open, low enough
/// that a misbehaving client cannot exhaust file handles and disk with empty sessions.
pub const DEFAULT_MAX_UPLOAD_SESSIONS: usize = 10_000;

pub(crate) struct Inner {
    pub(crate) layout: Layout,
    pub(crate) meta: Meta,
    sessions: Sessions,
    blob_bytes: AtomicU64,
    config: StoreConfig,
    /// Held (on blocking threads only, never across an await) while a blob file and its
    /// metadata change together: publish, remove, quarantine, restore, purge. Without it a
    /// publish that reuses an existing file could interleave with its removal.
    blob_files: std::sync::Mutex<()>,
    /// One metainfo computation per blob at a time (see `seeding.rs`).
    pub(crate) hashing: crate::seeding::Hashing,
}

/// The origin's storage: blob files plus redb metadata under one data directory.
#[derive(Clone)]
pub struct OriginStore {
    pub(crate) inner: Arc<Inner>,
}

/// An [`OriginStore`] that may have closed.
pub struct WeakOriginStore(Weak<Inner>);

impl WeakOriginStore {
    pub fn upgrade(&self) -> Option<OriginStore> {
        self.0.upgrade().map(|inner| OriginStore { inner })
    }
}

/// Run blocking work (redb, file system) off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::Internal(format!("blocking task: {e}")))?
}

/// Run `work` in a task of its own, to its end, even if the caller is dropped (its client
/// gone, a forwarding origin giving up): a write stopped halfway left a session's offset, a
/// scratch file or a record disagreeing with the disk. `what` names it in a join error.
pub(crate) async fn to_the_end<T: Send + 'static>(
    what: &'static str,
    work: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::spawn(work).await.map_err(|e| StoreError::Internal(format!("{what} task: {e}")))?
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl OriginStore {
    /// Open the data directory, recovering from whatever state a crash left, and start the
    /// expiry of idle upload sessions.
    pub async fn open(config: StoreConfig) -> Result<OriginStore, StoreError> {
        let layout = Layout::new(&config.data_dir);
        let (meta, sessions, blob_bytes) = {
            let layout = layout.clone();
            blocking(move || {
                let (meta, sessions) = crate::recovery::recover(&layout)?;
                let bytes = meta.total_blob_bytes()?;
                Ok((meta, sessions, bytes))
            })
            .await?
        };
        let blob_bytes = AtomicU64::new(blob_bytes);
        let inner = Arc::new(Inner {
            layout,
            meta,
            sessions,
            blob_bytes,
            config,
            blob_files: std::sync::Mutex::new(()),
            hashing: Default::default(),
        });
        tokio::spawn(expire_sessions(Arc::downgrade(&inner)));
        Ok(OriginStore { inner })
    }

    /// A handle that does not keep the store open (for background gauges).
    pub fn downgrade(&self) -> WeakOriginStore {
        WeakOriginStore(Arc::downgrade(&self.inner))
    }

    /// Bytes of blob content stored, for the storage metric.
    pub fn stored_bytes(&self) -> u64 {
        self.inner.blob_bytes.load(Ordering::Relaxed)
    }
}

/// Publishing verified files into the blob store (uploads and copies from other origins).
impl OriginStore {
    /// fsync a verified file, rename it into the blob store and record it; `true` if the blob
    /// is new here. Metainfo is left to the caller: a copy about to move to its owners does
    /// not need it.
    ///
    /// On failure `src` is either back where it was (the record could not be committed: a
    /// full disk; nothing of it stays in the blob store, where no record would ever count or
    /// collect it) or removed (its fsync failed: Linux reports a failed writeback once, so a
    /// later fsync of the same bytes would pass without them being on disk).
    async fn publish(
        &self,
        src: PathBuf,
        digest: &Digest,
        size: u64,
        upload: Option<String>,
    ) -> Result<bool, StoreError> {
        let inner = self.inner.clone();
        let d = digest.clone();
        let new = blocking(move || {
            let dest = inner.layout.blob(&d);
            if let Err(e) = std::fs::File::open(&src).and_then(|f| f.sync_all()) {
                let _ = std::fs::remove_file(&src);
                return Err(StoreError::from_io(e));
            }
            let _files = inner.lock_blob_files();
            let moved = fsutil::publish(&src, &dest).map_err(StoreError::from_io)?;
            let committed = inner.meta.commit_blob(&d, size, upload.as_deref());
            match (&committed, moved) {
                (Err(_), true) => {
                    if let Err(e) = std::fs::rename(&dest, &src) {
                        tracing::warn!(digest = %d, error = %e, "could not take back an unrecorded blob file");
                    }
                }
                (Ok(_), false) => {
                    let _ = std::fs::remove_file(&src);
                }
                _ => {}
            }
            committed
        })
        .await?;
        if new {
            self.inner.blob_bytes.fetch_add(size, Ordering::Relaxed);
        }
        Ok(new)
    }
}

/// The blob files this origin holds, content-addressed and shared by every repository.
impl OriginStore {
    /// Where a blob's file lives (whether or not it is here).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.inner.layout.blob(digest)
    }

    /// Size of the blob's file if this origin holds it. A blob in quarantine is brought back:
    /// whoever asks for it (a read through a live link, a copy being placed) needs it.
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let inner = self.inner.clone();
        let d = digest.clone();
        // Read without the blob files' lock: a blob neither held nor quarantined (every copy
        // being placed asks first) waited behind every publish's fsync for nothing.
        let (size, quarantined) = blocking(move || inner.meta.blob_or_quarantined(&d)).await?;
        if size.is_some() || !quarantined {
            return Ok(size);
        }
        // Brought back by this call or by another one meanwhile: it is here either way.
        self.blob_restore(digest).await?;
        let inner = self.inner.clone();
        let d = digest.clone();
        blocking(move || inner.meta.blob_size(&d)).await
    }

    /// Whether this origin holds the blob, or holds it in quarantine, without bringing it
    /// back (see [`crate::cluster::node::Node::blob_peek`]).
    pub async fn blob_holding(&self, digest: &Digest) -> Result<Holding, StoreError> {
        let inner = self.inner.clone();
        let d = digest.clone();
        let (size, quarantined) = blocking(move || inner.meta.blob_or_quarantined(&d)).await?;
        Ok(match size {
            Some(size) => Holding::Held(size),
            None if quarantined => Holding::Quarantined,
            None => Holding::Absent,
        })
    }

    /// The blob's bytes (a range of them) if this origin holds it.
    pub async fn blob_read(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>, StoreError> {
        let Some(size) = self.blob_size(digest).await? else { return Ok(None) };
        let range = range.unwrap_or(ByteRange { start: 0, end: size.saturating_sub(1) });
        match file_range_stream(&self.inner.layout.blob(digest), range, size).await {
            Ok(stream) => Ok(Some(stream)),
            // Removed between the lookup and the open (garbage collection, repair).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::from_io(e)),
        }
    }

    /// Store a blob sent by another origin: written to scratch space while hashed, checked
    /// against `digest` and `size`, then published like a committed upload. The copy runs
    /// in a task of its own, to its end (the body's end or error): dropped with its request
    /// (a sender that gave up and closed the connection), it left its scratch file behind
    /// until the next start, one per retry.
    pub async fn blob_put(&self, digest: &Digest, size: u64, body: ByteStream) -> Result<(), StoreError> {
        if self.blob_size(digest).await?.is_some() {
            // Content addressing: the copy here is already this content. Drain nothing; the
            // sender sees success and stops.
            return Ok(());
        }
        let (store, digest) = (self.clone(), digest.clone());
        to_the_end("blob copy", async move { store.blob_copy_in(&digest, size, body).await }).await
    }

    async fn blob_copy_in(&self, digest: &Digest, size: u64, body: ByteStream) -> Result<(), StoreError> {
        let path = self.inner.layout.tmp().join(uuid::Uuid::new_v4().to_string());
        {
            let path = path.clone();
            blocking(move || std::fs::File::create(&path).map(|_| ()).map_err(StoreError::from_io)).await?;
        }
        let mut session = Session {
            repo: "shoal/replica".parse().map_err(|_| StoreError::Internal("replica repo name".into()))?,
            path: path.clone(),
            offset: 0,
            hasher: Some(digest.algorithm().hasher()),
            touched: Instant::now(),
            ended: false,
        };
        let result = async {
            uploads::append(&mut session, Some(0), Some(size), body).await?;
            let actual = uploads::digest_of(&session, digest.algorithm()).await?;
            if &actual != digest {
                return Err(StoreError::DigestMismatch { expected: digest.clone(), actual });
            }
            if self.publish(path.clone(), digest, size, None).await? {
                // A replica is kept to be seeded: hash its pieces now, not at the first pull.
                self.precompute_metainfo(digest);
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&path).await;
        }
        result
    }

    /// Drop this origin's copy of a blob; `false` if it had none.
    pub async fn blob_remove(&self, digest: &Digest) -> Result<bool, StoreError> {
        let inner = self.inner.clone();
        let digest = digest.clone();
        let removed = blocking(move || {
            let _files = inner.lock_blob_files();
            let Some(size) = inner.meta.remove_blob(&digest)? else { return Ok(None) };
            let path = inner.layout.blob(&digest);
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(StoreError::from_io(e)),
                _ => {}
            }
            if let Some(parent) = path.parent() {
                fsutil::sync_dir(parent).map_err(StoreError::from_io)?;
            }
            Ok(Some(size))
        })
        .await?;
        if let Some(size) = removed {
            self.inner.blob_bytes.fetch_sub(size.min(self.stored_bytes()), Ordering::Relaxed);
        }
        Ok(removed.is_some())
    }

    /// Set this origin's copy of a blob aside (garbage collection's first step): it is no
    /// longer listed or served, but comes back if anything asks for it (`blob_size`), until a
    /// later [`OriginStore::blob_purge`]. `false` if this origin had no copy.
    pub async fn blob_quarantine(&self, digest: &Digest) -> Result<bool, StoreError> {
        let inner = self.inner.clone();
        let digest = digest.clone();
        let moved = blocking(move || {
            let _files = inner.lock_blob_files();
            let Some(size) = inner.meta.quarantine_blob(&digest)? else { return Ok(None) };
            let (from, to) = (inner.layout.blob(&digest), inner.layout.quarantined(&digest));
            match std::fs::rename(&from, &to) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(StoreError::from_io(e)),
                _ => {}
            }
            fsutil::sync_dir(&inner.layout.quarantine()).map_err(StoreError::from_io)?;
            if let Some(parent) = from.parent() {
                fsutil::sync_dir(parent).map_err(StoreError::from_io)?;
            }
            Ok(Some(size))
        })
        .await?;
        if let Some(size) = moved {
            self.inner.blob_bytes.fetch_sub(size.min(self.stored_bytes()), Ordering::Relaxed);
        }
        Ok(moved.is_some())
    }

    /// Bring a quarantined blob back (its file to its place, its entry young again); `true` if
    /// it was quarantined here.
    pub async fn blob_restore(&self, digest: &Digest) -> Result<bool, StoreError> {
        let inner = self.inner.clone();
        let d = digest.clone();
        let restored = blocking(move || {
            let _files = inner.lock_blob_files();
            if inner.meta.quarantined(&d)?.is_none() {
                return Ok(None);
            }
            let (from, to) = (inner.layout.quarantined(&d), inner.layout.blob(&d));
            if inner.meta.blob_size(&d)?.is_some() {
                // A new copy was published meanwhile: the set-aside one is not needed.
                remove_if_present(&from)?;
            } else {
                if let Some(parent) = to.parent() {
                    shoal_registry::durable::create_dir_all(parent).map_err(StoreError::from_io)?;
                }
                match std::fs::rename(&from, &to) {
                    // A crash between the quarantine's metadata and its rename leaves the file
                    // where it was.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && to.exists() => {}
                    Err(e) => return Err(StoreError::from_io(e)),
                    Ok(()) => {}
                }
                if let Some(parent) = to.parent() {
                    fsutil::sync_dir(parent).map_err(StoreError::from_io)?;
                }
            }
            let had = inner.meta.blob_size(&d)?.is_some();
            let size = inner.meta.unquarantine_blob(&d)?;
            Ok(size.map(|s| if had { 0 } else { s }))
        })
        .await?;
        if let Some(size) = restored {
            self.inner.blob_bytes.fetch_add(size, Ordering::Relaxed);
            tracing::info!(%digest, "blob brought back from quarantine");
        }
        Ok(restored.is_some())
    }

    /// Delete a quarantined blob for good if it was set aside exactly at `since`; returns its
    /// size if it was deleted.
    pub async fn blob_purge(&self, digest: &Digest, since: u64) -> Result<Option<u64>, StoreError> {
        let inner = self.inner.clone();
        let digest = digest.clone();
        blocking(move || {
            let _files = inner.lock_blob_files();
            let Some(size) = inner.meta.purge_quarantined(&digest, since)? else { return Ok(None) };
            remove_if_present(&inner.layout.quarantined(&digest))?;
            if inner.meta.blob_size(&digest)?.is_none() {
                // A crash may have left the file in place when its entry moved.
                remove_if_present(&inner.layout.blob(&digest))?;
            }
            Ok(Some(size))
        })
        .await
    }

    /// Quarantined blobs in digest order; `stored_millis` is when each was set aside.
    pub async fn quarantine_list(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<BlobEntry>, StoreError> {
        let inner = self.inner.clone();
        let after = after.cloned();
        blocking(move || inner.meta.quarantine_list(after.as_ref(), limit)).await
    }

    /// Blob files held here, in digest order.
    pub async fn blob_list(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<BlobEntry>, StoreError> {
        let inner = self.inner.clone();
        let after = after.cloned();
        blocking(move || inner.meta.blob_list(after.as_ref(), limit)).await
    }
}

/// The repository records this origin holds (see `cluster::record`).
impl OriginStore {
    pub async fn records_get(
        &self,
        repo: &str,
        keys: &[RecordKey],
    ) -> Result<Vec<Option<Record>>, StoreError> {
        let inner = self.inner.clone();
        let (repo, keys) = (repo.to_string(), keys.to_vec());
        blocking(move || inner.meta.records_get(&repo, &keys)).await
    }

    pub async fn records_scan(
        &self,
        repo: &str,
        kind: RecordKind,
        subject: Option<&Digest>,
    ) -> Result<Option<Vec<Record>>, StoreError> {
        Ok(self.records_page(repo, kind, subject, &ScanPage::ALL).await?.map(|page| page.records))
    }

    /// One page of [`OriginStore::records_scan`] (see [`Meta::records_page`]).
    pub async fn records_page(
        &self,
        repo: &str,
        kind: RecordKind,
        subject: Option<&Digest>,
        page: &ScanPage,
    ) -> Result<Option<RecordPage>, StoreError> {
        let inner = self.inner.clone();
        let (repo, subject, page) = (repo.to_string(), subject.cloned(), page.clone());
        blocking(move || inner.meta.records_page(&repo, kind, subject.as_ref(), &page)).await
    }

    pub async fn records_apply(&self, repo: &str, records: &[Record]) -> Result<usize, StoreError> {
        self.records_apply_by(repo, records, None).await
    }

    /// [`records_apply`](Self::records_apply), committing nothing past `deadline`.
    pub async fn records_apply_by(
        &self,
        repo: &str,
        records: &[Record],
        deadline: Option<Instant>,
    ) -> Result<usize, StoreError> {
        let inner = self.inner.clone();
        let (repo, records) = (repo.to_string(), records.to_vec());
        blocking(move || inner.meta.records_apply_by(&repo, &records, deadline)).await
    }

    pub async fn records_forget(&self, repo: &str, confirmed: &[Record]) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        let (repo, confirmed) = (repo.to_string(), confirmed.to_vec());
        blocking(move || inner.meta.records_forget(&repo, &confirmed)).await
    }

    pub async fn repos(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        let inner = self.inner.clone();
        let after = after.map(str::to_string);
        blocking(move || inner.meta.repos(after.as_deref(), limit)).await
    }
}

/// The persistent queue of items whose copies a write could not place (see `cluster::repair`).
impl OriginStore {
    pub async fn repair_enqueue(&self, item: String) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        blocking(move || inner.meta.repair_enqueue(&item)).await
    }

    pub async fn repair_pending(&self, limit: usize) -> Result<Vec<(String, u64)>, StoreError> {
        let inner = self.inner.clone();
        blocking(move || inner.meta.repair_pending(limit)).await
    }

    pub async fn repair_len(&self) -> Result<u64, StoreError> {
        let inner = self.inner.clone();
        blocking(move || inner.meta.repair_len()).await
    }

    /// Repositories queued for repair (see [`crate::cluster::node::Node::repair_pending`]).
    pub async fn repair_repos_len(&self) -> Result<u64, StoreError> {
        let inner = self.inner.clone();
        blocking(move || inner.meta.repair_repos_len()).await
    }

    pub async fn repair_done(&self, item: String, ticket: u64) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        blocking(move || inner.meta.repair_done(&item, ticket)).await
    }
}

impl Inner {
    /// The blob-files lock; a panic elsewhere while holding it leaves nothing half-done that
    /// the next holder could not handle, so a poisoned lock is taken as is.
    fn lock_blob_files(&self) -> std::sync::MutexGuard<'_, ()> {
        self.blob_files.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Remove a file, and sync its directory; a file already gone is fine.
fn remove_if_present(path: &std::path::Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::from_io(e)),
        _ => {
            if let Some(parent) = path.parent() {
                fsutil::sync_dir(parent).map_err(StoreError::from_io)?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
