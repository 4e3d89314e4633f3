//! Names of upstream (pull-through) content. An origin keeps what it pulled from an upstream
//! registry such as `docker.io` under a repository whose first component is that registry's
//! name (`docker.io/library/alpine`): the *explicit form*, which is also what a plain
//! `docker pull node:5000/docker.io/library/alpine:3.20` asks for. Pushes into those names are
//! refused, so pushed and pulled content never share a repository.
//!
//! Clients reach upstream content three ways, and [`target`] maps each to one repository:
//! - containerd mirrors add `?ns=<registry>` to every request (`/v2/library/alpine/...?ns=docker.io`);
//! - Docker Engine's `registry-mirrors` send Docker Hub pulls with no `ns` at all;
//! - the explicit form names the registry in the path.
//!
//! Pure functions: no I/O, so the rules are tested here once for agents and origins.

/// The repository part of a `/v2/<name>/(manifests|blobs|tags|referrers)/...` path, and the
/// rest after it.
pub fn split_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/v2/")?;
    ["/manifests/", "/blobs/", "/tags/", "/referrers/"]
        .iter()
        .filter_map(|m| rest.rfind(m).map(|i| (&rest[..i], &rest[i..])))
        .max_by_key(|(name, _)| name.len())
}

/// `uri` with its repository replaced by `name`.
pub fn with_name(uri: &http::Uri, name: &str, tail: &str) -> Option<http::Uri> {
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    format!("/v2/{name}{tail}{query}").parse().ok()
}

/// The explicit form of an explicit-form `name` that lacks Docker Hub's `library/`
/// (`docker.io/alpine` → `docker.io/library/alpine`), if it is one: the one repository
/// that content is kept and authorized under, however it was asked for.
pub fn explicit_repo(name: &str, upstreams: &[String]) -> Option<String> {
    let (first, rest) = name.split_once('/')?;
    if !upstreams.iter().any(|u| u == first) {
        return None;
    }
    let full = explicit(first, rest);
    (full != name).then_some(full)
}

/// Path of the list of configured upstream registries an origin publishes to agents.
pub const REGISTRIES_PATH: &str = "/shoal/v1/upstream/registries";

/// Path of the progress of an upstream blob's fetch (`?repo=<explicit name>`).
pub fn progress_path(digest: &crate::Digest) -> String {
    format!("/shoal/v1/upstream/blobs/{digest}")
}

/// The list at [`REGISTRIES_PATH`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Registries {
    pub registries: Vec<String>,
}

/// Where one upstream blob's fetch stands, as the progress endpoint answers it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// The blob's size, once the upstream answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Bytes received from the upstream so far.
    #[serde(default)]
    pub received: u64,
    /// The blob is in the origins' cluster, linked into the repository.
    #[serde(default)]
    pub complete: bool,
    /// The fetch failed; asking again starts a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For a failure about the blob or the client rather than the upstream's health: the
    /// status a client should see (404: not there; 401: credentials refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

/// How often a waiter asks a fetch's progress.
pub const PROGRESS_POLL: std::time::Duration = std::time::Duration::from_millis(200);
/// A fetch whose received bytes do not grow for this long is given up by its waiters.
pub const FETCH_STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// Poll `ask` (a fetch's [`Progress`]) every [`PROGRESS_POLL`] until the blob is held: its
/// size; `None` if the upstream has no such blob there; an error if the upstream refused
/// this client (`registry` names it in the challenge), the fetch failed, or its bytes stopped
/// growing for [`FETCH_STALL`]. Origins and agents wait on an upstream fetch with it.
pub async fn wait_for_fetch<F, Fut>(
    registry: &str,
    digest: &crate::Digest,
    mut ask: F,
) -> Result<Option<u64>, crate::StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Progress, crate::StoreError>>,
{
    use crate::StoreError;
    let mut last = (0, tokio::time::Instant::now());
    loop {
        let p = ask().await?;
        if p.complete {
            return Ok(p.size);
        }
        if let Some(e) = p.error {
            return match p.status {
                Some(404) => Ok(None),
                Some(401) | Some(403) => {
                    Err(StoreError::UpstreamUnauthorized { registry: registry.to_string() })
                }
                // The upstream throttles: the client hears it (and when to come back).
                Some(429) => Err(StoreError::Throttled { retry_after_secs: THROTTLED_RETRY_SECS }),
                _ => Err(StoreError::Unavailable(e)),
            };
        }
        // Any change is progress: the fetch waited on may be replaced by a new one (another
        // repository's or client's failed), whose count starts again at 0.
        if p.received != last.0 {
            last = (p.received, tokio::time::Instant::now());
        } else if last.1.elapsed() > FETCH_STALL {
            return Err(StoreError::Unavailable(format!(
                "the upstream fetch of {digest} made no progress for {} s",
                FETCH_STALL.as_secs()
            )));
        }
        tokio::time::sleep(PROGRESS_POLL).await;
    }
}

