//! Membership against fake origins' health endpoints on loopback: members going down and
//! coming back, DNS sources, ids, and the member-list fingerprint GC compares.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hickory_resolver::proto::op::{Message, MessageType};
use hickory_resolver::proto::rr::rdata::SRV;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};

use super::*;

fn config(advertise: &str, members: &[&str]) -> ClusterConfig {
    ClusterConfig {
        advertise: advertise.to_string(),
        members: members.iter().map(|m| m.to_string()).collect(),
        replicas: 2,
        write_quorum: 1,
        secret: None,
        health_interval: Duration::from_millis(50),
        health_timeout: Duration::from_millis(300),
        health_fails: 2,
        health_passes: 3,
        dns_refresh: Duration::from_millis(100),
        call_timeout: Duration::from_secs(2),
        repair_interval: Duration::from_secs(60),
        repair_rate: 1 << 20,
        gc_grace: Duration::from_secs(3600),
        gc_quarantine: Duration::from_secs(60),
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().expect("client")
}

/// A fake origin's health endpoint, switched between passing and failing by `ok`.
struct Fake {
    ok: AtomicBool,
    id: Mutex<String>,
    secret: Option<String>,
    peer: Option<PeerIdentity>,
    hits: AtomicUsize,
    members: Mutex<Option<String>>,
}

async fn health(State(fake): State<Arc<Fake>>, headers: HeaderMap) -> Response {
    fake.hits.fetch_add(1, Ordering::SeqCst);
    if let Some(secret) = &fake.secret {
        let want = format!("Bearer {secret}");
        if headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(want.as_str()) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
    }
    if !fake.ok.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let id = fake.id.lock().expect("id").clone();
    let members = fake.members.lock().expect("members").clone();
    Json(HealthReply {
        id,
        peer: fake.peer.clone(),
        clock: None,
        wall_millis: None,
        disk_full: false,
        members,
        collected: None,
    })
    .into_response()
}

fn fake(id: &str, secret: Option<&str>) -> Arc<Fake> {
    Arc::new(Fake {
        ok: AtomicBool::new(true),
        id: Mutex::new(id.to_string()),
        secret: secret.map(str::to_string),
        peer: Some(PeerIdentity {
            peer_id: format!("peer-{id}"),
            addr: "127.0.0.1:7000".parse().expect("addr"),
        }),
        hits: AtomicUsize::new(0),
        members: Mutex::new(None),
    })
}

fn serve(listener: tokio::net::TcpListener, fake: Arc<Fake>) {
    let app = Router::new().route(HEALTH_PATH, get(health)).with_state(fake);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
}

/// A fake origin on an ephemeral loopback port; returns its id.
async fn spawn_fake(secret: Option<&str>) -> (String, Arc<Fake>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let id = listener.local_addr().expect("addr").to_string();
    let fake = fake(&id, secret);
    serve(listener, fake.clone());
    (id, fake)
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn health_thresholds() {
    let mut h = Health::new();
    assert!(h.up);
    assert!(!h.record(false, 3, 2));
    assert!(!h.record(false, 3, 2));
    assert!(!h.record(true, 3, 2), "a pass resets the fail count");
    assert!(!h.record(false, 3, 2));
    assert!(!h.record(false, 3, 2));
    assert!(h.record(false, 3, 2));
    assert!(!h.up);
    assert!(!h.record(false, 3, 2), "already down");
    assert!(!h.record(true, 3, 2));
    assert!(h.record(true, 3, 2));
    assert!(h.up);
    let mut zero = Health::new();
    assert!(zero.record(false, 0, 0), "thresholds of zero count as one");
}

/// A member that names another member list (or none) disagrees until it names ours.
#[tokio::test]
async fn members_that_name_another_member_list_disagree() {
    let (id, fake) = spawn_fake(None).await;
    let me = "127.0.0.1:1";
    let m = Membership::start(config(me, &[me, &id]), None, client()).await.expect("start");
    eventually("first health reply", || m.peer(&id).is_some()).await;
    assert_eq!(m.disagreeing_member(), Some(id.clone()), "an origin that names no list");
    *fake.members.lock().expect("members") = Some(m.members_fingerprint());
    eventually("the same list", || m.disagreeing_member().is_none()).await;
    let other =
        Membership::start(config(me, &[me, &id, "127.0.0.1:2"]), None, client()).await.expect("start");
    assert_ne!(other.members_fingerprint(), m.members_fingerprint());
    *fake.members.lock().expect("members") = Some(other.members_fingerprint());
    eventually("another list", || m.disagreeing_member() == Some(id.clone())).await;
}

#[tokio::test]
async fn member_goes_down_and_comes_back() {
    let (id, fake) = spawn_fake(None).await;
    let me = "127.0.0.1:1";
    let m = Membership::start(config(me, &[me, &id]), None, client()).await.expect("start");
    assert_eq!(m.me(), me);
    assert_eq!(m.live(), {
        let mut v = vec![id.clone(), me.to_string()];
        v.sort();
        v
    });
    assert_eq!(m.url(&id), Some(format!("http://{id}")));
    assert_eq!(m.url("10.9.9.9:1"), None);
    eventually("first health reply", || m.peer(&id).is_some()).await;
    assert_eq!(m.peer(&id).expect("peer").peer_id, format!("peer-{id}"));

    let mut changes = m.changes();
    let gen0 = *changes.borrow_and_update();
    fake.ok.store(false, Ordering::SeqCst);
    let hits = fake.hits.load(Ordering::SeqCst);
    eventually("member down", || !m.live().contains(&id)).await;
    let failed = fake.hits.load(Ordering::SeqCst) - hits;
    assert!(failed >= 2, "down only after health_fails checks, saw {failed}");
    assert_eq!(m.live(), vec![me.to_string()], "self always live");
    assert_eq!(m.live_count(), 1);
    assert!(changes.has_changed().expect("sender alive"));
    let gen1 = *changes.borrow_and_update();
    assert!(gen1 > gen0);
    let info = m.members();
    assert_eq!(info.len(), 2);
    assert!(info.iter().any(|i| i.id == id && !i.up));
    assert!(info.iter().any(|i| i.id == me && i.up));

    fake.ok.store(true, Ordering::SeqCst);
    let hits = fake.hits.load(Ordering::SeqCst);
    eventually("member up", || m.live().contains(&id)).await;
    let passed = fake.hits.load(Ordering::SeqCst) - hits;
    assert!(passed >= 3, "up only after health_passes checks, saw {passed}");
    assert!(*changes.borrow_and_update() > gen1);
    assert_eq!(m.live_count(), 2);
}

#[tokio::test]
async fn mark_down_counts_as_a_failed_check() {
    let (id, fake) = spawn_fake(None).await;
    let me = "127.0.0.1:1";
    let mut cfg = config(me, &[me, &id]);
    cfg.health_interval = Duration::from_secs(3600);
    let m = Membership::start(cfg, None, client()).await.expect("start");
    let mut changes = m.changes();
    m.mark_down(&id);
    assert!(m.live().contains(&id), "one failure is not enough");
    m.mark_down(&id);
    assert_eq!(m.live(), vec![me.to_string()]);
    assert!(changes.has_changed().expect("alive"));
    changes.borrow_and_update();
    m.mark_down(me);
    m.mark_down("unknown:1");
    assert!(!changes.has_changed().expect("alive"));
    assert_eq!(fake.hits.load(Ordering::SeqCst), 1, "no check ran but the one that admitted it");
}

#[tokio::test]
async fn wrong_secret_fails_the_check() {
    let (good_id, _good) = spawn_fake(Some("s3cret")).await;
    let (bad_id, bad) = spawn_fake(Some("other")).await;
    let me = "127.0.0.1:1";
    let mut cfg = config(me, &[&good_id, &bad_id]);
    cfg.secret = Some("s3cret".to_string());
    let m = Membership::start(cfg, None, client()).await.expect("start");
    eventually("wrong-secret member down", || !m.live().contains(&bad_id)).await;
    assert!(bad.hits.load(Ordering::SeqCst) >= 2);
    assert!(m.live().contains(&good_id));
    assert!(m.live().contains(&me.to_string()), "self is a member even when not listed");

    let unauthenticated = Membership::start(config(me, &[&good_id]), None, client()).await.expect("start");
    eventually("no-secret member down", || !unauthenticated.live().contains(&good_id)).await;
}

#[tokio::test]
async fn ipv6_loopback_member() {
    let listener = match tokio::net::TcpListener::bind("[::1]:0").await {
        Ok(l) => l,
        Err(e) => {
            println!("skipping: cannot bind [::1]: {e}");
            return;
        }
    };
    let port = listener.local_addr().expect("addr").port();
    let id = format!("[::1]:{port}");
    let fake = fake(&id, None);
    serve(listener, fake.clone());
    let me = "127.0.0.1:1";
    let m =
        Membership::start(config(me, &[me, &format!("[0::1]:{port}")]), None, client()).await.expect("start");
    assert_eq!(m.url(&id), Some(format!("http://[::1]:{port}")));
    eventually("ipv6 health reply", || m.peer(&id).is_some()).await;
    fake.ok.store(false, Ordering::SeqCst);
    eventually("ipv6 member down", || !m.live().contains(&id)).await;
    fake.ok.store(true, Ordering::SeqCst);
    eventually("ipv6 member up", || m.live().contains(&id)).await;
}

#[tokio::test]
async fn dns_name_resolves_to_loopback_members() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let v4 = format!("127.0.0.1:{port}");
    serve(listener, fake(&v4, None));
    let me = "origin-0.test:5000";
    let m = Membership::start(config(me, &[&format!("dns+localhost:{port}")]), None, client())
        .await
        .expect("start");
    let ids: Vec<String> = m.members().into_iter().map(|i| i.id).collect();
    assert!(ids.contains(&v4), "{ids:?}");
    let v6 = format!("[::1]:{port}");
    for id in &ids {
        assert!(*id == v4 || *id == v6 || id == me, "unexpected member {id}");
    }
    assert_eq!(m.me(), me);
    assert!(m.live().contains(&me.to_string()));
    eventually("v4 member checked", || m.peer(&v4).is_some()).await;
    assert!(m.live().contains(&v4));
}

#[tokio::test]
async fn self_under_another_name_is_dropped() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let me = "origin-0.test:5000";
    let fake = fake(me, None);
    serve(listener, fake.clone());
    let v4 = format!("127.0.0.1:{port}");
    let m = Membership::start(config(me, &[&format!("dns+localhost:{port}")]), None, client())
        .await
        .expect("start");
    assert!(!m.live().contains(&v4), "this origin under another name counted at start");
    assert!(m.members().iter().all(|i| i.id != v4));
    let hits = fake.hits.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.hits.load(Ordering::SeqCst), hits, "this origin is not checked");
}

