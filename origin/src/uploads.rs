//! Upload sessions: bytes appended to one file per session, hashed while they stream so the
//! commit needs no second pass over the data. The body is read on the runtime; only bounded
//! batches of file writes and hashing go to the blocking pool.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Instant;

use futures_util::StreamExt;
use shoal_registry::digest::Hasher;
use shoal_registry::{Algorithm, ByteStream, Digest, RepoName, StoreError};
use tokio::sync::Mutex;

/// Bytes gathered from the network before they go to the blocking pool as one write (and
/// hash): fewer, larger writes. An upload holds at most two such batches in memory.
const WRITE_BATCH: usize = 1 << 20;

/// A body that sends nothing for this long has what it sent so far written and its buffers
/// let go: a client that stalls holds no memory, where it held two batches (2-4 MiB) for as
/// long as its body lasted, and a thousand of them were more than an origin's memory limit.
const IDLE_FLUSH_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

/// A batch still short of [`WRITE_BATCH`] this long after its first byte is written and the
/// buffers let go all the same: a client trickling just above `body_min_rate`, a few bytes
/// at a time but never [`IDLE_FLUSH_AFTER`] apart, held them as a silent one did.
const SLOW_FLUSH_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// One open upload session.
pub struct Session {
    pub repo: RepoName,
    pub path: PathBuf,
    /// Bytes in the session file.
    pub offset: u64,
    /// SHA-256 of those bytes so far; `None` after a restart, when it is recomputed at commit.
    pub hasher: Option<Hasher>,
    pub touched: Instant,
    /// Expired (set under the session's lock as it leaves [`Sessions`]): a request that
    /// reached the session before then and locks it after finds it gone, rather than
    /// appending to a file about to be deleted and answering `202`.
    pub ended: bool,
}

/// Open sessions by id, each with the repository it was opened on (kept outside the session's
/// lock, so checking it never waits for, or skips, a request in progress). The async mutex
/// serialises requests on one session.
#[derive(Default)]
pub struct Sessions {
    map: StdMutex<HashMap<String, OpenSession>>,
    /// Sessions being opened (counted against the limit with the open ones).
    starting: std::sync::atomic::AtomicUsize,
    /// Sessions published as a blob lately, by id: a retried final `PUT` (its answer lost, or
    /// a 503 from the copying and linking after the publish) is answered from here rather
    /// than with 404 for a session that no longer exists.
    finished: StdMutex<HashMap<String, Finished>>,
}

/// A session being opened, counted against the limit ([`Sessions::reserve`]).
pub struct Starting<'a>(&'a Sessions);

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        self.0.starting.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A session that was published as a blob.
#[derive(Clone)]
struct Finished {
    repo: RepoName,
    digest: Digest,
    size: u64,
    at: Instant,
    /// Its blob was linked into `repo`: a retry answers from the link as it stands (gone
    /// after a `DELETE`) rather than linking again.
    linked: bool,
}

/// How long a session that has no byte yet is kept untouched (at most; `upload_idle_timeout`
/// if shorter): clients send a session's first bytes right after opening it, and one `POST`
/// costs nothing, so a client in a loop of them held `max_upload_sessions` for a whole
/// `upload_idle_timeout` (an hour), and every other client's push got 429.
pub const EMPTY_SESSION_IDLE: std::time::Duration = std::time::Duration::from_secs(120);

/// How long a finished session answers a retried final `PUT`: longer than clients back off
/// between retries of a request.
pub const FINISHED_KEPT: std::time::Duration = std::time::Duration::from_secs(600);
/// Finished sessions remembered at most (oldest forgotten first).
const MAX_FINISHED: usize = 10_000;

/// A session in [`Sessions`]: the repository it was opened on, and the session.
type OpenSession = (RepoName, Arc<Mutex<Session>>);

