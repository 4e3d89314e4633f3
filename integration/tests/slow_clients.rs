//! Slow and hostile clients (issue 10, item 7): uploads whose bodies trickle in a byte a
//! second, connections that send half a request head and stop, and floods of connections on
//! a peer port. None of them may keep other clients from being served at once: a request
//! never holds one of the runtime's blocking threads while it waits for the network, the
//! HTTP servers time out slow heads and bodies, and the peer server caps connections per
//! address and refuses big frames before the handshake.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use shoal_integration::api::ImageKind;
use shoal_integration::origin::free_port;
use shoal_integration::raw::{request_target, RawConnection};
use shoal_integration::{random_bytes, skip_if_external, unique_repo, Method, Origin, SendExt, StatusCode};
use shoal_p2p::tracker_client::metainfo_path;
use shoal_p2p::{Bitfield, Message, Metainfo, PeerCodec, PeerId, PROTOCOL_VERSION};
use shoal_registry::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_util::codec::Framed;

const SKIP: &str = "starts its own origin with a config";

/// More trickling uploads than tokio has blocking threads (512).
const TRICKLING_UPLOADS: usize = 600;
/// Connections that send half a request head and stop.
const SLOW_HEADS: usize = 100;
/// How soon a client arriving among them must be answered.
const PROMPT: Duration = Duration::from_secs(2);

/// The test process and the origins it starts (which inherit the limit) hold over a thousand
/// sockets: raise the soft limit on open files to the hard one.
fn raise_open_file_limit() {
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// `what` must finish within [`PROMPT`].
async fn promptly<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    match tokio::time::timeout(PROMPT, future).await {
        Ok(value) => {
            eprintln!("{what}: {:?}", started.elapsed());
            value
        }
        Err(_) => panic!("{what}: no answer within {PROMPT:?} among slow clients"),
    }
}

