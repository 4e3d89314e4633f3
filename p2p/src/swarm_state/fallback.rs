//! The HTTP fallback: the origin as a pseudo-peer ([`ORIGIN_PEER`]) over HTTP range
//! requests, when it comes in (a real stall, a swarm that gives nothing for
//! [`FALLBACK_PATIENCE`], no peers at all, no piece from a peer for
//! [`flow::MAX_PIECE_WAIT`] with requests out), what it fetches (while peers deliver, only what
//! no agent holds), and how it backs off after a failed round.

use std::time::{Duration, Instant};

use super::{Action, Fatal, SwarmState, ORIGIN_PEER};
use crate::bitfield::Bitfield;
use crate::flow;

/// Consecutive rounds of failed fallback fetches, with no peer connected, that fail the
/// download.
pub const MAX_FALLBACK_FAILURES: u32 = 5;
/// The wait before the fallback fetches again after a failed round, doubled per round in a
/// row up to [`FALLBACK_BACKOFF_MAX`]: an origin answering 429 or 404 at once was asked
/// again at once, by every agent of a fleet, and one second of 429s failed a download with
/// no peers in two rounds.
pub const FALLBACK_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between fallback rounds.
pub const FALLBACK_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a download whose swarm is alive but has not delivered to it (peers announce
/// pieces it lacks, an origin declines its requests because agents hold them) waits before
/// the HTTP fallback comes in anyway. A big fleet that starts at once has little to give
/// for its first seconds: the origin super-seeds each piece to one agent, and the pieces
/// reach most hosts only a few hand-offs later. With the fallback after 3 s of no bytes,
/// 1,000 simulated hosts fetched 8.5 × the blob from the origin over HTTP; at 10,000 hosts,
/// 9,000 of which cannot connect to the origin (it takes 1,024), every host with only empty
/// peers and nothing to ask for opened 4 HTTP fetches after 3 s, and the origin's link,
/// shared by 25,000 of them, no longer fed the swarm. So with nothing to ask for, this is
/// how long a download waits.
pub const FALLBACK_PATIENCE: Duration = Duration::from_secs(15);

impl<R: rand::Rng + Clone> SwarmState<R> {
    /// Brings in the HTTP fallback after `fallback_after` with requests outstanding and
    /// neither bytes for us nor a sign that the swarm is alive, after [`FALLBACK_PATIENCE`]
    /// without bytes whatever the swarm shows (with nothing to ask for, too: our peers have
    /// nothing yet), at once without peers, or after [`flow::MAX_PIECE_WAIT`] with requests
    /// out and no piece stored from a peer, whatever bytes arrive: a peer claiming every
    /// piece and sending each one's last bytes a few at a time, reconnecting before its
    /// connection was judged starved, kept the fallback out and the download waiting for
    /// ever. Starved, the fallback fetches anything missing until a peer delivers again.
    pub(super) fn consider_fallback(&mut self, now: Instant, waiting: bool) -> Result<(), Fatal> {
        let idle = now.duration_since(self.last_progress);
        let quiet = now.duration_since(self.last_progress.max(self.last_sign_of_life));
        let no_peers = self.announced_once && self.peers.is_empty() && self.connecting.is_empty();
        let stalled = (waiting && quiet >= self.cfg.fallback_after)
            || idle >= FALLBACK_PATIENCE
            || self.starved(now, waiting);
        if !self.fallback_active && (stalled || no_peers) {
            let full = Bitfield::full(self.picker.piece_count());
            if self.picker.add_peer(ORIGIN_PEER, full).is_ok() {
                self.fallback_active = true;
            }
        }
        if idle >= self.cfg.stall_timeout {
            return Err(Fatal::Stalled(self.cfg.stall_timeout, self.describe()));
        }
        Ok(())
    }

    /// Requests out and no piece stored for [`flow::MAX_PIECE_WAIT`].
    fn starved(&self, now: Instant, waiting: bool) -> bool {
        waiting && now.duration_since(self.last_stored) >= flow::MAX_PIECE_WAIT
    }

    /// Whether the HTTP fallback has been brought in.
    pub fn fallback_active(&self) -> bool {
        self.fallback_active
    }

    /// The fallback fetches to send now, if it came in and is not backing off: while other
    /// peers deliver, only pieces no agent holds (`origins` counts the holders that are not
    /// agents, this pseudo-peer among them); after a stall, anything missing.
    pub(super) fn fallback_fetches(
        &mut self,
        now: Instant,
        origins: u32,
        others_connected: bool,
    ) -> Vec<Action> {
        if !self.fallback_active || self.fallback_retry_at.is_some_and(|at| now < at) {
            return Vec::new();
        }
        let stalled = now.duration_since(self.last_progress) >= self.cfg.fallback_after
            || self.starved(now, self.in_flight_bytes() > 0);
        let picked = if others_connected && !stalled {
            self.picker.pick_where(&ORIGIN_PEER, now, self.cfg.fallback_parallel, |index, availability| {
                availability <= origins && !self.declined.contains_key(&index)
            })
        } else {
            self.picker.pick(&ORIGIN_PEER, now, self.cfg.fallback_parallel)
        };
        let round = self.fallback_failures;
        self.fallback_sent.extend(picked.iter().map(|&index| (index, round)));
        picked.into_iter().map(|index| Action::Fetch { index }).collect()
    }

    /// A fallback piece arrived: the backoff and the count of failed rounds start over.
    pub(super) fn fallback_delivered(&mut self, index: u32) {
        self.fallback_sent.remove(&index);
        self.fallback_failures = 0;
        self.fallback_retry_at = None;
    }

    /// A fallback fetch failed: no fallback fetch until a backoff has passed. Fatal after
    /// [`MAX_FALLBACK_FAILURES`] failed rounds in a row with no peer.
    pub fn fetch_failed(&mut self, index: u32, error: &str, now: Instant) -> Result<(), Fatal> {
        self.picker.failed(&ORIGIN_PEER, index);
        let round = self.fallback_sent.remove(&index).unwrap_or(self.fallback_failures);
        if round < self.fallback_failures {
            // Another fetch of a round that already failed (it may fail late: a slow origin).
            return Ok(());
        }
        self.fallback_failures += 1;
        let backoff = FALLBACK_BACKOFF.saturating_mul(1 << self.fallback_failures.min(8).saturating_sub(1));
        self.fallback_retry_at = Some(now + backoff.min(FALLBACK_BACKOFF_MAX));
        if self.fallback_failures >= MAX_FALLBACK_FAILURES && self.peers.is_empty() {
            return Err(Fatal::Fallback(error.to_string()));
        }
        Ok(())
    }
}
