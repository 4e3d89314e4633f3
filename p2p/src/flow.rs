//! How much to ask of whom, from what the network shows: delivery rates measured from the bytes
//! that arrive, and the pipelining depths, in-flight budget and stall rule derived from them.
//!
//! The swarm used to size its requests from a configured ingress rate and time them out on
//! fixed deadlines. Without a configured rate (the default) nothing bounded the bytes in
//! flight: an agent queued 10 peers × 4 pieces behind a 6 MB/s link, requests "timed out"
//! while their bytes were on the wire, were asked again elsewhere, and good peers got banned.
//! Here every number comes from measurement instead, as TCP's does: each connection's rate
//! (bytes that arrived while requests were outstanding), the node's rate over all of them,
//! and the time since a connection last delivered a byte. Pure state, time passed in.

use std::time::{Duration, Instant};

/// Measurements older than this count half as much as fresh ones.
pub const RATE_HALF_LIFE: Duration = Duration::from_secs(1);

/// A rate is reported once this much busy time has been measured.
pub const MIN_MEASURED: Duration = Duration::from_millis(300);

/// Each peer is asked for about this much of the rate it has shown, on top of the piece it
/// is sending: enough that its link never idles between pieces, little enough that a piece
/// it holds is not long out of reach for everyone else.
pub const PEER_HORIZON: Duration = Duration::from_secs(1);

/// A download keeps at most this much of the node's measured ingress in flight across all
/// its peers (and at most this much of a configured ingress limit). More only waits in
/// queues: with 16 agents at 10 MiB/s, 4 s of data queued made hundreds of requests time
/// out; 1 s left uploaders idle (p99 1.21-1.31 × ideal against 1.12-1.18 with 2 s).
pub const IN_FLIGHT_HORIZON: Duration = Duration::from_secs(2);

/// The in-flight budget before any rate is measured: 8 MiB, a few pieces. From there it
/// follows the measured rate, like TCP's slow start.
pub const INITIAL_IN_FLIGHT_BYTES: u64 = 8 * 1024 * 1024;

/// The least in-flight budget once the rate is measured (2 MiB): on a slow link more only
/// spreads the link over more pieces at once, so none of them completes for seconds.
pub const MIN_IN_FLIGHT_BYTES: u64 = 2 * 1024 * 1024;

/// Requests kept at a peer whose rate is not known yet, and the least at any peer: one
/// being sent, one waiting, so the link does not idle for a round trip between pieces.
pub const MIN_PIPELINE: usize = 2;

/// A streaming reader's window covers what the node receives in this long: the pieces it
/// will read next go first, as many as arrive in four seconds. With a fixed window of 4
/// pieces, a 1 GiB pull from one seeder over loopback (16 requests in flight) gave the reader
/// a quarter of the requests: 2.07 s in, the download held 842 of 1,024 pieces and the stream
/// had sent 385 MiB, the rest of which it then read back from disk. With 1 s, 20 hosts of
/// 50 Mbit/s held every piece at 1.07-1.20 x the link time but their clients, reading in
/// order, had a third to two thirds of the blob still to read then, and ended at 1.21-1.25 x;
/// with 4 s they end at 1.16-1.22 (p50 1.14-1.17 against 1.21-1.22), the swarm no slower. A
/// 50 Mbit/s host's window is 24 pieces of 1 MiB: past it, rarest first still spreads a
/// fleet's pieces.
pub const READER_HORIZON: Duration = Duration::from_secs(4);

/// A connection with requests outstanding that delivers no byte for this long is stalled;
/// its requests go elsewhere. A connection whose bytes keep arriving is never timed out,
/// however slowly it goes: it gets fewer requests instead (see [`pipeline_depth`]).
pub const STALL_AFTER: Duration = Duration::from_secs(3);

/// How many of its piece times (at the rate it has shown) a slow peer's connection may stay
/// silent before it is stalled (see [`PeerFlow::stall_after`]).
pub const STALL_PIECE_TIMES: f64 = 2.0;

/// The longest a connection with requests outstanding may stay silent before it is stalled,
/// however slowly its peer has delivered (see [`PeerFlow::stall_after`]): a slow peer that
/// died is given up on within this.
pub const MAX_STALL_AFTER: Duration = Duration::from_secs(15);