/// A PATCH whose `len`-byte body is sent one byte a second, on its own task.
async fn trickle(base: String, location: String, len: usize) -> tokio::task::JoinHandle<()> {
    let head = [
        ("Content-Type", "application/octet-stream".to_string()),
        ("Content-Range", format!("0-{}", len - 1)),
        ("Content-Length", len.to_string()),
    ];
    let mut conn = RawConnection::open(&base, Method::PATCH, &request_target(&location), &head).await;
    tokio::spawn(async move {
        for _ in 0..len {
            if conn.send(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

/// A connection that sends the start of a request head and nothing more.
async fn slow_head(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect for a slow head");
    stream.write_all(b"GET /v2/ HTTP/1.1\r\nHost: slow\r\n").await.expect("send half a head");
    stream
}

fn http_addr(origin: &Origin) -> SocketAddr {
    origin.url().trim_start_matches("http://").parse().expect("the origin's address")
}

/// More than 512 uploads trickle their bodies in a byte a second and 100 connections sit
/// on half a request head; a new client still pushes a blob and lists tags at once.
#[tokio::test(flavor = "multi_thread")]
async fn slow_uploads_and_heads_do_not_starve_other_clients() {
    skip_if_external!(SKIP);
    raise_open_file_limit();
    let origin = Origin::start_with_config("").await;
    let client = origin.client();
    let repo = unique_repo("slow");
    client.push_image(&repo, ImageKind::Oci, Some("v1"), 64).await;

    let mut locations = Vec::new();
    for _ in 0..TRICKLING_UPLOADS {
        locations.push(client.start_upload(&repo).await);
    }
    let mut trickles = Vec::new();
    for location in locations {
        trickles.push(trickle(client.base().to_string(), location, 100).await);
    }
    let mut heads = Vec::new();
    for _ in 0..SLOW_HEADS {
        heads.push(slow_head(http_addr(&origin)).await);
    }
    // Let the server take every one of them in.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let fresh = origin.client();
    promptly("GET tags/list", fresh.get(&format!("/v2/{repo}/tags/list")).reply())
        .await
        .expect(StatusCode::OK);
    promptly(
        "POST an upload",
        fresh.post(&format!("/v2/{repo}/blobs/uploads/")).header("content-length", "0").reply(),
    )
    .await
    .expect(StatusCode::ACCEPTED);
    let data = random_bytes(256 * 1024);
    promptly("push a blob", fresh.push_blob(&repo, &data)).await;

    for t in trickles {
        t.abort();
    }
    drop(heads);
}

/// Sends `head` and `piece`, then `piece` again every second until the server answers. Returns the answer's
/// status, its raw text and how long it took.
async fn trickle_until_answered(
    addr: SocketAddr,
    head: String,
    piece: &'static [u8],
) -> (u16, String, Duration) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut read, mut write) = stream.into_split();
    let started = Instant::now();
    write.write_all(head.as_bytes()).await.expect("send the head");
    let sender = tokio::spawn(async move {
        while write.write_all(piece).await.is_ok() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = started + Duration::from_secs(10);
    // Until the server closes (a reset after the answer, for bytes it did not read, is fine).
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline.into(), read.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let elapsed = started.elapsed();
    sender.abort();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text, elapsed)
}

fn patch_head(origin: &Origin, location: &str, extra: &str) -> String {
    let addr = http_addr(origin);
    format!(
        "PATCH {} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\n{extra}\r\n",
        request_target(location)
    )
}

/// With short limits, a half-sent head is dropped, and an upload body that trickles (with a
/// length, chunked, or not at all) fails with 408 within a window or two. Each session stays
/// usable: a chunk with a length was rolled back whole, a chunked one kept what arrived, and
/// both uploads are then completed.
#[tokio::test(flavor = "multi_thread")]
async fn slow_heads_and_bodies_are_cut_off_and_uploads_resume() {
    skip_if_external!(SKIP);
    let origin = Origin::start_with_config(
        "[limits]\nheader_read_timeout = \"1s\"\nbody_idle_timeout = \"1s\"\nbody_min_rate = \"100B\"\n",
    )
    .await;
    let client = origin.client();
    let repo = unique_repo("cutoff");
    let (sized, chunked, idle) = (
        client.start_upload(&repo).await,
        client.start_upload(&repo).await,
        client.start_upload(&repo).await,
    );

    let mut head = slow_head(http_addr(&origin)).await;
    let sized_patch = trickle_until_answered(
        http_addr(&origin),
        patch_head(&origin, &sized, "Content-Range: 0-99\r\nContent-Length: 100\r\n"),
        b"x",
    );
    let chunked_patch = trickle_until_answered(
        http_addr(&origin),
        patch_head(&origin, &chunked, "Transfer-Encoding: chunked\r\n"),
        b"1\r\nx\r\n",
    );
    let idle_patch = trickle_until_answered(
        http_addr(&origin),
        patch_head(&origin, &idle, "Content-Range: 0-9\r\nContent-Length: 10\r\n"),
        b"",
    );
    let (head_closed, sized_patch, chunked_patch, idle_patch) = tokio::join!(
        closed_within(&mut head, Duration::from_secs(3)),
        sized_patch,
        chunked_patch,
        idle_patch
    );
    assert!(head_closed, "a half-sent head was kept open past header_read_timeout");
    for (what, (status, text, elapsed)) in
        [("sized", &sized_patch), ("chunked", &chunked_patch), ("idle", &idle_patch)]
    {
        eprintln!("{what} trickle answered {status} after {elapsed:?}");
        assert_eq!(*status, 408, "{what} trickle: {text}");
        assert!(text.contains("BLOB_UPLOAD_INVALID"), "{what} trickle: {text}");
        assert!(*elapsed < Duration::from_secs(4), "{what} trickle held for {elapsed:?}");
    }

    // The sized chunk was all or nothing; the chunked one kept its bytes.
    let status = client.upload_status(&sized).await;
    status.expect(StatusCode::NO_CONTENT);
    assert_eq!(status.header("range"), Some("0-0"), "{}", status.describe());
    let kept = client.upload_status(&chunked).await;
    kept.expect(StatusCode::NO_CONTENT);
    let kept = kept.upload_offset() as usize;
    assert!(kept >= 1, "the chunked trickle's bytes were dropped");
    client.upload_status(&idle).await.expect(StatusCode::NO_CONTENT);

    let data = random_bytes(1000);
    client.patch_chunk(&sized, 0, &data).await.expect(StatusCode::ACCEPTED);
    client.finish_upload(&sized, &shoal_integration::sha256(&data), &[]).await.expect(StatusCode::CREATED);
    let mut whole = vec![b'x'; kept];
    whole.extend_from_slice(&data);
    client.patch_chunk(&chunked, kept, &data).await.expect(StatusCode::ACCEPTED);
    client.finish_upload(&chunked, &shoal_integration::sha256(&whole), &[]).await.expect(StatusCode::CREATED);
}

/// A GET of `path` on a new connection to `addr`.
async fn blob_request(addr: SocketAddr, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect for a blob");
    let head = format!("GET {path} HTTP/1.1\r\nHost: reader\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("send the request");
    stream
}

/// Reads `stream` until it ends (end of stream, a reset, or `limit` without a byte); the bytes
/// read and whether the server closed it.
async fn read_to_end_or_close(stream: &mut TcpStream, limit: Duration) -> (usize, bool) {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Err(_) => return (total, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (total, true),
            Ok(Ok(n)) => total += n,
        }
    }
}

/// A client that asks for a blob and stops reading loses its connection after
/// `send_idle_timeout` (the server holds nothing for it any longer); one that reads slowly,
/// pausing less than that between reads, gets the whole blob.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_a_blob_is_cut_off_and_a_slow_one_is_not() {
    skip_if_external!(SKIP);
    let origin = Origin::start_with_config("[limits]\nsend_idle_timeout = \"3s\"\n").await;
    let client = origin.client();
    let repo = unique_repo("stalled");
    // More than loopback's socket buffers and the server's own hold, so the sender blocks.
    let data = random_bytes(32 << 20);
    let digest = client.push_blob(&repo, &data).await;
    let path = format!("/v2/{repo}/blobs/{digest}");
    let addr = http_addr(&origin);

    let mut stopped = blob_request(addr, &path).await;
    let mut slow = blob_request(addr, &path).await;
    // The slow reader takes a MiB every 400 ms for 4 s, then the rest at once. (The server's
    // socket turns writable again once a third or so of its send buffer is free, so each of
    // its writes waits up to two of these reads.)
    let slow_reader = async {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let mut chunk = 0;
            while chunk < buf.len() {
                match slow.read(&mut buf[chunk..]).await {
                    Ok(0) | Err(_) => return (total + chunk, true),
                    Ok(n) => chunk += n,
                }
            }
            total += chunk;
        }
        let (rest, closed) = read_to_end_or_close(&mut slow, Duration::from_secs(2)).await;
        (total + rest, closed)
    };
    let ((slow_bytes, slow_closed), ()) =
        tokio::join!(slow_reader, tokio::time::sleep(Duration::from_secs(5)));
    let (stopped_bytes, stopped_closed) = read_to_end_or_close(&mut stopped, Duration::from_secs(5)).await;
    eprintln!(
        "stopped reader: {stopped_bytes} bytes, closed {stopped_closed}; slow reader: {slow_bytes} bytes"
    );
    assert!(stopped_closed, "a reader that stopped kept its connection");
    assert!(stopped_bytes < data.len(), "a reader that stopped for 5 s got the whole blob: not cut off");
    assert!(slow_bytes > data.len(), "the slow reader got {slow_bytes} bytes of a {} byte blob", data.len());
    assert!(!slow_closed, "the slow reader's keep-alive connection was closed");
}

/// Connects to `to` from `from` (any 127.0.0.0/8 address works on loopback), so a flood can
/// come from addresses other than the real peer's.
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0))?;
    socket.connect(to).await
}

