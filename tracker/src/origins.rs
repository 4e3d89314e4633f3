//! What the tracker asks the origins: a blob's metainfo (content-addressed, cached until
//! evicted) and which origins seed it (cached briefly). Every call has a timeout.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
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

/// Client of the origins with small bounded caches.
pub struct Origins {
    urls: Vec<String>,
    http: reqwest::Client,
    metainfo: Mutex<HashMap<Digest, Bytes>>,
    seeders: Mutex<HashMap<Digest, (Instant, Vec<PeerInfo>)>>,
    max_cached: usize,
    seeder_ttl: Duration,
}

impl Origins {
    pub fn new(urls: Vec<String>, timeout: Duration) -> Result<Origins, reqwest::Error> {
        let http = reqwest::Client::builder().timeout(timeout).connect_timeout(timeout).build()?;
        let urls = urls.into_iter().map(|u| u.trim_end_matches('/').to_string()).collect();
        Ok(Origins {
            urls,
            http,
            metainfo: Mutex::new(HashMap::new()),
            seeders: Mutex::new(HashMap::new()),
            max_cached: 10_000,
            seeder_ttl: Duration::from_secs(10),
        })
    }

    /// The blob's metainfo JSON, from the cache or the first origin that has it.
    pub async fn metainfo(&self, digest: &Digest) -> Result<Bytes, OriginError> {
        if let Some(m) = lock(&self.metainfo).get(digest) {
            return Ok(m.clone());
        }
        let mut last_error = None;
        for url in &self.urls {
            match self.http.get(format!("{url}{}", metainfo_path(digest))).send().await {
                Ok(r) if r.status().is_success() => match r.bytes().await {
                    Ok(body) => {
                        let mut cache = lock(&self.metainfo);
                        if cache.len() >= self.max_cached {
                            cache.clear(); // crude but bounded; metainfo is cheap to refetch
                        }
                        cache.insert(digest.clone(), body.clone());
                        return Ok(body);
                    }
                    Err(e) => last_error = Some(e.to_string()),
                },
                Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {}
                Ok(r) => last_error = Some(format!("{url}: status {}", r.status())),
                Err(e) => last_error = Some(format!("{url}: {e}")),
            }
        }
        match last_error {
            Some(e) => Err(OriginError::Unreachable(e)),
            None => Err(OriginError::Unknown(digest.clone())),
        }
    }

    /// Origins' peer listeners that hold the blob; empty when none answer.
    pub async fn seeders(&self, digest: &Digest) -> Vec<PeerInfo> {
        if let Some((at, s)) = lock(&self.seeders).get(digest) {
            if at.elapsed() < self.seeder_ttl {
                return s.clone();
            }
        }
        let mut found = Vec::new();
        for url in &self.urls {
            let response = self.http.get(format!("{url}{}", locations_path(digest))).send().await;
            let Ok(r) = response else { continue };
            if !r.status().is_success() {
                continue;
            }
            let Ok(body) = r.bytes().await else { continue };
            if let Ok(loc) = serde_json::from_slice::<Locations>(&body) {
                found.extend(loc.seeders.into_iter().map(|s| PeerInfo {
                    peer_id: s.peer_id,
                    addr: s.addr,
                    complete: true,
                    origin: true,
                }));
            }
        }
        found.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        found.dedup_by(|a, b| a.peer_id == b.peer_id);
        let mut cache = lock(&self.seeders);
        if cache.len() >= self.max_cached {
            cache.clear();
        }
        cache.insert(digest.clone(), (Instant::now(), found.clone()));
        found
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
