//! Upload sessions: bytes appended to one file per session, hashed while they stream so the
//! commit needs no second pass over the data, on a blocking thread fed by a bounded channel.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use shoal_registry::digest::Hasher;
use shoal_registry::{Algorithm, ByteStream, Digest, RepoName, StoreError};
use tokio::sync::{mpsc, Mutex};

/// Chunks buffered between the network and the writer thread; bounds memory per upload.
const WRITE_QUEUE: usize = 32;
/// Write buffer of the writer thread: fewer, larger writes.
const WRITE_BUFFER: usize = 1 << 20;

/// One open upload session.
pub struct Session {
    pub repo: RepoName,
    pub path: PathBuf,
    /// Bytes in the session file.
    pub offset: u64,
    /// SHA-256 of those bytes so far; `None` after a restart, when it is recomputed at commit.
    pub hasher: Option<Hasher>,
    pub touched: Instant,
}

/// Open sessions by id. The async mutex serialises requests on one session.
#[derive(Default)]
pub struct Sessions {
    map: StdMutex<HashMap<String, Arc<Mutex<Session>>>>,
}

impl Sessions {
    /// Sessions open now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn insert(&self, id: String, session: Session) {
        self.lock().insert(id, Arc::new(Mutex::new(session)));
    }

    pub fn get(&self, id: &str) -> Option<Arc<Mutex<Session>>> {
        self.lock().get(id).cloned()
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Ids of sessions idle for longer than `idle` and not busy right now.
    pub fn expired(&self, idle: std::time::Duration) -> Vec<String> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(_, s)| s.try_lock().is_ok_and(|s| now.duration_since(s.touched) > idle))
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Mutex<Session>>>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Outcome of the writer thread.
struct Written {
    bytes: u64,
    hasher: Option<Hasher>,
    error: Option<std::io::Error>,
}

fn write_chunks(path: &Path, mut hasher: Option<Hasher>, mut rx: mpsc::Receiver<Bytes>) -> Written {
    let mut bytes = 0u64;
    let file = match OpenOptions::new().append(true).open(path) {
        Ok(f) => f,
        Err(error) => return Written { bytes, hasher, error: Some(error) },
    };
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
    while let Some(chunk) = rx.blocking_recv() {
        if let Err(error) = out.write_all(&chunk) {
            return Written { bytes, hasher, error: Some(error) };
        }
        if let Some(h) = hasher.as_mut() {
            h.update(&chunk);
        }
        bytes += chunk.len() as u64;
    }
    let error = out.flush().err();
    Written { bytes, hasher, error }
}

/// Why an append stopped early.
enum Stop {
    Client(std::io::Error),
    TooLong,
}

/// Append `body` to the session; see `RegistryStore::upload_append` for the contract.
pub async fn append(
    session: &mut Session,
    start: Option<u64>,
    len: Option<u64>,
    mut body: ByteStream,
) -> Result<(), StoreError> {
    if let Some(start) = start {
        if start != session.offset {
            return Err(StoreError::UploadOutOfOrder { offset: session.offset });
        }
    }
    let before = (session.offset, session.hasher.clone());
    let (tx, rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
    let path = session.path.clone();
    let writer = tokio::task::spawn_blocking({
        let hasher = session.hasher.take();
        move || write_chunks(&path, hasher, rx)
    });
    let mut received = 0u64;
    let mut stop = None;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(chunk) => {
                received += chunk.len() as u64;
                if len.is_some_and(|l| received > l) {
                    stop = Some(Stop::TooLong);
                    break;
                }
                if tx.send(chunk).await.is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
            Err(e) => {
                stop = Some(Stop::Client(e));
                break;
            }
        }
    }
    drop(tx);
    let written = writer.await.map_err(|e| StoreError::Internal(format!("upload writer: {e}")))?;
    session.touched = Instant::now();
    let failure = match (written.error, stop) {
        (Some(io), _) => Some(StoreError::from_io(io)),
        (None, Some(Stop::TooLong)) => {
            Some(StoreError::SizeMismatch { expected: len.unwrap_or(0), actual: received })
        }
        (None, Some(Stop::Client(e))) if len.is_some() => Some(StoreError::Io(e)),
        (None, Some(Stop::Client(e))) => {
            // A streamed chunk keeps what arrived, so the client can resume from the offset.
            session.offset += written.bytes;
            session.hasher = written.hasher;
            return Err(StoreError::Io(e));
        }
        (None, None) if len.is_some_and(|l| l != received) => {
            Some(StoreError::SizeMismatch { expected: len.unwrap_or(0), actual: received })
        }
        (None, None) => None,
    };
    match failure {
        None => {
            session.offset += written.bytes;
            session.hasher = written.hasher;
            Ok(())
        }
        Some(err) => {
            // All or nothing: cut the file back to where this chunk began.
            let (offset, hasher) = before;
            let path = session.path.clone();
            let truncated = tokio::task::spawn_blocking(move || {
                OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(offset))
            })
            .await
            .map_err(|e| StoreError::Internal(format!("truncate: {e}")))?;
            if let Err(e) = truncated {
                // The file no longer matches any known offset: force a rehash at commit.
                tracing::error!(error = %e, "could not roll back a failed upload chunk");
                session.offset = std::fs::metadata(&session.path).map(|m| m.len()).unwrap_or(offset);
                session.hasher = None;
            } else {
                session.offset = offset;
                session.hasher = hasher;
            }
            Err(err)
        }
    }
}

/// Digest of a session's content, from the running hash when possible, else by rereading.
pub async fn digest_of(session: &Session, algorithm: Algorithm) -> Result<Digest, StoreError> {
    if let Some(h) = session.hasher.as_ref().filter(|h| h.algorithm() == algorithm) {
        return Ok(h.clone().finish());
    }
    let path = session.path.clone();
    tokio::task::spawn_blocking(move || hash_file(&path, algorithm))
        .await
        .map_err(|e| StoreError::Internal(format!("hashing: {e}")))?
        .map_err(StoreError::from_io)
}

fn hash_file(path: &Path, algorithm: Algorithm) -> std::io::Result<Digest> {
    let mut file = File::open(path)?;
    let mut hasher = algorithm.hasher();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}
