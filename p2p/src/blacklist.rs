//! Peers we refuse to talk to for a while, and the strikes that get them there.
//!
//! A peer that sends a piece failing its hash is either broken or malicious, so it is banned at
//! once; a peer that keeps timing out is only slow, so it gets a few strikes first. Bans expire
//! because peers restart and networks heal, and a permanent ban list would only grow. Pure
//! state with time passed in, like the picker.
//!
//! Peers are known by the address we connect to, not by their peer id: an agent picks a new
//! random id every time it starts, so a broken agent that restarts (or a malicious one that
//! changes its id) would otherwise be trusted again at once. One list covers one blob; the
//! node keeps each blob's list between downloads ([`crate::node::NodeFlow::blacklist_for`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Default number of request timeouts that get a peer banned.
pub const DEFAULT_MAX_TIMEOUTS: u32 = 3;

/// Default length of a ban (5 minutes).
pub const DEFAULT_BAN_DURATION: Duration = Duration::from_secs(5 * 60);

/// Tunables of the blacklist; every field has a documented default (see the `DEFAULT_*` consts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlacklistConfig {
    /// Timeouts before a ban (default 3; 0 or 1 both mean the first timeout bans).
    pub max_timeouts: u32,
    /// How long a ban lasts (default 5 min).
    pub ban_duration: Duration,
}

impl Default for BlacklistConfig {
    fn default() -> Self {
        BlacklistConfig { max_timeouts: DEFAULT_MAX_TIMEOUTS, ban_duration: DEFAULT_BAN_DURATION }
    }
}

/// Strikes against one peer.
#[derive(Clone, Copy, Debug, Default)]
struct Strikes {
    timeouts: u32,
    /// When the last timeout was counted: strikes older than a ban's duration are forgotten.
    last_strike: Option<Instant>,
    banned_until: Option<Instant>,
}

impl Strikes {
    fn banned_at(&self, now: Instant) -> bool {
        self.banned_until.is_some_and(|until| now < until)
    }
}

/// Strikes and bans per peer; see the module docs.
#[derive(Clone, Debug, Default)]
pub struct Blacklist {
    config: BlacklistConfig,
    peers: HashMap<SocketAddr, Strikes>,
}

impl Blacklist {
    /// An empty blacklist.
    pub fn new(config: BlacklistConfig) -> Blacklist {
        Blacklist { config, peers: HashMap::new() }
    }

    /// Ban `peer` from `now` for the configured duration (protocol violations, bad pieces).
    pub fn ban(&mut self, peer: SocketAddr, now: Instant) {
        // A duration too large to represent is a ban for as long as we run.
        let until = now
            .checked_add(self.config.ban_duration)
            .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
            .unwrap_or(now);
        self.peers.insert(peer, Strikes { timeouts: 0, last_strike: None, banned_until: Some(until) });
    }

    /// `peer` sent a piece that failed verification: ban it at once.
    pub fn bad_piece(&mut self, peer: SocketAddr, now: Instant) {
        self.ban(peer, now);
    }

    /// A request to `peer` timed out: add a strike, banning it at the limit. Returns whether
    /// the peer is now banned. Strikes from before an expired ban do not count.
    pub fn timeout(&mut self, peer: SocketAddr, now: Instant) -> bool {
        let entry = self.peers.entry(peer).or_default();
        if entry.banned_at(now) {
            return true;
        }
        if entry.banned_until.is_some() {
            *entry = Strikes::default();
        }
        entry.timeouts += 1;
        entry.last_strike = Some(now);
        if entry.timeouts >= self.config.max_timeouts {
            self.ban(peer, now);
            return true;
        }
        false
    }

    /// `peer` delivered a verified piece: its timeouts so far are forgiven. "Times out
    /// repeatedly" means in a row; a busy peer under a rate limit misses a deadline now and then
    /// but keeps delivering, and banning it would starve a swarm that needs every uploader.
    pub fn delivered(&mut self, peer: &SocketAddr) {
        if self.peers.get(peer).is_some_and(|s| s.banned_until.is_none()) {
            self.peers.remove(peer);
        }
    }

    /// Whether `peer` is banned at `now`.
    pub fn is_banned(&self, peer: &SocketAddr, now: Instant) -> bool {
        self.peers.get(peer).is_some_and(|s| s.banned_at(now))
    }

    /// When `peer`'s ban ends, if it is banned at `now`.
    pub fn banned_until(&self, peer: &SocketAddr, now: Instant) -> Option<Instant> {
        self.peers.get(peer).filter(|s| s.banned_at(now)).and_then(|s| s.banned_until)
    }

    /// Forget expired bans, and strikes older than a ban would last, so the map does not grow
    /// without bound; call it now and then.
    pub fn prune(&mut self, now: Instant) {
        let keep = self.config.ban_duration;
        self.peers.retain(|_, s| match s.banned_until {
            Some(until) => now < until,
            None => s.last_strike.is_some_and(|at| now.saturating_duration_since(at) < keep),
        });
    }

    /// Take in what `other` (a later copy of this blob's list) holds: for each peer the
    /// longer ban, and the later strikes.
    pub fn merge(&mut self, other: Blacklist) {
        for (peer, theirs) in other.peers {
            let ours = self.peers.entry(peer).or_default();
            let later = match (ours.banned_until, theirs.banned_until) {
                (_, Some(t)) => ours.banned_until.is_none_or(|o| t > o),
                (Some(_), None) => false,
                (None, None) => theirs.last_strike > ours.last_strike,
            };
            if later {
                *ours = theirs;
            }
        }
    }

