//! `shoal-sim`: Shoal's swarm at fleet scale on one machine. A deterministic discrete-event
//! simulation in which every host runs the project's own download state machine, every
//! origin its own super-seeding rule and the tracker its own store and handout; only
//! sockets and time are simulated. A 2-core machine emulates about 20 real hosts in network
//! namespaces; past that, this is how the fleet's behaviour is shown.
//!
//! - [`fluid`]: links, flows and max-min fair rates.
//! - [`config`]: a fleet and its defaults; [`scenario`]: the named situations.
//! - [`world`]: the event loop that drives the real code.
//! - [`report`]: percentiles and the summary line; [`svg`]: the sweep's plot.

pub mod config;
pub mod fluid;
pub mod report;
pub mod scenario;
pub mod svg;
pub mod world;

pub use config::{FleetConfig, HostSpec};
pub use report::Outcome;
pub use world::{Sim, SimError};

/// Run a fleet to the end.
pub fn run(cfg: FleetConfig) -> Result<Outcome, SimError> {
    Ok(Sim::new(cfg)?.run())
}
