//! Swarm metrics: what proves P2P works in production (bytes from peers vs. from origins,
//! pieces verified and rejected, swarms and connections).

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Counters shared by a node's downloads and its peer server.
#[derive(Clone)]
pub struct SwarmMetrics {
    /// Verified piece bytes received, by source (`peer` or `origin`).
    pub received_bytes: IntCounterVec,
    /// Piece bytes sent to peers.
    pub sent_bytes: IntCounter,
    pub pieces_verified: IntCounter,
    pub pieces_rejected: IntCounter,
    pub active_swarms: IntGauge,
    /// Open peer connections, by direction (`in`, `out`).
    pub connections: prometheus::IntGaugeVec,
    /// Time from the start of a blob's download to its verified completion.
    pub download_seconds: prometheus::Histogram,
    /// Piece requests withdrawn because their peer stalled (no bytes for a while).
    pub piece_timeouts: IntCounter,
    /// Verified piece bytes that arrived after another copy of the piece (endgame, late
    /// deliveries): received but not needed.
    pub duplicate_bytes: IntCounter,
    /// Peers a download traded for a new one, by how (`immediate`: nothing in flight;
    /// `retiring`: disconnected after the piece on the wire).
    pub peer_rotations: IntCounterVec,
    /// Requests for a piece already asked of another peer, by why (`late`: that request was
    /// late; `faster`: this peer would deliver it much sooner).
    pub duplicate_requests: IntCounterVec,
    /// Peer connections refused because this node already served their blob to as many
    /// peers as it will (`max_peers_per_blob`).
    pub refused_busy: IntCounter,
    /// Times the node's cap on peers sending to it at once fell after a sign of incast
    /// (`crate::incast`).
    pub incast_backoffs: IntCounter,
}

impl SwarmMetrics {
    /// Create the metrics, named `shoal_<component>_...`, and register them.
    pub fn new(component: &str, registry: &Registry) -> Result<SwarmMetrics, prometheus::Error> {
        let m = SwarmMetrics {
            received_bytes: IntCounterVec::new(
                Opts::new(
                    format!("shoal_{component}_received_bytes_total"),
                    "Verified piece bytes received, by source",
                ),
                &["source"],
            )?,
            sent_bytes: IntCounter::new(
                format!("shoal_{component}_peer_sent_bytes_total"),
                "Piece bytes sent to peers",
            )?,
            pieces_verified: IntCounter::new(
                format!("shoal_{component}_pieces_verified_total"),
                "Pieces that passed verification",
            )?,
            pieces_rejected: IntCounter::new(
                format!("shoal_{component}_pieces_rejected_total"),
                "Pieces that failed verification",
            )?,
            active_swarms: IntGauge::new(
                format!("shoal_{component}_active_swarms"),
                "Blobs being downloaded",
            )?,
            connections: prometheus::IntGaugeVec::new(
                Opts::new(
                    format!("shoal_{component}_peer_connections"),
                    "Open peer connections by direction",
                ),
                &["direction"],
            )?,
            download_seconds: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new(
                    format!("shoal_{component}_blob_download_seconds"),
                    "Time to download and verify a whole blob",
                )
                .buckets(prometheus::exponential_buckets(0.01, 2.0, 16)?),
            )?,
            piece_timeouts: IntCounter::new(
                format!("shoal_{component}_piece_timeouts_total"),
                "Piece requests withdrawn because their peer sent no bytes for too long",
            )?,
            duplicate_bytes: IntCounter::new(
                format!("shoal_{component}_duplicate_bytes_total"),
                "Verified piece bytes received for pieces already held",
            )?,
            peer_rotations: IntCounterVec::new(
                Opts::new(
                    format!("shoal_{component}_peer_rotations_total"),
                    "Peers a download traded for another because they had nothing it lacked or were slow",
                ),
                &["how"],
            )?,
            duplicate_requests: IntCounterVec::new(
                Opts::new(
                    format!("shoal_{component}_duplicate_requests_total"),
                    "Requests for a piece already asked of another peer, by why: the first was late, or this peer is much faster",
                ),
                &["why"],
            )?,
            refused_busy: IntCounter::new(
                format!("shoal_{component}_peer_refused_busy_total"),
                "Peer connections refused because the blob already had as many peers as this node serves",
            )?,
            incast_backoffs: IntCounter::new(
                format!("shoal_{component}_incast_backoffs_total"),
                "Times the cap on peers sending to this node at once fell because a busy connection went silent while others delivered",
            )?,
        };
        registry.register(Box::new(m.incast_backoffs.clone()))?;
        registry.register(Box::new(m.refused_busy.clone()))?;
        registry.register(Box::new(m.peer_rotations.clone()))?;
        registry.register(Box::new(m.duplicate_requests.clone()))?;
        registry.register(Box::new(m.piece_timeouts.clone()))?;
        registry.register(Box::new(m.duplicate_bytes.clone()))?;
        registry.register(Box::new(m.received_bytes.clone()))?;
        registry.register(Box::new(m.download_seconds.clone()))?;
        registry.register(Box::new(m.sent_bytes.clone()))?;
        registry.register(Box::new(m.pieces_verified.clone()))?;
        registry.register(Box::new(m.pieces_rejected.clone()))?;
        registry.register(Box::new(m.active_swarms.clone()))?;
        registry.register(Box::new(m.connections.clone()))?;
        Ok(m)
    }

    /// Metrics that are not exported anywhere (tests, tools).
    pub fn unregistered() -> SwarmMetrics {
        SwarmMetrics::new("unexported", &Registry::new()).unwrap_or_else(|_| unreachable!("fresh registry"))
    }
}
