//! What a download asks of whom: the budget, pipelining, origins, endgame and readers.

use super::*;

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

/// An agent's decline (out of egress) keeps the piece from that agent for a while, not from
/// the origins; an origin's keeps it from every origin.
#[test]
fn only_an_origins_decline_keeps_a_piece_from_the_origins() {
    let t0 = Instant::now();
    let mut s = state(4, SchedulerConfig::default(), t0);
    s.announced(Some(vec![info(9, true), info(1, false)]), Duration::from_secs(5), t0);
    assert!(s.connected(peer(9), addr(9), Bitfield::full(4), t0));
    let mut bf = Bitfield::new(4);
    bf.set(0).unwrap();
    bf.set(1).unwrap();
    assert!(s.connected(peer(1), addr(1), bf, t0));
    let reqs = requests(&s.fill(t0, None, 0));
    let (agent, origin) = (peer(1), peer(9));
    let to_agent = reqs.iter().find(|r| r.0 == agent).expect("a request to the agent").1;
    s.declined(agent, to_agent, t0);
    assert!(s.declined_by.contains_key(&(agent, to_agent)));
    assert!(!s.declined.contains_key(&to_agent), "an agent's decline kept the piece from the origins");
    let to_origin = reqs.iter().find(|r| r.0 == origin).expect("a request to the origin").1;
    s.declined(origin, to_origin, t0);
    assert!(s.declined.contains_key(&to_origin));
}

/// A download of `pieces` connected to an origin (peer 9, every piece) and to one other
/// peer (1) that holds only the last piece.
fn origin_and_one_peer(pieces: u32, t0: Instant) -> SwarmState {
    let mut s = state(pieces, SchedulerConfig::default(), t0);
    s.announced(Some(vec![info(9, true), info(1, false)]), Duration::from_secs(5), t0);
    assert!(s.connected(peer(9), addr(9), Bitfield::full(pieces), t0));
    let mut bf = Bitfield::new(pieces);
    bf.set(pieces - 1).unwrap();
    assert!(s.connected(peer(1), addr(1), bf, t0));
    s
}

/// Once the HTTP fallback came in (it counts as one more holder of every piece), a connected
/// origin is still asked for the pieces only origins hold; before, no piece was "only the
/// origins'" any more, and the origin's super-seeded connection sat idle for the rest of the
/// download while the fallback fetched over HTTP.
#[test]
fn an_origin_is_still_asked_once_the_fallback_came_in() {
    let t0 = Instant::now();
    let mut s = origin_and_one_peer(16, t0);
    let first: Vec<u32> =
        requests(&s.fill(t0, None, 0)).into_iter().filter(|r| r.0 == peer(9)).map(|r| r.1).collect();
    assert_eq!(first.len(), 1);
    let t = t0 + Duration::from_secs(4);
    s.tick(t, &[]).unwrap();
    assert!(s.fallback_active(), "no bytes for 4 s");
    s.stored(peer(9), first[0], Stored::Ok, t).unwrap();
    let asked: Vec<u32> =
        requests(&s.fill(t, None, 0)).into_iter().filter(|r| r.0 == peer(9)).map(|r| r.1).collect();
    assert_eq!(asked.len(), 1, "the origin is asked for the next piece only it holds");
}

#[test]
fn an_origin_is_asked_no_faster_than_this_host_passes_its_pieces_on() {
    let t0 = Instant::now();
    let mut s = origin_and_one_peer(16, t0);
    let from_origin = |actions: &[Action]| -> Vec<u32> {
        requests(actions).into_iter().filter(|r| r.0 == peer(9)).map(|r| r.1).collect()
    };
    // One piece at a time, in the order a reader will want them, until four of them are
    // here that the other peer has not announced.
    let mut t = t0;
    for expected in 0..UNSHARED_ORIGIN_PIECES as u32 {
        assert_eq!(from_origin(&s.fill(t, None, 0)), vec![expected]);
        t += Duration::from_millis(100);
        s.stored(peer(9), expected, Stored::Ok, t).unwrap();
    }
    assert_eq!(from_origin(&s.fill(t, None, 0)), Vec::<u32>::new(), "four unshared pieces: wait");
    // The peer got one of them (from us): the origin is asked for the next.
    s.have(&peer(1), 2, t);
    assert_eq!(from_origin(&s.fill(t, None, 0)), vec![4]);
    s.stored(peer(9), 4, Stored::Ok, t).unwrap();
    assert_eq!(from_origin(&s.fill(t, None, 0)), Vec::<u32>::new());
    // Pieces no peer has asked for in a while do not keep the origin away for good.
    let later = t0 + UNSHARED_MEMORY + Duration::from_millis(150);
    assert_eq!(from_origin(&s.fill(later, None, 0)), vec![5]);
}

