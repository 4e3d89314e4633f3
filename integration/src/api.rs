//! An HTTP client for the OCI Distribution API, and [`Reply`]: a response read
//! in full, with assertions that name the request when they fail.

use crate::oci::{self, Blob, Manifest};
use reqwest::header::{HeaderMap, ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::Value;
use std::future::Future;
use std::time::Duration;

/// Error codes a v1.1 registry may return (spec "Error Codes" table), plus
/// the legacy schema1 codes the spec says clients may still meet.
pub const SPEC_ERROR_CODES: &[&str] = &[
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
    "TAG_INVALID",
    "MANIFEST_UNVERIFIED",
];

const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A registry client: base URL, optional Basic credentials, no redirects
/// followed (the tests look at raw statuses and `Location` headers).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    /// Every registry URL requests rotate over (one, unless `base` listed several).
    bases: std::sync::Arc<Vec<String>>,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    auth: Option<(String, String)>,
    bearer: Option<String>,
}

/// Which manifest family [`Client::push_image`] builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    Oci,
    Docker,
}

impl ImageKind {
    pub fn manifest_type(self) -> &'static str {
        match self {
            ImageKind::Oci => oci::OCI_MANIFEST,
            ImageKind::Docker => oci::DOCKER_MANIFEST,
        }
    }

    pub fn index_type(self) -> &'static str {
        match self {
            ImageKind::Oci => oci::OCI_INDEX,
            ImageKind::Docker => oci::DOCKER_LIST,
        }
    }

    pub fn config_type(self) -> &'static str {
        match self {
            ImageKind::Oci => oci::OCI_CONFIG,
            ImageKind::Docker => oci::DOCKER_CONFIG,
        }
    }

    pub fn layer_type(self) -> &'static str {
        match self {
            ImageKind::Oci => oci::OCI_LAYER,
            ImageKind::Docker => oci::DOCKER_LAYER,
        }
    }
}

/// An image pushed by [`Client::push_image`].
#[derive(Clone, Debug)]
pub struct Image {
    pub manifest: Manifest,
    pub config: Blob,
    pub layers: Vec<Blob>,
}

impl Client {
    pub fn new(base: &str) -> Client {
        let http = shoal_tls::http_client()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("build an HTTP client");
        // A comma-separated list (several origins of one cluster) makes every request go to
        // the next one, as a load balancer without session affinity would.
        let bases: Vec<String> = base
            .split(',')
            .map(|b| b.trim().trim_end_matches('/').to_string())
            .filter(|b| !b.is_empty())
            .collect();
        Client {
            http,
            base: bases.first().cloned().unwrap_or_default(),
            bases: std::sync::Arc::new(bases),
            next: Default::default(),
            auth: None,
            bearer: None,
        }
    }

    /// The same client, sending `Authorization: Basic` with every request.
    pub fn with_basic_auth(&self, user: &str, password: &str) -> Client {
        Client { auth: Some((user.to_string(), password.to_string())), ..self.clone() }
    }

