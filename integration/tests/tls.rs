//! TLS on every listener, node identity, and the peer protocol over mutual TLS, with real
//! `shoal` processes whose certificates come from a CA made by the test.

use std::time::{Duration, Instant};

use shoal_integration::cluster::Cluster;
use shoal_integration::tls::pki;
use shoal_integration::{skip_if_external, Origin};
use shoal_registry::identity::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The certificate a TLS server at `addr` presents to a client that trusts the test CA.
async fn served_certificate(addr: &str) -> Vec<u8> {
    let connector = shoal_tls::TlsConnector::from(shoal_tls::current().client_config());
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = shoal_tls::ServerName::try_from("localhost").expect("a server name");
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    tls.get_ref().1.peer_certificates().expect("a server certificate")[0].as_ref().to_vec()
}

fn host_port(url: &str) -> &str {
    url.split_once("://").map_or(url, |(_, rest)| rest).trim_end_matches('/')
}

/// The origin's peer listener, from the line it logs when it starts seeding.
fn origin_peer_addr(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).expect("read the origin's log");
    let line = text.lines().find(|l| l.contains("seeding blobs to the swarm")).expect("the seeding line");
    let start = line.find("peer_listen=").expect("peer_listen in the line") + "peer_listen=".len();
    line[start..].split_whitespace().next().expect("an address").to_string()
}

#[tokio::test]
async fn a_blob_crosses_a_tls_cluster_and_its_peers_use_mutual_tls() {
    skip_if_external!("starts its own cluster");
    let cluster = Cluster::start_tls(2).await;
    assert!(cluster.origin.url().starts_with("https://"));
    let blob = cluster.push_random_blob(12 << 20).await;
    let first = cluster.fetch(0, &blob).await.expect("pull through agent 0");
    assert_eq!(first.digest, blob.digest);
    let second = cluster.fetch(1, &blob).await.expect("pull through agent 1");
    assert_eq!(second.digest, blob.digest);
    // The swarm worked over mutual TLS: the agents received pieces from peers (the origin's
    // seeder or each other), not only from the origin's HTTP fallback.
    let received = cluster.agent_received(0).await.peer + cluster.agent_received(1).await.peer;
    assert!(
        received >= blob.size,
        "agents received {received} bytes from peers for a {} byte blob",
        blob.size
    );
    for i in 0..2 {
        let log = std::fs::read_to_string(cluster.agent(i).log_path()).expect("read an agent's log");
        assert!(log.contains("peer_tls=true"), "agent {i} did not turn peer TLS on:\n{log}");
    }
}

#[tokio::test]
async fn plain_http_gets_no_answer_where_tls_is_on() {
    skip_if_external!("starts its own origin");
    let origin = Origin::start_with_config(&pki().toml("plain-refused", Role::Origin)).await;
    let plain = format!("http://{}/v2/", host_port(origin.url()));
    let result = reqwest::Client::new().get(&plain).timeout(Duration::from_secs(5)).send().await;
    match result {
        Err(_) => {}
        Ok(resp) => panic!("plain HTTP to a TLS listener answered {}", resp.status()),
    }
    // The same request over TLS works.
    let resp =
        shoal_tls::http_client().build().unwrap().get(format!("{}/v2/", origin.url())).send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
}

#[tokio::test]
async fn a_client_without_a_node_certificate_gets_no_piece() {
    skip_if_external!("starts its own cluster");
    let cluster = Cluster::start_tls(0).await;
    let blob = cluster.push_random_blob(1 << 20).await;
    let seeder = origin_peer_addr(&cluster.origin.log_path());

    // Plain TCP speaking the peer protocol's first bytes: the seeder expects a TLS
    // handshake, so nothing of the blob comes back.
    let mut tcp = TcpStream::connect(&seeder).await.expect("connect to the seeder");
    let _ = tcp.write_all(format!("\0\0\0\x50\x01{}", blob.digest).as_bytes()).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), tcp.read_to_end(&mut got)).await;
    assert!(got.len() < 64, "a plain client read {} bytes from the seeder", got.len());

    // TLS that trusts the CA but presents no certificate: the seeder ends the handshake.
    let connector = shoal_tls::TlsConnector::from(shoal_tls::current().client_config());
    let tcp = TcpStream::connect(&seeder).await.expect("connect to the seeder");
    let name = shoal_tls::ServerName::try_from("localhost").unwrap();
    let mut got = Vec::new();
    if let Ok(mut tls) = connector.connect(name, tcp).await {
        let _ = tls.write_all(b"hello").await;
        let _ = tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut got)).await;
    }
    assert!(got.is_empty(), "a client without a certificate read {} bytes", got.len());

    // An operator's certificate is signed by the cluster CA, but it is not a node's.
    let admin = pki().identity("alice", Role::Admin);
    let tcp = TcpStream::connect(&seeder).await.expect("connect to the seeder");
    let name = shoal_tls::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    let mut got = Vec::new();
    if let Ok(mut tls) = admin.peer().unwrap().connector.connect(name, tcp).await {
        let _ = tls.write_all(b"hello").await;
        let _ = tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut got)).await;
    }
    assert!(got.is_empty(), "an admin certificate read {} bytes from the peer port", got.len());
}

