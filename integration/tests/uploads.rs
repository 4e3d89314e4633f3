//! Pushing blobs: upload sessions (end-4a/4b, end-5, end-6, end-13), chunked
//! and streamed PATCH, cross-repository mounts (end-11), resumption after a
//! dropped connection or a restart, and session expiry.

use shoal_integration::api::{with_query, Client, ImageKind};
use shoal_integration::content::{absent_digest, contains_uuid};
use shoal_integration::raw::{request_target, RawConnection};
use shoal_integration::{
    random_bytes, sha256, sha512, skip_if_external, unique_repo, Method, Origin, SendExt, StatusCode,
};
use std::time::{Duration, Instant};

/// A spec-shaped random UUID path for an upload that never existed.
const UNKNOWN_UPLOAD: &str = "3f1c0a52-8e5b-4b61-9a4e-0c8d1f2e3a4b";

/// POST then PUT: the POST is 202 with a `Location` that contains a UUID;
/// Shoal (like Docker's registry) also sends `Docker-Upload-UUID` and
/// `Range: 0-0`.
#[tokio::test]
async fn upload_post_returns_202_with_location_and_session_headers() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");

    let reply =
        client.post(&format!("/v2/{repo}/blobs/uploads/")).header("content-length", "0").reply().await;
    reply.expect(StatusCode::ACCEPTED);
    let location = reply.must_header("location");
    assert!(contains_uuid(location), "no UUID in Location {location:?}");
    let uuid = reply.must_header("docker-upload-uuid");
    assert!(location.contains(uuid), "Location {location:?} lacks {uuid}");
    assert_eq!(reply.must_header("range"), "0-0");
}

/// "The <location> MUST contain a UUID representing a unique session ID":
/// two POSTs open two sessions.
#[tokio::test]
async fn upload_sessions_are_unique() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let first = client.start_upload(&repo).await;
    let second = client.start_upload(&repo).await;
    assert_ne!(first, second);
}

/// POST then PUT `<location>?digest=` with the whole blob: 201 with a
/// `Location` that is a pullable blob URL; the session is then over.
#[tokio::test]
async fn upload_post_then_put_returns_201_with_pullable_location() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let data = random_bytes(70_000);
    let digest = sha256(&data);

    let location = client.start_upload(&repo).await;
    let reply = client.finish_upload(&location, &digest, &data).await;
    reply.expect(StatusCode::CREATED);
    if let Some(header) = reply.header("docker-content-digest") {
        assert_eq!(header, digest);
    }
    let blob = client.get(reply.must_header("location")).reply().await;
    blob.expect(StatusCode::OK);
    assert!(blob.body == data, "bytes at the blob Location differ");
    client.upload_status(&location).await.expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
}

/// Single POST (`?digest=` with the body): 201 with a pullable `Location`.
/// The spec lets a registry answer 202 instead; Shoal supports the single POST.
#[tokio::test]
async fn upload_single_post_with_digest_returns_201() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let data = random_bytes(5000);
    let digest = sha256(&data);

    let reply = client
        .post(&format!("/v2/{repo}/blobs/uploads/?digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .reply()
        .await;
    reply.expect(StatusCode::CREATED);
    let blob = client.get(reply.must_header("location")).reply().await;
    blob.expect(StatusCode::OK);
    assert!(blob.body == data, "bytes at the blob Location differ");
}

/// Single POST: "the <digest> MUST match the blob's digest"; a mismatch is
/// 400 DIGEST_INVALID and stores nothing.
#[tokio::test]
async fn upload_single_post_with_wrong_digest_returns_digest_invalid() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let data = random_bytes(5000);
    let claimed = absent_digest();

    client
        .post(&format!("/v2/{repo}/blobs/uploads/?digest={claimed}"))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .reply()
        .await
        .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    client.head_blob(&repo, &claimed).await.expect(StatusCode::NOT_FOUND);
    client.head_blob(&repo, &sha256(&data)).await.expect(StatusCode::NOT_FOUND);
}

