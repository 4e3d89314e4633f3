//! A node's announces in batches, against the real tracker router on loopback: answered in
//! order, refused one by one, coalesced by the node's queue, failed over between trackers,
//! and sent one by one to a tracker from before batches.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use prometheus::Registry;
use shoal_p2p::announcer::Announcer;
use shoal_p2p::tracker_client::{AnnounceRequest, TrackerClient, MAX_ANNOUNCE_BATCH};
use shoal_p2p::PeerId;
use shoal_registry::{Algorithm, Digest};
use shoal_tracker::{router, TrackerConfig};

/// A loopback address nothing listens on.
fn closed_port() -> String {
    // Bound but not listening, and kept for the test process's life: a connection is refused
    // at once, and no other test's listener (tests run in parallel) can be given the port, as
    // it could one bound and dropped (a "dead" tracker then answered another test's announces).
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(([127, 0, 0, 1], 0).into()).expect("bind");
    let addr = socket.local_addr().expect("addr");
    std::mem::forget(socket);
    format!("http://{addr}")
}

/// A real tracker on an ephemeral loopback port; `old` makes it answer `/v1/announces` with
/// 404, as a tracker from before batches does. Its origin is down (the seeders it would add
/// to a handout are not what these tests are about).
async fn tracker(old: bool) -> (String, Registry) {
    tracker_with(old, TrackerConfig::default()).await
}

/// [`tracker`] with `config` (its origins replaced by a closed port).
async fn tracker_with(old: bool, config: TrackerConfig) -> (String, Registry) {
    tracker_of(old, TrackerConfig { origins: vec![closed_port()], ..config }).await
}

/// A real tracker with `config` as it is.
async fn tracker_of(old: bool, config: TrackerConfig) -> (String, Registry) {
    let registry = Registry::new();
    let mut app = router(config, &registry).expect("router");
    if old {
        app = app.layer(middleware::from_fn(|req: Request, next: Next| async move {
            if req.uri().path() == "/v1/announces" {
                return StatusCode::NOT_FOUND.into_response();
            }
            next.run(req).await
        }));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await;
    });
    (url, registry)
}

fn counter(registry: &Registry, name: &str, label: Option<&str>) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().to_vec())
        .filter(|m| label.is_none_or(|l| m.get_label().iter().any(|p| p.value() == l)))
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

fn digest(i: usize) -> Digest {
    Digest::of(Algorithm::Sha256, format!("blob {i}").as_bytes())
}

fn req(i: usize, peer: PeerId, port: u16, complete: bool) -> AnnounceRequest {
    AnnounceRequest {
        digest: digest(i),
        peer_id: peer.to_string(),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        complete,
        stopped: false,
    }
}

fn client(urls: Vec<String>) -> Arc<TrackerClient> {
    Arc::new(TrackerClient::new(urls, Duration::from_secs(5)).expect("client"))
}

#[tokio::test]
async fn a_batch_is_answered_in_order_and_a_refused_announce_fails_alone() {
    let (url, registry) = tracker(false).await;
    let tracker = client(vec![url]);
    let (me, other) = (PeerId::random(), PeerId::random());
    // Another node seeds every even blob.
    let seeds: Vec<AnnounceRequest> = (0..300).step_by(2).map(|i| req(i, other, 7001, true)).collect();
    assert!(tracker.announce_many(&seeds).await.iter().all(|r| r.is_ok()));
    // This node downloads blobs 0..150 and seeds 150..300, in one call; one announce is bad.
    let mut mine: Vec<AnnounceRequest> = (0..300).map(|i| req(i, me, 7002, i >= 150)).collect();
    mine[7].peer_id = "not a peer id".into();
    let results = tracker.announce_many(&mine).await;
    assert_eq!(results.len(), 300);
    for (i, result) in results.iter().enumerate() {
        if i == 7 {
            assert!(result.is_err(), "the bad announce is refused");
            continue;
        }
        let peers = &result.as_ref().expect("announced").peers;
        let seeded_by_other = i % 2 == 0;
        if i < 150 && seeded_by_other {
            assert_eq!(peers.len(), 1, "blob {i}: the download is handed the seeder");
            assert_eq!(peers[0].peer_id, other.to_string());
        } else {
            assert!(peers.is_empty(), "blob {i}: no peers for a seeder, nor where nobody else is");
        }
    }
    // 150 + 300 announces in 1 + 2 requests (at most 256 per batch).
    assert_eq!(MAX_ANNOUNCE_BATCH, 256);
    assert_eq!(counter(&registry, "shoal_tracker_announce_batches_total", None), 3);
    assert_eq!(counter(&registry, "shoal_tracker_announces_total", Some("ok")), 449);
    assert_eq!(counter(&registry, "shoal_tracker_announces_total", Some("invalid")), 1);
}

