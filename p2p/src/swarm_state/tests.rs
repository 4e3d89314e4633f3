//! The state machine driven by hand-made events: every policy of the module docs.

use super::*;
use shoal_registry::{Algorithm, Digest};

const PIECE: u64 = 1024 * 1024;

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
                samples.push((*id, counters.get(id).copied().unwrap_or(0)));
                continue;
            }
            let c = counters.entry(*id).or_default();
            *c += rate / 5;
            let p = progress.entry(*id).or_default();
            *p += rate / 5;
            samples.push((*id, *c));
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

#[test]
fn the_first_requests_fit_the_slow_start_budget_and_the_unknown_peer_depth() {
    let t0 = Instant::now();
    let mut s = state(64, SchedulerConfig::default(), t0);
    assert_eq!(s.start(), vec![Action::Announce { after: Duration::ZERO }]);
    with_seeders(&mut s, 10, t0);
    let reqs = requests(&s.fill(t0, None, 0));
    // An 8 MiB budget of 1 MiB pieces, but one request for every peer first.
    assert_eq!(reqs.len(), 10);
    let mut per_peer: HashMap<PeerId, usize> = HashMap::new();
    for (p, _) in &reqs {
        *per_peer.entry(*p).or_default() += 1;
    }
    assert!(per_peer.values().all(|&n| n <= flow::MIN_PIPELINE), "{per_peer:?}");
    let mut pieces: Vec<u32> = reqs.iter().map(|r| r.1).collect();
    pieces.sort_unstable();
    pieces.dedup();
    assert_eq!(pieces.len(), 10, "no piece asked twice outside endgame");
    // With 3 peers the budget is what limits: 8 pieces, 2 per peer at most.
    let mut s = state(64, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 3, t0);
    assert_eq!(requests(&s.fill(t0, None, 0)).len(), 3 * flow::MIN_PIPELINE);
}

#[test]
fn the_budget_grows_with_the_measured_node_rate_and_is_shared_with_other_downloads() {
    let t0 = Instant::now();
    let mut s = state(128, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 10, t0);
    // 20 MB/s measured: 40 MB in flight, but 2 requests a peer until peers are measured.
    assert_eq!(requests(&s.fill(t0, Some(20e6), 0)).len(), 20);
    let mut s = state(128, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 10, t0);
    // Another download of the node already has 26 MB in flight: 14 MB left, 14 pieces
    // (10 first requests, then 4 more).
    assert_eq!(requests(&s.fill(t0, Some(20e6), 26_000_000)).len(), 14);
    // With the budget spent elsewhere, each peer still gets its one request.
    let mut s = state(128, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 10, t0);
    assert_eq!(requests(&s.fill(t0, Some(20e6), 40_000_000)).len(), 10);
    // A configured limit is a hard cap: then the two-piece minimum is all there is.
    let cfg = SchedulerConfig { ingress_limit: Some(1), ..SchedulerConfig::default() };
    let mut s = state(128, cfg, t0);
    with_seeders(&mut s, 10, t0);
    assert_eq!(requests(&s.fill(t0, Some(20e6), 40_000_000)).len(), flow::MIN_PIPELINE);
}

#[test]
fn a_configured_ingress_limit_caps_what_is_in_flight() {
    let t0 = Instant::now();
    let cfg = SchedulerConfig { ingress_limit: Some(2 * PIECE), ..SchedulerConfig::default() };
    let mut s = state(64, cfg, t0);
    with_seeders(&mut s, 10, t0);
    assert_eq!(requests(&s.fill(t0, Some(100e6), 0)).len(), 4, "2 s of 2 MiB/s");
}

#[test]
fn a_peer_is_never_timed_out_while_its_bytes_arrive_however_slowly() {
    let t0 = Instant::now();
    let mut s = state(64, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 2, t0);
    s.fill(t0, None, 0);
    let mut counters = HashMap::new();
    // Peer 1 delivers 6 MB/s; peer 2 trickles 100 KB/s: a piece takes it 10 s.
    let rates = HashMap::from([(peer(1), 6_000_000), (peer(2), 100_000)]);
    let (_, actions) = run(&mut s, t0, &mut counters, &rates, 60, None);
    let timeouts = actions.iter().filter(|a| matches!(a, Action::TimedOut { .. })).count();
    assert_eq!(timeouts, 0, "{actions:?}");
    assert!(s.picker().in_flight_for(&peer(2)) <= flow::MIN_PIPELINE);
}

