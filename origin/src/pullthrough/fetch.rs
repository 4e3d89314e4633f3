//! The blob fetches running on this origin: one per digest, however many clients and origins
//! ask for it. A fetch streams the upstream's bytes into an upload session of the mirrored
//! repository and commits it like a push (digest checked, R copies, linked, then seeded), so
//! everything after it is the path pushed content takes. Callers poll [`Progress`] rather than
//! wait on one long request: an agent's call to an origin has a short timeout, a large blob
//! from a slow upstream does not.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use shoal_registry::mirror::Progress;
use shoal_registry::Digest;

/// Fetches that may run at once on one origin; more are refused until some finish.
pub const MAX_RUNNING_FETCHES: usize = 256;
/// How long a finished fetch's outcome stays visible to pollers.
pub const OUTCOME_LINGER: Duration = Duration::from_secs(5);

/// How a fetch ended: fine, or why not and the status a client should see (if the failure is
/// about the blob or the client rather than the upstream's health).
pub type Outcome = Result<(), (String, Option<u16>)>;

/// Readers a fetch streams its bytes to at once while they arrive (the first requesters); the
/// others wait for the blob to be committed and take it from the swarm. A reader that goes
/// away gives its place back (a reading origin whose wait for the stream's head timed out
/// spent one for the fetch's whole life).
pub const STREAM_FIRST: u32 = 2;
/// A streaming reader that sees no new byte for this long fails.
pub const STREAM_IDLE: std::time::Duration = std::time::Duration::from_secs(60);
/// Bytes read from the growing file at once.
const STREAM_CHUNK: u64 = 1024 * 1024;

/// One running (or just finished) fetch.
#[derive(Default)]
pub struct Fetch {
    /// The repository it fetches into: its bytes and outcome are that repository's, and no
    /// other's (the upstream may keep one and not the other, or one private).
    repo: String,
    /// Whose credentials it asks the upstream with (their fingerprint; `None`: the
    /// configured ones): a refusal is theirs alone.
    client: Option<[u8; 32]>,
    /// The upstream refused the blob without the client's credentials: nothing of it streams.
    private: std::sync::atomic::AtomicBool,
    size: AtomicU64,
    received: AtomicU64,
    outcome: Mutex<Option<(Instant, Outcome)>>,
    /// The upload session file the bytes go to, once it exists.
    file: Mutex<Option<std::path::PathBuf>>,
    /// Woken on every chunk received and when the fetch ends.
    changed: tokio::sync::Notify,
    /// Streams open now (at most [`STREAM_FIRST`]).
    streams: std::sync::atomic::AtomicU32,
}

const UNKNOWN: u64 = u64::MAX;

impl Fetch {
    fn new(repo: &str, client: Option<[u8; 32]>) -> Fetch {
        Fetch { repo: repo.to_string(), client, size: AtomicU64::new(UNKNOWN), ..Fetch::default() }
    }

    /// The repository this fetch is for.
    pub fn repo(&self) -> &str {
        &self.repo
    }

    /// The blob needed the client's credentials: no reader gets its bytes while they arrive.
    pub fn set_private(&self) {
        self.private.store(true, Ordering::Release);
    }

    /// Whether the blob needed the client's credentials ([`set_private`](Self::set_private)).
    pub fn is_private(&self) -> bool {
        self.private.load(Ordering::Acquire)
    }

    /// Whose credentials it asks the upstream with (their fingerprint).
    pub fn client(&self) -> Option<[u8; 32]> {
        self.client
    }

    /// Whether the fetch has ended (its outcome is known).
    pub fn finished(&self) -> bool {
        lock(&self.outcome).is_some()
    }

    /// Whether it ended in a failure.
    fn failed(&self) -> bool {
        lock(&self.outcome).as_ref().is_some_and(|(_, o)| o.is_err())
    }

