//! What the tracker asks the origins: a blob's metainfo (content-addressed, cached until
//! evicted) and which origins seed it (cached briefly). Every call has a timeout.
//!
//! The origins listed are one cluster, and any origin answers both questions for the whole
//! cluster (metainfo from an owner's copy, locations as every live owner's peer listener), so
//! each question goes to one origin, failing over to the next on a connection error, timeout,
//! 5xx or 429 ([`Failover`]), and the origin that answered is asked first next time.
//!
//! A fleet that starts pulling a new image announces each layer from every node within a
//! second: one question per digest is in flight at a time ([`Flights`]), and whoever asks
//! meanwhile waits for its answer, or is handed the last one (seeders past their time) while
//! it is asked anew. Each announce used to ask the origins itself. An announce waits for a
//! digest's first seeders [`SEEDER_WAIT`] at most: the question goes on without it, so a
//! slow origin costs a new layer's first announces a second, not the origins' timeouts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::StatusCode;
use shoal_p2p::failover::Failover;
use shoal_registry::Digest;

use crate::proto::{locations_path, metainfo_path, Locations, PeerInfo};

/// Why the origins could not answer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum OriginError {
    #[error("no origin knows blob {0}")]
    Unknown(Digest),
    #[error("origins unreachable: {0}")]
    Unreachable(String),
}

/// Why the origin client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OriginsBuildError {
    #[error("no origin URL configured")]
    NoOrigins,
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
}

/// Bytes of metainfo kept at most. A metainfo grows with its blob (64 hex characters per
/// piece: ~65 KB per GiB), so a count alone let 10,000 large layers take gigabytes.
pub const MAX_METAINFO_CACHE_BYTES: usize = 64 << 20;
/// Largest metainfo answer read from an origin: a 1 TiB blob's in 1 MiB pieces (~65 KB per
/// GiB of blob).
const MAX_METAINFO_BYTES: usize = 80 << 20;
/// Largest locations answer read from an origin (a few hundred bytes per seeding origin).
const MAX_LOCATIONS_BYTES: usize = 1 << 20;
/// How long a caller waits for the origins' first answer about a digest's seeders before it
/// is handed none (an announce then gets the swarm's peers alone, and announces again soon).
/// The question goes on, and its answer is cached for the callers after. Origins answer in
/// milliseconds; one that hangs made every announce of a new layer wait the origins' timeout
/// (5 s) per origin tried.
pub const SEEDER_WAIT: Duration = Duration::from_secs(1);

/// The questions about each digest that are being asked of the origins now: a caller that
/// asks one meanwhile waits for that answer instead of asking again.
struct Flights<T> {
    running: Mutex<HashMap<Digest, Arc<tokio::sync::OnceCell<T>>>>,
    max: usize,
}

impl<T: Clone> Flights<T> {
    fn new(max: usize) -> Flights<T> {
        Flights { running: Mutex::new(HashMap::new()), max }
    }

    /// Whether a question about `digest` is in flight: asked by a caller still waiting for it
    /// (a flight whose callers all went away is not, and the next caller asks anew).
    fn running(&self, digest: &Digest) -> bool {
        lock(&self.running).get(digest).is_some_and(|c| Arc::strong_count(c) > 1)
    }

    /// The answer of the question about `digest` in flight, or of `ask` (asked now, as the
    /// one in flight). If the caller asking is dropped, a caller waiting takes the question
    /// over (a `OnceCell`'s initialisation); the flight ends with its answer, or when its
    /// last caller goes away without one.
    async fn answer<F, Fut>(&self, digest: &Digest, ask: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let cell = {
            let mut running = lock(&self.running);
            if running.len() >= self.max {
                // Flights whose every caller went away before an answer: no one waits on them.
                running.retain(|_, c| Arc::strong_count(c) > 1);
            }
            running.entry(digest.clone()).or_default().clone()
        };
        let ticket = Ticket { flights: self, digest, cell };
        ticket.cell.get_or_init(ask).await.clone()
    }
}

