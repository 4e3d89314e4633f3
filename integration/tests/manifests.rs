//! Pushing, pulling and deleting manifests (end-3, end-7, end-9) of all four
//! media types, and the ways a manifest push is rejected.

use serde_json::json;
use shoal_integration::api::{Client, ImageKind};
use shoal_integration::content::absent_digest;
use shoal_integration::oci::{self, Blob, Manifest};
use shoal_integration::{random_bytes, unique_repo, Origin, Reply, SendExt, StatusCode};

/// GET and HEAD of `reference` serve `manifest` exactly: 200, the pushed
/// bytes, `Content-Type` as pushed, `Docker-Content-Digest`, and for HEAD
/// the `Content-Length` and no body.
async fn assert_served(client: &Client, repo: &str, reference: &str, manifest: &Manifest) {
    let get = client.get_manifest(repo, reference).await;
    get.expect(StatusCode::OK);
    assert!(
        get.body == manifest.bytes,
        "GET {reference}: bytes differ from the pushed ones:\n{}",
        get.text()
    );
    assert_eq!(media_type(&get), manifest.media_type, "GET Content-Type");
    assert_eq!(get.must_header("docker-content-digest"), manifest.digest);

    let head = client.head_manifest(repo, reference).await;
    head.expect(StatusCode::OK);
    assert_eq!(head.must_header("docker-content-digest"), manifest.digest);
    assert_eq!(head.must_header("content-length"), manifest.bytes.len().to_string());
    assert_eq!(media_type(&head), manifest.media_type, "HEAD Content-Type");
    assert!(head.body.is_empty(), "HEAD returned a body");
}

/// The media type of a reply's `Content-Type`, without parameters.
fn media_type(reply: &Reply) -> String {
    reply.must_header("content-type").split(';').next().unwrap_or_default().trim().to_string()
}

/// Pushing manifests: 201 with a pullable `Location` and a
/// `Docker-Content-Digest` equal to the manifest's digest.
fn assert_push_reply(client: &Client, reply: &Reply, manifest: &Manifest) -> String {
    reply.expect(StatusCode::CREATED);
    assert_eq!(reply.must_header("docker-content-digest"), manifest.digest);
    client.url(reply.must_header("location"))
}

/// An image (config + one layer) pushed as blobs only; the manifest is returned
/// unpushed.
async fn image_blobs(client: &Client, repo: &str, kind: ImageKind) -> Manifest {
    let (config_type, layer_type) = match kind {
        ImageKind::Oci => (oci::OCI_CONFIG, oci::OCI_LAYER),
        ImageKind::Docker => (oci::DOCKER_CONFIG, oci::DOCKER_LAYER),
    };
    let config = Blob::config(config_type);
    let layer = Blob::random_layer(layer_type, 512);
    client.push_blob(repo, &config.data).await;
    client.push_blob(repo, &layer.data).await;
    let value = oci::image_manifest_value(kind.manifest_type(), &config, &[layer]);
    Manifest::from_value(kind.manifest_type(), &value)
}

/// One of the four manifest types the tests push.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Image(ImageKind),
    Index(ImageKind),
}

const ALL_KINDS: [Kind; 4] = [
    Kind::Image(ImageKind::Oci),
    Kind::Image(ImageKind::Docker),
    Kind::Index(ImageKind::Oci),
    Kind::Index(ImageKind::Docker),
];

/// A new manifest of `kind` whose blobs (and, for an index, child manifests)
/// are in `repo`; the manifest itself is not pushed.
async fn fresh_manifest(client: &Client, repo: &str, kind: Kind) -> Manifest {
    match kind {
        Kind::Image(image) => image_blobs(client, repo, image).await,
        Kind::Index(image) => {
            let amd64 = client.push_image(repo, image, None, 256).await.manifest;
            let arm64 = client.push_image(repo, image, None, 256).await.manifest;
            let value = oci::index_value(image.index_type(), &[&amd64, &arm64]);
            Manifest::from_value(image.index_type(), &value)
        }
    }
}

