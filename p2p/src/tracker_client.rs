//! The tracker protocol and its client. Several trackers can run; each digest is handled by
//! the tracker that rendezvous hashing picks for it, and the next ones take over when it fails.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use shoal_registry::Digest;

use crate::rendezvous;

/// `POST /v1/announce`: "I am in the swarm of `digest`".
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnnounceRequest {
    pub digest: Digest,
    /// Hex of the 20-byte peer id.
    pub peer_id: String,
    /// Where other peers reach this one's peer listener.
    pub addr: SocketAddr,
    /// Holds every piece.
    pub complete: bool,
    /// Leaving the swarm: forget this peer.
    #[serde(default)]
    pub stopped: bool,
}

/// A peer as the tracker hands it out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Hex peer id (20 bytes).
    pub peer_id: String,
    pub addr: SocketAddr,
    /// Holds the whole blob.
    pub complete: bool,
    /// An origin that owns the blob.
    #[serde(default)]
    pub origin: bool,
}

/// The answer to an announce.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnnounceResponse {
    /// Announce again after this many seconds.
    pub interval_secs: u64,
    pub peers: Vec<PeerInfo>,
}

/// Most announces in one `POST /v1/announces`; a tracker refuses a larger batch (400). A
/// node seeding more blobs than this sends several batches.
pub const MAX_ANNOUNCE_BATCH: usize = 256;

/// Announces sent at once, one request each, to a tracker without the batch endpoint.
const OLD_TRACKER_PARALLEL: usize = 8;

/// `POST /v1/announces`: several announces of one node in one request (a node seeding
/// hundreds of blobs, or pulling many layers at once, would otherwise send one request per
/// blob every interval).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnnounceBatch {
    pub announces: Vec<AnnounceRequest>,
}

/// The answer to one announce of a batch: peers for a download (a complete peer or one that
/// is leaving gets none), or why this announce was refused.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AnnounceResult {
    #[serde(default)]
    pub peers: Vec<PeerInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The answer to a batch: one result per announce, in the batch's order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnnounceBatchResponse {
    /// Announce again after this many seconds.
    pub interval_secs: u64,
    pub results: Vec<AnnounceResult>,
}

/// A seeder of a blob as its origin reports it (`GET /shoal/v1/blobs/<digest>/locations`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Seeder {
    pub peer_id: String,
    pub addr: SocketAddr,
}

/// The origin's answer to a locations query.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Locations {
    pub seeders: Vec<Seeder>,
}

/// Path on an origin of a blob's metainfo.
pub fn metainfo_path(digest: &Digest) -> String {
    format!("/shoal/v1/blobs/{digest}/metainfo")
}

/// Path on an origin of a blob's seeders.
pub fn locations_path(digest: &Digest) -> String {
    format!("/shoal/v1/blobs/{digest}/locations")
}

/// Whether a peer id is 40 lowercase hex characters.
pub fn valid_peer_id(id: &str) -> bool {
    id.len() == 40 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Why no tracker answered.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("no tracker configured")]
    NoTracker,
    #[error("every tracker failed; last error: {0}")]
    AllFailed(String),
}

/// How long a tracker that did not answer (a timeout, a refused connection) is tried after
/// the others. Tried first again and again, one hung tracker cost every announce of the node
/// the whole request timeout, longer than a tracker remembers a peer.
pub const TRACKER_DOWN_FOR: Duration = Duration::from_secs(30);
/// How long an announce waits for a tracker that has not answered before it goes to the next
/// tracker for its digest (the last one gets the whole request timeout). A tracker answers in
/// milliseconds; a hung one held the first batch to meet it, and with it every download
/// waiting for its first peers, for the whole timeout (10 s on agents).
pub const TRACKER_FAILOVER_AFTER: Duration = Duration::from_secs(2);

/// Client of one or more trackers.
pub struct TrackerClient {
    urls: Vec<String>,
    http: reqwest::Client,
    /// Trackers that did not answer, and until when they go last.
    down: Mutex<HashMap<String, Instant>>,
}

