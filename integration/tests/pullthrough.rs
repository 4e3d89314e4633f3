//! Pull-through on a real origin cluster (three `shoal origin` processes, R = 2) in front of a
//! real upstream (Debian's `docker-registry`, plain HTTP on loopback): an image that was only
//! ever pushed to the upstream is served by every origin, each of its blobs leaves the
//! upstream exactly once however many clients ask how many origins at once, and is then kept
//! like pushed content (on its two owners' disks). Mirrored repositories refuse writes. Tags
//! follow the upstream within `tag_ttl`; while the upstream is down, a tag confirmed within
//! `serve_stale` is still served, an unknown one fails at once with a clear error.
//!
//! Agents, containerd mirrors, Docker, TLS and token auth upstream are in
//! `integration/clients/test_pullthrough.sh`.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use shoal_integration::api::ImageKind;
use shoal_integration::oci::{self, Blob, Manifest};
use shoal_integration::origins::{ClusterSpec, OriginCluster};
use shoal_integration::upstream::UpstreamRegistry;
use shoal_integration::{sha256, skip_if_external, unique_repo, Client, StatusCode};

const SKIP: &str = "pull-through tests start their own origins and upstream";
const MIB: usize = 1024 * 1024;
const REGISTRY: &str = "upstream.test";

fn upstream_toml(url: &str, tag_ttl: &str, serve_stale: &str) -> String {
    format!("[[upstream]]\nregistry = \"{REGISTRY}\"\nurl = \"{url}\"\ntag_ttl = \"{tag_ttl}\"\nserve_stale = \"{serve_stale}\"\n")
}