/// PUT by tag and by digest, GET and HEAD by both, DELETE by digest.
async fn round_trip(kind: Kind) {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("manifests");
    let tagged = fresh_manifest(&client, &repo, kind).await;
    let untagged = fresh_manifest(&client, &repo, kind).await;

    let reply = client.put_manifest(&repo, "v1", &tagged).await;
    let location = assert_push_reply(&client, &reply, &tagged);
    assert_served(&client, &repo, "v1", &tagged).await;
    assert_served(&client, &repo, &tagged.digest, &tagged).await;
    let pulled = client.get(&location).header("accept", oci::ACCEPT_ALL).reply().await;
    pulled.expect(StatusCode::OK);
    assert!(pulled.body == tagged.bytes, "manifest at Location differs");

    let reply = client.put_manifest(&repo, &untagged.digest, &untagged).await;
    assert_push_reply(&client, &reply, &untagged);
    assert_served(&client, &repo, &untagged.digest, &untagged).await;
    let tags = client.tags(&repo, "").await.json();
    assert_eq!(tags["tags"], json!(["v1"]), "a push by digest created a tag");

    client
        .delete(&format!("/v2/{repo}/manifests/{}", untagged.digest))
        .reply()
        .await
        .expect(StatusCode::ACCEPTED);
    client
        .get_manifest(&repo, &untagged.digest)
        .await
        .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    client.head_manifest(&repo, &untagged.digest).await.expect(StatusCode::NOT_FOUND);
    assert_served(&client, &repo, "v1", &tagged).await;
}

/// OCI image manifest: PUT/GET/HEAD by tag and digest, DELETE by digest.
#[tokio::test]
async fn manifest_oci_image_round_trip() {
    round_trip(Kind::Image(ImageKind::Oci)).await;
}

/// Docker schema 2 manifest: PUT/GET/HEAD by tag and digest, DELETE by digest.
#[tokio::test]
async fn manifest_docker_schema2_round_trip() {
    round_trip(Kind::Image(ImageKind::Docker)).await;
}

/// OCI image index: PUT/GET/HEAD by tag and digest, DELETE by digest.
#[tokio::test]
async fn manifest_oci_index_round_trip() {
    round_trip(Kind::Index(ImageKind::Oci)).await;
}

/// Docker manifest list: PUT/GET/HEAD by tag and digest, DELETE by digest.
#[tokio::test]
async fn manifest_docker_list_round_trip() {
    round_trip(Kind::Index(ImageKind::Docker)).await;
}

/// Docker-Content-Digest "MUST be equal to the client provided digest": a PUT
/// by a digest that does not match the body is 400 DIGEST_INVALID and stores
/// nothing.
#[tokio::test]
async fn manifest_put_by_mismatched_digest_returns_digest_invalid() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("manifests");
    let manifest = image_blobs(&client, &repo, ImageKind::Oci).await;
    let wrong = absent_digest();

    client
        .put_manifest(&repo, &wrong, &manifest)
        .await
        .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    client.get_manifest(&repo, &wrong).await.expect(StatusCode::NOT_FOUND);
    client.get_manifest(&repo, &manifest.digest).await.expect(StatusCode::NOT_FOUND);
}

/// "If the manifest is not found in the repository, the response code MUST be
/// 404": unknown tag and unknown digest, GET and HEAD.
#[tokio::test]
async fn manifest_unknown_returns_404_manifest_unknown() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("manifests");
    client.push_image(&repo, ImageKind::Oci, Some("exists"), 64).await;

    for reference in ["nope".to_string(), absent_digest()] {
        client.get_manifest(&repo, &reference).await.expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
        client.head_manifest(&repo, &reference).await.expect(StatusCode::NOT_FOUND);
    }
}

/// "An attempt to pull a nonexistent repository MUST return response code
/// 404" (with NAME_UNKNOWN or MANIFEST_UNKNOWN).
#[tokio::test]
async fn manifest_in_nonexistent_repository_returns_404() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("never-pushed");
    let reply = client.get_manifest(&repo, "latest").await;
    reply.expect(StatusCode::NOT_FOUND);
    let codes = reply.error_codes();
    assert!(codes.iter().any(|c| c == "NAME_UNKNOWN" || c == "MANIFEST_UNKNOWN"), "{}", reply.describe());
}

