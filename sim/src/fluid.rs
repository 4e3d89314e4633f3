//! The network as fluid flows: links with a capacity, flows that each cross a few links, and
//! rates shared max-min fairly (progressive filling), the fair share TCP connections on
//! shaped links converge to. Pure and deterministic; time is an argument.
//!
//! A flow carries one unit of bytes at a time (a piece, or an HTTP range); its sender can
//! give it the next unit when one ends, so a connection that streams piece after piece stays
//! one flow and the rates need not be recomputed between its pieces. Rates change only in
//! [`Network::recompute`]; a flow added in between has rate 0 until then.
//!
//! A flow may load a link with a weight below 1: the ACKs of a download take a small share of
//! the sender's downlink and the receiver's uplink. Such a use takes its share of the link
//! (its weight times the flow's rate at the last recompute, set aside before the filling)
//! but never holds the flow back: ACKs queue behind data in a shaped link's FIFO and only
//! add delay; they are not one more flow the link shares fairly. Counting them as members
//! capped every download of a host whose uplink was full at its uploads' per-flow share: a
//! simulated 100-host fleet used 87 % of its links where the same flows shared max-min
//! would use 96 %. A new flow's ACKs count from the recompute after its first.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Simulated time in nanoseconds since the run's start.
pub type SimTime = u64;

/// Nanoseconds per second.
pub const NANOS: f64 = 1e9;

/// A link of the network (one direction of a host's connection, say).
pub type LinkId = usize;

/// A flow's handle; stale once the flow is removed (the slot's generation moves on).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId {
    slot: u32,
    generation: u32,
}

/// Fewer bytes than this left in a unit count as none (floating-point residue).
const DONE_EPSILON: f64 = 1e-3;

/// Most links one flow loads (data both ways plus ACKs both ways).
const MAX_USES: usize = 4;

/// A flow keeps its rate when the new one differs by no more than this share: the ACKs'
/// shares follow the last rates, so every recompute moves every rate a little, and
/// rescheduling each flow's completion for that nearly tripled a 100-host run's events.
/// A link may be overcommitted by this share at most.
const RATE_TOLERANCE: f64 = 1e-3;

/// A use of a link with a weight at least this carries the flow's data and takes part in
/// the link's fair share; lighter uses (ACKs) only set capacity aside (see the module docs).
const DATA_WEIGHT: f64 = 0.5;

#[derive(Clone, Debug)]
struct Flow<T> {
    generation: u32,
    live: bool,
    tag: Option<T>,
    uses: [(LinkId, f64); MAX_USES],
    n_uses: usize,
    rate: f64,
    /// Bytes of the current unit left at `since`.
    remaining: f64,
    /// Bytes of the current unit.
    unit: f64,
    since: SimTime,
    /// Moves on whenever the rate or the unit changes, so a completion event computed
    /// before is recognised as stale.
    version: u64,
    /// The version whose completion was last handed out, so none is handed out twice.
    scheduled: u64,
}

/// A completion to schedule: `flow`'s current unit ends at `at` unless its `version` moves on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub flow: FlowId,
    pub version: u64,
    pub at: SimTime,
}

/// Links and the flows across them; see the module docs.
#[derive(Debug)]
pub struct Network<T> {
    capacity: Vec<f64>,
    flows: Vec<Flow<T>>,
    free: Vec<u32>,
    live: usize,
    dirty: bool,
    // Scratch space of `recompute`, kept between calls.
    rem: Vec<f64>,
    weight: Vec<f64>,
    unfrozen: Vec<u32>,
    stamp: Vec<u64>,
    members: Vec<Vec<u32>>,
    frozen: Vec<bool>,
}

impl<T: Copy> Default for Network<T> {
    fn default() -> Self {
        Network::new()
    }
}

impl<T: Copy> Network<T> {
    pub fn new() -> Network<T> {
        Network {
            capacity: Vec::new(),
            flows: Vec::new(),
            free: Vec::new(),
            live: 0,
            dirty: false,
            rem: Vec::new(),
            weight: Vec::new(),
            unfrozen: Vec::new(),
            stamp: Vec::new(),
            members: Vec::new(),
            frozen: Vec::new(),
        }
    }