#[test]
fn a_silent_peer_is_timed_out_and_its_pieces_go_elsewhere() {
    let t0 = Instant::now();
    let mut s = state(64, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 2, t0);
    let first = requests(&s.fill(t0, None, 0));
    let silent: Vec<u32> = first.iter().filter(|r| r.0 == peer(2)).map(|r| r.1).collect();
    assert!(!silent.is_empty());
    let mut counters = HashMap::new();
    let rates = HashMap::from([(peer(1), 6_000_000), (peer(2), 0)]);
    // Just before the stall time nothing is withdrawn.
    let (t, actions) = run(&mut s, t0, &mut counters, &rates, 14, None);
    assert!(!actions.iter().any(|a| matches!(a, Action::TimedOut { .. })));
    let (_, actions) = run(&mut s, t, &mut counters, &rates, 1, None);
    let timed_out: Vec<u32> = actions
        .iter()
        .filter_map(|a| match a {
            Action::TimedOut { peer: p, index } if *p == peer(2) => Some(*index),
            _ => None,
        })
        .collect();
    assert_eq!(timed_out, silent);
    // The withdrawn pieces are asked of the peer that delivers (it has room once measured).
    let asked_again: Vec<u32> = requests(&actions).iter().filter(|r| r.0 == peer(1)).map(|r| r.1).collect();
    assert!(silent.iter().any(|i| asked_again.contains(i)) || s.picker().in_flight_for(&peer(1)) > 0);
    assert!(!actions.contains(&Action::Disconnect(peer(2))), "one stall is not a ban");
}

#[test]
fn a_slow_peer_that_goes_quiet_for_less_than_two_piece_times_keeps_its_requests() {
    let t0 = Instant::now();
    let mut s = state(64, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 1, t0);
    s.fill(t0, None, 0);
    let mut counters = HashMap::new();
    // 250 KB/s, as a straggler's share of its link: a 1 MiB piece takes 4.2 s.
    let (t, actions) = run(&mut s, t0, &mut counters, &HashMap::from([(peer(1), 250_000)]), 25, None);
    assert!(!actions.iter().any(|a| matches!(a, Action::TimedOut { .. })));
    let asked = s.picker().requests_to(&peer(1)).to_vec();
    assert!(!asked.is_empty());
    // Then 5 s without a byte (TCP backing off on the congested link): no stall yet.
    let (t, actions) = run(&mut s, t, &mut counters, &HashMap::from([(peer(1), 0)]), 25, None);
    assert!(!actions.iter().any(|a| matches!(a, Action::TimedOut { .. })), "{actions:?}");
    assert_eq!(s.picker().requests_to(&peer(1)), &asked[..]);
    // Silent for longer than two pieces take at its rate: withdrawn.
    let (_, actions) = run(&mut s, t, &mut counters, &HashMap::from([(peer(1), 0)]), 20, None);
    assert!(actions.iter().any(|a| matches!(a, Action::TimedOut { peer: p, .. } if *p == peer(1))));
}

#[test]
fn stalls_in_a_row_ban_a_peer_and_a_delivery_forgives_them() {
    let t0 = Instant::now();
    let mut s = state(64, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 2, t0);
    let mut counters = HashMap::new();
    let rates = HashMap::from([(peer(1), 6_000_000), (peer(2), 0)]);
    s.fill(t0, None, 0);
    let (_, actions) = run(&mut s, t0, &mut counters, &rates, 60, None);
    assert!(actions.contains(&Action::Disconnect(peer(2))), "3 stalls in a row ban");
    assert_eq!(s.peer_count(), 1);
    // A banned peer handed out again is not reconnected.
    let again = s.announced(Some(vec![info(2, false)]), Duration::from_secs(5), t0 + Duration::from_secs(13));
    assert!(!again.contains(&Action::Connect(addr(2))));
}

#[test]
fn pipelining_follows_each_peers_measured_rate() {
    let t0 = Instant::now();
    let mut s = state(256, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 2, t0);
    s.fill(t0, None, 0);
    let mut counters = HashMap::new();
    let rates = HashMap::from([(peer(1), 8_000_000), (peer(2), 400_000)]);
    let (_, _) = run(&mut s, t0, &mut counters, &rates, 15, Some(8.4e6));
    let fast = s.picker().in_flight_for(&peer(1));
    let slow = s.picker().in_flight_for(&peer(2));
    assert!(fast >= 6, "fast peer has {fast} in flight");
    assert!(slow <= 2, "slow peer has {slow} in flight");
}

