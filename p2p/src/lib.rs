//! Shoal's data plane: everything needed to move a blob between peers as verified pieces.
//!
//! The swarm's event loop (in the agent and origin) is built from these small parts, each of
//! which is pure or blocking-only and tested on its own:
//!
//! - [`metainfo`]: how a blob is cut into pieces and the hash state after each ([`chain`]), so
//!   every piece from an untrusted peer can be checked before it is stored or served, and the
//!   checked pieces prove the blob's digest.
//! - [`bitfield`]: which pieces a peer has, in BitTorrent's bit order.
//! - [`peer`]: random peer ids.
//! - [`wire`]: the peer protocol's frames, as a `tokio_util` codec.
//! - [`piece_store`]: the preallocated file and crash-safe bitfield a download is assembled in.
//! - [`picker`]: which pieces to request from whom (readers first, rarest first, endgame),
//!   with no I/O and time passed in.
//! - [`flow`]: delivery rates measured from arriving bytes, and the pipelining depths,
//!   in-flight budget and stall rule derived from them; [`node`]: what a node's downloads
//!   share (its measured ingress and its bytes in flight).
//! - [`swarm_state`]: one download's decisions as a pure state machine (requests, cancels,
//!   connects, stalls, fallback, announces), given events and a clock.
//! - [`blacklist`]: strikes and expiring bans for peers that misbehave or stall.
//! - [`blob`]: a blob as the swarm sees it, partial or complete, readable while it fills.
//! - [`swarm`]: one blob's download: the event loop that runs the state machine and the connections
//!   ([`conn`]), announces to the tracker ([`tracker_client`], batched per node by
//!   [`announcer`]) and falls back to an origin.
//! - [`failover`]: which of several equivalent origins to ask, moving on from dead ones.
//! - [`inbound`]: what an untrusted peer can make a node hold (connections per address, frame
//!   size before the handshake, pieces nobody requested).
//! - [`server`]: serves pieces to other peers; [`super_seed`]: the origins' rule for sending
//!   each piece about once; [`limiter`]: node-wide bandwidth limits;
//!   [`metrics`]: what proves the swarm works.

pub mod announcer;
pub mod bitfield;
pub mod bitfield_file;
pub mod blacklist;
pub mod blob;
pub mod chain;
pub mod conn;
pub mod failover;
pub mod flow;
pub mod inbound;
pub mod incast;
pub mod limiter;
pub mod metainfo;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod picker;
pub mod piece_sends;
pub mod piece_store;
pub mod rendezvous;
pub mod server;
pub mod super_seed;
pub mod swarm;
pub mod swarm_state;
pub mod tracker_client;
pub mod transport;
pub mod wire;
pub mod writer;

pub use bitfield::{Bitfield, BitfieldError};
pub use blacklist::{Blacklist, BlacklistConfig};
pub use failover::{Failover, FailoverError};
pub use metainfo::{piece_length_for, Metainfo, MetainfoError};
pub use metrics::SwarmMetrics;
pub use peer::{PeerId, PeerIdError};
pub use picker::{PickerConfig, PickerError, PiecePicker};
pub use piece_store::{PieceError, PieceFile};
pub use wire::{Message, PeerCodec, WireError, PROTOCOL_VERSION};