    /// A new link of `bytes_per_sec`.
    pub fn add_link(&mut self, bytes_per_sec: f64) -> LinkId {
        self.capacity.push(bytes_per_sec.max(0.0));
        self.members.push(Vec::new());
        self.capacity.len() - 1
    }

    /// Change a link's capacity (a host slowing down); takes effect at the next recompute.
    pub fn set_capacity(&mut self, link: LinkId, bytes_per_sec: f64) {
        if let Some(c) = self.capacity.get_mut(link) {
            *c = bytes_per_sec.max(0.0);
            self.dirty = true;
        }
    }

    /// Flows currently in the network.
    pub fn flow_count(&self) -> usize {
        self.live
    }

    /// Whether flows came or went since the last recompute.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    fn get(&self, id: FlowId) -> Option<&Flow<T>> {
        self.flows.get(id.slot as usize).filter(|f| f.live && f.generation == id.generation)
    }

    fn get_mut(&mut self, id: FlowId) -> Option<&mut Flow<T>> {
        self.flows.get_mut(id.slot as usize).filter(|f| f.live && f.generation == id.generation)
    }

    /// The owner a flow was added with, while it lives.
    pub fn tag(&self, id: FlowId) -> Option<T> {
        self.get(id).and_then(|f| f.tag)
    }

    /// A flow loading each `(link, weight)` of `uses` (at most four), carrying a first unit
    /// of `bytes`. Its rate is 0 until the next [`Network::recompute`].
    pub fn add_flow(&mut self, uses: &[(LinkId, f64)], bytes: f64, tag: T, now: SimTime) -> FlowId {
        let mut u = [(0, 0.0); MAX_USES];
        let mut n = 0;
        for &(link, w) in uses.iter().filter(|(_, w)| *w > 0.0).take(MAX_USES) {
            u[n] = (link, w);
            n += 1;
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.flows.push(Flow {
                    generation: 0,
                    live: false,
                    tag: None,
                    uses: u,
                    n_uses: 0,
                    rate: 0.0,
                    remaining: 0.0,
                    unit: 0.0,
                    since: now,
                    version: 0,
                    scheduled: 0,
                });
                (self.flows.len() - 1) as u32
            }
        };
        let f = &mut self.flows[slot as usize];
        f.generation = f.generation.wrapping_add(1);
        f.live = true;
        f.tag = Some(tag);
        f.uses = u;
        f.n_uses = n;
        f.rate = 0.0;
        f.remaining = bytes.max(0.0);
        f.unit = bytes.max(0.0);
        f.since = now;
        f.version += 1;
        self.live += 1;
        self.dirty = true;
        FlowId { slot, generation: f.generation }
    }

    /// Remove a flow (its sender has nothing more to send, or the connection closed).
    pub fn remove_flow(&mut self, id: FlowId) {
        let Some(f) = self.get_mut(id) else { return };
        f.live = false;
        f.tag = None;
        f.version += 1;
        self.free.push(id.slot);
        self.live -= 1;
        self.dirty = true;
    }

    /// The live flows whose owner matches.
    pub fn flows_where(&self, pred: impl Fn(&T) -> bool) -> Vec<(FlowId, T)> {
        self.flows
            .iter()
            .enumerate()
            .filter(|(_, f)| f.live)
            .filter_map(|(i, f)| {
                let tag = f.tag?;
                pred(&tag).then_some((FlowId { slot: i as u32, generation: f.generation }, tag))
            })
            .collect()
    }

    /// Bytes of the current unit transferred by `now`.
    pub fn sent(&self, id: FlowId, now: SimTime) -> f64 {
        let Some(f) = self.get(id) else { return 0.0 };
        let elapsed = now.saturating_sub(f.since) as f64 / NANOS;
        (f.unit - (f.remaining - f.rate * elapsed).max(0.0)).max(0.0)
    }

    /// The flow's current rate in bytes/s.
    pub fn rate(&self, id: FlowId) -> f64 {
        self.get(id).map_or(0.0, |f| f.rate)
    }

    /// Give a flow its next unit of `bytes` (the previous one is done); returns when it
    /// ends at the current rate, to schedule, if that is before `horizon` (see
    /// [`Network::recompute`]).
    pub fn next_unit(
        &mut self,
        id: FlowId,
        bytes: f64,
        now: SimTime,
        horizon: Option<SimTime>,
    ) -> Option<Completion> {
        let f = self.get_mut(id)?;
        f.unit = bytes.max(0.0);
        f.remaining = f.unit;
        f.since = now;
        f.version += 1;
        hand_out(id, f, horizon)
    }

    /// Whether `version` is still the flow's current one (its completion event is valid).
    pub fn is_current(&self, id: FlowId, version: u64) -> bool {
        self.get(id).is_some_and(|f| f.version == version)
    }

    /// Share every link max-min fairly among the flows crossing it, from `now` on (only if
    /// flows came or went), and return the completions to schedule: every flow's whose
    /// rate or unit changed since its last one was handed out, and that ends by `horizon`.
    ///
    /// Without a horizon (exact mode) this runs after every change. With one (stepped
    /// mode) it runs every step, rates change only at steps, and only completions within
    /// the next step are scheduled: a hundred thousand flows whose rates all shift a little
    /// at every step would otherwise flood the event queue with stale completions.
    pub fn recompute(&mut self, now: SimTime, horizon: Option<SimTime>) -> Vec<Completion> {
        if !self.dirty {
            let mut out = Vec::new();
            for (i, f) in self.flows.iter_mut().enumerate().filter(|(_, f)| f.live) {
                let elapsed = now.saturating_sub(f.since) as f64 / NANOS;
                f.remaining = (f.remaining - f.rate * elapsed).max(0.0);
                f.since = now;
                let id = FlowId { slot: i as u32, generation: f.generation };
                out.extend(hand_out(id, f, horizon));
            }
            return out;
        }
        self.dirty = false;
        let links = self.capacity.len();
        self.rem.clear();
        self.rem.extend_from_slice(&self.capacity);
        self.weight.clear();
        self.weight.resize(links, 0.0);
        self.unfrozen.clear();
        self.unfrozen.resize(links, 0);
        self.stamp.clear();
        self.stamp.resize(links, 0);
        for m in &mut self.members {
            m.clear();
        }
        self.frozen.clear();
        self.frozen.resize(self.flows.len(), true);
        for (i, f) in self.flows.iter().enumerate().filter(|(_, f)| f.live) {
            self.frozen[i] = false;
            for &(link, w) in &f.uses[..f.n_uses] {
                if w >= DATA_WEIGHT {
                    self.weight[link] += w;
                    self.unfrozen[link] += 1;
                    self.members[link].push(i as u32);
                } else {
                    self.rem[link] = (self.rem[link] - w * f.rate).max(0.0);
                }
            }
        }
        let mut rates = vec![0.0f64; self.flows.len()];
        // Progressive filling: every unfrozen flow's rate rises together; the link that
        // fills first fixes the rate of the flows across it. Heap entries carry the link's
        // stamp and are skipped once it moved on. Non-negative f64s order like their bits.
        let mut heap: BinaryHeap<Reverse<(u64, LinkId, u64)>> = BinaryHeap::new();
        for link in 0..links {
            if self.unfrozen[link] > 0 {
                let level = (self.rem[link] / self.weight[link]).max(0.0);
                heap.push(Reverse((level.to_bits(), link, 0)));
            }
        }
        while let Some(Reverse((bits, link, stamp))) = heap.pop() {
            if stamp != self.stamp[link] || self.unfrozen[link] == 0 {
                continue;
            }
            let level = f64::from_bits(bits);
            let members = std::mem::take(&mut self.members[link]);
            for &i in &members {
                if self.frozen[i as usize] {
                    continue;
                }
                self.frozen[i as usize] = true;
                rates[i as usize] = level;
                let f = &self.flows[i as usize];
                for &(other, w) in f.uses[..f.n_uses].iter().filter(|(_, w)| *w >= DATA_WEIGHT) {
                    self.rem[other] = (self.rem[other] - w * level).max(0.0);
                    self.weight[other] -= w;
                    self.unfrozen[other] -= 1;
                    self.stamp[other] += 1;
                    if other != link && self.unfrozen[other] > 0 {
                        let l = (self.rem[other] / self.weight[other].max(f64::MIN_POSITIVE)).max(level);
                        heap.push(Reverse((l.to_bits(), other, self.stamp[other])));
                    }
                }
            }
            self.members[link] = members;
        }
        let mut changed = Vec::new();
        for (i, f) in self.flows.iter_mut().enumerate().filter(|(_, f)| f.live) {
            let rate = rates[i];
            let elapsed = now.saturating_sub(f.since) as f64 / NANOS;
            f.remaining = (f.remaining - f.rate * elapsed).max(0.0);
            f.since = now;
            if (rate - f.rate).abs() > RATE_TOLERANCE * rate.max(f.rate) {
                f.rate = rate;
                f.version += 1;
            }
            let id = FlowId { slot: i as u32, generation: f.generation };
            changed.extend(hand_out(id, f, horizon));
        }
        changed
    }
}