#[tokio::test]
async fn a_replaced_certificate_is_served_without_a_restart() {
    skip_if_external!("starts its own origin");
    let origin = Origin::start_with_config(&pki().toml("rotating", Role::Origin)).await;
    let addr = host_port(origin.url()).to_string();
    let before = served_certificate(&addr).await;
    pki().issue("rotating", Role::Origin);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = served_certificate(&addr).await;
        if now != before {
            break;
        }
        assert!(Instant::now() < deadline, "the origin still serves the old certificate");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Still the same process, still serving.
    let resp =
        shoal_tls::http_client().build().unwrap().get(format!("{}/v2/", origin.url())).send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let log = std::fs::read_to_string(origin.log_path()).unwrap();
    assert!(log.contains("TLS certificate reloaded"), "{log}");
}

#[tokio::test]
async fn the_tracker_takes_announces_only_from_the_clusters_nodes() {
    skip_if_external!("starts its own cluster");
    let cluster = Cluster::start_tls(0).await;
    let blob = cluster.push_random_blob(64 << 10).await;
    let url = format!("{}/v1/announce", cluster.tracker.url());
    let fake = serde_json::json!({
        "digest": blob.digest,
        "peer_id": "ab".repeat(20),
        "addr": "192.0.2.1:7001",
        "complete": true,
    });
    // Over TLS, but without a certificate: refused before anything is recorded.
    let anonymous = shoal_tls::http_client().build().unwrap();
    let resp = anonymous.post(&url).json(&fake).send().await.expect("announce");
    assert_eq!(resp.status(), reqwest::StatusCode::FORBIDDEN);
    let resp =
        anonymous.get(format!("{}/v1/metainfo/{}", cluster.tracker.url(), blob.digest)).send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::FORBIDDEN);

    // An operator's certificate is not a node's either.
    let resp = client_as("bob", Role::Admin).post(&url).json(&fake).send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::FORBIDDEN);

    // A node's certificate: accepted, and the peer list names the origin's seeder.
    let node = client_as("node-x", Role::Agent);
    let mut real = fake.clone();
    real["addr"] = "127.0.0.1:9".into();
    real["complete"] = false.into();
    let resp = node.post(&url).json(&real).send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["peers"].as_array().is_some_and(|p| !p.is_empty()), "{body}");

    // Another node cannot take over that peer id while it is live: it is handed peers (a
    // squatter must not lock a node out either), but the entry stays the first node's.
    let other = client_as("node-y", Role::Agent);
    let resp = other.post(&url).json(&fake).send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let third = client_as("node-z", Role::Agent);
    let mut asking = real.clone();
    asking["peer_id"] = "cd".repeat(20).into();
    asking["addr"] = "127.0.0.1:10".into();
    let body: serde_json::Value = third.post(&url).json(&asking).send().await.unwrap().json().await.unwrap();
    let listed = body["peers"].as_array().cloned().unwrap_or_default();
    let entry = listed.iter().find(|p| p["peer_id"] == "ab".repeat(20)).expect("the first node's entry");
    assert_eq!(entry["addr"], "127.0.0.1:9", "{body}");
}

/// A client presenting a certificate of `role` from the test PKI.
fn client_as(name: &str, role: Role) -> reqwest::Client {
    pki().client(name, role)
}

#[tokio::test]
async fn an_origin_cluster_runs_on_node_certificates_without_a_secret() {
    use shoal_integration::origins::{try_pull_image, try_push_image, ClusterSpec, OriginCluster, TestImage};
    skip_if_external!("starts its own origins");
    let cluster = OriginCluster::start_cluster(ClusterSpec::new(3).with_tls()).await;
    let image = TestImage::random(&shoal_integration::unique_repo("tls"), "v1", &[300_000, 40_000]);
    cluster.check(try_push_image(&cluster.client(0), &image).await, "push to origin 0");
    for i in 0..3 {
        cluster.check(try_pull_image(&cluster.client(i), &image).await, &format!("pull from origin {i}"));
    }
    for digest in image.blob_digests() {
        assert_eq!(cluster.holders(&digest).len(), 2, "{digest} is not on two origins");
    }
    // The harness's admin calls carry an operator's certificate, and no secret is set.
    cluster.repair(1).await;

    // The internal API takes origins' certificates only.
    let health = format!("{}/shoal/internal/v1/health", cluster.url(1));
    let status = |c: reqwest::Client| {
        let url = health.clone();
        async move { c.get(url).send().await.expect("reach origin 1").status() }
    };
    assert_eq!(status(shoal_tls::http_client().build().unwrap()).await, reqwest::StatusCode::UNAUTHORIZED);
    assert_eq!(status(client_as("node-q", Role::Agent)).await, reqwest::StatusCode::UNAUTHORIZED);
    assert_eq!(status(client_as("carol", Role::Admin)).await, reqwest::StatusCode::UNAUTHORIZED);
    assert_eq!(status(client_as("origin-x", Role::Origin)).await, reqwest::StatusCode::OK);
    // The admin API takes an operator's certificate, not a node's.
    let members = format!("{}/shoal/v1/admin/members", cluster.url(2));
    let resp = client_as("node-q", Role::Agent).get(&members).send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::UNAUTHORIZED);
    let resp = client_as("carol", Role::Admin).get(&members).send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
}