/// The longest a peer may keep our requests without completing a piece, whatever bytes it
/// sends meanwhile: keep-alives keep its connection from stalling (a request waiting for an
/// origin's send slot, or for a piece's send at an agent, hears them), so a peer that sent
/// nothing else would otherwise hold its requests until endgame. Honest waits are far shorter: at an
/// origin, the line of its connections (about 17 s for 1,024 of them); at an agent, a piece
/// time per send ahead; and a peer slower than a piece a minute is of no use anyway.
pub const MAX_PIECE_WAIT: Duration = Duration::from_secs(60);

/// A rate estimate from cumulative byte counts, decayed with [`RATE_HALF_LIFE`]. Only busy
/// time counts (intervals in which requests were outstanding or bytes arrived), so a peer
/// that had nothing to do does not look slow.
#[derive(Clone, Debug, Default)]
pub struct RateMeter {
    bytes: f64,
    busy_secs: f64,
    last: Option<(Instant, u64)>,
}

impl RateMeter {
    /// Record the cumulative byte count `total` seen at `now`; `busy` says whether the
    /// interval since the last sample had requests outstanding.
    pub fn sample(&mut self, now: Instant, total: u64, busy: bool) {
        let Some((at, seen)) = self.last else {
            self.last = Some((now, total));
            return;
        };
        let dt = now.saturating_duration_since(at).as_secs_f64();
        let delta = total.saturating_sub(seen) as f64;
        self.last = Some((now, total.max(seen)));
        if dt <= 0.0 {
            return;
        }
        let decay = 0.5f64.powf(dt / RATE_HALF_LIFE.as_secs_f64());
        self.bytes *= decay;
        self.busy_secs *= decay;
        if busy || delta > 0.0 {
            self.bytes += delta;
            self.busy_secs += dt;
        }
    }

    /// Bytes per second over the recent busy time, once enough of it was measured.
    pub fn rate(&self) -> Option<f64> {
        // Decay shrinks the busy time too, so "enough" is relative to a steady state's.
        let enough = MIN_MEASURED.as_secs_f64() * 0.5;
        (self.busy_secs >= enough).then(|| self.bytes / self.busy_secs)
    }
}

/// What the swarm knows about one connection's delivery.
#[derive(Clone, Debug)]
pub struct PeerFlow {
    meter: RateMeter,
    received: u64,
    /// When a byte last arrived (or the connection opened).
    last_byte: Instant,
    /// The measured rate when the last byte arrived: silence decays the meter's rate, and the
    /// stall time must not grow while the connection is silent.
    rate_at_last_byte: Option<f64>,
}

impl PeerFlow {
    /// A connection opened at `now`.
    pub fn new(now: Instant) -> PeerFlow {
        let mut meter = RateMeter::default();
        meter.sample(now, 0, false);
        PeerFlow { meter, received: 0, last_byte: now, rate_at_last_byte: None }
    }

    /// The connection's cumulative received bytes at `now`; `busy` as in [`RateMeter::sample`].
    /// Returns whether bytes arrived since the last sample.
    pub fn sample(&mut self, now: Instant, received: u64, busy: bool) -> bool {
        self.meter.sample(now, received, busy);
        if received > self.received {
            self.received = received;
            self.last_byte = now;
            self.rate_at_last_byte = self.meter.rate();
            return true;
        }
        false
    }

    /// Bytes per second this peer has shown, if measured.
    pub fn rate(&self) -> Option<f64> {
        self.meter.rate()
    }

    /// The rate measured when the last byte arrived: what the peer delivered before its
    /// current silence (the meter's rate decays while it lasts).
    pub fn rate_at_last_byte(&self) -> Option<f64> {
        self.rate_at_last_byte
    }

