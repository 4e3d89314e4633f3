//! What a run shows, in the units of the issue: completion times ÷ (size ÷ host rate),
//! origin egress and duplicate bytes ÷ size, and the one-line summary the command line
//! contract promises.

use crate::world::Counters;

/// One host's result.
#[derive(Clone, Debug)]
pub struct HostResult {
    /// Its own link time for the image: size ÷ its rate.
    pub limit_secs: f64,
    /// Seconds from its start to its last byte; `None` if it did not finish.
    pub secs: Option<f64>,
    pub straggler: bool,
    /// It left mid-download (churn).
    pub left: bool,
}

/// A whole run.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub hosts: Vec<HostResult>,
    pub image_bytes: u64,
    pub counters: Counters,
    /// Simulated seconds until the last event that mattered.
    pub sim_secs: f64,
}

/// Nearest-rank percentile of sorted `values` (`p` in 0..=100).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50, p99 and max of completion ÷ limit over `hosts`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub finished: usize,
}

impl Outcome {
    /// Completion ÷ own limit of the hosts that finished and `select` picks.
    pub fn spread(&self, select: impl Fn(&HostResult) -> bool) -> Spread {
        let mut r: Vec<f64> = self
            .hosts
            .iter()
            .filter(|h| select(h))
            .filter_map(|h| h.secs.map(|s| s / h.limit_secs))
            .collect();
        r.sort_by(f64::total_cmp);
        Spread {
            p50: percentile(&r, 50.0),
            p99: percentile(&r, 99.0),
            max: r.last().copied().unwrap_or(f64::NAN),
            finished: r.len(),
        }
    }

    /// Hosts that neither finished nor left.
    pub fn unfinished(&self) -> usize {
        self.hosts.iter().filter(|h| h.secs.is_none() && !h.left).count()
    }

    fn per_size(&self, bytes: u64) -> f64 {
        bytes as f64 / self.image_bytes as f64
    }

    pub fn origin_x(&self) -> f64 {
        self.per_size(self.counters.origin_bytes)
    }

    pub fn duplicates_x(&self) -> f64 {
        self.per_size(self.counters.duplicate_bytes)
    }

    /// The details line printed before the summary.
    pub fn details(&self) -> String {
        let c = &self.counters;
        let n = self.hosts.len().max(1) as f64;
        let mut s = format!(
            "sim-detail: finished={} unfinished={} left={} duplicates={:.2}% wasted={:.2}% of N×size fallback={:.2} xS \
             timeouts={} rotations={}+{}retiring dup_requests={}late+{}faster declines={} connects={} events={} recomputes={} simulated={:.1}s",
            self.spread(|_| true).finished,
            self.unfinished(),
            self.hosts.iter().filter(|h| h.left).count(),
            100.0 * self.duplicates_x() / n,
            100.0 * self.per_size(c.wasted_bytes) / n,
            self.per_size(c.fallback_bytes),
            c.piece_timeouts,
            c.rotations.immediate,
            c.rotations.retiring,
            c.duplicate_requests.late,
            c.duplicate_requests.faster,
            c.declines,
            c.connects,
            c.events,
            c.rate_recomputes,
            self.sim_secs,
        );
        if self.hosts.iter().any(|h| h.straggler) {
            let fast = self.spread(|h| !h.straggler);
            let slow = self.spread(|h| h.straggler);
            s.push_str(&format!(
                "\nsim-stragglers: fast p50={:.2} max={:.2}; slow p50={:.2} max={:.2} (x own limit)",
                fast.p50, fast.max, slow.p50, slow.max
            ));
        }
        s
    }

    /// The contract's last line: `sim: peers=N p50=X p99=Y max=Z (x limit) origin=E xS
    /// duplicates=D xS wall=Ws`.
    pub fn summary(&self, wall_secs: f64) -> String {
        let all = self.spread(|_| true);
        format!(
            "sim: peers={} p50={:.2} p99={:.2} max={:.2} (x limit) origin={:.2} xS duplicates={:.2} xS wall={:.1}s",
            self.hosts.len(),
            all.p50,
            all.p99,
            all.max,
            self.origin_x(),
            self.duplicates_x(),
            wall_secs
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