/// A zero-length blob (the empty layer) can be pushed and pulled.
#[tokio::test]
async fn upload_empty_blob() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let digest = client.push_blob(&repo, b"").await;
    let reply = client.get_blob(&repo, &digest).await;
    reply.expect(StatusCode::OK);
    assert!(reply.body.is_empty());
}

/// Pushing a blob the repository already has is 201 again (de-duplication).
#[tokio::test]
async fn upload_existing_blob_again_returns_201() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let data = random_bytes(3000);
    client.push_blob(&repo, &data).await;
    client.push_blob(&repo, &data).await;
    let reply = client.get_blob(&repo, &sha256(&data)).await;
    reply.expect(StatusCode::OK);
    assert!(reply.body == data);
}

/// Chunked push: each PATCH with `Content-Range` and `Content-Length` is 202
/// with `Location` and `Range: 0-<end-of-range>`; the closing PUT (no body)
/// is 201 and the blob is the concatenation.
#[tokio::test]
async fn upload_chunked_patch_with_content_range() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let data = random_bytes(300_000);
    let digest = sha256(&data);

    let mut location = client.start_upload(&repo).await;
    for (start, end) in [(0, 100_000), (100_000, 250_000), (250_000, 300_000)] {
        let reply = client.patch_chunk(&location, start, &data[start..end]).await;
        reply.expect(StatusCode::ACCEPTED);
        assert_eq!(reply.must_header("range"), format!("0-{}", end - 1));
        location = client.url(reply.must_header("location"));
    }
    client.finish_upload(&location, &digest, b"").await.expect(StatusCode::CREATED);
    let reply = client.get_blob(&repo, &digest).await;
    reply.expect(StatusCode::OK);
    assert!(reply.body == data, "chunked blob differs");
}

/// Streamed PATCH (what Docker sends): no `Content-Range`, no
/// `Content-Length`, a chunked request body. Each is 202 with the running
/// `Range`; the PUT closes the session.
#[tokio::test]
async fn upload_streamed_patch_without_content_range() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let data = random_bytes(400_000);
    let digest = sha256(&data);

    let mut location = client.start_upload(&repo).await;
    for (start, end) in [(0, 150_000), (150_000, 400_000)] {
        let reply = client
            .patch(&location)
            .header("content-type", "application/octet-stream")
            .body(streamed_body(&data[start..end]).await)
            .reply()
            .await;
        reply.expect(StatusCode::ACCEPTED);
        assert_eq!(reply.must_header("range"), format!("0-{}", end - 1));
        location = client.url(reply.must_header("location"));
    }
    client.finish_upload(&location, &digest, b"").await.expect(StatusCode::CREATED);
    let reply = client.get_blob(&repo, &digest).await;
    reply.expect(StatusCode::OK);
    assert!(reply.body == data, "streamed blob differs");
}

/// "The final chunk MAY be uploaded using a PATCH request or it MAY be
/// uploaded in the closing PUT request."
#[tokio::test]
async fn upload_final_chunk_in_closing_put() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let data = random_bytes(20_000);
    let digest = sha256(&data);

    let location = client.start_upload(&repo).await;
    let reply = client.patch_chunk(&location, 0, &data[..12_000]).await;
    reply.expect(StatusCode::ACCEPTED);
    let location = client.url(reply.must_header("location"));
    client
        .put(&with_query(&location, "digest", &digest))
        .header("content-type", "application/octet-stream")
        .header("content-range", "12000-19999")
        .body(data[12_000..].to_vec())
        .reply()
        .await
        .expect(StatusCode::CREATED);
    let reply = client.get_blob(&repo, &digest).await;
    reply.expect(StatusCode::OK);
    assert!(reply.body == data, "blob with final chunk in PUT differs");
}

