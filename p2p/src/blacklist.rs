//! Peers we refuse to talk to for a while, and the strikes that get them there.
//!
//! A peer that sends a piece failing its hash is either broken or malicious, so it is banned at
//! once; a peer that keeps timing out is only slow, so it gets a few strikes first. Bans expire
//! because peers restart and networks heal, and a permanent ban list would only grow. Pure
//! state with time passed in, like the picker.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::peer::PeerId;

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
    peers: HashMap<PeerId, Strikes>,
}

impl Blacklist {
    /// An empty blacklist.
    pub fn new(config: BlacklistConfig) -> Blacklist {
        Blacklist { config, peers: HashMap::new() }
    }

    /// Ban `peer` from `now` for the configured duration (protocol violations, bad pieces).
    pub fn ban(&mut self, peer: PeerId, now: Instant) {
        // A duration too large to represent is a ban for as long as we run.
        let until = now
            .checked_add(self.config.ban_duration)
            .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
            .unwrap_or(now);
        self.peers.insert(peer, Strikes { timeouts: 0, banned_until: Some(until) });
    }

    /// `peer` sent a piece that failed verification: ban it at once.
    pub fn bad_piece(&mut self, peer: PeerId, now: Instant) {
        self.ban(peer, now);
    }

    /// A request to `peer` timed out: add a strike, banning it at the limit. Returns whether
    /// the peer is now banned. Strikes from before an expired ban do not count.
    pub fn timeout(&mut self, peer: PeerId, now: Instant) -> bool {
        let entry = self.peers.entry(peer).or_default();
        if entry.banned_at(now) {
            return true;
        }
        if entry.banned_until.is_some() {
            *entry = Strikes::default();
        }
        entry.timeouts += 1;
        if entry.timeouts >= self.config.max_timeouts {
            self.ban(peer, now);
            return true;
        }
        false
    }

    /// `peer` delivered a verified piece: its timeouts so far are forgiven. "Times out
    /// repeatedly" means in a row; a busy peer under a rate limit misses a deadline now and then
    /// but keeps delivering, and banning it would starve a swarm that needs every uploader.
    pub fn delivered(&mut self, peer: &PeerId) {
        if self.peers.get(peer).is_some_and(|s| s.banned_until.is_none()) {
            self.peers.remove(peer);
        }
    }

    /// Whether `peer` is banned at `now`.
    pub fn is_banned(&self, peer: &PeerId, now: Instant) -> bool {
        self.peers.get(peer).is_some_and(|s| s.banned_at(now))
    }

    /// When `peer`'s ban ends, if it is banned at `now`.
    pub fn banned_until(&self, peer: &PeerId, now: Instant) -> Option<Instant> {
        self.peers.get(peer).filter(|s| s.banned_at(now)).and_then(|s| s.banned_until)
    }

    /// Forget expired bans so the map does not grow without bound; call it now and then.
    pub fn prune(&mut self, now: Instant) {
        self.peers.retain(|_, s| s.banned_until.is_none_or(|until| now < until));
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

    fn peer(n: u8) -> PeerId {
        PeerId([n; 20])
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
    fn prune_forgets_expired_bans_only() {
        let mut bl = list();
        let t0 = Instant::now();
        bl.bad_piece(peer(1), t0);
        bl.bad_piece(peer(2), t0 + Duration::from_secs(30));
        bl.timeout(peer(3), t0);
        assert_eq!(bl.len(), 3);
        bl.prune(t0 + Duration::from_secs(60));
        assert_eq!(bl.len(), 2);
        assert!(bl.is_banned(&peer(2), t0 + Duration::from_secs(60)));
        bl.prune(t0 + Duration::from_secs(90));
        assert_eq!(bl.len(), 1, "strikes without a ban are kept");
        assert!(!bl.is_empty());
    }
}
