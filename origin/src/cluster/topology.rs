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
    /// A handle on an origin (this one included), if it is a member.
    fn node(&self, id: &str) -> Option<Arc<dyn Node>>;
    /// A counter that changes whenever the live set does (repair watches it).
    fn generation(&self) -> u64;
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

    fn node(&self, id: &str) -> Option<Arc<dyn Node>> {
        (id == self.id).then(|| self.node.clone())
    }

    fn generation(&self) -> u64 {
        0
    }
}