/// This origin's own address among the entries (its pod IP from a `dns+` name), at start,
/// before its listener answers: not a member, though its check failed. Before, an entry whose
/// first check failed joined up, and for a health interval this origin counted itself twice.
/// Only until it answers: another origin on this host with the same port (127.0.0.3 here)
/// that was not up yet at start is a member once it answers.
#[tokio::test]
async fn this_origins_own_address_is_not_a_member_before_it_answers() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let me = format!("origin-0.test:{port}");
    let (own, neighbour) = (format!("127.0.0.2:{port}"), format!("127.0.0.3:{port}"));
    let (other, _fake) = spawn_fake(None).await;
    let m = Membership::start(config(&me, &[&own, &neighbour, &other]), None, client()).await.expect("start");
    assert!(!m.live().contains(&own), "this origin counted twice");
    assert!(m.members().iter().all(|i| i.id != own));
    assert!(m.live().contains(&other), "another member is live");
    let Ok(listener) = tokio::net::TcpListener::bind(("127.0.0.3", port)).await else {
        println!("skipping the neighbour: cannot bind 127.0.0.3:{port}");
        return;
    };
    serve(listener, fake(&neighbour, None));
    eventually("the neighbour answers and counts", || m.live().contains(&neighbour)).await;
    assert!(!m.live().contains(&own));
}

