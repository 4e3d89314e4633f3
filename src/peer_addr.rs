//! The peer address a node announces: its listener's, unless that is a wildcard, in which case
//! `--peer-advertise` must say how others reach it (as in the Helm chart).

use std::net::{IpAddr, SocketAddr};

/// `--peer-advertise`'s value: `ip:port`, `[ipv6]:port`, or an IPv6 address without brackets
/// followed by `:port`. The Helm chart builds the flag from the pod's or node's IP
/// (`$(POD_IP):7001`), which Kubernetes gives without brackets, so on an IPv6 cluster the
/// value was `fd00::5:7001` and the node refused to start.
pub fn parse_advertise(value: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bad =
        || format!("{value:?} is not an address and port (10.0.0.5:7001, [fd00::5]:7001 or fd00::5:7001)");
    let (ip, port) = value.rsplit_once(':').ok_or_else(bad)?;
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    Ok(SocketAddr::new(ip, port))
}

/// Pick the address to announce for a peer listener bound at `bound`.
pub fn advertised(bound: SocketAddr, advertise: Option<SocketAddr>) -> anyhow::Result<SocketAddr> {
    match advertise {
        Some(a) => Ok(a),
        None if bound.ip().is_unspecified() => {
            anyhow::bail!("--peer-listen {bound} is a wildcard address: give --peer-advertise ADDR")
        }
        None => Ok(bound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_address_may_come_without_brackets() {
        let v6: SocketAddr = "[fd00::5]:7001".parse().unwrap();
        assert_eq!(parse_advertise("fd00::5:7001").unwrap(), v6);
        assert_eq!(parse_advertise("[fd00::5]:7001").unwrap(), v6);
        assert_eq!(parse_advertise("10.0.0.5:7001").unwrap(), "10.0.0.5:7001".parse().unwrap());
        for bad in ["", "fd00::5", "10.0.0.5", "host:7001", "10.0.0.5:70000", "[fd00::5]", ":7001"] {
            assert!(parse_advertise(bad).is_err(), "{bad:?} was taken");
        }
    }

    #[test]
    fn wildcard_needs_an_advertised_address() {
        let any: SocketAddr = "0.0.0.0:7001".parse().unwrap();
        let me: SocketAddr = "10.0.0.5:7001".parse().unwrap();
        assert!(advertised(any, None).is_err());
        assert_eq!(advertised(any, Some(me)).unwrap(), me);
        assert_eq!(advertised(me, None).unwrap(), me);
    }
}
