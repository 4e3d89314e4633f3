//! Signs of incast and the node's cap on senders: a silence while others deliver is reported
//! once; idle peers wait while the cap is full.

use super::*;
use crate::incast::INCAST_SILENCE;

/// Ticks of 200 ms in `d`.
fn ticks(d: Duration) -> u32 {
    (d.as_millis() / 200) as u32
}

/// Two seeders that each delivered their share of a 6 MB/s link for 1 s.
fn two_at_their_share(t0: Instant) -> (SwarmState, Instant, HashMap<PeerId, u64>) {
    let mut s = state(64, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 2, t0);
    assert!(requests(&s.fill(t0, LINK, 0)).iter().any(|r| r.0 == peer(2)));
    let mut counters = HashMap::new();
    let both = HashMap::from([(peer(1), 3_000_000), (peer(2), 3_000_000)]);
    let (t, _) = run(&mut s, t0, &mut counters, &both, 5, LINK);
    assert_eq!(s.take_incast_signs().len(), 0);
    (s, t, counters)
}

const LINK: Option<f64> = Some(6_000_000.0);

#[test]
fn a_busy_peer_silent_while_others_deliver_is_one_sign_until_its_bytes_resume() {
    let (mut s, t, mut counters) = two_at_their_share(Instant::now());
    let rates = HashMap::from([(peer(1), 6_000_000), (peer(2), 0)]);
    let (t, _) = run(&mut s, t, &mut counters, &rates, ticks(INCAST_SILENCE) - 1, LINK);
    assert_eq!(s.take_incast_signs().len(), 0, "not silent long enough yet");
    let (t, _) = run(&mut s, t, &mut counters, &rates, 1, LINK);
    assert_eq!(s.take_incast_signs().len(), 1);
    let (t, actions) = run(&mut s, t, &mut counters, &rates, 3, LINK);
    assert_eq!(s.take_incast_signs().len(), 0, "one sign per silence");
    assert!(!actions.iter().any(|a| matches!(a, Action::TimedOut { .. })), "a sign is not a stall");
    // Its bytes resume at its share (the meter, which counted the silence, recovers within
    // a few of its 1 s half-lives), then it goes silent again: a new sign.
    let resumed = HashMap::from([(peer(1), 3_000_000), (peer(2), 3_000_000)]);
    let (t, _) = run(&mut s, t, &mut counters, &resumed, 15, LINK);
    assert_eq!(s.take_incast_signs().len(), 0);
    run(&mut s, t, &mut counters, &rates, ticks(INCAST_SILENCE), LINK);
    assert_eq!(s.take_incast_signs().len(), 1);
}

#[test]
fn a_flow_held_far_below_its_share_is_no_sign_when_it_goes_silent() {
    // A straggler peer's uplink, shared by a dozen downloaders, gave this fast host a fifteenth
    // of its share: its silence is that uplink's trouble, not this link's.
    let t0 = Instant::now();
    let mut s = state(64, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 2, t0);
    s.fill(t0, LINK, 0);
    let mut counters = HashMap::new();
    let slow = HashMap::from([(peer(1), 6_000_000), (peer(2), 200_000)]);
    let (t, _) = run(&mut s, t0, &mut counters, &slow, 10, LINK);
    let silent = HashMap::from([(peer(1), 6_000_000), (peer(2), 0)]);
    run(&mut s, t, &mut counters, &silent, ticks(INCAST_SILENCE) * 2, LINK);
    assert_eq!(s.take_incast_signs().len(), 0);
}

#[test]
fn no_sign_when_no_connection_delivers() {
    // Every connection silent is a dead link or a swarm with nothing to give: the stall and
    // fallback rules deal with it, fewer senders would not help.
    let (mut s, t, mut counters) = two_at_their_share(Instant::now());
    let rates = HashMap::from([(peer(1), 0), (peer(2), 0)]);
    run(&mut s, t, &mut counters, &rates, ticks(INCAST_SILENCE) * 2, LINK);
    assert_eq!(s.take_incast_signs().len(), 0);
}

#[test]
fn keep_alives_of_a_request_waiting_its_turn_are_no_sign() {
    // A request waiting for a server's send slot hears a keep-alive (4 bytes) a second.
    let (mut s, mut t, counters) = two_at_their_share(Instant::now());
    assert!(s.picker().in_flight_for(&peer(2)) > 0, "a request waits at peer 2");
    let (mut fast, mut waiting) = (counters[&peer(1)], counters[&peer(2)]);
    for n in 1..=50 {
        t += Duration::from_millis(200);
        fast += 1_200_000;
        if n % 5 == 0 {
            waiting += 4;
        }
        s.tick(t, &[(peer(1), got(fast)), (peer(2), ConnBytes { all: waiting, pieces: counters[&peer(2)] })])
            .unwrap();
        s.fill(t, LINK, 0);
    }
    assert_eq!(s.take_incast_signs().len(), 0);
}

#[test]
fn under_the_nodes_cap_idle_peers_wait_until_it_has_room() {
    let t0 = Instant::now();
    let mut s = state(64, SchedulerConfig::default(), t0);
    with_seeders(&mut s, 10, t0);
    s.set_sender_room(2);
    let first = requests(&s.fill(t0, None, 0));
    let asked: HashSet<PeerId> = first.iter().map(|r| r.0).collect();
    assert_eq!(asked.len(), 2, "{first:?}");
    assert_eq!(s.senders(), 2);
    // The senders already busy still get their pipelines filled; nobody new while the cap
    // is full.
    s.set_sender_room(0);
    let more = requests(&s.fill(t0 + Duration::from_millis(200), Some(1_250_000.0), 0));
    assert!(more.iter().all(|r| asked.contains(&r.0)), "{more:?}");
    // Room again (the cap grew, or senders finished): idle peers are asked.
    s.set_sender_room(usize::MAX);
    let rest = requests(&s.fill(t0 + Duration::from_millis(400), None, 0));
    assert!(rest.iter().any(|r| !asked.contains(&r.0)), "{rest:?}");
    assert_eq!(s.senders(), 10);
}