/// An announcer that took another node's peer id first (ids are in every handout) does not
/// lock that node out: its announce is not recorded (the entry is the squatter's until it
/// expires) but it is handed the peers. Before, it got 403 and failed over to another
/// tracker or fetched the blob over HTTP, for as long as the squatter refreshed.
#[tokio::test]
async fn a_squatted_peer_id_still_gets_its_peers() {
    let (url, registry) = tracker(false).await;
    let tracker = client(vec![url.clone()]);
    let (victim, seeder) = (PeerId::random(), PeerId::random());
    assert!(tracker.announce_many(&[req(0, seeder, 7001, true)]).await[0].is_ok());
    let squatter = reqwest::Client::builder()
        .no_proxy()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .expect("client");
    let body = serde_json::to_vec(&req(0, victim, 6666, true)).expect("json");
    let squat = squatter
        .post(format!("{url}/v1/announce"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    let Ok(squat) = squat else {
        println!("skipping: cannot send from 127.0.0.2");
        return;
    };
    assert!(squat.status().is_success(), "{}", squat.status());
    let answered = tracker.announce_many(&[req(0, victim, 7002, false)]).await;
    let peers = &answered[0].as_ref().expect("the victim is answered").peers;
    assert!(peers.iter().any(|p| p.peer_id == seeder.to_string()), "{peers:?}");
    assert_eq!(counter(&registry, "shoal_tracker_announces_total", Some("refused")), 1);
}

/// One announcer that filled a digest's swarm with made-up complete peers (20,000, the most
/// a digest keeps) does not leave an honest downloader with nothing: it is handed peers, not
/// refused with 503 (it then fetched the whole blob from the origins over HTTP). It is not
/// listed (there is no room), which the metrics count as `full`.
#[tokio::test]
async fn a_full_swarm_still_hands_out_peers() {
    let config = TrackerConfig { max_entries_per_announcer: 30_000, ..TrackerConfig::default() };
    let (url, registry) = tracker_with(false, config).await;
    let tracker = client(vec![url]);
    let made_up: Vec<AnnounceRequest> = (0..shoal_tracker::peers::DEFAULT_MAX_PEERS_PER_DIGEST)
        .map(|i| req(0, PeerId::random(), 1000 + (i % 60_000) as u16, true))
        .collect();
    assert!(tracker.announce_many(&made_up).await.iter().all(|r| r.is_ok()));
    let honest =
        tracker.announce(&req(0, PeerId::random(), 7002, false)).await.expect("handed peers, not refused");
    assert!(!honest.peers.is_empty(), "no peers for a downloader of a full swarm");
    assert_eq!(counter(&registry, "shoal_tracker_announces_total", Some("full")), 1);
}

/// An origin that answers every request 404 and counts them: its URL and the count.
async fn counting_origin() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let origin = axum::Router::new().fallback(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { StatusCode::NOT_FOUND }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let origin_url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, origin).await });
    (origin_url, calls)
}

/// A tracker full of digests still hands a downloader of a digest it does not know the
/// origins' seeders, asking the origins about such digests at a bounded rate: those
/// announces are not listed, so no quota charges them, and each asked of an origin would
/// let anyone make the origins answer without end.
#[tokio::test]
async fn a_full_tracker_asks_the_origins_about_new_digests_at_a_bounded_rate() {
    let (origin_url, calls) = counting_origin().await;
    let config = TrackerConfig { origins: vec![origin_url], max_digests: 10, ..TrackerConfig::default() };
    let (url, registry) = tracker_of(false, config).await;
    let tracker = client(vec![url]);
    let seeds: Vec<AnnounceRequest> = (0..10).map(|i| req(i, PeerId::random(), 7001, true)).collect();
    assert!(tracker.announce_many(&seeds).await.iter().all(|r| r.is_ok()));
    let started = std::time::Instant::now();
    let downloads: Vec<AnnounceRequest> = (100..300).map(|i| req(i, PeerId::random(), 7002, false)).collect();
    for result in tracker.announce_many(&downloads).await {
        assert!(result.expect("handed peers, not refused").peers.is_empty());
    }
    assert_eq!(counter(&registry, "shoal_tracker_announces_total", Some("full")), 200);
    let allowed =
        (started.elapsed().as_millis() / shoal_tracker::api::FULL_LOOKUP_EVERY.as_millis()) as usize + 1;
    let asked = calls.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        asked >= 1 && asked <= allowed,
        "{asked} origin calls for 200 announces in {:?}",
        started.elapsed()
    );
    // A digest it tracks is handed out as always (seeders asked of the origins).
    let known = tracker.announce(&req(0, PeerId::random(), 7003, false)).await.expect("announced");
    assert_eq!(known.peers.len(), 1);
}