/// Whether the server closes `stream` within `limit` (end of stream or a reset).
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// A real peer: handshake, request piece `index`, check it against the metainfo. (A
/// super-seeding origin declines a piece it sent to someone else a moment ago, so each call
/// asks for another piece.)
async fn fetch_piece(addr: SocketAddr, metainfo: &Metainfo, index: u32) -> Result<(), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let mut framed = Framed::new(stream, PeerCodec::default());
    let hello = Message::Handshake {
        version: PROTOCOL_VERSION,
        digest: metainfo.digest().clone(),
        peer_id: PeerId::random(),
        bitfield: Bitfield::new(metainfo.piece_count()).to_bytes().into(),
    };
    framed.send(hello).await.map_err(|e| format!("send handshake: {e}"))?;
    match framed.next().await {
        Some(Ok(Message::Handshake { .. })) => {}
        other => return Err(format!("expected a handshake, got {other:?}")),
    }
    framed.send(Message::Request { index }).await.map_err(|e| format!("send request: {e}"))?;
    loop {
        match framed.next().await {
            Some(Ok(Message::Piece { index: got, data })) if got == index => {
                let ok = metainfo.verify_piece(index, &data);
                return if ok { Ok(()) } else { Err(format!("piece {index} is corrupt")) };
            }
            Some(Ok(Message::Have(_) | Message::KeepAlive)) => {}
            other => return Err(format!("expected piece {index}, got {other:?}")),
        }
    }
}