/// A caller's hold on a flight: when the last holder lets go (answered, or dropped before an
/// answer came), the flight leaves the map, so the next caller asks again.
struct Ticket<'a, T> {
    flights: &'a Flights<T>,
    digest: &'a Digest,
    cell: Arc<tokio::sync::OnceCell<T>>,
}

impl<T> Drop for Ticket<'_, T> {
    fn drop(&mut self) {
        let mut running = lock(&self.flights.running);
        let ours = running.get(self.digest).is_some_and(|c| Arc::ptr_eq(c, &self.cell));
        // The map's reference and this one: no other caller holds the flight.
        if ours && (self.cell.initialized() || Arc::strong_count(&self.cell) == 2) {
            running.remove(self.digest);
        }
    }
}

/// Client of the origins with small bounded caches.
pub struct Origins {
    origins: Failover,
    http: reqwest::Client,
    /// Cached metainfo, and the bytes it holds.
    metainfo: Mutex<(HashMap<Digest, Bytes>, usize)>,
    seeders: Mutex<HashMap<Digest, (Instant, Vec<PeerInfo>)>>,
    metainfo_flights: Flights<Result<Bytes, OriginError>>,
    seeder_flights: Flights<Vec<PeerInfo>>,
    max_cached: usize,
    seeder_ttl: Duration,
}

impl Origins {
    /// A client of `urls` (one cluster's origins, tried in this order), `timeout` per call.
    pub fn new(urls: Vec<String>, timeout: Duration) -> Result<Origins, OriginsBuildError> {
        let http = shoal_tls::http_client().timeout(timeout).connect_timeout(timeout).build()?;
        let origins = Failover::new(urls).map_err(|_| OriginsBuildError::NoOrigins)?;
        Ok(Origins {
            origins,
            http,
            metainfo: Mutex::new((HashMap::new(), 0)),
            seeders: Mutex::new(HashMap::new()),
            metainfo_flights: Flights::new(10_000),
            seeder_flights: Flights::new(10_000),
            max_cached: 10_000,
            seeder_ttl: Duration::from_secs(10),
        })
    }

    /// The blob's metainfo JSON, from the cache or the first origin that answers.
    pub async fn metainfo(&self, digest: &Digest) -> Result<Bytes, OriginError> {
        if let Some(m) = lock(&self.metainfo).0.get(digest) {
            return Ok(m.clone());
        }
        self.metainfo_flights.answer(digest, || self.fetch_metainfo(digest)).await
    }

    async fn fetch_metainfo(&self, digest: &Digest) -> Result<Bytes, OriginError> {
        let path = metainfo_path(digest);
        let r = self
            .origins
            .send(|base| self.http.get(format!("{base}{path}")))
            .await
            .map_err(|e| OriginError::Unreachable(e.to_string()))?;
        match r.status() {
            s if s.is_success() => {}
            StatusCode::NOT_FOUND => return Err(OriginError::Unknown(digest.clone())),
            s => return Err(OriginError::Unreachable(format!("origin answered {s}"))),
        }
        let body = shoal_tls::read_body(r, MAX_METAINFO_BYTES, false)
            .await
            .map_err(|e| OriginError::Unreachable(format!("metainfo: {e}")))?;
        if body.len() > MAX_METAINFO_CACHE_BYTES {
            // Served, not kept: it alone would be more than the cache may hold.
            return Ok(body);
        }
        let mut cache = lock(&self.metainfo);
        let (entries, bytes) = &mut *cache;
        if entries.len() >= self.max_cached || *bytes + body.len() > MAX_METAINFO_CACHE_BYTES {
            // Crude but bounded; metainfo is cheap to refetch.
            entries.clear();
            *bytes = 0;
        }
        if let Some(old) = entries.insert(digest.clone(), body.clone()) {
            *bytes -= old.len();
        }
        *bytes += body.len();
        Ok(body)
    }