    /// How long this connection may stay silent, with requests outstanding, before it is
    /// stalled: `base`, or [`STALL_PIECE_TIMES`] the time a piece of `piece_length` takes at
    /// the rate the peer had shown when its last byte arrived if that is longer, at most
    /// [`MAX_STALL_AFTER`]. TCP shares a congested slow link in bursts: a straggler host at
    /// 10 Mbit/s downloading from its 10 peers at once (an eighth of a 1 MiB piece per second
    /// each) saw connections to healthy peers go 3 s without a byte dozens of times per pull
    /// (the fleet benchmark with `BENCH_STRAGGLERS=1`: 36 timeouts at N = 10, 319-344 at
    /// N = 20, every one of them a straggler's request), and each withdrawal threw away the
    /// part of a piece already received. One piece time left 206-225 at N = 20, two 147-150.
    ///
    /// `link_share` is what each connection gets when the node's own link is the limit (its
    /// measured ingress ÷ its connections, [`SwarmState`]'s `link_share`); the
    /// slower of that and the peer's own rate sets the piece time. A peer's rate alone is no
    /// guide there: a new connection has none, and a straggler waiting on 17-19 peers at once
    /// (the default one request per idle peer) gives each about 70 KB/s, a 512 KiB piece in
    /// 8 s, so TCP's backing off left healthy peers silent past 3 s: 314-339 timeouts per
    /// 20-host straggler run (session 24), every one at a straggler. (So many senders were
    /// the deeper trouble: the node now caps them once its link shows incast,
    /// [`crate::incast`].)
    ///
    /// [`SwarmState`]: crate::swarm_state::SwarmState
    pub fn stall_after(&self, base: Duration, piece_length: u64, link_share: Option<f64>) -> Duration {
        let own = self.rate_at_last_byte.filter(|r| *r > 0.0);
        let rate = match (own, link_share.filter(|r| *r > 0.0)) {
            (Some(own), Some(share)) => Some(own.min(share)),
            (own, share) => own.or(share),
        };
        let piece_time = rate
            .and_then(|r| Duration::try_from_secs_f64(STALL_PIECE_TIMES * piece_length as f64 / r).ok())
            .unwrap_or(Duration::ZERO);
        base.max(piece_time.min(MAX_STALL_AFTER))
    }

    /// Since when requests outstanding since `oldest_request` have seen no byte.
    pub fn quiet_since(&self, oldest_request: Instant) -> Instant {
        self.last_byte.max(oldest_request)
    }

    /// Whether requests outstanding since `oldest_request` have seen no byte for `stall_after`.
    pub fn is_stalled(&self, now: Instant, oldest_request: Instant, stall_after: Duration) -> bool {
        now.saturating_duration_since(self.quiet_since(oldest_request)) >= stall_after
    }
}

/// How many requests to keep at a peer: the piece it is sending plus [`PEER_HORIZON`] of the
/// rate it has shown, between [`MIN_PIPELINE`] and `max`; a single one at a peer too slow to
/// send a piece within the horizon, so a straggler holds as few pieces as possible (a round
/// trip of idle link is nothing against its piece time).
pub fn pipeline_depth(rate: Option<f64>, piece_length: u64, max: usize) -> usize {
    let max = max.max(1);
    let Some(rate) = rate else { return MIN_PIPELINE.min(max) };
    let per_horizon = rate * PEER_HORIZON.as_secs_f64() / piece_length.max(1) as f64;
    if per_horizon < 1.0 {
        return 1;
    }
    let queued = per_horizon.ceil();
    // `as` saturates for absurd rates; the clamp bounds it anyway.
    (queued as usize).saturating_add(1).clamp(MIN_PIPELINE.min(max), max)
}

/// The bytes a node keeps in flight across its peers: [`IN_FLIGHT_HORIZON`] of its measured
/// ingress `rate` (at least [`MIN_IN_FLIGHT_BYTES`]; [`INITIAL_IN_FLIGHT_BYTES`] until it is
/// measured), and no more than the same horizon of a configured ingress `limit`.
pub fn in_flight_budget(rate: Option<f64>, limit: Option<u64>) -> u64 {
    let horizon = IN_FLIGHT_HORIZON.as_secs_f64();
    // `as` saturates for absurd rates.
    let measured = rate.map_or(INITIAL_IN_FLIGHT_BYTES, |r| ((r * horizon) as u64).max(MIN_IN_FLIGHT_BYTES));
    match limit.filter(|l| *l > 0) {
        Some(limit) => measured.min((limit as f64 * horizon) as u64),
        None => measured,
    }
}

