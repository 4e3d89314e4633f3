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
/// list goes on behind a `Link`). A larger `n` gets this many and the `Link` (the spec lets
/// an answer hold fewer than `n` when a `Link` follows it). A cluster's catalog merges
/// the origins' pages, each at most this long (`MAX_LIST_LIMIT` in the origin's wire module
/// must not be shorter, or the merge would skip names held only elsewhere).
pub const MAX_PAGE: usize = 10_000;

fn page_params(ctx: &Ctx) -> Result<(usize, Option<String>), ApiError> {
    let bad =
        |message: String| ApiError::new(ErrorCode::Unsupported, message).with_status(StatusCode::BAD_REQUEST);
    let n = match ctx.query.get("n") {
        None => MAX_PAGE,
        Some(n) => match n.parse::<usize>() {
            Ok(n) => n.min(MAX_PAGE),
            Err(_) => return Err(bad("n must be a non-negative integer".into())),
        },
    };
    Ok((n, ctx.query.get("last").cloned()))
}

/// `page` as JSON under `key`, with a `Link` to the next page if more follow.
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

/// Names of the store's catalog a filtered catalog page reads at most, past those the client
/// may not see, before it answers with what it found.
const CATALOG_SCAN_BUDGET: usize = 100_000;
/// Fewest names a filtered catalog page asks the store for at once (a page of `n=1` read one
/// name per store call, up to the whole budget in calls).
const CATALOG_SCAN_BATCH: usize = 1_000;

pub(super) async fn catalog(ctx: &mut Ctx) -> ApiResult {
    let (n, last) = page_params(ctx)?;
    let Some(visible) = ctx.visible.clone() else {
        let page = ctx.store.repositories(last.as_deref(), n).await?;
        return Ok(paged("/v2/_catalog", "repositories", json!({}), page, n));
    };
    // Only the repositories the client may pull, and a link that names one of them: the
    // store's own `next` (its last name, seen or not) told the client every hidden name, a
    // page at a time. So the store is read on past hidden names until the page holds `n`
    // visible ones, the catalog ends, or the budget is spent; the link then goes on from
    // the last visible name (after a budget spent on hidden names alone, the listing ends).
    let mut items: Vec<String> = Vec::new();
    let (mut cursor, mut scanned) = (last, 0usize);
    let more = loop {
        if items.len() >= n {
            break true;
        }
        let want = (n - items.len()).clamp(CATALOG_SCAN_BATCH, MAX_PAGE);
        let page = ctx.store.repositories(cursor.as_deref(), want).await?;
        scanned += page.items.len();
        let mut visible_here = page.items.into_iter().filter(|name| visible(name));
        items.extend(visible_here.by_ref().take(n - items.len()));
        if visible_here.next().is_some() {
            // More visible names in this batch than the page takes: the link goes on after
            // the last one taken.
            break true;
        }
        match page.next {
            Some(next) if scanned < CATALOG_SCAN_BUDGET => cursor = Some(next),
            Some(_) => break true,
            None => break false,
        }
    };
    let next = if more { items.last().cloned() } else { None };
    Ok(paged("/v2/_catalog", "repositories", json!({}), Page { items, next }, n))
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
