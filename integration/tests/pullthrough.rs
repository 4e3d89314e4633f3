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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use shoal_integration::api::ImageKind;
use shoal_integration::cluster::Cluster;
use shoal_integration::oci::{self, Blob, Manifest};
use shoal_integration::origins::{ClusterSpec, OriginCluster};
use shoal_integration::upstream::UpstreamRegistry;
use shoal_integration::{sha256, skip_if_external, unique_repo, Client, SendExt, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

    // A rollout: 30 requests for the new tag at once, spread over the three origins. Each
    // origin asks the upstream once (a HEAD for the tag, a GET for its manifest) and the
    // others find the answer in the cluster; each request asked for itself before (Docker
    // Hub counts every manifest GET against its pull limit).
    let asked_before = upstream.manifest_requests(&path);
    let rollout = (0..30).map(|n| {
        let (client, repo) = (cluster.client(n % 3), repo.clone());
        async move { client.get_manifest(&repo, "v1").await }
    });
    for m in join_all(rollout).await {
        m.expect(StatusCode::OK);
        assert_eq!(sha256(&m.body), manifest.digest);
    }
    let asked = upstream.manifest_requests(&path) - asked_before;
    assert!(asked <= 6, "{asked} manifest requests reached the upstream for 30 at once:\n{}", upstream.log());

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
    // Nothing in it can be deleted: the spec's answer to a disabled delete is 405.
    for path in [format!("/v2/{repo}/manifests/v1"), format!("/v2/{repo}/blobs/{}", blobs[0].digest)] {
        let r = client.delete(&path).send().await.expect("DELETE");
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "DELETE {path}");
        assert_eq!(r.headers()["allow"], "GET, HEAD", "DELETE {path}");
    }
    client.get_manifest(&repo, "v1").await.expect(StatusCode::OK);
    let pushed = unique_repo("pushed");
    client.push_blob(&pushed, b"pushed content").await;
    // Unknown content upstream is unknown here, without a stuck request.
    let absent = shoal_integration::content::absent_digest();
    client.get_blob(&repo, &absent).await.expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    client.get_manifest(&repo, "no-such-tag").await.expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    // A registry nobody configured is just a repository name.
    client.get_manifest(&format!("other.example/{path}"), "v1").await.expect(StatusCode::NOT_FOUND);
}

/// A one-component name under Docker Hub asked of an origin directly (`docker.io/alpine`, as
/// a client that names the origin and not an agent writes it) is `library/alpine` at Docker
/// Hub: asked for `alpine`, Docker Hub answered 401, which read as a private repository. Now
/// the origin answers 404 naming the repository to ask for, and that one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_docker_hub_name_without_library_is_told_its_library_name() {
    skip_if_external!(SKIP);
    let Some(upstream) = UpstreamRegistry::start().await else { return };
    let up = Client::new(&upstream.url());
    let name = unique_repo("lib").replace('/', "-");
    let (manifest, _) = seed(&up, &format!("library/{name}"), "v1", 1).await;
    let config = format!("[[upstream]]\nregistry = \"docker.io\"\nurl = \"{}\"\n", upstream.url());
    let cluster = OriginCluster::start_cluster(ClusterSpec::new(1).config(&config)).await;
    let short = cluster.client(0).get_manifest(&format!("docker.io/{name}"), "v1").await;
    assert_eq!(short.status, StatusCode::NOT_FOUND, "{}", short.describe());
    assert!(short.text().contains("NAME_UNKNOWN"), "{}", short.text());
    assert!(short.text().contains(&format!("docker.io/library/{name}")), "{}", short.text());
    let r = cluster.client(0).get_manifest(&format!("docker.io/library/{name}"), "v1").await;
    r.expect(StatusCode::OK);
    assert_eq!(sha256(&r.body), manifest.digest);
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

/// Past `serve_stale` an agent serves no target of the tag it kept itself: the origin's
/// 503 says the upstream failed (`shoal-upstream-failure`), which the agent passes on. Before,
/// it took the 503 for the origins' own outage and served last week's target for as long as
/// the upstream stayed down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_serves_no_tag_past_the_upstreams_serve_stale() {
    skip_if_external!(SKIP);
    let Some(mut upstream) = UpstreamRegistry::start().await else { return };
    let up = Client::new(&upstream.url());
    let path = unique_repo("stale");
    let (first, _) = seed(&up, &path, "latest", 1).await;
    let serve_stale = Duration::from_secs(4);
    let cluster = Cluster::start_with_origin(1, &upstream_toml(&upstream.url(), "1s", "4s"), "").await;
    // Agents learn the upstream registries at start (every 2 s until an origin answers).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let client = Client::new(&cluster.agent_url(0));
    let repo = format!("{REGISTRY}/{path}");
    let r = client.get_manifest(&repo, "latest").await;
    r.expect(StatusCode::OK);
    assert_eq!(r.must_header("docker-content-digest"), first.digest);
    let confirmed = Instant::now();
    upstream.stop();
    // Past the origin's tag_ttl (1 s) and the agent's own (2 s), within serve_stale: served.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let r = client.get_manifest(&repo, "latest").await;
    r.expect(StatusCode::OK);
    assert_eq!(r.must_header("docker-content-digest"), first.digest);
    let wait =
        (confirmed + serve_stale + Duration::from_millis(500)).saturating_duration_since(Instant::now());
    tokio::time::sleep(wait).await;
    let r = client.get_manifest(&repo, "latest").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.describe());
    assert!(r.text().contains(REGISTRY), "{}", r.text());
    // By digest, what the node holds is served for good.
    client.get_manifest(&repo, &first.digest).await.expect(StatusCode::OK);
}