/// "If a chunk is uploaded out of order, the registry MUST respond with a
/// 416", whose `Range`, `Location` and `Docker-Upload-UUID` say where the session stands; the
/// session keeps its offset and can still be completed.
#[tokio::test]
async fn upload_out_of_order_chunk_returns_416() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let data = random_bytes(3000);
    let digest = sha256(&data);

    let location = client.start_upload(&repo).await;
    let reply = client.patch_chunk(&location, 0, &data[..1000]).await;
    reply.expect(StatusCode::ACCEPTED);
    let session = reply.must_header("location").to_string();
    let location = client.url(&session);

    let refused = client.patch_chunk(&location, 2000, &data[2000..]).await;
    refused.expect(StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(refused.must_header("range"), "0-999");
    // The same session's Location (a cluster's origins answer with the same path).
    assert_eq!(refused.must_header("location"), session);
    assert!(session.ends_with(refused.must_header("docker-upload-uuid")), "{}", refused.describe());

    let status = client.upload_status(&location).await;
    status.expect(StatusCode::NO_CONTENT);
    assert_eq!(status.upload_offset(), 1000);
    let location = client.url(status.must_header("location"));
    let reply = client.patch_chunk(&location, 1000, &data[1000..]).await;
    reply.expect(StatusCode::ACCEPTED);
    let location = client.url(reply.must_header("location"));
    client.finish_upload(&location, &digest, b"").await.expect(StatusCode::CREATED);
    let reply = client.get_blob(&repo, &digest).await;
    assert!(reply.body == data, "blob differs after a rejected chunk");
}

/// "The first chunk's range MUST begin with 0": a first chunk at 500 is 416.
#[tokio::test]
async fn upload_first_chunk_not_at_zero_returns_416() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let location = client.start_upload(&repo).await;
    client.patch_chunk(&location, 500, &random_bytes(500)).await.expect(StatusCode::RANGE_NOT_SATISFIABLE);
}

/// A `Content-Range` that ends at the last byte a u64 can count has a length no u64 holds:
/// 416, not a dropped connection (a debug build overflowed computing it), and the session
/// can still be completed.
#[tokio::test]
async fn upload_chunk_with_a_range_past_u64_returns_416() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let data = random_bytes(100);
    let location = client.start_upload(&repo).await;
    let refused = client
        .patch(&location)
        .header("content-type", "application/octet-stream")
        .header("content-range", format!("0-{}", u64::MAX))
        .body(data.clone())
        .reply()
        .await;
    refused.expect(StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(refused.must_header("range"), "0-0", "a malformed range's 416 says where the session stands");
    // A Content-Range that is not text is malformed too, not absent (the chunk was appended
    // unchecked).
    client
        .patch(&location)
        .header("content-type", "application/octet-stream")
        .header("content-range", reqwest::header::HeaderValue::from_bytes(b"0-\xff").unwrap())
        .body(data.clone())
        .reply()
        .await
        .expect(StatusCode::RANGE_NOT_SATISFIABLE);
    client.finish_upload(&location, &sha256(&data), &data).await.expect(StatusCode::CREATED);
}

/// end-13: GET on an active upload is 204 with `Location` and
/// `Range: 0-<end-of-range>`.
#[tokio::test]
async fn upload_status_returns_204_with_location_and_range() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let location = client.start_upload(&repo).await;
    let reply = client.patch_chunk(&location, 0, &random_bytes(1234)).await;
    reply.expect(StatusCode::ACCEPTED);
    let location = client.url(reply.must_header("location"));

    let reply = client.upload_status(&location).await;
    reply.expect(StatusCode::NO_CONTENT);
    assert_eq!(reply.must_header("range"), "0-1233");
    let status_location = reply.must_header("location");
    assert!(contains_uuid(status_location), "no UUID in {status_location:?}");
}

/// DELETE on an upload cancels it: 204, then the session is 404
/// BLOB_UPLOAD_UNKNOWN.
#[tokio::test]
async fn upload_delete_cancels_session() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let data = random_bytes(100);
    let location = client.start_upload(&repo).await;
    let reply = client.patch_chunk(&location, 0, &data).await;
    reply.expect(StatusCode::ACCEPTED);
    let location = client.url(reply.must_header("location"));

    client.delete(&location).reply().await.expect(StatusCode::NO_CONTENT);
    client.upload_status(&location).await.expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    client
        .finish_upload(&location, &sha256(&data), b"")
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
}

