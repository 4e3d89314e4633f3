//! What a download counts for the I/O side's metrics (and the simulator's detail line),
//! taken with [`SwarmState::take_rotations`] and [`SwarmState::take_duplicate_requests`].

#[cfg(doc)]
use super::SwarmState;

/// Peers this download traded away for a new one ([`SwarmState::take_rotations`]): so a run can
/// tell how often rotation fired, and how often it had to wait for a piece on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rotations {
    /// Victims with nothing in flight, disconnected at once.
    pub immediate: u64,
    /// Victims with a piece on the wire, retired: disconnected after it arrives.
    pub retiring: u64,
}

/// Requests this download sent for a piece it had already asked another peer for
/// ([`SwarmState::take_duplicate_requests`]): the cause of duplicate bytes, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DuplicateRequests {
    /// Every earlier request for the piece was late (`flow::is_late`).
    pub late: u64,
    /// This peer would deliver it much sooner than the request out (`flow::worth_duplicating`).
    pub faster: u64,
}

impl std::ops::AddAssign for DuplicateRequests {
    fn add_assign(&mut self, other: DuplicateRequests) {
        self.late += other.late;
        self.faster += other.faster;
    }
}

impl std::ops::AddAssign for Rotations {
    fn add_assign(&mut self, other: Rotations) {
        self.immediate += other.immediate;
        self.retiring += other.retiring;
    }
}
