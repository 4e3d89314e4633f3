//! Shoal's access control (Basic auth, `[auth]`) and request limits
//! (`[limits]`), which produce the spec's UNAUTHORIZED, DENIED and
//! TOOMANYREQUESTS codes. These need a Shoal config file, so they are skipped
//! against an external registry.

use shoal_integration::api::{Client, ImageKind};
use shoal_integration::raw::{request_target, RawConnection};
use shoal_integration::{random_bytes, skip_if_external, unique_repo, Method, Origin, SendExt, StatusCode};
use std::time::{Duration, Instant};

const USERS: &str = r#"users = [
  { name = "ci", password = "s3cret", access = "push" },
  { name = "viewer", password = "v", access = "pull" },
]
"#;

async fn origin_with_anonymous(access: &str) -> Origin {
    Origin::start_with_config(&format!("[auth]\nanonymous = \"{access}\"\n{USERS}")).await
}

fn ci(origin: &Origin) -> Client {
    origin.client().with_basic_auth("ci", "s3cret")
}

fn viewer(origin: &Origin) -> Client {
    origin.client().with_basic_auth("viewer", "v")
}

/// UNAUTHORIZED: without credentials every API request is 401 with a
/// `WWW-Authenticate: Basic realm=...` challenge.
#[tokio::test]
async fn auth_without_credentials_returns_401_with_basic_challenge() {
    skip_if_external!("needs a Shoal config");
    let origin = origin_with_anonymous("none").await;
    let anonymous = origin.client();
    let repo = unique_repo("auth");
    ci(&origin).push_image(&repo, ImageKind::Oci, Some("v1"), 64).await;

    let replies = [
        anonymous.get("/v2/").reply().await,
        anonymous.get_manifest(&repo, "v1").await,
        anonymous.post(&format!("/v2/{repo}/blobs/uploads/")).header("content-length", "0").reply().await,
    ];
    for reply in &replies {
        reply.expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
        let challenge = reply.must_header("www-authenticate");
        assert!(challenge.starts_with("Basic realm="), "challenge {challenge:?}");
    }
}

/// A wrong password is 401 UNAUTHORIZED, like no credentials.
#[tokio::test]
async fn auth_wrong_password_returns_401() {
    skip_if_external!("needs a Shoal config");
    let origin = origin_with_anonymous("none").await;
    origin
        .client()
        .with_basic_auth("ci", "wrong")
        .get("/v2/")
        .reply()
        .await
        .expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
}

/// DENIED: a user with pull access gets 403 for uploads, manifest pushes and
/// deletes.
#[tokio::test]
async fn auth_pull_user_pushing_returns_403_denied() {
    skip_if_external!("needs a Shoal config");
    let origin = origin_with_anonymous("none").await;
    let repo = unique_repo("auth");
    let image = ci(&origin).push_image(&repo, ImageKind::Oci, Some("v1"), 64).await;
    let viewer = viewer(&origin);

    let replies = [
        viewer.post(&format!("/v2/{repo}/blobs/uploads/")).header("content-length", "0").reply().await,
        viewer.put_manifest(&repo, "v2", &image.manifest).await,
        viewer.delete(&format!("/v2/{repo}/manifests/{}", image.manifest.digest)).reply().await,
    ];
    for reply in &replies {
        reply.expect_error(StatusCode::FORBIDDEN, "DENIED");
    }
    viewer.get_manifest(&repo, "v2").await.expect(StatusCode::NOT_FOUND);
}

/// A user with pull access can pull: version check, manifest, blob, tags.
#[tokio::test]
async fn auth_pull_user_can_pull() {
    skip_if_external!("needs a Shoal config");
    let origin = origin_with_anonymous("none").await;
    let repo = unique_repo("auth");
    let image = ci(&origin).push_image(&repo, ImageKind::Oci, Some("v1"), 64).await;
    let viewer = viewer(&origin);

    viewer.get("/v2/").reply().await.expect(StatusCode::OK);
    let manifest = viewer.get_manifest(&repo, "v1").await;
    manifest.expect(StatusCode::OK);
    assert!(manifest.body == image.manifest.bytes);
    let blob = viewer.get_blob(&repo, &image.layers[0].digest).await;
    blob.expect(StatusCode::OK);
    assert!(blob.body == image.layers[0].data);
    viewer.tags(&repo, "").await;
}

