//! [`RemoteNode`]: another origin, reached over its internal API
//! ([`crate::cluster::internal_api`]). It turns every transport failure into
//! [`NodeError::Unreachable`] so the cluster logic can simply try another replica, and every
//! call is bounded in time:
//! - small calls have a total timeout (`call_timeout`);
//! - blob reads have a connect timeout and a per-read timeout, but no total one, since a large
//!   blob may take long yet must never stall;
//! - blob writes have a connect timeout and a watchdog ([`crate::upload_watch`]): the upload
//!   fails when no body chunk is taken for `call_timeout`, or when no answer arrives within
//!   [`commit_timeout`] of the last byte.

use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::TryStreamExt;
use reqwest::header::{self, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use shoal_registry::range::ByteRange;
use shoal_registry::{ByteStream, Digest};

use crate::cluster::node::{BlobEntry, Node, NodeError, RecordPage, ScanPage};
use crate::cluster::record::{Record, RecordKey, RecordKind};
use crate::cluster::wire::{
    blob_path, metainfo_path, BlobListQuery, HealthReply, PurgeQuery, RepoListQuery, RepoQuery, ScanQuery,
    BLOBS, HEALTH, MAX_ERROR_TEXT, MAX_JSON_RESPONSE, MAX_RECORDS_BODY, MAX_RECORD_KEYS, QUARANTINE,
    RECORDS_APPLY, RECORDS_FORGET, RECORDS_GET, RECORDS_SCAN, REPAIR_PENDING, REPOS, SCAN_MORE,
    SCAN_PAGE_BYTES,
};

/// The shortest wait for a blob write's answer after its last byte: the remote verifies and
/// fsyncs the blob first, which takes longer than a small call for a large blob.
const MIN_COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a blob write may wait for its answer after the last byte was sent.
pub fn commit_timeout(call_timeout: Duration) -> Duration {
    call_timeout.max(MIN_COMMIT_TIMEOUT)
}

/// Another origin's [`Node`], over HTTP.
pub struct RemoteNode {
    id: String,
    /// `scheme://host:port`, without a trailing slash.
    base_url: String,
    /// `Bearer <secret>`, marked sensitive so it never reaches a log.
    auth: Option<HeaderValue>,
    /// Small calls: total timeout `call_timeout`.
    http: reqwest::Client,
    /// Blob reads: connect and per-read timeouts.
    bulk: reqwest::Client,
    /// Blob writes: connect timeout; the rest is [`RemoteNode::blob_put`]'s watchdog.
    upload: reqwest::Client,
    call_timeout: Duration,
}

impl std::fmt::Debug for RemoteNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteNode")
            .field("id", &self.id)
            .field("base_url", &self.base_url)
            .field("secret", &self.auth.as_ref().map(|_| "<redacted>"))
            .field("call_timeout", &self.call_timeout)
            .finish()
    }
}