/// Seconds a client is told to wait when the upstream throttled a blob fetch (its own
/// `Retry-After` stays with the origin that asked).
const THROTTLED_RETRY_SECS: u64 = 10;

/// Docker Hub's name as containerd sends it in `ns`, and the one implicit-`library/` registry.
pub const DOCKER_HUB: &str = "docker.io";

/// Other spellings of Docker Hub that clients use.
pub const DOCKER_HUB_ALIASES: [&str; 3] =
    ["index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"];

/// Which repository a request is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Content pushed to the origins (or explicit upstream content): the name as given.
    AsIs,
    /// Upstream content, under this repository name (explicit form).
    Upstream(String),
    /// A request without `ns` while Docker Hub is configured: pushed content if the origins
    /// have it, else Docker Hub's image of that name (Docker Engine's `registry-mirrors`).
    PushedElse(String),
}

/// The configured registry `ns` names, if any (Docker Hub's aliases count as `docker.io`).
fn canonical(ns: &str) -> &str {
    if DOCKER_HUB_ALIASES.contains(&ns) {
        DOCKER_HUB
    } else {
        ns
    }
}

/// `name` at `registry` in the explicit form, adding Docker Hub's implicit `library/` to a
/// one-component name (`docker.io` + `alpine` → `docker.io/library/alpine`).
pub fn explicit(registry: &str, name: &str) -> String {
    if registry == DOCKER_HUB && !name.contains('/') {
        format!("{registry}/library/{name}")
    } else {
        format!("{registry}/{name}")
    }
}

/// Split an explicit-form repository into (registry, path at the registry) when its first
/// component is one of `upstreams`.
pub fn split<'a>(repo: &'a str, upstreams: &[String]) -> Option<(&'a str, &'a str)> {
    let (first, rest) = repo.split_once('/')?;
    upstreams.iter().any(|u| u == first).then_some((first, rest))
}