    /// The seeders [`seeders`](Self::seeders) last found for the blob, however long ago;
    /// `None` if it was never asked (or the cache was cleared). Calls no origin.
    pub fn cached_seeders(&self, digest: &Digest) -> Option<Vec<PeerInfo>> {
        lock(&self.seeders).get(digest).map(|(_, s)| s.clone())
    }

    /// Whether [`seeders`](Self::seeders) would call no origin for the blob now: its seeders
    /// were found within their time, or a question about them is under way.
    pub fn seeders_answered(&self, digest: &Digest) -> bool {
        let fresh = lock(&self.seeders).get(digest).is_some_and(|(at, _)| at.elapsed() < self.seeder_ttl);
        fresh || self.seeder_flights.running(digest)
    }

    /// Origins' peer listeners that hold the blob, as the first origin that answers lists them;
    /// empty when none answers, or none within [`SEEDER_WAIT`] of a first question. Past
    /// their time, the last ones found are handed out while the origins are asked again.
    pub async fn seeders(self: &Arc<Self>, digest: &Digest) -> Vec<PeerInfo> {
        let last = lock(&self.seeders).get(digest).cloned();
        if let Some((at, s)) = &last {
            if at.elapsed() < self.seeder_ttl || self.seeder_flights.running(digest) {
                return s.clone();
            }
        }
        // Asked in a task of its own, which holds the flight until it ends whoever waits.
        let asking = tokio::spawn({
            let (this, digest) = (self.clone(), digest.clone());
            async move { this.seeder_flights.answer(&digest, || this.lookup_seeders(&digest)).await }
        });
        if let Some((_, stale)) = last {
            return stale;
        }
        match tokio::time::timeout(SEEDER_WAIT, asking).await {
            Ok(Ok(found)) => found,
            _ => Vec::new(),
        }
    }