impl Sessions {
    /// A place for a session being opened, if fewer than `max` are open or being opened;
    /// given back when dropped (after the session is inserted, or its opening failed).
    pub fn reserve(&self, max: usize) -> Option<Starting<'_>> {
        use std::sync::atomic::Ordering;
        let open = self.lock();
        if open.len() + self.starting.load(Ordering::Acquire) >= max {
            return None;
        }
        self.starting.fetch_add(1, Ordering::AcqRel);
        drop(open);
        Some(Starting(self))
    }

    pub fn insert(&self, id: String, session: Session) {
        let repo = session.repo.clone();
        self.lock().insert(id, (repo, Arc::new(Mutex::new(session))));
    }

    /// Session `id` if it was opened on `repo`: a session is reachable only through its own
    /// repository.
    pub fn get_in(&self, repo: &RepoName, id: &str) -> Option<Arc<Mutex<Session>>> {
        self.lock().get(id).filter(|(opened_on, _)| opened_on == repo).map(|(_, s)| s.clone())
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Session `id` of `repo` was published as blob `digest` of `size` bytes: it leaves the
    /// open sessions and is remembered for [`FINISHED_KEPT`].
    pub fn finish(&self, id: &str, repo: &RepoName, digest: &Digest, size: u64) {
        self.remove(id);
        let now = Instant::now();
        let mut finished = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        finished.retain(|_, f| now.duration_since(f.at) < FINISHED_KEPT);
        if finished.len() >= MAX_FINISHED {
            if let Some(oldest) = finished.iter().min_by_key(|(_, f)| f.at).map(|(id, _)| id.clone()) {
                finished.remove(&oldest);
            }
        }
        let entry = Finished { repo: repo.clone(), digest: digest.clone(), size, at: now, linked: false };
        finished.insert(id.to_string(), entry);
    }

    /// The size of the blob session `id` of `repo` was published as, if that was `digest`
    /// within [`FINISHED_KEPT`], and whether it was linked ([`linked`](Self::linked)).
    pub fn finished(&self, repo: &RepoName, id: &str, digest: &Digest) -> Option<(u64, bool)> {
        let finished = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        let f = finished.get(id)?;
        (&f.repo == repo && &f.digest == digest && f.at.elapsed() < FINISHED_KEPT)
            .then_some((f.size, f.linked))
    }

    /// Finished session `id`'s blob was linked into its repository.
    pub fn linked(&self, id: &str) {
        let mut finished = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = finished.get_mut(id) {
            f.linked = true;
        }
    }

    /// Take out the sessions idle for longer than `idle` and not busy right now, marked
    /// [`Session::ended`]; returns their ids (their files and records are the caller's to
    /// remove).
    pub fn take_expired(&self, idle: std::time::Duration, empty_idle: std::time::Duration) -> Vec<String> {
        let now = Instant::now();
        let mut taken = Vec::new();
        self.lock().retain(|id, (_, session)| {
            let Ok(mut session) = session.try_lock() else { return true };
            let limit = if session.offset == 0 { empty_idle } else { idle };
            if now.duration_since(session.touched) <= limit {
                return true;
            }
            session.ended = true;
            taken.push(id.clone());
            false
        });
        taken
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, OpenSession>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What an append wrote: bytes, the running hash after them, and the first write error.
struct Written {
    bytes: u64,
    hasher: Option<Hasher>,
    error: Option<std::io::Error>,
}

/// The session file and the running hash, between writes.
struct Target {
    /// Opened by the first write (a body may carry no bytes at all).
    file: Option<File>,
    hasher: Option<Hasher>,
}

/// One batch written (or not) on the blocking pool; the buffer comes back for reuse.
struct BatchDone {
    target: Box<Target>,
    buf: Vec<u8>,
    error: Option<std::io::Error>,
}

fn write_batch(path: &Path, mut target: Box<Target>, mut buf: Vec<u8>) -> BatchDone {
    let file = match target.file.take() {
        Some(f) => Ok(f),
        None => OpenOptions::new().append(true).open(path),
    };
    let error = match file {
        Ok(file) => {
            let result = shoal_registry::file_write::write_all(&file, &buf);
            target.file = Some(file);
            result.err()
        }
        Err(e) => Some(e),
    };
    if error.is_none() {
        if let Some(h) = target.hasher.as_mut() {
            h.update(&buf);
        }
    }
    buf.clear();
    BatchDone { target, buf, error }
}

enum Slot {
    /// Boxed: the hasher's state makes a target large.
    Idle(Box<Target>),
    Writing(tokio::task::JoinHandle<BatchDone>),
    /// A write failed or its task died: nothing more is written.
    Failed,
}

/// Appends a request body to a session file. Bytes are gathered from the network on the
/// runtime and handed to the blocking pool a batch at a time (file write and hash), one
/// batch in flight while the next one fills: a blocking thread never waits for the
/// network, so slow clients cannot take the pool that every file and database operation
/// shares.
struct Appender {
    path: PathBuf,
    slot: Slot,
    /// The batch being gathered.
    buf: Vec<u8>,
    /// A buffer back from the last write, for the next batch.
    spare: Vec<u8>,
    /// Bytes in batches written successfully.
    written: u64,
    /// Bytes in the batch in flight.
    in_flight: u64,
    error: Option<std::io::Error>,
    /// When the batch being gathered got its first byte.
    gathering_since: Option<Instant>,
}

impl Appender {
    fn new(path: PathBuf, hasher: Option<Hasher>) -> Appender {
        Appender {
            path,
            slot: Slot::Idle(Box::new(Target { file: None, hasher })),
            buf: Vec::new(),
            spare: Vec::new(),
            written: 0,
            in_flight: 0,
            error: None,
            gathering_since: None,
        }
    }

    /// Whether a write has failed (the body need not be read further).
    fn failed(&self) -> bool {
        self.error.is_some()
    }

    /// Add a chunk; once a batch is full it goes to the blocking pool (after the one before
    /// it is done, so at most two batches are held per upload).
    async fn push(&mut self, chunk: &[u8]) {
        if self.buf.capacity() == 0 {
            self.buf = std::mem::take(&mut self.spare);
        }
        if self.buf.is_empty() {
            self.gathering_since = Some(Instant::now());
        }
        self.buf.extend_from_slice(chunk);
        if self.buf.len() >= WRITE_BATCH {
            self.flush().await;
        } else if self.gathering_since.is_some_and(|t| t.elapsed() >= SLOW_FLUSH_AFTER) {
            self.idle().await;
        }
    }

    /// Wait for the batch in flight, if any.
    async fn settle(&mut self) {
        if !matches!(self.slot, Slot::Writing(_)) {
            return;
        }
        let Slot::Writing(task) = std::mem::replace(&mut self.slot, Slot::Failed) else { return };
        let in_flight = std::mem::take(&mut self.in_flight);
        match task.await {
            Ok(BatchDone { target, buf, error: None }) => {
                self.written += in_flight;
                self.spare = buf;
                self.slot = Slot::Idle(target);
            }
            Ok(BatchDone { error: Some(e), .. }) => self.error = Some(e),
            Err(e) => self.error = Some(std::io::Error::other(format!("upload writer: {e}"))),
        }
    }

    /// Send the gathered bytes to the blocking pool.
    async fn flush(&mut self) {
        self.settle().await;
        if self.buf.is_empty() || self.failed() {
            return;
        }
        let Slot::Idle(target) = std::mem::replace(&mut self.slot, Slot::Failed) else { return };
        let buf = std::mem::take(&mut self.buf);
        self.gathering_since = None;
        self.in_flight = buf.len() as u64;
        let path = self.path.clone();
        self.slot = Slot::Writing(tokio::task::spawn_blocking(move || write_batch(&path, target, buf)));
    }

    /// The body has gone quiet: write what was gathered and hold no buffer until more comes.
    async fn idle(&mut self) {
        self.flush().await;
        self.settle().await;
        self.buf = Vec::new();
        self.spare = Vec::new();
    }

    /// Write what is left and report.
    async fn finish(mut self) -> Written {
        self.flush().await;
        self.settle().await;
        let hasher = match self.slot {
            Slot::Idle(target) => target.hasher,
            _ => None,
        };
        Written { bytes: self.written, hasher, error: self.error }
    }
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
    let mut appender = Appender::new(session.path.clone(), session.hasher.take());
    let mut received = 0u64;
    let mut stop = None;
    loop {
        // `next` is cancel-safe: a wait cut short by the timeout loses no chunk.
        let next = match tokio::time::timeout(IDLE_FLUSH_AFTER, body.next()).await {
            Ok(next) => next,
            Err(_) => {
                appender.idle().await;
                body.next().await
            }
        };
        let Some(chunk) = next else { break };
        match chunk {
            Ok(chunk) => {
                received += chunk.len() as u64;
                if len.is_some_and(|l| received > l) {
                    stop = Some(Stop::TooLong);
                    break;
                }
                appender.push(&chunk).await;
                if appender.failed() {
                    break; // the write error is reported below
                }
            }
            Err(e) => {
                stop = Some(Stop::Client(e));
                break;
            }
        }
    }
    drop(body);
    let written = appender.finish().await;
    session.touched = Instant::now();
    let failure = match (written.error, stop) {
        (Some(io), _) => Some(StoreError::from_io(io)),
        (None, Some(Stop::TooLong)) => {
            Some(StoreError::SizeMismatch { expected: len.unwrap_or(0), actual: received })
        }
        (None, Some(Stop::Client(e))) if len.is_some() => Some(StoreError::BodyRead(e)),
        (None, Some(Stop::Client(e))) => {
            // A streamed chunk keeps what arrived, so the client can resume from the offset.
            session.offset += written.bytes;
            session.hasher = written.hasher;
            return Err(StoreError::BodyRead(e));
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
            cut_back(session, offset, hasher).await?;
            Err(err)
        }
    }
}

/// Cut a session's file back to `offset` bytes, whose hash state is `hasher` (`None`: hashed
/// again at commit). If the file cannot be cut, the session takes the file's length as it is
/// and hashes it again at commit.
pub async fn cut_back(session: &mut Session, offset: u64, hasher: Option<Hasher>) -> Result<(), StoreError> {
    let path = session.path.clone();
    let truncated = tokio::task::spawn_blocking(move || {
        OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(offset))
    })
    .await
    .map_err(|e| StoreError::Internal(format!("truncate: {e}")))?;
    if let Err(e) = truncated {
        tracing::error!(error = %e, "could not cut an upload session back");
        session.offset = tokio::fs::metadata(&session.path).await.map(|m| m.len()).unwrap_or(offset);
        session.hasher = None;
    } else {
        session.offset = offset;
        session.hasher = hasher;
    }
    Ok(())
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

#[cfg(test)]
mod tests;