/// Where a request for `name` (the path's repository) with containerd's `ns` goes, given the
/// configured upstream registry names. A `ns` that names no configured upstream leaves the
/// name alone: nothing is ever sent to a registry nobody configured.
pub fn target(name: &str, ns: Option<&str>, upstreams: &[String]) -> Target {
    let configured = |r: &str| upstreams.iter().any(|u| u == r);
    let ns = ns.map(canonical);
    if let Some(ns) = ns.filter(|ns| configured(ns)) {
        return Target::Upstream(explicit(ns, name));
    }
    // Without `ns`, or with one nobody configured (the origins' own address, as a mirror):
    // an explicit-form name is the upstream's all the same.
    if let Some((first, rest)) = name.split_once('/') {
        if configured(first) {
            // Already explicit; only Docker Hub's `library/` may be missing.
            let full = explicit(first, rest);
            return if full == name { Target::AsIs } else { Target::Upstream(full) };
        }
    }
    if ns.is_none() && configured(DOCKER_HUB) {
        return Target::PushedElse(explicit(DOCKER_HUB, name));
    }
    Target::AsIs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fetch whose count of bytes keeps changing is waited on, also when it starts again
    /// from 0 (the fetch waited on was replaced); one whose count stands still for
    /// `FETCH_STALL` is given up.
    #[tokio::test(start_paused = true)]
    async fn waiters_give_up_only_on_a_count_that_stands_still() {
        let digest = crate::Digest::of(crate::Algorithm::Sha256, b"x");
        let mut polls = 0u64;
        let restarted = wait_for_fetch("r", &digest, || {
            polls += 1;
            // 1,000 bytes, then a new fetch that gains a byte a poll, done after 20 minutes.
            let received = if polls < 10 { polls * 100 } else { polls - 10 };
            let complete = polls > 6_000;
            async move { Ok(Progress { size: Some(10), received, complete, ..Progress::default() }) }
        })
        .await;
        assert_eq!(restarted.unwrap(), Some(10));
        let started = tokio::time::Instant::now();
        let stalled =
            wait_for_fetch("r", &digest, || async { Ok(Progress { received: 5, ..Progress::default() }) });
        assert!(matches!(stalled.await, Err(crate::StoreError::Unavailable(_))));
        assert!(started.elapsed() >= FETCH_STALL);
    }

    fn ups(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// A fetch the upstream throttled is a 429 for the waiting client (was 503 `UNKNOWN`).
    #[tokio::test]
    async fn a_throttled_fetch_is_a_429_for_its_waiters() {
        let digest = crate::Digest::of(crate::Algorithm::Sha256, b"x");
        let throttled = || async {
            Ok(Progress {
                error: Some("upstream docker.io: the upstream is throttling requests".into()),
                status: Some(429),
                ..Progress::default()
            })
        };
        let got = wait_for_fetch("docker.io", &digest, throttled).await;
        assert!(matches!(got, Err(crate::StoreError::Throttled { .. })), "{got:?}");
    }

    #[test]
    fn containerd_ns_maps_configured_registries_only() {
        let u = ups(&["docker.io", "ghcr.io"]);
        assert_eq!(
            target("library/alpine", Some("docker.io"), &u),
            Target::Upstream("docker.io/library/alpine".into())
        );
        assert_eq!(target("org/app", Some("ghcr.io"), &u), Target::Upstream("ghcr.io/org/app".into()));
        assert_eq!(
            target("alpine", Some("index.docker.io"), &u),
            Target::Upstream("docker.io/library/alpine".into())
        );
        // A registry nobody configured (e.g. the origins' own address): the origins' content.
        assert_eq!(target("team/app", Some("origin.example:5000"), &u), Target::AsIs);
        assert_eq!(target("team/app", Some("quay.io"), &u), Target::AsIs);
        // Through the origins' own address, an explicit-form name still gets Docker Hub's
        // `library/` (asked for `alpine`, Docker Hub answered 401).
        assert_eq!(
            target("docker.io/alpine", Some("origin.example:5000"), &u),
            Target::Upstream("docker.io/library/alpine".into())
        );
        assert_eq!(target("docker.io/library/alpine", Some("origin.example:5000"), &u), Target::AsIs);
    }

    #[test]
    fn explicit_form_and_docker_hub_library() {
        let u = ups(&["docker.io", "registry.k8s.io"]);
        assert_eq!(target("docker.io/library/alpine", None, &u), Target::AsIs);
        assert_eq!(target("docker.io/alpine", None, &u), Target::Upstream("docker.io/library/alpine".into()));
        assert_eq!(target("registry.k8s.io/pause", None, &u), Target::AsIs);
    }

    #[test]
    fn no_ns_falls_back_to_docker_hub_only_when_configured() {
        assert_eq!(
            target("library/alpine", None, &ups(&["docker.io"])),
            Target::PushedElse("docker.io/library/alpine".into())
        );
        assert_eq!(
            target("alpine", None, &ups(&["docker.io"])),
            Target::PushedElse("docker.io/library/alpine".into())
        );
        assert_eq!(target("library/alpine", None, &ups(&["ghcr.io"])), Target::AsIs);
        assert_eq!(target("library/alpine", None, &[]), Target::AsIs);
    }

    #[test]
    fn explicit_repo_adds_docker_hubs_library_only() {
        let u = ups(&["docker.io", "ghcr.io"]);
        assert_eq!(explicit_repo("docker.io/alpine", &u), Some("docker.io/library/alpine".into()));
        assert_eq!(explicit_repo("docker.io/library/alpine", &u), None);
        assert_eq!(explicit_repo("ghcr.io/app", &u), None);
        assert_eq!(explicit_repo("quay.io/app", &u), None);
        assert_eq!(explicit_repo("alpine", &u), None);
    }

    #[test]
    fn split_finds_the_registry() {
        let u = ups(&["docker.io"]);
        assert_eq!(split("docker.io/library/alpine", &u), Some(("docker.io", "library/alpine")));
        assert_eq!(split("team/app", &u), None);
        assert_eq!(split("docker.io", &u), None);
    }
}