/// One origin under two addresses (the A and AAAA records of one `dns+` name; here two
/// loopback addresses) answers both with its own id: it is one member, so every origin names
/// the same member list (GC compares them, and waited forever before) and places alike.
#[tokio::test]
async fn another_member_under_a_second_address_is_counted_once() {
    let first = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = first.local_addr().expect("addr").port();
    let Ok(second) = tokio::net::TcpListener::bind(("127.0.0.2", port)).await else {
        println!("skipping: cannot bind 127.0.0.2:{port}");
        return;
    };
    let (id, alias) = (format!("127.0.0.1:{port}"), format!("127.0.0.2:{port}"));
    let fake = fake(&id, None);
    serve(first, fake.clone());
    serve(second, fake.clone());
    let me = "127.0.0.1:1";
    let m = Membership::start(config(me, &[me, &id, &alias]), None, client()).await.expect("start");
    // Entries join once checked: the alias is never counted, not even before a round of checks.
    assert_eq!(m.live(), vec![me.to_string(), id.clone()], "counted at start");
    eventually("the second address known as the first", || {
        !m.live().contains(&alias) && m.peer(&id).is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(m.live(), vec![me.to_string(), id.clone()]);
    let ids: Vec<String> = m.members().into_iter().map(|i| i.id).collect();
    assert_eq!(ids, vec![me.to_string(), id.clone()]);
    // The other origin names the same list: the two agree.
    let other = Membership::start(config(&id, &[&id, me]), None, client()).await.expect("start");
    *fake.members.lock().expect("members") = Some(other.members_fingerprint());
    assert_eq!(other.members_fingerprint(), m.members_fingerprint());
    eventually("agreement", || m.disagreeing_member().is_none()).await;
}

/// An entry a DNS name gives takes no writes before it has answered once: it may be a second
/// address of another member, not listening yet (the A and AAAA records of a pod that just
/// started), and counted as two owners both would be the same machine. Once it answers it
/// does; a member named outright is trusted at once, as before.
#[tokio::test]
async fn a_dns_entry_takes_writes_only_once_it_answered() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let v4 = format!("127.0.0.1:{port}");
    let (fixed, fixed_fake) = spawn_fake(None).await;
    fixed_fake.ok.store(false, Ordering::SeqCst);
    let me = "origin-0.test:5000";
    let m = Membership::start(config(me, &[&format!("dns+localhost:{port}"), &fixed]), None, client())
        .await
        .expect("start");
    assert!(m.live().contains(&v4), "joins up, as before");
    assert!(!m.accepts_writes(&v4), "a DNS entry that never answered took writes");
    assert!(m.accepts_writes(&fixed), "a named member is trusted before it answers");
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    serve(listener, fake(&v4, None));
    eventually("it answers and takes writes", || m.accepts_writes(&v4)).await;
}

/// An entry that answered as another origin not (yet) in the table is that origin's second
/// address as soon as the other joins, not at the next round of checks (for which it was a
/// second owner on the same machine).
#[tokio::test]
async fn an_entry_that_answered_as_a_later_member_is_its_alias_at_once() {
    let first = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = first.local_addr().expect("addr").port();
    let Ok(second) = tokio::net::TcpListener::bind(("127.0.0.2", port)).await else {
        println!("skipping: cannot bind 127.0.0.2:{port}");
        return;
    };
    let (id, alias) = (format!("127.0.0.1:{port}"), format!("127.0.0.2:{port}"));
    let fake = fake(&id, None);
    serve(first, fake.clone());
    serve(second, fake);
    let targets = Arc::new(Mutex::new(vec![("127.0.0.2.".to_string(), port)]));
    let ns = spawn_dns(targets.clone()).await;
    let me = "origin-0.origin.test:5000";
    let mut cfg = config(me, &["srv+_shoal._tcp.origin.test"]);
    cfg.health_interval = Duration::from_secs(3600);
    let m = Membership::start_with_nameserver(cfg, None, client(), Some(ns)).await.expect("start");
    assert!(m.live().contains(&alias), "alone, it counts under the address it has");
    targets.lock().expect("targets").push(("127.0.0.1.".to_string(), port));
    eventually("the origin joins under its own id", || m.live().contains(&id)).await;
    assert!(!m.live().contains(&alias), "its second address still counted");
}

#[tokio::test]
async fn tasks_end_when_membership_is_dropped() {
    let (id, fake) = spawn_fake(None).await;
    let m = Membership::start(config("127.0.0.1:1", &[&id]), None, client()).await.expect("start");
    eventually("checked", || fake.hits.load(Ordering::SeqCst) > 0).await;
    let changes = m.changes();
    drop(m);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let hits = fake.hits.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.hits.load(Ordering::SeqCst), hits, "no checks after drop");
    assert!(changes.has_changed().is_err(), "the watch sender is gone");
}