/// An upstream whose tag `app:v1` names `first` until `moved` is set, then another digest
/// whose manifest it will not send (429: Docker Hub's pull limit counts only a manifest's
/// `GET`, so its `HEAD` still answers).
async fn moving_tag_upstream(first: Manifest, moved: Arc<AtomicBool>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let second = format!("sha256:{}", "5".repeat(64));
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (first, moved, second) = (first.clone(), moved.clone(), second.clone());
            tokio::spawn(async move {
                let Some(head) = request_head(&mut conn).await else { return };
                let line = head.lines().next().unwrap_or_default().to_string();
                let mut words = line.split(' ');
                let (method, path) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
                let path = path.split('?').next().unwrap_or_default();
                let tag = path.ends_with("/manifests/v1");
                let moved = moved.load(Ordering::SeqCst);
                let answer = if (tag && moved && method == "HEAD")
                    || path.ends_with(&format!("/manifests/{second}")) && method == "HEAD"
                {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nDocker-Content-Digest: {second}\r\nContent-Length: 100\r\nConnection: close\r\n\r\n",
                        first.media_type
                    )
                    .into_bytes()
                } else if (tag && moved) || path.ends_with(&format!("/manifests/{second}")) {
                    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 30\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
                } else if tag || path.ends_with(&format!("/manifests/{}", first.digest)) {
                    let mut answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nDocker-Content-Digest: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        first.media_type,
                        first.digest,
                        first.bytes.len()
                    )
                    .into_bytes();
                    if method == "GET" {
                        answer.extend_from_slice(&first.bytes);
                    }
                    answer
                } else {
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
                };
                let _ = conn.write_all(&answer).await;
            });
        }
    });
    url
}

/// A tag that moved upstream while the new target's manifest cannot be had (its `HEAD`
/// answers, its `GET` is throttled) is answered with its last target within `serve_stale`:
/// the pull works as when the upstream cannot be asked at all. It used to fail with the
/// upstream's 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_moved_tag_whose_new_manifest_is_throttled_serves_the_last_target() {
    skip_if_external!(SKIP);
    let kind = ImageKind::Oci;
    let config = Blob::config(kind.config_type());
    let layer = Blob::random_layer(kind.layer_type(), 1024);
    let value = oci::image_manifest_value(kind.manifest_type(), &config, std::slice::from_ref(&layer));
    let first = Manifest::from_value(kind.manifest_type(), &value);
    let moved = Arc::new(AtomicBool::new(false));
    let url = moving_tag_upstream(first.clone(), moved.clone()).await;
    let cluster =
        OriginCluster::start_cluster(ClusterSpec::new(1).config(&upstream_toml(&url, "1s", "60s"))).await;
    let repo = format!("{REGISTRY}/app");
    let r = cluster.client(0).get_manifest(&repo, "v1").await;
    r.expect(StatusCode::OK);
    assert_eq!(r.must_header("docker-content-digest"), first.digest);
    moved.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = cluster.client(0).get_manifest(&repo, "v1").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    assert_eq!(r.must_header("docker-content-digest"), first.digest, "the last target");
}

/// A fake upstream's 401 asking for Basic credentials.
const BASIC_CHALLENGE: &[u8] =
    b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"slow\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Whether a request `head` carries `Authorization: <want>` (anything passes without `want`).
fn authorized(head: &str, want: Option<&str>) -> bool {
    let Some(want) = want else { return true };
    head.lines().any(|h| {
        h.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("authorization") && value.trim() == want
        })
    })
}

/// The whole head of the next request on `conn`; `None` if the connection ends first.
async fn request_head(conn: &mut tokio::net::TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        conn.read_exact(&mut byte).await.ok()?;
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).to_string())
}

/// A slow upstream run by the test: `GET .../blobs/<digest>` of `data` trickles
/// [`TRICKLE_CHUNK`] bytes every [`TRICKLE_EVERY`] (`HEAD` answers at once); anything else is
/// 404. Counts blob GETs.
async fn slow_upstream(data: Vec<u8>, digest: String) -> (String, Arc<AtomicUsize>) {
    slow_upstream_for(data, digest, None, Arc::default()).await
}

