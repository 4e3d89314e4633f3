//! Tests of upload sessions and appends.
use super::*;
use bytes::Bytes;
use std::time::Duration;

type Sender = tokio::sync::mpsc::Sender<std::io::Result<Bytes>>;

/// A body stream fed by the test, standing in for a client that sends when it likes.
fn body() -> (Sender, ByteStream) {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    (tx, Box::pin(stream))
}

/// With one blocking thread in the pool, an upload whose client has gone quiet leaves it
/// free: a slow client never holds a thread the file and database operations need.
#[test]
fn a_waiting_upload_holds_no_blocking_thread() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("session");
        std::fs::write(&path, b"").unwrap();
        let mut session = empty_session(path);
        let (tx, body) = body();
        let upload =
            tokio::spawn(async move { append(&mut session, None, None, body).await.map(|()| session) });
        tx.send(Ok(Bytes::from_static(b"abc"))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let other = tokio::task::spawn_blocking(|| 42);
        let answer = tokio::time::timeout(Duration::from_secs(5), other).await;
        assert_eq!(answer.expect("the blocking pool is held by a waiting upload").unwrap(), 42);
        tx.send(Ok(Bytes::from_static(b"def"))).await.unwrap();
        drop(tx);
        let session = upload.await.unwrap().unwrap();
        assert_eq!(session.offset, 6);
        assert_eq!(std::fs::read(&session.path).unwrap(), b"abcdef");
        let digest = digest_of(&session, Algorithm::Sha256).await.unwrap();
        assert_eq!(digest, Digest::of(Algorithm::Sha256, b"abcdef"));
    });
}

/// An append to a fresh session in `dir` whose client has sent 1.5 MiB (in 64 KiB
/// chunks) and holds its body open: the session file, the sender, the append, the bytes.
async fn an_upload_that_sent_1_5_mib(
    dir: &std::path::Path,
) -> (std::path::PathBuf, Sender, tokio::task::JoinHandle<Result<Session, StoreError>>, Vec<u8>) {
    let path = dir.join("session");
    std::fs::write(&path, b"").unwrap();
    let mut session = empty_session(path.clone());
    let (tx, body) = body();
    let upload = tokio::spawn(async move { append(&mut session, None, None, body).await.map(|()| session) });
    let data: Vec<u8> = (0..(3 << 19) as u32).map(|i| (i % 249) as u8).collect();
    for chunk in data.chunks(64 * 1024) {
        tx.send(Ok(Bytes::copy_from_slice(chunk))).await.unwrap();
    }
    (path, tx, upload, data)
}

