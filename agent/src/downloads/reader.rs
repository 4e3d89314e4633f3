//! A client's read of one blob ([`Reader`]): from a cached blob, each piece checked as it is
//! read one piece ahead of what is sent, or from a running download, waiting for each piece to
//! arrive (and taking a piece just verified from memory when it can). Registers its position
//! with the download so the swarm fetches what it needs next, and carries on across a restart
//! of the download only if what it already sent still holds (see the parent module's docs).

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderValue;
use bytes::Bytes;
use futures_util::stream;
use shoal_p2p::blob::BlobPieces;
use shoal_p2p::{Metainfo, PieceError};
use shoal_registry::range::ByteRange;
use shoal_registry::{ByteStream, Digest, RepoName};

use super::{Attempt, Download, Downloads, Joined};

/// Most bytes handed to a client per read of a download's file (a cached blob is read a
/// piece at a time). In a swarm, pieces arrive in rarest-first order, far ahead of the reader,
/// so it reads most of the blob back from the page cache, one blocking-pool job per read: at
/// 256 KiB that was 512 jobs per 128 MiB for each agent of a fleet. A read takes only what is
/// held, so a reader at the download's front still gets each piece as it comes.
const READ_CHUNK: usize = 1024 * 1024;
/// A reader waiting this long for the next piece gets an error instead of hanging.
const READER_STALL: Duration = Duration::from_secs(120);

/// A piece being read (and checked) on the blocking pool.
type PieceRead = tokio::task::JoinHandle<Result<Vec<u8>, PieceError>>;

/// What a client's reader reads from.
#[derive(Clone)]
pub(super) enum Source {
    /// A cached blob, every piece checked as it is read.
    Cached(Arc<BlobPieces>),
    Download(Arc<Download>),
}

/// A client's read position; unregisters itself from its download when dropped.
pub(super) struct Reader {
    downloads: Arc<Downloads>,
    /// The client's credentials for the origins and for upstreams, as its request carried
    /// them: a download started from inside the stream (a cached file gone bad) runs after the
    /// request's handler returned, outside the scopes that hold them.
    forward: Option<HeaderValue>,
    upstream: Option<HeaderValue>,
    repo: RepoName,
    digest: Digest,
    source: Source,
    id: u64,
    pos: u64,
    end: u64,
    /// What this reader has sent of a download, to tell whether it still holds if the
    /// download starts over.
    sent: Option<Sent>,
    /// The next piece of a cached blob, being read and checked while this one is sent.
    ahead: Option<(u32, PieceRead)>,
}

/// The pieces a reader has sent bytes of, and the attempt and metainfo they were checked by.
struct Sent {
    attempt: u32,
    metainfo: Arc<Metainfo>,
    first: u32,
    last: u32,
}

impl Sent {
    /// Whether the bytes sent still hold under `attempt`, whose pieces are checked by `now`.
    fn still_holds(&self, attempt: Attempt, now: &Metainfo) -> bool {
        if attempt.number == self.attempt {
            return true;
        }
        self.metainfo.checks_alike(now, self.first, self.last)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Source::Download(download) = &self.source {
            download.set_reader(self.id, None);
        }
    }
}