#[test]
fn an_origin_is_asked_only_for_what_no_other_peer_has() {
    let t0 = Instant::now();
    let mut s = state(4, SchedulerConfig::default(), t0);
    let connects = s.announced(Some(vec![info(9, true), info(1, false)]), Duration::from_secs(5), t0);
    assert_eq!(connects.len(), 3);
    assert!(s.connected(peer(9), addr(9), Bitfield::full(4), t0));
    let mut bf = Bitfield::new(4);
    bf.set(0).unwrap();
    bf.set(1).unwrap();
    assert!(s.connected(peer(1), addr(1), bf, t0));
    let reqs = requests(&s.fill(t0, None, 0));
    let from_origin: Vec<u32> = reqs.iter().filter(|r| r.0 == peer(9)).map(|r| r.1).collect();
    assert_eq!(from_origin.len(), 1, "one at a time from an origin");
    assert!(from_origin[0] >= 2, "only pieces the other peer lacks: {from_origin:?}");
    // A declined piece is not asked of the origin again within the backoff.
    s.declined(peer(9), from_origin[0], t0);
    let again = requests(&s.fill(t0, None, 0));
    assert!(!again.contains(&(peer(9), from_origin[0])), "{again:?}");
}

#[test]
fn fallback_only_for_pieces_no_peer_has_until_a_real_stall() {
    let t0 = Instant::now();
    let secs = Duration::from_secs;
    let mut s = state(4, SchedulerConfig::default(), t0);
    s.announced(Some(vec![info(1, false)]), secs(5), t0);
    let mut bf = Bitfield::new(4);
    bf.set(0).unwrap();
    bf.set(1).unwrap();
    assert!(s.connected(peer(1), addr(1), bf, t0));
    assert_eq!(requests(&s.fill(t0, None, 0)).len(), 2);
    // Bytes arrive for 2.5 s without completing a piece: that is progress.
    s.tick(t0 + Duration::from_millis(2500), &[(peer(1), 900_000)]).unwrap();
    s.tick(t0 + secs(5), &[(peer(1), 900_000)]).unwrap();
    assert!(!s.fallback_active(), "2.5 s since the last byte");
    // Then nothing for 3 s: the origin comes in.
    s.tick(t0 + Duration::from_millis(5500), &[(peer(1), 900_000)]).unwrap();
    assert!(s.fallback_active());
    // The peer delivers again: the fallback tops up only what no peer has, pieces 2 and 3.
    let t = t0 + secs(6);
    s.stored(peer(1), 0, Stored::Ok, t).unwrap();
    let mut fetched: Vec<u32> = s
        .fill(t, None, 0)
        .iter()
        .filter_map(|a| match a {
            Action::Fetch { index } => Some(*index),
            _ => None,
        })
        .collect();
    fetched.sort_unstable();
    assert_eq!(fetched, vec![2, 3]);
}

#[test]
fn endgame_duplicates_only_late_requests_and_cancels_them_when_one_copy_arrives() {
    let t0 = Instant::now();
    let mut s = state(2, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 3, t0);
    let first = requests(&s.fill(t0, None, 0));
    assert_eq!(first.len(), 2, "one request per piece while they are on time: {first:?}");
    // Bytes keep arriving (no stall), but slower than predicted: once a request is late,
    // another peer may ask for the same piece, at most twice per piece.
    assert!(requests(&s.fill(t0 + Duration::from_secs(2), None, 0)).is_empty());
    let t1 = t0 + Duration::from_millis(2600);
    let dupes = requests(&s.fill(t1, None, 0));
    assert_eq!(dupes.len(), 2, "{dupes:?}");
    for (p, index) in &dupes {
        assert!(!first.contains(&(*p, *index)), "a duplicate goes to another peer");
    }
    let (winner, index) = dupes[0];
    let loser = first.iter().find(|r| r.1 == index).unwrap().0;
    let actions = s.stored(winner, index, Stored::Ok, t1).unwrap();
    assert_eq!(actions, vec![Action::Cancel { peer: loser, index }]);
    assert_eq!(s.picker().in_flight(index), 0);
}

