//! Shoal's tracker: per blob digest, which peers hold its pieces, and for each announcing peer
//! a good set of others. Soft state only; losing it loses no data.

pub mod api;
pub mod origins;
pub mod peers;
pub mod proto;

pub use api::{router, TrackerConfig};
