//! Shoal's tracker: per blob digest, which peers hold its pieces, and for each announcing peer
//! a good set of others. Soft state only; losing it loses no data.

pub mod api;
pub mod lookups;
pub mod origins;
pub mod peers;
/// The tracker protocol lives in `shoal-p2p`, next to its client.
pub use shoal_p2p::tracker_client as proto;

pub use api::{router, TrackerConfig};