/// A client that sends 1.5 MiB and goes quiet: what it sent is written (and its buffers
/// let go) within the idle delay, not held until its body ends; every byte lands once.
#[tokio::test]
async fn a_quiet_body_has_what_it_sent_written() {
    let dir = tempfile::tempdir().unwrap();
    let (path, tx, upload, data) = an_upload_that_sent_1_5_mib(dir.path()).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::metadata(&path).unwrap().len() < data.len() as u64 {
        assert!(Instant::now() < deadline, "the quiet body's bytes were held, not written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tx.send(Ok(Bytes::from_static(b"end"))).await.unwrap();
    drop(tx);
    let session = upload.await.unwrap().unwrap();
    let mut all = data.clone();
    all.extend_from_slice(b"end");
    assert_eq!(session.offset, all.len() as u64);
    assert_eq!(std::fs::read(&session.path).unwrap(), all);
    assert_eq!(digest_of(&session, Algorithm::Sha256).await.unwrap(), Digest::of(Algorithm::Sha256, &all));
}

/// A client that sends 1.5 MiB and then trickles a few bytes every 50 ms (never quiet for
/// the idle delay): what it sent is written within about a second all the same.
#[tokio::test]
async fn a_trickling_body_has_what_it_sent_written() {
    let dir = tempfile::tempdir().unwrap();
    let (path, tx, upload, data) = an_upload_that_sent_1_5_mib(dir.path()).await;
    let mut sent = data.clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::metadata(&path).unwrap().len() < data.len() as u64 {
        assert!(Instant::now() < deadline, "the trickling body's bytes were held, not written");
        tx.send(Ok(Bytes::from_static(b"drip"))).await.unwrap();
        sent.extend_from_slice(b"drip");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(tx);
    let session = upload.await.unwrap().unwrap();
    assert_eq!(std::fs::read(&session.path).unwrap(), sent);
    assert_eq!(digest_of(&session, Algorithm::Sha256).await.unwrap(), Digest::of(Algorithm::Sha256, &sent));
}

/// A fresh session over the (empty) file at `path`.
fn empty_session(path: std::path::PathBuf) -> Session {
    Session {
        repo: "a/b".parse().unwrap(),
        path,
        offset: 0,
        hasher: Some(Algorithm::Sha256.hasher()),
        touched: Instant::now(),
        ended: false,
    }
}

/// Expiry takes an idle session out and marks it ended under its lock, so a request
/// that reached the session just before (and locks it just after) finds it ended; a busy
/// session or a fresh one stays.
#[tokio::test]
async fn expiry_ends_a_session_a_request_already_holds() {
    let sessions = Sessions::default();
    let repo: RepoName = "a/b".parse().unwrap();
    sessions.insert("idle".into(), empty_session("x".into()));
    sessions.insert("busy".into(), empty_session("y".into()));
    tokio::time::sleep(Duration::from_millis(30)).await;
    sessions.insert("fresh".into(), empty_session("z".into()));
    let reached = sessions.get_in(&repo, "idle").unwrap();
    let busy = sessions.get_in(&repo, "busy").unwrap();
    let held = busy.lock().await;
    assert_eq!(sessions.take_expired(Duration::from_millis(20), Duration::from_millis(20)), ["idle"]);
    assert!(reached.lock().await.ended, "the request that reached it sees it ended");
    assert!(sessions.get_in(&repo, "idle").is_none());
    assert_eq!(sessions.lock().len(), 2);
    drop(held);
    assert!(!busy.lock().await.ended);
}

/// A session with no byte yet goes after the shorter idle time, one with bytes only
/// after the full one.
#[tokio::test]
async fn an_empty_session_expires_sooner() {
    let sessions = Sessions::default();
    let mut started = empty_session("x".into());
    started.offset = 5;
    sessions.insert("empty".into(), empty_session("y".into()));
    sessions.insert("started".into(), started);
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(sessions.take_expired(Duration::from_secs(3600), Duration::from_millis(20)), ["empty"]);
    assert!(sessions.take_expired(Duration::from_secs(3600), Duration::from_millis(20)).is_empty());
    assert_eq!(sessions.lock().len(), 1);
}

/// A body that fails keeps, without a declared length, every byte that arrived before
/// (the client resumes from the offset), and with one, none of them.
#[tokio::test]
async fn a_failed_body_keeps_what_arrived_only_without_a_length() {
    let dir = tempfile::tempdir().unwrap();
    for (len, kept) in [(None, 5u64), (Some(10), 0)] {
        let path = dir.path().join(format!("session-{kept}"));
        std::fs::write(&path, b"").unwrap();
        let mut session = empty_session(path);
        let (tx, body) = body();
        tx.send(Ok(Bytes::from_static(b"hello"))).await.unwrap();
        let timeout = std::io::Error::new(std::io::ErrorKind::TimedOut, "too slow");
        tx.send(Err(timeout)).await.unwrap();
        let err = append(&mut session, Some(0), len, body).await.unwrap_err();
        assert!(matches!(err, StoreError::BodyRead(ref e) if e.kind() == std::io::ErrorKind::TimedOut));
        assert_eq!(session.offset, kept);
        assert_eq!(std::fs::metadata(&session.path).unwrap().len(), kept);
        let expected = Digest::of(Algorithm::Sha256, &b"hello"[..kept as usize]);
        assert_eq!(digest_of(&session, Algorithm::Sha256).await.unwrap(), expected);
    }
}

/// Places for sessions being opened count against the limit with the open ones, until
/// dropped: `POST`s at once passed a check of the open ones alone.
#[test]
fn sessions_being_opened_count_against_the_limit() {
    let sessions = Sessions::default();
    sessions.insert("open".into(), empty_session("z".into()));
    let first = sessions.reserve(3).expect("a second place");
    let second = sessions.reserve(3).expect("a third place");
    assert!(sessions.reserve(3).is_none(), "one open and two being opened fill 3");
    drop(first);
    assert!(sessions.reserve(3).is_some(), "a place given back");
    drop(second);
}
