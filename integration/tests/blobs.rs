//! Pulling, checking and deleting blobs (end-2, end-10), range requests and
//! repository scoping.

use shoal_integration::content::absent_digest;
use shoal_integration::{random_bytes, sha256, unique_repo, Origin, SendExt, StatusCode};

/// Pull: GET of an existing blob is 200 with the exact bytes; a
/// `Docker-Content-Digest`, if present, matches the body.
#[tokio::test]
async fn blob_get_returns_content_and_matching_digest() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("blobs");
    let data = random_bytes(100_000);
    let digest = client.push_blob(&repo, &data).await;

    let reply = client.get_blob(&repo, &digest).await;
    reply.expect(StatusCode::OK);
    assert!(reply.body == data, "blob bytes differ from what was pushed");
    if let Some(header) = reply.header("docker-content-digest") {
        assert_eq!(header, sha256(&reply.body), "Docker-Content-Digest");
    }
}

/// Pull: HEAD of an existing blob is 200 with `Content-Length` (the blob size)
/// and `Docker-Content-Digest`, and no body.
#[tokio::test]
async fn blob_head_returns_length_and_digest_without_body() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("blobs");
    let data = random_bytes(12_345);
    let digest = client.push_blob(&repo, &data).await;

    let reply = client.head_blob(&repo, &digest).await;
    reply.expect(StatusCode::OK);
    assert_eq!(reply.must_header("content-length"), "12345");
    assert_eq!(reply.must_header("docker-content-digest"), digest);
    assert!(reply.body.is_empty(), "HEAD returned a body");
}

/// Pull: GET and HEAD of an unknown blob are 404 (GET with BLOB_UNKNOWN).
#[tokio::test]
async fn blob_get_and_head_unknown_return_404_blob_unknown() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("blobs");
    client.push_blob(&repo, &random_bytes(10)).await;
    let digest = absent_digest();

    client.get_blob(&repo, &digest).await.expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    client.head_blob(&repo, &digest).await.expect(StatusCode::NOT_FOUND);
}

/// Pull (SHOULD support Range, RFC 9110): a satisfiable range is 206 with
/// `Content-Range: bytes <first>-<last>/<size>` and just those bytes.
#[tokio::test]
async fn blob_range_request_returns_206_with_content_range() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("blobs");
    let data = random_bytes(10_000);
    let digest = client.push_blob(&repo, &data).await;

    let reply =
        client.get(&format!("/v2/{repo}/blobs/{digest}")).header("range", "bytes=1000-1999").reply().await;
    reply.expect(StatusCode::PARTIAL_CONTENT);
    assert_eq!(reply.must_header("content-range"), "bytes 1000-1999/10000");
    assert!(reply.body == data[1000..2000], "range bytes differ");

    let suffix =
        client.get(&format!("/v2/{repo}/blobs/{digest}")).header("range", "bytes=9000-").reply().await;
    suffix.expect(StatusCode::PARTIAL_CONTENT);
    assert_eq!(suffix.must_header("content-range"), "bytes 9000-9999/10000");
    assert!(suffix.body == data[9000..], "open-ended range bytes differ");
}

/// RFC 9110: a range that starts past the end is 416 with
/// `Content-Range: bytes */<size>`.
#[tokio::test]
async fn blob_unsatisfiable_range_returns_416() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("blobs");
    let data = random_bytes(1000);
    let digest = client.push_blob(&repo, &data).await;

    let reply =
        client.get(&format!("/v2/{repo}/blobs/{digest}")).header("range", "bytes=5000-6000").reply().await;
    reply.expect(StatusCode::RANGE_NOT_SATISFIABLE);
    if let Some(range) = reply.header("content-range") {
        assert_eq!(range, "bytes */1000");
    }
    // The blob exists: Shoal's 416 does not say BLOB_UNKNOWN (others may send no JSON).
    if shoal_integration::external_registry().is_none() {
        assert_eq!(reply.json()["errors"][0]["code"], "SIZE_INVALID");
    }
}

/// RFC 9110 (14.2): `Range` is defined for GET only, so a HEAD ignores it: 200 with the
/// blob's whole size, even for a range past the end. A client probing a blob's size with
/// HEAD while reusing its range header read a size of 1, or an error for a blob that exists.
#[tokio::test]
async fn a_head_ignores_range() {
    if shoal_integration::external_registry().is_some() {
        return; // Go's file server answers ranges to HEAD too.
    }
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("blobs");
    let data = random_bytes(1000);
    let digest = client.push_blob(&repo, &data).await;
    for range in ["bytes=0-0", "bytes=5000-"] {
        let reply = client.head(&format!("/v2/{repo}/blobs/{digest}")).header("range", range).reply().await;
        reply.expect(StatusCode::OK);
        assert_eq!(reply.must_header("content-length"), "1000", "{range}");
        assert!(reply.header("content-range").is_none(), "{range}");
    }
}

/// Deleting blobs: DELETE is 202; afterwards GET is 404 BLOB_UNKNOWN.
#[tokio::test]
async fn blob_delete_returns_202_then_404() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("blobs");
    let digest = client.push_blob(&repo, &random_bytes(2000)).await;

    client.delete(&format!("/v2/{repo}/blobs/{digest}")).reply().await.expect(StatusCode::ACCEPTED);
    client.get_blob(&repo, &digest).await.expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    client.head_blob(&repo, &digest).await.expect(StatusCode::NOT_FOUND);
}

/// Deleting blobs: "If the blob is not found, a 404 Not Found code MUST be
/// returned."
#[tokio::test]
async fn blob_delete_unknown_returns_404() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("blobs");
    client.push_blob(&repo, &random_bytes(10)).await;

    client
        .delete(&format!("/v2/{repo}/blobs/{}", absent_digest()))
        .reply()
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
}

/// "If the blob is not found in the repository": a blob pushed to repository
/// A is not readable through repository B until it is mounted there.
#[tokio::test]
async fn blob_is_scoped_to_its_repository() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo_a = unique_repo("scope-a");
    let repo_b = unique_repo("scope-b");
    let data = random_bytes(4096);
    let digest = client.push_blob(&repo_a, &data).await;
    client.push_blob(&repo_b, &random_bytes(10)).await;

    client.get_blob(&repo_b, &digest).await.expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    client.head_blob(&repo_b, &digest).await.expect(StatusCode::NOT_FOUND);

    client
        .post(&format!("/v2/{repo_b}/blobs/uploads/?mount={digest}&from={repo_a}"))
        .header("content-length", "0")
        .reply()
        .await
        .expect(StatusCode::CREATED);
    let reply = client.get_blob(&repo_b, &digest).await;
    reply.expect(StatusCode::OK);
    assert!(reply.body == data, "mounted blob bytes differ");
}

/// Deleting a blob from one repository leaves other repositories' links.
#[tokio::test]
async fn blob_delete_in_one_repository_keeps_it_in_another() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo_a = unique_repo("scope-a");
    let repo_b = unique_repo("scope-b");
    let data = random_bytes(3000);
    let digest = client.push_blob(&repo_a, &data).await;
    client.push_blob(&repo_b, &data).await;

    client.delete(&format!("/v2/{repo_a}/blobs/{digest}")).reply().await.expect(StatusCode::ACCEPTED);
    client.get_blob(&repo_a, &digest).await.expect(StatusCode::NOT_FOUND);
    let reply = client.get_blob(&repo_b, &digest).await;
    reply.expect(StatusCode::OK);
    assert!(reply.body == data, "blob bytes in the other repository differ");
}
