//! How many peers may send to a node at once: unlimited until its link shows incast, then
//! halved and grown back one at a time (additive increase, multiplicative decrease).
//!
//! Incast is many senders converging on one receiver's link. Each TCP flow needs a few
//! segments in flight to recover a loss by fast retransmit; when the link's queue cannot
//! hold a few per flow, it overflows all the time, losses become timeouts, and a flow whose
//! retransmissions are lost too backs off for seconds while the others carry on. A download
//! asks every idle peer for a piece (see `swarm_state::requests`), which a fast host needs
//! (its peers' uplinks are shared by many downloaders), but a slow host's link cannot carry
//! that many flows: in the fleet benchmark's straggler runs (10 Mbit/s hosts with a 50 ms
//! queue, about ten 9000-byte frames) a straggler had 17-19 peers sending at once, its link
//! dropped 18 % of the frames sent to it, and its downloads gave up on 30-40 requests each
//! after connections went silent for up to 15 s. Capped at two or three senders (a scratch
//! build), the same runs had no timeouts at all, and the stragglers finished as fast.
//!
//! The cap cannot be set from the link's rate: a host whose peers' uplinks are busy also
//! measures a low rate, and capping it would keep it low (a host that asked only two peers
//! stayed at 3-7 Mbit/s of a 25 Mbit/s link, `swarm_state::requests`). So it waits for the
//! symptom, a busy connection that had its share of the node's link ([`FAIR_SHARE`]) silent
//! for [`INCAST_SILENCE`] while others deliver (the swarm's stall rule notices the same
//! silences only seconds later), and a node that never shows it is never capped. Incast
//! silences many senders; one peer silent again and again is that peer (or a hostile one
//! holding its victim's cap at the floor), so each host's silence counts once per
//! [`SIGN_MEMORY`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A connection with requests out that has received nothing for this long, while the node's
/// other connections delivered, is a sign of incast: TCP's retransmission timer (200 ms at
/// least, doubling) has fired three times or more. Long against the keep-alive a waiting
/// request hears every second (`server::TURN_REMINDER`), short against the stall windows
/// (`flow::STALL_AFTER`, 3 s, and more on a slow link), so the cap falls before requests
/// are given up on.
pub const INCAST_SILENCE: Duration = Duration::from_secs(2);
/// A silence is a sign only on a flow that had at least this share of what the node's link
/// gives each of its connections (`swarm_state`'s `link_share`) before it went silent. A flow
/// held well below that was limited elsewhere, and fewer senders here would not help it (a
/// straggler peer's 10 Mbit/s uplink, shared by a dozen downloaders, gives a fast host a
/// sixth of its share). Without this rule, in a 20-host straggler run at 1500-byte frames 14
/// of the 15 fast hosts had their cap fall (the fast hosts' slowest 1.22 × the link time);
/// with it 4 and 7 did (1.14, 1.19), and none at 9000-byte frames.
pub const FAIR_SHARE: f64 = 0.5;
/// The cap never goes below this many senders.
pub const MIN_SENDERS: usize = 2;
/// After a decrease, further signs are ignored this long: the senders over the new cap
/// finish the pieces they are sending before the cap takes effect.
pub const DECREASE_COOLDOWN: Duration = Duration::from_secs(3);
/// Without a sign of incast, the cap grows by one sender this often.
pub const INCREASE_EVERY: Duration = Duration::from_secs(3);
/// A cap grown to this many senders is lifted (more than a node's downloads keep busy).
pub const UNCAPPED_AT: usize = 64;
/// Per host, within this long a sign lowers the cap at most once (the host's next signs are
/// then ignored) and, not lowering it, holds its growth back at most once. A peer that sent a
/// piece and went silent every 2.5 s held its receiver's cap at [`MIN_SENDERS`] for every
/// download; alone it now halves the cap and holds growth back at most once each in this
/// time, against ten steps of growth.
pub const SIGN_MEMORY: Duration = Duration::from_secs(30);

/// The node's cap on peers sending to it at once.
#[derive(Clone, Debug, Default)]
pub struct SenderCap {
    /// `None`: no cap.
    cap: Option<usize>,
    /// Increases are counted in whole [`INCREASE_EVERY`]s from here.
    grown_at: Option<Instant>,
    /// The last decrease, for its cooldown.
    decreased_at: Option<Instant>,
    /// Hosts whose sign lowered the cap within [`SIGN_MEMORY`] (host keys,
    /// `inbound::host_key`): their signs are ignored.
    signed: HashMap<IpAddr, Instant>,
    /// Hosts whose sign held growth back (without lowering the cap) within [`SIGN_MEMORY`]:
    /// their next signs may still lower it, but not hold growth back again.
    held: HashMap<IpAddr, Instant>,
}

