//! The peer server over real TCP: the per-blob cap, an origin's send slots, an agent's
//! per-piece sends and its egress limit, each against a real downloader's handshake or raw
//! frames.

use futures_util::SinkExt;
use shoal_registry::Algorithm;
use tokio::task::JoinHandle;

use super::*;
use crate::conn::{self, ConnEvent};
use crate::metainfo::Metainfo;

struct OneBlob(Arc<BlobPieces>);

#[async_trait]
impl PieceLookup for OneBlob {
    async fn lookup(&self, digest: &Digest) -> Option<Arc<BlobPieces>> {
        (digest == self.0.metainfo().digest()).then(|| self.0.clone())
    }
}

/// A 3 MiB blob held complete in `dir`.
fn seeded(dir: &tempfile::TempDir) -> (Arc<Metainfo>, Arc<BlobPieces>) {
    let seed = dir.path().join("seed");
    std::fs::write(&seed, vec![7u8; 3 << 20]).unwrap();
    let meta = Arc::new(Metainfo::compute_file(&seed, Algorithm::Sha256).unwrap());
    let pieces = Arc::new(BlobPieces::complete(&seed, meta.clone()).unwrap());
    (meta, pieces)
}

/// A server of `pieces` with no limits but its connection counts; tests set the one they test.
fn server_of(pieces: Arc<BlobPieces>) -> PeerServer {
    PeerServer {
        peer_id: PeerId::random(),
        lookup: Arc::new(OneBlob(pieces)),
        egress: Arc::new(RateLimiter::unlimited()),
        metrics: SwarmMetrics::unregistered(),
        max_connections: 16,
        max_connections_per_address: 16,
        max_peers_per_blob: None,
        upload_slots: None,
        piece_sends: None,
        super_seed: None,
        pace: false,
    }
}

/// Serve on a loopback port: its address, and the task to abort.
async fn start(server: PeerServer) -> (std::net::SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, tokio::spawn(Arc::new(server).serve(listener)))
}

/// Connect a downloader of `want` to `addr`; its first event.
async fn dial(addr: std::net::SocketAddr, want: &Arc<BlobPieces>) -> ConnEvent {
    let (tx, mut rx) = mpsc::channel(16);
    conn::spawn_test_download(addr, want.clone(), tx);
    rx.recv().await.expect("the connection reports how it started")
}

type RawPeer = tokio_util::codec::Framed<TcpStream, PeerCodec>;

/// A downloader of `meta`'s blob holding nothing, handshaken with the server at `addr`.
async fn raw_peer(addr: std::net::SocketAddr, meta: &Metainfo) -> RawPeer {
    raw_peer_on(TcpStream::connect(addr).await.unwrap(), meta).await
}

/// [`raw_peer`] on a connected `stream`.
async fn raw_peer_on(stream: TcpStream, meta: &Metainfo) -> RawPeer {
    let mut framed = tokio_util::codec::Framed::new(stream, PeerCodec::default());
    let hello = Message::Handshake {
        version: PROTOCOL_VERSION,
        digest: meta.digest().clone(),
        peer_id: PeerId::random(),
        bitfield: Bitfield::new(meta.piece_count()).to_bytes().into(),
    };
    framed.send(hello).await.unwrap();
    let reply = framed.next().await.unwrap().unwrap();
    assert!(matches!(reply, Message::Handshake { .. }), "{reply:?}");
    framed
}

/// What `peer` hears until `end`: keep-alives counted, pieces by index; anything else fails.
async fn hear_until(peer: &mut RawPeer, end: tokio::time::Instant) -> (usize, Vec<u32>) {
    let (mut keep_alives, mut pieces) = (0, Vec::new());
    while let Ok(next) = tokio::time::timeout_at(end, peer.next()).await {
        match next {
            Some(Ok(Message::KeepAlive)) => keep_alives += 1,
            Some(Ok(Message::Piece { index, .. })) => pieces.push(index),
            other => panic!("unexpected {other:?}"),
        }
    }
    (keep_alives, pieces)
}

