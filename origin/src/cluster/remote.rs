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
use bytes::Bytes;
use futures_util::TryStreamExt;
use reqwest::header::{self, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use shoal_registry::range::ByteRange;
use shoal_registry::{ByteStream, Digest};

use crate::cluster::node::{BlobEntry, Holding, Node, NodeError, RecordPage, ScanPage};
use crate::cluster::record::{Record, RecordKey, RecordKind};
use crate::cluster::wire::{
    blob_path, metainfo_path, BlobListQuery, HealthReply, PurgeQuery, RepoListQuery, RepoQuery, ScanQuery,
    StatQuery, APPLY_DEADLINE_MS, BLOBS, HEALTH, MAX_ERROR_TEXT, MAX_JSON_RESPONSE, MAX_RECORDS_BODY,
    MAX_RECORD_KEYS, QUARANTINE, QUARANTINED_HEADER, RECORDS_APPLY, RECORDS_FORGET, RECORDS_GET,
    RECORDS_SCAN, REPAIR_PENDING, REPOS, SCAN_MORE, SCAN_PAGE_BYTES,
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
    async fn read_bounded(&self, resp: Response, limit: usize, truncate: bool) -> Result<Bytes, NodeError> {
        shoal_tls::read_body(resp, limit, truncate).await.map_err(|e| match e {
            shoal_tls::BodyError::Read(e) => self.unreachable(error_chain(&e)),
            too_large => self.refused(too_large.to_string()),
        })
    }

    async fn json<T: DeserializeOwned>(&self, resp: Response) -> Result<T, NodeError> {
        let body = self.read_bounded(resp, MAX_JSON_RESPONSE, false).await?;
        serde_json::from_slice(&body).map_err(|e| self.refused(format!("bad JSON answer: {e}")))
    }

    /// One `records/apply` call with an already serialised JSON array.
    /// POST `records` to `path` as JSON arrays, each within the body limit.
    async fn post_records(
        &self,
        path: &str,
        repo: &str,
        records: &[Record],
        deadline: Option<std::time::Instant>,
    ) -> Result<(), NodeError> {
        let mut batch = Vec::new();
        for record in records {
            let json =
                serde_json::to_vec(record).map_err(|e| self.refused(format!("encoding record: {e}")))?;
            if json.len() + 2 > MAX_RECORDS_BODY {
                return Err(self.refused(format!("record {:?} is too large to send", record.key)));
            }
            if !batch.is_empty() && batch.len() + json.len() + 2 > MAX_RECORDS_BODY {
                batch.push(b']');
                self.post_batch(path, repo, std::mem::take(&mut batch), deadline).await?;
            }
            batch.push(if batch.is_empty() { b'[' } else { b',' });
            batch.extend_from_slice(&json);
        }
        if !batch.is_empty() {
            batch.push(b']');
            self.post_batch(path, repo, batch, deadline).await?;
        }
        Ok(())
    }

    async fn post_batch(
        &self,
        path: &str,
        repo: &str,
        body: Vec<u8>,
        deadline: Option<std::time::Instant>,
    ) -> Result<(), NodeError> {
        let mut rb = self
            .request(&self.http, Method::POST, path)
            .query(&RepoQuery { repo: repo.to_string() })
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(NodeError::Unreachable {
                    node: self.id.clone(),
                    reason: "deadline passed".into(),
                });
            }
            rb = rb.header(APPLY_DEADLINE_MS, left.as_millis().to_string());
        }
        let rb = rb.body(body);
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

    async fn blob_peek(&self, digest: &Digest) -> Result<Holding, NodeError> {
        let rb = self.request(&self.http, Method::HEAD, &blob_path(digest)).query(&StatQuery { peek: true });
        let resp = self.send(rb).await?;
        match resp.status() {
            StatusCode::OK => {
                let size = resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok());
                match size.and_then(|s| s.parse().ok()) {
                    Some(size) => Ok(Holding::Held(size)),
                    None => Err(self.refused("HEAD answer without a valid Content-Length".into())),
                }
            }
            StatusCode::NOT_FOUND if resp.headers().contains_key(QUARANTINED_HEADER) => {
                Ok(Holding::Quarantined)
            }
            StatusCode::NOT_FOUND => Ok(Holding::Absent),
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
        let mut page = ScanPage::of_bytes(SCAN_PAGE_BYTES);
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
            max_records: (page.max_records != usize::MAX).then_some(page.max_records),
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
        self.post_records(RECORDS_APPLY, repo, records, None).await
    }

    /// The time left goes along with each batch ([`APPLY_DEADLINE_MS`]): the receiver
    /// commits nothing once it has passed there.
    async fn records_apply_by(
        &self,
        repo: &str,
        records: &[Record],
        deadline: std::time::Instant,
    ) -> Result<(), NodeError> {
        self.post_records(RECORDS_APPLY, repo, records, Some(deadline)).await
    }

    async fn records_forget(&self, repo: &str, confirmed: &[Record]) -> Result<(), NodeError> {
        self.post_records(RECORDS_FORGET, repo, confirmed, None).await
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
mod tests;