impl SenderCap {
    /// The cap at `now`, after the increases due since the last change.
    pub fn cap(&mut self, now: Instant) -> Option<usize> {
        let (Some(cap), Some(at)) = (self.cap, self.grown_at) else { return self.cap };
        let steps = now.saturating_duration_since(at).as_nanos() / INCREASE_EVERY.as_nanos().max(1);
        if steps == 0 {
            return self.cap;
        }
        let grown = cap.saturating_add(usize::try_from(steps).unwrap_or(usize::MAX));
        if grown >= UNCAPPED_AT {
            (self.cap, self.grown_at, self.decreased_at) = (None, None, None);
        } else {
            self.cap = Some(grown);
            // `grown < UNCAPPED_AT` bounds `steps`, and whole steps do not pass `now`.
            self.grown_at = Some(at + INCREASE_EVERY * u32::try_from(steps).unwrap_or(u32::MAX));
        }
        self.cap
    }

    /// A sign of incast at `now` on the connection to `from`, with `busy` peers sending to
    /// the node: halve the senders (at least [`MIN_SENDERS`]), unless the last decrease is
    /// within its cooldown or the cap is at its floor. Returns whether the cap fell. Per host
    /// ([`SIGN_MEMORY`]): a host whose sign lowered the cap is ignored for the memory; one
    /// whose sign did not lower it (a cooldown, the floor) restarts the wait for growth once
    /// in the memory, and may still lower the cap meanwhile. So one peer silent again and
    /// again lowers the cap once and holds growth back once per 30 s, while several senders
    /// silent at once (real incast) each count.
    pub fn incast(&mut self, now: Instant, busy: usize, from: IpAddr) -> bool {
        self.signed.retain(|_, at| now.saturating_duration_since(*at) < SIGN_MEMORY);
        self.held.retain(|_, at| now.saturating_duration_since(*at) < SIGN_MEMORY);
        let host = crate::inbound::host_key(from);
        if self.signed.contains_key(&host) {
            return false;
        }
        let current = self.cap(now);
        let cooling =
            self.decreased_at.is_some_and(|at| now.saturating_duration_since(at) < DECREASE_COOLDOWN);
        let halved = (current.unwrap_or(usize::MAX).min(busy) / 2).max(MIN_SENDERS);
        if !cooling && current.is_none_or(|c| halved < c) {
            // Growth starts over from here: the link just showed its limit.
            (self.cap, self.decreased_at, self.grown_at) = (Some(halved), Some(now), Some(now));
            self.signed.insert(host, now);
            return true;
        }
        if !self.held.contains_key(&host) {
            self.grown_at = Some(now);
            self.held.insert(host, now);
        }
        false
    }

