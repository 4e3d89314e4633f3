//! Listings: tags (`/tags/list`), the catalog (`/_catalog`) and referrers, with the spec's
//! `n`/`last` pagination and `Link` header.

use axum::http::{header, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{hv, ApiResult, Ctx, FILTERS_APPLIED_HEADER};
use crate::digest::Digest;
use crate::error::{ApiError, ErrorCode};
use crate::manifest::OCI_INDEX;
use crate::name::RepoName;
use crate::store::Page;

/// Most entries in one answer, and the page size when the client gives no `n` (a longer
/// list goes on behind a `Link`). An `n` above it is refused rather than quietly answered with
/// fewer (the spec wants `n` results where there are that many). A cluster's catalog merges
/// the origins' pages, each at most this long (`MAX_LIST_LIMIT` in the origin's wire module
/// must not be shorter, or the merge would skip names held only elsewhere).
pub const MAX_PAGE: usize = 10_000;

fn page_params(ctx: &Ctx) -> Result<(usize, Option<String>), ApiError> {
    let bad =
        |message: String| ApiError::new(ErrorCode::Unsupported, message).with_status(StatusCode::BAD_REQUEST);
    let n = match ctx.query.get("n") {
        None => MAX_PAGE,
        Some(n) => match n.parse::<usize>() {
            Ok(n) if n <= MAX_PAGE => n,
            Ok(_) => return Err(bad(format!("n may be at most {MAX_PAGE}"))),
            Err(_) => return Err(bad("n must be a non-negative integer".into())),
        },
    };
    Ok((n, ctx.query.get("last").cloned()))
}

/// `page` as JSON under `key`, with a `Link` to the next page if more follow (a filtered page
/// may hide its own last item: the link starts after what the store said).
fn paged(base: &str, key: &str, head: serde_json::Value, page: Page, n: usize) -> Response {
    let mut body = head;
    body[key] = json!(page.items);
    let mut response =
        (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    if let Some(last) = page.next {
        let link = format!("<{base}?{}>; rel=\"next\"", Page::query(n, Some(&last)));
        response.headers_mut().insert(header::LINK, hv(link));
    }
    response
}

pub(super) async fn tags(ctx: &mut Ctx, name: &RepoName) -> ApiResult {
    let (n, last) = page_params(ctx)?;
    let page = ctx.store.tags(name, last.as_deref(), n).await?;
    Ok(paged(&format!("/v2/{name}/tags/list"), "tags", json!({ "name": name.to_string() }), page, n))
}

pub(super) async fn catalog(ctx: &mut Ctx) -> ApiResult {
    let (n, last) = page_params(ctx)?;
    let mut page = ctx.store.repositories(last.as_deref(), n).await?;
    // Only the repositories the client may pull (a page may come out short; the link goes on).
    if let Some(visible) = &ctx.visible {
        page.items.retain(|name| visible(name));
    }
    Ok(paged("/v2/_catalog", "repositories", json!({}), page, n))
}

pub(super) async fn referrers(ctx: &mut Ctx, name: &RepoName, digest: &str) -> ApiResult {
    let digest: Digest = digest.parse()?;
    let mut found = ctx.store.referrers(name, &digest).await?;
    let filter = ctx.query.get("artifactType").cloned();
    if let Some(filter) = &filter {
        found.retain(|d| d.artifact_type.as_deref() == Some(filter.as_str()));
    }
    let body = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found });
    let mut response =
        (StatusCode::OK, [(header::CONTENT_TYPE, OCI_INDEX)], body.to_string()).into_response();
    if filter.is_some() {
        response.headers_mut().insert(HeaderName::from_static(FILTERS_APPLIED_HEADER), hv("artifactType"));
    }
    Ok(response)
}