impl TrackerClient {
    pub fn new(urls: Vec<String>, timeout: Duration) -> Result<TrackerClient, reqwest::Error> {
        let http = shoal_tls::http_client().timeout(timeout).connect_timeout(timeout).build()?;
        let urls = urls.into_iter().map(|u| u.trim_end_matches('/').to_string()).collect();
        Ok(TrackerClient { urls, http, down: Mutex::new(HashMap::new()) })
    }

    /// Trackers in the order to try for `digest`: the rendezvous winner first, but trackers
    /// that just failed to answer after the others. The ranking's hash is pinned (see
    /// [`rendezvous`]), so agents of every build pick the same tracker for a digest and its
    /// swarm is not split.
    pub fn order_for(&self, digest: &Digest) -> Vec<String> {
        let ranked = rendezvous::ranked(&digest.to_string(), &self.urls);
        let now = Instant::now();
        let down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        let (up, late): (Vec<String>, Vec<String>) =
            ranked.into_iter().partition(|url| down.get(url).is_none_or(|until| *until <= now));
        up.into_iter().chain(late).collect()
    }

    /// Whether `url` answered (anything: a status is an answer) or not (a transport error).
    fn answered(&self, url: &str, answered: bool) {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        if answered {
            down.remove(url);
        } else {
            down.insert(url.to_string(), Instant::now() + TRACKER_DOWN_FOR);
        }
    }

