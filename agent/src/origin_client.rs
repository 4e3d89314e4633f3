//! The agent's HTTP client of the origins: tags, manifests, listings and blob ranges. Every
//! call has a timeout; every manifest fetched is checked against its digest.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{ACCEPT, CONTENT_TYPE, RANGE};
use reqwest::StatusCode;
use shoal_registry::manifest::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
use shoal_registry::store::StoredManifest;
use shoal_registry::{Algorithm, Digest, RepoName, StoreError};

/// Every manifest type clients may ask for; the origin returns what was pushed.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Client of one origin's registry API.
#[derive(Clone)]
pub struct OriginClient {
    base: String,
    http: reqwest::Client,
    /// Budget for one blob range, on top of `timeout`, per MiB requested.
    per_mib: Duration,
}

fn unreachable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("origin unreachable: {e}"))
}

fn unexpected(status: StatusCode) -> StoreError {
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        StoreError::Unavailable(format!("origin answered {status}"))
    } else {
        StoreError::Internal(format!("origin answered {status}"))
    }
}

impl OriginClient {
    pub fn new(base: &str, timeout: Duration) -> Result<OriginClient, reqwest::Error> {
        let http = reqwest::Client::builder().connect_timeout(timeout).read_timeout(timeout).build()?;
        Ok(OriginClient {
            base: base.trim_end_matches('/').to_string(),
            http,
            per_mib: Duration::from_millis(200),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// A manifest by tag or digest; the digest of what arrives is verified.
    pub async fn manifest(
        &self,
        repo: &RepoName,
        reference: &str,
    ) -> Result<Option<StoredManifest>, StoreError> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let r = self.http.get(url).header(ACCEPT, MANIFEST_ACCEPT).send().await.map_err(unreachable)?;
        match r.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            s => return Err(unexpected(s)),
        }
        let media_type = r
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| OCI_MANIFEST.to_string());
        let claimed =
            r.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_string);
        let bytes = r.bytes().await.map_err(unreachable)?;
        let expected: Option<Digest> = match reference.parse::<Digest>() {
            Ok(d) => Some(d),
            Err(_) => claimed.and_then(|c| c.parse().ok()),
        };
        let algorithm = expected.as_ref().map_or(Algorithm::Sha256, |d| d.algorithm());
        let digest = Digest::of(algorithm, &bytes);
        if expected.is_some_and(|e| e != digest) {
            return Err(StoreError::Internal(format!(
                "origin sent a manifest that does not match {reference}"
            )));
        }
        let known = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST];
        let media_type =
            known.iter().find(|k| media_type.starts_with(*k)).map_or(media_type.clone(), |k| k.to_string());
        Ok(Some(StoredManifest { digest, media_type, bytes }))
    }

    /// Size of a blob as the origin serves it through `repo` (which enforces repository links).
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let r = self.http.head(url).send().await.map_err(unreachable)?;
        match r.status() {
            // Read the header itself: for HEAD, reqwest's content_length() is the (empty) body's.
            StatusCode::OK => r
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .map(Some)
                .ok_or_else(|| StoreError::Internal("origin sent no Content-Length for a blob".into())),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(unexpected(s)),
        }
    }

    /// `len` bytes of a blob from `offset`, in full or an error.
    pub async fn blob_range(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, StoreError> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let budget = Duration::from_secs(10) + self.per_mib * (len / (1 << 20)) as u32;
        let range = format!("bytes={}-{}", offset, offset + len - 1);
        let r = self.http.get(url).header(RANGE, range).timeout(budget).send().await.map_err(unreachable)?;
        let status = r.status();
        if status != StatusCode::PARTIAL_CONTENT && !(status == StatusCode::OK && offset == 0) {
            return Err(if status == StatusCode::NOT_FOUND {
                StoreError::BlobUnknown
            } else {
                unexpected(status)
            });
        }
        let bytes = r.bytes().await.map_err(unreachable)?;
        if (bytes.len() as u64) < len {
            return Err(StoreError::Internal(format!("origin sent {} of {len} bytes", bytes.len())));
        }
        Ok(bytes.slice(..len as usize))
    }

    /// A listing endpoint (tags, catalog, referrers) as raw JSON, `None` on 404.
    pub async fn listing(&self, path_and_query: &str) -> Result<Option<Bytes>, StoreError> {
        let r = self.http.get(format!("{}{path_and_query}", self.base)).send().await.map_err(unreachable)?;
        match r.status() {
            StatusCode::OK => Ok(Some(r.bytes().await.map_err(unreachable)?)),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(unexpected(s)),
        }
    }

    /// A blob's metainfo JSON, straight from the origin.
    pub async fn metainfo(&self, digest: &Digest) -> Result<Option<Bytes>, StoreError> {
        self.listing(&shoal_p2p::tracker_client::metainfo_path(digest)).await
    }
}