#[test]
fn an_overdue_piece_is_asked_of_an_idle_fast_peer_before_it_is_late() {
    let t0 = Instant::now();
    let mut s = state(16, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 2, t0);
    s.fill(t0, None, 0);
    let mut counters = HashMap::new();
    // Peer 2 sends 600 KB/s, 1.75 s a piece: a piece queued behind another at it is overdue
    // 1.75 s after it was asked (its own piece time), late only after 4 s, and done at 3.5 s.
    // Peer 1, at 6 MB/s, has fetched everything else by then and sends a piece in 0.17 s.
    let rates = HashMap::from([(peer(1), 6_000_000), (peer(2), 600_000)]);
    let mut t = t0;
    let mut ticks = 0;
    while !s.is_complete() && ticks < 100 {
        (t, _) = run(&mut s, t, &mut counters, &rates, 1, Some(6.6e6));
        ticks += 1;
    }
    assert!(s.is_complete());
    // Counting an overdue piece as about to arrive, the last one waited at peer 2 and the
    // download took 21 ticks; asked of peer 1 once overdue, it takes 16.
    assert!(ticks <= 17, "{ticks} ticks of 200 ms");
}

#[test]
fn a_fast_peer_takes_over_the_last_pieces_from_a_straggler() {
    let t0 = Instant::now();
    let mut s = state(16, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 2, t0);
    s.fill(t0, None, 0);
    let mut counters = HashMap::new();
    // Peer 1 delivers 6 MB/s, peer 2 (a straggler) 150 KB/s: a piece takes it 7 s.
    let rates = HashMap::from([(peer(1), 6_000_000), (peer(2), 150_000)]);
    let (t, _) = run(&mut s, t0, &mut counters, &rates, 20, Some(6.15e6));
    assert!(
        s.picker().in_flight_for(&peer(2)) <= 1,
        "the fast peer took over what waited behind the straggler"
    );
    let held = s.picker().requests_to(&peer(2));
    // By now peer 1 has fetched everything else; the straggler's piece is asked of it too,
    // long before the straggler is late.
    assert!(s.picker().have().count() >= 14, "{}", s.describe());
    let (_, actions) = run(&mut s, t, &mut counters, &rates, 5, Some(6.15e6));
    for index in held {
        let asked =
            actions.contains(&Action::Request { peer: peer(1), index }) || s.picker().have().get(index);
        assert!(asked, "piece {index} stays with the straggler: {}", s.describe());
    }
    assert!(s.is_complete() || s.picker().in_flight_for(&peer(1)) > 0);
}

#[test]
fn connects_stop_at_the_nodes_budget_and_resume_when_it_allows() {
    let t0 = Instant::now();
    let mut s = state(4, SchedulerConfig::default(), t0);
    s.set_node_room(2);
    let peers = (1..=5).map(|i| info(i, false)).collect();
    let connects = s.announced(Some(peers), Duration::from_secs(5), t0);
    assert_eq!(connects.iter().filter(|a| matches!(a, Action::Connect(_))).count(), 2);
    // One attempt could not get a slot after all: it stays a candidate.
    s.connect_abandoned(addr(2));
    s.set_node_room(10);
    let more = s.tick(t0 + Duration::from_millis(200), &[]).unwrap();
    let addrs: Vec<&Action> = more.iter().filter(|a| matches!(a, Action::Connect(_))).collect();
    assert_eq!(addrs.len(), 4, "{more:?}");
    assert!(more.contains(&Action::Connect(addr(2))));
}

