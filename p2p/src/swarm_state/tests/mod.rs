//! The state machine driven by hand-made events: every policy of the module docs, one file
//! per part of it; the helpers that build states and drive them are here.

use super::*;
use shoal_registry::{Algorithm, Digest};

const PIECE: u64 = 1024 * 1024;

mod fallback;
mod incast;
mod peers;
mod requests;
mod stalls;

fn meta(pieces: u32) -> Metainfo {
    let size = u64::from(pieces) * PIECE;
    Metainfo::unverifiable(Digest::of(Algorithm::Sha256, b"blob"), size, PIECE).unwrap()
}

fn peer(n: u8) -> PeerId {
    PeerId([n; 20])
}

fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, n], 4000))
}

fn info(n: u8, origin: bool) -> PeerInfo {
    PeerInfo { peer_id: peer(n).to_string(), addr: addr(n), complete: origin, origin }
}

fn state(pieces: u32, cfg: SchedulerConfig, t0: Instant) -> SwarmState {
    let me = peer(0);
    SwarmState::with_rng(cfg, me, addr(0), &meta(pieces), Bitfield::new(pieces), t0, StdRng::seed_from_u64(7))
        .unwrap()
}

/// A connection's cumulative bytes, all of them bytes of requested pieces.
fn got(n: u64) -> ConnBytes {
    ConnBytes { all: n, pieces: n }
}

fn requests(actions: &[Action]) -> Vec<(PeerId, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Request { peer, index } => Some((*peer, *index)),
            _ => None,
        })
        .collect()
}

/// Connect peers 1..=n, each holding every piece, through an announce.
fn with_seeders(s: &mut SwarmState, n: u8, t: Instant) {
    let peers = (1..=n).map(|i| info(i, false)).collect();
    let connects = s.announced(Some(peers), Duration::from_secs(5), t);
    assert_eq!(connects.iter().filter(|a| matches!(a, Action::Connect(_))).count(), n as usize);
    for i in 1..=n {
        assert!(s.connected(peer(i), addr(i), Bitfield::full(s.picker().piece_count()), t));
    }
}

/// Let `bytes_per_tick` arrive from each of `peers` per 200 ms tick, storing whole pieces as
/// they complete, for `ticks` ticks; returns the time and the per-peer byte counters.
fn run(
    s: &mut SwarmState,
    mut t: Instant,
    counters: &mut HashMap<PeerId, u64>,
    rates: &HashMap<PeerId, u64>,
    ticks: u32,
    node_rate: Option<f64>,
) -> (Instant, Vec<Action>) {
    let mut all = Vec::new();
    let mut progress: HashMap<PeerId, u64> = HashMap::new();
    for _ in 0..ticks {
        t += Duration::from_millis(200);
        let mut samples = Vec::new();
        for (id, rate) in rates {
            if s.picker().in_flight_for(id) == 0 {
                samples.push((*id, got(counters.get(id).copied().unwrap_or(0))));
                continue;
            }
            let c = counters.entry(*id).or_default();
            *c += rate / 5;
            let p = progress.entry(*id).or_default();
            *p += rate / 5;
            samples.push((*id, got(*c)));
            // Deliver whole pieces in request order.
            while *p >= PIECE {
                let next = s.picker().requests_to(id).first().copied();
                let Some(index) = next else { break };
                *p -= PIECE;
                all.extend(s.stored(*id, index, Stored::Ok, t).unwrap());
            }
        }
        all.extend(s.tick(t, &samples).unwrap());
        all.extend(s.fill(t, node_rate, 0));
    }
    (t, all)
}
