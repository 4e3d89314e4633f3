//! The swarm's I/O side with hand-made connection events: announces, connections that
//! claim a connected peer's id, and pieces that ban their address.

use super::*;
use crate::bitfield::Bitfield;
use crate::metainfo::Metainfo;
use shoal_registry::Algorithm;

struct NoFallback;

#[async_trait]
impl Fallback for NoFallback {
    async fn fetch(&self, _offset: u64, _len: u64) -> Result<Bytes, String> {
        Err("no fallback in this test".into())
    }
}

/// A download of a 3 MiB blob holding nothing, with no tracker to reach.
fn swarm(dir: &tempfile::TempDir) -> Swarm {
    let seed = dir.path().join("seed");
    std::fs::write(&seed, vec![3u8; 3 << 20]).unwrap();
    let meta = Arc::new(Metainfo::compute_file(&seed, Algorithm::Sha256).unwrap());
    let pieces = Arc::new(BlobPieces::partial(&dir.path().join("want"), meta.clone()).unwrap());
    let cfg = SwarmConfig::new(PeerId::random(), "127.0.0.1:1".parse().unwrap());
    let tracker = Arc::new(TrackerClient::new(Vec::new(), Duration::from_secs(1)).unwrap());
    let deps = SwarmDeps {
        announcer: Announcer::spawn(tracker.clone()),
        tracker,
        ingress: Arc::new(RateLimiter::unlimited()),
        metrics: SwarmMetrics::unregistered(),
        node: NodeFlow::new(16),
    };
    let state = SwarmState::new(
        cfg.scheduler.clone(),
        cfg.peer_id,
        cfg.advertise,
        &meta,
        pieces.have(),
        Instant::now(),
    )
    .unwrap();
    let (events_tx, _) = mpsc::channel(16);
    Swarm {
        cfg,
        deps,
        pieces,
        fallback: Arc::new(NoFallback),
        state,
        peers: HashMap::new(),
        events_tx,
        pending_announce: None,
    }
}

/// One announce is scheduled at a time: a new one cancels the sleeping one (the download's
/// end cancels the last, so no "incomplete" follows its final announce).
#[tokio::test]
async fn a_scheduled_announce_is_cancelled_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = swarm(&dir);
    s.announce(Duration::from_secs(3600));
    let first = s.pending_announce.clone().expect("scheduled");
    s.announce(Duration::from_secs(3600));
    tokio::task::yield_now().await;
    assert!(first.is_finished(), "the first scheduled announce still sleeps");
    let second = s.pending_announce.take().expect("scheduled");
    assert!(!second.is_finished());
    second.abort();
}

fn connected(s: &Swarm, peer: PeerId, conn: ConnId, port: u16) -> (Event, mpsc::Receiver<Command>) {
    let (commands, rx) = mpsc::channel(4);
    let event = ConnEvent::Connected {
        peer,
        conn,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        bitfield: Bitfield::full(s.pieces.metainfo().piece_count()),
        commands,
        received: Arc::new(AtomicU64::new(0)),
        piece_bytes: Arc::new(AtomicU64::new(0)),
    };
    (Event::Conn(event), rx)
}

#[tokio::test]
async fn a_second_connection_claiming_a_connected_peers_id_neither_speaks_for_nor_closes_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = swarm(&dir);
    let now = Instant::now();
    let (p, first, second) = (PeerId::random(), ConnId::next(), ConnId::next());
    let (event, mut real) = connected(&s, p, first, 4001);
    s.handle(event, now).unwrap();
    // An impostor (or the same peer dialled at a second address) is refused as a duplicate:
    // its command sender is dropped, and its task reports what it read, then its close.
    let (event, mut refused) = connected(&s, p, second, 4002);
    s.handle(event, now).unwrap();
    assert!(refused.recv().await.is_none(), "the duplicate is closed");
    s.handle(Event::Conn(ConnEvent::Have { peer: p, conn: second, index: 0 }), now).unwrap();
    s.handle(Event::Conn(ConnEvent::Closed { peer: p, conn: second, reason: "refused".into() }), now)
        .unwrap();
    assert_eq!(s.state.peer_count(), 1, "the connected peer is still there");
    assert!(s.peers.contains_key(&p));
    assert!(
        matches!(real.try_recv(), Err(mpsc::error::TryRecvError::Empty)),
        "the connected peer's connection is still open"
    );
    // Its own close does close it.
    s.handle(Event::Conn(ConnEvent::Closed { peer: p, conn: first, reason: "gone".into() }), now).unwrap();
    assert_eq!(s.state.peer_count(), 0);
    assert!(!s.peers.contains_key(&p));
}

/// A piece of the wrong length (refused from its header) bans its connection's address
/// as a bad piece does, and drops the connection.
#[tokio::test]
async fn a_piece_of_the_wrong_length_bans_its_address() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = swarm(&dir);
    let now = Instant::now();
    let (p, conn) = (PeerId::random(), ConnId::next());
    let (event, _commands) = connected(&s, p, conn, 4001);
    s.handle(event, now).unwrap();
    let actions = s.handle(Event::Conn(ConnEvent::BadPiece { peer: p, conn, index: 0 }), now).unwrap();
    assert!(actions.contains(&Action::Disconnect(p)), "{actions:?}");
    s.act(actions);
    assert!(!s.peers.contains_key(&p), "still connected");
    let full = Bitfield::full(s.pieces.metainfo().piece_count());
    let other = SocketAddr::from(([127, 0, 0, 1], 4002));
    assert!(s.state.connected(PeerId::random(), other, full.clone(), now), "another address is taken");
    let again = s.state.connected(PeerId::random(), SocketAddr::from(([127, 0, 0, 1], 4001)), full, now);
    assert!(!again, "the address is not banned");
}
