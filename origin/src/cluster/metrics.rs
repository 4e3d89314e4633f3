//! Cluster metrics: replication failures, repair progress and garbage collection, the numbers
//! an operator watches after a node dies or joins.

use prometheus::{Gauge, IntCounter, IntGauge, Registry};

/// Counters and gauges of the cluster layer.
#[derive(Clone)]
pub struct ClusterMetrics {
    pub live_members: IntGauge,
    pub replication_failures: IntCounter,
    pub repair_copied_blobs: IntCounter,
    pub repair_copied_bytes: IntCounter,
    pub repair_removed_blobs: IntCounter,
    pub repair_synced_repos: IntCounter,
    pub repair_failures: IntCounter,
    pub repair_queue_length: IntGauge,
    pub repair_passes: IntCounter,
    pub gc_swept_blobs: IntCounter,
    pub gc_swept_bytes: IntCounter,
    /// Largest clock difference to another member seen in health replies, in seconds.
    pub clock_skew_seconds: Gauge,
}

impl ClusterMetrics {
    /// Create the metrics and register them.
    pub fn new(registry: &Registry) -> Result<ClusterMetrics, prometheus::Error> {
        let m = ClusterMetrics::unregistered()?;
        registry.register(Box::new(m.live_members.clone()))?;
        registry.register(Box::new(m.replication_failures.clone()))?;
        registry.register(Box::new(m.repair_copied_blobs.clone()))?;
        registry.register(Box::new(m.repair_copied_bytes.clone()))?;
        registry.register(Box::new(m.repair_removed_blobs.clone()))?;
        registry.register(Box::new(m.repair_synced_repos.clone()))?;
        registry.register(Box::new(m.repair_failures.clone()))?;
        registry.register(Box::new(m.repair_queue_length.clone()))?;
        registry.register(Box::new(m.repair_passes.clone()))?;
        registry.register(Box::new(m.gc_swept_blobs.clone()))?;
        registry.register(Box::new(m.gc_swept_bytes.clone()))?;
        registry.register(Box::new(m.clock_skew_seconds.clone()))?;
        Ok(m)
    }

    /// Metrics that are counted but not exported (tests, a lone store).
    pub fn unregistered() -> Result<ClusterMetrics, prometheus::Error> {
        let c = |name: &str, help: &str| IntCounter::new(format!("shoal_origin_{name}"), help);
        let g = |name: &str, help: &str| IntGauge::new(format!("shoal_origin_{name}"), help);
        Ok(ClusterMetrics {
            live_members: g("cluster_live_members", "Origins currently up, this one included")?,
            replication_failures: c(
                "replication_failures_total",
                "Copies of a write that an owner could not take (queued for repair)",
            )?,
            repair_copied_blobs: c("repair_copied_blobs_total", "Blobs copied to their owners by repair")?,
            repair_copied_bytes: c("repair_copied_bytes_total", "Bytes copied to owners by repair")?,
            repair_removed_blobs: c(
                "repair_removed_blobs_total",
                "Extra blob copies removed after the owners confirmed theirs",
            )?,
            repair_synced_repos: c(
                "repair_synced_repos_total",
                "Repositories whose records repair sent to their owners",
            )?,
            repair_failures: c("repair_failures_total", "Repair steps that failed and will be retried")?,
            repair_queue_length: g("repair_queue_length", "Items waiting in the persistent repair queue")?,
            repair_passes: c("repair_passes_total", "Full repair passes completed")?,
            gc_swept_blobs: c("gc_swept_blobs_total", "Blob copies removed by garbage collection")?,
            gc_swept_bytes: c("gc_swept_bytes_total", "Bytes removed by garbage collection")?,
            clock_skew_seconds: Gauge::new(
                "shoal_origin_clock_skew_seconds",
                "Largest wall-clock difference to another origin, from health replies",
            )?,
        })
    }
}
