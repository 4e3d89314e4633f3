//! What an upstream registry's failure becomes in the registry API's answer: an error code
//! for the client, whether a stale tag may be served instead, and the marked failure agents
//! pass on past `serve_stale`.

use shoal_registry::StoreError;
use shoal_upstream::UpstreamError;

/// Whether an upstream failure means "cannot ask now" (serve stale) rather than an answer.
pub(super) fn cannot_ask(e: &UpstreamError) -> bool {
    matches!(
        e,
        UpstreamError::Unavailable(_)
            | UpstreamError::TooManyRequests { .. }
            | UpstreamError::Invalid(_)
            | UpstreamError::MethodNotAllowed(_)
    )
}

/// A tag's upstream cannot answer and its last target may no longer be served (past
/// `serve_stale`, or never confirmed): the client's answer, marked so an agent serves no
/// target it kept itself either (it did, for as long as the upstream was down).
pub(super) fn upstream_failed(registry: &str, e: UpstreamError) -> StoreError {
    let registry = registry.to_string();
    match e {
        UpstreamError::TooManyRequests { retry_after } => StoreError::UpstreamFailed {
            registry,
            reason: "it is throttling requests".into(),
            retry_after_secs: Some(retry_after.as_secs().max(1)),
        },
        UpstreamError::Unavailable(reason)
        | UpstreamError::MethodNotAllowed(reason)
        | UpstreamError::Invalid(reason) => {
            StoreError::UpstreamFailed { registry, reason, retry_after_secs: None }
        }
        other => store_error(&registry, other),
    }
}

/// Map an upstream's error to what the registry API answers.
pub(super) fn store_error(registry: &str, e: UpstreamError) -> StoreError {
    match e {
        UpstreamError::NotFound => StoreError::ManifestUnknown,
        UpstreamError::Unauthorized(_) => super::refused(registry),
        UpstreamError::TooManyRequests { retry_after } => {
            StoreError::Throttled { retry_after_secs: retry_after.as_secs().max(1) }
        }
        UpstreamError::Unavailable(m) | UpstreamError::MethodNotAllowed(m) => {
            StoreError::Unavailable(format!("upstream {registry}: {m}"))
        }
        UpstreamError::Invalid(m) => {
            StoreError::Unavailable(format!("upstream {registry} answered badly: {m}"))
        }
        UpstreamError::Config(m) => StoreError::Internal(format!("upstream {registry}: {m}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Every failure to ask the upstream ([`cannot_ask`]) is marked for agents past
    /// `serve_stale`; a throttled one keeps its `Retry-After`.
    #[test]
    fn every_failure_to_ask_the_upstream_is_marked() {
        let failures = [
            UpstreamError::Unavailable("down".into()),
            UpstreamError::MethodNotAllowed("no".into()),
            UpstreamError::Invalid("an HTML page".into()),
            UpstreamError::TooManyRequests { retry_after: Duration::from_secs(30) },
        ];
        for e in failures {
            assert!(cannot_ask(&e));
            let (text, throttled) = (e.to_string(), matches!(e, UpstreamError::TooManyRequests { .. }));
            match upstream_failed("docker.io", e) {
                StoreError::UpstreamFailed { registry, retry_after_secs, .. } => {
                    assert_eq!(registry, "docker.io");
                    assert_eq!(retry_after_secs, throttled.then_some(30), "{text}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}
