//! The peer address a node announces: its listener's, unless that is a wildcard, in which case
//! `--peer-advertise` must say how others reach it (as in the Helm chart).

use std::net::SocketAddr;

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
    fn wildcard_needs_an_advertised_address() {
        let any: SocketAddr = "0.0.0.0:7001".parse().unwrap();
        let me: SocketAddr = "10.0.0.5:7001".parse().unwrap();
        assert!(advertised(any, None).is_err());
        assert_eq!(advertised(any, Some(me)).unwrap(), me);
        assert_eq!(advertised(me, None).unwrap(), me);
    }
}