#[test]
fn a_full_download_trades_its_least_useful_peer_for_a_new_seeder() {
    let t0 = Instant::now();
    let cfg = SchedulerConfig { max_connections: 2, ..SchedulerConfig::default() };
    let mut s = state(4, cfg, t0);
    s.announced(Some(vec![info(1, false), info(2, false)]), Duration::from_secs(5), t0);
    let half = |set: &[u32]| {
        let mut b = Bitfield::new(4);
        for &i in set {
            b.set(i).unwrap();
        }
        b
    };
    assert!(s.connected(peer(1), addr(1), half(&[0, 1]), t0));
    assert!(s.connected(peer(2), addr(2), half(&[2]), t0));
    // Peer 3 completes and the tracker hands it out as a seeder.
    let mut seeder = info(3, false);
    seeder.complete = true;
    let t1 = t0 + Duration::from_secs(1);
    s.announced(Some(vec![seeder.clone()]), Duration::from_secs(5), t1);
    assert!(s.tick(t1, &[]).unwrap().is_empty(), "too early: rates not measured yet");
    // Both peers deliver; peer 2 is the slower.
    let t2 = t0 + Duration::from_millis(2600);
    let asked = requests(&s.fill(t0, None, 0));
    assert!(asked.contains(&(peer(2), 2)), "{asked:?}");
    s.tick(t0 + Duration::from_millis(1600), &[(peer(1), 3_000_000), (peer(2), 100_000)]).unwrap();
    let actions = s.tick(t2, &[(peer(1), 6_000_000), (peer(2), 200_000)]).unwrap();
    // Peer 2 still has piece 2 on its way: it retires rather than being cut off, and the
    // seeder connects beside it.
    assert!(!actions.iter().any(|a| matches!(a, Action::Disconnect(_))), "{actions:?}");
    assert!(actions.contains(&Action::Connect(addr(3))), "{actions:?}");
    assert!(
        !requests(&s.fill(t2, None, 0)).iter().any(|(p, _)| *p == peer(2)),
        "a retiring peer is asked for nothing"
    );
    let more = s.tick(t2 + Duration::from_millis(100), &[(peer(1), 6_000_000), (peer(2), 300_000)]).unwrap();
    assert!(
        !more.iter().any(|a| matches!(a, Action::Disconnect(_) | Action::Connect(_))),
        "no other trade while the replacement connects, and the retiring peer stays: {more:?}"
    );
    let actions = s.stored(peer(2), 2, Stored::Ok, t2 + Duration::from_millis(200)).unwrap();
    assert!(actions.contains(&Action::Disconnect(peer(2))), "its last piece arrived: {actions:?}");
    assert_eq!(s.peer_count(), 1);
    // Once the seeder is connected there is nothing better to trade for.
    assert!(s.connected(peer(3), addr(3), Bitfield::full(4), t2));
    let later = s.tick(t2 + Duration::from_secs(3), &[(peer(1), 6_000_000), (peer(3), 0)]).unwrap();
    assert!(!later.iter().any(|a| matches!(a, Action::Disconnect(_))), "{later:?}");
}

#[test]
fn a_bad_piece_bans_and_drops_the_peer_and_a_bad_origin_piece_is_fatal() {
    let t0 = Instant::now();
    let mut s = state(4, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 1, t0);
    let reqs = requests(&s.fill(t0, None, 0));
    let actions = s.stored(peer(1), reqs[0].1, Stored::BadPiece, t0).unwrap();
    assert_eq!(actions, vec![Action::Disconnect(peer(1))]);
    assert!(!s.connected(peer(1), addr(1), Bitfield::full(4), t0), "banned");
    assert!(s.stored(ORIGIN_PEER, 0, Stored::BadPiece, t0).is_err());
}

#[test]
fn a_ban_follows_the_peers_address_and_outlives_the_download_on_the_node() {
    let t0 = Instant::now();
    let node = crate::node::NodeFlow::default();
    let digest = meta(4).digest().clone();
    let mut s = state(4, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 2, t0);
    let reqs = requests(&s.fill(t0, None, 0));
    let (bad, index) = reqs.iter().copied().find(|(p, _)| *p == peer(1)).expect("a request to peer 1");
    s.stored(bad, index, Stored::BadPiece, t0).unwrap();
    // The broken agent restarts with a new random id at the same address.
    assert!(!s.connected(peer(7), addr(1), Bitfield::full(4), t0), "the address is banned, not the id");
    node.keep_blacklist(&digest, s.take_blacklist(), t0);

    // The client retries: a new download of the blob on this node, handed the same peers.
    let t1 = t0 + Duration::from_secs(10);
    let blacklist = node.blacklist_for(&digest, t1).expect("the node kept the ban");
    let mut next = state(4, SchedulerConfig::default(), t1).with_blacklist(blacklist);
    let connects = next.announced(Some(vec![info(1, false), info(2, false)]), Duration::from_secs(5), t1);
    assert!(connects.contains(&Action::Connect(addr(2))));
    assert!(!connects.contains(&Action::Connect(addr(1))), "not reconnected to the peer that lied");
    // Another blob's download on the node trusts it.
    let other = Digest::of(Algorithm::Sha256, b"other");
    assert!(node.blacklist_for(&other, t1).is_none());
}

#[test]
fn a_download_with_no_progress_fails_after_the_stall_timeout() {
    let t0 = Instant::now();
    let mut s = state(4, SchedulerConfig::default(), t0);
    s.announced(Some(vec![]), Duration::from_secs(5), t0);
    s.tick(t0 + Duration::from_millis(200), &[]).unwrap();
    assert!(s.fallback_active(), "no peers at all: the origin at once");
    let err = s.tick(t0 + Duration::from_secs(60), &[]).unwrap_err();
    assert!(matches!(err, Fatal::Stalled(..)), "{err}");
}