/// [`slow_upstream`] that answers `401` (a Basic challenge) to requests without
/// `Authorization: <authorization>` when that is given: every repository is private, until
/// `public` is set.
async fn slow_upstream_for(
    data: Vec<u8>,
    digest: String,
    authorization: Option<String>,
    public: Arc<AtomicBool>,
) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let gets = Arc::new(AtomicUsize::new(0));
    let (data, counter) = (Arc::new(data), gets.clone());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (data, digest, counter) = (data.clone(), digest.clone(), counter.clone());
            let authorization = authorization.clone().filter(|_| !public.load(Ordering::SeqCst));
            tokio::spawn(async move {
                let Some(head) = request_head(&mut conn).await else { return };
                let line = head.lines().next().unwrap_or_default();
                if !authorized(&head, authorization.as_deref()) {
                    let _ = conn.write_all(BASIC_CHALLENGE).await;
                    return;
                }
                let head_only = line.starts_with("HEAD ");
                if !((line.starts_with("GET ") || head_only) && line.contains(&format!("/blobs/{digest} "))) {
                    let _ = conn
                        .write_all(
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        )
                        .await;
                    return;
                }
                if !head_only {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                let head =
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", data.len());
                if conn.write_all(head.as_bytes()).await.is_err() || head_only {
                    return;
                }
                for chunk in data.chunks(TRICKLE_CHUNK) {
                    if conn.write_all(chunk).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(TRICKLE_EVERY).await;
                }
            });
        }
    });
    (url, gets)
}

/// A slow upstream that holds one image, `app:v1` of `manifest` and `blobs`, answering GET and
/// HEAD: manifests and the config at once, a layer's bytes trickled as in [`slow_upstream`].
/// Counts GETs of each blob. With `authorization`, a request without that `Authorization` is
/// answered `401` (a Basic challenge): a private image.
async fn slow_upstream_image(
    manifest: Manifest,
    blobs: Vec<Blob>,
    authorization: Option<String>,
) -> (String, Arc<Mutex<HashMap<String, usize>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let gets = Arc::new(Mutex::new(HashMap::new()));
    let (manifest, blobs, counter) = (Arc::new(manifest), Arc::new(blobs), gets.clone());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (manifest, blobs, counter) = (manifest.clone(), blobs.clone(), counter.clone());
            let authorization = authorization.clone();
            tokio::spawn(async move {
                let Some(head) = request_head(&mut conn).await else { return };
                let line = head.lines().next().unwrap_or_default().to_string();
                if !authorized(&head, authorization.as_deref()) {
                    let _ = conn.write_all(BASIC_CHALLENGE).await;
                    return;
                }
                let mut words = line.split(' ');
                let (method, path) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
                let path = path.split('?').next().unwrap_or_default();
                let found: Option<(String, Vec<u8>, bool)> = if path.ends_with("/manifests/v1")
                    || path.ends_with(&format!("/manifests/{}", manifest.digest))
                {
                    Some((manifest.media_type.clone(), manifest.bytes.clone(), false))
                } else {
                    blobs
                        .iter()
                        .enumerate()
                        .find(|(_, b)| path.ends_with(&format!("/blobs/{}", b.digest)))
                        .map(|(i, b)| {
                            if method == "GET" {
                                *counter.lock().unwrap().entry(b.digest.clone()).or_insert(0) += 1;
                            }
                            ("application/octet-stream".to_string(), b.data.clone(), i > 0)
                        })
                };
                let Some((content_type, body, slow)) = found else {
                    let _ = conn
                        .write_all(
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        )
                        .await;
                    return;
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nDocker-Content-Digest: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    sha256(&body),
                    body.len()
                );
                if conn.write_all(head.as_bytes()).await.is_err() || method != "GET" {
                    return;
                }
                let chunk = if slow { TRICKLE_CHUNK } else { body.len().max(1) };
                for piece in body.chunks(chunk) {
                    if conn.write_all(piece).await.is_err() {
                        return;
                    }
                    if slow {
                        tokio::time::sleep(TRICKLE_EVERY).await;
                    }
                }
            });
        }
    });
    (url, gets)
}

