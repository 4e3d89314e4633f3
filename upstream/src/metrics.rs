//! Prometheus metrics of the upstreams, labelled by registry: what left them, how often the
//! cluster already had what was asked, how often an upstream throttled us.

use prometheus::{IntCounterVec, Opts, Registry};

/// The metrics of every upstream of one origin.
#[derive(Clone)]
pub struct UpstreamMetrics {
    requests: IntCounterVec,
    bytes: IntCounterVec,
    throttled: IntCounterVec,
    cache: IntCounterVec,
    stale: IntCounterVec,
}

impl UpstreamMetrics {
    /// Metrics registered in `registry`.
    pub fn new(registry: &Registry) -> Result<UpstreamMetrics, prometheus::Error> {
        let m = UpstreamMetrics::unregistered();
        for c in [&m.requests, &m.bytes, &m.throttled, &m.cache, &m.stale] {
            registry.register(Box::new(c.clone()))?;
        }
        Ok(m)
    }

    /// Metrics nobody scrapes (tests, tools).
    pub fn unregistered() -> UpstreamMetrics {
        let vec = |name: &str, help: &str, labels: &[&str]| {
            // Names and labels are constants: construction cannot fail.
            IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| unreachable!("{name}: {e}"))
        };
        UpstreamMetrics {
            requests: vec(
                "shoal_upstream_requests_total",
                "Requests to upstream registries by kind (manifest, tag, blob, token) and outcome",
                &["registry", "kind", "outcome"],
            ),
            bytes: vec(
                "shoal_upstream_bytes_total",
                "Blob bytes received from upstream registries",
                &["registry"],
            ),
            throttled: vec(
                "shoal_upstream_throttled_total",
                "Answers 429 Too Many Requests from upstream registries",
                &["registry"],
            ),
            cache: vec(
                "shoal_upstream_cache_total",
                "Pull-through lookups the cluster answered (hit) or fetched from the upstream (miss)",
                &["registry", "result"],
            ),
            stale: vec(
                "shoal_upstream_stale_total",
                "Tags served at their last known target while the upstream could not answer",
                &["registry"],
            ),
        }
    }

    pub(crate) fn request(&self, registry: &str, kind: &str, outcome: &str) {
        self.requests.with_label_values(&[registry, kind, outcome]).inc();
    }

    pub(crate) fn bytes(&self, registry: &str, n: u64) {
        self.bytes.with_label_values(&[registry]).inc_by(n);
    }

    pub(crate) fn throttled(&self, registry: &str) {
        self.throttled.with_label_values(&[registry]).inc();
    }

    /// A pull-through lookup answered from the cluster (`hit`) or fetched upstream.
    pub fn cache(&self, registry: &str, hit: bool) {
        self.cache.with_label_values(&[registry, if hit { "hit" } else { "miss" }]).inc();
    }

    /// A tag served at its last known target while the upstream could not answer.
    pub fn stale(&self, registry: &str) {
        self.stale.with_label_values(&[registry]).inc();
    }
}
