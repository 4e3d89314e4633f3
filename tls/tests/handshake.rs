//! The TLS context against real handshakes on loopback: node identity reaches the server,
//! the peer protocol refuses a client without a cluster certificate, and a replaced
//! certificate is served to new connections without a restart.

use std::path::Path;
use std::sync::Arc;

use shoal_registry::identity::{Role, TransportIdentity};
use shoal_tls::{issue, new_ca, Issued, Tls, TlsSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn write(dir: &Path, name: &str, issued: &Issued) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    std::fs::write(&key, &issued.key_pem).unwrap();
    (cert, key)
}

struct Pki {
    dir: tempfile::TempDir,
    ca: Issued,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca("test cluster", 1).unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).unwrap();
        Pki { dir, ca }
    }

    fn settings(&self, name: &str, role: Role) -> TlsSettings {
        let issued =
            issue(&self.ca, name, role, &["localhost".into()], &["127.0.0.1".parse().unwrap()], 1).unwrap();
        let (cert, key) = write(self.dir.path(), name, &issued);
        TlsSettings {
            cert: Some(cert),
            key: Some(key),
            cluster_ca: Some(self.dir.path().join("ca.pem")),
            ..Default::default()
        }
    }
}

/// Serve one HTTP/1.1 response per connection naming the client's identity.
async fn identity_server(tls: Arc<Tls>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.acceptor().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(stream).await else { return };
                let who = shoal_tls::identity_of(stream.get_ref().1)
                    .map_or("anonymous".to_string(), |i| i.to_string());
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{who}",
                    who.len()
                );
                let _ = stream.write_all(reply.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_node_certificate_names_the_client_and_anonymous_clients_still_connect() {
    let pki = Pki::new();
    let server = Arc::new(Tls::load(&pki.settings("origin-0", Role::Origin)).unwrap());
    let addr = identity_server(server).await;
    let url = format!("https://127.0.0.1:{}/", addr.port());

    let agent = Tls::load(&pki.settings("node-7", Role::Agent)).unwrap();
    assert_eq!(agent.own_identity(), Some(TransportIdentity { name: "node-7".into(), role: Role::Agent }));
    let body = shoal_tls::http_client_with(&agent)
        .build()
        .unwrap()
        .get(&url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "shoal-agent/node-7");

    // A client that only trusts the CA, without a certificate of its own.
    let anonymous =
        Tls::load(&TlsSettings { ca: Some(pki.dir.path().join("ca.pem")), ..Default::default() }).unwrap();
    let body = shoal_tls::http_client_with(&anonymous)
        .build()
        .unwrap()
        .get(&url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "anonymous");

    // A client that does not trust the CA refuses the server.
    let stranger = Tls::plain();
    assert!(shoal_tls::http_client_with(&stranger).build().unwrap().get(&url).send().await.is_err());
}

#[tokio::test]
async fn a_certificate_from_another_ca_proves_nothing() {
    let pki = Pki::new();
    let other = Pki::new();
    let server = Arc::new(Tls::load(&pki.settings("origin-0", Role::Origin)).unwrap());
    let addr = identity_server(server).await;
    // Trusts the server's CA, but its own certificate comes from another one.
    let mut settings = other.settings("intruder", Role::Agent);
    settings.ca = Some(pki.dir.path().join("ca.pem"));
    let intruder = Tls::load(&settings).unwrap();
    let result = shoal_tls::http_client_with(&intruder)
        .build()
        .unwrap()
        .get(format!("https://127.0.0.1:{}/", addr.port()))
        .send()
        .await;
    // Refused during the handshake (a certificate the server's CA did not sign).
    assert!(result.is_err(), "{result:?}");
}

async fn peer_echo(tls: &Tls) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.peer().unwrap().acceptor.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = acceptor.accept(stream).await {
                    let _ = s.write_all(b"piece").await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn the_peer_protocol_needs_a_cluster_certificate_on_both_sides() {
    let pki = Pki::new();
    let seeder = Tls::load(&pki.settings("seeder", Role::Agent)).unwrap();
    let leecher = Tls::load(&pki.settings("leecher", Role::Agent)).unwrap();
    let addr = peer_echo(&seeder).await;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());

    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut s = leecher.peer().unwrap().connector.connect(name.clone(), tcp).await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"piece");

    // No client certificate: the seeder ends the handshake, nothing is read.
    let plain =
        Tls::load(&TlsSettings { ca: Some(pki.dir.path().join("ca.pem")), ..Default::default() }).unwrap();
    let connector = shoal_tls::TlsConnector::from(plain.client_config());
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut got = Vec::new();
    if let Ok(mut s) =
        connector.connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp).await
    {
        let _ = s.read_to_end(&mut got).await;
    }
    assert!(got.is_empty(), "a client without a certificate read {got:?}");

    // An operator's certificate is the cluster's, but not a node's.
    let admin = Tls::load(&pki.settings("alice", Role::Admin)).unwrap();
    let admin_seeder = peer_echo(&admin).await;
    let tcp = TcpStream::connect(admin_seeder).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(admin_seeder.ip().into());
    assert!(leecher.peer().unwrap().connector.connect(name, tcp).await.is_err());
}