/// Preheat of an upstream image that nothing has pulled yet, through an agent: its layer takes
/// the origin ~2 s to fetch. The preheat waits for the origins' fetch (as a pull does) instead
/// of asking the trackers for a blob the origins do not hold yet ("blob unknown"), holds the
/// image when it says `done`, and the upstream sends each blob once. Preheats running at once
/// are bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preheat_of_an_upstream_image_waits_for_the_origins_fetch() {
    skip_if_external!(SKIP);
    let kind = ImageKind::Oci;
    let config = Blob::config(kind.config_type());
    let layer = Blob::random_layer(kind.layer_type(), 3 * MIB);
    let value = oci::image_manifest_value(kind.manifest_type(), &config, std::slice::from_ref(&layer));
    let manifest = Manifest::from_value(kind.manifest_type(), &value);
    let (url, gets) = slow_upstream_image(manifest, vec![config.clone(), layer.clone()], None).await;
    let cluster = Cluster::start_with_origin(
        1,
        &format!("[[upstream]]\nregistry = \"slow.test\"\nurl = \"{url}\"\n"),
        "",
    )
    .await;
    // Agents learn the upstream registries at start (every 2 s until an origin answers).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let http = reqwest::Client::new();
    let post = || {
        http.post(format!("{}/v1/preheat", cluster.agent_url(0)))
            .json(&serde_json::json!({ "image": "slow.test/app:v1" }))
            .timeout(Duration::from_secs(60))
            .send()
    };
    let reply = post().await.expect("POST /v1/preheat");
    assert_eq!(reply.status(), StatusCode::OK);
    // While it runs, 15 more (16 in all, `MAX_RUNNING_PREHEATS`) are taken, and the next is
    // told to come back.
    let mut more = Vec::new();
    for _ in 1..16 {
        let r = post().await.expect("POST /v1/preheat");
        assert_eq!(r.status(), StatusCode::OK);
        more.push(r);
    }
    let over = post().await.expect("POST /v1/preheat");
    assert_eq!(over.status(), StatusCode::TOO_MANY_REQUESTS, "preheats past the agent's bound");
    assert!(over.headers().contains_key("retry-after"));
    let events = reply.text().await.expect("preheat events");
    assert!(events.lines().last().is_some_and(|l| l.contains("\"done\"")), "preheat events:\n{events}");
    for blob in [&config, &layer] {
        let r = Client::new(&cluster.agent_url(0)).get_blob("slow.test/app", &blob.digest).await;
        r.expect(StatusCode::OK);
        assert_eq!(sha256(&r.body), blob.digest);
        assert_eq!(
            gets.lock().unwrap().get(&blob.digest),
            Some(&1),
            "{} left the upstream once",
            blob.digest
        );
    }
}

/// A preheat of a private upstream image with the client's Basic credentials (Shoal checking
/// none) fetches it as that client, and what it fetched is not served from the agent's caches
/// to a client without them: the preheat used to send the credentials as Shoal's own, so its
/// manifests went into the caches every client reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_preheat_with_upstream_credentials_caches_nothing_for_other_clients() {
    skip_if_external!(SKIP);
    let kind = ImageKind::Oci;
    let config = Blob::config(kind.config_type());
    let layer = Blob::random_layer(kind.layer_type(), 64 * 1024);
    let value = oci::image_manifest_value(kind.manifest_type(), &config, std::slice::from_ref(&layer));
    let manifest = Manifest::from_value(kind.manifest_type(), &value);
    let alice = format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "alice:alice-secret")
    );
    let (url, _gets) =
        slow_upstream_image(manifest.clone(), vec![config.clone(), layer.clone()], Some(alice.clone())).await;
    let cluster = Cluster::start_with_origin(
        1,
        &format!("[[upstream]]\nregistry = \"slow.test\"\nurl = \"{url}\"\n"),
        "",
    )
    .await;
    // Agents learn the upstream registries at start (every 2 s until an origin answers).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let http = reqwest::Client::new();
    let reply = http
        .post(format!("{}/v1/preheat", cluster.agent_url(0)))
        .header("authorization", &alice)
        .json(&serde_json::json!({ "image": "slow.test/app:v1" }))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("POST /v1/preheat");
    assert_eq!(reply.status(), StatusCode::OK);
    let events = reply.text().await.expect("preheat events");
    assert!(events.lines().last().is_some_and(|l| l.contains("\"done\"")), "preheat events:\n{events}");
    let agent = cluster.agent_url(0);
    for reference in [manifest.digest.as_str(), "v1"] {
        let url = format!("{agent}/v2/slow.test/app/manifests/{reference}");
        let r = http.get(&url).send().await.expect("GET");
        assert_eq!(
            r.status(),
            StatusCode::UNAUTHORIZED,
            "an anonymous client read the manifest by {reference}"
        );
        let r = http.get(&url).header("authorization", &alice).send().await.expect("GET");
        assert_eq!(r.status(), StatusCode::OK, "alice reads the manifest by {reference}");
    }
    let url = format!("{agent}/v2/slow.test/app/blobs/{}", layer.digest);
    let r = http.get(&url).send().await.expect("GET");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "an anonymous client read the layer");
}