#[test]
fn the_first_announces_come_quickly() {
    let t0 = Instant::now();
    let mut s = state(4, SchedulerConfig::default(), t0);
    let afters: Vec<Duration> = (0..5)
        .map(|_| match s.announced(None, Duration::from_secs(5), t0)[0] {
            Action::Announce { after } => after,
            ref other => panic!("{other:?}"),
        })
        .collect();
    let ms = |n| Duration::from_millis(n);
    assert_eq!(afters, vec![ms(250), ms(500), ms(1000), Duration::from_secs(5), Duration::from_secs(5)]);
}

#[test]
fn pieces_reaching_our_peers_hold_the_fallback_back() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut s = state(4, SchedulerConfig::default(), t0);
    s.announced(Some(vec![info(1, false)]), Duration::from_secs(5), t0);
    assert!(s.connected(peer(1), addr(1), Bitfield::new(4), t0));
    // Nothing to ask for: our only peer has nothing yet. That is no stall.
    s.tick(t0 + ms(4000), &[]).unwrap();
    assert!(!s.fallback_active(), "nothing to ask for");
    // At 4 s our peer gains a piece: the swarm is warming up. We ask for it.
    s.have(&peer(1), 0, t0 + ms(4000));
    assert_eq!(requests(&s.fill(t0 + ms(4000), None, 0)), vec![(peer(1), 0)]);
    s.tick(t0 + ms(6500), &[]).unwrap();
    assert!(!s.fallback_active(), "2.5 s after the swarm showed life");
    // The same news again is no news.
    s.have(&peer(1), 0, t0 + ms(6600));
    s.tick(t0 + ms(7100), &[]).unwrap();
    assert!(s.fallback_active(), "3 s of a request without bytes or news: the origin comes in");
}

#[test]
fn with_nothing_to_ask_for_the_fallback_waits_its_patience() {
    let t0 = Instant::now();
    let mut s = state(4, SchedulerConfig::default(), t0);
    s.announced(Some(vec![info(1, false), info(2, false)]), Duration::from_secs(5), t0);
    assert!(s.connected(peer(1), addr(1), Bitfield::new(4), t0));
    assert!(s.connected(peer(2), addr(2), Bitfield::new(4), t0));
    // Our peers are as new as we are: in a big fleet the pieces reach them a few hand-offs
    // after the origin sent them out.
    s.tick(t0 + FALLBACK_PATIENCE - Duration::from_millis(200), &[]).unwrap();
    assert!(!s.fallback_active());
    s.tick(t0 + FALLBACK_PATIENCE, &[]).unwrap();
    assert!(s.fallback_active());
}

#[test]
fn an_origins_declines_hold_the_fallback_back_until_its_patience_runs_out() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut s = state(4, SchedulerConfig::default(), t0);
    s.announced(Some(vec![info(9, true), info(1, false)]), Duration::from_secs(5), t0);
    assert!(s.connected(peer(9), addr(9), Bitfield::full(4), t0));
    assert!(s.connected(peer(1), addr(1), Bitfield::new(4), t0));
    // The origin declines a request every 2 s: an agent holds the piece, the swarm is alive.
    let mut t = t0;
    while t + ms(2000) < t0 + FALLBACK_PATIENCE {
        t += ms(2000);
        s.declined(peer(9), 0, t);
        s.tick(t + ms(200), &[]).unwrap();
        assert!(!s.fallback_active(), "{:?} after the start", t - t0);
    }
    // A decline from a peer that is not an origin says nothing about the swarm.
    s.declined(peer(1), 1, t0 + FALLBACK_PATIENCE - ms(500));
    s.tick(t0 + FALLBACK_PATIENCE, &[]).unwrap();
    assert!(s.fallback_active(), "no bytes for the whole patience: the origin comes in anyway");
}

#[test]
fn the_latest_handout_comes_first() {
    let t0 = Instant::now();
    let cfg = SchedulerConfig { max_connections: 2, ..SchedulerConfig::default() };
    let mut s = state(4, cfg, t0);
    let first =
        s.announced(Some(vec![info(1, false), info(2, false), info(3, false)]), Duration::from_secs(5), t0);
    assert!(first.contains(&Action::Connect(addr(1))) && first.contains(&Action::Connect(addr(2))));
    s.connect_failed(addr(2));
    // The next handout names 4 and 5: the tracker's latest (random) choice wins over
    // candidate 3, which only an earlier handout named.
    let next = s.announced(Some(vec![info(4, false), info(5, false)]), Duration::from_secs(5), t0);
    assert!(next.contains(&Action::Connect(addr(4))), "{next:?}");
    assert!(!next.contains(&Action::Connect(addr(3))), "{next:?}");
}

