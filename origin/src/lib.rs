//! Shoal's origin: the durable copy of every blob and tag, behind the registry API.

pub mod cluster;
mod fsutil;
mod layout;
mod meta;
pub mod pullthrough;
mod recovery;
mod seeding;
mod store;
pub mod upload_watch;
mod uploads;

pub use layout::Layout;
pub use store::{upload_home, OriginStore, StoreConfig, DEFAULT_MAX_UPLOAD_SESSIONS};