/// A tag confirmed within `serve_stale` is served through an agent while its upstream hangs
/// (accepts connections, never answers): the origin asks it for at most
/// `STALE_ANSWER_AFTER` (5 s) and answers with the last target, within the agent's 10 s wait
/// for an origin. Before, the origin waited out its 30 s header timeout, the agent gave up
/// first and the pull failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_upstream_still_has_its_stale_tags_served_through_agents() {
    skip_if_external!(SKIP);
    let (manifest, proxy, hang) = hanging_image_upstream().await;
    let upstream = format!("[[upstream]]\nregistry = \"slow.test\"\nurl = \"{proxy}\"\ntag_ttl = \"1s\"\n");
    let cluster = Cluster::start_with_origin(1, &upstream, "").await;
    // Agents learn the upstream registries at start (every 2 s until an origin answers).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let client = Client::new(&cluster.agent_url(0));
    let r = client.get_manifest("slow.test/app", "v1").await;
    r.expect(StatusCode::OK);
    hang.store(true, Ordering::SeqCst);
    // Past the origin's tag_ttl (1 s) and the agent's own (2 s).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let started = Instant::now();
    let r = client.get_manifest("slow.test/app", "v1").await;
    r.expect(StatusCode::OK);
    assert_eq!(r.must_header("docker-content-digest"), manifest.digest);
    assert!(started.elapsed() < Duration::from_secs(9), "the stale tag took {:?}", started.elapsed());
    // The referrers too: what the cluster holds, once the upstream has had 5 s to list its own
    // (an admission webhook checking signatures gives up after 10).
    let started = Instant::now();
    let origin = Client::new(cluster.origin.url());
    let r = origin.get(&format!("/v2/slow.test/app/referrers/{}", manifest.digest)).reply().await;
    r.expect(StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(8), "the referrers took {:?}", started.elapsed());
}

/// Past `serve_stale`, an agent does not serve the tag's target it kept while its upstream
/// hangs: the origin's answer said for how long it may (`Shoal-Serve-Stale-For`), and the
/// origin's wait for the hanging upstream, past the agent's own 10 s, reads to the agent as
/// an outage of the origins. Before, it served its kept target however old.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_upstream_past_serve_stale_is_not_served_from_an_agents_memory() {
    skip_if_external!(SKIP);
    let (manifest, proxy, hang) = hanging_image_upstream().await;
    let serve_stale = Duration::from_secs(3);
    let upstream = format!(
        "[[upstream]]\nregistry = \"slow.test\"\nurl = \"{proxy}\"\ntag_ttl = \"1s\"\nserve_stale = \"3s\"\n"
    );
    let cluster = Cluster::start_with_origin(1, &upstream, "").await;
    // Agents learn the upstream registries at start (every 2 s until an origin answers).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let client = Client::new(&cluster.agent_url(0));
    let r = client.get_manifest("slow.test/app", "v1").await;
    r.expect(StatusCode::OK);
    let left: u64 = r.must_header("shoal-serve-stale-for").parse().expect("seconds");
    assert!(left <= 3, "at most serve_stale left: {left}");
    let confirmed = Instant::now();
    hang.store(true, Ordering::SeqCst);
    // Past serve_stale, and past the second the limit is counted in.
    let wait =
        (confirmed + serve_stale + Duration::from_millis(1500)).saturating_duration_since(Instant::now());
    tokio::time::sleep(wait).await;
    let r = client.get_manifest("slow.test/app", "v1").await;
    assert_ne!(r.status, StatusCode::OK, "the agent served its kept target past serve_stale");
    // By digest, what the node holds is served for good.
    client.get_manifest("slow.test/app", &manifest.digest).await.expect(StatusCode::OK);
}

/// An upstream holding one image (`app:v1`, its manifest returned) behind a proxy that hangs
/// while the returned flag is set: the proxy's URL.
async fn hanging_image_upstream() -> (Manifest, String, Arc<AtomicBool>) {
    let kind = ImageKind::Oci;
    let config = Blob::config(kind.config_type());
    let layer = Blob::random_layer(kind.layer_type(), 64 * 1024);
    let value = oci::image_manifest_value(kind.manifest_type(), &config, std::slice::from_ref(&layer));
    let manifest = Manifest::from_value(kind.manifest_type(), &value);
    let (url, _gets) = slow_upstream_image(manifest.clone(), vec![config, layer], None).await;
    let hang = Arc::new(AtomicBool::new(false));
    let target: std::net::SocketAddr = url.trim_start_matches("http://").parse().expect("upstream address");
    let proxy = hanging_proxy(target, hang.clone()).await;
    (manifest, proxy, hang)
}

/// A TCP proxy to `target` that, while `hang` is set, accepts connections and says nothing.
async fn hanging_proxy(target: std::net::SocketAddr, hang: Arc<AtomicBool>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let hang = hang.clone();
            tokio::spawn(async move {
                if hang.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_secs(120)).await;
                    drop(conn);
                    return;
                }
                let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
            });
        }
    });
    url
}