/// A one-zone DNS server on UDP loopback answering SRV queries with `targets`.
async fn spawn_dns(targets: Arc<Mutex<Vec<(String, u16)>>>) -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
    let addr = socket.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else { return };
            let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
            let mut reply = Message::new();
            reply
                .set_id(query.id())
                .set_message_type(MessageType::Response)
                .set_op_code(query.op_code())
                .set_recursion_desired(query.recursion_desired())
                .set_recursion_available(true)
                .set_authoritative(true);
            for q in query.queries() {
                reply.add_query(q.clone());
                if q.query_type() != RecordType::SRV {
                    continue;
                }
                for (target, port) in targets.lock().expect("targets").iter() {
                    let target = Name::from_ascii(target).expect("name");
                    let srv = SRV::new(10, 10, *port, target);
                    reply.add_answer(Record::from_rdata(q.name().clone(), 0, RData::SRV(srv)));
                }
            }
            let Ok(bytes) = reply.to_vec() else { continue };
            let _ = socket.send_to(&bytes, from).await;
        }
    });
    addr
}

#[tokio::test]
async fn srv_records_become_members_and_leave_on_refresh() {
    let targets = Arc::new(Mutex::new(vec![
        ("origin-0.origin.test.".to_string(), 5000),
        ("Origin-1.origin.test.".to_string(), 5001),
    ]));
    let ns = spawn_dns(targets.clone()).await;
    let me = "origin-0.origin.test:5000";
    let mut cfg = config(me, &["srv+_shoal._tcp.origin.test"]);
    cfg.health_interval = Duration::from_secs(3600);
    let m = Membership::start_with_nameserver(cfg, None, client(), Some(ns)).await.expect("start");
    let ids: Vec<String> = m.members().into_iter().map(|i| i.id).collect();
    assert_eq!(ids, vec![me.to_string(), "origin-1.origin.test:5001".to_string()]);
    assert_eq!(m.live(), ids);
    let local = crate::cluster::remote::RemoteNode::new(me.into(), url_of(me), None, Duration::from_secs(1))
        .expect("client");
    use crate::cluster::topology::{MemberTopology, Topology};
    let topology = MemberTopology::new(m.clone(), Arc::new(local), None, Duration::from_secs(1));
    assert!(topology.node("origin-1.origin.test:5001").is_some());
    assert_eq!(topology.clients(), vec!["origin-1.origin.test:5001".to_string()]);

    let mut changes = m.changes();
    changes.borrow_and_update();
    targets.lock().expect("targets").push(("origin-2.origin.test".to_string(), 5000));
    targets.lock().expect("targets").retain(|(t, _)| !t.starts_with("Origin-1"));
    eventually("refresh", || m.live().contains(&"origin-2.origin.test:5000".to_string())).await;
    assert!(changes.has_changed().expect("alive"));
    assert_eq!(m.live(), vec![me.to_string(), "origin-2.origin.test:5000".to_string()]);
    assert_eq!(m.url("origin-1.origin.test:5001"), None);
    // The departed member's client goes with it.
    assert!(topology.node("origin-1.origin.test:5001").is_none());
    assert!(topology.node("origin-2.origin.test:5000").is_some());
    assert_eq!(topology.clients(), vec!["origin-2.origin.test:5000".to_string()]);
}