/// The flow's completion, if not handed out yet and due by `horizon`; marks it handed out.
fn hand_out<T>(id: FlowId, f: &mut Flow<T>, horizon: Option<SimTime>) -> Option<Completion> {
    if f.scheduled == f.version {
        return None;
    }
    let c = completion(id, f)?;
    if horizon.is_some_and(|h| c.at > h) {
        return None;
    }
    f.scheduled = f.version;
    Some(c)
}

/// When the flow's current unit ends at its rate (none while it has no rate).
fn completion<T>(id: FlowId, f: &Flow<T>) -> Option<Completion> {
    if f.remaining <= DONE_EPSILON {
        return Some(Completion { flow: id, version: f.version, at: f.since });
    }
    if f.rate <= 0.0 {
        return None;
    }
    let nanos = (f.remaining / f.rate * NANOS).ceil();
    let at = if nanos >= (u64::MAX - f.since) as f64 { u64::MAX } else { f.since + nanos as u64 };
    Some(Completion { flow: id, version: f.version, at })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;

    fn secs(t: SimTime) -> f64 {
        t as f64 / NANOS
    }

    /// Recompute until the ACKs' shares, taken from the last rates, have settled.
    fn settle(n: &mut Network<u8>) {
        for _ in 0..8 {
            n.dirty = true;
            n.recompute(0, None);
        }
    }

    #[test]
    fn one_flow_gets_the_narrower_link() {
        let mut n: Network<u8> = Network::new();
        let (up, down) = (n.add_link(10.0 * MB), n.add_link(5.0 * MB));
        let f = n.add_flow(&[(up, 1.0), (down, 1.0)], 10.0 * MB, 0, 0);
        let done = n.recompute(0, None);
        assert_eq!(n.rate(f), 5.0 * MB);
        assert_eq!(done.len(), 1);
        assert!((secs(done[0].at) - 2.0).abs() < 1e-9, "10 MB at 5 MB/s: {}", secs(done[0].at));
        assert!((n.sent(f, 1_000_000_000) - 5.0 * MB).abs() < 1.0);
    }

    #[test]
    fn two_flows_share_a_link_equally_and_the_survivor_takes_it_all() {
        let mut n: Network<u8> = Network::new();
        let (up_a, up_b, down) = (n.add_link(100.0 * MB), n.add_link(100.0 * MB), n.add_link(6.0 * MB));
        let a = n.add_flow(&[(up_a, 1.0), (down, 1.0)], 3.0 * MB, 0, 0);
        let b = n.add_flow(&[(up_b, 1.0), (down, 1.0)], 6.0 * MB, 1, 0);
        let done = n.recompute(0, None);
        assert_eq!((n.rate(a), n.rate(b)), (3.0 * MB, 3.0 * MB));
        // a: 3 MB at 3 MB/s ends at 1 s; b then has 3 MB left at 6 MB/s: ends at 1.5 s.
        let end_a = done.iter().find(|c| c.flow == a).unwrap().at;
        assert!((secs(end_a) - 1.0).abs() < 1e-9);
        n.remove_flow(a);
        let done = n.recompute(end_a, None);
        assert_eq!(n.rate(b), 6.0 * MB);
        assert!((secs(done[0].at) - 1.5).abs() < 1e-9, "{}", secs(done[0].at));
    }

    #[test]
    fn max_min_gives_the_leftover_to_flows_not_held_by_the_bottleneck() {
        // A seeder's uplink (12 MB/s) feeds three hosts; one host's downlink is 2 MB/s.
        let mut n: Network<u8> = Network::new();
        let up = n.add_link(12.0 * MB);
        let downs: Vec<_> = [2.0, 100.0, 100.0].iter().map(|c| n.add_link(c * MB)).collect();
        let flows: Vec<_> = downs.iter().map(|&d| n.add_flow(&[(up, 1.0), (d, 1.0)], MB, 0, 0)).collect();
        n.recompute(0, None);
        let rates: Vec<f64> = flows.iter().map(|&f| n.rate(f) / MB).collect();
        assert_eq!(rates, vec![2.0, 5.0, 5.0]);
    }

    #[test]
    fn weights_count_acks_against_the_reverse_links() {
        // A host downloads at its 10 MB/s downlink and uploads at its 10 MB/s uplink; the
        // upload's ACKs take 2 % of its downlink.
        let mut n: Network<u8> = Network::new();
        let (h_up, h_down, s_up, s_down) =
            (n.add_link(10.0 * MB), n.add_link(10.0 * MB), n.add_link(100.0 * MB), n.add_link(100.0 * MB));
        let down = n.add_flow(&[(s_up, 1.0), (h_down, 1.0), (s_down, 0.02), (h_up, 0.02)], MB, 0, 0);
        let up = n.add_flow(&[(h_up, 1.0), (s_down, 1.0), (h_down, 0.02), (s_up, 0.02)], MB, 1, 0);
        settle(&mut n);
        let expect = 10.0 * MB / 1.02;
        let near = |rate: f64| (rate - expect).abs() <= 2.0 * RATE_TOLERANCE * expect;
        assert!(near(n.rate(down)) && near(n.rate(up)), "{} {}", n.rate(down), n.rate(up));
    }

    #[test]
    fn a_full_uplink_does_not_hold_back_the_downloads_whose_acks_cross_it() {
        // A host uploads to ten peers, filling its 10 MB/s uplink, and downloads from one
        // seeder with room to spare. The download's ACKs queue in that uplink, but the
        // download is not one more flow of it: it takes the host's downlink less nothing,
        // not a tenth of the uplink.
        let mut n: Network<u8> = Network::new();
        let (h_up, h_down) = (n.add_link(10.0 * MB), n.add_link(10.0 * MB));
        let (s_up, s_down) = (n.add_link(100.0 * MB), n.add_link(100.0 * MB));
        let down = n.add_flow(&[(s_up, 1.0), (h_down, 1.0), (s_down, 0.02), (h_up, 0.02)], MB, 0, 0);
        let ups: Vec<FlowId> = (0..10)
            .map(|_| {
                let (p_up, p_down) = (n.add_link(100.0 * MB), n.add_link(100.0 * MB));
                n.add_flow(&[(h_up, 1.0), (p_down, 1.0), (p_up, 0.02), (h_down, 0.02)], MB, 1, 0)
            })
            .collect();
        settle(&mut n);
        let up_total: f64 = ups.iter().map(|&f| n.rate(f)).sum();
        // The uploads fill the uplink but for the download's ACKs; the download fills the
        // downlink but for the uploads' ACKs.
        let slack = 2.0 * RATE_TOLERANCE * 10.0 * MB;
        assert!((up_total + 0.02 * n.rate(down) - 10.0 * MB).abs() <= slack, "uploads {up_total}");
        assert!((n.rate(down) + 0.02 * up_total - 10.0 * MB).abs() <= slack, "download {}", n.rate(down));
        assert!(n.rate(down) > 9.7 * MB);
    }

    #[test]
    fn a_new_unit_keeps_the_rate_and_stale_completions_are_recognised() {
        let mut n: Network<u8> = Network::new();
        let l = n.add_link(MB);
        let f = n.add_flow(&[(l, 1.0)], MB, 7, 0);
        let first = n.recompute(0, None)[0];
        assert_eq!(n.tag(f), Some(7));
        let next = n.next_unit(f, 2.0 * MB, first.at, None).unwrap();
        assert!(!n.is_current(f, first.version));
        assert!((secs(next.at) - 3.0).abs() < 1e-9);
        n.remove_flow(f);
        assert!(!n.is_current(f, next.version));
        assert_eq!(n.tag(f), None);
        assert_eq!(n.flow_count(), 0);
    }
}