/// end-6 failure: a PUT whose digest does not match the uploaded bytes is
/// 400 DIGEST_INVALID, and neither digest becomes a blob.
#[tokio::test]
async fn upload_put_with_wrong_digest_returns_digest_invalid_and_stores_nothing() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let data = random_bytes(4000);
    let claimed = absent_digest();

    let location = client.start_upload(&repo).await;
    client
        .finish_upload(&location, &claimed, &data)
        .await
        .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    client.head_blob(&repo, &claimed).await.expect(StatusCode::NOT_FOUND);
    client.head_blob(&repo, &sha256(&data)).await.expect(StatusCode::NOT_FOUND);
}

/// "The closing PUT request MUST include the <digest>": without it, 400
/// DIGEST_INVALID.
#[tokio::test]
async fn upload_put_without_digest_is_rejected() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let data = random_bytes(100);
    let location = client.start_upload(&repo).await;
    client
        .put(&location)
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .reply()
        .await
        .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    client.head_blob(&repo, &sha256(&data)).await.expect(StatusCode::NOT_FOUND);
}

/// end-11: mounting a blob from another repository is 201 with `Location`.
#[tokio::test]
async fn upload_mount_from_other_repository_returns_201() {
    let origin = Origin::start().await;
    let client = origin.client();
    let source = unique_repo("mount-src");
    let target = unique_repo("mount-dst");
    let data = random_bytes(8000);
    let digest = client.push_blob(&source, &data).await;

    let reply = client
        .post(&format!("/v2/{target}/blobs/uploads/?mount={digest}&from={source}"))
        .header("content-length", "0")
        .reply()
        .await;
    reply.expect(StatusCode::CREATED);
    if let Some(header) = reply.header("docker-content-digest") {
        assert_eq!(header, digest);
    }
    let blob = client.get(reply.must_header("location")).reply().await;
    blob.expect(StatusCode::OK);
    assert!(blob.body == data, "mounted blob differs");
}

/// "If a registry ... is unable to mount the requested blob, it SHOULD return
/// a 202": an upload session the client can use instead.
#[tokio::test]
async fn upload_mount_missing_source_starts_a_session() {
    let origin = Origin::start().await;
    let client = origin.client();
    let source = unique_repo("mount-src");
    let target = unique_repo("mount-dst");
    client.push_blob(&source, &random_bytes(10)).await;
    let data = random_bytes(2000);
    let digest = sha256(&data);

    let reply = client
        .post(&format!("/v2/{target}/blobs/uploads/?mount={digest}&from={source}"))
        .header("content-length", "0")
        .reply()
        .await;
    reply.expect(StatusCode::ACCEPTED);
    let location = client.url(reply.must_header("location"));
    client.finish_upload(&location, &digest, &data).await.expect(StatusCode::CREATED);
    client.get_blob(&target, &digest).await.expect(StatusCode::OK);
}

/// A manifest's digest is readable as a blob of its own repository (from the manifest
/// record), but it is no blob copy to link elsewhere: a mount of it starts a session. Before,
/// the mount answered 201 and the target's `HEAD` 200, and every `GET` of it failed (503).
#[tokio::test]
async fn upload_mount_of_a_manifest_digest_starts_a_session() {
    // Another registry may keep manifests as blobs and mount them.
    skip_if_external!("Shoal's manifests are records, not blob copies");
    let origin = Origin::start().await;
    let client = origin.client();
    let source = unique_repo("mount-src");
    let target = unique_repo("mount-dst");
    let image = client.push_image(&source, ImageKind::Oci, Some("v1"), 1000).await;
    let digest = &image.manifest.digest;
    client.get_blob(&source, digest).await.expect(StatusCode::OK);

    let reply = client
        .post(&format!("/v2/{target}/blobs/uploads/?mount={digest}&from={source}"))
        .header("content-length", "0")
        .reply()
        .await;
    reply.expect(StatusCode::ACCEPTED);
    client.head_blob(&target, digest).await.expect(StatusCode::NOT_FOUND);
    let location = client.url(reply.must_header("location"));
    client.finish_upload(&location, digest, &image.manifest.bytes).await.expect(StatusCode::CREATED);
    let blob = client.get_blob(&target, digest).await;
    blob.expect(StatusCode::OK);
    assert_eq!(sha256(&blob.body), *digest);
}

