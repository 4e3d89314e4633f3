//! A watchdog for a request body sent over HTTP: the request fails when no body chunk is
//! taken for `idle`, when no answer arrives within `commit` (if bounded) of the body's end,
//! or when the caller's own check says the other side is gone. Origins use it for blob copies
//! to other origins and for upload requests forwarded to a session's home origin. (reqwest's `read_timeout` cannot serve here: its first timer runs from the start of
//! the request until the answer's head, so it would cut off any upload slower than it.)

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::time::Instant;

/// When an upload last made progress, shared between its body stream and its watchdog.
struct Progress {
    start: Instant,
    /// Milliseconds since `start` of the last chunk handed to the connection.
    last_ms: AtomicU64,
    /// Milliseconds since `start` (plus one) when the body ended; 0 while it runs.
    done_ms: AtomicU64,
}

impl Progress {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Why the upload should be given up, if it should.
    fn stalled(&self, idle: Duration, commit: Option<Duration>) -> Option<String> {
        let now = self.now_ms();
        match self.done_ms.load(Ordering::Relaxed) {
            0 if now.saturating_sub(self.last_ms.load(Ordering::Relaxed)) > idle.as_millis() as u64 => {
                Some(format!("upload made no progress for {idle:?}"))
            }
            0 => None,
            done => commit
                .filter(|c| now.saturating_sub(done - 1) > c.as_millis() as u64)
                .map(|c| format!("no answer within {c:?} of the upload's end")),
        }
    }
}

/// A body stream that reports its progress to its [`UploadWatch`].
pub struct Watched<S> {
    inner: S,
    progress: Arc<Progress>,
}

/// Watches one upload; see the module doc.
pub struct UploadWatch {
    progress: Arc<Progress>,
}

/// Wrap `body` for sending; the watch goes to [`UploadWatch::run`].
pub fn watch<S>(body: S) -> (Watched<S>, UploadWatch) {
    let progress =
        Arc::new(Progress { start: Instant::now(), last_ms: AtomicU64::new(0), done_ms: AtomicU64::new(0) });
    (Watched { inner: body, progress: progress.clone() }, UploadWatch { progress })
}

impl UploadWatch {
    /// Drive `send` (the request carrying the watched body) to its answer, or give up with
    /// the reason once the upload stalls.
    pub async fn run<F: Future>(
        self,
        send: F,
        idle: Duration,
        commit: Duration,
    ) -> Result<F::Output, String> {
        self.run_checked(send, idle, Some(commit), || None).await
    }

    /// [`run`](Self::run) with no bound on the wait for the answer when `commit` is `None`,
    /// and `gone` asked on every tick: a reason from it ends the wait too.
    pub async fn run_checked<F: Future>(
        self,
        send: F,
        idle: Duration,
        commit: Option<Duration>,
        mut gone: impl FnMut() -> Option<String>,
    ) -> Result<F::Output, String> {
        tokio::pin!(send);
        let shortest = commit.map_or(idle, |c| idle.min(c));
        let mut tick =
            tokio::time::interval((shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)));
        loop {
            tokio::select! {
                answer = &mut send => return Ok(answer),
                _ = tick.tick() => {
                    if let Some(reason) = self.progress.stalled(idle, commit).or_else(&mut gone) {
                        return Err(reason);
                    }
                }
            }
        }
    }
}

impl<S, E> Stream for Watched<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = Pin::new(&mut self.inner).poll_next(cx);
        let p = &self.progress;
        match &polled {
            Poll::Ready(Some(_)) => p.last_ms.store(p.now_ms(), Ordering::Relaxed),
            Poll::Ready(None) => p.done_ms.store(p.now_ms() + 1, Ordering::Relaxed),
            Poll::Pending => {}
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    type Chunk = Result<Bytes, std::io::Error>;

    /// A request that reads its whole body, then waits for an answer that never comes.
    async fn read_then_hang(mut body: Watched<futures_util::stream::Iter<std::vec::IntoIter<Chunk>>>) {
        while body.next().await.is_some() {}
        std::future::pending::<()>().await
    }

    #[tokio::test(start_paused = true)]
    async fn no_answer_after_the_body_ends_is_given_up_after_the_commit_time() {
        let chunks: Vec<Chunk> = vec![Ok(Bytes::from_static(b"abc"))];
        let (body, watch) = watch(futures_util::stream::iter(chunks));
        let started = tokio::time::Instant::now();
        let commit = Duration::from_secs(30);
        let result = watch.run(read_then_hang(body), Duration::from_secs(3), commit).await;
        let why = result.expect_err("no answer ever came");
        assert!(why.contains("no answer within"), "{why}");
        let took = started.elapsed();
        assert!(took >= commit && took < commit + Duration::from_secs(10), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_nobody_takes_is_given_up_after_the_idle_time() {
        let chunks: Vec<Chunk> = vec![Ok(Bytes::from_static(b"abc"))];
        let (_body, watch) = watch(futures_util::stream::iter(chunks));
        let started = tokio::time::Instant::now();
        let idle = Duration::from_secs(3);
        let result = watch.run(std::future::pending::<()>(), idle, Duration::from_secs(30)).await;
        assert!(result.expect_err("the body was never taken").contains("no progress"));
        assert!(started.elapsed() >= idle && started.elapsed() < idle * 2, "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_commit_bound_only_the_check_ends_the_wait() {
        let chunks: Vec<Chunk> = vec![Ok(Bytes::from_static(b"abc"))];
        let (body, watch) = watch(futures_util::stream::iter(chunks));
        let started = tokio::time::Instant::now();
        let down_at = started + Duration::from_secs(600);
        let gone = || (tokio::time::Instant::now() >= down_at).then(|| "the other side is down".to_string());
        let result = watch.run_checked(read_then_hang(body), Duration::from_secs(3), None, gone).await;
        assert_eq!(result, Err("the other side is down".to_string()));
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(600) && took < Duration::from_secs(602), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_in_time_is_returned() {
        let chunks: Vec<Chunk> = vec![Ok(Bytes::from_static(b"abc"))];
        let (mut body, watch) = watch(futures_util::stream::iter(chunks));
        let send = async move {
            while body.next().await.is_some() {}
            tokio::time::sleep(Duration::from_secs(20)).await;
            7
        };
        assert_eq!(watch.run(send, Duration::from_secs(3), Duration::from_secs(30)).await, Ok(7));
    }
}