const TRICKLE_CHUNK: usize = 128 * 1024;
const TRICKLE_EVERY: Duration = Duration::from_millis(100);

/// The first requesters of an upstream blob get its bytes while the origin is still fetching
/// it (here the upstream takes ~3 s); the others wait for it and take it from the swarm. Every
/// reader gets the right bytes, and the upstream sends the blob once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_first_requesters_get_bytes_while_the_origin_fetches() {
    skip_if_external!(SKIP);
    let data = shoal_integration::random_bytes(4 * MIB);
    let digest = sha256(&data);
    let upstream_time = TRICKLE_EVERY * (data.len().div_ceil(TRICKLE_CHUNK) as u32);
    let (url, gets) = slow_upstream(data.clone(), digest.clone()).await;
    let cluster = Cluster::start_with_origin(
        3,
        &format!("[[upstream]]\nregistry = \"slow.test\"\nurl = \"{url}\"\n"),
        "",
    )
    .await;
    // Agents learn the upstream registries at start (every 2 s until an origin answers).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let http = reqwest::Client::new();
    let started = Instant::now();
    let reads = (0..3).map(|i| {
        let (http, url) = (http.clone(), format!("{}/v2/slow.test/app/blobs/{digest}", cluster.agent_url(i)));
        async move {
            let mut r = http.get(url).send().await.expect("GET");
            assert_eq!(r.status(), StatusCode::OK, "agent {i}");
            let (mut body, mut first) = (Vec::new(), None);
            while let Some(chunk) = r.chunk().await.expect("body") {
                first.get_or_insert_with(|| started.elapsed());
                body.extend_from_slice(&chunk);
            }
            (i, first.unwrap_or_default(), started.elapsed(), body)
        }
    });
    let mut early = 0;
    for (i, first, done, body) in join_all(reads).await {
        assert!(sha256(&body) == digest, "agent {i} got other bytes");
        eprintln!(
            "agent {i}: first byte after {first:?}, last after {done:?}; upstream takes {upstream_time:?}"
        );
        if first < upstream_time / 2 {
            early += 1;
        }
    }
    assert!(early >= 1, "no reader got bytes before the upstream had sent half the blob");
    assert_eq!(gets.load(Ordering::SeqCst), 1, "the upstream sent the blob more than once");
}