    /// Announce to the digest's tracker, failing over to the next ones.
    pub async fn announce(&self, req: &AnnounceRequest) -> Result<AnnounceResponse, TrackerError> {
        let mut last = None;
        for url in self.order_for(&req.digest) {
            match self.announce_at(&url, req).await {
                Ok(resp) => return Ok(resp),
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or(TrackerError::NoTracker, TrackerError::AllFailed))
    }

    async fn announce_at(&self, url: &str, req: &AnnounceRequest) -> Result<AnnounceResponse, String> {
        let r = self.http.post(format!("{url}/v1/announce")).json(req).send().await;
        self.answered(url, r.is_ok());
        match r {
            Ok(r) if r.status().is_success() => r.json().await.map_err(|e| format!("{url}: {e}")),
            Ok(r) => Err(format!("{url}: status {}", r.status())),
            Err(e) => Err(format!("{url}: {e}")),
        }
    }

    /// Announce many blobs at once: each goes to its digest's tracker, one request per
    /// tracker (of at most [`MAX_ANNOUNCE_BATCH`]), and an announce its tracker did not take
    /// goes to the next tracker for its digest, as [`TrackerClient::announce`] does. A
    /// tracker without the batch endpoint (an older release) is sent the announces one by
    /// one. The results are in `reqs`' order.
    pub async fn announce_many(
        &self,
        reqs: &[AnnounceRequest],
    ) -> Vec<Result<AnnounceResponse, TrackerError>> {
        let orders: Vec<Vec<String>> = reqs.iter().map(|r| self.order_for(&r.digest)).collect();
        let mut results: Vec<Option<Result<AnnounceResponse, TrackerError>>> =
            (0..reqs.len()).map(|_| None).collect();
        let mut last: Vec<Option<String>> = vec![None; reqs.len()];
        for rank in 0..self.urls.len() {
            let mut groups: HashMap<&str, Vec<usize>> = HashMap::new();
            for (i, order) in orders.iter().enumerate() {
                if results[i].is_none() {
                    if let Some(url) = order.get(rank) {
                        groups.entry(url.as_str()).or_default().push(i);
                    }
                }
            }
            // Not the last tracker to try: the next one rather than the whole timeout.
            let deadline = (rank + 1 < self.urls.len()).then_some(TRACKER_FAILOVER_AFTER);
            let mut sends = Vec::new();
            for (url, entries) in groups {
                for chunk in entries.chunks(MAX_ANNOUNCE_BATCH) {
                    let batch: Vec<AnnounceRequest> = chunk.iter().map(|&i| reqs[i].clone()).collect();
                    let entries = chunk.to_vec();
                    sends.push(async move { (entries, self.post_batch_within(url, batch, deadline).await) });
                }
            }
            let answers = futures_util::future::join_all(sends).await;
            for (entries, answer) in answers {
                for (i, outcome) in entries.into_iter().zip(answer) {
                    match outcome {
                        Ok(resp) => results[i] = Some(Ok(resp)),
                        Err(e) => last[i] = Some(e),
                    }
                }
            }
        }
        results
            .into_iter()
            .zip(last)
            .map(|(r, last)| {
                r.unwrap_or_else(|| Err(last.map_or(TrackerError::NoTracker, TrackerError::AllFailed)))
            })
            .collect()
    }

    /// [`TrackerClient::post_batch`] within `deadline` if there is one: a tracker that has not
    /// answered by then is tried after the others for a while, and the batch fails over.
    async fn post_batch_within(
        &self,
        url: &str,
        batch: Vec<AnnounceRequest>,
        deadline: Option<Duration>,
    ) -> Vec<Result<AnnounceResponse, String>> {
        let n = batch.len();
        let Some(deadline) = deadline else { return self.post_batch(url, batch).await };
        match tokio::time::timeout(deadline, self.post_batch(url, batch)).await {
            Ok(results) => results,
            Err(_) => {
                self.answered(url, false);
                let e = format!("{url}: no answer within {deadline:?}");
                (0..n).map(|_| Err(e.clone())).collect()
            }
        }
    }

    /// One batch to one tracker: a result per announce, in order.
    async fn post_batch(
        &self,
        url: &str,
        batch: Vec<AnnounceRequest>,
    ) -> Vec<Result<AnnounceResponse, String>> {
        let n = batch.len();
        let all_failed = |e: String| (0..n).map(|_| Err(e.clone())).collect::<Vec<_>>();
        let body = AnnounceBatch { announces: batch };
        let sent = self.http.post(format!("{url}/v1/announces")).json(&body).send().await;
        self.answered(url, sent.is_ok());
        let resp = match sent {
            Ok(r) if r.status().is_success() => match r.json::<AnnounceBatchResponse>().await {
                Ok(resp) if resp.results.len() == n => resp,
                Ok(resp) => {
                    return all_failed(format!("{url}: {} results for {n} announces", resp.results.len()))
                }
                Err(e) => return all_failed(format!("{url}: {e}")),
            },
            Ok(r) if matches!(r.status(), StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED) => {
                // A tracker from before batches: one request per announce.
                let mut one_by_one = Vec::with_capacity(n);
                for req in &body.announces {
                    one_by_one.push(self.announce_at(url, req));
                }
                return stream::iter(one_by_one).buffered(OLD_TRACKER_PARALLEL).collect().await;
            }
            Ok(r) => return all_failed(format!("{url}: status {}", r.status())),
            Err(e) => return all_failed(format!("{url}: {e}")),
        };
        let interval_secs = resp.interval_secs;
        resp.results
            .into_iter()
            .map(|r| match r.error {
                Some(e) => Err(format!("{url}: {e}")),
                None => Ok(AnnounceResponse { interval_secs, peers: r.peers }),
            })
            .collect()
    }

    /// A blob's metainfo JSON from the digest's tracker; `None` if no tracker knows it.
    pub async fn metainfo(&self, digest: &Digest) -> Result<Option<Bytes>, TrackerError> {
        let mut last = None;
        let mut not_found = false;
        let order = self.order_for(digest);
        let count = order.len();
        for (rank, url) in order.into_iter().enumerate() {
            let send = self.http.get(format!("{url}/v1/metainfo/{digest}")).send();
            // As announces do: the next tracker after TRACKER_FAILOVER_AFTER, unless none is left.
            let sent = if rank + 1 < count {
                match tokio::time::timeout(TRACKER_FAILOVER_AFTER, send).await {
                    Ok(sent) => sent,
                    Err(_) => {
                        self.answered(&url, false);
                        last = Some(format!("{url}: no answer within {TRACKER_FAILOVER_AFTER:?}"));
                        continue;
                    }
                }
            } else {
                send.await
            };
            self.answered(&url, sent.is_ok());
            match sent {
                Ok(r) if r.status().is_success() => match r.bytes().await {
                    Ok(b) => return Ok(Some(b)),
                    Err(e) => last = Some(format!("{url}: {e}")),
                },
                Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => not_found = true,
                Ok(r) => last = Some(format!("{url}: status {}", r.status())),
                Err(e) => last = Some(format!("{url}: {e}")),
            }
        }
        if not_found {
            return Ok(None);
        }
        Err(last.map_or(TrackerError::NoTracker, TrackerError::AllFailed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_stable_and_spreads_digests() {
        let client = TrackerClient::new(
            vec!["http://a".into(), "http://b".into(), "http://c".into()],
            Duration::from_secs(1),
        )
        .unwrap();
        let mut firsts = std::collections::HashSet::new();
        for i in 0..50 {
            let d = Digest::of(shoal_registry::Algorithm::Sha256, format!("{i}").as_bytes());
            let order = client.order_for(&d);
            assert_eq!(order.len(), 3);
            assert_eq!(order, client.order_for(&d));
            firsts.insert(order[0].clone());
        }
        assert_eq!(firsts.len(), 3, "every tracker leads for some digests");
    }

    /// A tracker that accepts and never answers costs one announce its timeout; the ones after
    /// go to the next tracker at once (it is tried last for a while), where every announce to
    /// it used to wait the timeout first.
    #[tokio::test]
    async fn a_hung_tracker_is_tried_last_after_it_failed() {
        let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hung_url = format!("http://{}", hung.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = hung.accept().await {
                held.push(sock); // accepted, never answered
            }
        });
        // A tracker that answers one announce per batch, enough for this test.
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_url = format!("http://{}", live.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = live.accept().await {
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = sock.read(&mut chunk).await else { return };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        let Some(end) = text.find("\r\n\r\n") else { continue };
                        let length = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().to_string())
                            })
                            .and_then(|v| v.parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() < end + 4 + length {
                            continue;
                        }
                        let body = r#"{"interval_secs":3,"results":[{"peers":[]}]}"#;
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = sock.write_all(answer.as_bytes()).await;
                        buf.clear();
                    }
                });
            }
        });
        let timeout = Duration::from_millis(800);
        let client = TrackerClient::new(vec![hung_url.clone(), live_url.clone()], timeout).unwrap();
        let led_by_hung = (0..100)
            .map(|i| Digest::of(shoal_registry::Algorithm::Sha256, format!("{i}").as_bytes()))
            .find(|d| client.order_for(d)[0] == hung_url)
            .unwrap();
        let req = AnnounceRequest {
            digest: led_by_hung.clone(),
            peer_id: "a".repeat(40),
            addr: "127.0.0.1:7000".parse().unwrap(),
            complete: true,
            stopped: false,
        };
        let started = Instant::now();
        assert!(client.announce_many(std::slice::from_ref(&req)).await[0].is_ok());
        assert!(started.elapsed() >= timeout, "the first announce met the hung tracker");
        let started = Instant::now();
        assert!(client.announce_many(std::slice::from_ref(&req)).await[0].is_ok());
        assert!(started.elapsed() < timeout / 2, "the second waited {:?}", started.elapsed());
        assert_ne!(client.order_for(&led_by_hung)[0], hung_url);

        // With the agents' 10 s timeout, the first batch to meet the hung tracker goes to the
        // next one after TRACKER_FAILOVER_AFTER, not after the timeout.
        let client =
            TrackerClient::new(vec![hung_url.clone(), live_url.clone()], Duration::from_secs(10)).unwrap();
        let started = Instant::now();
        assert!(client.announce_many(std::slice::from_ref(&req)).await[0].is_ok());
        let took = started.elapsed();
        assert!(took >= TRACKER_FAILOVER_AFTER && took < TRACKER_FAILOVER_AFTER * 2, "took {took:?}");
        assert_ne!(client.order_for(&led_by_hung)[0], hung_url);
        // A metainfo lookup fails over as soon (what the stand-in answers does not matter here).
        let fresh = TrackerClient::new(vec![hung_url.clone(), live_url], Duration::from_secs(10)).unwrap();
        let started = Instant::now();
        let _ = fresh.metainfo(&led_by_hung).await;
        assert!(started.elapsed() < TRACKER_FAILOVER_AFTER * 2, "metainfo took {:?}", started.elapsed());
        // The last tracker left gets the whole timeout: no failing over to nobody.
        let alone = TrackerClient::new(vec![hung_url], Duration::from_millis(2500)).unwrap();
        let started = Instant::now();
        assert!(alone.announce_many(std::slice::from_ref(&req)).await[0].is_err());
        assert!(started.elapsed() >= Duration::from_millis(2500), "{:?}", started.elapsed());
    }
}
