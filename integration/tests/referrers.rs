//! Manifests with a `subject` and the referrers API (end-12a, end-12b),
//! added in distribution-spec v1.1.

use serde_json::{json, Value};
use shoal_integration::api::{Client, ImageKind};
use shoal_integration::content::absent_digest;
use shoal_integration::oci::{self, Blob, Manifest};
use shoal_integration::{unique_repo, Origin, Reply, SendExt, StatusCode};

const SBOM: &str = "application/vnd.example.sbom.v1";
const SIGNATURE_CONFIG: &str = "application/vnd.example.signature.config.v1+json";

/// Pushes an artifact manifest with `subject`; returns it and the PUT reply.
async fn push_artifact(
    client: &Client,
    repo: &str,
    subject: &Manifest,
    artifact_type: Option<&str>,
    config_type: &str,
    annotations: &[(&str, &str)],
) -> (Manifest, Reply) {
    let config = Blob::new(config_type, oci::EMPTY_JSON.to_vec());
    let layer = Blob::random_layer("application/vnd.example.payload", 128);
    client.push_blob(repo, &config.data).await;
    client.push_blob(repo, &layer.data).await;
    let value = oci::artifact_value(subject, artifact_type, &config, &layer, annotations);
    let manifest = Manifest::from_value(oci::OCI_MANIFEST, &value);
    let reply = client.put_manifest(repo, &manifest.digest, &manifest).await;
    reply.expect(StatusCode::CREATED);
    (manifest, reply)
}

/// `GET /v2/<repo>/referrers/<digest><query>`, checked to be a 200 image
/// index with the index `Content-Type`; returns the reply and its manifests.
async fn referrers(client: &Client, repo: &str, digest: &str, query: &str) -> (Reply, Vec<Value>) {
    let reply = client.get(&format!("/v2/{repo}/referrers/{digest}{query}")).reply().await;
    reply.expect(StatusCode::OK);
    let content_type = reply.must_header("content-type");
    assert_eq!(
        content_type.split(';').next().unwrap_or_default().trim(),
        oci::OCI_INDEX,
        "{}",
        reply.describe()
    );
    let body = reply.json();
    assert_eq!(body["schemaVersion"], json!(2), "{}", reply.describe());
    if let Some(media_type) = body.get("mediaType") {
        assert_eq!(media_type, &json!(oci::OCI_INDEX));
    }
    let manifests = body["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("no manifests list: {}", reply.describe()))
        .clone();
    (reply, manifests)
}

fn find<'a>(descriptors: &'a [Value], manifest: &Manifest) -> &'a Value {
    descriptors
        .iter()
        .find(|d| d["digest"] == json!(manifest.digest))
        .unwrap_or_else(|| panic!("{} is not listed in {descriptors:?}", manifest.digest))
}

/// "a registry implementation that supports the referrers API MUST respond
/// with the response header OCI-Subject: <subject digest>".
#[tokio::test]
async fn manifest_with_subject_returns_oci_subject_header() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("referrers");
    let subject = client.push_image(&repo, ImageKind::Oci, Some("v1"), 64).await.manifest;

    let (_, reply) = push_artifact(&client, &repo, &subject, Some(SBOM), oci::OCI_EMPTY, &[]).await;
    assert_eq!(reply.must_header("oci-subject"), subject.digest);
}

/// "A registry MUST initially accept an otherwise valid manifest with a
/// subject field that references a manifest that does not exist"; it is
/// listed as a referrer of that digest.
#[tokio::test]
async fn manifest_with_dangling_subject_is_accepted_and_listed() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("referrers");
    let missing = Manifest::from_bytes(oci::OCI_MANIFEST, b"{\"never\":\"pushed\"}".to_vec());

    let (artifact, reply) = push_artifact(&client, &repo, &missing, Some(SBOM), oci::OCI_EMPTY, &[]).await;
    assert_eq!(reply.must_header("oci-subject"), missing.digest);
    let (_, listed) = referrers(&client, &repo, &missing.digest, "").await;
    assert_eq!(find(&listed, &artifact)["artifactType"], json!(SBOM));
}

/// Listing referrers: an image index of descriptors of the manifests whose
/// subject is the digest, each with mediaType, digest, size, `artifactType`
/// and the manifest's annotations.
#[tokio::test]
async fn referrers_lists_manifests_with_subject() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("referrers");
    let subject = client.push_image(&repo, ImageKind::Oci, Some("v1"), 64).await.manifest;
    let annotations =
        [("org.opencontainers.image.created", "2024-01-01T00:00:00Z"), ("org.example.sbom.format", "json")];
    let (sbom, _) = push_artifact(&client, &repo, &subject, Some(SBOM), oci::OCI_EMPTY, &annotations).await;
    let (other, _) = push_artifact(&client, &repo, &subject, Some(SBOM), oci::OCI_EMPTY, &[]).await;

    let (_, listed) = referrers(&client, &repo, &subject.digest, "").await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    let descriptor = find(&listed, &sbom);
    assert_eq!(descriptor["mediaType"], json!(oci::OCI_MANIFEST));
    assert_eq!(descriptor["size"], json!(sbom.bytes.len()));
    assert_eq!(descriptor["artifactType"], json!(SBOM));
    assert_eq!(descriptor["annotations"], oci::annotations_value(&annotations));
    find(&listed, &other);
}

