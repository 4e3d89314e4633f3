//! [`Failover`]: one request, several equivalent origins. Origins form a cluster in which any
//! origin answers any request the same way, so a client (agent or tracker) that lists several
//! can survive the loss of one: a request that meets a connection error, a timeout, or a 5xx/429
//! answer is sent to the next origin, each origin at most once per request (and when none
//! answers otherwise, a 429 is the answer, or before it one that says the upstream registry
//! behind the origins failed, `shoal-upstream-failure`). The origin that
//! answered becomes the preferred one for later requests (sticky), so a dead origin costs one
//! failed attempt, not one per request. Any other answer, 404 included, is the answer.
//!
//! When no origin could be connected to within [`ALL_DOWN_MEMORY`], a request tries only one
//! of them, the one that failed longest ago (so they take turns, and one that is back is
//! found within a few requests): an agent cut off from its origins answered each call after
//! one connect timeout per origin (30 s with three), a blob `GET` twice over, before it served
//! what it holds anyway. An origin that connects but answers slowly is not unreachable.
//!
//! The ordering and stickiness ([`Failover::order`], [`Failover::answered`]) are pure and tested
//! here without a network; [`Failover::send`] drives them with `reqwest`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use reqwest::{RequestBuilder, Response, StatusCode};

/// Why a request reached no origin.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// The list was empty (after dropping blank entries): nothing to ask.
    #[error("no origin URL given")]
    NoUrls,
    /// Every origin was tried once and none answered; the last failure, for the operator.
    #[error("every origin failed; last: {0}")]
    AllFailed(String),
}

