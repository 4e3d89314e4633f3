//! Stalls, timeouts and bans: silence withdraws requests, bytes never do.

use super::*;

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
fn on_a_slow_link_shared_by_many_peers_silence_is_judged_at_each_ones_share() {
    let t0 = Instant::now();
    let mut s = state(64, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 10, t0);
    // A straggler's 10 Mbit/s link: one request to each idle peer, 10 connections sharing it.
    let node_rate = Some(1_250_000.0);
    let first = requests(&s.fill(t0, node_rate, 0));
    assert!(first.iter().any(|r| r.0 == peer(10)), "{first:?}");
    let mut counters = HashMap::new();
    // 9 peers deliver their share (125 KB/s, a 1 MiB piece in 8.4 s); one loses TCP's
    // contention on the link and sends nothing for 10 s, less than two pieces' time at its
    // share: it keeps its request.
    let mut rates: HashMap<PeerId, u64> = (1..=9).map(|i| (peer(i), 1_250_000 / 10)).collect();
    rates.insert(peer(10), 0);
    let (t, actions) = run(&mut s, t0, &mut counters, &rates, 50, node_rate);
    let timed_out: Vec<&Action> = actions.iter().filter(|a| matches!(a, Action::TimedOut { .. })).collect();
    assert!(timed_out.is_empty(), "{timed_out:?}");
    // Silent past the cap: withdrawn all the same.
    let (_, actions) = run(&mut s, t, &mut counters, &rates, 26, node_rate);
    assert!(
        actions.iter().any(|a| matches!(a, Action::TimedOut { peer: p, .. } if *p == peer(10))),
        "{actions:?}"
    );
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
fn a_bad_piece_bans_and_drops_the_peer_and_a_bad_origin_piece_is_fatal() {
    let t0 = Instant::now();
    let mut s = state(4, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 1, t0);
    let reqs = requests(&s.fill(t0, None, 0));
    let actions = s.stored(peer(1), reqs[0].1, Stored::BadPiece { over: Some(addr(1)) }, t0).unwrap();
    assert_eq!(actions, vec![Action::Disconnect(peer(1))]);
    assert!(!s.connected(peer(1), addr(1), Bitfield::full(4), t0), "banned");
    assert!(s.stored(ORIGIN_PEER, 0, Stored::BadPiece { over: None }, t0).is_err());
}

/// A peer that sends a bad piece and closes before the piece's check ends (the check runs on
/// the blocking pool, the close arrives first) is banned all the same: not reconnected when
/// the tracker hands it out again.
#[test]
fn a_peer_that_closes_before_its_bad_piece_is_checked_is_banned() {
    let t0 = Instant::now();
    let mut s = state(4, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 1, t0);
    let reqs = requests(&s.fill(t0, None, 0));
    s.closed(&peer(1));
    s.stored(peer(1), reqs[0].1, Stored::BadPiece { over: Some(addr(1)) }, t0).unwrap();
    let t1 = t0 + Duration::from_secs(1);
    let again = s.announced(Some(vec![info(1, false)]), Duration::from_secs(5), t1);
    assert!(!again.contains(&Action::Connect(addr(1))), "reconnected to the peer that lied: {again:?}");
    assert!(!s.tick(t1, &[]).unwrap().contains(&Action::Connect(addr(1))));
}

/// A peer that connected under another's id, sent a bad piece and left before the piece's
/// check ended, while the id's owner connected from its own address: the liar's address is
/// banned, not the owner's, and the owner's connection stays.
#[test]
fn a_bad_piece_is_blamed_on_the_address_it_came_over_not_the_id() {
    let t0 = Instant::now();
    let mut s = state(4, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 1, t0);
    let reqs = requests(&s.fill(t0, None, 0));
    s.closed(&peer(1));
    assert!(s.connected(peer(1), addr(2), Bitfield::full(4), t0), "the id's owner, from its address");
    let actions = s.stored(peer(1), reqs[0].1, Stored::BadPiece { over: Some(addr(1)) }, t0).unwrap();
    assert!(!actions.contains(&Action::Disconnect(peer(1))), "{actions:?}");
    assert_eq!(s.peer_count(), 1);
    let t1 = t0 + Duration::from_secs(1);
    let again = s.announced(Some(vec![info(1, false), info(2, false)]), Duration::from_secs(5), t1);
    assert!(!again.contains(&Action::Connect(addr(1))), "reconnected to the address that lied: {again:?}");
    assert!(!s.connected(peer(9), addr(1), Bitfield::full(4), t1), "the liar's address is banned");
}

#[test]
fn a_ban_follows_the_peers_address_and_outlives_the_download_on_the_node() {
    let t0 = Instant::now();
    let node = crate::node::NodeFlow::default();
    let digest = meta(4);
    let mut s = state(4, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 2, t0);
    let reqs = requests(&s.fill(t0, None, 0));
    let (bad, index) = reqs.iter().copied().find(|(p, _)| *p == peer(1)).expect("a request to peer 1");
    s.stored(bad, index, Stored::BadPiece { over: Some(addr(1)) }, t0).unwrap();
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
    let other = Metainfo::unverifiable(Digest::of(Algorithm::Sha256, b"other"), 4 * PIECE, PIECE).unwrap();
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

/// A download of 64 pieces connected to peer 1 (an origin or an agent) holding all of them,
/// its first requests sent.
fn waiting_on(origin: bool, t0: Instant) -> SwarmState {
    let mut s = state(64, SchedulerConfig::default(), t0);
    s.announced(Some(vec![info(1, origin)]), Duration::from_secs(5), t0);
    assert!(s.connected(peer(1), addr(1), Bitfield::full(64), t0));
    assert!(!requests(&s.fill(t0, None, 0)).is_empty());
    s
}

/// A keep-alive (4 bytes) a second for `ticks` ticks of 200 ms, no byte of a piece; the
/// requests withdrawn meanwhile, or the first fatal error.
fn keep_alives(
    s: &mut SwarmState,
    t: &mut Instant,
    bytes: &mut u64,
    ticks: u128,
) -> Result<Vec<Action>, Fatal> {
    let mut withdrawn = Vec::new();
    for n in 1..=ticks {
        *t += Duration::from_millis(200);
        if n % 5 == 0 {
            *bytes += 4;
        }
        let actions = s.tick(*t, &[(peer(1), ConnBytes { all: *bytes, pieces: 0 })])?;
        withdrawn.extend(actions.into_iter().filter(|a| matches!(a, Action::TimedOut { .. })));
    }
    Ok(withdrawn)
}

#[test]
fn requests_waiting_their_turn_at_an_origin_that_sends_keep_alives_are_not_withdrawn() {
    // A busy origin keeps our request in line for its upload slots (`server::TURN_REMINDER`)
    // and says so with a keep-alive a second: that is not a stall, and no reason to fetch
    // over HTTP instead.
    let t0 = Instant::now();
    let mut s = waiting_on(true, t0);
    let (mut t, mut bytes) = (t0, 0);
    let withdrawn = keep_alives(&mut s, &mut t, &mut bytes, 150).unwrap();
    assert!(withdrawn.is_empty(), "{withdrawn:?}");
    assert!(!s.fallback_active(), "keep-alives from an origin we wait on brought in the HTTP fallback");
    // An origin that falls silent is still caught.
    let mut withdrawn = false;
    for _ in 0..(flow::MAX_STALL_AFTER.as_millis() / 200 + 1) {
        t += Duration::from_millis(200);
        let actions = s.tick(t, &[(peer(1), ConnBytes { all: bytes, pieces: 0 })]).unwrap();
        withdrawn |= actions.iter().any(|a| matches!(a, Action::TimedOut { .. }));
    }
    assert!(withdrawn, "requests to a silent origin were never withdrawn");
}

#[test]
fn an_agents_keep_alives_are_no_progress_the_fallback_comes_in_after_its_patience() {
    // An agent holds our requests and sends keep-alives alone (a hostile or wedged peer):
    // its connection is not stalled, but the download makes no progress, so the HTTP
    // fallback comes in after its patience, and with nothing from it either the download
    // fails for a stall.
    let t0 = Instant::now();
    let mut s = waiting_on(false, t0);
    let (mut t, mut bytes) = (t0, 0);
    let before = (FALLBACK_PATIENCE.as_millis() / 200) - 1;
    assert!(keep_alives(&mut s, &mut t, &mut bytes, before).unwrap().is_empty());
    assert!(!s.fallback_active(), "a sign of life holds the fallback for its patience");
    keep_alives(&mut s, &mut t, &mut bytes, 1).unwrap();
    assert!(s.fallback_active(), "keep-alives from an agent held the fallback past its patience");
    let stall = SchedulerConfig::default().stall_timeout;
    let rest = stall.as_millis() / 200 - before - 2;
    assert!(keep_alives(&mut s, &mut t, &mut bytes, rest).is_ok());
    let err = keep_alives(&mut s, &mut t, &mut bytes, 1).unwrap_err();
    assert!(matches!(err, Fatal::Stalled(..)), "{err}");
}

#[test]
fn an_agents_piece_bytes_are_progress_before_a_piece_is_whole() {
    let t0 = Instant::now();
    let mut s = waiting_on(false, t0);
    let mut t = t0;
    // 100 KB a second of a piece: slow, but progress; no fallback however long.
    for n in 1..=(FALLBACK_PATIENCE.as_millis() / 200 + 10) as u64 {
        t += Duration::from_millis(200);
        s.tick(t, &[(peer(1), ConnBytes { all: n * 20_004, pieces: n * 20_000 })]).unwrap();
    }
    assert!(!s.fallback_active());
}

#[test]
fn a_peer_that_sends_only_keep_alives_loses_its_requests_after_the_longest_piece_wait() {
    let t0 = Instant::now();
    // A download that does not fail first for its own lack of progress.
    let cfg = SchedulerConfig { stall_timeout: flow::MAX_PIECE_WAIT * 2, ..SchedulerConfig::default() };
    let mut s = state(64, cfg, t0);
    with_seeders(&mut s, 1, t0);
    let asked: Vec<u32> = requests(&s.fill(t0, None, 0)).iter().map(|r| r.1).collect();
    assert!(!asked.is_empty());
    let (mut t, mut bytes, mut withdrawn) = (t0, 0, Vec::new());
    let ticks = flow::MAX_PIECE_WAIT.as_millis() / 200;
    for n in 1..=ticks {
        t += Duration::from_millis(200);
        if n % 5 == 0 {
            bytes += 4;
        }
        for a in s.tick(t, &[(peer(1), ConnBytes { all: bytes, pieces: 0 })]).unwrap() {
            if let Action::TimedOut { index, .. } = a {
                assert!(n == ticks, "withdrawn after {n} ticks, before the longest piece wait");
                withdrawn.push(index);
            }
        }
    }
    withdrawn.sort_unstable();
    let mut asked = asked;
    asked.sort_unstable();
    assert_eq!(withdrawn, asked, "keep-alives alone held the requests past {:?}", flow::MAX_PIECE_WAIT);
}

/// A peer that claims every piece, sends each requested piece's bytes a few at a time (so
/// its connection never stalls) and reconnects before its requests are judged starved,
/// does not hold the download: once no piece came from a peer for the longest piece wait
/// with requests out, the HTTP fallback comes in and fetches what is missing, and keeps
/// fetching (its own pieces do not end the starvation) until the blob is whole. Before, the
/// trickle was progress and the download waited on it without end.
#[test]
fn a_peer_trickling_bytes_and_reconnecting_does_not_hold_the_download() {
    let t0 = Instant::now();
    let cfg = SchedulerConfig { stall_timeout: Duration::from_secs(3600), ..SchedulerConfig::default() };
    let mut s = state(64, cfg, t0);
    s.announced(Some(vec![info(1, false)]), Duration::from_secs(5), t0);
    assert!(s.connected(peer(1), addr(1), Bitfield::full(64), t0));
    assert!(!requests(&s.fill(t0, None, 0)).is_empty());
    let (mut t, mut bytes, mut first_fetch) = (t0, 0u64, None);
    let mut fetching: Vec<u32> = Vec::new();
    while !s.picker().have().is_complete() {
        assert!(
            t - t0 < Duration::from_secs(600),
            "{} of 64 pieces after 10 minutes",
            s.picker().have().count()
        );
        t += Duration::from_millis(200);
        bytes += 20;
        let connected = s.peer_count() > 0;
        s.tick(t, &[(peer(1), ConnBytes { all: bytes, pieces: bytes })]).unwrap();
        if connected && (t - t0).as_millis().is_multiple_of(50_000) {
            // Every 50 s, before the peer's own minute is up: a new connection.
            s.closed(&peer(1));
            bytes = 0;
            s.connected(peer(1), addr(1), Bitfield::full(64), t);
        }
        // The fallback's fetches of the last tick arrive (an origin on a fast link).
        for index in std::mem::take(&mut fetching) {
            s.stored(ORIGIN_PEER, index, Stored::Ok, t).unwrap();
        }
        for a in s.fill(t, None, 0) {
            if let Action::Fetch { index } = a {
                first_fetch.get_or_insert(t - t0);
                fetching.push(index);
            }
        }
    }
    let first = first_fetch.expect("the fallback fetched");
    assert!(first <= flow::MAX_PIECE_WAIT + Duration::from_secs(1), "came in after {first:?}");
    assert!(t - t0 <= flow::MAX_PIECE_WAIT + Duration::from_secs(30), "whole after {:?}", t - t0);
}
