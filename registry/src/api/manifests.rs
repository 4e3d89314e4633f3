//! `GET`/`HEAD`/`PUT`/`DELETE /v2/<name>/manifests/<reference>`.

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use super::{hv, ApiResult, Ctx, DIGEST_HEADER, SERVE_STALE_FOR_HEADER, SUBJECT_HEADER};
use crate::digest::{Algorithm, Digest};
use crate::error::{ApiError, ErrorCode};
use crate::manifest::{parse_manifest, ParsedManifest};
use crate::name::RepoName;
use crate::store::{NewManifest, Reference};

/// A reference is a digest when it contains `:` (tags cannot), otherwise a tag.
pub(crate) fn parse_reference(reference: &str) -> Result<Reference, ApiError> {
    if reference.contains(':') {
        Ok(Reference::Digest(reference.parse()?))
    } else {
        Ok(Reference::Tag(reference.parse()?))
    }
}

fn manifest_unknown() -> ApiError {
    ApiError::new(ErrorCode::ManifestUnknown, "manifest unknown to registry")
}

pub(super) async fn get(ctx: &mut Ctx, name: &RepoName, reference: &str) -> ApiResult {
    let reference = parse_reference(reference)?;
    let manifest = ctx.store.manifest_get(name, &reference).await?.ok_or_else(manifest_unknown)?;
    let mut response = Response::new(axum::body::Body::from(manifest.bytes.clone()));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, hv(&manifest.media_type));
    headers.insert(header::CONTENT_LENGTH, hv(manifest.bytes.len().to_string()));
    headers.insert(header::ETAG, hv(format!("\"{}\"", manifest.digest)));
    headers.insert(HeaderName::from_static(DIGEST_HEADER), hv(manifest.digest.to_string()));
    if let Some(until) = manifest.serve_stale_until {
        let left = until.saturating_sub(super::unix_now());
        headers.insert(HeaderName::from_static(SERVE_STALE_FOR_HEADER), hv(left.to_string()));
    }
    Ok(response)
}

/// How much of an oversized body is read and dropped before answering 413, so the client
/// (still sending) sees the answer instead of a reset connection.
const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;

/// What a manifest body that stopped arriving is answered: a stall past the server's body
/// timeout is 408 (the client may send it again; a 400 `MANIFEST_INVALID` said its content was
/// wrong, for good), anything else a 400 saying the body could not be read.
fn body_failed(e: std::io::Error) -> ApiError {
    if e.kind() == std::io::ErrorKind::TimedOut {
        return ApiError::new(ErrorCode::Unknown, format!("the manifest's body stopped arriving: {e}"))
            .with_status(StatusCode::REQUEST_TIMEOUT);
    }
    ApiError::new(ErrorCode::ManifestInvalid, format!("reading body: {e}"))
}

/// Read the body, refusing anything over `limit` bytes with 413 without buffering it.
async fn read_limited(ctx: &mut Ctx, limit: u64) -> Result<Bytes, ApiError> {
    let mut body = ctx.take_body();
    let mut buf = BytesMut::new();
    let mut seen = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(body_failed)?;
        seen += chunk.len() as u64;
        // Past the limit, drain a little more for the client to see the answer; never stop
        // reading below it (a limit above 64 MiB was cut there and taken as the whole body).
        if seen > limit.saturating_add(DRAIN_LIMIT) {
            break;
        }
        if seen <= limit {
            buf.extend_from_slice(&chunk);
        }
    }
    if seen > limit {
        return Err(ApiError::new(
            ErrorCode::SizeInvalid,
            format!("manifest exceeds the {limit}-byte limit"),
        )
        .with_status(StatusCode::PAYLOAD_TOO_LARGE));
    }
    Ok(buf.freeze())
}

/// Manifests larger than this are checked, parsed and hashed on the blocking pool: a 16 MiB
/// index is tens of milliseconds of CPU (UTF-8, two JSON parses, SHA-256), which on a
/// runtime worker stalled every other request of the process.
const INLINE_MANIFEST_BYTES: usize = 64 * 1024;

/// A pushed manifest's checks: UTF-8 (JSON is; serde_json does not check the strings of
/// fields it skips, and a store that keeps manifests as text then failed with a 500), its
/// parse, and its digest (the one `reference` names, else SHA-256). CPU only.
fn check_manifest(
    bytes: &[u8],
    content_type: Option<&str>,
    reference: &Reference,
) -> Result<(ParsedManifest, Digest), ApiError> {
    std::str::from_utf8(bytes)
        .map_err(|e| ApiError::new(ErrorCode::ManifestInvalid, format!("manifest is not UTF-8: {e}")))?;
    let parsed = parse_manifest(content_type, bytes)
        .map_err(|e| ApiError::new(ErrorCode::ManifestInvalid, e.to_string()))?;
    let digest = match reference {
        Reference::Digest(expected) => {
            let actual = Digest::of(expected.algorithm(), bytes);
            if &actual != expected {
                return Err(ApiError::new(
                    ErrorCode::DigestInvalid,
                    format!("manifest digest is {actual}, not {expected}"),
                ));
            }
            actual
        }
        Reference::Tag(_) => Digest::of(Algorithm::Sha256, bytes),
    };
    Ok((parsed, digest))
}

pub(super) async fn put(ctx: &mut Ctx, name: &RepoName, reference: &str) -> ApiResult {
    let reference = parse_reference(reference)?;
    let bytes = read_limited(ctx, ctx.config.max_manifest_size).await?;
    let content_type = ctx.header(header::CONTENT_TYPE).map(str::to_string);
    let (parsed, digest) = if bytes.len() > INLINE_MANIFEST_BYTES {
        let (b, r) = (bytes.clone(), reference.clone());
        tokio::task::spawn_blocking(move || check_manifest(&b, content_type.as_deref(), &r)).await.map_err(
            |e| {
                ApiError::new(ErrorCode::Unknown, format!("checking the manifest: {e}"))
                    .with_status(StatusCode::INTERNAL_SERVER_ERROR)
            },
        )??
    } else {
        check_manifest(&bytes, content_type.as_deref(), &reference)?
    };
    let tag = match &reference {
        Reference::Tag(tag) => Some(tag),
        Reference::Digest(_) => None,
    };
    let subject = parsed.subject.clone();
    ctx.store.manifest_put(name, tag, NewManifest { digest: digest.clone(), bytes, parsed }).await?;
    let mut response = (
        StatusCode::CREATED,
        [
            (header::LOCATION, hv(format!("/v2/{name}/manifests/{digest}"))),
            (HeaderName::from_static(DIGEST_HEADER), hv(digest.to_string())),
            (header::CONTENT_LENGTH, HeaderValue::from_static("0")),
        ],
    )
        .into_response();
    if let Some(subject) = subject {
        response.headers_mut().insert(HeaderName::from_static(SUBJECT_HEADER), hv(subject.to_string()));
    }
    Ok(response)
}

pub(super) async fn delete(ctx: &mut Ctx, name: &RepoName, reference: &str) -> ApiResult {
    let reference = parse_reference(reference)?;
    if ctx.store.manifest_delete(name, &reference).await? {
        Ok(StatusCode::ACCEPTED.into_response())
    } else {
        Err(manifest_unknown())
    }
}
