//! Invalid input: repository names, digests, and the shape of error bodies.

use shoal_integration::api::{with_query, Client, ImageKind};
use shoal_integration::content::absent_digest;
use shoal_integration::oci::{self, Manifest};
use shoal_integration::raw::raw_request;
use shoal_integration::{
    random_bytes, sha256, unique_repo, unique_token, Method, Origin, Reply, SendExt, StatusCode,
};

/// Asserts that no repository whose name contains `token` is in the catalog.
async fn assert_nothing_stored(client: &Client, token: &str) {
    let stored: Vec<String> = client.catalog().await.into_iter().filter(|r| r.contains(token)).collect();
    assert!(stored.is_empty(), "stored under an invalid name: {stored:?}");
}

/// A POST that would start an upload in `name`, sent verbatim.
async fn start_upload_raw(client: &Client, name: &str) -> Reply {
    raw_request(client.base(), Method::POST, &format!("/v2/{name}/blobs/uploads/"), &[], b"").await
}

/// `<name>` MUST match `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/...)*`: an
/// uppercase name is 400 NAME_INVALID for uploads and manifest pushes, and
/// nothing is stored.
#[tokio::test]
async fn name_with_uppercase_returns_name_invalid() {
    let origin = Origin::start().await;
    let client = origin.client();
    let token = unique_token();
    let name = format!("conformance/Upper-{token}");

    client
        .post(&format!("/v2/{name}/blobs/uploads/"))
        .header("content-length", "0")
        .reply()
        .await
        .expect_error(StatusCode::BAD_REQUEST, "NAME_INVALID");
    let manifest = Manifest::from_value(oci::OCI_INDEX, &oci::index_value(oci::OCI_INDEX, &[]));
    client.put_manifest(&name, "v1", &manifest).await.expect_error(StatusCode::BAD_REQUEST, "NAME_INVALID");
    assert_nothing_stored(&client, &token).await;
}

/// A `..` path component is not a name component: 400 NAME_INVALID (sent
/// verbatim; HTTP clients would resolve it away).
#[tokio::test]
async fn name_with_dot_dot_component_returns_name_invalid() {
    let origin = Origin::start().await;
    let client = origin.client();
    let token = unique_token();
    let name = format!("conformance/{token}/../x{token}");

    start_upload_raw(&client, &name).await.expect_error(StatusCode::BAD_REQUEST, "NAME_INVALID");
    assert_nothing_stored(&client, &token).await;
}

/// An empty path component (`a//b`) is not allowed: 400 NAME_INVALID.
#[tokio::test]
async fn name_with_empty_component_returns_name_invalid() {
    let origin = Origin::start().await;
    let client = origin.client();
    let token = unique_token();
    let name = format!("conformance//{token}");

    start_upload_raw(&client, &name).await.expect_error(StatusCode::BAD_REQUEST, "NAME_INVALID");
    assert_nothing_stored(&client, &token).await;
}

/// Components that break the separator rules (leading or trailing separator,
/// `..`, `___`, `._`) are 400 NAME_INVALID; the separators the regex allows
/// (`.`, `_`, `__`, runs of `-`) work.
#[tokio::test]
async fn name_component_separator_rules() {
    let origin = Origin::start().await;
    let client = origin.client();
    let token = unique_token();

    // `{}` stands for the token, so each pattern is a whole path component.
    for bad in ["-{}", "{}-", "a..{}", "a___{}", "a._{}", "{}/_a"] {
        let component = bad.replace("{}", &token);
        client
            .post(&format!("/v2/conformance/{component}/blobs/uploads/"))
            .header("content-length", "0")
            .reply()
            .await
            .expect_error(StatusCode::BAD_REQUEST, "NAME_INVALID");
    }
    for good in ["a.b", "a_b", "a__b", "a---b", "0-9"] {
        let repo = format!("conformance/{good}-{token}");
        client.push_blob(&repo, &random_bytes(10)).await;
    }
}

