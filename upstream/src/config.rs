//! One `[[upstream]]` section of an origin's config: which registry, where, with what
//! credentials and CA, and how long tag answers live. Validated before anything is fetched.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::UpstreamError;

/// How long a tag's answer from the upstream is reused by default.
pub const DEFAULT_TAG_TTL: Duration = Duration::from_secs(30);
/// How long a tag's last target is served while the upstream cannot answer, by default.
pub const DEFAULT_SERVE_STALE: Duration = Duration::from_secs(3600);
/// How long a repository found private is taken as private before the upstream is asked
/// without a client's credentials again, by default.
pub const DEFAULT_PRIVATE_RECHECK: Duration = Duration::from_secs(300);

fn default_tag_ttl() -> Duration {
    DEFAULT_TAG_TTL
}

fn default_serve_stale() -> Duration {
    DEFAULT_SERVE_STALE
}

fn default_private_recheck() -> Duration {
    DEFAULT_PRIVATE_RECHECK
}

/// One `[[upstream]]` section of the origin's config.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The name clients pull by: containerd's `?ns=`, and the first path component of the
    /// explicit form (`docker.io/library/alpine`).
    pub registry: String,
    /// Base URL, e.g. `https://registry-1.docker.io`.
    pub url: String,
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password (a trailing newline is dropped).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM CA certificates trusted for this upstream, besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// How long a resolved tag is reused before the upstream is asked again.
    #[serde(default = "default_tag_ttl", with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// How long a tag's last target is served while the upstream cannot answer.
    #[serde(default = "default_serve_stale", with = "humantime_serde")]
    pub serve_stale: Duration,
    /// How long a repository found private (only a client's credentials opened it) stays
    /// private before the upstream is asked with the configured credentials, or none, again:
    /// made public, or opened to the configured credentials once they are fixed, it is then
    /// served to every client.
    #[serde(default = "default_private_recheck", with = "humantime_serde")]
    pub private_recheck: Duration,
}

impl UpstreamConfig {
    /// Refuse a section that cannot work, naming the field.
    pub fn validate(&self) -> Result<(), UpstreamError> {
        let bad = |why: String| Err(UpstreamError::Config(why));
        if self.registry.contains('/') || self.registry.parse::<shoal_registry::RepoName>().is_err() {
            return bad(format!(
                "registry {:?}: must be one lowercase repository name component (e.g. docker.io, no port)",
                self.registry
            ));
        }
        if shoal_registry::mirror::DOCKER_HUB_ALIASES.contains(&self.registry.as_str()) {
            // Clients name Docker Hub `docker.io` (containerd's `ns`, the explicit form), and
            // Docker's mirror requests carry no name at all: under an alias nothing matched.
            return bad(format!(
                "registry {:?} is Docker Hub: name it \"docker.io\" (its url stays {})",
                self.registry, self.url
            ));
        }
        let Ok(url) = self.url.parse::<http::Uri>() else {
            return bad(format!("url {:?} is not a URL", self.url));
        };
        if !matches!(url.scheme_str(), Some("http") | Some("https")) || url.host().is_none() {
            return bad(format!("url {:?}: expected http(s)://host[:port]", self.url));
        }
        if self.password_file.is_some() && self.username.is_none() {
            return bad("password_file without username".into());
        }
        if self.username.is_some() && self.password_file.is_none() {
            return bad("username without password_file".into());
        }
        if self.private_recheck.is_zero() {
            return bad("private_recheck must be above zero".into());
        }
        Ok(())
    }

    /// The URL without a trailing slash.
    pub fn base(&self) -> &str {
        self.url.trim_end_matches('/')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<UpstreamConfig, String> {
        let c: UpstreamConfig = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn docker_hubs_other_names_are_refused() {
        for alias in ["index.docker.io", "registry-1.docker.io"] {
            let e = parse(&format!("registry = \"{alias}\"\nurl = \"https://registry-1.docker.io\""))
                .unwrap_err();
            assert!(e.contains("name it \"docker.io\""), "{e}");
        }
    }

    #[test]
    fn defaults_and_full_sections() {
        let c = parse("registry = \"docker.io\"\nurl = \"https://registry-1.docker.io/\"").unwrap();
        assert_eq!((c.tag_ttl, c.serve_stale), (DEFAULT_TAG_TTL, DEFAULT_SERVE_STALE));
        assert_eq!(c.private_recheck, DEFAULT_PRIVATE_RECHECK);
        assert_eq!(c.base(), "https://registry-1.docker.io");
        let c = parse(
            "registry = \"ghcr.io\"\nurl = \"https://ghcr.io\"\nusername = \"u\"\npassword_file = \"/p\"\n\
             ca_file = \"/ca.pem\"\ntag_ttl = \"5s\"\nserve_stale = \"2h\"\nprivate_recheck = \"1m\"",
        )
        .unwrap();
        assert_eq!(c.tag_ttl, Duration::from_secs(5));
        assert_eq!(c.serve_stale, Duration::from_secs(7200));
        assert_eq!(c.private_recheck, Duration::from_secs(60));
    }

    #[test]
    fn bad_sections_are_refused() {
        for bad in [
            "registry = \"Docker.io\"\nurl = \"https://x\"",
            "registry = \"host:5000\"\nurl = \"https://x\"",
            "registry = \"a/b\"\nurl = \"https://x\"",
            "registry = \"docker.io\"\nurl = \"ftp://x\"",
            "registry = \"docker.io\"\nurl = \"not a url\"",
            "registry = \"docker.io\"\nurl = \"https://x\"\npassword_file = \"/p\"",
            "registry = \"docker.io\"\nurl = \"https://x\"\nusername = \"u\"",
            "registry = \"docker.io\"\nurl = \"https://x\"\nunknown = 1",
            "url = \"https://x\"",
            "registry = \"docker.io\"\nurl = \"https://x\"\nprivate_recheck = \"0s\"",
        ] {
            assert!(parse(bad).is_err(), "accepted: {bad}");
        }
    }
}