/// A final `PUT` sent again (its 201 lost on the way, the client retries) is answered 201
/// again, with or without the final chunk on it, for the digest it published; another digest
/// finds no session (404 `BLOB_UPLOAD_UNKNOWN`). Before, any retry found the session ended.
#[tokio::test]
async fn upload_final_put_sent_again_is_answered_again() {
    // Other registries may answer 404 to a retry, as the spec allows.
    skip_if_external!("a retried final PUT is answered from the finished session");
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("put-again");
    let data = random_bytes(50_000);
    let digest = sha256(&data);
    let location = client.start_upload(&repo).await;
    client.patch_chunk(&location, 0, &data[..30_000]).await.expect(StatusCode::ACCEPTED);
    client.finish_upload(&location, &digest, &data[30_000..]).await.expect(StatusCode::CREATED);
    for body in [&data[30_000..], &[][..]] {
        let again = client.finish_upload(&location, &digest, body).await;
        again.expect(StatusCode::CREATED);
        assert_eq!(again.header("docker-content-digest"), Some(digest.as_str()));
    }
    let other = sha256(b"other");
    let reply = client.finish_upload(&location, &other, &[]).await;
    reply.expect(StatusCode::NOT_FOUND);
    assert!(String::from_utf8_lossy(&reply.body).contains("BLOB_UPLOAD_UNKNOWN"), "{reply:?}");
    let blob = client.get_blob(&repo, &digest).await;
    blob.expect(StatusCode::OK);
    assert!(blob.body == data, "the blob is the bytes sent once");
    // Deleted since: the retry finds no session and does not link the blob again.
    client.delete(&format!("/v2/{repo}/blobs/{digest}")).reply().await.expect(StatusCode::ACCEPTED);
    let after = client.finish_upload(&location, &digest, &[]).await;
    after.expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    client.head_blob(&repo, &digest).await.expect(StatusCode::NOT_FOUND);
}

/// end-5/6/13 failure: an upload id the registry never issued is 404
/// BLOB_UPLOAD_UNKNOWN for GET, PATCH, PUT and DELETE.
#[tokio::test]
async fn upload_unknown_session_returns_404_blob_upload_unknown() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    client.push_blob(&repo, &random_bytes(10)).await;
    let location = format!("/v2/{repo}/blobs/uploads/{UNKNOWN_UPLOAD}");
    let data = random_bytes(10);

    client.upload_status(&location).await.expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    client.patch_chunk(&location, 0, &data).await.expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    client
        .finish_upload(&location, &sha256(&data), &data)
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    client.delete(&location).reply().await.expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
}

/// Upload sessions belong to their repository: the same session id under
/// another repository's path is 404 BLOB_UPLOAD_UNKNOWN.
#[tokio::test]
async fn upload_session_is_scoped_to_its_repository() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo_a = unique_repo("uploads-a");
    let repo_b = unique_repo("uploads-b");
    client.push_blob(&repo_b, &random_bytes(10)).await;
    let location = client.start_upload(&repo_a).await;
    let foreign = location.replacen(&format!("/v2/{repo_a}/"), &format!("/v2/{repo_b}/"), 1);
    assert_ne!(foreign, location, "Location {location:?} is not under /v2/{repo_a}/");

    client.upload_status(&foreign).await.expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    client
        .patch_chunk(&foreign, 0, &random_bytes(10))
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    client.upload_status(&location).await.expect(StatusCode::NO_CONTENT);
}