    /// Whether it ended in the upstream's refusal of its credentials (401, 403, or the 404
    /// of a registry that hides what a client may not see), or in their quota (a 429 of a
    /// private fetch, asked with the client's own credentials: counted per account; a public
    /// one is asked anonymously, whose 429 is everyone's): another client's may do better.
    fn refused(&self) -> bool {
        let private = self.private.load(Ordering::Acquire);
        lock(&self.outcome).as_ref().is_some_and(|(_, o)| match o {
            Err((_, Some(401 | 403 | 404))) => true,
            Err((_, Some(429))) => private,
            _ => false,
        })
    }

    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Relaxed);
    }

    pub fn add_received(&self, n: u64) {
        self.received.fetch_add(n, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Where the bytes are being written.
    pub fn set_file(&self, path: std::path::PathBuf) {
        *lock(&self.file) = Some(path);
    }

    /// A reader of the bytes as they arrive, if this fetch still streams (size and file known,
    /// not finished) and fewer than [`STREAM_FIRST`] readers have one: the file opened now,
    /// and the size.
    pub async fn stream(self: &Arc<Self>) -> Option<(u64, shoal_registry::ByteStream)> {
        let size = self.size.load(Ordering::Acquire);
        let path = lock(&self.file).clone()?;
        if size == UNKNOWN || lock(&self.outcome).is_some() || self.private.load(Ordering::Acquire) {
            return None;
        }
        let granted = self
            .streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < STREAM_FIRST).then_some(n + 1));
        if granted.is_err() {
            return None;
        }
        let grant = StreamGrant(self.clone());
        // Opened before the session is committed (renamed): the open file stays readable.
        let file = tokio::fs::File::open(&path).await.ok()?;
        let tail = Tail { fetch: self.clone(), file, offset: 0, size, _grant: grant };
        Some((size, Box::pin(futures_util::stream::unfold(tail, Tail::next))))
    }

    /// Record the outcome (`status`: the HTTP status a client should see for a failure that is
    /// about the blob or the client, not the upstream's health).
    pub fn finish(&self, outcome: Outcome) {
        *lock(&self.outcome) = Some((Instant::now(), outcome));
        self.changed.notify_waiters();
    }

    pub fn progress(&self) -> Progress {
        let size = self.size.load(Ordering::Relaxed);
        let mut p = Progress {
            size: (size != UNKNOWN).then_some(size),
            received: self.received.load(Ordering::Relaxed),
            ..Progress::default()
        };
        match &*lock(&self.outcome) {
            Some((_, Ok(()))) => p.complete = true,
            Some((_, Err((e, status)))) => {
                p.error = Some(e.clone());
                p.status = *status;
            }
            None => {}
        }
        p
    }

    fn finished_before(&self, cutoff: Instant) -> bool {
        lock(&self.outcome).as_ref().is_some_and(|(at, _)| *at < cutoff)
    }
}

/// Reads a growing upload file up to what the fetch has received, waiting for more.
struct Tail {
    fetch: Arc<Fetch>,
    file: tokio::fs::File,
    offset: u64,
    size: u64,
    _grant: StreamGrant,
}

/// One of a fetch's [`STREAM_FIRST`] places, given back when its reader is dropped.
struct StreamGrant(Arc<Fetch>);

