//! The spec's error codes and JSON error body, and the typed errors a store reports.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::digest::{Digest, DigestError};
use crate::name::NameError;

/// Error codes from the distribution spec, plus `UNKNOWN` for server faults (as
/// docker/distribution does), since the spec defines no code for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    Unknown,
}

impl ErrorCode {
    /// The code string used in the error body.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::Unknown => "UNKNOWN",
        }
    }

    /// The status the spec (or docker/distribution, where the spec is silent) pairs with it.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BlobUnknown
            | ErrorCode::BlobUploadUnknown
            | ErrorCode::ManifestUnknown
            | ErrorCode::NameUnknown => StatusCode::NOT_FOUND,
            ErrorCode::BlobUploadInvalid
            | ErrorCode::DigestInvalid
            | ErrorCode::ManifestBlobUnknown
            | ErrorCode::ManifestInvalid
            | ErrorCode::NameInvalid
            | ErrorCode::SizeInvalid => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Denied => StatusCode::FORBIDDEN,
            ErrorCode::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An error as the API answers it: a spec code, a message, optional detail, and the HTTP status
/// (normally the code's own, but e.g. 416 for an out-of-order chunk).
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub status: StatusCode,
    /// Boxed so `Result<_, ApiError>` stays small on the happy path.
    extra: Box<Extra>,
}

#[derive(Debug)]
struct Extra {
    message: String,
    detail: Option<serde_json::Value>,
    headers: HeaderMap,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            status: code.status(),
            extra: Box::new(Extra { message: message.into(), detail: None, headers: HeaderMap::new() }),
        }
    }

    pub fn message(&self) -> &str {
        &self.extra.message
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.extra.detail = Some(detail);
        self
    }

    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.extra.headers.insert(name, value);
        self
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    errors: [ErrorEntry<'a>; 1],
}

#[derive(Serialize)]
struct ErrorEntry<'a> {
    code: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a serde_json::Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let Extra { message, detail, headers: extra_headers } = *self.extra;
        let body = ErrorBody {
            errors: [ErrorEntry { code: self.code.as_str(), message: &message, detail: detail.as_ref() }],
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (self.status, json).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.extend(extra_headers);
        response
    }
}

impl From<DigestError> for ApiError {
    fn from(e: DigestError) -> Self {
        ApiError::new(ErrorCode::DigestInvalid, e.to_string())
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> Self {
        match e {
            NameError::BadTag(_) => ApiError::new(ErrorCode::ManifestInvalid, e.to_string()),
            _ => ApiError::new(ErrorCode::NameInvalid, e.to_string()),
        }
    }
}

/// Failures a storage backend reports; the API maps each to its spec code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob unknown to repository")]
    BlobUnknown,
    #[error("upload unknown or expired")]
    UploadUnknown,
    #[error("chunk does not start at the upload's offset {offset}")]
    UploadOutOfOrder { offset: u64 },
    #[error("uploaded content has digest {actual}, not the {expected} the client gave")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("chunk length {actual} does not match the {expected} bytes declared")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("manifest references {0}, which is not in the repository")]
    ManifestBlobUnknown(Digest),
    #[error("manifest unknown")]
    ManifestUnknown,
    #[error("repository name not known to registry")]
    NameUnknown,
    #[error("storage is full")]
    StorageFull,
    /// Too many upload sessions are open; the client should retry after others finish.
    #[error("too many upload sessions are open ({0}); finish or cancel some")]
    TooManyUploads(usize),
    /// A service the store depends on (an agent's origin) cannot answer now; clients retry.
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    /// The request body failed while it was read: the client went away, or sent too slowly
    /// (the HTTP server's body timeout, an error of kind `TimedOut`). The client's fault, not
    /// the storage's; an upload session stays where it was (see `upload_append`).
    #[error("reading the request body failed: {0}")]
    BodyRead(std::io::Error),
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("internal error: {0}")]
    Internal(String),
    /// The request is understood but not allowed here (e.g. a push into a repository that
    /// mirrors an upstream registry).
    #[error("{0}")]
    Denied(String),
    /// The operation is not offered on this repository (e.g. a delete in a repository that
    /// mirrors an upstream): the spec's answer to a disabled delete is 405 `UNSUPPORTED`.
    /// Such a repository takes reads only, which its `Allow` says.
    #[error("{0}")]
    Unsupported(String),
    /// An upstream registry wants credentials this client did not give (or gave wrong ones):
    /// the client is asked for Basic credentials, which are passed on to the upstream.
    #[error("{registry} requires credentials for this repository")]
    UpstreamUnauthorized { registry: String },
    /// The origins refused the client's credentials with their own challenge (`challenge`,
    /// a `WWW-Authenticate` value: Shoal's token realm), passed on as it is so the client can
    /// fetch a new token there.
    #[error("the origin refused the client's credentials")]
    Unauthorized { challenge: String },
    /// An upstream registry asked us to slow down; the client should retry after this long.
    #[error("upstream registry is throttling requests; retry in {retry_after_secs} s")]
    Throttled { retry_after_secs: u64 },
    /// An upstream registry cannot answer (down, throttling: then `retry_after_secs`) and
    /// what the cluster kept of this answer may no longer be served (its `serve_stale` has
    /// run out). Marked with [`UPSTREAM_FAILURE_HEADER`]: an agent asks another origin (which
    /// reaches the upstream from elsewhere) and, if none answers otherwise, passes it on; it
    /// never replaces it with what it kept itself.
    #[error("upstream {registry} cannot answer: {reason}")]
    UpstreamFailed { registry: String, reason: String, retry_after_secs: Option<u64> },
}