#[test]
fn candidates_stay_bounded() {
    let t0 = Instant::now();
    let mut s = state(4, SchedulerConfig::default(), t0);
    s.set_node_room(0);
    for round in 0..3u32 {
        let peers = (0..100u32)
            .map(|i| {
                let n = round * 100 + i;
                PeerInfo {
                    peer_id: PeerId([1; 20]).to_string() + &n.to_string(),
                    addr: SocketAddr::from(([10, 1, (n >> 8) as u8, n as u8], 4000)),
                    complete: false,
                    origin: false,
                }
            })
            .collect();
        s.announced(Some(peers), Duration::from_secs(5), t0);
    }
    assert!(s.describe().contains(&format!("{MAX_CANDIDATES} candidates")), "{}", s.describe());
}

/// Two connected peers that both have pieces we lack (peer 1 all, peer 2 half), measured
/// at `rate1` and `rate2` bytes/s by `t0` + 2.6 s, with `candidates` handed out as well.
fn two_measured_peers(
    rng_seed: u64,
    rate1: u64,
    rate2: u64,
    candidates: Vec<PeerInfo>,
) -> (SwarmState, Instant) {
    let t0 = Instant::now();
    let cfg = SchedulerConfig { max_connections: 2, ..SchedulerConfig::default() };
    let mut s = SwarmState::with_rng(
        cfg,
        peer(0),
        addr(0),
        &meta(4),
        Bitfield::new(4),
        t0,
        StdRng::seed_from_u64(rng_seed),
    )
    .unwrap();
    s.announced(Some(vec![info(1, false), info(2, false)]), Duration::from_secs(5), t0);
    let mut half = Bitfield::new(4);
    half.set(2).unwrap();
    half.set(3).unwrap();
    assert!(s.connected(peer(1), addr(1), Bitfield::full(4), t0));
    assert!(s.connected(peer(2), addr(2), half, t0));
    s.announced(Some(candidates), Duration::from_secs(5), t0);
    s.tick(t0 + Duration::from_millis(1600), &[(peer(1), rate1 * 16 / 10), (peer(2), rate2 * 16 / 10)])
        .unwrap();
    (s, t0 + Duration::from_millis(2600))
}

fn seeder(n: u8) -> PeerInfo {
    PeerInfo { complete: true, ..info(n, false) }
}

#[test]
fn a_slow_peer_is_traded_even_when_no_seeder_is_known() {
    let (mut s, t) = two_measured_peers(7, 3_000_000, 500_000, vec![info(3, false)]);
    let actions = s.tick(t, &[(peer(1), 7_800_000), (peer(2), 1_300_000)]).unwrap();
    assert!(actions.contains(&Action::Disconnect(peer(2))), "{actions:?}");
    assert!(actions.contains(&Action::Connect(addr(3))), "{actions:?}");
}

#[test]
fn peers_near_the_mean_rate_are_kept_even_for_a_seeder() {
    // 3 MB/s and 2.8 MB/s: both busy uplinks shared alike; trading one buys nothing, and
    // every host doing so would crowd onto the few seeders.
    let (mut s, t) = two_measured_peers(7, 3_000_000, 2_800_000, vec![seeder(3)]);
    let actions = s.tick(t, &[(peer(1), 7_800_000), (peer(2), 7_280_000)]).unwrap();
    assert!(!actions.iter().any(|a| matches!(a, Action::Disconnect(_))), "{actions:?}");
}

#[test]
fn a_slow_seeder_is_traded_too_and_the_replacement_is_drawn_at_random() {
    // Peer 1 holds everything but its upload is shared by many: it is the slow one.
    let chosen = |seed: u64| {
        let candidates = (3..=10).map(seeder).collect();
        let (mut s, t) = two_measured_peers(seed, 500_000, 3_000_000, candidates);
        let actions = s.tick(t, &[(peer(1), 1_300_000), (peer(2), 7_800_000)]).unwrap();
        assert!(actions.contains(&Action::Disconnect(peer(1))), "{actions:?}");
        actions
            .iter()
            .find_map(|a| match a {
                Action::Connect(addr) => Some(*addr),
                _ => None,
            })
            .unwrap()
    };
    let picks: HashSet<SocketAddr> = (0..8).map(chosen).collect();
    assert!(picks.len() > 1, "every host would pick the same seeder: {picks:?}");
}