#[tokio::test]
async fn the_cluster_secret_rotates_one_origin_at_a_time() {
    use shoal_integration::origins::{
        try_pull_image, try_push_image, ClusterSpec, OriginCluster, TestImage, SECRET_ENV,
    };
    skip_if_external!("starts its own origins");
    // Mid-rotation: origin 1 already sends the new secret, the others still the old one;
    // every origin accepts both.
    let spec = ClusterSpec::new(3)
        .secret("old-secret")
        .cluster("accepted_secrets = [\"old-secret\", \"rotated-secret\"]")
        .member_env(1, SECRET_ENV, "rotated-secret");
    let cluster = OriginCluster::start_cluster(spec).await;
    let image = TestImage::random(&shoal_integration::unique_repo("rotate"), "v1", &[200_000]);
    cluster.check(try_push_image(&cluster.client(1), &image).await, "push to origin 1");
    cluster.check(try_pull_image(&cluster.client(0), &image).await, "pull from origin 0");
    cluster.check(try_pull_image(&cluster.client(2), &image).await, "pull from origin 2");
    let health = format!("{}/shoal/internal/v1/health", cluster.url(0));
    let http = reqwest::Client::new();
    for (secret, expected) in [
        ("rotated-secret", reqwest::StatusCode::OK),
        ("old-secret", reqwest::StatusCode::OK),
        ("some-other-secret", reqwest::StatusCode::UNAUTHORIZED),
    ] {
        let resp = http.get(&health).bearer_auth(secret).send().await.unwrap();
        assert_eq!(resp.status(), expected, "secret {secret}");
    }
}

/// Certificates without a cluster CA, a shared secret and internal listeners: the internal
/// listeners speak TLS too (the origins reach each other at https:// whenever a certificate is
/// set), so the members see each other up and pushes replicate. Before, the internal listener
/// fell back to plain HTTP, every health check failed its handshake, and no member was up.
#[tokio::test]
async fn internal_listeners_speak_tls_without_a_cluster_ca() {
    use shoal_integration::origins::{try_pull_image, try_push_image, ClusterSpec, OriginCluster, TestImage};
    skip_if_external!("starts its own origins");
    let spec = ClusterSpec::new(3).with_server_tls().with_internal_listeners();
    let cluster = OriginCluster::start_cluster(spec).await;
    let image = TestImage::random(&shoal_integration::unique_repo("server-tls"), "v1", &[100_000]);
    cluster.check(try_push_image(&cluster.client(0), &image).await, "push to origin 0");
    for i in 0..3 {
        cluster.check(try_pull_image(&cluster.client(i), &image).await, &format!("pull from origin {i}"));
    }
    for digest in image.blob_digests() {
        assert_eq!(cluster.holders(&digest).len(), 2, "{digest} is not on two origins");
    }
}

#[tokio::test]
async fn internal_and_admin_apis_live_on_their_own_mutual_tls_listener() {
    use shoal_integration::origins::{try_pull_image, try_push_image, ClusterSpec, OriginCluster, TestImage};
    skip_if_external!("starts its own origins");
    let spec = ClusterSpec::new(3).with_tls().with_internal_listeners();
    let cluster = OriginCluster::start_cluster(spec).await;
    // Replication and reads across origins go through the internal listeners.
    let image = TestImage::random(&shoal_integration::unique_repo("internal"), "v1", &[200_000, 30_000]);
    cluster.check(try_push_image(&cluster.client(0), &image).await, "push to origin 0");
    for i in 0..3 {
        cluster.check(try_pull_image(&cluster.client(i), &image).await, &format!("pull from origin {i}"));
    }
    for digest in image.blob_digests() {
        assert_eq!(cluster.holders(&digest).len(), 2, "{digest} is not on two origins");
    }
    cluster.repair(0).await; // the operator's certificate, on the internal listener

    // The public listener no longer serves the internal or admin API, to anyone.
    let origin = client_as("origin-y", Role::Origin);
    for path in ["/shoal/internal/v1/health", "/shoal/v1/admin/members"] {
        let resp = origin.get(format!("{}{path}", cluster.url(1))).send().await.unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::NOT_FOUND, "{path} on the public listener");
    }
    // The internal listener ends the handshake of a client without a certificate...
    let internal = format!("https://{}", cluster.id(1));
    let anonymous = shoal_tls::http_client().build().unwrap();
    assert!(anonymous.get(format!("{internal}/shoal/internal/v1/health")).send().await.is_err());
    // ...lets a node's certificate through the handshake, but the API still wants an origin.
    let agent = client_as("node-z", Role::Agent);
    let resp = agent.get(format!("{internal}/shoal/internal/v1/health")).send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::UNAUTHORIZED);
    let resp = origin.get(format!("{internal}/shoal/internal/v1/health")).send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
}
