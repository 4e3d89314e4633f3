//! Hand-written HTTP/1.1 over a `TcpStream`.
//!
//! reqwest normalizes paths (`a/../b` becomes `b`) and always finishes the
//! bodies it starts. Some tests need exactly what it will not do: send a path
//! verbatim, stop half-way through a body and hang up, or keep a request in
//! flight for as long as they like. Responses are read until the server closes
//! the connection (`Connection: close`) and turned into a [`Reply`].

use crate::api::Reply;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request written by hand on its own connection.
pub struct RawConnection {
    stream: TcpStream,
    method: Method,
    url: String,
}

impl RawConnection {
    /// Connects to the registry at `base` and writes the request line and
    /// headers. `Host` and `Connection: close` are added; the body (if any,
    /// announced by a `Content-Length` or `Transfer-Encoding` among `headers`)
    /// follows with [`send`](Self::send).
    pub async fn open(base: &str, method: Method, target: &str, headers: &[(&str, String)]) -> RawConnection {
        let base_url = Url::parse(base).expect("parse the base URL");
        let host = base_url.host_str().expect("base URL has a host");
        let port = base_url.port_or_known_default().expect("base URL has a port");
        let stream = TcpStream::connect((host, port))
            .await
            .unwrap_or_else(|e| panic!("connect to {host}:{port}: {e}"));
        stream.set_nodelay(true).ok();
        let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        // Against an external registry that needs them, the credentials every client sends.
        let has_auth = headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("authorization"));
        if let Some((user, password)) = crate::origin::external_credentials().filter(|_| !has_auth) {
            use base64::Engine as _;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            head.push_str(&format!("Authorization: Basic {token}\r\n"));
        }
        head.push_str("Connection: close\r\n\r\n");
        let mut connection =
            RawConnection { stream, method, url: format!("{}{target}", base.trim_end_matches('/')) };
        connection.send(head.as_bytes()).await.expect("write the request head");
        connection
    }

    /// Writes part of the body. Fails if the server has closed the connection.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Reads the response until the server closes the connection.
    pub async fn finish(mut self) -> Reply {
        let mut buf = Vec::new();
        self.stream
            .read_to_end(&mut buf)
            .await
            .unwrap_or_else(|e| panic!("{} {}: reading the response: {e}", self.method, self.url));
        parse_response(self.method, self.url, &buf)
    }

    /// Like [`finish`](Self::finish), but gives up after `timeout` (the
    /// server has not answered yet) and returns the connection untouched.
    pub async fn answer_within(mut self, timeout: Duration) -> Result<Reply, RawConnection> {
        let mut buf = Vec::new();
        match tokio::time::timeout(timeout, self.stream.read_to_end(&mut buf)).await {
            Ok(_) => Ok(parse_response(self.method, self.url, &buf)),
            Err(_) => Err(self),
        }
    }
}

/// A complete request with a body, sent verbatim.
pub async fn raw_request(
    base: &str,
    method: Method,
    target: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Reply {
    let mut all: Vec<(&str, String)> = headers.to_vec();
    all.push(("Content-Length", body.len().to_string()));
    let mut connection = RawConnection::open(base, method, target, &all).await;
    // The server may answer (and close) before reading a body it rejects.
    let _ = connection.send(body).await;
    connection.finish().await
}

/// The request target (path and query) of an absolute or relative URL.
pub fn request_target(location: &str) -> String {
    match Url::parse(location) {
        Ok(url) => match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_string(),
        },
        Err(_) => location.to_string(),
    }
}

fn parse_response(method: Method, url: String, raw: &[u8]) -> Reply {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| {
        panic!("{method} {url}: no complete response head in {:?}", String::from_utf8_lossy(raw))
    });
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let rest = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or_else(|| panic!("{method} {url}: bad status line {status_line:?}"));
    let mut headers = HeaderMap::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if let (Ok(name), Ok(value)) =
                (HeaderName::from_bytes(name.trim().as_bytes()), HeaderValue::from_str(value.trim()))
            {
                headers.append(name, value);
            }
        }
    }
    let chunked = headers
        .get("transfer-encoding")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        decode_chunked(rest)
    } else {
        let length = headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(rest.len());
        rest[..length.min(rest.len())].to_vec()
    };
    Reply { method, url, status, headers, body, body_error: None }
}

fn decode_chunked(mut data: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size_line = String::from_utf8_lossy(&data[..eol]);
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_hex, 16) else {
            break;
        };
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            body.extend_from_slice(&data[..size.min(data.len())]);
            break;
        }
        body.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_chunked_response() {
        let raw = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let reply = parse_response(Method::GET, "u".into(), raw);
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
        assert_eq!(reply.body, b"abcde");
        assert_eq!(reply.header("x-a"), Some("b"));
    }

    #[test]
    fn request_targets() {
        assert_eq!(
            request_target("http://127.0.0.1:5000/v2/a/blobs/uploads/x?s=1"),
            "/v2/a/blobs/uploads/x?s=1"
        );
        assert_eq!(request_target("/v2/a/x"), "/v2/a/x");
    }
}