#[test]
fn a_reader_gets_what_the_node_receives_in_a_second_in_order_and_rarest_first_the_rest() {
    let t0 = Instant::now();
    let mut s = state(256, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 1, t0);
    s.set_readers(vec![100]);
    let mut counters = HashMap::new();
    let rates: HashMap<PeerId, u64> = [(peer(1), 200 * PIECE)].into();
    // A fast seeder: after a second the peer is measured and 16 pieces are in flight, and
    // every piece asked for so far was the reader's next one.
    let mut asked: Vec<u32> = requests(&s.fill(t0, None, 0)).into_iter().map(|r| r.1).collect();
    let (t, actions) = run(&mut s, t0, &mut counters, &rates, 5, Some(200.0 * PIECE as f64));
    asked.extend(requests(&actions).into_iter().map(|r| r.1));
    assert!(s.picker().reader_window() >= 200, "{}", s.picker().reader_window());
    assert!(asked.len() > 50, "{}", asked.len());
    let mut sorted = asked.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (100..100 + asked.len() as u32).collect::<Vec<_>>());
    // A slow node (50 Mbit/s) keeps a window of a few pieces: past it, rarest first.
    let rate = 50e6 / 8.0;
    assert_eq!(flow::reader_window(Some(rate), PIECE), 6);
    let _ = s.fill(t, Some(rate), 0);
    assert_eq!(s.picker().reader_window(), 6);
}

#[test]
fn a_retiring_peer_keeps_the_piece_on_the_wire_and_gives_back_its_queue() {
    let t0 = Instant::now();
    let cfg = SchedulerConfig { max_connections: 2, ..SchedulerConfig::default() };
    let mut s = state(8, cfg, t0);
    s.announced(Some(vec![info(1, false), info(2, false)]), Duration::from_secs(5), t0);
    let mut upper = Bitfield::new(8);
    for i in 4..8 {
        upper.set(i).unwrap();
    }
    assert!(s.connected(peer(1), addr(1), Bitfield::full(8), t0));
    assert!(s.connected(peer(2), addr(2), upper, t0));
    // Everything peer 2 holds is asked of it (what peer 1 was asked goes back).
    for _ in 0..4 {
        for a in s.fill(t0, None, 0) {
            if let Action::Request { peer: p, index } = a {
                if p != peer(2) {
                    s.request_failed(&p, index);
                }
            }
        }
    }
    let times = s.picker().request_times_to(&peer(2));
    assert!(times.len() >= 2, "peer 2 has a queue: {times:?}");
    s.announced(Some(vec![info(3, false)]), Duration::from_secs(5), t0);
    s.tick(t0 + Duration::from_millis(1600), &[(peer(1), 4_800_000), (peer(2), 800_000)]).unwrap();
    let t = t0 + Duration::from_millis(2600);
    let actions = s.tick(t, &[(peer(1), 7_800_000), (peer(2), 1_300_000)]).unwrap();
    assert!(actions.contains(&Action::Connect(addr(3))), "{actions:?}");
    assert!(!actions.iter().any(|a| matches!(a, Action::Disconnect(_))), "{actions:?}");
    assert_eq!(s.take_rotations(), Rotations { immediate: 0, retiring: 1 });
    // The oldest request stays with it; the rest are cancelled and free to ask elsewhere.
    let cancelled: Vec<u32> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Cancel { peer: p, index } if *p == peer(2) => Some(*index),
            _ => None,
        })
        .collect();
    assert_eq!(s.picker().requests_to(&peer(2)), vec![times[0].1], "{actions:?}");
    assert_eq!(cancelled.len(), times.len() - 1, "{actions:?}");
    assert!(cancelled.iter().all(|&i| s.picker().in_flight(i) == 0), "free to ask of peer 1 or 3");
    // The server confirms a cancel with a Cancel of its own: not a refusal to remember.
    for &index in &cancelled {
        s.declined(peer(2), index, t);
    }
    let stored = s.stored(peer(2), times[0].1, Stored::Ok, t + Duration::from_millis(300)).unwrap();
    assert!(stored.contains(&Action::Disconnect(peer(2))), "{stored:?}");
}
