//! When a mirrored tag is asked of its upstream again, and what is served when the upstream
//! cannot answer. Pure: the time of the tag's last confirmation (its record's version, written
//! by whichever origin asked last, so the whole cluster shares it) and the clock come in.

use std::time::Duration;

/// What to do before answering a tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Before {
    /// Confirmed less than `tag_ttl` ago: answer from the cluster.
    Fresh,
    /// Ask the upstream what the tag points at now.
    Ask,
}

/// What to do when the upstream could not be asked (unreachable, 5xx, throttling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// Serve the last confirmed target: it is within `serve_stale`.
    ServeStale,
    /// Fail the request with the upstream's error.
    Fail,
}

/// `confirmed_millis`: when the tag's target was last confirmed at the upstream, if ever.
pub fn before_asking(confirmed_millis: Option<u64>, now_millis: u64, tag_ttl: Duration) -> Before {
    match confirmed_millis {
        Some(at) if now_millis.saturating_sub(at) < tag_ttl.as_millis() as u64 && at <= now_millis + 1000 => {
            Before::Fresh
        }
        _ => Before::Ask,
    }
}

/// See [`OnFailure`].
pub fn on_failure(confirmed_millis: Option<u64>, now_millis: u64, serve_stale: Duration) -> OnFailure {
    match confirmed_millis {
        Some(at) if now_millis.saturating_sub(at) < serve_stale.as_millis() as u64 => OnFailure::ServeStale,
        _ => OnFailure::Fail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);
    const STALE: Duration = Duration::from_secs(3600);

    #[test]
    fn a_tag_is_asked_again_after_its_ttl() {
        assert_eq!(before_asking(None, 1_000_000, TTL), Before::Ask);
        assert_eq!(before_asking(Some(1_000_000), 1_000_000, TTL), Before::Fresh);
        assert_eq!(before_asking(Some(1_000_000), 1_029_999, TTL), Before::Fresh);
        assert_eq!(before_asking(Some(1_000_000), 1_030_000, TTL), Before::Ask);
        // A confirmation from a clock far ahead is not trusted as fresh.
        assert_eq!(before_asking(Some(2_000_000), 1_000_000, TTL), Before::Ask);
        assert_eq!(before_asking(Some(1_000_000), 1_000_000, Duration::ZERO), Before::Ask);
    }

    #[test]
    fn stale_targets_are_served_only_within_serve_stale() {
        assert_eq!(on_failure(None, 1_000_000, STALE), OnFailure::Fail);
        assert_eq!(on_failure(Some(1_000_000), 1_000_000 + 3_599_999, STALE), OnFailure::ServeStale);
        assert_eq!(on_failure(Some(1_000_000), 1_000_000 + 3_600_000, STALE), OnFailure::Fail);
        assert_eq!(on_failure(Some(1_000_000), 1_000_000, Duration::ZERO), OnFailure::Fail);
    }
}
