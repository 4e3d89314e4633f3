//! Upload sessions: bytes from a client kept on the origin that opened the session, each
//! appended under its lock, published as a blob on the final `PUT`, ended when finished,
//! cancelled or idle past the configured timeout. Apart from `store.rs`, which holds the
//! blob files and records they end in.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use shoal_registry::store::UploadState;
use shoal_registry::{Algorithm, ByteStream, Digest, RepoName, StoreError};

use super::{blocking, now_unix, to_the_end, Inner, OriginStore};
use crate::meta::UploadRecord;
use crate::uploads::{self, Session};

/// Who opens an upload session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opener {
    /// A client's push: counted against `max_upload_sessions`.
    Client,
    /// This origin's own fetch of an upstream blob, capped by the fetches' own limit: clients
    /// that filled `max_upload_sessions` (a `POST` loop) failed every pull-through cache miss
    /// on the origin until their sessions expired.
    Fetch,
}

/// Upload sessions: bytes from the client, kept on the origin that opened the session.
impl OriginStore {
    fn session(&self, repo: &RepoName, id: &str) -> Result<Arc<tokio::sync::Mutex<Session>>, StoreError> {
        self.inner.sessions.get_in(repo, id).ok_or(StoreError::UploadUnknown)
    }

    /// Take a session out: its file first, then its record. A record left behind (the
    /// database failing: a full disk, a reopen under way) names a file that is gone, which
    /// recovery drops at the next start; the file left behind by the other order held its
    /// disk space, on the disk that was full, until a restart brought the session back.
    async fn discard_session(&self, id: &str) -> Result<(), StoreError> {
        self.inner.sessions.remove(id);
        let inner = self.inner.clone();
        let id = id.to_string();
        blocking(move || {
            match std::fs::remove_file(inner.layout.upload(&id)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(StoreError::from_io(e)),
                _ => {}
            }
            if let Err(e) = inner.meta.remove_upload(&id) {
                tracing::warn!(session = %id, error = %e, "an ended upload session's record stays until the next start");
            }
            Ok(())
        })
        .await
    }

    /// Open a session. `home` (this origin's cluster id) is written into the session id, so
    /// that any other origin that receives a request for the session knows where it lives.
    pub async fn upload_start(&self, repo: &RepoName, home: &str) -> Result<UploadState, StoreError> {
        self.upload_start_for(repo, home, Opener::Client).await
    }

    /// [`upload_start`](Self::upload_start) for `opener`: only clients' sessions count
    /// against `max_upload_sessions`.
    pub async fn upload_start_for(
        &self,
        repo: &RepoName,
        home: &str,
        opener: Opener,
    ) -> Result<UploadState, StoreError> {
        let max = match opener {
            Opener::Client => self.inner.config.max_upload_sessions,
            Opener::Fetch => usize::MAX,
        };
        // Counted from here to the insert: `POST`s at once all passed a check of the open
        // sessions alone, past the limit.
        let Some(_starting) = self.inner.sessions.reserve(max) else {
            return Err(StoreError::TooManyUploads(max));
        };
        let id = format!("{}.{}", uuid::Uuid::new_v4(), hex::encode(home));
        let path = self.inner.layout.upload(&id);
        let inner = self.inner.clone();
        let record = UploadRecord { repo: repo.to_string(), created: now_unix() };
        let repo = repo.clone();
        // In a task of its own: a request dropped while the file and record are made (the
        // client gone) still ends with the session open (it expires when idle), never with a
        // file and record and no session, which a restart brought back as a live session.
        to_the_end("upload start", async move {
            {
                let (inner, id, path) = (inner.clone(), id.clone(), path.clone());
                blocking(move || {
                    std::fs::File::create(&path).map_err(StoreError::from_io)?;
                    // Without its record the file is no session's: removed, not left to a restart.
                    inner.meta.add_upload(&id, &record).inspect_err(|_| {
                        let _ = std::fs::remove_file(&path);
                    })
                })
                .await?;
            }
            let session = Session {
                repo,
                path,
                offset: 0,
                hasher: Some(Algorithm::Sha256.hasher()),
                touched: Instant::now(),
                ended: false,
            };
            inner.sessions.insert(id.clone(), session);
            Ok(UploadState { id, offset: 0 })
        })
        .await
    }

    /// The file an upload session's bytes go to (a pull-through fetch streams it to its first
    /// readers while it grows).
    pub fn upload_path(&self, id: &str) -> PathBuf {
        self.inner.layout.upload(id)
    }

    pub async fn upload_status(&self, repo: &RepoName, id: &str) -> Result<UploadState, StoreError> {
        let session = self.session(repo, id)?;
        let session = live(session.lock().await)?;
        Ok(UploadState { id: id.to_string(), offset: session.offset })
    }

