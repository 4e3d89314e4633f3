//! What the tracker asks the origins: a blob's metainfo (content-addressed, cached until
//! evicted) and which origins seed it (cached briefly). Every call has a timeout.
//!
//! The origins listed are one cluster, and any origin answers both questions for the whole
//! cluster (metainfo from an owner's copy, locations as every live owner's peer listener), so
//! each question goes to one origin, failing over to the next on a connection error, timeout,
//! 5xx or 429 ([`Failover`]), and the origin that answered is asked first next time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::StatusCode;
use shoal_p2p::failover::Failover;
use shoal_registry::Digest;

use crate::proto::{locations_path, metainfo_path, Locations, PeerInfo};

/// Why the origins could not answer.
#[derive(Debug, thiserror::Error)]
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

/// Client of the origins with small bounded caches.
pub struct Origins {
    origins: Failover,
    http: reqwest::Client,
    /// Cached metainfo, and the bytes it holds.
    metainfo: Mutex<(HashMap<Digest, Bytes>, usize)>,
    seeders: Mutex<HashMap<Digest, (Instant, Vec<PeerInfo>)>>,
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
            max_cached: 10_000,
            seeder_ttl: Duration::from_secs(10),
        })
    }

    /// The blob's metainfo JSON, from the cache or the first origin that answers.
    pub async fn metainfo(&self, digest: &Digest) -> Result<Bytes, OriginError> {
        if let Some(m) = lock(&self.metainfo).0.get(digest) {
            return Ok(m.clone());
        }
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
        let body = r.bytes().await.map_err(|e| OriginError::Unreachable(e.to_string()))?;
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

    /// Origins' peer listeners that hold the blob, as the first origin that answers lists them;
    /// empty when none answers.
    pub async fn seeders(&self, digest: &Digest) -> Vec<PeerInfo> {
        if let Some((at, s)) = lock(&self.seeders).get(digest) {
            if at.elapsed() < self.seeder_ttl {
                return s.clone();
            }
        }
        let found = match self.fetch_seeders(digest).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(%digest, error = %e, "no origin listed the blob's seeders");
                Vec::new()
            }
        };
        let mut cache = lock(&self.seeders);
        if cache.len() >= self.max_cached {
            cache.clear();
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
        let body = r.bytes().await.map_err(|e| OriginError::Unreachable(e.to_string()))?;
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

    fn closed_port() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }

    fn digest(s: &str) -> Digest {
        Digest::of(shoal_registry::Algorithm::Sha256, s.as_bytes())
    }

    #[tokio::test]
    async fn seeders_and_metainfo_fail_over_past_a_dead_origin() {
        let live = fake_origin(Http::OK).await;
        let origins = Origins::new(vec![closed_port(), live.clone()], Duration::from_secs(5)).unwrap();
        let seeders = origins.seeders(&digest("x")).await;
        assert_eq!(seeders.len(), 1);
        assert!(seeders[0].origin && seeders[0].complete);
        assert_eq!(origins.origins.preferred(), live, "the origin that answered is asked first");
        assert_eq!(&origins.metainfo(&digest("y")).await.unwrap()[..], b"{}");
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

    #[tokio::test]
    async fn no_live_origin_means_no_seeders_and_unreachable_metainfo() {
        let origins = Origins::new(vec![closed_port(), closed_port()], Duration::from_secs(5)).unwrap();
        assert!(origins.seeders(&digest("x")).await.is_empty());
        assert!(matches!(origins.metainfo(&digest("x")).await, Err(OriginError::Unreachable(_))));
        assert!(matches!(Origins::new(vec![], Duration::from_secs(1)), Err(OriginsBuildError::NoOrigins)));
    }
}
