//! Peer identity: a random 20-byte id each agent picks at start-up.
//!
//! Ids let a swarm tell connections apart (and notice a connection to itself) without trusting
//! addresses, which NAT and restarts make ambiguous. They carry no authority.

use std::fmt;
use std::str::FromStr;

/// Length of a peer id in bytes (the BitTorrent size, so ids fit the same tooling).
pub const PEER_ID_LEN: usize = 20;

/// A peer's identity in the swarm; printed and serialized as 40 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub [u8; PEER_ID_LEN]);

impl PeerId {
    /// A fresh id from the OS-seeded thread RNG; collisions are negligible at 160 bits.
    pub fn random() -> PeerId {
        PeerId(rand::random())
    }

    /// The raw bytes, as sent in the handshake.
    pub fn as_bytes(&self) -> &[u8; PEER_ID_LEN] {
        &self.0
    }
}

/// Why a string is not a peer id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("peer id must be {} hex characters", PEER_ID_LEN * 2)]
pub struct PeerIdError;

impl FromStr for PeerId {
    type Err = PeerIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut id = [0u8; PEER_ID_LEN];
        hex::decode_to_slice(s, &mut id).map_err(|_| PeerIdError)?;
        Ok(PeerId(id))
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({self})")
    }
}

impl serde::Serialize for PeerId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PeerId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_differ() {
        assert_ne!(PeerId::random(), PeerId::random());
    }

    #[test]
    fn displays_and_parses_as_hex() {
        let id = PeerId([0xab; PEER_ID_LEN]);
        let s = id.to_string();
        assert_eq!(s, "ab".repeat(20));
        assert_eq!(s.parse::<PeerId>(), Ok(id));
        assert_eq!(format!("{id:?}"), format!("PeerId({s})"));
    }

    #[test]
    fn rejects_bad_strings() {
        assert_eq!("".parse::<PeerId>(), Err(PeerIdError));
        assert_eq!("ab".repeat(19).parse::<PeerId>(), Err(PeerIdError));
        assert_eq!("ab".repeat(21).parse::<PeerId>(), Err(PeerIdError));
        assert_eq!("zz".repeat(20).parse::<PeerId>(), Err(PeerIdError));
    }

    #[test]
    fn serde_uses_the_hex_string() {
        let id = PeerId::random();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<PeerId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<PeerId>("\"nothex\"").is_err());
    }
}