/// A flood on the origin's peer port: connections that announce a 4 MiB frame before any
/// handshake (closed at once), 200 handshakes that then sit idle, and 1,100 connections from
/// one address that send nothing. A real peer from another address still gets a piece at once.
#[tokio::test(flavor = "multi_thread")]
async fn peer_port_flood_does_not_lock_out_a_real_peer() {
    skip_if_external!(SKIP);
    raise_open_file_limit();
    let peer_port = free_port();
    let origin = Origin::start_with_config(&format!("peer_listen = \"127.0.0.1:{peer_port}\"\n")).await;
    let peer_addr = SocketAddr::from(([127, 0, 0, 1], peer_port));
    let client = origin.client();
    let repo = unique_repo("flood");
    let digest: Digest =
        client.push_blob(&repo, &random_bytes(3 * 1024 * 1024)).await.parse().expect("digest");
    let metainfo = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let reply = client.get(&metainfo_path(&digest)).reply().await;
            if reply.status == StatusCode::OK {
                break serde_json::from_slice::<Metainfo>(&reply.body).expect("metainfo JSON");
            }
            assert!(Instant::now() < deadline, "no metainfo: {}", reply.describe());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    fetch_piece(peer_addr, &metainfo, 0).await.expect("a piece before the flood");

    // A frame length the old limit (a whole piece) allowed, before any handshake.
    let mut big = Vec::new();
    for _ in 0..20 {
        let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 3), peer_addr).await.expect("connect");
        s.write_all(&(4u32 * 1024 * 1024).to_be_bytes()).await.expect("send a frame length");
        s.write_all(&[0u8]).await.expect("send a type byte");
        big.push(s);
    }
    for (i, s) in big.iter_mut().enumerate() {
        assert!(closed_within(s, Duration::from_secs(1)).await, "big frame connection {i} was kept open");
    }

    let mut handshakes = JoinSet::new();
    for _ in 0..200 {
        let (digest, count) = (metainfo.digest().clone(), metainfo.piece_count());
        handshakes.spawn(async move {
            let stream = connect_from(Ipv4Addr::new(127, 0, 0, 4), peer_addr).await.ok()?;
            let mut framed = Framed::new(stream, PeerCodec::default());
            let hello = Message::Handshake {
                version: PROTOCOL_VERSION,
                digest,
                peer_id: PeerId::random(),
                bitfield: Bitfield::new(count).to_bytes().into(),
            };
            framed.send(hello).await.ok()?;
            Some(framed)
        });
    }
    let mut idle_handshakes = Vec::new();
    while let Some(done) = handshakes.join_next().await {
        idle_handshakes.extend(done.ok().flatten());
    }

    let mut silent = Vec::new();
    for _ in 0..1100 {
        if let Ok(s) = connect_from(Ipv4Addr::new(127, 0, 0, 2), peer_addr).await {
            silent.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    promptly("a real peer's piece", fetch_piece(peer_addr, &metainfo, 1))
        .await
        .expect("a real peer gets a piece during the flood");
    drop((silent, idle_handshakes, big));
}

/// A role started with the soft open-file limit of 1,024 that systemd, Docker and containerd
/// give raises it to the hard limit at once: below its connection caps (4,096 per listener,
/// 1,024 per address), one host's connections used every descriptor before (accept failed
/// with EMFILE, blob files could not be opened).
#[test]
fn a_role_raises_its_open_file_limit_to_the_hard_one() {
    use std::os::unix::process::CommandExt as _;
    let mut hard = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct passed to it.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) }, 0);
    if hard.rlim_max != libc::RLIM_INFINITY && hard.rlim_max <= 1024 {
        eprintln!("skipped: the hard open-file limit is {} here", hard.rlim_max);
        return;
    }
    let listen = format!("127.0.0.1:{}", free_port());
    let mut command = std::process::Command::new(shoal_integration::origin::shoal_binary());
    command.args(["tracker", "--origin", "http://127.0.0.1:9", "--listen", &listen]);
    command.stderr(std::process::Stdio::null());
    // SAFETY: only setrlimit, which is async-signal-safe, runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
            limit.rlim_cur = 1024;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            Ok(())
        });
    }
    let mut child = command.spawn().expect("start shoal tracker");
    let limits = format!("/proc/{}/limits", child.id());
    let soft = |text: &str| {
        let line = text.lines().find(|l| l.starts_with("Max open files")).unwrap_or_default().to_string();
        line.split_whitespace().nth(3).unwrap_or_default().to_string()
    };
    let want = if hard.rlim_max == libc::RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        hard.rlim_max.to_string()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = String::new();
    while Instant::now() < deadline {
        seen = soft(&std::fs::read_to_string(&limits).unwrap_or_default());
        if seen == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(seen, want, "the tracker's soft open-file limit stayed below the hard one");
}
