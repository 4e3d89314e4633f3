//! The situations the issue names, as fleets: everyone at once, a rolling update, slow
//! hosts, hosts dying mid-pull, a multi-layer image, no tracker, an origin lost.

use std::str::FromStr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::config::{FleetConfig, STRAGGLER_FACTOR};

/// Share of hosts that are slow in the straggler scenario unless `--stragglers` says.
pub const DEFAULT_STRAGGLER_SHARE: f64 = 0.25;
/// Share of hosts that die mid-pull in the churn scenario.
pub const DEFAULT_CHURN_SHARE: f64 = 0.1;
/// Layers of the multi-layer image unless `--layers` says.
pub const DEFAULT_LAYERS: usize = 2;
/// When the first origin dies in the origin-lost scenario, as a share of the link time.
pub const ORIGIN_LOST_AT: f64 = 0.3;

/// A named situation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    AllAtOnce,
    Staggered,
    Stragglers,
    Churn,
    Layers,
    DeadTracker,
    OriginLost,
}

impl Scenario {
    pub const ALL: [Scenario; 7] = [
        Scenario::AllAtOnce,
        Scenario::Staggered,
        Scenario::Stragglers,
        Scenario::Churn,
        Scenario::Layers,
        Scenario::DeadTracker,
        Scenario::OriginLost,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::AllAtOnce => "all-at-once",
            Scenario::Staggered => "staggered",
            Scenario::Stragglers => "stragglers",
            Scenario::Churn => "churn",
            Scenario::Layers => "layers",
            Scenario::DeadTracker => "dead-tracker",
            Scenario::OriginLost => "origin-lost",
        }
    }
}

/// The name is not a scenario.
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown scenario {0:?} (all-at-once, staggered, stragglers, churn, layers, dead-tracker, origin-lost)"
)]
pub struct UnknownScenario(String);

impl FromStr for Scenario {
    type Err = UnknownScenario;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scenario::ALL.into_iter().find(|sc| sc.name() == s).ok_or_else(|| UnknownScenario(s.to_string()))
    }
}

/// What the command line sets.
#[derive(Clone, Debug)]
pub struct Params {
    pub peers: usize,
    pub blob_bytes: u64,
    pub host_mbit: f64,
    pub origin_mbit: f64,
    /// Share of slow hosts (any scenario); `None`: the scenario's default.
    pub stragglers: Option<f64>,
    pub seed: u64,
    pub layers: Option<usize>,
    /// Starts spread over this long (staggered); default the link time.
    pub stagger: Option<Duration>,
    pub churn: Option<f64>,
    pub rtt: Option<Duration>,
    pub rate_epoch: Option<Duration>,
    /// Outbound connections per download (the agent's `max_connections_per_blob`); `None`:
    /// the agent's default.
    pub max_connections: Option<usize>,
    /// Peers an agent serves one blob to at once; `None`: the agent's default; 0: no cap.
    pub max_peers_per_blob: Option<usize>,
    /// Pieces an origin sends at once; `None`: the origin's default; 0: no limit.
    pub origin_upload_slots: Option<usize>,
    /// Pieces an agent sends at once; `None` or 0: no limit.
    pub agent_upload_slots: Option<usize>,
    /// Peers an agent sends one piece to at once; `None`: the agent's default; 0: no limit.
    pub max_sends_per_piece: Option<usize>,
    /// Piece length in bytes; `None`: what the origins choose.
    pub piece_length: Option<u64>,
    pub trace: bool,
}