/// Pieces ahead of each streaming reader that go before rarest-first: what arrives in
/// [`READER_HORIZON`] at the node's measured ingress `rate` ([`INITIAL_IN_FLIGHT_BYTES`]
/// until it is measured). The picker never goes below its configured window.
pub fn reader_window(rate: Option<f64>, piece_length: u64) -> u32 {
    let bytes = rate.map_or(INITIAL_IN_FLIGHT_BYTES as f64, |r| r * READER_HORIZON.as_secs_f64());
    // `as` saturates for absurd rates.
    (bytes / piece_length.max(1) as f64).ceil() as u32
}

/// [`in_flight_budget`] in requests of `piece_length` bytes, at least [`MIN_PIPELINE`].
pub fn in_flight_pieces(budget: u64, piece_length: u64) -> usize {
    let pieces = budget.div_ceil(piece_length.max(1));
    usize::try_from(pieces).unwrap_or(usize::MAX).max(MIN_PIPELINE)
}

/// A request is late when it has waited this many times what the rate its peer has shown
/// predicts (for it and the requests ahead of it), plus [`LATE_MARGIN`]. Only late requests
/// are duplicated in endgame: a duplicate of a piece that is on its way only takes the link
/// from the pieces still missing (every duplicate arrives, cancels reach queued requests only).
pub const LATE_FACTOR: f64 = 2.0;
/// See [`LATE_FACTOR`]; also how long a request to a peer whose rate is not measured yet may
/// wait before it is late.
pub const LATE_MARGIN: Duration = Duration::from_millis(500);

/// Whether a request that has waited `age`, with `ahead` requests before it at a peer that has
/// shown `rate`, is late (see [`LATE_FACTOR`]). The caller counts `age` from when the request
/// was sent or the peer's last piece arrived, whichever is later: counted from its sending, a
/// request that queued behind pieces since delivered on time looked late, and a 20-host fleet
/// with 512 KiB pieces asked 250 pieces twice in endgame (`shoal-sim`: 145, none after).
pub fn is_late(age: Duration, ahead: usize, piece_length: u64, rate: Option<f64>) -> bool {
    let expected = match rate.filter(|r| *r > 0.0) {
        Some(rate) => (ahead as f64 + 1.0) * piece_length as f64 / rate * LATE_FACTOR,
        None => IN_FLIGHT_HORIZON.as_secs_f64(),
    };
    age.as_secs_f64() > expected + LATE_MARGIN.as_secs_f64()
}

/// How long until a request that has waited `age`, with `ahead` requests before it at a peer
/// that has shown `rate`, is expected to be done; `None` when the peer's rate is not measured
/// yet. Once the request is overdue (but not yet late, see [`is_late`]) the peer has been
/// slower than it showed, and what is left is unknown: a whole piece at that rate counts as
/// left. Counting nothing left there, a fast host's last piece at a straggler sat for up to
/// 8 s past its expected time with nine idle seeders connected that would have sent it in a
/// fraction of a second: `shoal-sim --peers 20 --stragglers 0.25`, seeds 1-3, fast hosts'
/// slowest 1.66 / 1.55 / 1.65 × their limit, against 1.36 / 1.25 / 1.30 now (no change
/// without stragglers at 20 and 100 hosts).
pub fn time_left(age: Duration, ahead: usize, piece_length: u64, rate: Option<f64>) -> Option<Duration> {
    let rate = rate.filter(|r| *r > 0.0)?;
    let piece = piece_length as f64 / rate;
    let total = (ahead as f64 + 1.0) * piece;
    let left = total - age.as_secs_f64();
    let left = if left > 0.0 { left } else { piece };
    Some(Duration::try_from_secs_f64(left).unwrap_or(Duration::MAX))
}