#[test]
fn a_fast_node_may_hold_what_it_receives_while_its_peers_tell_it_they_have_them() {
    // Unmeasured, slow or absurd: the constant.
    assert_eq!(unshared_origin_limit(None, PIECE), UNSHARED_ORIGIN_PIECES);
    assert_eq!(unshared_origin_limit(Some(1_000_000.0), PIECE), UNSHARED_ORIGIN_PIECES);
    assert_eq!(unshared_origin_limit(Some(f64::NAN), PIECE), UNSHARED_ORIGIN_PIECES);
    assert_eq!(unshared_origin_limit(Some(f64::INFINITY), PIECE), UNSHARED_ORIGIN_PIECES);
    // A 50 Mbit/s host, 512 KiB pieces: 6. 25 MiB/s, 1 MiB pieces: 13.
    assert_eq!(unshared_origin_limit(Some(6_250_000.0), PIECE / 2), 6);
    assert_eq!(unshared_origin_limit(Some(25.0 * PIECE as f64), PIECE), 13);

    // In a download: at 25 MiB/s the origin is asked for 13 pieces before the wait.
    let t0 = Instant::now();
    let mut s = origin_and_one_peer(32, t0);
    let rate = Some(25.0 * PIECE as f64);
    let mut t = t0;
    let mut asked = Vec::new();
    for _ in 0..20 {
        let got: Vec<u32> =
            requests(&s.fill(t, rate, 0)).into_iter().filter(|r| r.0 == peer(9)).map(|r| r.1).collect();
        t += Duration::from_millis(40);
        for index in got {
            s.stored(peer(9), index, Stored::Ok, t).unwrap();
            asked.push(index);
        }
    }
    assert_eq!(asked, (0..13).collect::<Vec<u32>>());
}

#[test]
fn endgame_duplicates_only_late_requests_and_cancels_them_when_one_copy_arrives() {
    let t0 = Instant::now();
    let mut s = state(2, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 3, t0);
    let first = requests(&s.fill(t0, None, 0));
    assert_eq!(first.len(), 2, "one request per piece while they are on time: {first:?}");
    assert_eq!(s.take_duplicate_requests(), DuplicateRequests::default());
    // Bytes keep arriving (no stall), but slower than predicted: once a request is late,
    // another peer may ask for the same piece, at most twice per piece.
    assert!(requests(&s.fill(t0 + Duration::from_secs(2), None, 0)).is_empty());
    let t1 = t0 + Duration::from_millis(2600);
    let dupes = requests(&s.fill(t1, None, 0));
    assert_eq!(dupes.len(), 2, "{dupes:?}");
    assert_eq!(s.take_duplicate_requests(), DuplicateRequests { late: 2, faster: 0 });
    assert_eq!(s.take_duplicate_requests(), DuplicateRequests::default(), "taken once");
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
    for index in &held {
        let asked = actions.contains(&Action::Request { peer: peer(1), index: *index })
            || s.picker().have().get(*index);
        assert!(asked, "piece {index} stays with the straggler: {}", s.describe());
    }
    let duplicates = s.take_duplicate_requests();
    assert!(
        duplicates.faster >= 1 && duplicates.late == 0,
        "asked again for speed, not lateness: {duplicates:?}"
    );
    assert!(s.is_complete() || s.picker().in_flight_for(&peer(1)) > 0);
}

#[test]
fn a_reader_gets_what_the_node_receives_in_its_window_in_order_and_rarest_first_the_rest() {
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
    // A slow node (50 Mbit/s) keeps a window of four seconds' pieces: past it, rarest first.
    let rate = 50e6 / 8.0;
    assert_eq!(flow::reader_window(Some(rate), PIECE), 24);
    let _ = s.fill(t, Some(rate), 0);
    assert_eq!(s.picker().reader_window(), 24);
}

#[test]
fn a_request_that_queued_behind_delivered_pieces_is_not_late() {
    let t0 = Instant::now();
    let mut s = state(24, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 2, t0);
    s.fill(t0, None, 0);
    let mut counters = HashMap::new();
    // Both peers deliver steadily at 3 MB/s, 0.35 s a piece, so each is asked for about 4
    // pieces at once. The last of them arrives 1.4 s after it was asked, past the 1.2 s a
    // request that waits alone may take before it is late; but it waited behind pieces that
    // arrived on time, and its own wait began when the one before it arrived.
    let rates = HashMap::from([(peer(1), 3_000_000), (peer(2), 3_000_000)]);
    run(&mut s, t0, &mut counters, &rates, 30, Some(6e6));
    assert!(s.is_complete(), "{}", s.describe());
    let duplicates = s.take_duplicate_requests();
    assert_eq!(duplicates.late, 0, "no peer was slower than it showed: {duplicates:?}");
}