    /// Ask the origins for the blob's seeders and cache the answer (none if none answers).
    async fn lookup_seeders(&self, digest: &Digest) -> Vec<PeerInfo> {
        let found = match self.fetch_seeders(digest).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(%digest, error = %e, "no origin listed the blob's seeders");
                Vec::new()
            }
        };
        let mut cache = lock(&self.seeders);
        if cache.len() >= self.max_cached {
            // Past their time first (made-up digests' empty answers among them).
            let ttl = self.seeder_ttl;
            cache.retain(|_, (at, _)| at.elapsed() < ttl);
            if cache.len() >= self.max_cached {
                cache.clear();
            }
        }
        cache.insert(digest.clone(), (Instant::now(), found.clone()));
        found
    }

    async fn fetch_seeders(&self, digest: &Digest) -> Result<Vec<PeerInfo>, OriginError> {
        let path = locations_path(digest);
        let r = self
            .origins
            .send(|base| self.http.get(format!("{base}{path}")))
            .await
            .map_err(|e| OriginError::Unreachable(e.to_string()))?;
        if !r.status().is_success() {
            return Err(OriginError::Unreachable(format!("origin answered {}", r.status())));
        }
        let body = shoal_tls::read_body(r, MAX_LOCATIONS_BYTES, false)
            .await
            .map_err(|e| OriginError::Unreachable(format!("locations: {e}")))?;
        let loc = serde_json::from_slice::<Locations>(&body)
            .map_err(|e| OriginError::Unreachable(format!("origin locations: {e}")))?;
        let mut found: Vec<PeerInfo> = loc
            .seeders
            .into_iter()
            .map(|s| PeerInfo { peer_id: s.peer_id, addr: s.addr, complete: true, origin: true })
            .collect();
        found.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        found.dedup_by(|a, b| a.peer_id == b.peer_id);
        Ok(found)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode as Http;
    use axum::routing::get;

    /// A fake origin that lists one seeder for every blob and answers metainfo with `status`.
    async fn fake_origin(status: Http) -> String {
        let locations = axum::Json(serde_json::json!({
            "seeders": [{"peer_id": "a".repeat(40), "addr": "127.0.0.1:7001"}]
        }));
        let app = axum::Router::new()
            .route("/shoal/v1/blobs/{digest}/locations", get(move || async move { locations.clone() }))
            .route("/shoal/v1/blobs/{digest}/metainfo", get(move || async move { (status, "{}") }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
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

    fn digest(s: &str) -> Digest {
        Digest::of(shoal_registry::Algorithm::Sha256, s.as_bytes())
    }

    #[tokio::test]
    async fn seeders_and_metainfo_fail_over_past_a_dead_origin() {
        let live = fake_origin(Http::OK).await;
        let origins =
            Arc::new(Origins::new(vec![closed_port(), live.clone()], Duration::from_secs(5)).unwrap());
        let seeders = origins.seeders(&digest("x")).await;
        assert_eq!(seeders.len(), 1);
        assert!(seeders[0].origin && seeders[0].complete);
        assert_eq!(origins.origins.preferred(), live, "the origin that answered is asked first");
        assert_eq!(&origins.metainfo(&digest("y")).await.unwrap()[..], b"{}");
    }

    /// What the lookup budget charges: a digest never asked about, or asked about longer
    /// ago than the seeders' time (a refresh calls an origin as a first question does).
    #[tokio::test]
    async fn seeders_are_answered_while_fresh_only() {
        let live = fake_origin(Http::OK).await;
        let origins = Arc::new(Origins::new(vec![live], Duration::from_secs(5)).unwrap());
        let d = digest("x");
        assert!(!origins.seeders_answered(&d), "never asked");
        assert_eq!(origins.seeders(&d).await.len(), 1);
        assert!(origins.seeders_answered(&d), "just asked");
        let long_ago = Instant::now().checked_sub(origins.seeder_ttl + Duration::from_secs(1)).unwrap();
        lock(&origins.seeders).get_mut(&d).unwrap().0 = long_ago;
        assert!(!origins.seeders_answered(&d), "past their time");
        assert!(origins.cached_seeders(&d).is_some(), "still handed out");
    }

    #[tokio::test]
    async fn a_5xx_fails_over_and_a_404_is_an_answer() {
        let broken = fake_origin(Http::SERVICE_UNAVAILABLE).await;
        let live = fake_origin(Http::OK).await;
        let origins = Origins::new(vec![broken, live.clone()], Duration::from_secs(5)).unwrap();
        assert!(origins.metainfo(&digest("x")).await.is_ok());
        assert_eq!(origins.origins.preferred(), live);

        let missing = fake_origin(Http::NOT_FOUND).await;
        let origins = Origins::new(vec![missing, live], Duration::from_secs(5)).unwrap();
        assert!(matches!(origins.metainfo(&digest("x")).await, Err(OriginError::Unknown(_))));
    }

    /// Large blobs' metainfo is bounded in bytes, not only in entries.
    #[tokio::test]
    async fn cached_metainfo_is_bounded_in_bytes() {
        let big = "x".repeat(1 << 20);
        let app = axum::Router::new()
            .route("/shoal/v1/blobs/{digest}/metainfo", get(move || async move { big.clone() }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let origins = Origins::new(vec![url], Duration::from_secs(5)).unwrap();
        for i in 0..100 {
            origins.metainfo(&digest(&i.to_string())).await.unwrap();
            let (entries, bytes) = &*lock(&origins.metainfo);
            assert!(*bytes <= MAX_METAINFO_CACHE_BYTES, "{bytes} bytes cached after {i}");
            assert_eq!(*bytes, entries.values().map(Bytes::len).sum::<usize>());
        }
    }

    /// An origin that answers both questions once its gate is open (`true`), counting the
    /// questions. The tests hold questions in flight with the gate, not with sleeps that
    /// race the tracker's own waits on a loaded machine.
    async fn gated_origin() -> (String, Arc<std::sync::atomic::AtomicUsize>, tokio::sync::watch::Sender<bool>)
    {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let asked = Arc::new(AtomicUsize::new(0));
        let (gate, open) = tokio::sync::watch::channel(false);
        let (a, b) = (asked.clone(), asked.clone());
        let (open_a, open_b) = (open.clone(), open);
        let app = axum::Router::new()
            .route(
                "/shoal/v1/blobs/{digest}/locations",
                get(move || async move {
                    a.fetch_add(1, Ordering::SeqCst);
                    let _ = open_a.clone().wait_for(|open| *open).await;
                    axum::Json(serde_json::json!({
                        "seeders": [{"peer_id": "a".repeat(40), "addr": "127.0.0.1:7001"}]
                    }))
                }),
            )
            .route(
                "/shoal/v1/blobs/{digest}/metainfo",
                get(move || async move {
                    b.fetch_add(1, Ordering::SeqCst);
                    let _ = open_b.clone().wait_for(|open| *open).await;
                    "{}"
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, asked, gate)
    }

    /// Waits (up to 10 s) until the origin has been asked `n` questions in all.
    async fn asked_reaches(asked: &std::sync::atomic::AtomicUsize, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while asked.load(std::sync::atomic::Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "the origin was never asked");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Lets the spawned callers (on this test's one thread) reach their wait.
    async fn let_callers_wait() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// A fleet announcing a new layer at once asks the origins once per question, not once per
    /// announce; past their time, seeders are handed out as they were while one caller asks
    /// again, and a caller that gives up hands the question to one still waiting.
    #[tokio::test]
    async fn simultaneous_questions_about_a_digest_go_to_the_origins_once() {
        use std::sync::atomic::Ordering;
        let (url, asked, gate) = gated_origin().await;
        let origins = Arc::new(Origins::new(vec![url], Duration::from_secs(5)).unwrap());
        let d = digest("layer");
        let many = |f: fn(Arc<Origins>, Digest) -> tokio::task::JoinHandle<usize>| {
            (0..20).map(|_| f(origins.clone(), d.clone())).collect::<Vec<_>>()
        };
        // Every announce waits for the one question (opened well within `SEEDER_WAIT`).
        let seeders = many(|o, d| tokio::spawn(async move { o.seeders(&d).await.len() }));
        asked_reaches(&asked, 1).await;
        let_callers_wait().await;
        gate.send_replace(true);
        for s in seeders {
            assert_eq!(s.await.unwrap(), 1);
        }
        assert_eq!(asked.swap(0, Ordering::SeqCst), 1, "seeders asked once for 20 announces");
        gate.send_replace(false);
        let metainfo = many(|o, d| tokio::spawn(async move { o.metainfo(&d).await.unwrap().len() }));
        asked_reaches(&asked, 1).await;
        let_callers_wait().await;
        gate.send_replace(true);
        for m in metainfo {
            assert_eq!(m.await.unwrap(), 2);
        }
        assert_eq!(asked.swap(0, Ordering::SeqCst), 1, "metainfo asked once for 20 callers");

        // Past their time: one caller asks again, the others get the last answer at once.
        gate.send_replace(false);
        lock(&origins.seeders).get_mut(&d).unwrap().0 -= Duration::from_secs(11);
        let asking = tokio::spawn({
            let (o, d) = (origins.clone(), d.clone());
            async move { o.seeders(&d).await }
        });
        asked_reaches(&asked, 1).await;
        for _ in 0..10 {
            assert_eq!(origins.seeders(&d).await.len(), 1, "the last answer, while the origin hangs");
        }
        assert_eq!(asking.await.unwrap().len(), 1, "the asking caller, handed the stale answer");
        gate.send_replace(true);
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&origins.seeders)[&d].0.elapsed() > Duration::from_secs(5) {
            assert!(Instant::now() < deadline, "never refreshed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(asked.swap(0, Ordering::SeqCst), 1, "refreshed once");

        // The caller asking goes away: one waiting takes the question over.
        gate.send_replace(false);
        let e = digest("another");
        let first = tokio::spawn({
            let (o, e) = (origins.clone(), e.clone());
            async move { o.metainfo(&e).await }
        });
        asked_reaches(&asked, 1).await;
        let second = tokio::spawn({
            let (o, e) = (origins.clone(), e.clone());
            async move { o.metainfo(&e).await }
        });
        let_callers_wait().await;
        first.abort();
        asked_reaches(&asked, 2).await;
        gate.send_replace(true);
        assert_eq!(&second.await.unwrap().unwrap()[..], b"{}");
        assert!(lock(&origins.metainfo_flights.running).is_empty(), "the flight ended");

        // A refresh goes on after the caller that started it is handed the stale answer (or
        // goes away), and its answer is cached for the next.
        gate.send_replace(false);
        asked.store(0, Ordering::SeqCst);
        lock(&origins.seeders).get_mut(&d).unwrap().0 -= Duration::from_secs(11);
        assert_eq!(origins.seeders(&d).await.len(), 1, "the last answer, while the origin hangs");
        asked_reaches(&asked, 1).await;
        gate.send_replace(true);
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&origins.seeders)[&d].0.elapsed() > Duration::from_secs(5) {
            assert!(Instant::now() < deadline, "never refreshed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while !lock(&origins.seeder_flights.running).is_empty() {
            assert!(Instant::now() < deadline, "the flight never ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1);
    }

    /// An origin that hangs over a digest's first question: announces wait `SEEDER_WAIT` at
    /// most and are handed no seeders, the question goes on once, and its answer serves the
    /// announces after at once. Each announce used to wait the origin's whole answer.
    #[tokio::test]
    async fn a_first_question_waits_a_second_at_most_and_goes_on() {
        use std::sync::atomic::Ordering;
        let (url, asked, gate) = gated_origin().await;
        let origins = Arc::new(Origins::new(vec![url], Duration::from_secs(30)).unwrap());
        let d = digest("new layer");
        let started = Instant::now();
        let waiting: Vec<_> = (0..10)
            .map(|_| {
                let (o, d) = (origins.clone(), d.clone());
                tokio::spawn(async move { o.seeders(&d).await })
            })
            .collect();
        for w in waiting {
            assert!(w.await.unwrap().is_empty(), "handed seeders before the origin answered");
        }
        // The origin still hangs: the announces waited `SEEDER_WAIT`, not for it.
        let waited = started.elapsed();
        assert!(waited >= SEEDER_WAIT && waited < SEEDER_WAIT * 3, "waited {waited:?}");
        gate.send_replace(true);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !lock(&origins.seeders).contains_key(&d) {
            assert!(Instant::now() < deadline, "the question never ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        gate.send_replace(false);
        let again = Instant::now();
        assert_eq!(origins.seeders(&d).await.len(), 1, "the question's answer, cached");
        assert!(again.elapsed() < SEEDER_WAIT, "waited for the origin again");
        assert_eq!(asked.load(Ordering::SeqCst), 1, "asked once");
    }

    #[tokio::test]
    async fn no_live_origin_means_no_seeders_and_unreachable_metainfo() {
        let origins =
            Arc::new(Origins::new(vec![closed_port(), closed_port()], Duration::from_secs(5)).unwrap());
        assert!(origins.seeders(&digest("x")).await.is_empty());
        assert!(matches!(origins.metainfo(&digest("x")).await, Err(OriginError::Unreachable(_))));
        assert!(matches!(Origins::new(vec![], Duration::from_secs(1)), Err(OriginsBuildError::NoOrigins)));
    }
}