    /// Append a chunk; see `RegistryStore::upload_append` for the contract. The append runs
    /// in a task of its own, to its end, even if the request is dropped (its client gone, or
    /// a forwarding origin giving up): dropped halfway, the session kept its old offset while
    /// the file had grown, and the blob came out corrupt.
    pub async fn upload_append(
        &self,
        repo: &RepoName,
        id: &str,
        start: Option<u64>,
        len: Option<u64>,
        body: ByteStream,
    ) -> Result<UploadState, StoreError> {
        let session = self.session(repo, id)?;
        let id = id.to_string();
        to_the_end("upload", async move {
            let mut session = live(session.lock_owned().await)?;
            uploads::append(&mut session, start, len, body).await?;
            Ok(UploadState { id, offset: session.offset })
        })
        .await
    }

    /// Verify the session's content against `digest` and publish it as a blob file here; the
    /// session ends either way, unless the publish fails with its file whole (a full disk at
    /// the commit): then it is cut back to `body_from` if given (the final `PUT`'s body goes
    /// again with its retry). Returns the blob's size. The caller
    /// (`ClusterStore::upload_commit`) runs it in a task of its own, so a dropped request
    /// cannot stop it halfway.
    pub async fn upload_finish(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        body_from: Option<u64>,
    ) -> Result<u64, StoreError> {
        let session = self.session(repo, id)?;
        let mut session = live(session.lock().await)?;
        let actual = uploads::digest_of(&session, digest.algorithm()).await?;
        if &actual != digest {
            session.ended = true;
            drop(session);
            self.discard_session(id).await?;
            return Err(StoreError::DigestMismatch { expected: digest.clone(), actual });
        }
        let size = session.offset;
        if let Err(e) = self.publish(session.path.clone(), digest, size, Some(id.to_string())).await {
            // Still whole (a full disk at the commit): the client may retry the same `PUT`.
            // Gone (a failed fsync took the bytes with it): the upload is over.
            if !tokio::fs::try_exists(&session.path).await.unwrap_or(false) {
                session.ended = true;
                drop(session);
                let _ = self.discard_session(id).await;
            } else if let Some(offset) = body_from.filter(|&o| o < session.offset) {
                // The running hash covers the cut bytes: the retry's commit hashes the file.
                uploads::cut_back(&mut session, offset, None).await?;
            }
            return Err(e);
        }
        session.ended = true;
        drop(session);
        self.inner.sessions.finish(id, repo, digest, size);
        Ok(size)
    }

    /// The size of the blob session `id` of `repo` was published as, if it was `digest` and
    /// lately, and whether it was linked (see `Sessions::finished`): its final `PUT` is being
    /// retried.
    pub fn upload_finished(&self, repo: &RepoName, id: &str, digest: &Digest) -> Option<(u64, bool)> {
        self.inner.sessions.finished(repo, id, digest)
    }

    /// Finished session `id`'s blob was linked into its repository.
    pub fn upload_linked(&self, id: &str) {
        self.inner.sessions.linked(id)
    }

    pub async fn upload_cancel(&self, repo: &RepoName, id: &str) -> Result<(), StoreError> {
        let session = self.session(repo, id)?;
        let mut session = live(session.lock().await)?;
        session.ended = true;
        drop(session);
        self.discard_session(id).await
    }
}

/// A locked session, unless it has ended (expired, finished or cancelled) while the caller
/// waited for its lock.
fn live<S: std::ops::Deref<Target = Session>>(session: S) -> Result<S, StoreError> {
    if session.ended {
        return Err(StoreError::UploadUnknown);
    }
    Ok(session)
}

/// Periodically drop sessions idle past the configured timeout; ends with the store.
pub(super) async fn expire_sessions(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let idle = strong.config.upload_idle_timeout;
        let period = (idle.min(uploads::EMPTY_SESSION_IDLE) / 4)
            .clamp(Duration::from_millis(250), Duration::from_secs(60));
        let store = OriginStore { inner: strong };
        for id in store.inner.sessions.take_expired(idle, idle.min(uploads::EMPTY_SESSION_IDLE)) {
            tracing::info!(upload = %id, "upload session expired");
            if let Err(e) = store.discard_session(&id).await {
                tracing::warn!(upload = %id, error = %e, "could not discard expired upload");
            }
        }
        drop(store);
        tokio::time::sleep(period).await;
    }
}

/// The origin a session id names as its home (see [`OriginStore::upload_start`]).
pub fn upload_home(id: &str) -> Option<String> {
    let (_, home) = id.rsplit_once('.')?;
    String::from_utf8(hex::decode(home).ok()?).ok()
}