#[tokio::test]
async fn requests_wait_their_turn_for_a_send_slot_hearing_keep_alives_and_are_served_in_arrival_order() {
    let dir = tempfile::tempdir().unwrap();
    let (meta, seeded) = seeded(&dir);
    let slots = Arc::new(Semaphore::new(1));
    let (addr, serving) = start(PeerServer { upload_slots: Some(slots.clone()), ..server_of(seeded) }).await;

    // The test holds the only slot, so both downloaders wait in line: `first` asks first.
    let held = slots.clone().acquire_owned().await.unwrap();
    let (mut first, mut second) = (raw_peer(addr, &meta).await, raw_peer(addr, &meta).await);
    first.send(Message::Request { index: 0 }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    second.send(Message::Request { index: 1 }).await.unwrap();

    // While they wait, the downloaders hear a keep-alive every `TURN_REMINDER`, no piece.
    let waited = TURN_REMINDER * 7 / 2;
    let (heard, got) = hear_until(&mut second, tokio::time::Instant::now() + waited).await;
    assert!(got.is_empty(), "waiting for a slot, the second downloader got pieces {got:?}");
    assert!(heard >= 2, "{heard} keep-alives in {waited:?} of waiting");
    let (heard, got) = hear_until(&mut first, tokio::time::Instant::now() + Duration::from_millis(10)).await;
    assert!(got.is_empty(), "waiting for a slot, the first downloader got pieces {got:?}");
    assert!(heard >= 2, "{heard} keep-alives in {waited:?} of waiting");

    // The slot comes free: the downloaders get their pieces in the order they asked, one
    // slot between them.
    let (tx, mut order) = mpsc::unbounded_channel();
    for (name, mut peer) in [("first", first), ("second", second)] {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = peer.next().await {
                if let Message::Piece { index, .. } = m {
                    let _ = tx.send((name, index));
                    return;
                }
            }
        });
    }
    drop(held);
    let a = tokio::time::timeout(Duration::from_secs(5), order.recv()).await.unwrap().unwrap();
    let b = tokio::time::timeout(Duration::from_secs(5), order.recv()).await.unwrap().unwrap();
    assert_eq!((a.0, a.1, b.0, b.1), ("first", 0, "second", 1));
    serving.abort();
}

#[tokio::test]
async fn a_request_waiting_for_the_egress_limit_hears_keep_alives() {
    let dir = tempfile::tempdir().unwrap();
    let (meta, seeded) = seeded(&dir);
    let len = meta.piece_len(0).unwrap();
    // The burst sends the first piece at once; the second waits 3 s for its tokens.
    let egress = Arc::new(RateLimiter::new(Some(len / 3), len));
    let (addr, serving) = start(PeerServer { egress, ..server_of(seeded) }).await;
    let mut peer = raw_peer(addr, &meta).await;
    peer.send(Message::Request { index: 0 }).await.unwrap();
    peer.send(Message::Request { index: 1 }).await.unwrap();
    let (_, got) = hear_until(&mut peer, tokio::time::Instant::now() + Duration::from_millis(500)).await;
    assert_eq!(got, vec![0]);
    // Silent for 3 s, the requester would stall the request or take the silence for incast.
    let (heard, got) = hear_until(&mut peer, tokio::time::Instant::now() + Duration::from_secs(5)).await;
    assert_eq!(got, vec![1]);
    assert!(heard >= 2, "{heard} keep-alives in a 3 s wait for the egress limit");
    serving.abort();
}