/// "If the artifactType is empty or missing in the image manifest, the value
/// of artifactType MUST be set to the config descriptor mediaType value."
#[tokio::test]
async fn referrers_artifact_type_defaults_to_config_media_type() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("referrers");
    let subject = client.push_image(&repo, ImageKind::Oci, Some("v1"), 64).await.manifest;
    let (signature, _) = push_artifact(&client, &repo, &subject, None, SIGNATURE_CONFIG, &[]).await;

    let (_, listed) = referrers(&client, &repo, &subject.digest, "").await;
    assert_eq!(find(&listed, &signature)["artifactType"], json!(SIGNATURE_CONFIG));
}

/// An index can be a referrer too; "If the artifactType is empty or missing
/// in an index, the artifactType MUST be omitted"; its annotations are copied.
#[tokio::test]
async fn referrers_lists_an_index_without_artifact_type() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("referrers");
    let subject = client.push_image(&repo, ImageKind::Oci, Some("v1"), 64).await.manifest;
    let child = client.push_image(&repo, ImageKind::Oci, None, 64).await.manifest;
    let mut value = oci::index_value(oci::OCI_INDEX, &[&child]);
    value["subject"] = subject.descriptor();
    value["annotations"] = json!({"org.example.kind": "bundle"});
    let index = Manifest::from_value(oci::OCI_INDEX, &value);
    let reply = client.push_manifest(&repo, &index.digest, &index).await;
    assert_eq!(reply.must_header("oci-subject"), subject.digest);

    let (_, listed) = referrers(&client, &repo, &subject.digest, "").await;
    let descriptor = find(&listed, &index);
    assert_eq!(descriptor["mediaType"], json!(oci::OCI_INDEX));
    assert!(descriptor.get("artifactType").is_none(), "artifactType present: {descriptor}");
    assert_eq!(descriptor["annotations"], json!({"org.example.kind": "bundle"}));
}

/// end-12b: `?artifactType=` keeps only matching referrers, and the response
/// says so with `OCI-Filters-Applied: artifactType`.
#[tokio::test]
async fn referrers_filter_by_artifact_type() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("referrers");
    let subject = client.push_image(&repo, ImageKind::Oci, Some("v1"), 64).await.manifest;
    let (sbom, _) = push_artifact(&client, &repo, &subject, Some(SBOM), oci::OCI_EMPTY, &[]).await;
    push_artifact(&client, &repo, &subject, None, SIGNATURE_CONFIG, &[]).await;

    let (reply, listed) =
        referrers(&client, &repo, &subject.digest, "?artifactType=application/vnd.example.sbom.v1").await;
    assert_eq!(reply.must_header("oci-filters-applied"), "artifactType");
    assert_eq!(listed.len(), 1, "{listed:?}");
    find(&listed, &sbom);
}

/// "If a query results in no matching referrers, an empty manifest list MUST
/// be returned", and a registry with the referrers API "MUST NOT return a
/// 404": 200 and an empty index for a subject without referrers, an unknown
/// digest, and a repository that was never pushed.
#[tokio::test]
async fn referrers_none_returns_empty_index() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("referrers");
    let subject = client.push_image(&repo, ImageKind::Oci, Some("v1"), 64).await.manifest;

    let (_, listed) = referrers(&client, &repo, &subject.digest, "").await;
    assert!(listed.is_empty(), "{listed:?}");
    let (_, listed) = referrers(&client, &repo, &absent_digest(), "").await;
    assert!(listed.is_empty(), "{listed:?}");
    let never_pushed = unique_repo("never-pushed");
    let (_, listed) = referrers(&client, &never_pushed, &subject.digest, "").await;
    assert!(listed.is_empty(), "{listed:?}");
}

/// "If the request is invalid, such as a <digest> with an invalid syntax, a
/// 400 Bad Request MUST be returned."
#[tokio::test]
async fn referrers_invalid_digest_returns_400() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("referrers");
    client.push_image(&repo, ImageKind::Oci, Some("v1"), 64).await;
    let reply = client.get(&format!("/v2/{repo}/referrers/sha256:xyz")).reply().await;
    reply.expect(StatusCode::BAD_REQUEST);
}

/// "Each descriptor is of an image manifest or index in the same <name>
/// namespace": a referrer pushed to another repository is not listed.
#[tokio::test]
async fn referrers_are_scoped_to_the_repository() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo_a = unique_repo("referrers-a");
    let repo_b = unique_repo("referrers-b");
    let subject = client.push_image(&repo_a, ImageKind::Oci, Some("v1"), 64).await.manifest;
    push_artifact(&client, &repo_b, &subject, Some(SBOM), oci::OCI_EMPTY, &[]).await;

    let (_, listed) = referrers(&client, &repo_a, &subject.digest, "").await;
    assert!(listed.is_empty(), "{listed:?}");
}

/// A deleted referrer is no longer listed.
#[tokio::test]
async fn referrers_omit_deleted_manifests() {
    let origin = Origin::start().await;
    let client = origin.client();
    let repo = unique_repo("referrers");
    let subject = client.push_image(&repo, ImageKind::Oci, Some("v1"), 64).await.manifest;
    let (sbom, _) = push_artifact(&client, &repo, &subject, Some(SBOM), oci::OCI_EMPTY, &[]).await;
    client
        .delete(&format!("/v2/{repo}/manifests/{}", sbom.digest))
        .reply()
        .await
        .expect(StatusCode::ACCEPTED);

    let (_, listed) = referrers(&client, &repo, &subject.digest, "").await;
    assert!(listed.is_empty(), "{listed:?}");
}