/// Names of 256 characters or more are 400 NAME_INVALID and store nothing;
/// 255 characters are accepted.
#[tokio::test]
async fn name_of_256_characters_returns_name_invalid() {
    let origin = Origin::start().await;
    let client = origin.client();
    let token = unique_token();
    let prefix = format!("conformance/{token}/");
    let long = format!("{prefix}{}", "n".repeat(256 - prefix.len()));
    assert_eq!(long.len(), 256);

    for name in [long.clone(), format!("{long}{}", "m".repeat(100))] {
        client
            .post(&format!("/v2/{name}/blobs/uploads/"))
            .header("content-length", "0")
            .reply()
            .await
            .expect_error(StatusCode::BAD_REQUEST, "NAME_INVALID");
    }
    assert_nothing_stored(&client, &token).await;

    let longest = &long[..255];
    let data = random_bytes(10);
    let digest = client.push_blob(longest, &data).await;
    client.get_blob(longest, &digest).await.expect(StatusCode::OK);
}

/// Names with many components work end to end.
#[tokio::test]
async fn name_with_deep_path_works() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = format!("{}/a/b/c/d/e", unique_repo("deep"));
    let image = client.push_image(&repo, ImageKind::Oci, Some("v1"), 256).await;
    let reply = client.get_manifest(&repo, "v1").await;
    reply.expect(StatusCode::OK);
    assert!(reply.body == image.manifest.bytes);
    client.get_blob(&repo, &image.layers[0].digest).await.expect(StatusCode::OK);
    let tags = client.tags(&repo, "").await.json();
    assert_eq!(tags["name"], serde_json::json!(repo));
}

/// Digests that do not parse (bad hex, wrong length, uppercase hex for
/// sha256) are 400 DIGEST_INVALID when used to fetch a blob.
#[tokio::test]
async fn malformed_digest_returns_digest_invalid() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("digests");
    let real = client.push_blob(&repo, &random_bytes(10)).await;
    let upper = format!("sha256:{}", real["sha256:".len()..].to_uppercase());

    for digest in ["sha256:xyz", "sha256:abc123", upper.as_str()] {
        client.get_blob(&repo, digest).await.expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    }
}

/// A digest with an algorithm the registry does not support (`md5`) is 400
/// DIGEST_INVALID, for a pull and for an upload.
#[tokio::test]
async fn unsupported_digest_algorithm_returns_digest_invalid() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("digests");
    client.push_blob(&repo, &random_bytes(10)).await;
    let md5 = "md5:d41d8cd98f00b204e9800998ecf8427e";

    client.get_blob(&repo, md5).await.expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    let location = client.start_upload(&repo).await;
    client.finish_upload(&location, md5, b"").await.expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
}

/// A closing PUT with a malformed digest is 400 DIGEST_INVALID and stores
/// nothing.
#[tokio::test]
async fn upload_put_with_malformed_digest_returns_digest_invalid() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("digests");
    let data = random_bytes(100);
    let location = client.start_upload(&repo).await;
    client
        .put(&with_query(&location, "digest", "sha256:not-hex"))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .reply()
        .await
        .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    client.head_blob(&repo, &sha256(&data)).await.expect(StatusCode::NOT_FOUND);
}

/// Error codes: a 4xx JSON body is
/// `{"errors":[{"code":"...","message":"...","detail":...}]}` with codes of
/// uppercase letters and underscores from the spec's table, served as JSON.
#[tokio::test]
async fn error_bodies_have_the_spec_shape() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("errors");
    client.push_image(&repo, ImageKind::Oci, Some("v1"), 64).await;

    let cases = [
        (client.get_blob(&repo, &absent_digest()).await, "BLOB_UNKNOWN"),
        (client.get_manifest(&repo, "missing").await, "MANIFEST_UNKNOWN"),
        (client.get(&format!("/v2/{}/tags/list", unique_repo("never-pushed"))).reply().await, "NAME_UNKNOWN"),
    ];
    for (reply, code) in &cases {
        reply.expect_error(StatusCode::NOT_FOUND, code);
        let content_type = reply.must_header("content-type");
        assert!(content_type.starts_with("application/json"), "{}", reply.describe());
        let body = reply.json();
        let error = &body["errors"][0];
        assert!(error["message"].is_string(), "no message: {}", reply.describe());
        let keys: Vec<&String> = error.as_object().map(|o| o.keys().collect()).unwrap_or_default();
        assert!(
            keys.iter().all(|k| ["code", "message", "detail"].contains(&k.as_str())),
            "unexpected keys {keys:?}: {}",
            reply.describe()
        );
    }
}
