//! The HTTP server against real connections on loopback: per-address connection caps,
//! closing connections, body windows, and client certificates that expire.

use super::*;

/// A client certificate's role is carried while the certificate is valid: a connection
/// kept busy past its expiry is closed then (the client reconnects with its renewed
/// certificate). Before, it kept the role for as long as it was used.
#[tokio::test]
async fn a_connection_closes_when_its_client_certificate_expires() {
    use shoal_registry::identity::Role;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().unwrap();
    let ca = shoal_tls::new_ca("test", 1).unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).unwrap();
    let settings = |name: &str, issued: shoal_tls::Issued| {
        let (cert, key) =
            (dir.path().join(format!("{name}.pem")), dir.path().join(format!("{name}-key.pem")));
        std::fs::write(&cert, &issued.cert_pem).unwrap();
        std::fs::write(&key, &issued.key_pem).unwrap();
        shoal_tls::TlsSettings {
            cert: Some(cert),
            key: Some(key),
            cluster_ca: Some(dir.path().join("ca.pem")),
            ..Default::default()
        }
    };
    let ips = ["127.0.0.1".parse().unwrap()];
    let server_cert = shoal_tls::issue(&ca, "o", Role::Origin, &[], &ips, 1).unwrap();
    let server = shoal_tls::Tls::load(&settings("server", server_cert)).unwrap();
    let short = shoal_tls::issue_for(&ca, "a", Role::Origin, &[], &ips, Duration::from_secs(3)).unwrap();
    let client = shoal_tls::Tls::load(&settings("client", short)).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route(
        "/",
        axum::routing::get(|req: axum::extract::Request| async move {
            req.extensions().get::<TransportIdentity>().map_or("anonymous".to_string(), |i| i.to_string())
        }),
    );
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, app, HttpLimits::default(), server.acceptor(), async {
        let _ = stopped.await;
    }));
    let connector = shoal_tls::TlsConnector::from(client.client_config());
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = shoal_tls::ServerName::IpAddress(addr.ip().into());
    let mut stream = connector.connect(name, tcp).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(reply.ends_with("/a"), "the client's identity: {reply}");
    assert!(!reply.contains("anonymous"), "{reply}");
    // Past the certificate's expiry the server closes the connection.
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "still open after the certificate expired");
}

/// One address holding its share of connections (idle, as a slow-head flood keeps them)
/// cannot keep another client out: its next connection is closed at once, another
/// address is served. Before, one host could take every connection of a listener.
#[tokio::test]
async fn one_address_cannot_take_every_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
    let limits = HttpLimits { max_connections: 4, max_connections_per_address: 2, ..HttpLimits::default() };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, app, limits, None, async {
        let _ = stopped.await;
    }));
    let connect_from = |ip: [u8; 4]| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::from((ip, 0))).unwrap();
        socket.connect(addr).await.unwrap()
    };
    let _held = (connect_from([127, 0, 0, 1]).await, connect_from([127, 0, 0, 1]).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut third = connect_from([127, 0, 0, 1]).await;
    let mut buf = [0u8; 1];
    use tokio::io::AsyncReadExt as _;
    let closed = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "the third connection from one address stayed open");
    let mut other = connect_from([127, 0, 0, 2]).await;
    use tokio::io::AsyncWriteExt as _;
    other.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), other.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    let _ = stop.send(());
    server.abort();
}

/// A node asks its origins for things every 30 s (the authorization policy, the upstream
/// registries), which is also how long a Shoal server keeps an idle connection open. Over
/// a link with latency, the server's close reaches the client late, so a request sent on
/// a pooled connection about then meets a closed socket ("connection closed before
/// message completed"): 4 to 13 of 20 agents met one in each 20-host fleet run. Shoal's
/// client must not reuse a connection that long idle: 100 requests sent around the moment
/// the server's keep-alive time runs out, each on a connection idle since the same
/// instant, through a proxy that delays every byte and close by 100 ms, all get their
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_goes_out_on_a_connection_the_server_is_closing() {
    let failed = requests_around_the_keep_alive_deadline(HttpLimits::default().header_read_timeout).await;
    assert!(failed.is_empty(), "{} of 100 failed, first: {:?}", failed.len(), failed.first());
}

