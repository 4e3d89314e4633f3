//! Content discovery: the tags list (end-8a, end-8b) with `n`, `last` and
//! `Link` pagination, and the `_catalog` listing (Docker's API, kept by Shoal).

use serde_json::{json, Value};
use shoal_integration::api::{parse_next_link, Client, ImageKind};
use shoal_integration::oci::{self, Manifest};
use shoal_integration::{unique_repo, Origin, Reply, SendExt, StatusCode};

const TAGS: [&str; 5] = ["v2", "latest", "v10", "alpha", "v1"];
const SORTED: [&str; 5] = ["alpha", "latest", "v1", "v10", "v2"];

/// A repository with one image tagged with every name in `TAGS`.
async fn tagged_repo(client: &Client) -> String {
    let repo = unique_repo("tags");
    let image = client.push_image(&repo, ImageKind::Oci, None, 64).await;
    for tag in TAGS {
        client.push_manifest(&repo, tag, &image.manifest).await;
    }
    repo
}

fn tags_of(reply: &Reply) -> Vec<String> {
    let body = reply.json();
    match &body["tags"] {
        Value::Array(tags) => {
            tags.iter().map(|t| t.as_str().expect("tags are strings").to_string()).collect()
        }
        Value::Null => Vec::new(),
        other => panic!("tags is not a list: {other}"),
    }
}

/// Listing tags: 200 with `{"name": <name>, "tags": [...]}`, in lexical order.
#[tokio::test]
async fn tags_list_returns_name_and_sorted_tags() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = tagged_repo(&client).await;

    let reply = client.tags(&repo, "").await;
    assert_eq!(reply.json()["name"], json!(repo));
    assert_eq!(tags_of(&reply), SORTED);
}

/// `?n=<int>`: exactly n tags while more remain, with a
/// `Link: </v2/<name>/tags/list?n=..&last=..>; rel="next"` header; following
/// the links yields every tag once, in order.
#[tokio::test]
async fn tags_list_paginates_with_n_and_link() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = tagged_repo(&client).await;

    let first = client.tags(&repo, "?n=2").await;
    assert_eq!(tags_of(&first), SORTED[..2]);
    let link = first.must_header("link");
    let next = parse_next_link(link).unwrap_or_else(|| panic!("not a rel=\"next\" link: {link}"));
    assert!(next.starts_with(&format!("/v2/{repo}/tags/list?")), "Link target {next:?}");
    assert!(next.contains("n=2"), "Link target {next:?} lacks n");
    assert!(next.contains("last=latest"), "Link target {next:?} lacks last");

    let mut all = tags_of(&first);
    let mut next = Some(next);
    let mut pages = 1;
    while let Some(target) = next {
        pages += 1;
        assert!(pages <= 10, "pagination does not end");
        let page = client.get(&target).reply().await;
        page.expect(StatusCode::OK);
        let tags = tags_of(&page);
        next = page.header("link").and_then(parse_next_link);
        assert!(tags.len() == 2 || next.is_none(), "a short page must be the last: {}", page.describe());
        all.extend(tags);
    }
    assert_eq!(all, SORTED);

    let everything = client.tags(&repo, "?n=100").await;
    assert_eq!(tags_of(&everything), SORTED, "n above the tag count lists every tag");
}

/// `?n=<int>&last=<tag>`: up to n tags strictly after `last`; `last` alone
/// lists every tag after it.
#[tokio::test]
async fn tags_list_last_returns_tags_after_last() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = tagged_repo(&client).await;

    let reply = client.tags(&repo, "?n=2&last=latest").await;
    assert_eq!(tags_of(&reply), ["v1", "v10"]);
    let reply = client.tags(&repo, "?last=v1").await;
    assert_eq!(tags_of(&reply), ["v10", "v2"]);
    let reply = client.tags(&repo, "?n=3&last=v2").await;
    assert!(tags_of(&reply).is_empty(), "{}", reply.describe());
}

/// "When n is zero, this endpoint MUST return an empty list, and MUST NOT
/// include a Link header."
#[tokio::test]
async fn tags_list_n_zero_returns_empty_list_without_link() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = tagged_repo(&client).await;

    let reply = client.tags(&repo, "?n=0").await;
    assert!(tags_of(&reply).is_empty(), "{}", reply.describe());
    assert!(reply.header("link").is_none(), "{}", reply.describe());
}

/// end-8a failure: the tags list of a repository that does not exist is 404
/// NAME_UNKNOWN.
#[tokio::test]
async fn tags_list_unknown_repository_returns_404_name_unknown() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("never-pushed");
    client
        .get(&format!("/v2/{repo}/tags/list"))
        .reply()
        .await
        .expect_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
}

/// Three repositories under a fresh prefix, each with one tagged manifest.
async fn catalog_repos(client: &Client) -> (String, Vec<String>) {
    let prefix = unique_repo("catalog");
    let config = oci::Blob::new(oci::OCI_EMPTY, oci::EMPTY_JSON.to_vec());
    let mut repos = Vec::new();
    for name in ["r1", "r2", "r3"] {
        let repo = format!("{prefix}/{name}");
        client.push_blob(&repo, &config.data).await;
        let value = oci::image_manifest_value(oci::OCI_MANIFEST, &config, &[]);
        client.push_manifest(&repo, "v1", &Manifest::from_value(oci::OCI_MANIFEST, &value)).await;
        repos.push(repo);
    }
    (prefix, repos)
}

fn repositories_of(reply: &Reply) -> Vec<String> {
    reply.json()["repositories"]
        .as_array()
        .unwrap_or_else(|| panic!("no repositories list: {}", reply.describe()))
        .iter()
        .map(|r| r.as_str().expect("names are strings").to_string())
        .collect()
}

/// `GET /v2/_catalog` (following `Link` pages): every repository, in
/// lexical order.
#[tokio::test]
async fn catalog_lists_repositories_in_order() {
    let origin = Origin::start().await;
    let client = origin.client();
    let (prefix, repos) = catalog_repos(&client).await;

    let listed = client.catalog().await;
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(listed, sorted, "catalog is not sorted");
    let mine: Vec<String> = listed.into_iter().filter(|r| r.starts_with(&prefix)).collect();
    assert_eq!(mine, repos);
}

/// `GET /v2/_catalog?n=&last=`: pages of n names after `last`, with a
/// `Link: <...>; rel="next"` header to the following page.
#[tokio::test]
async fn catalog_paginates_with_n_last_and_link() {
    let origin = Origin::start().await;
    let client = origin.client();
    let (prefix, repos) = catalog_repos(&client).await;

    let first = client.get(&format!("/v2/_catalog?n=2&last={prefix}")).reply().await;
    first.expect(StatusCode::OK);
    assert_eq!(repositories_of(&first), repos[..2]);
    let link = first.must_header("link");
    let next = parse_next_link(link).unwrap_or_else(|| panic!("not a rel=\"next\" link: {link}"));
    assert!(next.starts_with("/v2/_catalog?"), "Link target {next:?}");
    assert!(next.contains("n=2"), "Link target {next:?} lacks n");

    let second = client.get(&next).reply().await;
    second.expect(StatusCode::OK);
    assert_eq!(repositories_of(&second).first(), Some(&repos[2]));
}