/// Manifests are scoped to their repository: a digest pushed to A is 404
/// through B.
#[tokio::test]
async fn manifest_is_scoped_to_its_repository() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo_a = unique_repo("scope-a");
    let repo_b = unique_repo("scope-b");
    let image = client.push_image(&repo_a, ImageKind::Oci, Some("v1"), 64).await;
    client.push_image(&repo_b, ImageKind::Oci, Some("v1"), 64).await;
    client
        .get_manifest(&repo_b, &image.manifest.digest)
        .await
        .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
}

/// Pushing a new manifest under an existing tag moves the tag.
#[tokio::test]
async fn manifest_push_moves_an_existing_tag() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("manifests");
    let first = client.push_image(&repo, ImageKind::Oci, Some("latest"), 64).await;
    let second = client.push_image(&repo, ImageKind::Oci, Some("latest"), 64).await;
    assert_served(&client, &repo, "latest", &second.manifest).await;
    assert_served(&client, &repo, &first.manifest.digest, &first.manifest).await;
}

/// Tags: a tag of 128 characters (the maximum) is accepted; 129 is rejected
/// (400, or 404 from registries whose routes cannot match it) and not stored.
#[tokio::test]
async fn manifest_tag_length_limit_is_128() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("manifests");
    let manifest = image_blobs(&client, &repo, ImageKind::Oci).await;
    let longest = format!("t{}", "a".repeat(127));
    let too_long = format!("t{}", "a".repeat(128));

    client.push_manifest(&repo, &longest, &manifest).await;
    assert_served(&client, &repo, &longest, &manifest).await;
    let reply = client.put_manifest(&repo, &too_long, &manifest).await;
    reply.expect_one_of(&[StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND]);
    let tags = client.tags(&repo, "").await.json();
    assert_eq!(tags["tags"], json!([longest]));
}

/// Deleting manifests: DELETE by digest is 202; afterwards the digest and
/// every tag pointing at it are 404.
#[tokio::test]
async fn manifest_delete_by_digest_removes_it_and_its_tags() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("manifests");
    let image = client.push_image(&repo, ImageKind::Oci, Some("v1"), 64).await;
    client.push_manifest(&repo, "v2", &image.manifest).await;
    let digest = &image.manifest.digest;

    client.delete(&format!("/v2/{repo}/manifests/{digest}")).reply().await.expect(StatusCode::ACCEPTED);
    for reference in [digest.as_str(), "v1", "v2"] {
        client.get_manifest(&repo, reference).await.expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    }
}

/// Deleting tags, for each manifest type: DELETE by tag is 202; afterwards
/// the tag is 404 and no longer listed, and other tags of the same manifest
/// still resolve.
#[tokio::test]
async fn manifest_delete_by_tag_removes_the_tag() {
    let origin = Origin::start().await;
    let client = origin.client();
    for kind in ALL_KINDS {
        let repo = unique_repo("manifests");
        let manifest = fresh_manifest(&client, &repo, kind).await;
        client.push_manifest(&repo, "v1", &manifest).await;
        client.push_manifest(&repo, "v2", &manifest).await;

        client.delete(&format!("/v2/{repo}/manifests/v1")).reply().await.expect(StatusCode::ACCEPTED);
        client.get_manifest(&repo, "v1").await.expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
        assert_served(&client, &repo, "v2", &manifest).await;
        let tags = client.tags(&repo, "").await.json();
        assert_eq!(tags["tags"], json!(["v2"]), "{kind:?}");
    }
}

/// end-9 failure: deleting an unknown manifest is 404, in an existing and in
/// a nonexistent repository.
#[tokio::test]
async fn manifest_delete_unknown_returns_404() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("manifests");
    client.push_image(&repo, ImageKind::Oci, Some("v1"), 64).await;
    let digest = absent_digest();

    client
        .delete(&format!("/v2/{repo}/manifests/{digest}"))
        .reply()
        .await
        .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    let missing = unique_repo("never-pushed");
    client.delete(&format!("/v2/{missing}/manifests/{digest}")).reply().await.expect(StatusCode::NOT_FOUND);
}