/// Whether an origin's answer means "ask another origin" rather than "this is the answer":
/// the origin is broken or overloaded (5xx) or shedding load (429).
pub fn fails_over(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

/// Splits a comma-separated origin list (a flag or config value) into base URLs, dropping blank
/// entries and trailing slashes, so `a,b/` and `a, b` both mean two origins.
pub fn split_urls(list: &str) -> Vec<String> {
    list.split(',').map(str::trim).filter(|u| !u.is_empty()).map(normalize).collect()
}

/// A base URL without trailing slashes, so paths can be appended with `format!`.
fn normalize(url: &str) -> String {
    url.trim().trim_end_matches('/').to_string()
}

/// How long an origin that could not be connected to counts as unreachable for the rule
/// that, with every origin unreachable, a request tries only one. Longer than a round of
/// connect timeouts over several origins, or that round would never end in the rule.
pub const ALL_DOWN_MEMORY: Duration = Duration::from_secs(60);

/// A list of equivalent origin base URLs and which one to ask first.
#[derive(Debug)]
pub struct Failover {
    urls: Vec<String>,
    /// Index into `urls` of the origin that answered last.
    preferred: AtomicUsize,
    /// Failed attempts by origin URL, if the owner exports them.
    failures: Option<IntCounterVec>,
    /// When each origin last could not be reached at all (milliseconds since `epoch`, 0:
    /// not lately).
    unreachable_at: Vec<AtomicU64>,
    epoch: Instant,
}

impl Failover {
    /// Starts with the first URL preferred, as a single-origin client always did.
    pub fn new(urls: Vec<String>) -> Result<Failover, FailoverError> {
        let urls: Vec<String> = urls.iter().map(|u| normalize(u)).filter(|u| !u.is_empty()).collect();
        if urls.is_empty() {
            return Err(FailoverError::NoUrls);
        }
        let unreachable_at = urls.iter().map(|_| AtomicU64::new(0)).collect();
        Ok(Failover {
            urls,
            preferred: AtomicUsize::new(0),
            failures: None,
            unreachable_at,
            epoch: Instant::now(),
        })
    }

    /// Milliseconds since `epoch` at `now`, plus one (so 0 means "never").
    fn millis(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    /// Records that the origin at `index` could not be reached at `now`.
    fn unreachable(&self, index: usize, now: Instant) {
        if let Some(at) = self.unreachable_at.get(index) {
            at.store(self.millis(now), Ordering::Relaxed);
        }
    }

    /// Whether every origin could not be reached within [`ALL_DOWN_MEMORY`] before `now`.
    fn all_unreachable(&self, now: Instant) -> bool {
        let now = self.millis(now);
        let memory = ALL_DOWN_MEMORY.as_millis() as u64;
        self.unreachable_at.iter().all(|at| {
            let at = at.load(Ordering::Relaxed);
            at != 0 && now.saturating_sub(at) < memory
        })
    }

    /// The origins one request tries at `now`: all of them in [`order`](Self::order), or,
    /// when every one was unreachable lately, only the one that failed longest ago.
    fn attempts(&self, now: Instant) -> Vec<usize> {
        if self.all_unreachable(now) {
            let oldest = (0..self.urls.len()).min_by_key(|&i| self.unreachable_at[i].load(Ordering::Relaxed));
            return oldest.into_iter().collect();
        }
        self.order()
    }

    /// Counts each failed attempt in `counter` (one label: the origin URL), so operators and
    /// tests can see a dead origin being tried and then left alone.
    pub fn count_failures(mut self, counter: IntCounterVec) -> Failover {
        self.failures = Some(counter);
        self
    }

    /// Every origin, in configuration order.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The origin the next request goes to first.
    pub fn preferred(&self) -> &str {
        &self.urls[self.preferred_index()]
    }

    fn preferred_index(&self) -> usize {
        self.preferred.load(Ordering::Relaxed) % self.urls.len()
    }

    /// Indices into [`urls`](Self::urls) in the order one request tries them: the preferred
    /// origin, then the following ones, wrapping around; each exactly once.
    pub fn order(&self) -> Vec<usize> {
        let n = self.urls.len();
        let first = self.preferred_index();
        (0..n).map(|i| (first + i) % n).collect()
    }

    /// Records that the origin at `index` answered: later requests start there.
    pub fn answered(&self, index: usize) {
        if index < self.urls.len() {
            self.preferred.store(index, Ordering::Relaxed);
            self.unreachable_at[index].store(0, Ordering::Relaxed);
        }
    }

    /// Sends the request `build` makes for a base URL to each origin in [`order`](Self::order)
    /// until one answers (anything but a connection error, timeout, 5xx or 429), and returns
    /// that answer. When none does but one answered 429, that 429 is the answer (with its
    /// `Retry-After`): the cluster, or the upstream registry behind it, says to slow down,
    /// which the client must hear rather than "no origin answered". Only the start of the
    /// request is covered: a body that breaks later is the caller's to handle. `build` must
    /// set any timeout the request needs beyond the client's.
    pub async fn send<B>(&self, build: B) -> Result<Response, FailoverError>
    where
        B: Fn(&str) -> RequestBuilder,
    {
        let mut last = String::new();
        let mut throttled = None;
        let mut upstream_failed = None;
        for index in self.attempts(Instant::now()) {
            let url = &self.urls[index];
            let sent = build(url).send().await;
            match &sent {
                Ok(_) => self.unreachable_at[index].store(0, Ordering::Relaxed),
                Err(e) if e.is_connect() => self.unreachable(index, Instant::now()),
                Err(_) => {}
            }
            let why = match sent {
                // The upstream registry's failure as this origin met it: another origin asks
                // it from elsewhere (another node's address, which Docker Hub throttles
                // apart; a working egress), so it is asked; if none answers otherwise, this
                // is the answer (the client's, not "no origin answered").
                Ok(r) if r.headers().contains_key(shoal_registry::error::UPSTREAM_FAILURE_HEADER) => {
                    let why = format!("{url} answered {} (upstream failure)", r.status());
                    // A throttled one (429, with its `Retry-After`) stays the answer.
                    let kept_429 = upstream_failed
                        .as_ref()
                        .is_some_and(|k: &Response| k.status() == StatusCode::TOO_MANY_REQUESTS);
                    if !kept_429 {
                        upstream_failed = Some(r);
                    }
                    why
                }
                Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS => {
                    let why = format!("{url} answered {}", r.status());
                    throttled = Some(r);
                    why
                }
                Ok(r) if fails_over(r.status()) => format!("{url} answered {}", r.status()),
                Ok(r) => {
                    self.answered(index);
                    return Ok(r);
                }
                Err(e) => format!("{url}: {}", error_chain(&e)),
            };
            if let Some(failures) = &self.failures {
                failures.with_label_values(&[url.as_str()]).inc();
            }
            let then = if self.urls.len() > 1 { "trying the next origin" } else { "no other origin to try" };
            tracing::warn!(origin = %url, error = %why, "origin request failed; {then}");
            last = why;
        }
        match upstream_failed.or(throttled) {
            Some(r) => Ok(r),
            None => Err(FailoverError::AllFailed(last)),
        }
    }
}

/// An error with its sources, which is where reqwest puts "connection refused".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Failover {
        Failover::new(vec!["http://a/".into(), "http://b".into(), "http://c".into()]).unwrap()
    }

    #[test]
    fn starts_with_the_first_origin_and_tries_each_once() {
        let f = three();
        assert_eq!(f.order(), vec![0, 1, 2]);
        assert_eq!(f.preferred(), "http://a");
        assert_eq!(f.urls(), ["http://a", "http://b", "http://c"]);
    }

    #[test]
    fn the_origin_that_answered_is_asked_first_next_time() {
        let f = three();
        // `a` failed, `b` answered: later requests skip `a` until `b` fails too.
        f.answered(1);
        assert_eq!(f.preferred(), "http://b");
        assert_eq!(f.order(), vec![1, 2, 0]);
        assert_eq!(f.order(), vec![1, 2, 0], "stays sticky without new answers");
        // `b` and `c` fail, `a` is back: it answers and becomes preferred again.
        f.answered(0);
        assert_eq!(f.order(), vec![0, 1, 2]);
        f.answered(2);
        assert_eq!(f.order(), vec![2, 0, 1]);
    }

    /// With every origin unreachable lately (found one connect timeout after another), a
    /// request tries one, not each in turn, taking them in turns; one that answers again, or
    /// time, ends that.
    #[test]
    fn every_origin_unreachable_lately_means_one_attempt() {
        let f = three();
        let t = Instant::now();
        let s = Duration::from_secs;
        f.unreachable(0, t + s(10));
        f.unreachable(1, t + s(20));
        assert_eq!(f.attempts(t + s(20)), vec![0, 1, 2], "one still reachable: all are tried");
        f.unreachable(2, t + s(30));
        assert_eq!(f.attempts(t + s(30)), vec![0], "the one that failed longest ago");
        f.unreachable(0, t + s(40));
        assert_eq!(f.attempts(t + s(40)), vec![1], "then the next");
        assert_eq!(f.attempts(t + s(80)), vec![0, 1, 2], "forgotten after a while");
        f.answered(1);
        assert_eq!(f.attempts(t + s(41)), vec![1, 2, 0]);
    }

    #[test]
    fn out_of_range_answers_are_ignored() {
        let f = three();
        f.answered(7);
        assert_eq!(f.order(), vec![0, 1, 2]);
    }

    #[test]
    fn a_single_origin_is_always_first() {
        let f = Failover::new(vec!["http://only".into()]).unwrap();
        f.answered(0);
        assert_eq!(f.order(), vec![0]);
        assert_eq!(f.preferred(), "http://only");
    }

    #[test]
    fn an_empty_list_is_an_error() {
        assert!(matches!(Failover::new(vec![]), Err(FailoverError::NoUrls)));
        assert!(matches!(Failover::new(vec![" ".into(), "/".into()]), Err(FailoverError::NoUrls)));
    }

    #[test]
    fn splits_comma_separated_lists() {
        assert_eq!(split_urls("http://a:5000"), ["http://a:5000"]);
        assert_eq!(split_urls("http://a/, http://b:5000/ ,,"), ["http://a", "http://b:5000"]);
        assert!(split_urls(" , ").is_empty());
    }

    #[test]
    fn server_errors_and_429_fail_over_other_answers_do_not() {
        for s in [500, 502, 503, 504, 429] {
            assert!(fails_over(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [200, 206, 304, 400, 401, 403, 404, 416] {
            assert!(!fails_over(StatusCode::from_u16(s).unwrap()), "{s}");
        }
    }

    /// A listener that answers every request with `answer`; its base URL.
    async fn answering(answer: &'static [u8]) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 1024];
                    let _ = sock.read(&mut buf).await;
                    let _ = sock.write_all(answer).await;
                });
            }
        });
        url
    }

    /// A base URL nothing listens on.
    fn closed_port() -> String {
        // Bound but not listening, and kept for the test process's life: a connection is refused
        // at once, and no other test's listener (tests run in parallel) can be given the port, as
        // it could one bound and dropped.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(([127, 0, 0, 1], 0).into()).expect("bind");
        let addr = socket.local_addr().expect("addr");
        std::mem::forget(socket);
        format!("http://{addr}")
    }

    /// Origins none of which can be reached: the first request tries each, the next ones
    /// one, until one answers again.
    #[tokio::test]
    async fn a_request_to_origins_all_unreachable_tries_one() {
        let counter = IntCounterVec::new(prometheus::Opts::new("f", "f"), &["origin"]).unwrap();
        let (a, b) = (closed_port(), closed_port());
        let f = Failover::new(vec![a.clone(), b.clone()]).unwrap().count_failures(counter.clone());
        let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(5)).build().unwrap();
        let tried = || {
            counter.with_label_values(&[a.as_str()]).get() + counter.with_label_values(&[b.as_str()]).get()
        };
        assert!(f.send(|base| http.get(format!("{base}/x"))).await.is_err());
        assert_eq!(tried(), 2);
        assert!(f.send(|base| http.get(format!("{base}/x"))).await.is_err());
        assert_eq!(tried(), 3, "the second request tried both again");
    }

    #[tokio::test]
    async fn a_refused_connection_moves_on_and_sticks_to_the_origin_that_answered() {
        // A real listener that answers 404, and a port nothing listens on.
        let live =
            answering(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
        let dead = closed_port();
        let counter = IntCounterVec::new(prometheus::Opts::new("f", "f"), &["origin"]).unwrap();
        let f = Failover::new(vec![dead.clone(), live.clone()]).unwrap().count_failures(counter.clone());
        let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(5)).build().unwrap();
        for _ in 0..3 {
            let r = f.send(|base| http.get(format!("{base}/x"))).await.unwrap();
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "a 404 is an answer");
        }
        assert_eq!(f.preferred(), live);
        assert_eq!(counter.with_label_values(&[dead.as_str()]).get(), 1, "the dead origin is tried once");
        assert_eq!(counter.with_label_values(&[live.as_str()]).get(), 0);

        let none = Failover::new(vec![dead.clone()]).unwrap();
        let err = none.send(|base| http.get(format!("{base}/x"))).await.unwrap_err();
        assert!(matches!(err, FailoverError::AllFailed(ref e) if e.contains(&dead)), "{err}");
    }

    /// Every origin tried, one of them saying 429 (here behind a dead one): that 429 is the
    /// answer, with its `Retry-After`, not "every origin failed" (which clients saw as 503).
    #[tokio::test]
    async fn when_no_origin_answers_a_429_is_the_answer() {
        let busy = answering(
            b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await;
        let dead = closed_port();
        let f = Failover::new(vec![busy.clone(), dead]).unwrap();
        let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(5)).build().unwrap();
        let r = f.send(|base| http.get(format!("{base}/x"))).await.unwrap();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("7"));
    }

    /// An origin that met the upstream's failure: another origin is asked (it reaches the
    /// upstream from elsewhere), and answers; with none answering otherwise, the marked
    /// failure is the answer, before a plain 429 and before "every origin failed".
    #[tokio::test]
    async fn an_upstream_failure_asks_the_next_origin_and_is_the_answer_if_none_does_better() {
        const FAILED: &[u8] =
            b"HTTP/1.1 503 Service Unavailable\r\nshoal-upstream-failure: docker.io\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        let failed = answering(FAILED).await;
        let fine = answering(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
        let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(5)).build().unwrap();
        let f = Failover::new(vec![failed.clone(), fine.clone()]).unwrap();
        let r = f.send(|base| http.get(format!("{base}/x"))).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(f.preferred(), fine);
        // A throttled upstream failure's Retry-After is not lost to a later origin's 503.
        let throttled = answering(
            b"HTTP/1.1 429 Too Many Requests\r\nshoal-upstream-failure: docker.io\r\nretry-after: 7\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await;
        let f = Failover::new(vec![throttled, failed.clone()]).unwrap();
        let r = f.send(|base| http.get(format!("{base}/x"))).await.unwrap();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("7"));
        let busy =
            answering(b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        let f = Failover::new(vec![busy, failed, closed_port()]).unwrap();
        let r = f.send(|base| http.get(format!("{base}/x"))).await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key(shoal_registry::error::UPSTREAM_FAILURE_HEADER));
    }
}
