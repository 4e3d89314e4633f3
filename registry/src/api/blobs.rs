//! `GET`/`HEAD`/`DELETE /v2/<name>/blobs/<digest>`, with `Range` support.

use axum::body::Body;
use axum::http::{header, HeaderName, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{hv, ApiResult, Ctx, DIGEST_HEADER};
use crate::digest::Digest;
use crate::error::{ApiError, ErrorCode};
use crate::name::RepoName;
use crate::range::{parse_range, RangeRequest};

pub(super) async fn get(ctx: &mut Ctx, name: &RepoName, digest: &Digest) -> ApiResult {
    let size = ctx
        .store
        .blob_size(name, digest)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::BlobUnknown, "blob unknown to registry"))?;
    // RFC 9110 defines `Range` for GET only: a HEAD answers for the whole blob.
    let range = match ctx.header(header::RANGE).filter(|_| ctx.method == Method::GET) {
        None => RangeRequest::Full,
        Some(r) => parse_range(r, size),
    };
    let (status, range) = match range {
        RangeRequest::Full => (StatusCode::OK, None),
        RangeRequest::Partial(r) => (StatusCode::PARTIAL_CONTENT, Some(r)),
        // The blob is known: its code is not `BLOB_UNKNOWN` (the spec names none for a range;
        // the request's size is what is wrong).
        RangeRequest::Unsatisfiable => {
            let err = ApiError::new(ErrorCode::SizeInvalid, "requested range is outside the blob")
                .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
                .with_header(header::CONTENT_RANGE, hv(format!("bytes */{size}")));
            return Err(err);
        }
    };
    let length = range.map_or(size, |r| r.len());
    let body = if ctx.method == Method::HEAD {
        Body::empty()
    } else {
        Body::from_stream(ctx.store.blob_read(name, digest, range).await?)
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, hv(length.to_string()));
    headers.insert(header::CONTENT_TYPE, hv("application/octet-stream"));
    headers.insert(header::ACCEPT_RANGES, hv("bytes"));
    headers.insert(header::ETAG, hv(format!("\"{digest}\"")));
    headers.insert(HeaderName::from_static(DIGEST_HEADER), hv(digest.to_string()));
    if let Some(r) = range {
        headers.insert(header::CONTENT_RANGE, hv(format!("bytes {}-{}/{size}", r.start, r.end)));
    }
    Ok(response)
}

pub(super) async fn delete(ctx: &mut Ctx, name: &RepoName, digest: &Digest) -> ApiResult {
    if ctx.store.blob_delete(name, digest).await? {
        Ok(StatusCode::ACCEPTED.into_response())
    } else {
        Err(ApiError::new(ErrorCode::BlobUnknown, "blob unknown to registry"))
    }
}