impl RemoteNode {
    /// A client for the origin `id` whose internal API is at `base_url` (`http://host:port`).
    /// Proxy settings from the environment are ignored: origins talk to each other directly.
    pub fn new(
        id: String,
        base_url: String,
        secret: Option<String>,
        call_timeout: Duration,
    ) -> Result<RemoteNode, NodeError> {
        let refused = |reason: String| NodeError::Refused { node: id.clone(), reason };
        let url =
            reqwest::Url::parse(&base_url).map_err(|e| refused(format!("bad URL {base_url:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(refused(format!("bad URL {base_url:?}: must be http(s)://host:port")));
        }
        let auth = match secret {
            None => None,
            Some(s) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {s}"))
                    .map_err(|_| refused("the secret is not a valid header value".into()))?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        let build = |b: reqwest::ClientBuilder| {
            b.no_proxy().build().map_err(|e| refused(format!("building HTTP client: {e}")))
        };
        let http = build(shoal_tls::http_client().timeout(call_timeout))?;
        let bulk = build(shoal_tls::http_client().connect_timeout(call_timeout).read_timeout(call_timeout))?;
        let upload = build(shoal_tls::http_client().connect_timeout(call_timeout))?;
        let base_url = base_url.trim_end_matches('/').to_string();
        Ok(RemoteNode { id, base_url, auth, http, bulk, upload, call_timeout })
    }

    /// The origin's health answer: who it is and where it seeds.
    pub async fn health(&self) -> Result<HealthReply, NodeError> {
        let resp = self.send(self.request(&self.http, Method::GET, HEALTH)).await?;
        match resp.status() {
            StatusCode::OK => self.json(resp).await,
            _ => Err(self.refusal(resp).await),
        }
    }

    fn request(&self, client: &reqwest::Client, method: Method, path: &str) -> RequestBuilder {
        let rb = client.request(method, format!("{}{path}", self.base_url));
        match &self.auth {
            Some(v) => rb.header(header::AUTHORIZATION, v.clone()),
            None => rb,
        }
    }

    fn unreachable(&self, reason: String) -> NodeError {
        NodeError::Unreachable { node: self.id.clone(), reason }
    }

    fn refused(&self, reason: String) -> NodeError {
        NodeError::Refused { node: self.id.clone(), reason }
    }

    async fn send(&self, rb: RequestBuilder) -> Result<Response, NodeError> {
        rb.send().await.map_err(|e| self.unreachable(error_chain(&e)))
    }

    /// The error an unexpected answer stands for (see [`crate::cluster::internal_api`]).
    async fn refusal(&self, resp: Response) -> NodeError {
        let status = resp.status();
        let text = self.read_bounded(resp, MAX_ERROR_TEXT, true).await.unwrap_or_default();
        let reason = format!("{status}: {}", String::from_utf8_lossy(&text).trim());
        match status {
            StatusCode::INSUFFICIENT_STORAGE => NodeError::StorageFull,
            StatusCode::CONFLICT => NodeError::ClockRefused { node: self.id.clone(), reason },
            StatusCode::INTERNAL_SERVER_ERROR => NodeError::Storage { node: self.id.clone(), reason },
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => {
                self.unreachable(reason)
            }
            _ => self.refused(reason),
        }
    }

    /// The answer's body, at most `limit` bytes: beyond that an error, or (with `truncate`)
    /// the first `limit` bytes.
    async fn read_bounded(
        &self,
        mut resp: Response,
        limit: usize,
        truncate: bool,
    ) -> Result<Bytes, NodeError> {
        if !truncate && resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(self.refused(format!("answer is larger than {limit} bytes")));
        }
        let mut buf = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.unreachable(error_chain(&e)))? {
            if buf.len() + chunk.len() > limit {
                if truncate {
                    buf.extend_from_slice(&chunk[..limit - buf.len()]);
                    break;
                }
                return Err(self.refused(format!("answer is larger than {limit} bytes")));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }

    async fn json<T: DeserializeOwned>(&self, resp: Response) -> Result<T, NodeError> {
        let body = self.read_bounded(resp, MAX_JSON_RESPONSE, false).await?;
        serde_json::from_slice(&body).map_err(|e| self.refused(format!("bad JSON answer: {e}")))
    }

    /// One `records/apply` call with an already serialised JSON array.
    /// POST `records` to `path` as JSON arrays, each within the body limit.
    async fn post_records(&self, path: &str, repo: &str, records: &[Record]) -> Result<(), NodeError> {
        let mut batch = Vec::new();
        for record in records {
            let json =
                serde_json::to_vec(record).map_err(|e| self.refused(format!("encoding record: {e}")))?;
            if json.len() + 2 > MAX_RECORDS_BODY {
                return Err(self.refused(format!("record {:?} is too large to send", record.key)));
            }
            if !batch.is_empty() && batch.len() + json.len() + 2 > MAX_RECORDS_BODY {
                batch.push(b']');
                self.post_batch(path, repo, std::mem::take(&mut batch)).await?;
            }
            batch.push(if batch.is_empty() { b'[' } else { b',' });
            batch.extend_from_slice(&json);
        }
        if !batch.is_empty() {
            batch.push(b']');
            self.post_batch(path, repo, batch).await?;
        }
        Ok(())
    }

    async fn post_batch(&self, path: &str, repo: &str, body: Vec<u8>) -> Result<(), NodeError> {
        let rb = self
            .request(&self.http, Method::POST, path)
            .query(&RepoQuery { repo: repo.to_string() })
            .header(header::CONTENT_TYPE, "application/json")
            .body(body);
        let resp = self.send(rb).await?;
        match resp.status() {
            StatusCode::NO_CONTENT | StatusCode::OK => Ok(()),
            _ => Err(self.refusal(resp).await),
        }
    }
}

/// A reqwest error with its causes, since its own message rarely says what went wrong.
fn error_chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn io_error(e: reqwest::Error) -> std::io::Error {
    let kind = if e.is_timeout() { std::io::ErrorKind::TimedOut } else { std::io::ErrorKind::Other };
    std::io::Error::new(kind, error_chain(&e))
}

#[async_trait]
impl Node for RemoteNode {
    fn id(&self) -> &str {
        &self.id
    }

    async fn blob_stat(&self, digest: &Digest) -> Result<Option<u64>, NodeError> {
        let resp = self.send(self.request(&self.http, Method::HEAD, &blob_path(digest))).await?;
        match resp.status() {
            StatusCode::OK => {
                let size = resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok());
                match size.and_then(|s| s.parse().ok()) {
                    Some(size) => Ok(Some(size)),
                    None => Err(self.refused("HEAD answer without a valid Content-Length".into())),
                }
            }
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.refusal(resp).await),
        }
    }

    async fn blob_get(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>, NodeError> {
        let mut rb = self.request(&self.bulk, Method::GET, &blob_path(digest));
        if let Some(r) = range {
            rb = rb.header(header::RANGE, format!("bytes={}-{}", r.start, r.end));
        }
        let resp = self.send(rb).await?;
        let expected = if range.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
        match resp.status() {
            s if s == expected => Ok(Some(Box::pin(resp.bytes_stream().map_err(io_error)))),
            StatusCode::NOT_FOUND => Ok(None),
            StatusCode::OK => Err(self.refused("answered the whole blob to a range request".into())),
            _ => Err(self.refusal(resp).await),
        }
    }

    async fn blob_put(&self, digest: &Digest, size: u64, body: ByteStream) -> Result<(), NodeError> {
        let (watched, watch) = crate::upload_watch::watch(body);
        let rb = self
            .request(&self.upload, Method::PUT, &blob_path(digest))
            .header(header::CONTENT_LENGTH, size)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(watched));
        let (idle, commit) = (self.call_timeout, commit_timeout(self.call_timeout));
        let resp =
            watch.run(self.send(rb), idle, commit).await.map_err(|reason| self.unreachable(reason))??;
        match resp.status() {
            StatusCode::CREATED | StatusCode::OK | StatusCode::NO_CONTENT => Ok(()),
            StatusCode::BAD_REQUEST => Err(NodeError::Corrupt(digest.clone())),
            _ => Err(self.refusal(resp).await),
        }
    }

    async fn blob_remove(&self, digest: &Digest) -> Result<bool, NodeError> {
        let resp = self.send(self.request(&self.http, Method::DELETE, &blob_path(digest))).await?;
        match resp.status() {
            StatusCode::NO_CONTENT | StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.refusal(resp).await),
        }
    }