/// The fleet for `scenario` with `p`.
pub fn build(scenario: Scenario, p: &Params) -> FleetConfig {
    let mut cfg = FleetConfig::new(p.peers, p.blob_bytes, p.host_mbit * 1e6, p.origin_mbit * 1e6);
    cfg.seed = p.seed;
    cfg.trace = p.trace;
    if let Some(rtt) = p.rtt {
        cfg.rtt = rtt;
    }
    if let Some(epoch) = p.rate_epoch {
        cfg.rate_epoch = epoch;
    }
    if let Some(n) = p.max_connections {
        cfg.scheduler.max_connections = n;
    }
    if let Some(n) = p.max_peers_per_blob {
        cfg.max_peers_per_blob = (n > 0).then_some(n);
    }
    if let Some(n) = p.origin_upload_slots {
        cfg.origin_upload_slots = (n > 0).then_some(n);
    }
    cfg.agent_upload_slots = p.agent_upload_slots.filter(|&n| n > 0);
    if let Some(n) = p.max_sends_per_piece {
        cfg.max_sends_per_piece = (n > 0).then_some(n);
    }
    cfg.piece_length = p.piece_length;
    let mut rng = StdRng::seed_from_u64(p.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let limit = cfg.limit_secs(1.0);
    let n = p.peers;
    let straggler_share = match (p.stragglers, scenario) {
        (Some(s), _) => s,
        (None, Scenario::Stragglers) => DEFAULT_STRAGGLER_SHARE,
        (None, _) => 0.0,
    };
    let slow = ((n as f64 * straggler_share.clamp(0.0, 1.0)).round() as usize).min(n);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    for &h in &order[..slow] {
        cfg.hosts[h].rate_factor = STRAGGLER_FACTOR;
    }
    match scenario {
        Scenario::AllAtOnce | Scenario::Stragglers => {}
        Scenario::Staggered => {
            // A rolling update: hosts start one after the other, evenly over the window.
            let window = p.stagger.map_or(limit, |d| d.as_secs_f64());
            for (i, h) in cfg.hosts.iter_mut().enumerate() {
                h.start = Duration::from_secs_f64(window * i as f64 / n.max(1) as f64);
            }
        }
        Scenario::Churn => {
            let share = p.churn.unwrap_or(DEFAULT_CHURN_SHARE).clamp(0.0, 1.0);
            let leaving = (n as f64 * share).round() as usize;
            order.shuffle(&mut rng);
            for &h in &order[..leaving.min(n)] {
                let at = limit * rng.random_range(0.2..0.8);
                cfg.hosts[h].leave_at = Some(Duration::from_secs_f64(at));
            }
        }
        Scenario::Layers => {
            let layers = p.layers.unwrap_or(DEFAULT_LAYERS).max(1) as u64;
            let each = p.blob_bytes.div_ceil(layers);
            cfg.layers = (0..layers)
                .map(|i| each.min(p.blob_bytes.saturating_sub(i * each)))
                .filter(|&b| b > 0)
                .collect();
        }
        Scenario::DeadTracker => cfg.tracker_dead = true,
        Scenario::OriginLost => {
            cfg.origins = 2;
            cfg.origin_lost_at = Some(Duration::from_secs_f64(limit * ORIGIN_LOST_AT));
        }
    }
    if scenario != Scenario::Layers {
        if let Some(layers) = p.layers.filter(|&l| l > 1) {
            let each = p.blob_bytes.div_ceil(layers as u64);
            cfg.layers = (0..layers as u64)
                .map(|i| each.min(p.blob_bytes.saturating_sub(i * each)))
                .filter(|&b| b > 0)
                .collect();
        }
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(peers: usize) -> Params {
        Params {
            peers,
            blob_bytes: 64 << 20,
            host_mbit: 50.0,
            origin_mbit: 500.0,
            stragglers: None,
            seed: 1,
            layers: None,
            stagger: None,
            churn: None,
            rtt: None,
            rate_epoch: None,
            max_connections: None,
            max_peers_per_blob: None,
            origin_upload_slots: None,
            agent_upload_slots: None,
            max_sends_per_piece: None,
            piece_length: None,
            trace: false,
        }
    }

    #[test]
    fn scenarios_shape_the_fleet() {
        for s in Scenario::ALL {
            assert_eq!(s.name().parse::<Scenario>().unwrap(), s);
        }
        let p = params(20);
        let slow = build(Scenario::Stragglers, &p).hosts.iter().filter(|h| h.rate_factor < 1.0).count();
        assert_eq!(slow, 5);
        let staggered = build(Scenario::Staggered, &p);
        assert!(staggered.hosts[19].start > staggered.hosts[1].start);
        assert_eq!(build(Scenario::Churn, &p).hosts.iter().filter(|h| h.leave_at.is_some()).count(), 2);
        assert_eq!(build(Scenario::Layers, &p).layers, vec![32 << 20, 32 << 20]);
        assert!(build(Scenario::DeadTracker, &p).tracker_dead);
        assert_eq!(build(Scenario::OriginLost, &p).origins, 2);
    }

    /// More layers than the image has bytes: each layer a byte, the image its own size (the
    /// layers scenario subtracted past zero: a panic, or in release an image of twice the size).
    #[test]
    fn more_layers_than_bytes_make_one_byte_layers() {
        let mut p = params(2);
        p.blob_bytes = 10;
        p.layers = Some(20);
        for s in [Scenario::Layers, Scenario::AllAtOnce] {
            let layers = build(s, &p).layers;
            assert_eq!(layers.iter().sum::<u64>(), 10, "{}", s.name());
            assert!(layers.iter().all(|&b| b == 1), "{}: {layers:?}", s.name());
        }
    }
}