#[tokio::test]
async fn a_piece_at_its_limit_of_sends_waits_with_keep_alives_while_other_pieces_go() {
    let dir = tempfile::tempdir().unwrap();
    let (meta, seeded) = seeded(&dir);
    let gate = PieceSendGate::new(1);
    let (addr, serving) = start(PeerServer { piece_sends: Some(gate.clone()), ..server_of(seeded) }).await;

    // Piece 0 is being sent to someone else (the test holds its only send).
    let (_, held) = gate.take_first(meta.digest(), &[0]).unwrap();
    let mut peer = raw_peer(addr, &meta).await;
    peer.send(Message::Request { index: 0 }).await.unwrap();
    peer.send(Message::Request { index: 1 }).await.unwrap();
    // Piece 1 is not held up behind piece 0; piece 0 waits, with keep-alives.
    let waited = TURN_REMINDER * 7 / 2;
    let (keep_alives, got) = hear_until(&mut peer, tokio::time::Instant::now() + waited).await;
    assert_eq!(got, vec![1], "piece 1 should go at once and piece 0 wait for its send");
    assert!(keep_alives >= 2, "{keep_alives} keep-alives in {waited:?} of waiting");
    // The other send ends: piece 0 comes.
    drop(held);
    let piece = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match peer.next().await {
                Some(Ok(Message::Piece { index, .. })) => return index,
                Some(Ok(Message::KeepAlive)) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("a freed send was never taken");
    assert_eq!(piece, 0);
    serving.abort();
}

#[tokio::test]
async fn a_blob_serves_at_most_its_cap_of_peers_and_frees_a_place_when_one_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let (meta, seeded) = seeded(&dir);
    let wanted = Arc::new(BlobPieces::partial(&dir.path().join("want"), meta).unwrap());
    let metrics = SwarmMetrics::unregistered();
    let (addr, serving) =
        start(PeerServer { metrics: metrics.clone(), max_peers_per_blob: Some(2), ..server_of(seeded) })
            .await;

    let first = dial(addr, &wanted).await;
    let second = dial(addr, &wanted).await;
    assert!(matches!(first, ConnEvent::Connected { .. }), "{first:?}");
    assert!(matches!(second, ConnEvent::Connected { .. }), "{second:?}");
    match dial(addr, &wanted).await {
        ConnEvent::ConnectFailed { reason, .. } => {
            assert!(reason.contains(&ERROR_BLOB_BUSY.to_string()), "{reason}")
        }
        other => panic!("a third peer of a blob capped at two was let in: {other:?}"),
    }
    assert_eq!(metrics.refused_busy.get(), 1);

    // The first downloader leaves (dropping its commands closes the connection): its
    // place is free again once the server has seen it go.
    drop(first);
    let mut joined = false;
    for _ in 0..50 {
        if let ConnEvent::Connected { .. } = dial(addr, &wanted).await {
            joined = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(joined, "a place freed by a leaving peer was never given to another");
    drop(second);
    serving.abort();
}

/// The next message from the server, which must be a `have`.
async fn next_have(peer: &mut RawPeer) -> u32 {
    match tokio::time::timeout(Duration::from_secs(10), peer.next()).await.unwrap() {
        Some(Ok(Message::Have(index))) => index,
        other => panic!("expected a have: {other:?}"),
    }
}

#[tokio::test]
async fn a_piece_gained_after_a_quiet_spell_is_told_at_once_and_the_next_ones_after_the_batch_time_in_one_write(
) {
    let dir = tempfile::tempdir().unwrap();
    let (meta, seed) = seeded(&dir);
    let growing = Arc::new(BlobPieces::partial(&dir.path().join("growing"), meta.clone()).unwrap());
    let (addr, server) = start(server_of(growing.clone())).await;
    let mut peer = raw_peer(addr, &meta).await;
    let gain = |index: u32| assert!(growing.write_piece(index, &seed.read_piece(index).unwrap()).unwrap());
    // The first piece: told without waiting for a batch.
    let gained = tokio::time::Instant::now();
    gain(0);
    assert_eq!(next_have(&mut peer).await, 0);
    let waited = gained.elapsed();
    // A batch's timer never fires early, so a wait under it means no batch was waited for.
    assert!(waited < HAVE_BATCH, "the first piece was told after {waited:?}");

    // Two more right after: gathered until the batch time since the first has passed.
    let told = tokio::time::Instant::now();
    gain(1);
    gain(2);
    assert_eq!(next_have(&mut peer).await, 1);
    let waited = told.elapsed();
    assert!(waited >= HAVE_BATCH.saturating_sub(Duration::from_millis(20)), "told after {waited:?}");
    // The other came in the same write: already read, decoded without waiting.
    let next = futures_util::FutureExt::now_or_never(peer.next());
    assert!(matches!(next, Some(Some(Ok(Message::Have(2))))), "{next:?}");

    // After a quiet spell, at once again.
    tokio::time::sleep(HAVE_BATCH * 2).await;
    let gained = tokio::time::Instant::now();
    gain(3);
    assert_eq!(next_have(&mut peer).await, 3);
    let waited = gained.elapsed();
    assert!(waited < HAVE_BATCH, "a piece after a quiet spell was told after {waited:?}");
    server.abort();
}

#[tokio::test]
async fn a_piece_just_verified_is_sent_from_memory_and_an_older_one_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (meta, seed) = seeded(&dir);
    let path = dir.path().join("growing");
    let growing = Arc::new(BlobPieces::partial(&path, meta.clone()).unwrap());
    for index in 0..2 {
        let data = seed.read_piece(index).unwrap();
        assert!(growing.write_piece(index, &data).unwrap());
    }
    // Piece 0 was verified just now and kept; piece 1 was not (e.g. resumed from disk).
    growing.keep_verified(0, Bytes::from(seed.read_piece(0).unwrap()));
    // Both pieces' bytes on disk go bad, so where each send came from shows in its bytes.
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        for index in 0..2 {
            let (start, len) = meta.piece_range(index).unwrap();
            file.write_all_at(&vec![0xEE; len as usize], start).unwrap();
        }
    }
    let (addr, server) = start(server_of(growing.clone())).await;
    let mut peer = raw_peer(addr, &meta).await;
    for index in 0..2 {
        peer.send(Message::Request { index }).await.unwrap();
        let sent = loop {
            match tokio::time::timeout(Duration::from_secs(10), peer.next()).await.unwrap() {
                Some(Ok(Message::Piece { index: i, data })) if i == index => break data,
                Some(Ok(Message::Have(_) | Message::KeepAlive)) => continue,
                other => panic!("piece {index}: {other:?}"),
            }
        };
        let from_memory = meta.verify_piece(index, &sent);
        assert_eq!(from_memory, index == 0, "piece {index}: sent from memory: {from_memory}");
    }
    server.abort();
}