/// The same while a PATCH streams into the session: the repository check neither waits for
/// the request in progress nor lets the foreign path through (it used to skip the check for
/// a busy session, then wait for it and answer). The PATCH then completes as usual.
#[tokio::test]
async fn upload_session_is_scoped_to_its_repository_while_a_patch_streams() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo_a = unique_repo("uploads-a");
    let repo_b = unique_repo("uploads-b");
    client.push_blob(&repo_b, &random_bytes(10)).await;
    let location = client.start_upload(&repo_a).await;
    let foreign = location.replacen(&format!("/v2/{repo_a}/"), &format!("/v2/{repo_b}/"), 1);
    let mut patch = RawConnection::open(
        client.base(),
        Method::PATCH,
        &request_target(&location),
        &[("Content-Type", "application/octet-stream".to_string()), ("Content-Length", "10".to_string())],
    )
    .await;
    patch.send(b"hello").await.expect("send half the chunk");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = tokio::time::timeout(Duration::from_secs(5), client.upload_status(&foreign))
        .await
        .expect("a foreign path is answered while the session is busy");
    status.expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    patch.send(b"world").await.expect("send the rest");
    patch.finish().await.expect(StatusCode::ACCEPTED);
    let status = client.upload_status(&location).await;
    status.expect(StatusCode::NO_CONTENT);
    assert_eq!(status.upload_offset(), 10);
}

/// Digests of other algorithms: a blob pushed as `sha512:<hex>` is pulled by
/// that digest.
#[tokio::test]
async fn upload_and_pull_with_sha512_digest() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let data = random_bytes(10_000);
    let digest = sha512(&data);

    client.push_blob_as(&repo, &data, &digest).await;
    let reply = client.get_blob(&repo, &digest).await;
    reply.expect(StatusCode::OK);
    assert!(reply.body == data, "sha512 blob differs");
    client.head_blob(&repo, &digest).await.expect(StatusCode::OK);
}

/// Resumable push: a PATCH cut off mid-body (the client hangs up) leaves the
/// session usable: GET reports the offset the registry kept, the client sends
/// the rest from there, and the blob comes out right. Nothing is visible as a
/// blob before the closing PUT.
#[tokio::test]
async fn upload_resumes_after_dropped_connection() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let data = random_bytes(1_000_000);
    let digest = sha256(&data);

    let location = client.start_upload(&repo).await;
    let reply = client.patch_chunk(&location, 0, &data[..100_000]).await;
    reply.expect(StatusCode::ACCEPTED);
    let location = client.url(reply.must_header("location"));

    // Announce the rest, send only part of it, then hang up.
    let sent = 300_000;
    let mut connection = RawConnection::open(
        client.base(),
        Method::PATCH,
        &request_target(&location),
        &[
            ("Content-Type", "application/octet-stream".to_string()),
            ("Content-Range", format!("100000-{}", data.len() - 1)),
            ("Content-Length", (data.len() - 100_000).to_string()),
        ],
    )
    .await;
    connection.send(&data[100_000..100_000 + sent]).await.expect("send part of the chunk");
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(connection);
    tokio::time::sleep(Duration::from_millis(500)).await;

    client.head_blob(&repo, &digest).await.expect(StatusCode::NOT_FOUND);
    let status = client.upload_status(&location).await;
    status.expect(StatusCode::NO_CONTENT);
    let offset = status.upload_offset() as usize;
    eprintln!("after the dropped PATCH the registry kept {offset} bytes");
    assert!(
        (100_000..=100_000 + sent).contains(&offset),
        "offset {offset} outside what was sent: {}",
        status.describe()
    );

    let location = client.url(status.must_header("location"));
    let reply = client.patch_chunk(&location, offset, &data[offset..]).await;
    reply.expect(StatusCode::ACCEPTED);
    let location = client.url(reply.must_header("location"));
    client.head_blob(&repo, &digest).await.expect(StatusCode::NOT_FOUND);
    client.finish_upload(&location, &digest, b"").await.expect(StatusCode::CREATED);
    let reply = client.get_blob(&repo, &digest).await;
    reply.expect(StatusCode::OK);
    assert!(reply.body == data, "resumed blob differs");
}