#[tokio::test]
async fn announces_that_meet_in_the_queue_share_a_request() {
    let (url, registry) = tracker(false).await;
    let announcer = Announcer::spawn(client(vec![url]));
    let me = PeerId::random();
    let downloads: Vec<_> = (0..100)
        .map(|i| {
            let announcer = announcer.clone();
            tokio::spawn(async move { announcer.announce(req(i, me, 7003, false)).await })
        })
        .collect();
    for d in downloads {
        assert!(d.await.expect("task").is_ok());
    }
    let batches = counter(&registry, "shoal_tracker_announce_batches_total", None);
    assert!((1..=5).contains(&batches), "100 announces in {batches} requests");
    assert_eq!(counter(&registry, "shoal_tracker_announces_total", Some("ok")), 100);
    // An announce alone goes out at once.
    tokio::time::timeout(Duration::from_secs(2), announcer.announce(req(100, me, 7003, false)))
        .await
        .expect("not held back")
        .expect("announced");
}

#[tokio::test]
async fn a_dead_tracker_is_failed_over_and_an_old_one_is_sent_announces_one_by_one() {
    let (old, registry) = tracker(true).await;
    let dead = closed_port();
    let tracker = client(vec![old.clone(), dead.clone()]);
    let mine: Vec<AnnounceRequest> = (0..40).map(|i| req(i, PeerId::random(), 7004, false)).collect();
    let firsts: Vec<String> = mine.iter().map(|r| tracker.order_for(&r.digest)[0].clone()).collect();
    assert!(firsts.contains(&dead) && firsts.contains(&old), "both trackers lead for some blobs");
    let results = tracker.announce_many(&mine).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(counter(&registry, "shoal_tracker_announce_batches_total", None), 0);
    assert_eq!(counter(&registry, "shoal_tracker_announces_total", Some("ok")), 40);
    // With no tracker alive, each announce fails with the last error.
    let none = client(vec![dead]);
    let results = none.announce_many(&mine[..3]).await;
    assert!(results.iter().all(|r| r.is_err()));
}

/// A caller the tracker refuses (it requires a node certificate; none here) is answered from
/// the request's head, while its body has not come (before, the body was read first: any host
/// could have the tracker hold its slow announce bodies); and a body larger than any batch is
/// refused with 413 (axum's 2 MiB default was 30 times a full batch).
#[tokio::test]
async fn refusals_come_before_the_body_and_bodies_are_bounded() {
    use tokio::io::AsyncWriteExt;
    let (url, _) =
        tracker_with(false, TrackerConfig { require_node_identity: true, ..Default::default() }).await;
    let addr = url.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // The head and a first part of a body that never ends.
    let head = format!(
        "POST /v1/announces HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&[b' '; 64 * 1024]).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(2), async {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1024];
        let n = conn.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    })
    .await
    .expect("an answer before the body's end");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");

    let (url, _) = tracker(false).await;
    let mut body = vec![b' '; 1 << 20];
    body.extend_from_slice(br#"{"announces":[]}"#);
    let r = reqwest::Client::new().post(format!("{url}/v1/announces")).body(body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

/// One announcer alternating batches of new digests and their stops (charged nothing: a stop
/// frees its entry at once) makes the origins answer at most a burst and then a rate of
/// seeder lookups, not one per digest without end.
#[tokio::test]
async fn new_digests_and_their_stops_cost_the_origins_a_bounded_rate_of_lookups() {
    let (origin_url, calls) = counting_origin().await;
    let config = TrackerConfig { origins: vec![origin_url], ..TrackerConfig::default() };
    let (url, _) = tracker_of(false, config).await;
    let tracker = client(vec![url]);
    let started = std::time::Instant::now();
    let rounds = 6;
    for round in 0..rounds {
        let batch: Vec<AnnounceRequest> = (0..MAX_ANNOUNCE_BATCH)
            .map(|i| req(10_000 * (round + 1) + i, PeerId::random(), 7002, false))
            .collect();
        for result in tracker.announce_many(&batch).await {
            result.expect("handed peers, not refused");
        }
        let stops: Vec<AnnounceRequest> =
            batch.into_iter().map(|r| AnnounceRequest { stopped: true, ..r }).collect();
        for result in tracker.announce_many(&stops).await {
            result.expect("a stop is taken");
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let full_every = shoal_tracker::api::FULL_LOOKUP_EVERY.as_secs_f64();
    let allowed = shoal_tracker::lookups::LOOKUP_BURST
        + secs * shoal_tracker::lookups::LOOKUPS_PER_SEC
        + secs / full_every
        + 2.0;
    let asked = calls.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (asked as f64) <= allowed,
        "{asked} origin calls for {} new digests in {secs:.2} s (allowed {allowed:.0})",
        rounds * MAX_ANNOUNCE_BATCH
    );
    assert!(asked >= shoal_tracker::lookups::LOOKUP_BURST as usize, "the burst was asked: {asked}");
}