/// An image of two random layers pushed to the upstream only.
async fn seed(up: &Client, repo: &str, tag: &str, layer_mib: usize) -> (Manifest, Vec<Blob>) {
    let kind = ImageKind::Oci;
    let config = Blob::config(kind.config_type());
    let layers = vec![
        Blob::random_layer(kind.layer_type(), layer_mib * MIB),
        Blob::random_layer(kind.layer_type(), layer_mib * MIB + 17),
    ];
    up.push_blob(repo, &config.data).await;
    for l in &layers {
        up.push_blob(repo, &l.data).await;
    }
    let value = oci::image_manifest_value(kind.manifest_type(), &config, &layers);
    let manifest = Manifest::from_value(kind.manifest_type(), &value);
    up.push_manifest(repo, tag, &manifest).await;
    let mut blobs = vec![config];
    blobs.extend(layers);
    (manifest, blobs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_image_leaves_the_upstream_once_per_cluster() {
    skip_if_external!(SKIP);
    let Some(upstream) = UpstreamRegistry::start().await else { return };
    let up = Client::new(&upstream.url());
    let path = unique_repo("pull");
    let (manifest, blobs) = seed(&up, &path, "v1", 3).await;
    let cluster = OriginCluster::start_cluster(ClusterSpec::new(3).config(&upstream_toml(
        &upstream.url(),
        "30s",
        "1h",
    )))
    .await;
    let repo = format!("{REGISTRY}/{path}");

    // Every origin answers the tag, with the upstream's bytes.
    for i in 0..3 {
        let m = cluster.client(i).get_manifest(&repo, "v1").await;
        m.expect(StatusCode::OK);
        assert_eq!(m.must_header("docker-content-digest"), manifest.digest);
        assert_eq!(sha256(&m.body), manifest.digest);
    }
    // 30 readers at once, spread over the three origins, every blob.
    let reads = (0..30).map(|n| {
        let (client, blob, repo) = (cluster.client(n % 3), &blobs[n % blobs.len()], repo.clone());
        async move {
            let r = client.get_blob(&repo, &blob.digest).await;
            (n, r.status, sha256(&r.body) == blob.digest)
        }
    });
    for (n, status, matches) in join_all(reads).await {
        assert_eq!(status, StatusCode::OK, "reader {n}");
        assert!(matches, "reader {n} got other bytes");
    }
    for b in &blobs {
        assert_eq!(
            upstream.blob_gets(&b.digest),
            1,
            "{} left the upstream more than once:\n{}",
            b.digest,
            upstream.log()
        );
        // Kept like pushed content: on its two owners' disks.
        let holders = cluster.holders(&b.digest);
        assert_eq!(holders.len(), 2, "{} is on {holders:?}", b.digest);
    }
    // Read again after the fact: from the cluster, not the upstream.
    for i in 0..3 {
        let r = cluster.client(i).get_blob(&repo, &blobs[1].digest).await;
        r.expect(StatusCode::OK);
    }
    assert_eq!(upstream.blob_gets(&blobs[1].digest), 1);

    // A mirrored repository is read-only; pushed repositories are untouched by it.
    let client = cluster.client(0);
    let refused = client.post(&format!("/v2/{repo}/blobs/uploads/")).send().await.expect("POST");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let pushed = unique_repo("pushed");
    client.push_blob(&pushed, b"pushed content").await;
    // Unknown content upstream is unknown here, without a stuck request.
    let absent = shoal_integration::content::absent_digest();
    client.get_blob(&repo, &absent).await.expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    client.get_manifest(&repo, "no-such-tag").await.expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    // A registry nobody configured is just a repository name.
    client.get_manifest(&format!("other.example/{path}"), "v1").await.expect(StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tags_follow_the_upstream_and_survive_its_outage_for_serve_stale() {
    skip_if_external!(SKIP);
    let Some(mut upstream) = UpstreamRegistry::start().await else { return };
    let up = Client::new(&upstream.url());
    let path = unique_repo("tags");
    let (first, _) = seed(&up, &path, "latest", 1).await;
    let serve_stale = Duration::from_secs(6);
    let cluster =
        OriginCluster::start_cluster(ClusterSpec::new(3).config(&upstream_toml(&upstream.url(), "1s", "6s")))
            .await;
    let repo = format!("{REGISTRY}/{path}");
    let digest_of = |r: &shoal_integration::Reply| r.must_header("docker-content-digest").to_string();

    let r = cluster.client(0).get_manifest(&repo, "latest").await;
    r.expect(StatusCode::OK);
    assert_eq!(digest_of(&r), first.digest);

    // The tag moves upstream: every origin serves the new target within tag_ttl (1 s).
    let (second, _) = seed(&up, &path, "latest", 1).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for i in 0..3 {
        let r = cluster.client(i).get_manifest(&repo, "latest").await;
        r.expect(StatusCode::OK);
        assert_eq!(digest_of(&r), second.digest, "origin {i}");
    }
    let confirmed = Instant::now();

    // The upstream goes away: the confirmed tag is served until serve_stale passes; a tag
    // nobody resolved fails at once, with the reason; digests are served for good.
    upstream.stop();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = cluster.client(1).get_manifest(&repo, "latest").await;
    r.expect(StatusCode::OK);
    assert_eq!(digest_of(&r), second.digest);
    let started = Instant::now();
    let unknown = cluster.client(1).get_manifest(&repo, "never-resolved").await;
    assert_eq!(unknown.status, StatusCode::SERVICE_UNAVAILABLE, "{}", unknown.describe());
    assert!(unknown.text().contains(REGISTRY), "{}", unknown.text());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "an unreachable upstream took {:?}",
        started.elapsed()
    );
    let wait =
        (confirmed + serve_stale + Duration::from_millis(500)).saturating_duration_since(Instant::now());
    tokio::time::sleep(wait).await;
    let stale = cluster.client(2).get_manifest(&repo, "latest").await;
    assert_eq!(stale.status, StatusCode::SERVICE_UNAVAILABLE, "{}", stale.describe());
    cluster.client(2).get_manifest(&repo, &second.digest).await.expect(StatusCode::OK);

    // Back up: tags resolve again.
    upstream.start_again().await;
    let r = cluster.client(0).get_manifest(&repo, "latest").await;
    r.expect(StatusCode::OK);
    assert_eq!(digest_of(&r), second.digest);
}