    async fn blob_list(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<BlobEntry>, NodeError> {
        let query = BlobListQuery { after: after.cloned(), n: Some(limit) };
        let resp = self.send(self.request(&self.http, Method::GET, BLOBS).query(&query)).await?;
        match resp.status() {
            StatusCode::OK => self.json(resp).await,
            _ => Err(self.refusal(resp).await),
        }
    }

    async fn blob_quarantine(&self, digest: &Digest) -> Result<bool, NodeError> {
        let path = format!("{}/quarantine", blob_path(digest));
        let resp = self.send(self.request(&self.http, Method::POST, &path)).await?;
        match resp.status() {
            StatusCode::NO_CONTENT | StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.refusal(resp).await),
        }
    }

    async fn blob_restore(&self, digest: &Digest) -> Result<bool, NodeError> {
        let path = format!("{}/restore", blob_path(digest));
        let resp = self.send(self.request(&self.http, Method::POST, &path)).await?;
        match resp.status() {
            StatusCode::NO_CONTENT | StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.refusal(resp).await),
        }
    }

    async fn quarantine_list(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<BlobEntry>, NodeError> {
        let query = BlobListQuery { after: after.cloned(), n: Some(limit) };
        let resp = self.send(self.request(&self.http, Method::GET, QUARANTINE).query(&query)).await?;
        match resp.status() {
            StatusCode::OK => self.json(resp).await,
            _ => Err(self.refusal(resp).await),
        }
    }

    async fn blob_purge(&self, digest: &Digest, since: u64) -> Result<Option<u64>, NodeError> {
        let path = format!("{QUARANTINE}/{digest}");
        let resp =
            self.send(self.request(&self.http, Method::DELETE, &path).query(&PurgeQuery { since })).await?;
        match resp.status() {
            StatusCode::OK => self.json(resp).await.map(Some),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.refusal(resp).await),
        }
    }

    async fn repair_pending(&self) -> Result<u64, NodeError> {
        let resp = self.send(self.request(&self.http, Method::GET, REPAIR_PENDING)).await?;
        match resp.status() {
            StatusCode::OK => self.json(resp).await,
            _ => Err(self.refusal(resp).await),
        }
    }

    async fn records_get(&self, repo: &str, keys: &[RecordKey]) -> Result<Vec<Option<Record>>, NodeError> {
        let mut out = Vec::with_capacity(keys.len());
        for batch in keys.chunks(MAX_RECORD_KEYS) {
            let rb = self
                .request(&self.http, Method::POST, RECORDS_GET)
                .query(&RepoQuery { repo: repo.to_string() })
                .json(batch);
            let resp = self.send(rb).await?;
            let got: Vec<Option<Record>> = match resp.status() {
                StatusCode::OK => self.json(resp).await?,
                _ => return Err(self.refusal(resp).await),
            };
            if got.len() != batch.len() {
                return Err(self.refused(format!("{} records for {} keys", got.len(), batch.len())));
            }
            out.extend(got);
        }
        Ok(out)
    }

    /// Page by page, so a repository with many large manifests never needs one answer larger
    /// than the client reads; an origin of an earlier release answers everything at once
    /// and never says more follows.
    async fn records_scan(
        &self,
        repo: &str,
        kind: RecordKind,
        subject: Option<&Digest>,
    ) -> Result<Option<Vec<Record>>, NodeError> {
        let mut page = ScanPage { after: None, max_bytes: SCAN_PAGE_BYTES };
        let mut out = Vec::new();
        loop {
            let Some(answer) = self.records_page(repo, kind, subject, &page).await? else {
                // A repository forgotten between pages has no records left here.
                return Ok(if page.after.is_none() { None } else { Some(out) });
            };
            let last = answer.records.last().map(|r| r.key.name());
            out.extend(answer.records);
            if !answer.more {
                return Ok(Some(out));
            }
            // Pages go forward in key order; one that does not would be asked again forever.
            match last {
                Some(last) if page.after.as_ref().is_none_or(|after| last > *after) => {
                    page.after = Some(last)
                }
                _ => {
                    return Err(
                        self.refused("a records page that said more follow did not move on".to_string())
                    )
                }
            }
        }
    }

    async fn records_page(
        &self,
        repo: &str,
        kind: RecordKind,
        subject: Option<&Digest>,
        page: &ScanPage,
    ) -> Result<Option<RecordPage>, NodeError> {
        let query = ScanQuery {
            repo: repo.to_string(),
            kind,
            subject: subject.cloned(),
            max_bytes: Some(page.max_bytes),
            after: page.after.clone(),
        };
        let resp = self.send(self.request(&self.http, Method::GET, RECORDS_SCAN).query(&query)).await?;
        match resp.status() {
            StatusCode::OK => {
                let more = resp.headers().contains_key(SCAN_MORE);
                Ok(Some(RecordPage { records: self.json(resp).await?, more }))
            }
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.refusal(resp).await),
        }
    }

    /// Sent in batches that each fit the server's body limit; merging is idempotent, so a
    /// failure part-way leaves nothing a retry cannot complete.
    async fn records_apply(&self, repo: &str, records: &[Record]) -> Result<(), NodeError> {
        self.post_records(RECORDS_APPLY, repo, records).await
    }

    async fn records_forget(&self, repo: &str, confirmed: &[Record]) -> Result<(), NodeError> {
        self.post_records(RECORDS_FORGET, repo, confirmed).await
    }

    async fn repos(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, NodeError> {
        let query = RepoListQuery { after: after.map(str::to_string), n: Some(limit) };
        let resp = self.send(self.request(&self.http, Method::GET, REPOS).query(&query)).await?;
        match resp.status() {
            StatusCode::OK => self.json(resp).await,
            _ => Err(self.refusal(resp).await),
        }
    }

    async fn metainfo(&self, digest: &Digest) -> Result<Option<Bytes>, NodeError> {
        let resp = self.send(self.request(&self.http, Method::GET, &metainfo_path(digest))).await?;
        match resp.status() {
            StatusCode::OK => Ok(Some(self.read_bounded(resp, MAX_JSON_RESPONSE, false).await?)),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.refusal(resp).await),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Instant;

    use futures_util::StreamExt;
    use shoal_registry::Algorithm;

    use super::*;
    use crate::cluster::record::{ManifestValue, RecordValue, Version};
    use crate::cluster::testing::{serve, MemNode};

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn client(addr: std::net::SocketAddr, secret: Option<&str>, timeout: Duration) -> RemoteNode {
        RemoteNode::new(addr.to_string(), format!("http://{addr}/"), secret.map(str::to_string), timeout)
            .unwrap()
    }

    fn stream_of(data: &[u8]) -> ByteStream {
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            data.chunks(4096).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        Box::pin(futures_util::stream::iter(chunks))
    }

    async fn collect(stream: ByteStream) -> Vec<u8> {
        stream.map(|c| c.unwrap().to_vec()).concat().await
    }

    fn digest_of(data: &[u8]) -> Digest {
        Digest::of(Algorithm::Sha256, data)
    }

    #[tokio::test]
    async fn blobs_round_trip() {
        let node = MemNode::new("a:1");
        let addr = serve(node.clone(), Some("s")).await;
        let remote = client(addr, Some("s"), TIMEOUT);
        assert_eq!(remote.id(), addr.to_string());
        assert_eq!(remote.health().await.unwrap().id, "a:1");

        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let d = digest_of(&data);
        assert_eq!(remote.blob_stat(&d).await.unwrap(), None);
        assert!(remote.blob_get(&d, None).await.unwrap().is_none());
        remote.blob_put(&d, data.len() as u64, stream_of(&data)).await.unwrap();
        assert_eq!(remote.blob_stat(&d).await.unwrap(), Some(data.len() as u64));
        assert_eq!(collect(remote.blob_get(&d, None).await.unwrap().unwrap()).await, data);
        let range = ByteRange { start: 1000, end: 54_321 };
        let part = collect(remote.blob_get(&d, Some(range)).await.unwrap().unwrap()).await;
        assert_eq!(part, &data[1000..=54_321]);

        let empty = digest_of(b"");
        remote.blob_put(&empty, 0, stream_of(b"")).await.unwrap();
        assert_eq!(remote.blob_stat(&empty).await.unwrap(), Some(0));
        assert!(collect(remote.blob_get(&empty, None).await.unwrap().unwrap()).await.is_empty());

        let all = remote.blob_list(None, 100).await.unwrap();
        let expected: BTreeSet<Digest> = [d.clone(), empty.clone()].into();
        assert_eq!(all.iter().map(|e| e.digest.clone()).collect::<BTreeSet<_>>(), expected);
        assert!(all.iter().all(|e| e.stored_millis == 1234));
        let first = remote.blob_list(None, 1).await.unwrap();
        assert_eq!(first, all[..1]);
        assert_eq!(remote.blob_list(Some(&first[0].digest), 10).await.unwrap(), all[1..]);

        assert_eq!(remote.metainfo(&d).await.unwrap(), None);
        node.set_metainfo(&d, br#"{"pieces":[]}"#);
        assert_eq!(remote.metainfo(&d).await.unwrap().unwrap(), &br#"{"pieces":[]}"#[..]);

        assert!(remote.blob_remove(&d).await.unwrap());
        assert!(!remote.blob_remove(&d).await.unwrap());
        assert_eq!(remote.blob_stat(&d).await.unwrap(), None);
        assert!(remote.blob_get(&d, Some(range)).await.unwrap().is_none());
    }

    fn v(millis: u64) -> Version {
        Version::new(millis, "a:1")
    }

    fn manifest(digest: &Digest, subject: Option<&Digest>, millis: u64) -> Record {
        let value = ManifestValue {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes: "{}".into(),
            blobs: vec![],
            children: vec![],
            subject: subject.cloned(),
            referrer: None,
        };
        Record {
            key: RecordKey::Manifest(digest.clone()),
            version: v(millis),
            value: Some(RecordValue::Manifest(Box::new(value))),
            expect: None,
        }
    }

    /// The paged scan over the wire against a real store: pages of the asked size that say
    /// when more follow, `after` continuing where a page ended, and the whole answer for a
    /// caller of an earlier release that asks no page.
    #[tokio::test]
    async fn record_scans_page_over_the_wire() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::StoreConfig {
            data_dir: dir.path().to_path_buf(),
            upload_idle_timeout: Duration::from_secs(3600),
            max_upload_sessions: 10,
        };
        let store = crate::store::OriginStore::open(config).await.unwrap();
        let records: Vec<Record> = (0..10u8)
            .map(|i| manifest(&Digest::of(Algorithm::Sha256, &[i]), None, u64::from(i) + 1))
            .collect();
        store.records_apply("team/app", &records).await.unwrap();
        let addr = serve(crate::cluster::local::LocalNode::new("a:1", store), None).await;
        let remote = client(addr, None, TIMEOUT);
        let one = serde_json::to_string(&records[0]).unwrap().len();

        let mut page = ScanPage { after: None, max_bytes: 3 * one };
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let answer =
                remote.records_page("team/app", RecordKind::Manifest, None, &page).await.unwrap().unwrap();
            pages += 1;
            assert!(answer.records.len() <= 3);
            page.after = answer.records.last().map(|r| r.key.name());
            seen.extend(answer.records);
            if !answer.more {
                break;
            }
        }
        assert_eq!((pages, seen.len()), (4, 10));
        let mut all = remote.records_scan("team/app", RecordKind::Manifest, None).await.unwrap().unwrap();
        all.sort_by_key(|r| r.key.name());
        assert_eq!(all, seen);

        // A caller of an earlier release: no page asked, every record in one answer, no header.
        let url = format!("http://{addr}{RECORDS_SCAN}?repo=team%2Fapp&kind=manifest");
        let old = reqwest::get(url).await.unwrap();
        assert!(!old.headers().contains_key(SCAN_MORE));
        assert_eq!(old.json::<Vec<Record>>().await.unwrap().len(), 10);
    }

    #[tokio::test]
    async fn records_round_trip() {
        let addr = serve(MemNode::new("a:1"), None).await;
        let remote = client(addr, None, TIMEOUT);
        let (m1, m2, layer) = (digest_of(b"m1"), digest_of(b"m2"), digest_of(b"layer"));
        let link = Record {
            key: RecordKey::Link(layer.clone()),
            version: v(1),
            value: Some(RecordValue::Link { size: 5 }),
            expect: None,
        };
        let tag = Record {
            key: RecordKey::Tag("latest".into()),
            version: v(2),
            value: Some(RecordValue::Tag { digest: m1.clone() }),
            expect: None,
        };
        let gone = Record::new(RecordKey::Tag("old".into()), v(3), None);
        let (base, referrer) = (manifest(&m1, None, 4), manifest(&m2, Some(&m1), 5));
        let all = [link.clone(), tag.clone(), gone.clone(), base.clone(), referrer.clone()];

        assert_eq!(remote.records_scan("team/app", RecordKind::Tag, None).await.unwrap(), None);
        remote.records_apply("team/app", &all).await.unwrap();
        remote.records_apply("other", std::slice::from_ref(&tag)).await.unwrap();
        remote.records_apply("team/app", &[]).await.unwrap();

        let keys = [tag.key.clone(), RecordKey::Tag("missing".into()), link.key.clone(), gone.key.clone()];
        let got = remote.records_get("team/app", &keys).await.unwrap();
        assert_eq!(got, vec![Some(tag.clone()), None, Some(link.clone()), Some(gone.clone())]);
        assert_eq!(remote.records_get("nothing/here", &keys[..1]).await.unwrap(), vec![None]);
        assert!(remote.records_get("team/app", &[]).await.unwrap().is_empty());

        // Last writer wins across the wire too: an older tag changes nothing.
        let stale =
            Record { version: v(1), value: Some(RecordValue::Tag { digest: m2.clone() }), ..tag.clone() };
        remote.records_apply("team/app", &[stale]).await.unwrap();
        assert_eq!(remote.records_get("team/app", &keys[..1]).await.unwrap(), vec![Some(tag.clone())]);

        let scan = |kind, subject| remote.records_scan("team/app", kind, subject);
        let mut tags = scan(RecordKind::Tag, None).await.unwrap().unwrap();
        tags.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(tags, vec![tag.clone(), gone.clone()]);
        assert_eq!(scan(RecordKind::Link, None).await.unwrap().unwrap(), vec![link.clone()]);
        assert_eq!(scan(RecordKind::Manifest, None).await.unwrap().unwrap().len(), 2);
        assert_eq!(scan(RecordKind::Manifest, Some(&m1)).await.unwrap().unwrap(), vec![referrer.clone()]);

        assert_eq!(remote.repos(None, 10).await.unwrap(), vec!["other".to_string(), "team/app".to_string()]);
        assert_eq!(remote.repos(None, 1).await.unwrap(), vec!["other".to_string()]);
        assert_eq!(remote.repos(Some("other"), 10).await.unwrap(), vec!["team/app".to_string()]);

        let mut all: Vec<Record> = Vec::new();
        for kind in [RecordKind::Link, RecordKind::Manifest, RecordKind::Tag] {
            all.extend(remote.records_scan("team/app", kind, None).await.unwrap().unwrap());
        }
        // A record that changed since it was confirmed is kept.
        let (changed, rest) = all.split_first().unwrap();
        let newer = Record { version: Version::new(changed.version.millis + 1, "z:9"), ..changed.clone() };
        remote.records_apply("team/app", std::slice::from_ref(&newer)).await.unwrap();
        remote.records_forget("team/app", &all).await.unwrap();
        let kept = remote.records_get("team/app", std::slice::from_ref(&changed.key)).await.unwrap();
        assert_eq!(kept, vec![Some(newer.clone())]);
        assert!(!rest.is_empty());
        remote.records_forget("team/app", std::slice::from_ref(&newer)).await.unwrap();
        assert_eq!(remote.records_scan("team/app", RecordKind::Tag, None).await.unwrap(), None);
        assert_eq!(remote.repos(None, 10).await.unwrap(), vec!["other".to_string()]);
    }

    #[tokio::test]
    async fn more_keys_than_one_call_takes_are_batched() {
        let addr = serve(MemNode::new("a:1"), None).await;
        let remote = client(addr, None, TIMEOUT);
        let tag = Record {
            key: RecordKey::Tag("t5".into()),
            version: v(1),
            value: Some(RecordValue::Tag { digest: digest_of(b"x") }),
            expect: None,
        };
        remote.records_apply("r", std::slice::from_ref(&tag)).await.unwrap();
        let keys: Vec<RecordKey> =
            (0..MAX_RECORD_KEYS + 10).map(|i| RecordKey::Tag(format!("t{i}"))).collect();
        let got = remote.records_get("r", &keys).await.unwrap();
        assert_eq!(got.len(), keys.len());
        assert_eq!(got.iter().flatten().collect::<Vec<_>>(), vec![&tag]);
    }

    #[tokio::test]
    async fn wrong_content_is_corrupt_and_not_stored() {
        let node = MemNode::new("a:1");
        let addr = serve(node.clone(), None).await;
        let remote = client(addr, None, TIMEOUT);
        let d = digest_of(b"the real content");
        let err = remote.blob_put(&d, 16, stream_of(b"not the content!")).await.unwrap_err();
        assert!(matches!(err, NodeError::Corrupt(ref c) if *c == d), "{err:?}");
        assert_eq!(node.blob_count(), 0);
        assert_eq!(remote.blob_stat(&d).await.unwrap(), None);
    }

    #[tokio::test]
    async fn storage_errors_cross_the_wire() {
        let node = MemNode::new("a:1");
        let addr = serve(node.clone(), None).await;
        let remote = client(addr, None, TIMEOUT);
        let d = digest_of(b"x");
        node.fail_puts(|_| NodeError::StorageFull);
        assert!(matches!(remote.blob_put(&d, 1, stream_of(b"x")).await, Err(NodeError::StorageFull)));
        node.fail_puts(|n| NodeError::Storage { node: n.into(), reason: "disk on fire".into() });
        let err = remote.blob_put(&d, 1, stream_of(b"x")).await.unwrap_err();
        assert!(
            matches!(err, NodeError::Storage { ref reason, .. } if reason.contains("disk on fire")),
            "{err:?}"
        );
        node.fail_puts(|n| NodeError::Unreachable { node: n.into(), reason: "peer gone".into() });
        let err = remote.blob_put(&d, 1, stream_of(b"x")).await.unwrap_err();
        assert!(matches!(err, NodeError::Unreachable { .. }), "{err:?}");
        node.fail_puts(|n| NodeError::Refused { node: n.into(), reason: "no".into() });
        let err = remote.blob_put(&d, 1, stream_of(b"x")).await.unwrap_err();
        assert!(matches!(err, NodeError::Refused { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn wrong_or_missing_secret_is_refused() {
        let addr = serve(MemNode::new("a:1"), Some("right")).await;
        let d = digest_of(b"x");
        for remote in [client(addr, Some("wrong"), TIMEOUT), client(addr, None, TIMEOUT)] {
            let err = remote.blob_stat(&d).await.unwrap_err();
            assert!(
                matches!(err, NodeError::Refused { ref reason, .. } if reason.contains("401")),
                "{err:?}"
            );
            let err = remote.blob_put(&d, 1, stream_of(b"x")).await.unwrap_err();
            assert!(matches!(err, NodeError::Refused { .. }), "{err:?}");
            assert!(matches!(remote.health().await, Err(NodeError::Refused { .. })));
            assert!(matches!(remote.repos(None, 1).await, Err(NodeError::Refused { .. })));
        }
        assert!(format!("{:?}", client(addr, Some("right"), TIMEOUT)).contains("<redacted>"));
        assert!(!format!("{:?}", client(addr, Some("right"), TIMEOUT)).contains("right"));
    }

    #[tokio::test]
    async fn closed_port_is_unreachable_quickly() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let remote = client(addr, None, Duration::from_secs(2));
        let d = digest_of(b"x");
        let started = Instant::now();
        assert!(matches!(remote.blob_stat(&d).await, Err(NodeError::Unreachable { .. })));
        assert!(matches!(remote.blob_get(&d, None).await, Err(NodeError::Unreachable { .. })));
        assert!(matches!(remote.blob_put(&d, 1, stream_of(b"x")).await, Err(NodeError::Unreachable { .. })));
        assert!(matches!(
            remote.records_scan("r", RecordKind::Tag, None).await,
            Err(NodeError::Unreachable { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn silent_node_is_unreachable_after_the_timeout() {
        // Connections complete in the kernel's backlog, but nothing ever answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let timeout = Duration::from_millis(300);
        let remote = client(addr, None, timeout);
        let d = digest_of(b"x");
        for call in 0..2 {
            let started = Instant::now();
            let result = if call == 0 {
                remote.blob_stat(&d).await.map(|_| ())
            } else {
                remote.blob_get(&d, None).await.map(|_| ())
            };
            assert!(matches!(result, Err(NodeError::Unreachable { .. })), "{result:?}");
            let took = started.elapsed();
            assert!(took >= timeout && took < timeout * 5, "{took:?}");
        }
        drop(listener);
    }

    #[tokio::test]
    async fn stalled_upload_is_abandoned() {
        let node = MemNode::new("a:1");
        let addr = serve(node.clone(), None).await;
        let timeout = Duration::from_millis(300);
        let remote = client(addr, None, timeout);
        let first: Result<Bytes, std::io::Error> = Ok(Bytes::from_static(b"abc"));
        let body: ByteStream =
            Box::pin(futures_util::stream::iter([first]).chain(futures_util::stream::pending()));
        let started = Instant::now();
        let err = remote.blob_put(&digest_of(b"abcdef"), 6, body).await.unwrap_err();
        assert!(
            matches!(err, NodeError::Unreachable { ref reason, .. } if reason.contains("no progress")),
            "{err:?}"
        );
        assert!(started.elapsed() < timeout * 5);
        assert_eq!(node.blob_count(), 0);
    }

    #[tokio::test]
    async fn slow_upload_outlasts_the_call_timeout() {
        let node = MemNode::new("a:1");
        let addr = serve(node.clone(), None).await;
        let timeout = Duration::from_millis(300);
        let remote = client(addr, None, timeout);
        let data = b"0123456789ab".to_vec();
        let chunks =
            data.chunks(2).map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c))).collect::<Vec<_>>();
        let body: ByteStream = Box::pin(futures_util::stream::iter(chunks).then(|c| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c
        }));
        let started = Instant::now();
        remote.blob_put(&digest_of(&data), data.len() as u64, body).await.unwrap();
        assert!(started.elapsed() > timeout, "the upload really was slower than one call may take");
        assert_eq!(node.blob_count(), 1);
    }

    #[test]
    fn bad_urls_and_secrets_are_refused() {
        let new = |url: &str, secret: Option<&str>| {
            RemoteNode::new("n".into(), url.into(), secret.map(str::to_string), TIMEOUT)
        };
        assert!(matches!(new("not a url", None), Err(NodeError::Refused { .. })));
        assert!(matches!(new("ftp://host:1", None), Err(NodeError::Refused { .. })));
        assert!(matches!(new("http://host:1", Some("bad\nsecret")), Err(NodeError::Refused { .. })));
        assert!(new("http://host:1/", Some("ok")).is_ok());
    }
}