#[tokio::test]
async fn a_request_repeated_then_cancelled_leaves_nothing_promised_against_the_egress_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (meta, seeded) = seeded(&dir);
    let len = meta.piece_len(0).unwrap();
    // A piece a second: the limit admits two seconds' worth, two pieces, behind others.
    let egress = Arc::new(RateLimiter::new(Some(len), len));
    // No send slot ever comes free, so the request stays queued until cancelled.
    let slots = Arc::new(Semaphore::new(0));
    let server = PeerServer { egress: egress.clone(), upload_slots: Some(slots), ..server_of(seeded) };
    let (addr, serving) = start(server).await;
    let mut peer = raw_peer(addr, &meta).await;
    for _ in 0..8 {
        peer.send(Message::Request { index: 0 }).await.unwrap();
    }
    peer.send(Message::Cancel(0)).await.unwrap();
    // Once the server has read it all, nothing is promised (the connection stays open, so its
    // end gives nothing back): a request bigger than the whole budget is admitted, as it is
    // only when nothing waits.
    let end = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut admitted = false;
    while !admitted && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
        admitted = egress.admit(3 * len, MAX_EGRESS_WAIT);
    }
    assert!(admitted, "the repeated request kept bytes promised after its cancel");
    drop(peer);
    serving.abort();
}

