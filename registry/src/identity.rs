//! Who the transport says a client is. When a listener runs TLS with a cluster CA, a client
//! that presents a certificate the CA signed is one of the cluster's own processes; the HTTP
//! server puts its identity on each request as an extension, and handlers decide from it
//! (origins serve `/shoal/v1/*` and private repositories to nodes, trackers accept
//! complete-peer claims only from them). Plain connections and clients without a
//! certificate carry no identity.

use std::fmt;

/// What a cluster certificate was issued for: its subject's organizational unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// An origin: the write side; may call other origins' internal API.
    Origin,
    /// A tracker.
    Tracker,
    /// An agent on a node.
    Agent,
    /// An operator's tool: the admin API, nothing else.
    Admin,
}

impl Role {
    /// Every role, in the order `shoal certs` lists them.
    pub const ALL: [Role; 4] = [Role::Origin, Role::Tracker, Role::Agent, Role::Admin];

    /// The organizational unit a certificate of this role carries.
    pub fn unit(self) -> &'static str {
        match self {
            Role::Origin => "shoal-origin",
            Role::Tracker => "shoal-tracker",
            Role::Agent => "shoal-agent",
            Role::Admin => "shoal-admin",
        }
    }

    /// The role named by an organizational unit, if it is one of Shoal's.
    pub fn from_unit(unit: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.unit() == unit)
    }

    /// A process of the cluster itself (not an operator).
    pub fn is_node(self) -> bool {
        self != Role::Admin
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.unit())
    }
}

/// Marks a request that came over TLS to a listener that verifies node certificates, where a
/// node would have shown one (the HTTP server puts it in the request's extensions: a header
/// could be sent by anyone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodesVerified;

/// The identity of a client that proved, during the TLS handshake, that it holds a
/// certificate the cluster CA signed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TransportIdentity {
    /// The certificate's common name (a node or operator name).
    pub name: String,
    pub role: Role,
}

impl fmt::Display for TransportIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_round_trip() {
        for r in Role::ALL {
            assert_eq!(Role::from_unit(r.unit()), Some(r));
        }
        assert_eq!(Role::from_unit("engineering"), None);
        assert!(!Role::Admin.is_node());
        assert!(Role::Agent.is_node());
    }
}
