//! The HTTP fallback: only for what no peer has, until a real stall.

use super::*;

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
    s.tick(t0 + Duration::from_millis(2500), &[(peer(1), got(900_000))]).unwrap();
    s.tick(t0 + secs(5), &[(peer(1), got(900_000))]).unwrap();
    assert!(!s.fallback_active(), "2.5 s since the last byte");
    // Then nothing for 3 s: the origin comes in.
    s.tick(t0 + Duration::from_millis(5500), &[(peer(1), got(900_000))]).unwrap();
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
fn a_peer_that_connects_holding_pieces_we_lack_holds_the_fallback_back_as_a_have_does() {
    // The swarm warms up for 4 s; then a peer that already holds a piece connects (its
    // handshake, not a `have`, says so), and our request waits for its send slot.
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut s = state(4, SchedulerConfig::default(), t0);
    s.announced(Some(vec![info(1, false), info(2, false)]), Duration::from_secs(5), t0);
    assert!(s.connected(peer(1), addr(1), Bitfield::new(4), t0));
    s.tick(t0 + ms(4000), &[]).unwrap();
    let mut bf = Bitfield::new(4);
    bf.set(2).unwrap();
    assert!(s.connected(peer(2), addr(2), bf, t0 + ms(4000)));
    assert_eq!(requests(&s.fill(t0 + ms(4000), None, 0)), vec![(peer(2), 2)]);
    s.tick(t0 + ms(6500), &[]).unwrap();
    assert!(!s.fallback_active(), "2.5 s after a peer brought a piece we lack");
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

fn fetches(actions: &[Action]) -> Vec<u32> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Fetch { index } => Some(*index),
            _ => None,
        })
        .collect()
}

/// An origin that fails every fallback fetch at once (429, 404) is not asked again at once:
/// a failed round waits 250 ms, then twice that per round in a row; the fetches of one round
/// fail it once, so the download with no peer fails after five rounds (3.75 s of waits), not
/// after the second round's first failure.
#[test]
fn failed_fallback_rounds_back_off_and_five_in_a_row_without_peers_fail() {
    let t0 = Instant::now();
    let mut s = state(8, SchedulerConfig::default(), t0);
    s.announced(Some(vec![]), Duration::from_secs(5), t0);
    let mut t = t0 + FALLBACK_PATIENCE;
    s.tick(t, &[]).unwrap();
    assert!(s.fallback_active());
    let mut round = fetches(&s.fill(t, None, 0));
    assert_eq!(round.len(), 4);
    for backoff in [250, 500, 1000, 2000] {
        for &index in &round {
            s.fetch_failed(index, "429", t).unwrap();
        }
        assert!(fetches(&s.fill(t, None, 0)).is_empty(), "asked again at once");
        t += Duration::from_millis(backoff - 1);
        assert!(fetches(&s.fill(t, None, 0)).is_empty(), "asked again before {backoff} ms");
        t += Duration::from_millis(1);
        round = fetches(&s.fill(t, None, 0));
        assert_eq!(round.len(), 4, "asked again after {backoff} ms");
    }
    assert!(s.fetch_failed(round[0], "429", t).is_err(), "the fifth failed round");
}

/// A round's fetches that fail late (a slow origin answers each after a while) still count
/// as one failed round, whenever they fail.
#[test]
fn a_rounds_late_failures_count_once() {
    let t0 = Instant::now();
    let mut s = state(8, SchedulerConfig::default(), t0);
    s.announced(Some(vec![]), Duration::from_secs(5), t0);
    let mut t = t0 + FALLBACK_PATIENCE;
    s.tick(t, &[]).unwrap();
    let round = fetches(&s.fill(t, None, 0));
    assert_eq!(round.len(), 4);
    // Each fails 3 s after the one before, long past every backoff.
    for &index in &round {
        s.fetch_failed(index, "timed out", t).unwrap();
        t += Duration::from_secs(3);
    }
    // One failed round so far: four more may fail before the download does.
    for _ in 0..3 {
        let next = fetches(&s.fill(t, None, 0));
        assert!(!next.is_empty());
        for &index in &next {
            s.fetch_failed(index, "timed out", t).unwrap();
        }
        t += FALLBACK_BACKOFF_MAX;
    }
    let last = fetches(&s.fill(t, None, 0));
    assert!(s.fetch_failed(last[0], "timed out", t).is_err(), "the fifth failed round");
}

/// A fallback piece that arrives ends the backoff: the next round starts at once.
#[test]
fn a_fallback_piece_that_arrives_ends_the_backoff() {
    let t0 = Instant::now();
    let mut s = state(8, SchedulerConfig::default(), t0);
    s.announced(Some(vec![]), Duration::from_secs(5), t0);
    let t = t0 + FALLBACK_PATIENCE;
    s.tick(t, &[]).unwrap();
    let round = fetches(&s.fill(t, None, 0));
    s.fetch_failed(round[0], "reset", t).unwrap();
    s.stored(ORIGIN_PEER, round[1], Stored::Ok, t).unwrap();
    assert!(!fetches(&s.fill(t, None, 0)).is_empty());
}