fn io_error(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl Reader {
    /// `range` of `source` as a client's byte stream; the reader registers as `id`.
    pub(super) fn stream(
        downloads: Arc<Downloads>,
        repo: RepoName,
        digest: Digest,
        source: Source,
        id: u64,
        range: ByteRange,
    ) -> ByteStream {
        let reader = Reader {
            downloads,
            forward: shoal_registry::auth::forwarded_authorization(),
            upstream: crate::mirror::upstream_credentials(),
            repo,
            digest,
            source,
            id,
            pos: range.start,
            end: range.end + 1,
            sent: None,
            ahead: None,
        };
        Box::pin(stream::unfold(reader, |mut r| async move {
            let item = r.next().await?;
            Some((item, r))
        }))
    }

    async fn next(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        if self.pos >= self.end {
            return None;
        }
        let result = match self.source.clone() {
            Source::Cached(pieces) => match self.read_cached(pieces.clone()).await {
                Err(PieceError::HashMismatch { index }) => {
                    // The cache has dropped the file: go on from a download of the blob.
                    tracing::warn!(digest = %self.digest, index, "a cached blob went bad while read; fetching it again");
                    self.ahead = None;
                    let size = Some(pieces.metainfo().size());
                    let join = self.downloads.join(&self.repo, &self.digest, size, self.forward.clone());
                    match crate::mirror::UPSTREAM_CREDENTIALS.scope(self.upstream.clone(), join).await {
                        Ok(Joined::Download(download)) => {
                            self.source = Source::Download(download.clone());
                            self.read_download(download).await
                        }
                        Ok(Joined::Cached(pieces)) => {
                            self.source = Source::Cached(pieces.clone());
                            self.read_cached(pieces).await.map_err(io_error)
                        }
                        Err(e) => Err(io_error(format!("refetching a bad cached blob: {e}"))),
                    }
                }
                other => other.map_err(io_error),
            },
            Source::Download(download) => self.read_download(download).await,
        };
        Some(result)
    }

    /// The rest of the piece at `pos`, checked against its hash, read (and hashed) on the
    /// blocking pool one piece ahead of what is sent.
    async fn read_cached(&mut self, pieces: Arc<BlobPieces>) -> Result<Bytes, PieceError> {
        let meta = pieces.metainfo().clone();
        let eof = || PieceError::Io(std::io::ErrorKind::UnexpectedEof.into());
        let index = meta.piece_index_at(self.pos).ok_or_else(eof)?;
        let (start, len) = meta.piece_range(index).ok_or_else(eof)?;
        let read = |i: u32| {
            let pieces = pieces.clone();
            tokio::task::spawn_blocking(move || pieces.read_piece(i))
        };
        let this = match self.ahead.take() {
            Some((i, handle)) if i == index => handle,
            _ => read(index),
        };
        if start + len < self.end && index + 1 < meta.piece_count() {
            self.ahead = Some((index + 1, read(index + 1)));
        }
        let data = this.await.map_err(|e| PieceError::Io(io_error(e)))??;
        let from = usize::try_from(self.pos - start).map_err(|_| eof())?;
        let to = usize::try_from(self.end.min(start + len) - start).map_err(|_| eof())?;
        let bytes = Bytes::from(data).slice(from..to);
        self.pos += bytes.len() as u64;
        Ok(bytes)
    }

    /// The next bytes at `pos` of a download, waiting for its piece to arrive.
    async fn read_download(&mut self, download: Arc<Download>) -> Result<Bytes, std::io::Error> {
        let deadline = tokio::time::Instant::now() + READER_STALL;
        loop {
            let mut attempts = download.current.subscribe();
            let (pieces, attempt) = attempts.borrow_and_update().clone();
            if let Some(sent) = &mut self.sent {
                if !sent.still_holds(attempt, pieces.metainfo()) {
                    return Err(io_error(
                        "the download started over (its metainfo or bytes on disk were bad); retry the pull",
                    ));
                }
                sent.attempt = attempt.number;
                sent.metainfo = pieces.metainfo().clone();
            }
            let index =
                pieces.metainfo().piece_index_at(self.pos).ok_or_else(|| io_error("blob ended early"))?;
            download.set_reader(self.id, Some(index));
            let mut progress = pieces.subscribe();
            let mut outcome = download.outcome.subscribe();
            if !pieces.has(index) {
                if let Some(Err(e)) = outcome.borrow_and_update().clone() {
                    return Err(io_error(format!("download failed: {e}")));
                }
                tokio::select! {
                    _ = progress.changed() => {}
                    _ = outcome.changed() => {}
                    _ = attempts.changed() => {}
                    _ = tokio::time::sleep_until(deadline) => return Err(io_error("download stalled")),
                }
                continue;
            }
            let pos = self.pos;
            let metainfo = pieces.metainfo().clone();
            let left = usize::try_from(self.end - self.pos).unwrap_or(usize::MAX);
            // A piece just verified for this reader is sent from memory, a whole piece at a
            // time; anything else is read back from the file.
            let buf = match pieces.fresh_at(pos) {
                Some(fresh) => fresh.slice(..fresh.len().min(left)),
                None => {
                    let want = left.min(READ_CHUNK);
                    let read = tokio::task::spawn_blocking(move || pieces.read_new_at(pos, want));
                    Bytes::from(read.await.map_err(io_error)?.map_err(io_error)?)
                }
            };
            if buf.is_empty() {
                return Err(io_error("blob ended early"));
            }
            let finishes = self.pos + buf.len() as u64 >= self.end;
            if finishes && self.end < metainfo.size() {
                // The range's last bytes go only once its metainfo is known good: before
                // them the client cannot take the answer for complete.
                // Asked as the reading client (the stream is read outside its request's scope).
                let client = (&self.repo, self.forward.clone());
                download
                    .confirm_metainfo(&self.downloads, attempt, &metainfo, client, deadline)
                    .await
                    .map_err(io_error)?;
            }
            let last = metainfo.piece_index_at(pos + buf.len() as u64 - 1).unwrap_or(index);
            let first = self.sent.as_ref().map_or(index, |s| s.first.min(index));
            self.sent = Some(Sent {
                attempt: attempt.number,
                metainfo,
                first,
                last: last.max(self.sent.as_ref().map_or(0, |s| s.last)),
            });
            self.pos += buf.len() as u64;
            return Ok(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(chain: &[u8]) -> Arc<Metainfo> {
        let digest = Digest::of(shoal_registry::Algorithm::Sha256, b"blob");
        let size = (chain.len() as u64 + 1) * 65536;
        let chain = chain.iter().flat_map(|&b| [b; 32]).collect();
        Arc::new(Metainfo::new(digest, size, 65536, chain).unwrap())
    }

    #[test]
    fn a_reader_goes_on_after_a_restart_only_if_what_it_was_sent_still_holds() {
        // Four pieces: states after pieces 0, 1 and 2 (the last is checked by the digest).
        let old = meta(&[1, 2, 3]);
        let sent = Sent { attempt: 1, metainfo: old.clone(), first: 0, last: 1 };
        let next = Attempt { number: 2 };
        assert!(sent.still_holds(Attempt { number: 1 }, &old), "same attempt");
        // The bad chain lied after piece 2 only: pieces 0-1 were checked by the same states.
        assert!(sent.still_holds(next, &meta(&[1, 2, 9])));
        // It lied about a state a piece the reader was sent was checked against.
        assert!(!sent.still_holds(next, &meta(&[1, 8, 3])));
        assert!(!sent.still_holds(next, &meta(&[7, 2, 3])));
    }
}