    /// The same client, sending `Authorization: Bearer <token>` with every request.
    pub fn with_bearer(&self, token: &str) -> Client {
        Client { bearer: Some(token.to_string()), auth: None, ..self.clone() }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// An absolute URL for a path (`/v2/...`) or for a `Location` header
    /// value, which the spec allows to be absolute or relative.
    pub fn url(&self, path_or_location: &str) -> String {
        let mut path = path_or_location;
        if self.bases.len() > 1 {
            if let Some(rest) = self.bases.iter().find_map(|b| path_or_location.strip_prefix(b.as_str())) {
                path = rest;
            }
        }
        if path.starts_with("http://") || path.starts_with("https://") {
            return path.to_string();
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.bases.len().max(1);
        format!("{}{}", self.bases.get(i).unwrap_or(&self.base), path)
    }

    pub fn request(&self, method: Method, path_or_location: &str) -> RequestBuilder {
        let builder = self.http.request(method, self.url(path_or_location));
        match (&self.auth, &self.bearer) {
            (Some((user, password)), _) => builder.basic_auth(user, Some(password)),
            (None, Some(token)) => builder.bearer_auth(token),
            (None, None) => builder,
        }
    }

    pub fn get(&self, path: &str) -> RequestBuilder {
        self.request(Method::GET, path)
    }

    pub fn head(&self, path: &str) -> RequestBuilder {
        self.request(Method::HEAD, path)
    }

    pub fn post(&self, path: &str) -> RequestBuilder {
        self.request(Method::POST, path)
    }

    pub fn put(&self, path: &str) -> RequestBuilder {
        self.request(Method::PUT, path)
    }

    pub fn patch(&self, path: &str) -> RequestBuilder {
        self.request(Method::PATCH, path)
    }

    pub fn delete(&self, path: &str) -> RequestBuilder {
        self.request(Method::DELETE, path)
    }

    // ---- blobs ----------------------------------------------------------

    /// `POST /v2/<repo>/blobs/uploads/` with `Content-Length: 0`; asserts 202
    /// and returns the absolute upload URL from `Location`.
    pub async fn start_upload(&self, repo: &str) -> String {
        let reply =
            self.post(&format!("/v2/{repo}/blobs/uploads/")).header(CONTENT_LENGTH, "0").reply().await;
        reply.expect(StatusCode::ACCEPTED);
        self.url(reply.must_header("location"))
    }

    /// `PATCH <location>` with `Content-Range: <offset>-<end>`.
    pub async fn patch_chunk(&self, location: &str, offset: usize, chunk: &[u8]) -> Reply {
        let end = offset + chunk.len() - 1;
        self.patch(location)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header("content-range", format!("{offset}-{end}"))
            .body(chunk.to_vec())
            .reply()
            .await
    }

    /// `PUT <location>?digest=<digest>` with `body` (possibly empty).
    pub async fn finish_upload(&self, location: &str, digest: &str, body: &[u8]) -> Reply {
        self.put(&with_query(location, "digest", digest))
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(body.to_vec())
            .reply()
            .await
    }

    /// `GET <location>`: the upload's status.
    pub async fn upload_status(&self, location: &str) -> Reply {
        self.get(location).reply().await
    }

    /// Pushes `data` with POST then PUT; asserts 201 and returns its digest.
    pub async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = crate::sha256(data);
        self.push_blob_as(repo, data, &digest).await;
        digest
    }

    /// Pushes `data` under the given digest (of any algorithm); asserts 201.
    pub async fn push_blob_as(&self, repo: &str, data: &[u8], digest: &str) {
        let location = self.start_upload(repo).await;
        self.finish_upload(&location, digest, data).await.expect(StatusCode::CREATED);
    }

    pub async fn get_blob(&self, repo: &str, digest: &str) -> Reply {
        self.get(&format!("/v2/{repo}/blobs/{digest}")).reply().await
    }

    pub async fn head_blob(&self, repo: &str, digest: &str) -> Reply {
        self.head(&format!("/v2/{repo}/blobs/{digest}")).reply().await
    }

    // ---- manifests ------------------------------------------------------

    /// `PUT /v2/<repo>/manifests/<reference>` with the manifest's media type.
    pub async fn put_manifest(&self, repo: &str, reference: &str, manifest: &Manifest) -> Reply {
        self.put(&format!("/v2/{repo}/manifests/{reference}"))
            .header(CONTENT_TYPE, manifest.media_type.as_str())
            .body(manifest.bytes.clone())
            .reply()
            .await
    }

    /// [`put_manifest`](Self::put_manifest), asserting 201.
    pub async fn push_manifest(&self, repo: &str, reference: &str, manifest: &Manifest) -> Reply {
        let reply = self.put_manifest(repo, reference, manifest).await;
        reply.expect(StatusCode::CREATED);
        reply
    }

    /// `GET /v2/<repo>/manifests/<reference>`, accepting every manifest type.
    pub async fn get_manifest(&self, repo: &str, reference: &str) -> Reply {
        self.get(&format!("/v2/{repo}/manifests/{reference}")).header(ACCEPT, oci::ACCEPT_ALL).reply().await
    }

    /// `HEAD /v2/<repo>/manifests/<reference>`, accepting every manifest type.
    pub async fn head_manifest(&self, repo: &str, reference: &str) -> Reply {
        self.head(&format!("/v2/{repo}/manifests/{reference}")).header(ACCEPT, oci::ACCEPT_ALL).reply().await
    }

    /// Pushes a config blob, one random layer of `layer_len` bytes and an
    /// image manifest of `kind`, under `tag` (or by digest when `None`).
    pub async fn push_image(
        &self,
        repo: &str,
        kind: ImageKind,
        tag: Option<&str>,
        layer_len: usize,
    ) -> Image {
        let config = Blob::config(kind.config_type());
        let layer = Blob::random_layer(kind.layer_type(), layer_len);
        self.push_blob(repo, &config.data).await;
        self.push_blob(repo, &layer.data).await;
        let value = oci::image_manifest_value(kind.manifest_type(), &config, std::slice::from_ref(&layer));
        let manifest = Manifest::from_value(kind.manifest_type(), &value);
        self.push_manifest(repo, tag.unwrap_or(&manifest.digest), &manifest).await;
        Image { manifest, config, layers: vec![layer] }
    }

    /// Pushes an index of `kind` over already pushed `children`.
    pub async fn push_index(
        &self,
        repo: &str,
        kind: ImageKind,
        children: &[&Manifest],
        tag: Option<&str>,
    ) -> Manifest {
        let value = oci::index_value(kind.index_type(), children);
        let index = Manifest::from_value(kind.index_type(), &value);
        self.push_manifest(repo, tag.unwrap_or(&index.digest), &index).await;
        index
    }

    /// Pushes the OCI empty config blob `{}` to `repo`.
    pub async fn push_empty_config(&self, repo: &str) -> Blob {
        let blob = Blob::new(oci::OCI_EMPTY, oci::EMPTY_JSON.to_vec());
        self.push_blob(repo, &blob.data).await;
        blob
    }

    // ---- discovery ------------------------------------------------------

    /// `GET /v2/<repo>/tags/list` (with an optional query); asserts 200.
    pub async fn tags(&self, repo: &str, query: &str) -> Reply {
        let reply = self.get(&format!("/v2/{repo}/tags/list{query}")).reply().await;
        reply.expect(StatusCode::OK);
        reply
    }
}

impl Client {
    /// Every repository name from `GET /v2/_catalog`, following `Link` pages.
    pub async fn catalog(&self) -> Vec<String> {
        let mut names = Vec::new();
        let mut next = Some(String::from("/v2/_catalog"));
        for _ in 0..1000 {
            let Some(target) = next.take() else { break };
            let reply = self.get(&target).reply().await;
            reply.expect(StatusCode::OK);
            let body = reply.json();
            let page = body["repositories"]
                .as_array()
                .unwrap_or_else(|| panic!("no repositories list: {}", reply.describe()));
            names.extend(page.iter().filter_map(Value::as_str).map(str::to_string));
            next = reply.header("link").and_then(parse_next_link);
        }
        names
    }
}

/// `location` with `key=value` added to its query string.
pub fn with_query(location: &str, key: &str, value: &str) -> String {
    let separator = if location.contains('?') { '&' } else { '?' };
    format!("{location}{separator}{key}={value}")
}

/// Sends a request and reads the whole response into a [`Reply`].
pub trait SendExt {
    /// Panics (naming the request) if no response arrives.
    fn reply(self) -> impl Future<Output = Reply> + Send;
    /// Returns the transport error (with the request named) instead.
    fn try_reply(self) -> impl Future<Output = Result<Reply, String>> + Send;
}

impl SendExt for RequestBuilder {
    async fn reply(self) -> Reply {
        self.try_reply().await.unwrap_or_else(|e| panic!("{e}"))
    }

