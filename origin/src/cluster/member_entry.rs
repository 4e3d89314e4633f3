//! What one member entry of the cluster list means (`host:port`, `dns+name:port`,
//! `srv+_service._tcp.name`) and how an origin's id is spelled. Every origin must spell an id
//! the same way, or they disagree on placement.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// Where members come from: one parsed `--cluster` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A fixed member, by its normalised id.
    Fixed(String),
    /// `dns+name:port`: each A/AAAA address of `host` is a member.
    Dns { host: String, port: u16 },
    /// `srv+_service._tcp.name`: each SRV target is a member.
    Srv(String),
}

impl Source {
    /// Parse one entry; the error says what is wrong with it.
    pub fn parse(entry: &str) -> Result<Source, String> {
        let entry = entry.trim();
        if let Some(rest) = entry.strip_prefix("dns+") {
            let (host, port) = split_host_port(rest)?;
            Ok(Source::Dns { host: check_host_name(host)?, port })
        } else if let Some(rest) = entry.strip_prefix("srv+") {
            Ok(Source::Srv(check_host_name(rest)?))
        } else {
            Ok(Source::Fixed(normalise(entry)?))
        }
    }
}

/// The canonical id of a `host:port` address: IPv6 bracketed and in its shortest form, host
/// names lower-case. Every origin must spell an id the same way, or they disagree on placement.
pub fn normalise(addr: &str) -> Result<String, String> {
    let addr = addr.trim();
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return if sa.port() == 0 { Err("port 0".to_string()) } else { Ok(sa.to_string()) };
    }
    let (host, port) = split_host_port(addr)?;
    if let Ok(ip) = host.parse::<Ipv6Addr>() {
        return Ok(SocketAddr::new(IpAddr::V6(ip), port).to_string());
    }
    Ok(format!("{}:{port}", check_host_name(host)?))
}

/// Split `host:port` at the last colon (an unbracketed IPv6 literal keeps its other colons).
fn split_host_port(addr: &str) -> Result<(&str, u16), String> {
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| "expected host:port".to_string())?;
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    if port == 0 {
        return Err("port 0".to_string());
    }
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() {
        return Err("empty host".to_string());
    }
    Ok((host, port))
}

/// A DNS name, lower-case, without a trailing dot; letters, digits, `-` and `_` only.
fn check_host_name(host: &str) -> Result<String, String> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(format!("bad host name {host:?}"));
    }
    Ok(host.to_ascii_lowercase())
}

/// The scheme of this cluster + id: ids are already `host:port` with IPv6 bracketed.
pub fn url_of(id: &str) -> String {
    format!("{}://{id}", shoal_tls::scheme())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_normalised() {
        let fixed = |e: &str| match Source::parse(e) {
            Ok(Source::Fixed(id)) => id,
            other => panic!("{e}: {other:?}"),
        };
        assert_eq!(fixed("10.0.0.1:5000"), "10.0.0.1:5000");
        assert_eq!(fixed(" Origin-0.Origin.Default.svc:5000 "), "origin-0.origin.default.svc:5000");
        assert_eq!(fixed("origin-0.origin.:5000"), "origin-0.origin:5000");
        assert_eq!(fixed("[::1]:5000"), "[::1]:5000");
        assert_eq!(fixed("[0:0:0:0:0:0:0:1]:5000"), "[::1]:5000");
        assert_eq!(fixed("[FE80::A]:80"), "[fe80::a]:80");
        assert_eq!(fixed("::1:5000"), "[::1]:5000");
        assert_eq!(
            Source::parse("dns+Origin.svc:5000").expect("dns"),
            Source::Dns { host: "origin.svc".to_string(), port: 5000 }
        );
        assert_eq!(
            Source::parse("srv+_shoal._tcp.Origin.svc.").expect("srv"),
            Source::Srv("_shoal._tcp.origin.svc".to_string())
        );
        for bad in [
            "origin",
            "origin:",
            "origin:0",
            "origin:99999",
            ":5000",
            "a b:5000",
            "http://a:5000",
            "dns+a",
            "srv+",
        ] {
            assert!(Source::parse(bad).is_err(), "{bad} should be rejected");
        }
        assert_eq!(url_of(&fixed("[::1]:5000")), "http://[::1]:5000");
    }
}