/// The header that marks an origin's answer as the upstream registry's failure, not the
/// origin's (see [`StoreError::UpstreamFailed`]); its value names the registry.
pub const UPSTREAM_FAILURE_HEADER: &str = "shoal-upstream-failure";

impl StoreError {
    /// Wrap an I/O error, recognising a full disk so it can get its own answer.
    pub fn from_io(e: std::io::Error) -> StoreError {
        if e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28) {
            StoreError::StorageFull
        } else {
            StoreError::Io(e)
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let message = e.to_string();
        match e {
            StoreError::BlobUnknown => ApiError::new(ErrorCode::BlobUnknown, message),
            StoreError::UploadUnknown => ApiError::new(ErrorCode::BlobUploadUnknown, message),
            StoreError::UploadOutOfOrder { offset } => {
                let range = if offset == 0 { "0-0".to_string() } else { format!("0-{}", offset - 1) };
                let mut err = ApiError::new(ErrorCode::BlobUploadInvalid, message)
                    .with_status(StatusCode::RANGE_NOT_SATISFIABLE);
                if let Ok(v) = HeaderValue::from_str(&range) {
                    err = err.with_header(header::RANGE, v);
                }
                err
            }
            StoreError::DigestMismatch { .. } => ApiError::new(ErrorCode::DigestInvalid, message),
            StoreError::SizeMismatch { .. } => ApiError::new(ErrorCode::SizeInvalid, message),
            StoreError::ManifestBlobUnknown(d) => ApiError::new(ErrorCode::ManifestBlobUnknown, message)
                .with_detail(serde_json::json!({ "digest": d.to_string() })),
            StoreError::ManifestUnknown => ApiError::new(ErrorCode::ManifestUnknown, message),
            StoreError::NameUnknown => ApiError::new(ErrorCode::NameUnknown, message),
            StoreError::Unavailable(_) => {
                ApiError::new(ErrorCode::Unknown, message).with_status(StatusCode::SERVICE_UNAVAILABLE)
            }
            StoreError::TooManyUploads(_) => ApiError::new(ErrorCode::TooManyRequests, message)
                .with_header(header::RETRY_AFTER, HeaderValue::from_static("10")),
            StoreError::StorageFull => {
                ApiError::new(ErrorCode::Unknown, message).with_status(StatusCode::INSUFFICIENT_STORAGE)
            }
            StoreError::BodyRead(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                ApiError::new(ErrorCode::BlobUploadInvalid, message).with_status(StatusCode::REQUEST_TIMEOUT)
            }
            StoreError::BodyRead(_) => ApiError::new(ErrorCode::BlobUploadInvalid, message),
            StoreError::Denied(_) => ApiError::new(ErrorCode::Denied, message),
            StoreError::Unsupported(_) => ApiError::new(ErrorCode::Unsupported, message)
                .with_header(header::ALLOW, HeaderValue::from_static("GET, HEAD")),
            StoreError::UpstreamUnauthorized { registry } => {
                let mut err = ApiError::new(ErrorCode::Unauthorized, message);
                let challenge = format!("Basic realm=\"{}\"", registry.replace('"', ""));
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    err = err.with_header(header::WWW_AUTHENTICATE, v);
                }
                err
            }
            StoreError::Unauthorized { challenge } => {
                let mut err = ApiError::new(ErrorCode::Unauthorized, message);
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    err = err.with_header(header::WWW_AUTHENTICATE, v);
                }
                err
            }
            StoreError::Throttled { retry_after_secs } => {
                let mut err = ApiError::new(ErrorCode::TooManyRequests, message);
                if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
                    err = err.with_header(header::RETRY_AFTER, v);
                }
                err
            }
            StoreError::UpstreamFailed { registry, retry_after_secs, .. } => {
                let mut err = match retry_after_secs {
                    Some(secs) => ApiError::new(ErrorCode::TooManyRequests, message)
                        .with_header(header::RETRY_AFTER, HeaderValue::from(secs)),
                    None => ApiError::new(ErrorCode::Unknown, message)
                        .with_status(StatusCode::SERVICE_UNAVAILABLE),
                };
                if let Ok(v) = HeaderValue::from_str(&registry) {
                    err = err.with_header(header::HeaderName::from_static(UPSTREAM_FAILURE_HEADER), v);
                }
                err
            }
            StoreError::Io(_) | StoreError::Internal(_) => {
                tracing::error!(error = %message, "storage failure");
                ApiError::new(ErrorCode::Unknown, message)
            }
        }
    }
}
