//! Blob uploads: `POST` (session, monolithic, or mount), `PATCH` (chunks), `PUT` (finish),
//! `GET` (status) and `DELETE` (cancel) under `/v2/<name>/blobs/uploads/`.

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{hv, upload_range, ApiResult, Ctx, DIGEST_HEADER, UPLOAD_UUID_HEADER};
use crate::digest::Digest;
use crate::error::{ApiError, ErrorCode};
use crate::name::RepoName;
use crate::range::parse_content_range;
use crate::store::UploadState;
use crate::RegistryStore;

fn session_response(status: StatusCode, name: &RepoName, state: &UploadState) -> Response {
    let location = format!("/v2/{name}/blobs/uploads/{}", state.id);
    (
        status,
        [
            (header::LOCATION, hv(location)),
            (header::RANGE, upload_range(state.offset)),
            (HeaderName::from_static(UPLOAD_UUID_HEADER), hv(&state.id)),
            (header::CONTENT_LENGTH, HeaderValue::from_static("0")),
        ],
    )
        .into_response()
}

fn created_response(name: &RepoName, digest: &Digest) -> Response {
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, hv(format!("/v2/{name}/blobs/{digest}"))),
            (HeaderName::from_static(DIGEST_HEADER), hv(digest.to_string())),
            (header::CONTENT_LENGTH, HeaderValue::from_static("0")),
        ],
    )
        .into_response()
}

fn digest_param(ctx: &Ctx) -> Result<Option<Digest>, ApiError> {
    ctx.query.get("digest").map(|d| d.parse().map_err(ApiError::from)).transpose()
}

pub(super) async fn start(ctx: &mut Ctx, name: &RepoName) -> ApiResult {
    if let Some(mount) = ctx.query.get("mount") {
        // An invalid `mount` digest or `from`, or a source without the blob, falls back to a
        // session as the spec requires.
        let digest = mount.parse::<Digest>().ok();
        let from = ctx.query.get("from").and_then(|f| f.parse::<RepoName>().ok());
        // So does a mount that fails (the source's records cannot be read now, the link
        // missed its deadline): an upload session works where the mount did not, and the
        // spec asks a registry unable to mount for a session.
        if let (Some(digest), Some(from)) = (digest, from) {
            match ctx.store.blob_mount(name, &from, &digest).await {
                Ok(true) => return Ok(created_response(name, &digest)),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(%name, %from, %digest, error = %e, "mount failed; starting an upload instead")
                }
            }
        }
        let state = ctx.store.upload_start(name).await?;
        return Ok(session_response(StatusCode::ACCEPTED, name, &state));
    }
    let digest = digest_param(ctx)?;
    // Checked before a session opens: a bad request leaves none behind (sessions count
    // against `max_upload_sessions` until they expire).
    let len = if digest.is_some() { ctx.content_length()? } else { None };
    let state = ctx.store.upload_start(name).await?;
    let Some(digest) = digest else {
        return Ok(session_response(StatusCode::ACCEPTED, name, &state));
    };
    // Monolithic upload: the whole blob is this request's body.
    let body = ctx.take_body();
    let result = async {
        ctx.store.upload_append(name, &state.id, Some(0), len, body).await?;
        ctx.store.upload_complete(name, &state.id, &digest).await
    }
    .await;
    match result {
        Ok(_) => Ok(created_response(name, &digest)),
        Err(e) => {
            // Nothing of a failed monolithic upload is worth keeping.
            let _ = ctx.store.upload_cancel(name, &state.id).await;
            Err(e.into())
        }
    }
}

pub(super) async fn status(ctx: &mut Ctx, name: &RepoName, id: &str) -> ApiResult {
    let state = ctx.store.upload_status(name, id).await?;
    Ok(session_response(StatusCode::NO_CONTENT, name, &state))
}