impl Drop for StreamGrant {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How often a reader looks again for bytes received but not yet written to the file (the
/// upload path writes in batches).
const STREAM_RECHECK: std::time::Duration = std::time::Duration::from_millis(20);

impl Tail {
    async fn next(mut self) -> Option<(std::io::Result<bytes::Bytes>, Tail)> {
        use tokio::io::AsyncReadExt;
        if self.offset >= self.size {
            return None;
        }
        let idle_since = Instant::now();
        loop {
            let failed = match &*lock(&self.fetch.outcome) {
                Some((_, Err((e, _)))) => Some(format!("the upstream fetch failed: {e}")),
                _ => None,
            };
            if let Some(e) = failed {
                self.offset = self.size;
                return Some((Err(std::io::Error::other(e)), self));
            }
            if idle_since.elapsed() > STREAM_IDLE {
                self.offset = self.size;
                let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "the upstream fetch stalled");
                return Some((Err(e), self));
            }
            let fetch = self.fetch.clone();
            let changed = fetch.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let available = self.fetch.received.load(Ordering::Acquire).min(self.size);
            if available > self.offset {
                let want = (available - self.offset).min(STREAM_CHUNK) as usize;
                let mut buf = vec![0u8; want];
                match self.file.read(&mut buf).await {
                    // Received, not yet written: the upload path writes in batches.
                    Ok(0) => tokio::time::sleep(STREAM_RECHECK).await,
                    Ok(n) => {
                        buf.truncate(n);
                        self.offset += n as u64;
                        return Some((Ok(bytes::Bytes::from(buf)), self));
                    }
                    Err(e) => {
                        self.offset = self.size;
                        return Some((Err(e), self));
                    }
                }
                continue;
            }
            let _ = tokio::time::timeout(STREAM_RECHECK * 50, changed).await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The fetches of this origin, by digest.
#[derive(Default)]
pub struct Fetches {
    running: Mutex<HashMap<Digest, Arc<Fetch>>>,
}

/// What [`Fetches::join`] found.
pub enum Joined {
    /// A fetch of the digest was running (or just finished): its state.
    Existing(Arc<Fetch>),
    /// None was: this new one is registered, and the caller must run it.
    Started(Arc<Fetch>),
}

impl Fetches {
    /// The fetch of `digest`, registering a new one into `repo` if none runs. A finished
    /// fetch's outcome stays visible for [`OUTCOME_LINGER`], so every poller sees how the
    /// fetch it waited on ended (a failure included); after that, asking again starts a new
    /// one. Another repository's failure is not this one's: asking through `repo` replaces it.
    /// A fetch for another repository that runs or succeeded is returned as it is: the caller
    /// must not show its bytes or outcome for `repo`. Nor is another `client`'s refusal
    /// this one's (an anonymous client's 401 is not Alice's): asking replaces it too.
    pub fn join(&self, digest: &Digest, repo: &str, client: Option<[u8; 32]>) -> Result<Joined, usize> {
        let mut running = lock(&self.running);
        let cutoff = Instant::now() - OUTCOME_LINGER;
        running.retain(|_, f| !f.finished_before(cutoff));
        if let Some(f) = running.get(digest) {
            let theirs = f.failed() && (f.repo != repo || (f.refused() && f.client != client));
            if !theirs {
                return Ok(Joined::Existing(f.clone()));
            }
            running.remove(digest);
        }
        if running.len() >= MAX_RUNNING_FETCHES {
            return Err(running.len());
        }
        let f = Arc::new(Fetch::new(repo, client));
        running.insert(digest.clone(), f.clone());
        Ok(Joined::Started(f))
    }

    /// The fetch of `digest` registered here, if any.
    pub fn get(&self, digest: &Digest) -> Option<Arc<Fetch>> {
        lock(&self.running).get(digest).cloned()
    }

    /// Whether a fetch of `digest` runs (registered and not finished).
    pub fn running(&self, digest: &Digest) -> bool {
        lock(&self.running).get(digest).is_some_and(|f| !f.finished())
    }

    /// Fetches registered now (running or lingering).
    pub fn len(&self) -> usize {
        lock(&self.running).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::of(shoal_registry::Algorithm::Sha256, &[n])
    }

    #[test]
    fn one_fetch_per_digest() {
        let f = Fetches::default();
        assert!(matches!(f.join(&d(1), "r", None), Ok(Joined::Started(_))));
        assert!(matches!(f.join(&d(1), "r", None), Ok(Joined::Existing(_))));
        assert!(matches!(f.join(&d(2), "r", None), Ok(Joined::Started(_))));
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn progress_reports_size_bytes_and_outcome() {
        let f = Fetches::default();
        let Ok(Joined::Started(fetch)) = f.join(&d(1), "r", None) else { panic!("not started") };
        assert_eq!(fetch.progress(), Progress::default());
        fetch.set_size(10);
        fetch.add_received(4);
        assert_eq!(fetch.progress(), Progress { size: Some(10), received: 4, ..Progress::default() });
        fetch.finish(Ok(()));
        assert!(fetch.progress().complete);
    }

    #[test]
    fn a_failed_fetch_is_seen_by_pollers_then_replaced() {
        let f = Fetches::default();
        let Ok(Joined::Started(fetch)) = f.join(&d(1), "r", None) else { panic!("not started") };
        fetch.finish(Err(("upstream down".into(), None)));
        let Ok(Joined::Existing(seen)) = f.join(&d(1), "r", None) else { panic!("a poller restarted it") };
        assert_eq!(seen.progress().error.as_deref(), Some("upstream down"));
        // Once the outcome's time is over, a new request starts a new fetch.
        *lock(&seen.outcome) =
            Some((Instant::now() - OUTCOME_LINGER - Duration::from_millis(1), Err(("x".into(), None))));
        assert!(matches!(f.join(&d(1), "r", None), Ok(Joined::Started(_))));
    }

    #[test]
    fn another_repositorys_failure_is_not_this_ones() {
        let f = Fetches::default();
        let Ok(Joined::Started(fetch)) = f.join(&d(1), "a", None) else { panic!("not started") };
        // Running or succeeded, it is the one fetch of the digest (the caller hides it).
        let Ok(Joined::Existing(seen)) = f.join(&d(1), "b", None) else { panic!("a second fetch ran") };
        assert_eq!(seen.repo(), "a");
        fetch.finish(Err(("not found in a".into(), Some(404))));
        let Ok(Joined::Started(mine)) = f.join(&d(1), "b", None) else { panic!("b got a's failure") };
        assert_eq!(mine.repo(), "b");
    }

    /// One client's refusal (an anonymous 401) is not shown to another client of the same
    /// repository: it starts its own fetch with its credentials. An outage is everyone's.
    #[test]
    fn another_clients_refusal_is_not_this_ones() {
        let f = Fetches::default();
        let alice = Some([7u8; 32]);
        let Ok(Joined::Started(fetch)) = f.join(&d(1), "r", None) else { panic!("not started") };
        fetch.finish(Err(("unauthorized".into(), Some(401))));
        assert!(matches!(f.join(&d(1), "r", None), Ok(Joined::Existing(_))), "the same client sees it");
        let Ok(Joined::Started(mine)) = f.join(&d(1), "r", alice) else { panic!("alice got the 401") };
        mine.finish(Err(("upstream down".into(), Some(503))));
        assert!(matches!(f.join(&d(1), "r", None), Ok(Joined::Existing(_))), "an outage is shared");
        // A private fetch's 429 is the quota of the account asked with: another account asks
        // for itself. A public fetch asks anonymously: its 429 is everyone's.
        let Ok(Joined::Started(throttled)) = f.join(&d(2), "r", None) else { panic!("not started") };
        throttled.set_private();
        throttled.finish(Err(("throttled".into(), Some(429))));
        assert!(matches!(f.join(&d(2), "r", alice), Ok(Joined::Started(_))), "alice got the 429");
        let Ok(Joined::Started(public)) = f.join(&d(3), "r", None) else { panic!("not started") };
        public.finish(Err(("throttled".into(), Some(429))));
        assert!(matches!(f.join(&d(3), "r", alice), Ok(Joined::Existing(_))), "a public 429 is shared");
    }

    #[test]
    fn running_fetches_are_bounded() {
        let f = Fetches::default();
        for i in 0..MAX_RUNNING_FETCHES {
            let digest = Digest::of(shoal_registry::Algorithm::Sha256, &(i as u64).to_le_bytes());
            assert!(f.join(&digest, "r", None).is_ok());
        }
        assert_eq!(f.join(&d(1), "r", None).err(), Some(MAX_RUNNING_FETCHES));
    }

    /// At most `STREAM_FIRST` readers stream at once, and one that goes away gives its place
    /// to the next requester.
    #[tokio::test]
    async fn a_reader_that_goes_away_gives_its_stream_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("session");
        std::fs::write(&path, b"abcd").unwrap();
        let f = Fetches::default();
        let Ok(Joined::Started(fetch)) = f.join(&d(1), "r", None) else { panic!("not started") };
        fetch.set_size(10);
        fetch.set_file(path);
        fetch.add_received(4);
        let mut readers: Vec<_> = Vec::new();
        for _ in 0..STREAM_FIRST {
            readers.push(fetch.stream().await.expect("a first requester streams"));
        }
        assert!(fetch.stream().await.is_none(), "a third reader at once");
        assert!(fetch.stream().await.is_none(), "asked again");
        drop(readers.pop());
        let (size, mut body) = fetch.stream().await.expect("the place given back");
        assert_eq!(size, 10);
        assert_eq!(&futures_util::StreamExt::next(&mut body).await.unwrap().unwrap()[..], b"abcd");
        assert!(fetch.stream().await.is_none());
    }
}