/// A 16 MiB blob (256 KiB pieces: more than a stalled socket takes) held complete in `dir`.
fn seeded_large(dir: &tempfile::TempDir) -> (Arc<Metainfo>, Arc<BlobPieces>) {
    let seed = dir.path().join("large");
    std::fs::write(&seed, vec![3u8; 16 << 20]).unwrap();
    let meta = Arc::new(Metainfo::compute_file(&seed, Algorithm::Sha256).unwrap());
    let pieces = Arc::new(BlobPieces::complete(&seed, meta.clone()).unwrap());
    (meta, pieces)
}

/// A downloader that asks for a piece and then reads nothing holds the only send slot for
/// `SEND_HOLD` at most: the next in line gets its piece within about a second, not after the
/// stalled send's minute-long timeout (a few such connections stopped an origin's serving).
#[tokio::test]
async fn a_peer_that_stops_reading_gives_its_send_slot_back() {
    let dir = tempfile::tempdir().unwrap();
    let (meta, seeded) = seeded_large(&dir);
    assert!(meta.piece_length() >= 256 << 10);
    let slots = Arc::new(Semaphore::new(1));
    let (addr, serving) = start(PeerServer { upload_slots: Some(slots), ..server_of(seeded) }).await;

    // The stalled peer: a tiny receive buffer, one request, then nothing read.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = raw_peer_on(socket.connect(addr).await.unwrap(), &meta).await;
    stalled.send(Message::Request { index: 0 }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut next = raw_peer(addr, &meta).await;
    next.send(Message::Request { index: 1 }).await.unwrap();
    let (_, got) =
        hear_until(&mut next, tokio::time::Instant::now() + SEND_HOLD + Duration::from_secs(2)).await;
    assert_eq!(got, [1], "the next downloader waited behind a peer that reads nothing");
    drop(stalled);
    serving.abort();
}

/// With an egress limit, a peer that queues requests and then reads nothing keeps their
/// admission for `SEND_HOLD` at most: another peer's requests made after that are all taken
/// and served, not declined as if the node's two seconds of sending were promised.
#[tokio::test]
async fn a_peer_that_stops_reading_gives_its_egress_admission_back() {
    let dir = tempfile::tempdir().unwrap();
    let (meta, seeded) = seeded_large(&dir);
    let len = meta.piece_len(0).unwrap();
    assert!(meta.piece_count() >= 16);
    // Four pieces a second: the limit admits two seconds' worth, eight pieces.
    let egress = Arc::new(RateLimiter::new(Some(4 * len), len));
    // The one send slot comes free once the stalled peer's requests are all queued.
    let slots = Arc::new(Semaphore::new(0));
    let server = PeerServer { egress, upload_slots: Some(slots.clone()), ..server_of(seeded) };
    let (addr, serving) = start(server).await;

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = raw_peer_on(socket.connect(addr).await.unwrap(), &meta).await;
    for index in 0..10 {
        stalled.send(Message::Request { index }).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    slots.add_permits(1);
    tokio::time::sleep(SEND_HOLD + Duration::from_secs(1)).await;

    let mut next = raw_peer(addr, &meta).await;
    for index in 10..13 {
        next.send(Message::Request { index }).await.unwrap();
    }
    let end = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut got = Vec::new();
    while got.len() < 3 {
        match tokio::time::timeout_at(end, next.next()).await {
            Ok(Some(Ok(Message::Piece { index, .. }))) => got.push(index),
            Ok(Some(Ok(Message::KeepAlive))) => {}
            other => panic!("after {got:?}: {other:?} (declined while a stalled peer held the limit?)"),
        }
    }
    assert_eq!(got, [10, 11, 12]);
    drop(stalled);
    serving.abort();
}

/// Keep-alives alone do not keep a connection, nor the same `have` told again, nor a request
/// cancelled before it is sent: one that is sent nothing and tells nothing new for
/// `IDLE_TIMEOUT` is closed, and gives its place among the blob's peers (and its pin on a
/// cached blob) back. Before, the repeated `have` or request kept its connection open for good.
#[tokio::test(start_paused = true)]
async fn a_connection_that_only_sends_keep_alives_is_closed_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let (meta, seeded) = seeded(&dir);
    let (addr, serving) = start(server_of(seeded)).await;
    let mut idle = raw_peer(addr, &meta).await;
    let mut repeating = raw_peer(addr, &meta).await;
    let mut cancelling = raw_peer(addr, &meta).await;
    let mut active = raw_peer(addr, &meta).await;
    let started = tokio::time::Instant::now();
    let mut closed = [None, None, None];
    for told in 0u32.. {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let _ = idle.send(Message::KeepAlive).await;
        let _ = repeating.send(Message::Have(0)).await;
        // Asked and cancelled at once: nothing is sent.
        let _ = cancelling.send(Message::Request { index: 0 }).await;
        let _ = cancelling.send(Message::Cancel(0)).await;
        active
            .send(Message::Have(told))
            .await
            .unwrap_or_else(|e| panic!("told {told} at {:?}: {e}", started.elapsed()));
        // Let the server read them before paused time jumps on (its reads wait on epoll).
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(1));
            tokio::task::yield_now().await;
        }
        for (peer, at) in [&mut idle, &mut repeating, &mut cancelling].into_iter().zip(&mut closed) {
            if at.is_none()
                && matches!(
                    tokio::time::timeout(Duration::from_millis(10), peer.next()).await,
                    Ok(None | Some(Err(_)))
                )
            {
                *at = Some(started.elapsed());
            }
        }
        if closed.iter().all(Option::is_some) {
            break;
        }
        assert!(started.elapsed() < IDLE_TIMEOUT * 2, "still open after {:?}: {closed:?}", started.elapsed());
    }
    for at in closed.into_iter().flatten() {
        assert!(at >= IDLE_TIMEOUT, "closed after {at:?}");
    }
    // The peer that keeps telling its progress stays (a piece read on the blocking pool would
    // not finish in paused time: only that the connection is open is checked).
    active.send(Message::Have(15)).await.unwrap();
    let heard = tokio::time::timeout(Duration::from_millis(10), active.next()).await;
    assert!(heard.is_err(), "the active peer heard {heard:?}");
    serving.abort();
}