/// Layer upload de-duplication: two clients pushing the same blob at the same
/// time both succeed and the blob is intact.
#[tokio::test]
async fn upload_same_blob_concurrently_from_two_clients() {
    let origin = Origin::start().await;
    let repo = unique_repo("uploads");
    let data = random_bytes(2 * 1024 * 1024);
    let first = origin.client();
    let second = origin.client();

    let (a, b) = tokio::join!(chunked_push(&first, &repo, &data), chunked_push(&second, &repo, &data));
    assert_eq!(a, StatusCode::CREATED);
    assert_eq!(b, StatusCode::CREATED);
    let reply = first.get_blob(&repo, &sha256(&data)).await;
    reply.expect(StatusCode::OK);
    assert!(reply.body == data, "concurrently pushed blob differs");
}

/// Resumable push across a crash: an upload session (and its bytes) survive
/// an origin restart and the upload completes correctly afterwards.
#[tokio::test]
async fn upload_session_survives_restart() {
    skip_if_external!("needs a restart");
    let mut origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let data = random_bytes(500_000);
    let digest = sha256(&data);

    let location = client.start_upload(&repo).await;
    let reply = client.patch_chunk(&location, 0, &data[..200_000]).await;
    reply.expect(StatusCode::ACCEPTED);
    let location = client.url(reply.must_header("location"));

    origin.restart().await;

    let status = client.upload_status(&location).await;
    status.expect(StatusCode::NO_CONTENT);
    assert_eq!(status.upload_offset(), 200_000);
    let location = client.url(status.must_header("location"));
    let reply = client.patch_chunk(&location, 200_000, &data[200_000..]).await;
    reply.expect(StatusCode::ACCEPTED);
    let location = client.url(reply.must_header("location"));
    client.finish_upload(&location, &digest, b"").await.expect(StatusCode::CREATED);
    let reply = client.get_blob(&repo, &digest).await;
    reply.expect(StatusCode::OK);
    assert!(reply.body == data, "blob differs after a restart mid-upload");
}

/// Shoal: an upload idle for longer than `upload_idle_timeout` is dropped and
/// answers 404 BLOB_UPLOAD_UNKNOWN.
#[tokio::test]
async fn upload_session_expires_after_idle_timeout() {
    skip_if_external!("needs a Shoal config");
    let origin = Origin::start_with_config("upload_idle_timeout = \"2s\"\n").await;
    let client = origin.client();
    let repo = unique_repo("uploads");
    let data = random_bytes(1000);

    let location = client.start_upload(&repo).await;
    let reply = client.patch_chunk(&location, 0, &data[..500]).await;
    reply.expect(StatusCode::ACCEPTED);
    let location = client.url(reply.must_header("location"));

    // Give a periodic sweeper time to run; then poll less often than the
    // timeout, so that polling cannot keep the session alive.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut status = client.upload_status(&location).await;
    while status.status == StatusCode::NO_CONTENT && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(3)).await;
        status = client.upload_status(&location).await;
    }
    status.expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    client
        .patch_chunk(&location, 500, &data[500..])
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
}

/// POST, two PATCHes, PUT; returns the PUT's status.
async fn chunked_push(client: &Client, repo: &str, data: &[u8]) -> StatusCode {
    let half = data.len() / 2;
    let mut location = client.start_upload(repo).await;
    for (start, end) in [(0, half), (half, data.len())] {
        let reply = client.patch_chunk(&location, start, &data[start..end]).await;
        reply.expect(StatusCode::ACCEPTED);
        location = client.url(reply.must_header("location"));
    }
    let reply = client.finish_upload(&location, &sha256(data), b"").await;
    if reply.status != StatusCode::CREATED {
        // The status alone did not say why when this failed once against a cluster.
        eprintln!("finishing the upload: {} {}", reply.status, String::from_utf8_lossy(&reply.body));
    }
    reply.status
}

/// A request body of unknown length (sent with chunked transfer encoding).
async fn streamed_body(data: &[u8]) -> reqwest::Body {
    let file = tempfile::tempfile().expect("create a temporary file");
    let mut file = tokio::fs::File::from_std(file);
    use tokio::io::{AsyncSeekExt, AsyncWriteExt};
    file.write_all(data).await.expect("write the temporary file");
    file.flush().await.expect("flush the temporary file");
    file.rewind().await.expect("rewind the temporary file");
    reqwest::Body::from(file)
}