/// A user with push access can push (blob, chunked upload, manifest) and
/// delete.
#[tokio::test]
async fn auth_push_user_can_push() {
    skip_if_external!("needs a Shoal config");
    let origin = origin_with_anonymous("none").await;
    let ci = ci(&origin);
    let repo = unique_repo("auth");
    let image = ci.push_image(&repo, ImageKind::Docker, Some("v1"), 1000).await;
    let location = ci.start_upload(&repo).await;
    ci.patch_chunk(&location, 0, &random_bytes(100)).await.expect(StatusCode::ACCEPTED);
    ci.get_manifest(&repo, "v1").await.expect(StatusCode::OK);
    ci.delete(&format!("/v2/{repo}/manifests/{}", image.manifest.digest))
        .reply()
        .await
        .expect(StatusCode::ACCEPTED);
}

/// `anonymous = "pull"`: reads need no credentials; a push without them is
/// 401 (a challenge, so that Docker retries with credentials); users still
/// push.
#[tokio::test]
async fn auth_anonymous_pull_allows_reads_only() {
    skip_if_external!("needs a Shoal config");
    let origin = origin_with_anonymous("pull").await;
    let anonymous = origin.client();
    let repo = unique_repo("auth");
    let image = ci(&origin).push_image(&repo, ImageKind::Oci, Some("v1"), 64).await;

    anonymous.get("/v2/").reply().await.expect(StatusCode::OK);
    anonymous.get_manifest(&repo, "v1").await.expect(StatusCode::OK);
    anonymous.get_blob(&repo, &image.layers[0].digest).await.expect(StatusCode::OK);
    let reply =
        anonymous.post(&format!("/v2/{repo}/blobs/uploads/")).header("content-length", "0").reply().await;
    reply.expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    reply.must_header("www-authenticate");
}

/// Basic auth with `anonymous = "pull"` and no TLS (the chart's default and its documented
/// example): an anonymous client pulls through an agent, whose download and tracker read the
/// origins' node API with no credentials at all. Before, that API wanted a node certificate
/// or a token, so every blob through an agent failed (401) while manifests worked.
#[tokio::test]
async fn basic_auth_with_anonymous_pull_serves_blobs_through_agents() {
    skip_if_external!("starts its own cluster");
    let cluster = shoal_integration::cluster::Cluster::start_with_origin(
        1,
        &format!("[auth]\nanonymous = \"pull\"\n{USERS}"),
        "",
    )
    .await;
    let repo = unique_repo("auth");
    let pusher = cluster.origin.client().with_basic_auth("ci", "s3cret");
    let image = pusher.push_image(&repo, ImageKind::Oci, Some("v1"), 300_000).await;
    let agent = Client::new(&cluster.agent_url(0));
    let m = agent.get_manifest(&repo, "v1").await;
    m.expect(StatusCode::OK);
    assert_eq!(m.body, image.manifest.bytes);
    for layer in &image.layers {
        let b = agent.get_blob(&repo, &layer.digest).await;
        b.expect(StatusCode::OK);
        assert_eq!(b.body, layer.data, "a layer through the agent");
    }
}

/// `/healthz` is never authenticated.
#[tokio::test]
async fn auth_healthz_needs_no_credentials() {
    skip_if_external!("needs a Shoal config");
    let origin = origin_with_anonymous("none").await;
    origin.client().get("/healthz").reply().await.expect(StatusCode::OK);
}