/// Docker schema 1 (signed) manifests are legacy: rejected with 400
/// MANIFEST_INVALID.
#[tokio::test]
async fn manifest_schema1_is_rejected() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("manifests");
    let layer = client.push_blob(&repo, &random_bytes(100)).await;
    let value = json!({
        "schemaVersion": 1,
        "name": repo,
        "tag": "v1",
        "architecture": "amd64",
        "fsLayers": [{"blobSum": layer}],
        "history": [{"v1Compatibility": "{\"id\":\"0123456789abcdef\"}"}],
        "signatures": [{
            "header": {"jwk": {"crv": "P-256", "kty": "EC", "x": "AA", "y": "AA"}, "alg": "ES256"},
            "signature": "AAAA",
            "protected": "AAAA"
        }]
    });
    let manifest = Manifest::from_value(oci::DOCKER_SCHEMA1_SIGNED, &value);
    client
        .put_manifest(&repo, "v1", &manifest)
        .await
        .expect_error(StatusCode::BAD_REQUEST, "MANIFEST_INVALID");
    client.get_manifest(&repo, "v1").await.expect(StatusCode::NOT_FOUND);
}

/// Push: a manifest whose layer is not in the repository is rejected with
/// MANIFEST_BLOB_UNKNOWN (the spec names the code, not the status: 400 or 404).
#[tokio::test]
async fn manifest_with_missing_layer_returns_manifest_blob_unknown() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("manifests");
    let config = Blob::config(oci::OCI_CONFIG);
    client.push_blob(&repo, &config.data).await;
    let layer = Blob::random_layer(oci::OCI_LAYER, 100);
    let value = oci::image_manifest_value(oci::OCI_MANIFEST, &config, &[layer]);
    let manifest = Manifest::from_value(oci::OCI_MANIFEST, &value);

    expect_manifest_blob_unknown(&client.put_manifest(&repo, "v1", &manifest).await);
    client.get_manifest(&repo, "v1").await.expect(StatusCode::NOT_FOUND);
}

/// Push: a manifest whose config blob is not in the repository is rejected
/// with MANIFEST_BLOB_UNKNOWN.
#[tokio::test]
async fn manifest_with_missing_config_returns_manifest_blob_unknown() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("manifests");
    let config = Blob::config(oci::OCI_CONFIG);
    let layer = Blob::random_layer(oci::OCI_LAYER, 100);
    client.push_blob(&repo, &layer.data).await;
    let value = oci::image_manifest_value(oci::OCI_MANIFEST, &config, &[layer]);
    let manifest = Manifest::from_value(oci::OCI_MANIFEST, &value);

    expect_manifest_blob_unknown(&client.put_manifest(&repo, "v1", &manifest).await);
}

/// Push: an index whose child manifest is not in the repository is rejected
/// with MANIFEST_BLOB_UNKNOWN.
#[tokio::test]
async fn index_with_missing_child_returns_manifest_blob_unknown() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("manifests");
    let present = client.push_image(&repo, ImageKind::Oci, None, 64).await.manifest;
    let missing = image_blobs(&client, &repo, ImageKind::Oci).await;
    let value = oci::index_value(oci::OCI_INDEX, &[&present, &missing]);
    let index = Manifest::from_value(oci::OCI_INDEX, &value);

    expect_manifest_blob_unknown(&client.put_manifest(&repo, "multi", &index).await);
    client.get_manifest(&repo, "multi").await.expect(StatusCode::NOT_FOUND);
}

fn expect_manifest_blob_unknown(reply: &Reply) {
    reply.expect_error_one_of(&[StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND], "MANIFEST_BLOB_UNKNOWN");
}

/// A manifest body that is not JSON is 400 MANIFEST_INVALID.
#[tokio::test]
async fn manifest_malformed_json_returns_manifest_invalid() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("manifests");
    let manifest = Manifest::from_bytes(oci::OCI_MANIFEST, b"{\"schemaVersion\": 2, ".to_vec());
    client
        .put_manifest(&repo, "v1", &manifest)
        .await
        .expect_error(StatusCode::BAD_REQUEST, "MANIFEST_INVALID");
}

/// JSON that is not a manifest of the declared type (no config, no layers) is
/// 400 MANIFEST_INVALID.
#[tokio::test]
async fn manifest_wrong_shape_returns_manifest_invalid() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("manifests");
    let value = json!({"schemaVersion": 2, "mediaType": oci::OCI_MANIFEST, "layers": "none"});
    let manifest = Manifest::from_value(oci::OCI_MANIFEST, &value);
    client
        .put_manifest(&repo, "v1", &manifest)
        .await
        .expect_error(StatusCode::BAD_REQUEST, "MANIFEST_INVALID");
}

