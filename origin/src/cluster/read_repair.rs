//! [`ReadRepairs`]: the read repairs a coordinator runs in the background (a read that finds
//! an owner stale sends it the winning records), bounded.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Read repairs that may run at once. A read that finds a stale owner while this many run
/// leaves it to the repair pass and to the next read of the same records.
pub const MAX_READ_REPAIRS: usize = 32;

/// The read repairs in flight, at most [`MAX_READ_REPAIRS`] and one per origin and
/// repository: an owner that keeps failing the apply (or answers slowly) would otherwise
/// collect one background task per read of its stale records.
#[derive(Debug, Default)]
pub struct ReadRepairs {
    running: Mutex<HashSet<(String, String)>>,
}

/// One running read repair; it leaves the set when dropped.
pub(crate) struct RepairSlot {
    repairs: Arc<ReadRepairs>,
    key: (String, String),
}

impl ReadRepairs {
    /// A slot for repairing `repo` on `origin`, unless one runs already or the cap is reached.
    pub(crate) fn claim(self: &Arc<Self>, origin: &str, repo: &str) -> Option<RepairSlot> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if running.len() >= MAX_READ_REPAIRS {
            return None;
        }
        let key = (origin.to_string(), repo.to_string());
        running.insert(key.clone()).then(|| RepairSlot { repairs: self.clone(), key })
    }

    /// How many run now.
    pub fn running(&self) -> usize {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for RepairSlot {
    fn drop(&mut self) {
        self.repairs.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}