/// Whether a request expected to take `time_left` more at its peer is worth asking of another
/// peer that has shown `rate` (bytes/s) too: only if that peer would deliver it in well under
/// the time left ([`LATE_FACTOR`] times faster, plus [`LATE_MARGIN`]). This is what gets a
/// fast host's last pieces away from a straggler before it is done with them.
pub fn worth_duplicating(time_left: Duration, piece_length: u64, rate: Option<f64>) -> bool {
    let Some(rate) = rate.filter(|r| *r > 0.0) else { return false };
    let there = piece_length as f64 / rate;
    time_left.as_secs_f64() > there * LATE_FACTOR + LATE_MARGIN.as_secs_f64()
}

/// How long the node's own ingress limit may hold back bytes in flight: a connection waiting
/// for tokens reads nothing, which must not look like a stalled peer. Zero without a limit.
pub fn limiter_delay(limit: Option<u64>, piece_length: u64) -> Duration {
    let Some(limit) = limit.filter(|l| *l > 0) else { return Duration::ZERO };
    let bytes = in_flight_budget(Some(f64::MAX), Some(limit)).max(piece_length.saturating_mul(2));
    Duration::try_from_secs_f64(bytes as f64 / limit as f64).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    /// Feed `rate` bytes/s for `secs` in 200 ms samples, starting at `t`; returns the end time
    /// and the byte count.
    fn feed(m: &mut RateMeter, t: Instant, total: u64, rate: f64, secs: f64, busy: bool) -> (Instant, u64) {
        let steps = (secs / 0.2).round() as u32;
        let (mut t, mut total) = (t, total);
        for _ in 0..steps {
            t += Duration::from_millis(200);
            total += (rate * 0.2) as u64;
            m.sample(t, total, busy);
        }
        (t, total)
    }

    #[test]
    fn the_meter_measures_a_steady_rate_and_follows_changes() {
        let t0 = Instant::now();
        let mut m = RateMeter::default();
        m.sample(t0, 0, true);
        assert_eq!(m.rate(), None, "nothing measured yet");
        let (t, total) = feed(&mut m, t0, 0, 6e6, 3.0, true);
        let r = m.rate().unwrap();
        assert!((r - 6e6).abs() < 1e4, "{r}");
        // The link slows to a fifth: within a few half-lives the estimate follows.
        feed(&mut m, t, total, 1.2e6, 6.0, true);
        let r = m.rate().unwrap();
        assert!((r - 1.2e6).abs() < 0.15e6, "{r}");
    }

    #[test]
    fn idle_time_does_not_make_a_peer_look_slow() {
        let t0 = Instant::now();
        let mut m = RateMeter::default();
        m.sample(t0, 0, true);
        let (t, total) = feed(&mut m, t0, 0, 5e6, 2.0, true);
        // Five seconds with nothing asked and nothing arriving.
        let (t, total) = feed(&mut m, t, total, 0.0, 5.0, false);
        feed(&mut m, t, total, 5e6, 0.4, true);
        let r = m.rate().unwrap();
        assert!((r - 5e6).abs() < 1e4, "{r}");
    }

    #[test]
    fn pipelining_grows_and_shrinks_with_the_measured_rate() {
        assert_eq!(pipeline_depth(None, MIB, 16), MIN_PIPELINE, "unknown peers get the minimum");
        // 6 MB/s (a 50 Mbit/s link) with 1 MiB pieces: 1 s is 6 pieces, plus the one in transit.
        assert_eq!(pipeline_depth(Some(6e6), MIB, 16), 7);
        assert_eq!(pipeline_depth(Some(60e6), MIB, 16), 16, "capped");
        assert_eq!(pipeline_depth(Some(300e3), MIB, 16), 1, "a straggler holds one piece");
        assert_eq!(pipeline_depth(Some(1e6 * 1.1), MIB, 16), 3, "just over a piece a second");
        assert_eq!(pipeline_depth(Some(1e6), 4 * MIB, 1), 1, "the cap wins over the minimum");
        assert_eq!(pipeline_depth(Some(f64::MAX), 1, 8), 8, "no overflow");
        // The same peer measured faster, then slower.
        let mut m = RateMeter::default();
        let t0 = Instant::now();
        m.sample(t0, 0, true);
        let (t, total) = feed(&mut m, t0, 0, 12e6, 3.0, true);
        let fast = pipeline_depth(m.rate(), MIB, 16);
        feed(&mut m, t, total, 0.5e6, 5.0, true);
        let slow = pipeline_depth(m.rate(), MIB, 16);
        assert!(fast >= 12 && slow <= 2, "fast {fast}, slow {slow}");
    }

    #[test]
    fn the_budget_follows_the_measured_rate_within_a_configured_limit() {
        assert_eq!(in_flight_budget(None, None), INITIAL_IN_FLIGHT_BYTES, "slow start");
        assert_eq!(in_flight_budget(Some(6e6), None), 12_000_000);
        assert_eq!(in_flight_budget(Some(1e3), None), MIN_IN_FLIGHT_BYTES, "floor");
        assert_eq!(in_flight_budget(Some(100e6), Some(10 * MIB)), 20 * MIB, "the limit caps it");
        assert_eq!(in_flight_budget(None, Some(MIB)), 2 * MIB, "a low limit caps the floor too");
        assert_eq!(in_flight_budget(Some(6e6), Some(0)), 12_000_000, "a zero limit means none");
        assert_eq!(in_flight_budget(Some(f64::MAX), None), u64::MAX, "saturates");
        assert_eq!(in_flight_pieces(12_000_000, MIB), 12);
        assert_eq!(in_flight_pieces(MIB, 4 * MIB), MIN_PIPELINE);
        assert_eq!(in_flight_pieces(u64::MAX, 1), usize::MAX);
    }

    #[test]
    fn a_connection_is_stalled_only_when_no_byte_arrives() {
        let t0 = Instant::now();
        let mut f = PeerFlow::new(t0);
        // Bytes trickle in at 100 KB/s for 10 s: slow, never stalled.
        for i in 1..=50u64 {
            let now = t0 + Duration::from_millis(200 * i);
            f.sample(now, i * 20_000, true);
            assert!(!f.is_stalled(now, t0, STALL_AFTER), "at {i}");
        }
        let last = t0 + Duration::from_secs(10);
        assert!(!f.is_stalled(last + Duration::from_millis(2900), t0, STALL_AFTER));
        assert!(f.is_stalled(last + STALL_AFTER, t0, STALL_AFTER), "silent for 3 s");
        // A request sent after the silence began gets the whole time from its own start.
        let asked = last + Duration::from_secs(2);
        assert!(!f.is_stalled(last + STALL_AFTER, asked, STALL_AFTER));
    }

    #[test]
    fn a_slow_peer_may_stay_silent_for_two_piece_times_but_not_forever() {
        let t0 = Instant::now();
        let mut f = PeerFlow::new(t0);
        assert_eq!(f.stall_after(STALL_AFTER, MIB, None), STALL_AFTER, "unmeasured: the base");
        // 250 KB/s for 10 s: a 1 MiB piece takes 4.2 s at that rate, two 8.4 s.
        for i in 1..=50u64 {
            f.sample(t0 + Duration::from_millis(200 * i), i * 50_000, true);
        }
        let window = f.stall_after(STALL_AFTER, MIB, None);
        assert!(window > Duration::from_secs(8) && window < Duration::from_secs(9), "{window:?}");
        let last = t0 + Duration::from_secs(10);
        // Silence decays the meter but not the window.
        for i in 1..=40u64 {
            f.sample(last + Duration::from_millis(200 * i), 50 * 50_000, true);
        }
        assert_eq!(f.stall_after(STALL_AFTER, MIB, None), window);
        assert!(!f.is_stalled(last + Duration::from_secs(5), t0, window), "5 s of silence is normal here");
        assert!(f.is_stalled(last + window, t0, window));
        // Slower still: the cap holds.
        let mut g = PeerFlow::new(t0);
        for i in 1..=50u64 {
            g.sample(t0 + Duration::from_millis(200 * i), i * 100, true);
        }
        assert_eq!(g.stall_after(STALL_AFTER, MIB, None), MAX_STALL_AFTER);
        // A fast peer keeps the base.
        let mut h = PeerFlow::new(t0);
        for i in 1..=50u64 {
            h.sample(t0 + Duration::from_millis(200 * i), i * 1_250_000, true);
        }
        assert_eq!(h.stall_after(STALL_AFTER, MIB, None), STALL_AFTER);
        // ... unless the node's own link gives each of its connections less: 18 connections
        // sharing 1.25 MB/s get about 70 KB/s each, two 1 MiB pieces in 30 s (the cap).
        assert_eq!(h.stall_after(STALL_AFTER, MIB, Some(1_250_000.0 / 18.0)), MAX_STALL_AFTER);
        let shared = h.stall_after(STALL_AFTER, MIB, Some(250_000.0));
        assert!(shared > Duration::from_secs(8) && shared < Duration::from_secs(9), "{shared:?}");
        // An unmeasured peer on such a link gets the share's time, not the base.
        assert_eq!(PeerFlow::new(t0).stall_after(STALL_AFTER, MIB, Some(250_000.0)), shared);
        // A fast node's share changes nothing: 6.25 MB/s among 10 peers, 0.84 s a 512 KiB piece.
        assert_eq!(h.stall_after(STALL_AFTER, MIB / 2, Some(625_000.0)), STALL_AFTER);
    }

    #[test]
    fn a_request_is_late_only_past_what_its_peers_rate_predicts() {
        let ms = Duration::from_millis;
        // 1 MiB at 4 MiB/s is 250 ms: late after 2 × 250 + 500 ms.
        assert!(!is_late(ms(1000), 0, MIB, Some(4.0 * MIB as f64)));
        assert!(is_late(ms(1001), 0, MIB, Some(4.0 * MIB as f64)));
        // Third in the queue: 3 × 250 ms expected.
        assert!(!is_late(ms(2000), 2, MIB, Some(4.0 * MIB as f64)));
        assert!(is_late(ms(2001), 2, MIB, Some(4.0 * MIB as f64)));
        // Unmeasured peers get the in-flight horizon.
        assert!(!is_late(ms(2500), 0, MIB, None));
        assert!(is_late(ms(2501), 0, MIB, None));
        assert!(!is_late(Duration::MAX, 0, MIB, Some(0.0)) || is_late(Duration::MAX, 0, MIB, Some(0.0)));
    }

    #[test]
    fn a_piece_on_a_straggler_is_worth_asking_of_a_fast_peer() {
        let secs = Duration::from_secs_f64;
        // 1 MiB at 125 KB/s: about 8.4 s in all; 2 s spent, about 6.4 s left.
        let left = time_left(secs(2.0), 0, MIB, Some(125e3)).unwrap();
        assert!((left.as_secs_f64() - 6.39).abs() < 0.01, "{left:?}");
        // Overdue: a whole piece at its rate counts as left, so a fast peer is asked too.
        let overdue = time_left(secs(10.0), 0, MIB, Some(125e3)).unwrap();
        assert!((overdue.as_secs_f64() - 8.39).abs() < 0.01, "{overdue:?}");
        assert!(!is_late(secs(10.0), 0, MIB, Some(125e3)), "overdue is not late yet");
        assert!(worth_duplicating(overdue, MIB, Some(3e6)));
        assert_eq!(time_left(secs(1.0), 0, MIB, None), None);
        // A peer at 3 MB/s delivers it in 0.35 s: worth it (2 × 0.35 + 0.5 < 6.4).
        assert!(worth_duplicating(left, MIB, Some(3e6)));
        // A peer no faster than the straggler is not.
        assert!(!worth_duplicating(left, MIB, Some(125e3)));
        assert!(!worth_duplicating(left, MIB, None), "unmeasured peers are not asked");
        assert!(!worth_duplicating(secs(1.0), MIB, Some(3e6)), "almost done: let it finish");
    }

    #[test]
    fn the_node_limiter_lengthens_the_stall_time() {
        assert_eq!(limiter_delay(None, MIB), Duration::ZERO);
        assert_eq!(limiter_delay(Some(10 * MIB), MIB), Duration::from_secs(2));
        assert_eq!(limiter_delay(Some(MIB), 4 * MIB), Duration::from_secs(8), "two pieces at least");
        assert!(limiter_delay(Some(1), u64::MAX) > Duration::from_secs(1 << 40), "no panic");
    }
}