/// A registry "SHOULD respond to a request to push a manifest over this limit
/// with a response code 413": Shoal's limit is 4 MiB; the answer carries a
/// spec error body.
#[tokio::test]
async fn manifest_over_4mib_returns_413() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("manifests");
    let manifest = padded_manifest(&client, &repo, 4 * 1024 * 1024 + 1024).await;
    let reply = client
        .put(&format!("/v2/{repo}/manifests/big"))
        .header("content-type", manifest.media_type.as_str())
        .body(manifest.bytes.clone())
        .try_reply()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no 413 reached the client, the connection broke instead (a registry that \
                 answers before reading the body must still let the client read the answer): {e}"
            )
        });
    reply.expect(StatusCode::PAYLOAD_TOO_LARGE);
    assert!(!reply.error_codes().is_empty());
    // A fresh client: the rejected request's connection may be unusable.
    origin.client().get_manifest(&repo, "big").await.expect(StatusCode::NOT_FOUND);
}

/// "Client and registry implementations SHOULD expect to be able to support
/// manifest pushes of at least 4 megabytes": just under 4 MiB is accepted.
#[tokio::test]
async fn manifest_just_under_4mib_is_accepted() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("manifests");
    let manifest = padded_manifest(&client, &repo, 4 * 1024 * 1024 - 1024).await;
    client.push_manifest(&repo, "big", &manifest).await;
    assert_served(&client, &repo, "big", &manifest).await;
}

/// A valid OCI manifest padded with an annotation to exactly `size` bytes.
async fn padded_manifest(client: &Client, repo: &str, size: usize) -> Manifest {
    let config = client.push_empty_config(repo).await;
    let layer = Blob::random_layer(oci::OCI_LAYER, 64);
    client.push_blob(repo, &layer.data).await;
    let mut value = oci::image_manifest_value(oci::OCI_MANIFEST, &config, &[layer]);
    value["annotations"] = json!({"org.example.padding": ""});
    let base = oci::to_pretty_bytes(&value).len();
    value["annotations"]["org.example.padding"] = json!("p".repeat(size - base));
    let manifest = Manifest::from_value(oci::OCI_MANIFEST, &value);
    assert_eq!(manifest.bytes.len(), size);
    manifest
}

/// Push: a manifest whose non-distributable ("foreign") layers were never uploaded is
/// accepted (OCI `nondistributable` and Docker `foreign.diff` types, with `urls`), and pulled
/// back byte for byte by tag and digest; its ordinary layers are still required.
#[tokio::test]
async fn manifest_with_absent_foreign_layers_is_accepted() {
    let origin = Origin::start().await;
    let client = origin.client();
    for (kind, foreign_type) in [
        (ImageKind::Oci, "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"),
        (ImageKind::Docker, "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"),
    ] {
        let repo = unique_repo("manifests");
        let config = Blob::config(kind.config_type());
        let layer = Blob::random_layer(kind.layer_type(), 100);
        client.push_blob(&repo, &config.data).await;
        client.push_blob(&repo, &layer.data).await;
        let foreign = Blob::random_layer(foreign_type, 1000);
        let mut foreign_descriptor = foreign.descriptor();
        foreign_descriptor["urls"] = json!(["https://example.com/foreign-layer.tar.gz"]);
        let mut value =
            oci::image_manifest_value(kind.manifest_type(), &config, std::slice::from_ref(&layer));
        value["layers"].as_array_mut().expect("layers").insert(0, foreign_descriptor.clone());
        let manifest = Manifest::from_value(kind.manifest_type(), &value);
        let reply = client.put_manifest(&repo, "v1", &manifest).await;
        assert_push_reply(&client, &reply, &manifest);
        assert_served(&client, &repo, "v1", &manifest).await;
        assert_served(&client, &repo, &manifest.digest, &manifest).await;
        client.get_blob(&repo, &foreign.digest).await.expect(StatusCode::NOT_FOUND);

        // The same manifest with its ordinary layer missing is still refused.
        let other = unique_repo("manifests");
        client.push_blob(&other, &config.data).await;
        expect_manifest_blob_unknown(&client.put_manifest(&other, "v1", &manifest).await);
    }
}