/// An upstream that keeps every repository private (Basic credentials). Alice's request for a
/// blob of `secret` starts the origin's fetch; meanwhile an anonymous client asks for the same
/// digest under another repository name: it gets `401`, not Alice's bytes streamed (fetches
/// are shared by digest, their bytes are their repository's). And the blob fetched with
/// Alice's credentials first marks `secret` private: anonymous reads of it are refused after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_private_blob_fetch_streams_to_no_other_repository_and_marks_its_own_private() {
    skip_if_external!(SKIP);
    let data = shoal_integration::random_bytes(4 * MIB);
    let digest = sha256(&data);
    let alice = format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "alice:alice-secret")
    );
    let (url, gets) =
        slow_upstream_for(data.clone(), digest.clone(), Some(alice.clone()), Arc::default()).await;
    let mut cluster = Cluster::start_with_origin(
        2,
        &format!("[[upstream]]\nregistry = \"slow.test\"\nurl = \"{url}\"\n"),
        "",
    )
    .await;
    // Agents learn the upstream registries at start (every 2 s until an origin answers).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let http = reqwest::Client::new();
    let alices = {
        let (http, url) =
            (http.clone(), format!("{}/v2/slow.test/secret/blobs/{digest}", cluster.agent_url(0)));
        let alice = alice.clone();
        tokio::spawn(async move {
            let r = http.get(url).header("authorization", alice).send().await.expect("GET");
            (r.status(), r.bytes().await.map(|b| sha256(&b)).unwrap_or_default())
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Nor does Alice's fetch in progress tell an anonymous client the blob's size.
    let secret = format!("{}/v2/slow.test/secret/blobs/{digest}", cluster.agent_url(1));
    let head = tokio::time::timeout(Duration::from_secs(30), http.head(&secret).send())
        .await
        .expect("the anonymous HEAD got no answer")
        .expect("HEAD");
    assert_eq!(
        head.status(),
        StatusCode::UNAUTHORIZED,
        "an anonymous HEAD during a private fetch (length {:?})",
        head.headers().get("content-length")
    );
    let other = format!("{}/v2/slow.test/other/blobs/{digest}", cluster.agent_url(1));
    let anonymous = tokio::time::timeout(Duration::from_secs(90), http.get(&other).send())
        .await
        .expect("the anonymous request got no answer")
        .expect("GET");
    let status = anonymous.status();
    let body = anonymous.bytes().await.unwrap_or_default();
    assert!(
        status != StatusCode::OK && sha256(&body) != digest,
        "an anonymous client read a private blob under another repository name: {status}"
    );
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, got) = alices.await.expect("alice's request");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got, digest, "alice got the blob");
    let after = http.get(&secret).send().await.expect("GET");
    assert_eq!(after.status(), StatusCode::UNAUTHORIZED, "secret is private once a blob needed credentials");
    assert_eq!(gets.load(Ordering::SeqCst), 1, "the upstream sent the blob more than once");
    // The referrers of a subject the upstream does not have: an empty list, never a 404
    // (spec, "Listing Referrers"; the upstream's 404 to the access check was passed on).
    let referrers = format!("{}/v2/slow.test/secret/referrers/{}", cluster.origin.url(), digest);
    let r = http.get(&referrers).header("authorization", &alice).send().await.expect("GET");
    assert_eq!(r.status(), StatusCode::OK, "referrers of a subject the upstream lacks");
    let index: serde_json::Value = r.json().await.expect("an image index");
    assert_eq!(index["manifests"], serde_json::json!([]));
    // Pushing an image built on it: a mount from the private repository without its
    // credentials is a new upload session, as is a mount of a digest that does not parse;
    // with them, a mount.
    let uploads = format!("{}/v2/team/app/blobs/uploads/", cluster.origin.url());
    for (query, auth, want) in [
        (format!("mount={digest}&from=slow.test/secret"), None, StatusCode::ACCEPTED),
        ("mount=sha384:abc&from=team/base".to_string(), None, StatusCode::ACCEPTED),
        (format!("mount={digest}&from=slow.test/secret"), Some(alice.clone()), StatusCode::CREATED),
    ] {
        let mut post = http.post(format!("{uploads}?{query}"));
        if let Some(auth) = &auth {
            post = post.header("authorization", auth);
        }
        let r = post.send().await.expect("POST");
        assert_eq!(r.status(), want, "{query} with credentials: {}", auth.is_some());
    }
    // Alice reads it again once the origin holds it: agent 0 downloads and caches it. With the
    // origin down, that copy is served to nobody through a repository the origin never
    // confirmed it in.
    let mine = format!("{}/v2/slow.test/secret/blobs/{digest}", cluster.agent_url(0));
    let again = http.get(&mine).header("authorization", alice).send().await.expect("GET");
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(sha256(&again.bytes().await.expect("body")), digest);
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.origin.kill();
    for repo in ["team/app", "slow.test/other"] {
        let url = format!("{}/v2/{repo}/blobs/{digest}", cluster.agent_url(0));
        let r = http.get(&url).send().await.expect("GET");
        let status = r.status();
        let body = r.bytes().await.unwrap_or_default();
        assert!(
            status != StatusCode::OK && sha256(&body) != digest,
            "with the origin down, an anonymous client read the cached private blob as {repo}: {status}"
        );
    }
}

/// A repository found private (only a client's credentials opened it) is asked about without
/// them again after `private_recheck`: made public upstream (or opened to the configured
/// credentials once they are fixed), it is served to anonymous clients again. Before, the
/// mark was for good: credentials that failed once left, say, `docker.io/library/nginx`
/// closed to every client without pull secrets.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_private_repository_made_public_is_served_to_everyone_again() {
    skip_if_external!(SKIP);
    let data = shoal_integration::random_bytes(64 * 1024);
    let digest = sha256(&data);
    let alice = format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "alice:alice-secret")
    );
    let public = Arc::new(AtomicBool::new(false));
    let (url, _gets) =
        slow_upstream_for(data.clone(), digest.clone(), Some(alice.clone()), public.clone()).await;
    let upstream =
        format!("[[upstream]]\nregistry = \"slow.test\"\nurl = \"{url}\"\nprivate_recheck = \"1s\"\n");
    let cluster = Cluster::start_with_origin(1, &upstream, "").await;
    // Agents learn the upstream registries at start (every 2 s until an origin answers).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let http = reqwest::Client::new();
    let blob = format!("{}/v2/slow.test/lib/app/blobs/{digest}", cluster.agent_url(0));
    let got = http.get(&blob).header("authorization", &alice).send().await.expect("GET");
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(sha256(&got.bytes().await.expect("body")), digest);
    let anonymous = http.get(&blob).send().await.expect("GET");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED, "private while the upstream says so");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let anonymous = http.get(&blob).send().await.expect("GET");
    assert_eq!(
        anonymous.status(),
        StatusCode::UNAUTHORIZED,
        "still private after a recheck that was refused"
    );
    public.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let anonymous = http.get(&blob).send().await.expect("GET");
    assert_eq!(anonymous.status(), StatusCode::OK, "public again upstream, served to everyone");
    assert_eq!(sha256(&anonymous.bytes().await.expect("body")), digest);
}