#[tokio::test]
async fn a_replaced_certificate_is_served_to_new_connections() {
    let pki = Pki::new();
    let settings = pki.settings("origin-0", Role::Origin);
    let server = Arc::new(Tls::load(&settings).unwrap());
    let addr = identity_server(server.clone()).await;
    let client =
        Tls::load(&TlsSettings { ca: Some(pki.dir.path().join("ca.pem")), ..Default::default() }).unwrap();
    let connector = shoal_tls::TlsConnector::from(client.client_config());
    let served = || async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let s = connector
            .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        s.get_ref().1.peer_certificates().unwrap()[0].clone()
    };
    let before = served().await;
    assert!(!server.reload_now(), "nothing changed yet");
    let renewed = issue(&pki.ca, "origin-0", Role::Origin, &["localhost".into()], &[], 2).unwrap();
    write(pki.dir.path(), "origin-0", &renewed);
    assert!(server.reload_now());
    let after = served().await;
    assert_ne!(before, after);
    assert_eq!(after.as_ref(), shoal_tls::read_certs(settings.cert.as_ref().unwrap()).unwrap()[0].as_ref());
}

/// A node that connects again is not resumed: a resumed TLS 1.3 session would carry its first
/// handshake's certificate unchecked (and hand out new tickets), so a node could keep its
/// role past the certificate's expiry. Both the registry listener (optional client
/// certificates) and the peer port (required ones) make every handshake in full.
#[tokio::test]
async fn a_node_that_connects_again_makes_a_full_handshake() {
    let pki = Pki::new();
    let server = Tls::load(&pki.settings("origin-0", Role::Origin)).unwrap();
    let client = Tls::load(&pki.settings("agent-0", Role::Agent)).unwrap();
    let http = identity_server(Arc::new(Tls::load(&pki.settings("origin-1", Role::Origin)).unwrap())).await;
    let peer = peer_echo(&server).await;
    let registry = shoal_tls::TlsConnector::from(client.client_config());
    let connectors = [(http, &registry), (peer, &client.peer().unwrap().connector)];
    for (addr, connector) in connectors {
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        for attempt in 0..3 {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut s = connector.connect(name.clone(), tcp).await.unwrap();
            // TLS 1.3 tickets arrive after the handshake: read until the server closes.
            let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got).await;
            let kind = s.get_ref().1.handshake_kind();
            assert_eq!(kind, Some(rustls::HandshakeKind::Full), "connection {attempt} to {addr}");
        }
    }
}

/// The workspace's HTTP client follows no redirect: a 307 from anything between two Shoal
/// processes is answered to the caller, and the place it names is never sent the request's
/// headers (a client's upstream credentials, the cluster secret).
#[tokio::test]
async fn the_http_client_follows_no_redirect() {
    let elsewhere = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = elsewhere.local_addr().unwrap();
    let visited = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = visited.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = elsewhere.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
        }
    });
    let redirecting = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = redirecting.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = redirecting.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let reply = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://{target}/\r\ncontent-length: 0\r\n\r\n"
            );
            let _ = s.write_all(reply.as_bytes()).await;
        }
    });
    let client = shoal_tls::http_client_with(&Tls::plain()).build().unwrap();
    let reply = client
        .get(format!("http://{addr}/v2/team/app/blobs/sha256:00"))
        .header("x-shoal-upstream-authorization", "Basic c2VjcmV0")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), reqwest::StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(visited.load(std::sync::atomic::Ordering::SeqCst), 0, "the redirect was followed");
}
