//! Whom a download connects to: the node's budget, announces, candidates and rotation.

use super::*;

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
    s.tick(t0 + Duration::from_millis(1600), &[(peer(1), got(3_000_000)), (peer(2), got(100_000))]).unwrap();
    let actions = s.tick(t2, &[(peer(1), got(6_000_000)), (peer(2), got(200_000))]).unwrap();
    // Peer 2 still has piece 2 on its way: it retires rather than being cut off, and the
    // seeder connects beside it.
    assert!(!actions.iter().any(|a| matches!(a, Action::Disconnect(_))), "{actions:?}");
    assert!(actions.contains(&Action::Connect(addr(3))), "{actions:?}");
    assert!(
        !requests(&s.fill(t2, None, 0)).iter().any(|(p, _)| *p == peer(2)),
        "a retiring peer is asked for nothing"
    );
    let more = s
        .tick(t2 + Duration::from_millis(100), &[(peer(1), got(6_000_000)), (peer(2), got(300_000))])
        .unwrap();
    assert!(
        !more.iter().any(|a| matches!(a, Action::Disconnect(_) | Action::Connect(_))),
        "no other trade while the replacement connects, and the retiring peer stays: {more:?}"
    );
    let actions = s.stored(peer(2), 2, Stored::Ok, t2 + Duration::from_millis(200)).unwrap();
    assert!(actions.contains(&Action::Disconnect(peer(2))), "its last piece arrived: {actions:?}");
    assert_eq!(s.peer_count(), 1);
    // Once the seeder is connected there is nothing better to trade for.
    assert!(s.connected(peer(3), addr(3), Bitfield::full(4), t2));
    let later = s.tick(t2 + Duration::from_secs(3), &[(peer(1), got(6_000_000)), (peer(3), got(0))]).unwrap();
    assert!(!later.iter().any(|a| matches!(a, Action::Disconnect(_))), "{later:?}");
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
    s.tick(
        t0 + Duration::from_millis(1600),
        &[(peer(1), got(rate1 * 16 / 10)), (peer(2), got(rate2 * 16 / 10))],
    )
    .unwrap();
    (s, t0 + Duration::from_millis(2600))
}

fn seeder(n: u8) -> PeerInfo {
    PeerInfo { complete: true, ..info(n, false) }
}

#[test]
fn a_slow_peer_is_traded_even_when_no_seeder_is_known() {
    let (mut s, t) = two_measured_peers(7, 3_000_000, 500_000, vec![info(3, false)]);
    let actions = s.tick(t, &[(peer(1), got(7_800_000)), (peer(2), got(1_300_000))]).unwrap();
    assert!(actions.contains(&Action::Disconnect(peer(2))), "{actions:?}");
    assert!(actions.contains(&Action::Connect(addr(3))), "{actions:?}");
}

#[test]
fn peers_near_the_mean_rate_are_kept_even_for_a_seeder() {
    // 3 MB/s and 2.8 MB/s: both busy uplinks shared alike; trading one buys nothing, and
    // every host doing so would crowd onto the few seeders.
    let (mut s, t) = two_measured_peers(7, 3_000_000, 2_800_000, vec![seeder(3)]);
    let actions = s.tick(t, &[(peer(1), got(7_800_000)), (peer(2), got(7_280_000))]).unwrap();
    assert!(!actions.iter().any(|a| matches!(a, Action::Disconnect(_))), "{actions:?}");
}

#[test]
fn a_slow_seeder_is_traded_too_and_the_replacement_is_drawn_at_random() {
    // Peer 1 holds everything but its upload is shared by many: it is the slow one.
    let chosen = |seed: u64| {
        let candidates = (3..=10).map(seeder).collect();
        let (mut s, t) = two_measured_peers(seed, 500_000, 3_000_000, candidates);
        let actions = s.tick(t, &[(peer(1), got(1_300_000)), (peer(2), got(7_800_000))]).unwrap();
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
    s.tick(t0 + Duration::from_millis(1600), &[(peer(1), got(4_800_000)), (peer(2), got(800_000))]).unwrap();
    let t = t0 + Duration::from_millis(2600);
    let actions = s.tick(t, &[(peer(1), got(7_800_000)), (peer(2), got(1_300_000))]).unwrap();
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

/// Addresses whose handshake is refused (one posing as the fallback, one answering with our
/// own id, one with a connected peer's) are not dialled again on the next ticks, so they
/// cannot keep honest candidates from the connection budget.
#[test]
fn a_refused_handshake_drops_its_candidate() {
    let t0 = Instant::now();
    let cfg = SchedulerConfig { max_connections: 3, ..SchedulerConfig::default() };
    let mut s = state(4, cfg, t0);
    let seeder = |n| PeerInfo { complete: true, ..info(n, false) };
    let handout = vec![info(1, false), info(5, false), seeder(2), seeder(3), seeder(4)];
    let connects = s.announced(Some(handout), Duration::from_secs(5), t0);
    let dialled = |actions: &[Action]| -> Vec<SocketAddr> {
        actions.iter().filter_map(|a| if let Action::Connect(to) = a { Some(*to) } else { None }).collect()
    };
    assert_eq!(dialled(&connects), vec![addr(2), addr(3), addr(4)], "seeders first");
    assert!(!s.connected(ORIGIN_PEER, addr(2), Bitfield::full(4), t0), "posing as the fallback");
    assert!(!s.connected(peer(0), addr(3), Bitfield::full(4), t0), "our own id");
    assert!(s.connected(peer(7), addr(4), Bitfield::full(4), t0));
    let next = s.tick(t0 + Duration::from_millis(200), &[]).unwrap();
    assert_eq!(dialled(&next), vec![addr(1), addr(5)], "the honest candidates get the budget");
    assert!(!s.connected(peer(7), addr(1), Bitfield::full(4), t0), "a connected peer's id");
    for i in 2..=10 {
        let later = s.tick(t0 + Duration::from_millis(200 * i), &[]).unwrap();
        assert!(dialled(&later).is_empty(), "re-dialled: {later:?}");
    }
}

#[test]
fn a_peer_posing_as_the_http_fallback_is_refused() {
    let t0 = Instant::now();
    let mut s = state(4, SchedulerConfig::default(), t0);
    s.announced(Some(vec![info(9, false)]), Duration::from_secs(5), t0);
    assert!(!s.connected(ORIGIN_PEER, addr(9), Bitfield::full(4), t0), "the fallback's id is not a peer's");
    assert_eq!(s.peer_count(), 0);
    assert!(requests(&s.fill(t0, None, 0)).is_empty(), "nothing asked of it");
}