/// An upstream that sends other bytes than the digest names: a reader streaming them while the
/// origin fetches never gets a complete body (the stream ends with an error before its last
/// chunk), and the blob is not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_streamed_blob_with_the_wrong_bytes_never_completes() {
    skip_if_external!(SKIP);
    let data = shoal_integration::random_bytes(MIB);
    let claimed = sha256(b"something else entirely");
    let (url, _) = slow_upstream(data.clone(), claimed.clone()).await;
    let cluster = Cluster::start_with_origin(
        1,
        &format!("[[upstream]]\nregistry = \"slow.test\"\nurl = \"{url}\"\n"),
        "",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut r = reqwest::get(format!("{}/v2/slow.test/app/blobs/{claimed}", cluster.agent_url(0)))
        .await
        .expect("GET");
    if r.status() == StatusCode::OK {
        let mut got = 0;
        let ended = loop {
            match r.chunk().await {
                Ok(Some(c)) => got += c.len(),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        assert!(ended.is_err() && got < data.len(), "a wrong blob arrived whole ({got} bytes, {ended:?})");
    }
    // Not stored: asking again does not answer 200 with a body.
    let again = reqwest::get(format!("{}/v2/slow.test/app/blobs/{claimed}", cluster.agent_url(0)))
        .await
        .expect("GET");
    if again.status() == StatusCode::OK {
        assert!(again.bytes().await.is_err(), "the wrong blob was served whole after the fetch");
    }
}

/// The referrers of an upstream image (signatures, SBOMs) are listed through the origins as
/// the upstream keeps them: Debian's `docker-registry` has no referrers API (its 404 sends the
/// origin to the referrers tag schema, the index tagged `sha256-<hex>`), and the listed
/// artifact is then served by digest like any mirrored manifest. Before, a mirrored
/// repository listed only what the cluster held: `notation verify` through Shoal found no
/// signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_images_referrers_are_listed_through_the_origins() {
    skip_if_external!(SKIP);
    let Some(upstream) = UpstreamRegistry::start().await else { return };
    let up = Client::new(&upstream.url());
    let path = unique_repo("refs");
    let (subject, _) = seed(&up, &path, "v1", 1).await;
    let config = Blob::new(oci::OCI_EMPTY, b"{}".to_vec());
    let layer = Blob::random_layer("application/vnd.example.signature", 300);
    up.push_blob(&path, &config.data).await;
    up.push_blob(&path, &layer.data).await;
    let kind = "application/vnd.example.signature";
    let artifact = Manifest::from_value(
        oci::OCI_MANIFEST,
        &oci::artifact_value(&subject, Some(kind), &config, &layer, &[("org.example", "sig")]),
    );
    up.push_manifest(&path, &artifact.digest, &artifact).await;
    let mut entry = artifact.descriptor();
    entry["artifactType"] = serde_json::json!(kind);
    let index = Manifest::from_value(
        oci::OCI_INDEX,
        &serde_json::json!({ "schemaVersion": 2, "mediaType": oci::OCI_INDEX, "manifests": [entry] }),
    );
    let schema_tag = format!("sha256-{}", subject.digest.trim_start_matches("sha256:"));
    up.push_manifest(&path, &schema_tag, &index).await;

    let cluster = OriginCluster::start_cluster(ClusterSpec::new(1).config(&upstream_toml(
        &upstream.url(),
        "30s",
        "1h",
    )))
    .await;
    let client = cluster.client(0);
    let repo = format!("{REGISTRY}/{path}");
    for query in ["", &format!("?artifactType={kind}")] {
        let reply = client.get(&format!("/v2/{repo}/referrers/{}{query}", subject.digest)).reply().await;
        reply.expect(StatusCode::OK);
        let listed = reply.json()["manifests"].clone();
        assert_eq!(listed.as_array().map(Vec::len), Some(1), "{query}: {}", reply.describe());
        assert_eq!(listed[0]["digest"], serde_json::json!(artifact.digest), "{query}");
        assert_eq!(listed[0]["artifactType"], serde_json::json!(kind), "{query}");
    }
    // Another type filters it out; a subject with no referrers upstream has none.
    let none = client.get(&format!("/v2/{repo}/referrers/{}?artifactType=x/y", subject.digest)).reply().await;
    none.expect(StatusCode::OK);
    assert_eq!(none.json()["manifests"], serde_json::json!([]));
    let config_digest = shoal_integration::content::absent_digest();
    let empty = client.get(&format!("/v2/{repo}/referrers/{config_digest}")).reply().await;
    empty.expect(StatusCode::OK);
    assert_eq!(empty.json()["manifests"], serde_json::json!([]));
    // The listed artifact is served by digest, with the upstream's bytes.
    let got = client.get_manifest(&repo, &artifact.digest).await;
    got.expect(StatusCode::OK);
    assert_eq!(sha256(&got.body), artifact.digest);
}