    async fn try_reply(self) -> Result<Reply, String> {
        let (client, request) = self.build_split();
        let request = request.expect("build the request");
        let method = request.method().clone();
        let url = request.url().to_string();
        let response = client.execute(request).await.map_err(|e| {
            let mut cause = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(inner) = source {
                cause = format!("{cause}: {inner}");
                source = inner.source();
            }
            format!("{method} {url}: {cause}")
        })?;
        let status = response.status();
        let headers = response.headers().clone();
        let (body, body_error) = match response.bytes().await {
            Ok(bytes) => (bytes.to_vec(), None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        Ok(Reply { method, url, status, headers, body, body_error })
    }
}

/// A response read in full, with the request it answers.
#[derive(Debug)]
pub struct Reply {
    pub method: Method,
    pub url: String,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// Set when the body could not be read (e.g. shorter than its
    /// `Content-Length`); `body` is then empty.
    pub body_error: Option<String>,
}

impl Reply {
    /// `METHOD url -> status: body` (body cut to 1 KiB), for messages.
    pub fn describe(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let cut: String = text.chars().take(1024).collect();
        let broken = match &self.body_error {
            Some(e) => format!(" (body unreadable: {e})"),
            None => String::new(),
        };
        format!("{} {} -> {}: {cut}{broken}", self.method, self.url, self.status)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// All values of a header (e.g. several `Warning`s).
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect()
    }

    pub fn must_header(&self, name: &str) -> &str {
        self.header(name).unwrap_or_else(|| panic!("no {name} header in {}", self.describe()))
    }

    /// Asserts the status.
    pub fn expect(&self, status: StatusCode) -> &Reply {
        assert_eq!(self.status, status, "{}", self.describe());
        self
    }

    /// Asserts the status is one of `statuses`.
    pub fn expect_one_of(&self, statuses: &[StatusCode]) -> &Reply {
        assert!(statuses.contains(&self.status), "expected one of {statuses:?}: {}", self.describe());
        self
    }

    /// Asserts the status and that the body is a spec error body carrying `code`.
    pub fn expect_error(&self, status: StatusCode, code: &str) -> &Reply {
        self.expect_error_one_of(&[status], code)
    }

    /// Asserts one of `statuses` and a spec error body carrying `code`.
    pub fn expect_error_one_of(&self, statuses: &[StatusCode], code: &str) -> &Reply {
        self.expect_one_of(statuses);
        let codes = self.error_codes();
        assert!(
            codes.iter().any(|c| c == code),
            "expected error code {code}, got {codes:?}: {}",
            self.describe()
        );
        self
    }

    /// The error codes of a spec error body, checking its shape on the way:
    /// `{"errors":[{"code":"...","message":"...","detail":...}]}` with each
    /// code from the spec's table and `message`, when present, a string.
    pub fn error_codes(&self) -> Vec<String> {
        let body: Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {}", self.describe()));
        let errors = body
            .get("errors")
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("no \"errors\" array: {}", self.describe()));
        assert!(!errors.is_empty(), "empty errors array: {}", self.describe());
        errors
            .iter()
            .map(|error| {
                let code = error
                    .get("code")
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("error without a code: {}", self.describe()));
                assert!(
                    !code.is_empty() && code.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                    "code {code:?} is not uppercase letters and underscores: {}",
                    self.describe()
                );
                assert!(
                    SPEC_ERROR_CODES.contains(&code),
                    "code {code} is not in the spec's table: {}",
                    self.describe()
                );
                if let Some(message) = error.get("message") {
                    assert!(message.is_string(), "message is not a string: {}", self.describe());
                }
                code.to_string()
            })
            .collect()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.describe()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The upload offset from a `Range: 0-<end>` header: the number of bytes
    /// received (`end + 1`). `0-0` is read as one byte received; callers that
    /// need to tell it from an empty upload avoid asking in that state.
    pub fn upload_offset(&self) -> u64 {
        let range = self.must_header("range");
        let end = parse_upload_range(range)
            .unwrap_or_else(|| panic!("Range {range:?} is not 0-<end>: {}", self.describe()));
        end + 1
    }
}

/// The `<end>` of an upload `Range: 0-<end>` header value.
pub fn parse_upload_range(value: &str) -> Option<u64> {
    let value = value.trim();
    let value = value.strip_prefix("bytes=").unwrap_or(value);
    let (start, end) = value.split_once('-')?;
    if start != "0" {
        return None;
    }
    end.parse().ok()
}

/// The target of a `Link: <url>; rel="next"` header, if it is one.
pub fn parse_next_link(value: &str) -> Option<String> {
    let (target, params) = value.trim().strip_prefix('<')?.split_once('>')?;
    let is_next = params.split(';').any(|param| {
        let param = param.trim().replace(' ', "");
        param == "rel=\"next\"" || param == "rel=next"
    });
    is_next.then(|| target.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upload_ranges() {
        assert_eq!(parse_upload_range("0-99"), Some(99));
        assert_eq!(parse_upload_range("bytes=0-5"), Some(5));
        assert_eq!(parse_upload_range("3-5"), None);
    }

    #[test]
    fn parses_next_links() {
        assert_eq!(
            parse_next_link("</v2/a/tags/list?n=2&last=b>; rel=\"next\"").as_deref(),
            Some("/v2/a/tags/list?n=2&last=b")
        );
        assert_eq!(parse_next_link("</x>; rel=\"prev\""), None);
    }

    #[test]
    fn adds_query_parameters() {
        assert_eq!(with_query("/u/1", "digest", "d"), "/u/1?digest=d");
        assert_eq!(with_query("/u/1?s=x", "digest", "d"), "/u/1?s=x&digest=d");
    }
}
