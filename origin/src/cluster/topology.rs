//! [`Topology`]: who is in the cluster right now and how to reach each origin. The cluster
//! logic asks it on every operation, so a membership change takes effect at once.

use std::sync::Arc;

use crate::cluster::node::Node;

/// The live origins and a handle on each.
pub trait Topology: Send + Sync + 'static {
    /// This origin's id.
    fn me(&self) -> &str;
    /// Ids of the origins currently up, this one included.
    fn live(&self) -> Vec<String>;
    /// Ids of every known member, up or down, this one included.
    fn members(&self) -> Vec<String>;
    /// Every known member that has answered, as it names itself (its advertised id), this
    /// one included, sorted: what garbage collection remembers of a member list (see
    /// `cluster::collected`). A member that comes back under another address (a `dns+`
    /// name's new IP) is the same member.
    fn identities(&self) -> Vec<String> {
        let mut ids = self.members();
        ids.sort();
        ids.dedup();
        ids
    }
    /// Whether member `id` takes new copies (its disk is not nearly full).
    fn accepts_writes(&self, _id: &str) -> bool {
        true
    }
    /// Whether member `id` takes a repository's records: as [`accepts_writes`](Self::accepts_writes)
    /// but whatever its disk (records are a few KiB).
    fn takes_records(&self, _id: &str) -> bool {
        true
    }
    /// A handle on an origin (this one included), if it is a member.
    fn node(&self, id: &str) -> Option<Arc<dyn Node>>;
    /// A counter that changes whenever the live set does (repair watches it).
    fn generation(&self) -> u64;
    /// A live member that names another member list than this origin's, if any (GC waits).
    fn disagreeing_member(&self) -> Option<String> {
        None
    }
}

/// A cluster of one: a lone origin, or a test.
pub struct SingleTopology {
    node: Arc<dyn Node>,
    id: String,
}

impl SingleTopology {
    pub fn new(node: Arc<dyn Node>) -> SingleTopology {
        SingleTopology { id: node.id().to_string(), node }
    }
}

impl Topology for SingleTopology {
    fn me(&self) -> &str {
        &self.id
    }

    fn live(&self) -> Vec<String> {
        vec![self.id.clone()]
    }

    fn members(&self) -> Vec<String> {
        vec![self.id.clone()]
    }

    fn node(&self, id: &str) -> Option<Arc<dyn Node>> {
        (id == self.id).then(|| self.node.clone())
    }

    fn generation(&self) -> u64 {
        0
    }
}

/// The cluster as membership sees it: live origins from health checks, each reached over the
/// internal API through a client created on first use and dropped once its origin leaves the
/// member list.
pub struct MemberTopology {
    membership: Arc<crate::cluster::membership::Membership>,
    local: Arc<dyn Node>,
    secret: Option<String>,
    call_timeout: std::time::Duration,
    remotes: std::sync::Mutex<Remotes>,
}

/// The clients of other origins, as of one membership generation.
#[derive(Default)]
struct Remotes {
    generation: u64,
    /// By origin id (its address: the URL follows from it).
    nodes: std::collections::HashMap<String, Arc<dyn Node>>,
}

impl MemberTopology {
    pub fn new(
        membership: Arc<crate::cluster::membership::Membership>,
        local: Arc<dyn Node>,
        secret: Option<String>,
        call_timeout: std::time::Duration,
    ) -> MemberTopology {
        MemberTopology { membership, local, secret, call_timeout, remotes: Default::default() }
    }

    pub fn membership(&self) -> &Arc<crate::cluster::membership::Membership> {
        &self.membership
    }

    /// The origins this topology holds a client for, sorted.
    pub fn clients(&self) -> Vec<String> {
        let remotes = self.remotes.lock().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<String> = remotes.nodes.keys().cloned().collect();
        ids.sort();
        ids
    }
}

impl Topology for MemberTopology {
    fn me(&self) -> &str {
        self.membership.me()
    }

    fn live(&self) -> Vec<String> {
        self.membership.live()
    }

    fn members(&self) -> Vec<String> {
        self.membership.members().into_iter().map(|m| m.id).collect()
    }

    fn identities(&self) -> Vec<String> {
        self.membership.identities()
    }

    fn accepts_writes(&self, id: &str) -> bool {
        self.membership.accepts_writes(id)
    }

    fn takes_records(&self, id: &str) -> bool {
        self.membership.takes_records(id)
    }

    fn disagreeing_member(&self) -> Option<String> {
        self.membership.disagreeing_member()
    }

    fn node(&self, id: &str) -> Option<Arc<dyn Node>> {
        if id == self.me() {
            return Some(self.local.clone());
        }
        let url = self.membership.url(id)?;
        let generation = self.generation();
        let mut remotes = self.remotes.lock().unwrap_or_else(|p| p.into_inner());
        if remotes.generation != generation {
            let membership = &self.membership;
            remotes.nodes.retain(|id, _| membership.url(id).is_some());
            remotes.generation = generation;
        }
        if let Some(node) = remotes.nodes.get(id) {
            return Some(node.clone());
        }
        let node = crate::cluster::remote::RemoteNode::new(
            id.to_string(),
            url,
            self.secret.clone(),
            self.call_timeout,
        )
        .map_err(|e| tracing::warn!(origin = %id, error = %e, "cannot build a client"))
        .ok()?;
        let node: Arc<dyn Node> = Arc::new(node);
        remotes.nodes.insert(id.to_string(), node.clone());
        Some(node)
    }

    fn generation(&self) -> u64 {
        *self.membership.changes().borrow()
    }
}
