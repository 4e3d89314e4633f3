//! What a simulated fleet is made of, with the defaults that match the real agents and the
//! netns fleet benchmark (`integration/bench/fleet.sh`). Scenarios build on these.

use std::time::Duration;

use shoal_p2p::swarm_state::SchedulerConfig;

/// TCP goodput over a tbf-shaped link, as a share of its rate: one host alone fetching over
/// plain HTTP took 1.05 × size ÷ rate on the benchmark's links (1448-byte payloads in
/// 1514-byte Ethernet frames, which tbf counts).
pub const GOODPUT_EFFICIENCY: f64 = 1.0 / 1.05;

/// The ACKs of a download, as a share of its bytes, on the reverse links (receiver's uplink,
/// sender's downlink): 66-byte ACKs for every two 1514-byte frames is 2.2 %; the benchmark
/// saw hosts receive ≈ 2 % more than their downloads because of their uploads' ACKs.
pub const ACK_OVERHEAD: f64 = 0.02;

/// Round-trip time between any two hosts when nothing is queued (netns veths over a bridge:
/// well under a millisecond).
pub const DEFAULT_BASE_RTT: Duration = Duration::from_micros(200);

/// Queueing delay a request meets on a busy shaped link, added to every round trip: tbf's
/// queue holds 50 ms of the link's rate (`latency 50ms` in netns.sh); TCP keeps such a queue
/// partly full, so a request waits about half of it behind the data ahead of it.
pub const DEFAULT_QUEUE_DELAY: Duration = Duration::from_millis(25);

/// Rate of the slow hosts in the straggler scenario, relative to the others (issue 9's mix:
/// a quarter of the hosts at a fifth of the rate).
pub const STRAGGLER_FACTOR: f64 = 0.2;

/// Inbound peer connections an agent accepts (`max_peer_connections`).
pub const AGENT_MAX_INBOUND: usize = 512;
/// Inbound peer connections an origin accepts.
pub const ORIGIN_MAX_INBOUND: usize = 1024;
/// The tracker's announce interval (agents and trackers default to 3 s).
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(3);
/// Peers per tracker answer (`handout_limit`).
pub const HANDOUT_LIMIT: usize = 50;
/// How long the tracker reuses an origin's list of seeders (`seeder_ttl`).
pub const SEEDER_CACHE_TTL: Duration = Duration::from_secs(10);
/// The origin's super-seeding window (`SuperSeed::new` in `src/origin.rs`).
pub const SUPER_SEED_WINDOW: Duration = Duration::from_secs(3);
/// The download loop's housekeeping period (`TICK` in `p2p/src/swarm.rs`).
pub const TICK: Duration = Duration::from_millis(200);

/// One simulated host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostSpec {
    /// When it starts pulling, from the run's start.
    pub start: Duration,
    /// Its link rate relative to `FleetConfig::host_bps` (stragglers are slower).
    pub rate_factor: f64,
    /// When it leaves (the process dies), if it does.
    pub leave_at: Option<Duration>,
}

impl HostSpec {
    pub fn at(start: Duration) -> HostSpec {
        HostSpec { start, rate_factor: 1.0, leave_at: None }
    }
}

/// A fleet and what happens to it.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub hosts: Vec<HostSpec>,
    /// The image's blobs (layers), in bytes; every host pulls all of them at once.
    pub layers: Vec<u64>,
    /// Each host's link rate, bits/s, both directions.
    pub host_bps: f64,
    /// Each origin's link rate, bits/s, both directions.
    pub origin_bps: f64,
    /// Origins seeding every blob (each super-seeds on its own).
    pub origins: usize,
    /// The first origin dies at this time.
    pub origin_lost_at: Option<Duration>,
    /// No tracker answers.
    pub tracker_dead: bool,
    /// Round trip between hosts: base plus queueing delay.
    pub rtt: Duration,
    pub efficiency: f64,
    pub ack_overhead: f64,
    /// Rates are recomputed at most this often (0: after every change, exact).
    pub rate_epoch: Duration,
    pub seed: u64,
    /// The agents' scheduler settings (the real defaults).
    pub scheduler: SchedulerConfig,
    /// Outbound connections per node (`max_outbound_connections`).
    pub max_outbound: usize,
    /// Piece length of every blob; `None`: what the origins choose (`piece_length_for`).
    pub piece_length: Option<u64>,
    /// Simulated time after which the run stops, whatever is unfinished.
    pub time_limit: Duration,
    /// Print a line a simulated second to stderr (progress, connections, requests).
    pub trace: bool,
    /// Peers an agent serves one blob to at once (`max_peers_per_blob`); `None`: no cap.
    pub max_peers_per_blob: Option<usize>,
    /// Pieces an origin sends at once (its `peer_upload_slots`); `None`: no limit.
    pub origin_upload_slots: Option<usize>,
    /// Pieces an agent sends at once; `None`: no limit (the agent's rule).
    pub agent_upload_slots: Option<usize>,
    /// Peers an agent sends one piece to at once (`max_sends_per_piece`); `None`: no limit.
    pub max_sends_per_piece: Option<usize>,
}

impl FleetConfig {
    /// `peers` hosts starting at once, one blob of `blob_bytes`, the given link rates.
    pub fn new(peers: usize, blob_bytes: u64, host_bps: f64, origin_bps: f64) -> FleetConfig {
        let limit = blob_bytes as f64 * 8.0 / host_bps.max(1.0);
        FleetConfig {
            hosts: vec![HostSpec::at(Duration::ZERO); peers],
            layers: vec![blob_bytes],
            host_bps,
            origin_bps,
            origins: 1,
            origin_lost_at: None,
            tracker_dead: false,
            rtt: DEFAULT_BASE_RTT + DEFAULT_QUEUE_DELAY,
            efficiency: GOODPUT_EFFICIENCY,
            ack_overhead: ACK_OVERHEAD,
            rate_epoch: default_rate_epoch(peers),
            seed: 1,
            scheduler: SchedulerConfig::default(),
            max_outbound: shoal_p2p::node::DEFAULT_MAX_OUTBOUND_CONNECTIONS,
            piece_length: None,
            time_limit: Duration::from_secs_f64((limit * 50.0).max(600.0)),
            trace: false,
            max_peers_per_blob: Some(shoal_p2p::server::DEFAULT_MAX_PEERS_PER_BLOB),
            origin_upload_slots: Some(shoal_p2p::server::DEFAULT_ORIGIN_UPLOAD_SLOTS),
            agent_upload_slots: None,
            max_sends_per_piece: Some(shoal_p2p::piece_sends::DEFAULT_SENDS_PER_PIECE),
        }
    }

    /// Total bytes of the image.
    pub fn image_bytes(&self) -> u64 {
        self.layers.iter().sum()
    }

    /// The time a host at full rate needs for the image over its link: size ÷ rate.
    pub fn limit_secs(&self, rate_factor: f64) -> f64 {
        self.image_bytes() as f64 * 8.0 / (self.host_bps * rate_factor)
    }
}

/// Exact rates (recomputed after every change) for small fleets; at most every 20 ms for
/// large ones, where recomputing a hundred thousand flows' rates after every piece would
/// dominate the run (a new flow waits at most that long for its share: a fraction of the
/// round trip it needed to start anyway).
pub fn default_rate_epoch(peers: usize) -> Duration {
    if peers <= 200 {
        Duration::ZERO
    } else {
        Duration::from_millis(20)
    }
}