/// Start and length of the chunk a request carries, from `Content-Range` when present (a
/// header that is not text is malformed, not absent: the chunk was appended unchecked).
fn chunk_bounds(ctx: &Ctx) -> Result<(Option<u64>, Option<u64>), ApiError> {
    let declared = ctx.content_length()?;
    let malformed = |e: String| {
        ApiError::new(ErrorCode::BlobUploadInvalid, e).with_status(StatusCode::RANGE_NOT_SATISFIABLE)
    };
    match ctx.headers.get(header::CONTENT_RANGE).map(|v| v.to_str()) {
        None => Ok((None, declared)),
        Some(Err(_)) => Err(malformed("Content-Range is not text".into())),
        Some(Ok(cr)) => {
            let range = parse_content_range(cr).map_err(|e| malformed(e.to_string()))?;
            if declared.is_some_and(|l| l != range.len()) {
                return Err(ApiError::new(
                    ErrorCode::SizeInvalid,
                    "Content-Length does not match Content-Range",
                ));
            }
            Ok((Some(range.start), Some(range.len())))
        }
    }
}

/// A 416 says where the session stands, as its 202s do (`Location`, `Range`,
/// `Docker-Upload-UUID`), so the client resumes without asking first.
async fn where_it_stands(store: &dyn RegistryStore, name: &RepoName, id: &str, err: ApiError) -> ApiError {
    if err.status != StatusCode::RANGE_NOT_SATISFIABLE {
        return err;
    }
    match store.upload_status(name, id).await {
        Ok(state) => err
            .with_header(header::LOCATION, hv(format!("/v2/{name}/blobs/uploads/{}", state.id)))
            .with_header(header::RANGE, upload_range(state.offset))
            .with_header(HeaderName::from_static(UPLOAD_UUID_HEADER), hv(&state.id)),
        Err(_) => err,
    }
}

/// The chunk's bounds, its 416 saying where the session stands.
async fn checked_bounds(
    ctx: &mut Ctx,
    name: &RepoName,
    id: &str,
) -> Result<(Option<u64>, Option<u64>), ApiError> {
    let bounds = chunk_bounds(ctx);
    let store = ctx.store.clone();
    match bounds {
        Ok(bounds) => Ok(bounds),
        Err(e) => Err(where_it_stands(store.as_ref(), name, id, e).await),
    }
}

/// Append the request's body at `start`; an out-of-order chunk's 416 says where the session
/// stands.
async fn append(
    ctx: &mut Ctx,
    name: &RepoName,
    id: &str,
    (start, len): (Option<u64>, Option<u64>),
) -> Result<UploadState, ApiError> {
    let body = ctx.take_body();
    let store = ctx.store.clone();
    match store.upload_append(name, id, start, len, body).await {
        Ok(state) => Ok(state),
        Err(e) => Err(where_it_stands(store.as_ref(), name, id, e.into()).await),
    }
}

pub(super) async fn patch(ctx: &mut Ctx, name: &RepoName, id: &str) -> ApiResult {
    let bounds = checked_bounds(ctx, name, id).await?;
    let state = append(ctx, name, id, bounds).await?;
    Ok(session_response(StatusCode::ACCEPTED, name, &state))
}

pub(super) async fn finish(ctx: &mut Ctx, name: &RepoName, id: &str) -> ApiResult {
    let digest = digest_param(ctx)?
        .ok_or_else(|| ApiError::new(ErrorCode::DigestInvalid, "the digest query parameter is required"))?;
    let bounds = checked_bounds(ctx, name, id).await?;
    // The final chunk may ride on the PUT; an empty body appends nothing. Where the session
    // stood before it goes with the commit: if that fails with the session still open (a
    // full disk), the body is cut off again, so the client's retry of the same `PUT` does
    // not append it twice (a digest mismatch that ended the session).
    let mut before = None;
    if bounds.1 != Some(0) {
        let start = match bounds.0 {
            Some(start) => Some(start),
            None => ctx.store.upload_status(name, id).await.ok().map(|s| s.offset),
        };
        match append(ctx, name, id, bounds).await {
            Ok(_) => before = start,
            // No open session: a retry of a `PUT` whose session was published already (its
            // answer lost, or a 503 from what followed) is the store's to recognise, by its
            // digest; its body was appended the first time. Any other session is unknown there.
            Err(e) if e.code == ErrorCode::BlobUploadUnknown => {}
            Err(e) => return Err(e),
        }
    }
    ctx.store.upload_commit(name, id, &digest, before).await?;
    Ok(created_response(name, &digest))
}

pub(super) async fn cancel(ctx: &mut Ctx, name: &RepoName, id: &str) -> ApiResult {
    ctx.store.upload_cancel(name, id).await?;
    Ok((StatusCode::NO_CONTENT, [(header::CONTENT_LENGTH, HeaderValue::from_static("0"))]).into_response())
}
