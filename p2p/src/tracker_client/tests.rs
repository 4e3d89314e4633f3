//! Tracker choice and failover against stand-in trackers: hung, slow, answering.

use super::*;

#[test]
fn order_is_stable_and_spreads_digests() {
    let client = TrackerClient::new(
        vec!["http://a".into(), "http://b".into(), "http://c".into()],
        Duration::from_secs(1),
    )
    .unwrap();
    let mut firsts = std::collections::HashSet::new();
    for i in 0..50 {
        let d = Digest::of(shoal_registry::Algorithm::Sha256, format!("{i}").as_bytes());
        let order = client.order_for(&d);
        assert_eq!(order.len(), 3);
        assert_eq!(order, client.order_for(&d));
        firsts.insert(order[0].clone());
    }
    assert_eq!(firsts.len(), 3, "every tracker leads for some digests");
}

/// A tracker that accepts and never answers.
async fn hung_tracker() -> String {
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", hung.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = hung.accept().await {
            held.push(sock); // accepted, never answered
        }
    });
    url
}

/// A tracker that answers every request `delay` after it is whole, with one announce's
/// result (enough for these tests; a metainfo lookup gets the same body).
async fn tracker_answering_after(delay: Duration) -> String {
    let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", live.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = live.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = sock.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let Some(end) = text.find("\r\n\r\n") else { continue };
                    let length = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    if buf.len() < end + 4 + length {
                        continue;
                    }
                    tokio::time::sleep(delay).await;
                    let body = r#"{"interval_secs":3,"results":[{"peers":[]}]}"#;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(answer.as_bytes()).await;
                    buf.clear();
                }
            });
        }
    });
    url
}

/// An announce of a digest that `client` ranks to `first` first.
fn announce_led_by(client: &TrackerClient, first: &str) -> AnnounceRequest {
    let digest = (0..100)
        .map(|i| Digest::of(shoal_registry::Algorithm::Sha256, format!("{i}").as_bytes()))
        .find(|d| client.order_for(d)[0] == first)
        .unwrap();
    AnnounceRequest {
        digest,
        peer_id: "a".repeat(40),
        addr: "127.0.0.1:7000".parse().unwrap(),
        complete: true,
        stopped: false,
    }
}

/// A tracker that accepts and never answers costs the first batch to meet it the hedge's
/// wait (the next tracker answers), not the request timeout; then it goes last for a
/// while, and the batches after go to the next tracker at once.
#[tokio::test]
async fn a_hung_tracker_costs_one_batch_the_hedge_and_is_tried_last_after() {
    let (hung, live) = (hung_tracker().await, tracker_answering_after(Duration::ZERO).await);
    let client = TrackerClient::new(vec![hung.clone(), live], Duration::from_secs(10)).unwrap();
    let req = announce_led_by(&client, &hung);
    let started = Instant::now();
    assert!(client.announce_many(std::slice::from_ref(&req)).await[0].is_ok());
    let took = started.elapsed();
    assert!(took >= TRACKER_HEDGE_AFTER && took < TRACKER_HEDGE_AFTER * 2, "took {took:?}");
    assert_ne!(client.order_for(&req.digest)[0], hung, "the overtaken tracker goes last");
    let started = Instant::now();
    assert!(client.announce_many(std::slice::from_ref(&req)).await[0].is_ok());
    assert!(started.elapsed() < TRACKER_HEDGE_AFTER / 2, "the second waited {:?}", started.elapsed());
}

/// A tracker slower than the hedge but answering (a cold lookup at the origins) is
/// waited for and keeps its place: its answer comes before its hedge's.
#[tokio::test]
async fn a_slow_tracker_that_answers_keeps_its_place() {
    let slow = Duration::from_secs(3);
    let (a, b) = (tracker_answering_after(slow).await, tracker_answering_after(slow).await);
    let client = TrackerClient::new(vec![a.clone(), b], Duration::from_secs(10)).unwrap();
    let req = announce_led_by(&client, &a);
    let started = Instant::now();
    assert!(client.announce_many(std::slice::from_ref(&req)).await[0].is_ok());
    let took = started.elapsed();
    assert!(took >= slow && took < slow + Duration::from_secs(1), "took {took:?}");
    assert_eq!(client.order_for(&req.digest)[0], a, "a tracker that answered was marked down");
    let started = Instant::now();
    assert!(client.metainfo(&req.digest).await.is_ok());
    assert!(started.elapsed() < slow + Duration::from_secs(1), "metainfo took {:?}", started.elapsed());
    assert_eq!(client.order_for(&req.digest)[0], a);
}

/// The last tracker left gets the whole timeout; a metainfo lookup is hedged as
/// announces are.
#[tokio::test]
async fn the_last_tracker_gets_the_whole_timeout_and_lookups_are_hedged() {
    let (hung, live) = (hung_tracker().await, tracker_answering_after(Duration::ZERO).await);
    let alone = TrackerClient::new(vec![hung.clone()], Duration::from_millis(2500)).unwrap();
    let req = announce_led_by(&alone, &hung);
    let started = Instant::now();
    assert!(alone.announce_many(std::slice::from_ref(&req)).await[0].is_err());
    assert!(started.elapsed() >= Duration::from_millis(2500), "{:?}", started.elapsed());
    let client = TrackerClient::new(vec![hung.clone(), live], Duration::from_secs(10)).unwrap();
    let req = announce_led_by(&client, &hung);
    let started = Instant::now();
    assert!(client.metainfo(&req.digest).await.is_ok_and(|m| m.is_some()));
    let took = started.elapsed();
    assert!(took >= TRACKER_HEDGE_AFTER && took < TRACKER_HEDGE_AFTER * 2, "took {took:?}");
    assert_ne!(client.order_for(&req.digest)[0], hung);
}

/// A tracker that streams a metainfo answer far larger than any real one: the lookup fails
/// at `MAX_TRACKER_ANSWER` instead of filling the agent's memory with it.
#[tokio::test]
async fn an_endless_answer_is_cut_off() {
    let endless = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", endless.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = endless.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut head = [0u8; 4096];
                let _ = sock.read(&mut head).await;
                let length = 4 * MAX_TRACKER_ANSWER;
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {length}\r\n\r\n");
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'x'; 1 << 20];
                for _ in 0..(length >> 20) {
                    if sock.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let client = TrackerClient::new(vec![url], Duration::from_secs(30)).unwrap();
    let digest = Digest::of(shoal_registry::Algorithm::Sha256, b"x");
    let err = client.metainfo(&digest).await.unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
}
