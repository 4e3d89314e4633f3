//! What a run shows: the per-second `--trace` line and the outcome the report prints.

use super::*;

/// When a host's first piece and half its pieces arrived: whether the slowest hosts lost
/// their time at the start or in the rest of the download.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Progress {
    pieces: u32,
    first: Option<SimTime>,
    half: Option<SimTime>,
}

impl Progress {
    pub(super) fn got(&mut self, now: SimTime, total: u32) {
        self.pieces += 1;
        self.first.get_or_insert(now);
        if self.half.is_none() && 2 * self.pieces >= total {
            self.half = Some(now);
        }
    }
}

impl Sim {
    /// One line a simulated second to stderr: where the fleet's time goes.
    pub(super) fn trace(&mut self) {
        let origins = self.origins();
        let (mut pieces, mut total, mut conns, mut sending, mut done) = (0u64, 0u64, 0usize, 0usize, 0usize);
        for n in &self.nodes[origins..] {
            for (b, h) in n.have.iter().enumerate() {
                pieces += h.as_ref().map_or(0, |h| u64::from(h.count()));
                total += u64::from(self.metas[b].piece_count());
            }
            for d in n.downloads.iter().flatten() {
                conns += d.outbound.len();
                sending +=
                    d.outbound.iter().filter(|&&c| self.conn(c).is_some_and(|k| k.sending.is_some())).count();
            }
        }
        for f in &self.finished_at {
            done += usize::from(f.is_some());
        }
        let falling_back = self.nodes[origins..]
            .iter()
            .flat_map(|n| n.downloads.iter().flatten())
            .filter(|d| d.state.fallback_active())
            .count();
        let in_flight: u64 = self.nodes[origins..]
            .iter()
            .flat_map(|n| n.downloads.iter().flatten())
            .map(|d| d.state.picker().in_flight_total() as u64)
            .sum();
        // How busy the hosts' links are (of their goodput), and how many uplinks idle.
        let (mut up, mut down) = (vec![0.0f64; self.nodes.len()], vec![0.0f64; self.nodes.len()]);
        for k in self.conns.iter().filter(|k| k.live) {
            if let Some(f) = k.flow {
                let r = self.net.rate(f);
                up[k.server] += r;
                down[k.client] += r;
            }
        }
        let cap = self.cfg.host_bps / 8.0 * self.cfg.efficiency;
        let hosts = (self.nodes.len() - origins).max(1) as f64;
        let up_use: f64 = up[origins..].iter().sum::<f64>() / (cap * hosts);
        let active: Vec<usize> = (origins..self.nodes.len())
            .filter(|&n| self.nodes[n].downloads.iter().any(Option::is_some))
            .collect();
        let down_use = active.iter().map(|&n| down[n]).sum::<f64>() / (cap * active.len().max(1) as f64);
        let idle: Vec<usize> = (origins..self.nodes.len()).filter(|&n| up[n] < cap * 0.05).collect();
        let idle_up = idle.len();
        // Why they idle: nobody connected, or connected peers ask them for nothing.
        let unconnected = idle.iter().filter(|&&n| self.nodes[n].inbound_count == 0).count();
        let idle_pieces: u64 = idle
            .iter()
            .map(|&n| self.nodes[n].have.iter().flatten().map(|h| u64::from(h.count())).sum::<u64>())
            .sum();
        eprintln!(
            "trace t={:.1}s pieces={:.3} done={} conns={} sending={} flows={} requests={} origin={:.2}xS declines={} timeouts={} up={:.2} down(active)={:.2} idle_up={} (unconnected {}, {:.0} pieces each) fallback={}",
            self.now as f64 / NANOS,
            pieces as f64 / total.max(1) as f64,
            done,
            conns,
            sending,
            self.net.flow_count(),
            in_flight,
            self.counters.origin_bytes as f64 / self.cfg.image_bytes() as f64,
            self.counters.declines,
            self.counters.piece_timeouts,
            up_use,
            down_use,
            idle_up,
            unconnected,
            idle_pieces as f64 / idle_up.max(1) as f64,
            falling_back,
        );
        self.after(1_000_000_000, Ev::Trace);
    }

    /// To stderr: for the fastest, middle and slowest hosts (by completion), the mean seconds
    /// from their start to their first piece, to half their pieces, and to the end.
    pub(super) fn trace_milestones(&self) {
        let secs = |at: Option<SimTime>, h: usize| match (self.started_at[h], at) {
            (Some(s), Some(a)) => Some((a - s) as f64 / NANOS),
            _ => None,
        };
        let mut order: Vec<(f64, usize)> = (0..self.finished_at.len())
            .filter_map(|h| secs(self.finished_at[h], h).map(|f| (f, h)))
            .collect();
        order.sort_by(|a, b| a.0.total_cmp(&b.0));
        let n = order.len();
        if n == 0 {
            return;
        }
        let bands = [
            ("fastest 10%", 0, n.div_ceil(10)),
            ("middle 10%", n * 45 / 100, n * 55 / 100),
            ("slowest 1%", n - n.div_ceil(100), n),
        ];
        for (name, from, to) in bands {
            let band = &order[from..to.max(from + 1).min(n)];
            let mean = |f: &dyn Fn(usize) -> Option<f64>| {
                let v: Vec<f64> = band.iter().filter_map(|&(_, h)| f(h)).collect();
                v.iter().sum::<f64>() / v.len().max(1) as f64
            };
            eprintln!(
                "milestones {name}: first piece {:.2}s, half {:.2}s, end {:.2}s",
                mean(&|h| secs(self.progress[h].first, h)),
                mean(&|h| secs(self.progress[h].half, h)),
                mean(&|h| secs(self.finished_at[h], h)),
            );
        }
    }

    pub(super) fn outcome(&self) -> Outcome {
        let origins = self.origins();
        let hosts = self
            .cfg
            .hosts
            .iter()
            .enumerate()
            .map(|(h, spec)| {
                let secs = match (self.started_at[h], self.finished_at[h]) {
                    (Some(s), Some(f)) => Some((f - s) as f64 / NANOS),
                    _ => None,
                };
                HostResult {
                    limit_secs: self.cfg.limit_secs(spec.rate_factor),
                    secs,
                    straggler: spec.rate_factor < 1.0,
                    left: spec.leave_at.is_some() && !self.nodes[origins + h].alive,
                }
            })
            .collect();
        Outcome {
            hosts,
            image_bytes: self.cfg.image_bytes(),
            counters: self.counters.clone(),
            sim_secs: self.now as f64 / NANOS,
        }
    }
}