    /// How many more peers may start sending, with `busy` sending now.
    pub fn room(&mut self, now: Instant, busy: usize) -> usize {
        self.cap(now).map_or(usize::MAX, |cap| cap.saturating_sub(busy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A host that has not signed before.
    fn fresh() -> IpAddr {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + NEXT.fetch_add(1, Ordering::Relaxed)))
    }

    #[test]
    fn a_node_that_shows_no_incast_is_never_capped() {
        let mut c = SenderCap::default();
        let t0 = Instant::now();
        assert_eq!(c.cap(t0), None);
        assert_eq!(c.room(t0 + Duration::from_secs(100), 40), usize::MAX);
    }

    #[test]
    fn a_sign_halves_the_busy_senders_down_to_the_floor() {
        let mut c = SenderCap::default();
        let t0 = Instant::now();
        assert!(c.incast(t0, 17, fresh()));
        assert_eq!(c.cap(t0), Some(8));
        assert_eq!(c.room(t0, 17), 0, "over the cap: nobody new until senders finish");
        assert_eq!(c.room(t0, 5), 3);
        assert!(!c.incast(t0 + DECREASE_COOLDOWN / 2, 17, fresh()), "within the cooldown");
        let t1 = t0 + DECREASE_COOLDOWN;
        // The increase due at t1 comes first (8 + 1), then the halving of min(9, 17).
        assert!(c.incast(t1, 17, fresh()));
        assert_eq!(c.cap(t1), Some(4));
        let t2 = t1 + DECREASE_COOLDOWN;
        assert!(c.incast(t2, 3, fresh()), "halves what is busy when fewer than the cap send");
        assert_eq!(c.cap(t2), Some(MIN_SENDERS));
        for i in 1..10 {
            c.incast(t2 + DECREASE_COOLDOWN * i, 1, fresh());
            assert!(c.cap(t2 + DECREASE_COOLDOWN * i) >= Some(MIN_SENDERS), "never below the floor");
        }
    }

    #[test]
    fn signs_in_a_row_keep_the_cap_from_growing() {
        let mut c = SenderCap::default();
        let t0 = Instant::now();
        assert!(c.incast(t0, 4, fresh()));
        let mut t = t0;
        for _ in 0..20 {
            t += INCREASE_EVERY / 2;
            c.incast(t, 2, fresh());
        }
        assert_eq!(c.cap(t), Some(MIN_SENDERS));
    }

    #[test]
    fn the_cap_grows_by_one_per_step_and_is_lifted_at_the_top() {
        let mut c = SenderCap::default();
        let t0 = Instant::now();
        assert!(c.incast(t0, 4, fresh()));
        assert_eq!(c.cap(t0), Some(2));
        assert_eq!(c.cap(t0 + INCREASE_EVERY - Duration::from_millis(1)), Some(2));
        assert_eq!(c.cap(t0 + INCREASE_EVERY), Some(3));
        assert_eq!(c.cap(t0 + INCREASE_EVERY * 3 + Duration::from_millis(1)), Some(5));
        // Steps counted once: asking again later adds only the steps since.
        assert_eq!(c.cap(t0 + INCREASE_EVERY * 4), Some(6));
        let top = (UNCAPPED_AT - 2) as u32;
        assert_eq!(c.cap(t0 + INCREASE_EVERY * top), None);
        assert!(c.incast(t0 + INCREASE_EVERY * top, 30, fresh()), "a new sign caps it again");
        assert_eq!(c.cap(t0 + INCREASE_EVERY * top), Some(15));
    }

    /// One host silent again and again (a hostile peer that sends a piece and goes quiet
    /// every 2.5 s) lowers the cap once per `SIGN_MEMORY` and does not hold back its growth;
    /// signs from other hosts still count meanwhile.
    #[test]
    fn one_hosts_repeated_silences_count_once_per_memory() {
        let mut c = SenderCap::default();
        let hostile = fresh();
        let t0 = Instant::now();
        assert!(c.incast(t0, 16, hostile));
        assert_eq!(c.cap(t0), Some(8));
        let mut t = t0;
        while t < t0 + SIGN_MEMORY - Duration::from_millis(2500) {
            t += Duration::from_millis(2500);
            assert!(!c.incast(t, 8, hostile), "a repeated sign at {:?}", t - t0);
        }
        let grown = c.cap(t).unwrap();
        assert!(grown >= 8 + 9, "grew to {grown} in {:?}", t - t0);
        // Another host's sign counts while the first is remembered.
        assert!(c.incast(t, grown, fresh()));
        // Signs in that decrease's cooldown are not remembered: the same hosts' next
        // silences count (several senders fall silent at once in real incast).
        let (x, y) = (fresh(), fresh());
        assert!(!c.incast(t + Duration::from_secs(1), 8, x));
        assert!(!c.incast(t + Duration::from_secs(1), 8, y));
        assert!(c.incast(t + DECREASE_COOLDOWN, 8, x), "x's next silence after the cooldown");
        // At the floor, another host silent every 2.5 s holds growth back and lowers the cap
        // at most once each per memory: the cap still grows.
        let mut f = SenderCap::default();
        let (lowering, pinning) = (fresh(), fresh());
        assert!(f.incast(t0, 3, lowering));
        assert_eq!(f.cap(t0), Some(MIN_SENDERS));
        let (mut at, mut lowered) = (t0, 0);
        while at < t0 + SIGN_MEMORY - Duration::from_millis(2500) {
            at += Duration::from_millis(2500);
            lowered += usize::from(f.incast(at, MIN_SENDERS, pinning));
        }
        assert!(lowered <= 1, "lowered {lowered} times by one host");
        let grown = f.cap(at).unwrap();
        assert!(grown >= MIN_SENDERS + 5, "one host pinned the cap at {grown}");
        // Once the memory has passed, its sign counts again.
        assert!(c.incast(t0 + SIGN_MEMORY + DECREASE_COOLDOWN * 2, 30, hostile));
        // An IPv6 host is one /64 by default.
        let (a, b): (IpAddr, IpAddr) = ("2001:db8::1".parse().unwrap(), "2001:db8::2".parse().unwrap());
        let later = t0 + SIGN_MEMORY * 3;
        assert!(c.incast(later, 30, a));
        assert!(!c.incast(later + DECREASE_COOLDOWN, 30, b), "the same /64");
    }
}
