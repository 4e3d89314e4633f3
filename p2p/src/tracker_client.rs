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
/// How long an announce or a metainfo lookup waits for a tracker before it also asks the next
/// tracker for the digest, still waiting for the first: whichever answers first is taken. A
/// hung tracker held the first batch to meet it, and every download waiting for its first
/// peers, for the whole request timeout (10 s on agents); a slow but working one (a cold
/// lookup asks the origins, up to 5 s each) is not given up on, nor marked down.
pub const TRACKER_HEDGE_AFTER: Duration = Duration::from_secs(2);

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

    /// Announce to the digest's tracker, failing over to the next ones: a batch of one
    /// ([`TrackerClient::announce_many`]).
    pub async fn announce(&self, req: &AnnounceRequest) -> Result<AnnounceResponse, TrackerError> {
        let mut results = self.announce_many(std::slice::from_ref(req)).await;
        results.pop().unwrap_or(Err(TrackerError::NoTracker))
    }

    async fn announce_at(&self, url: &str, req: &AnnounceRequest) -> Result<AnnounceResponse, String> {
        let r = self.http.post(format!("{url}/v1/announce")).json(req).send().await;
        self.answered(url, r.is_ok());
        match r {
            Ok(r) if r.status().is_success() => {
                let body = read_limited(r).await.map_err(|e| format!("{url}: {e}"))?;
                serde_json::from_slice(&body).map_err(|e| format!("{url}: {e}"))
            }
            Ok(r) => Err(format!("{url}: status {}", r.status())),
            Err(e) => Err(format!("{url}: {e}")),
        }
    }

    /// Announce many blobs at once: each goes to its digest's tracker, one request per
    /// tracker (of at most [`MAX_ANNOUNCE_BATCH`]). An announce its tracker did not take goes
    /// to the next tracker for its digest, and one its
    /// tracker has not answered within [`TRACKER_HEDGE_AFTER`] goes there too, the first
    /// answer winning. A tracker without the batch endpoint (an older release) is sent the
    /// announces one by one. The results are in `reqs`' order.
    pub async fn announce_many(
        &self,
        reqs: &[AnnounceRequest],
    ) -> Vec<Result<AnnounceResponse, TrackerError>> {
        let mut tries = Tries::new(reqs.iter().map(|r| self.order_for(&r.digest)).collect());
        let mut results: Vec<Option<Result<AnnounceResponse, TrackerError>>> =
            (0..reqs.len()).map(|_| None).collect();
        let mut last: Vec<Option<String>> = vec![None; reqs.len()];
        let mut pending = futures_util::stream::FuturesUnordered::new();
        // Each batch out: its tracker and when it went.
        let mut out: HashMap<u64, (String, Instant)> = HashMap::new();
        let mut ids = 0..;
        let all: Vec<usize> = (0..reqs.len()).collect();
        pending.extend(self.batches(reqs, tries.next_rank(&all, Instant::now()), &mut ids, &mut out));
        while !pending.is_empty() && results.iter().any(Option::is_none) {
            let hedge = tries.hedge_at(|i| results[i].is_none());
            tokio::select! {
                Some((id, entries, answers)) = pending.next() => {
                    out.remove(&id);
                    let mut failed = Vec::new();
                    for (i, outcome) in entries.into_iter().zip(answers) {
                        tries.ended(i);
                        if results[i].is_some() {
                            continue;
                        }
                        match outcome {
                            Ok(resp) => results[i] = Some(Ok(resp)),
                            Err(e) => {
                                last[i] = Some(e);
                                if !tries.waiting(i) {
                                    failed.push(i);
                                }
                            }
                        }
                    }
                    pending.extend(self.batches(reqs, tries.next_rank(&failed, Instant::now()), &mut ids, &mut out));
                }
                _ = sleep_until_opt(hedge) => {
                    let now = Instant::now();
                    let slow = tries.due(now, |i| results[i].is_none());
                    pending.extend(self.batches(reqs, tries.next_rank(&slow, now), &mut ids, &mut out));
                }
            }
        }
        self.overtaken(out.into_values());
        results
            .into_iter()
            .zip(last)
            .map(|(r, last)| {
                r.unwrap_or_else(|| Err(last.map_or(TrackerError::NoTracker, TrackerError::AllFailed)))
            })
            .collect()
    }

    /// The requests for `groups` (a tracker and the announces it gets), at most
    /// [`MAX_ANNOUNCE_BATCH`] each, answering with the announces' indexes.
    /// Each is numbered from `ids` and listed in `out` with its tracker and start.
    fn batches<'a>(
        &'a self,
        reqs: &'a [AnnounceRequest],
        groups: Vec<(String, Vec<usize>)>,
        ids: &mut std::ops::RangeFrom<u64>,
        out: &mut HashMap<u64, (String, Instant)>,
    ) -> Vec<BatchSend<'a>> {
        let mut sends: Vec<BatchSend<'a>> = Vec::new();
        for (url, entries) in groups {
            for chunk in entries.chunks(MAX_ANNOUNCE_BATCH) {
                let batch: Vec<AnnounceRequest> = chunk.iter().map(|&i| reqs[i].clone()).collect();
                let entries = chunk.to_vec();
                let Some(id) = ids.next() else { continue };
                out.insert(id, (url.clone(), Instant::now()));
                let url = url.clone();
                sends.push(Box::pin(async move { (id, entries, self.post_batch(&url, batch).await) }));
            }
        }
        sends
    }

    /// Requests still out when another tracker answered for them: those out for longer than
    /// [`TRACKER_HEDGE_AFTER`] were overtaken by their hedge, and their tracker goes last for a
    /// while as if it had timed out (a hung tracker would otherwise cost every batch the
    /// hedge's wait). One that answers in time, however slowly, is never marked.
    fn overtaken(&self, out: impl IntoIterator<Item = (String, Instant)>) {
        for (url, began) in out {
            if began.elapsed() >= TRACKER_HEDGE_AFTER {
                tracing::debug!(%url, "a tracker was overtaken by the next one; tried last for a while");
                self.answered(&url, false);
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
            Ok(r) if r.status().is_success() => {
                match read_limited(r).await.and_then(|body| {
                    serde_json::from_slice::<AnnounceBatchResponse>(&body).map_err(|e| e.to_string())
                }) {
                    Ok(resp) if resp.results.len() == n => resp,
                    Ok(resp) => {
                        return all_failed(format!("{url}: {} results for {n} announces", resp.results.len()))
                    }
                    Err(e) => return all_failed(format!("{url}: {e}")),
                }
            }
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

    /// A blob's metainfo JSON from the digest's tracker; `None` if no tracker knows it. A
    /// tracker that has not answered within [`TRACKER_HEDGE_AFTER`] is joined by the next one,
    /// the first to have it winning.
    pub async fn metainfo(&self, digest: &Digest) -> Result<Option<Bytes>, TrackerError> {
        // A batch of one, tried as announces are ([`Tries`]).
        let mut tries = Tries::new(vec![self.order_for(digest)]);
        let mut last = None;
        let mut not_found = false;
        let mut pending = futures_util::stream::FuturesUnordered::new();
        let mut out: HashMap<String, Instant> = HashMap::new();
        loop {
            // The next tracker when none is out, or beside the one out when it is slow.
            let now = Instant::now();
            let mut ask = tries.due(now, |_| true);
            if !tries.waiting(0) {
                ask.push(0);
            }
            for (url, _) in tries.next_rank(&ask, now) {
                out.insert(url.clone(), now);
                pending.push(async move {
                    let outcome = self.metainfo_at(&url, digest).await;
                    (url, outcome)
                });
            }
            if pending.is_empty() {
                break;
            }
            tokio::select! {
                Some((url, outcome)) = pending.next() => {
                    tries.ended(0);
                    out.remove(&url);
                    match outcome {
                        Ok(Some(bytes)) => {
                            self.overtaken(out);
                            return Ok(Some(bytes));
                        }
                        Ok(None) => not_found = true,
                        Err(e) => last = Some(e),
                    }
                }
                _ = sleep_until_opt(tries.hedge_at(|_| true)) => {}
            }
        }
        if not_found {
            return Ok(None);
        }
        Err(last.map_or(TrackerError::NoTracker, TrackerError::AllFailed))
    }

    /// The metainfo from one tracker: `None` if it does not know the digest.
    async fn metainfo_at(&self, url: &str, digest: &Digest) -> Result<Option<Bytes>, String> {
        let sent = self.http.get(format!("{url}/v1/metainfo/{digest}")).send().await;
        self.answered(url, sent.is_ok());
        match sent {
            Ok(r) if r.status().is_success() => {
                read_limited(r).await.map(Some).map_err(|e| format!("{url}: {e}"))
            }
            Ok(r) if r.status() == StatusCode::NOT_FOUND => Ok(None),
            Ok(r) => Err(format!("{url}: status {}", r.status())),
            Err(e) => Err(format!("{url}: {e}")),
        }
    }
}

/// One batch's request to one tracker, answering with its number and its announces' indexes.
type BatchSend<'a> =
    futures_util::future::BoxFuture<'a, (u64, Vec<usize>, Vec<Result<AnnounceResponse, String>>)>;

/// Sleep until `at`, or forever without one (a `select!` branch that never fires).
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Which tracker each announce of a batch tries next, the attempts of it still out, and when
/// its latest began (for the hedge).
struct Tries {
    orders: Vec<Vec<String>>,
    next: Vec<usize>,
    out: Vec<usize>,
    began: Vec<Option<Instant>>,
}

impl Tries {
    fn new(orders: Vec<Vec<String>>) -> Tries {
        let n = orders.len();
        Tries { orders, next: vec![0; n], out: vec![0; n], began: vec![None; n] }
    }

    /// Send `entries` to their next tracker (those with one left), grouped by tracker.
    fn next_rank(&mut self, entries: &[usize], now: Instant) -> Vec<(String, Vec<usize>)> {
        let mut groups: HashMap<String, Vec<usize>> = HashMap::new();
        for &i in entries {
            let Some(url) = self.orders[i].get(self.next[i]) else { continue };
            groups.entry(url.clone()).or_default().push(i);
            self.next[i] += 1;
            self.out[i] += 1;
            self.began[i] = Some(now);
        }
        groups.into_iter().collect()
    }

    /// An attempt for announce (or lookup) `i` ended.
    fn ended(&mut self, i: usize) {
        self.out[i] = self.out[i].saturating_sub(1);
    }

    /// Whether an attempt for announce `i` is still out.
    fn waiting(&self, i: usize) -> bool {
        self.out[i] > 0
    }

    /// Announces still `open` whose latest attempt has waited [`TRACKER_HEDGE_AFTER`] and
    /// that have a tracker left to try.
    fn due(&self, now: Instant, open: impl Fn(usize) -> bool) -> Vec<usize> {
        (0..self.orders.len())
            .filter(|&i| open(i) && self.hedgeable(i))
            .filter(|&i| self.began[i].is_some_and(|b| now.duration_since(b) >= TRACKER_HEDGE_AFTER))
            .collect()
    }

    /// When the next hedge is due, if an announce still `open` could have one.
    fn hedge_at(&self, open: impl Fn(usize) -> bool) -> Option<Instant> {
        (0..self.orders.len())
            .filter(|&i| open(i) && self.hedgeable(i))
            .filter_map(|i| self.began[i].map(|b| b + TRACKER_HEDGE_AFTER))
            .min()
    }

    /// Whether announce `i` waits on an attempt and has a tracker left to ask beside it.
    fn hedgeable(&self, i: usize) -> bool {
        self.out[i] > 0 && self.next[i] < self.orders[i].len()
    }
}

/// A tracker's answer, at most [`MAX_TRACKER_ANSWER`] bytes.
async fn read_limited(r: reqwest::Response) -> Result<Bytes, String> {
    shoal_tls::read_body(r, MAX_TRACKER_ANSWER, false).await.map_err(|e| e.to_string())
}

/// Most bytes of a tracker's answer read: a metainfo of a 100 GiB blob in 1 MiB pieces is
/// about 6.5 MB of JSON, and a batch's handouts far less. A tracker that streams more (a
/// broken or hostile one) fails the call instead of filling the agent's memory.
pub const MAX_TRACKER_ANSWER: usize = 64 << 20;

#[cfg(test)]
mod tests;