/// A peer that tells a new `have` every 30 s and asks for nothing keeps its connection (and a
/// cached blob's pin) for `HAVES_KEEP` and one `IDLE_TIMEOUT` more at most, not for as long as
/// the blob has pieces to tell (64 here: 32 minutes; a day for a 1 GiB blob at one `have`
/// every two minutes).
#[tokio::test(start_paused = true)]
async fn new_haves_alone_keep_a_connection_for_a_while_only() {
    let dir = tempfile::tempdir().unwrap();
    let (meta, seeded) = seeded_large(&dir);
    assert!(meta.piece_count() >= 64);
    let (addr, serving) = start(server_of(seeded)).await;
    let mut telling = raw_peer(addr, &meta).await;
    let started = tokio::time::Instant::now();
    let closed = 'told: {
        for told in 0..meta.piece_count() {
            tokio::time::sleep(Duration::from_secs(30)).await;
            if telling.send(Message::Have(told)).await.is_err() {
                break 'told started.elapsed();
            }
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(1));
                tokio::task::yield_now().await;
            }
            if matches!(
                tokio::time::timeout(Duration::from_millis(10), telling.next()).await,
                Ok(None | Some(Err(_)))
            ) {
                break 'told started.elapsed();
            }
        }
        panic!("still open after telling every piece, {:?}", started.elapsed());
    };
    assert!(closed >= HAVES_KEEP, "closed after {closed:?}");
    assert!(closed <= HAVES_KEEP + IDLE_TIMEOUT + Duration::from_secs(60), "closed after {closed:?}");
    serving.abort();
}