/// With a keep-alive shorter than the client's pool keeps connections (an operator's
/// `header_read_timeout` of 2 s), the same race happens, and the client sends each read
/// that met it again: all 100 get their answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_meets_a_closing_connection_is_sent_again() {
    let failed = requests_around_the_keep_alive_deadline(Duration::from_secs(2)).await;
    assert!(failed.is_empty(), "{} of 100 failed, first: {:?}", failed.len(), failed.first());
}

/// Opens 100 connections to a server whose idle connections close after `keep_alive`,
/// through a proxy that delays every byte and close by 100 ms, then sends a GET every 4 ms
/// from 200 ms before the server closes them to 200 ms after; returns the failures.
async fn requests_around_the_keep_alive_deadline(keep_alive: Duration) -> Vec<String> {
    const REQUESTS: u64 = 100;
    let latency = Duration::from_millis(100);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap();
    let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let limits = HttpLimits { header_read_timeout: keep_alive, ..HttpLimits::default() };
    let server = tokio::spawn(serve(listener, app, limits, None, async {
        let _ = stopped.await;
    }));
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", proxy.local_addr().unwrap());
    let proxy = tokio::spawn(delaying_proxy(proxy, server_addr, latency));
    let client = shoal_tls::http_client_with(&shoal_tls::Tls::plain()).build().unwrap();
    // Every call has a deadline, as Shoal's own clients' calls do: about one request in
    // 7,000 here is lost inside the HTTP client's pool when its retry meets the close (no
    // socket left, no answer; never seen without the retry). A read lost so is asked once
    // more, as a caller whose timeout fired would; any other failure counts.
    let ask = |client: reqwest::Client, url: String| async move {
        let asked = || async {
            let r = client.get(&url).send().await.map_err(|e| format!("{e:?}"))?;
            r.text().await.map_err(|e| format!("{e:?}"))
        };
        match tokio::time::timeout(Duration::from_secs(10), asked()).await {
            Ok(answer) => answer,
            Err(_) => tokio::time::timeout(Duration::from_secs(10), asked())
                .await
                .unwrap_or_else(|_| Err("no answer in 10 s, twice".to_string())),
        }
    };
    // Open the connections at once, so they all go idle together.
    let opened =
        futures_util::future::join_all((0..REQUESTS).map(|_| ask(client.clone(), url.clone()))).await;
    assert!(opened.iter().all(|r| r.as_deref() == Ok("ok")), "{opened:?}");
    // The server's idle time began a latency before the answers arrived.
    let closes = tokio::time::Instant::now() - latency + keep_alive;
    let start = closes - Duration::from_millis(2 * REQUESTS);
    let again = (0..REQUESTS).map(|i| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            tokio::time::sleep_until(start + Duration::from_millis(4 * i)).await;
            ask(client, url).await
        }
    });
    let again = futures_util::future::join_all(again).await;
    let _ = stop.send(());
    server.await.unwrap();
    proxy.abort();
    again.into_iter().filter_map(Result::err).collect()
}

/// Forwards each connection to `to`, every chunk and the close `delay` late in both
/// directions: a link's latency on loopback.
async fn delaying_proxy(listener: TcpListener, to: std::net::SocketAddr, delay: Duration) {
    while let Ok((client, _)) = listener.accept().await {
        tokio::spawn(async move {
            let Ok(server) = tokio::net::TcpStream::connect(to).await else { return };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::join!(pump(client_read, server_write, delay), pump(server_read, client_write, delay));
        });
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        tokio::time::sleep(delay).await;
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            let _ = to.shutdown().await;
            return;
        }
    }
}

#[test]
fn a_window_asks_for_at_least_one_byte() {
    let limits = HttpLimits { body_min_rate: 0, ..HttpLimits::default() };
    assert_eq!(limits.min_window_bytes(), 1);
    let limits = HttpLimits {
        body_min_rate: 1024,
        body_idle_timeout: Duration::from_millis(1500),
        ..HttpLimits::default()
    };
    assert_eq!(limits.min_window_bytes(), 1536);
}