    /// Number of peers with strikes or bans on record (for metrics).
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether nothing is on record.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 7000))
    }

    fn list() -> Blacklist {
        Blacklist::new(BlacklistConfig { max_timeouts: 3, ban_duration: Duration::from_secs(60) })
    }

    #[test]
    fn bad_piece_bans_immediately_and_expires() {
        let mut bl = list();
        let t0 = Instant::now();
        assert!(!bl.is_banned(&peer(1), t0));
        bl.bad_piece(peer(1), t0);
        assert!(bl.is_banned(&peer(1), t0));
        assert!(bl.is_banned(&peer(1), t0 + Duration::from_secs(59)));
        assert_eq!(bl.banned_until(&peer(1), t0), Some(t0 + Duration::from_secs(60)));
        assert!(!bl.is_banned(&peer(1), t0 + Duration::from_secs(60)));
        assert_eq!(bl.banned_until(&peer(1), t0 + Duration::from_secs(60)), None);
        assert!(!bl.is_banned(&peer(2), t0));
    }

    #[test]
    fn timeouts_ban_at_the_limit() {
        let mut bl = list();
        let t0 = Instant::now();
        assert!(!bl.timeout(peer(1), t0));
        assert!(!bl.timeout(peer(1), t0));
        assert!(!bl.is_banned(&peer(1), t0));
        assert!(bl.timeout(peer(1), t0 + Duration::from_secs(1)));
        assert!(bl.is_banned(&peer(1), t0 + Duration::from_secs(60)));
        assert!(!bl.is_banned(&peer(1), t0 + Duration::from_secs(61)));
        // Timeouts while banned change nothing.
        assert!(bl.timeout(peer(1), t0 + Duration::from_secs(2)));
        assert_eq!(
            bl.banned_until(&peer(1), t0 + Duration::from_secs(2)),
            Some(t0 + Duration::from_secs(61))
        );
    }

    #[test]
    fn a_delivered_piece_forgives_earlier_timeouts_but_not_a_ban() {
        let mut bl = list();
        let t0 = Instant::now();
        assert!(!bl.timeout(peer(1), t0));
        assert!(!bl.timeout(peer(1), t0));
        bl.delivered(&peer(1));
        assert!(!bl.timeout(peer(1), t0), "strikes start over");
        assert!(!bl.timeout(peer(1), t0));
        assert!(bl.timeout(peer(1), t0), "three in a row ban");
        bl.delivered(&peer(1));
        assert!(bl.is_banned(&peer(1), t0), "a late piece does not lift a ban");
    }

    #[test]
    fn strikes_reset_after_a_ban_expires() {
        let mut bl = list();
        let t0 = Instant::now();
        for _ in 0..3 {
            bl.timeout(peer(1), t0);
        }
        let later = t0 + Duration::from_secs(120);
        assert!(!bl.timeout(peer(1), later));
        assert!(!bl.timeout(peer(1), later));
        assert!(bl.timeout(peer(1), later));
    }

    #[test]
    fn zero_limit_bans_on_first_timeout() {
        let mut bl = Blacklist::new(BlacklistConfig { max_timeouts: 0, ..BlacklistConfig::default() });
        assert!(bl.timeout(peer(1), Instant::now()));
    }

    #[test]
    fn huge_ban_duration_does_not_panic() {
        let mut bl = Blacklist::new(BlacklistConfig { max_timeouts: 1, ban_duration: Duration::MAX });
        let now = Instant::now();
        bl.bad_piece(peer(1), now);
        assert!(bl.is_banned(&peer(1), now + Duration::from_secs(3600)));
    }

    #[test]
    fn prune_forgets_expired_bans_and_old_strikes() {
        let mut bl = list();
        let t0 = Instant::now();
        bl.bad_piece(peer(1), t0);
        bl.bad_piece(peer(2), t0 + Duration::from_secs(30));
        bl.timeout(peer(3), t0 + Duration::from_secs(40));
        assert_eq!(bl.len(), 3);
        bl.prune(t0 + Duration::from_secs(60));
        assert_eq!(bl.len(), 2);
        assert!(bl.is_banned(&peer(2), t0 + Duration::from_secs(60)));
        bl.prune(t0 + Duration::from_secs(90));
        assert_eq!(bl.len(), 1, "recent strikes without a ban are kept");
        assert!(!bl.is_empty());
        bl.prune(t0 + Duration::from_secs(100));
        assert!(bl.is_empty(), "strikes older than a ban's duration are forgotten");
    }

    #[test]
    fn merging_keeps_the_longer_ban_and_the_later_strikes() {
        let t0 = Instant::now();
        let mut ours = list();
        ours.bad_piece(peer(1), t0 + Duration::from_secs(10));
        ours.timeout(peer(2), t0);
        let mut theirs = list();
        theirs.bad_piece(peer(1), t0);
        theirs.timeout(peer(2), t0 + Duration::from_secs(1));
        theirs.timeout(peer(2), t0 + Duration::from_secs(1));
        theirs.bad_piece(peer(3), t0);
        ours.bad_piece(peer(4), t0);
        theirs.timeout(peer(4), t0 + Duration::from_secs(20));
        ours.merge(theirs);
        assert!(ours.is_banned(&peer(4), t0 + Duration::from_secs(30)), "a later strike does not lift a ban");
        assert_eq!(ours.banned_until(&peer(1), t0), Some(t0 + Duration::from_secs(70)));
        assert!(ours.timeout(peer(2), t0 + Duration::from_secs(2)), "the later strikes count");
        assert!(ours.is_banned(&peer(3), t0));
    }
}