/// TOOMANYREQUESTS: with `max_concurrent_requests = 1`, a request that
/// arrives while a slow upload is in flight is 429; `/healthz` is never
/// limited; the slow upload itself completes, and the limit frees up after.
#[tokio::test]
async fn limits_concurrent_requests_over_limit_return_429() {
    skip_if_external!("needs a Shoal config");
    let origin = Origin::start_with_config("[limits]\nmax_concurrent_requests = 1\n").await;
    let client = origin.client();
    let repo = unique_repo("limits");
    let data = random_bytes(1024 * 1024);
    let location = client.start_upload(&repo).await;

    let head = [
        ("Content-Type", "application/octet-stream".to_string()),
        ("Content-Range", format!("0-{}", data.len() - 1)),
        ("Content-Length", data.len().to_string()),
    ];
    let mut slow = RawConnection::open(client.base(), Method::PATCH, &request_target(&location), &head).await;
    slow.send(&data[..64 * 1024]).await.expect("send the start of the slow chunk");
    tokio::time::sleep(Duration::from_millis(500)).await;

    client.get("/v2/").reply().await.expect_error(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS");
    client.get("/healthz").reply().await.expect(StatusCode::OK);

    slow.send(&data[64 * 1024..]).await.expect("send the rest of the slow chunk");
    slow.finish().await.expect(StatusCode::ACCEPTED);

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = client.get("/v2/").reply().await;
        if reply.status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "limit never freed: {}", reply.describe());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// TOOMANYREQUESTS for upload sessions: with `max_upload_sessions = 2`, a third open
/// session is refused with 429 and `Retry-After`, nothing is created for it, and cancelling
/// one session makes room again.
#[tokio::test]
async fn limits_open_upload_sessions_over_limit_return_429() {
    skip_if_external!("needs a Shoal config");
    let origin = Origin::start_with_config("[limits]\nmax_upload_sessions = 2\n").await;
    let client = origin.client();
    let repo = unique_repo("sessions");
    let first = client.start_upload(&repo).await;
    client.start_upload(&repo).await;
    let refused =
        client.post(&format!("/v2/{repo}/blobs/uploads/")).header("Content-Length", "0").reply().await;
    refused.expect_error(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS");
    assert!(refused.headers.contains_key("retry-after"), "{}", refused.describe());
    client.delete(&first).reply().await.expect(StatusCode::NO_CONTENT);
    client.start_upload(&repo).await;
}

/// A cross-repository mount from a repository the user may not pull is no mount: the answer
/// is a new upload session (202), as the spec asks of a mount that cannot be done, not 403
/// (containerd fails the whole push on a 403 there; it retries without the mount on 202).
#[tokio::test]
async fn a_mount_from_a_repository_the_user_cannot_read_starts_an_upload_instead() {
    skip_if_external!("needs a Shoal config file");
    let origin = Origin::start_with_config(
        r#"[auth]
anonymous = "none"
users = [
  { name = "ci", password = "s3cret", access = "none" },
  { name = "owner", password = "o", access = "none" },
]
[[auth.rules]]
repositories = "conformance/mount-src-*"
pull = ["owner"]
push = ["owner"]
[[auth.rules]]
repositories = "conformance/mount-dst-*"
pull = ["ci", "owner"]
push = ["ci", "owner"]
"#,
    )
    .await;
    let (source, target) = (unique_repo("mount-src"), unique_repo("mount-dst"));
    let owner = origin.client().with_basic_auth("owner", "o");
    let digest = owner.push_blob(&source, &random_bytes(4096)).await;
    let ci = ci(&origin);
    let reply =
        ci.post(&format!("/v2/{target}/blobs/uploads/?mount={digest}&from={source}")).send().await.unwrap();
    assert_eq!(reply.status(), StatusCode::ACCEPTED, "mount by a user who cannot read the source");
    assert!(reply.headers().get("location").is_some(), "a new upload session");
    ci.head_blob(&target, &digest).await.expect(StatusCode::NOT_FOUND);
    // Who may read the source mounts.
    let reply = owner
        .post(&format!("/v2/{target}/blobs/uploads/?mount={digest}&from={source}"))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::CREATED);
    ci.head_blob(&target, &digest).await.expect(StatusCode::OK);
}
