//! Where an upstream's token realm may take an origin. A `401`'s challenge is the upstream's
//! to write, and the origin fetches whatever realm it names: a hostile or compromised
//! upstream could name this host (`localhost`, a loopback address) or a cloud's instance
//! metadata service (`169.254.169.254`) and have the origin fetch from them. So a realm may
//! be on such an address only if the upstream itself is of the same kind (a registry and its
//! token server on one test host): checked on the realm's address as written, on every
//! redirect's, and on every address a realm's name resolves to ([`RealmResolver`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// Most redirects a token request follows (reqwest's own default).
pub const MAX_REALM_REDIRECTS: usize = 10;

/// What kind of place an address is, for realms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// This host: loopback, unspecified, `localhost`.
    ThisHost,
    /// The link: link-local addresses and the instance metadata services clouds put on
    /// well-known addresses.
    Link,
    /// Anywhere else (private networks included: on-premises token servers).
    Elsewhere,
}

impl Place {
    fn code(self) -> u8 {
        match self {
            Place::ThisHost => 1,
            Place::Link => 2,
            Place::Elsewhere => 3,
        }
    }

    fn from_code(code: u8) -> Option<Place> {
        match code {
            1 => Some(Place::ThisHost),
            2 => Some(Place::Link),
            3 => Some(Place::Elsewhere),
            _ => None,
        }
    }
}

/// Instance metadata services on addresses that are not link-local.
const METADATA: [IpAddr; 3] = [
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)), // AWS over IPv6
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),                  // Alibaba Cloud
    IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)),                    // Azure's wire server
];

/// The place of an address.
pub fn place_of_ip(ip: IpAddr) -> Place {
    let ip = ip.to_canonical();
    if ip.is_loopback() || ip.is_unspecified() {
        return Place::ThisHost;
    }
    let link = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    if link || METADATA.contains(&ip) {
        Place::Link
    } else {
        Place::Elsewhere
    }
}

/// The place a host as written in a URL names, if it can be told without resolving it: an
/// address, or `localhost` (and its subdomains, RFC 6761). `None` for other names.
pub fn place_of_host(host: &str) -> Option<Place> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Some(place_of_ip(ip));
    }
    let name = bare.trim_end_matches('.').to_ascii_lowercase();
    (name == "localhost" || name.ends_with(".localhost")).then_some(Place::ThisHost)
}

/// Whether a realm at `realm` may be asked for an upstream at `upstream`.
pub fn allowed(upstream: Place, realm: Place) -> bool {
    realm == Place::Elsewhere || realm == upstream
}

/// The place of an upstream's base URL, resolving its name if need be (the addresses it
/// resolves to that are the most local count: a name for this host in `/etc/hosts` is this
/// host). `Elsewhere` if it cannot be told (unparseable, not resolvable in time).
pub async fn place_of_base(base: &str, timeout: std::time::Duration) -> Place {
    let Ok(url) = reqwest::Url::parse(base) else { return Place::Elsewhere };
    let Some(host) = url.host_str().map(str::to_string) else { return Place::Elsewhere };
    if let Some(place) = place_of_host(&host) {
        return place;
    }
    let port = url.port_or_known_default().unwrap_or(443);
    let resolved = tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await;
    match resolved {
        Ok(Ok(addrs)) => {
            addrs.map(|a| place_of_ip(a.ip())).min_by_key(|p| p.code()).unwrap_or(Place::Elsewhere)
        }
        _ => Place::Elsewhere,
    }
}

/// The upstream's place, once known, shared by the token client's resolver and redirect
/// policy (`None` until the first token fetch works it out).
#[derive(Clone, Default)]
pub struct UpstreamPlace(Arc<AtomicU8>);

impl UpstreamPlace {
    pub fn get(&self) -> Option<Place> {
        Place::from_code(self.0.load(Ordering::Relaxed))
    }

    pub fn set(&self, place: Place) {
        self.0.store(place.code(), Ordering::Relaxed);
    }

    /// Whether a realm at `realm` may be asked (before the upstream's place is known, only
    /// `Elsewhere`).
    fn allows(&self, realm: Place) -> bool {
        allowed(self.get().unwrap_or(Place::Elsewhere), realm)
    }

    /// The place of an upstream at `base`: known at once for an address or `localhost`; a
    /// name is resolved at the first token fetch ([`UpstreamPlace::allows_realm`]).
    pub fn for_base(base: &str) -> UpstreamPlace {
        let place = UpstreamPlace::default();
        let host = reqwest::Url::parse(base).ok().and_then(|u| u.host_str().map(str::to_string));
        if let Some(known) = host.as_deref().and_then(place_of_host) {
            place.set(known);
        }
        place
    }

    /// `builder` as the client token requests go out on: its resolver and redirect policy
    /// keep realms off the addresses this place does not allow.
    pub fn token_client(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        builder.dns_resolver(Arc::new(RealmResolver(self.clone()))).redirect(redirect_policy(self.clone()))
    }

    /// Whether `realm`, as written, may be asked for the upstream at `base` (its name's
    /// addresses and its redirects are checked by the token client). Unparseable realms are
    /// not. Resolves `base` (within `timeout`) the first time if it is a name.
    pub async fn allows_realm(&self, base: &str, realm: &str, timeout: std::time::Duration) -> bool {
        let upstream = match self.get() {
            Some(place) => place,
            None => {
                let place = place_of_base(base, timeout).await;
                self.set(place);
                place
            }
        };
        let Ok(url) = reqwest::Url::parse(realm) else { return false };
        match url.host_str() {
            Some(host) => place_of_host(host).is_none_or(|place| allowed(upstream, place)),
            None => false,
        }
    }
}

/// The token client's resolver: a realm's name resolves only to the addresses the upstream's
/// place allows (a name such as `metadata.google.internal` would otherwise reach what its
/// address may not).
pub struct RealmResolver(pub UpstreamPlace);

impl reqwest::dns::Resolve for RealmResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let place = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> =
                addrs.into_iter().filter(|a| place.allows(place_of_ip(a.ip()))).collect();
            if kept.is_empty() {
                let refused = format!("{host} resolves only to addresses a token realm may not use here");
                return Err(refused.into());
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The token client's redirect policy: every hop is checked as the realm itself was.
pub fn redirect_policy(place: UpstreamPlace) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        let hop = attempt.url().host_str().and_then(place_of_host);
        if hop.is_some_and(|p| !place.allows(p)) {
            let refused = format!("a token realm redirected to {}, a local address", attempt.url());
            attempt.error(refused)
        } else if attempt.previous().len() >= MAX_REALM_REDIRECTS {
            attempt.error("too many redirects from the token realm")
        } else {
            attempt.follow()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_of_hosts() {
        for (host, place) in [
            ("127.0.0.1", Some(Place::ThisHost)),
            ("127.9.9.9", Some(Place::ThisHost)),
            ("[::1]", Some(Place::ThisHost)),
            ("0.0.0.0", Some(Place::ThisHost)),
            ("localhost", Some(Place::ThisHost)),
            ("LocalHost.", Some(Place::ThisHost)),
            ("metadata.localhost", Some(Place::ThisHost)),
            ("169.254.169.254", Some(Place::Link)),
            ("[fe80::1]", Some(Place::Link)),
            ("[::ffff:169.254.169.254]", Some(Place::Link)),
            ("[fd00:ec2::254]", Some(Place::Link)),
            ("100.100.100.200", Some(Place::Link)),
            ("10.0.0.7", Some(Place::Elsewhere)),
            ("[fd00::7]", Some(Place::Elsewhere)),
            ("auth.example", None),
        ] {
            assert_eq!(place_of_host(host), place, "{host}");
        }
    }

    #[test]
    fn a_realm_may_be_local_only_where_the_upstream_is() {
        use Place::*;
        assert!(allowed(Elsewhere, Elsewhere));
        assert!(!allowed(Elsewhere, ThisHost));
        assert!(!allowed(Elsewhere, Link));
        assert!(allowed(ThisHost, ThisHost), "a registry and its token server on one host");
        assert!(allowed(ThisHost, Elsewhere));
        assert!(!allowed(ThisHost, Link), "a local proxy's remote may not name the metadata service");
        assert!(allowed(Link, Link));
    }

    #[tokio::test]
    async fn a_base_named_for_this_host_is_this_host() {
        let t = std::time::Duration::from_secs(2);
        assert_eq!(place_of_base("http://localhost:5000", t).await, Place::ThisHost);
        assert_eq!(place_of_base("http://127.0.0.1:5000", t).await, Place::ThisHost);
        assert_eq!(place_of_base("https://registry.example", t).await, Place::Elsewhere);
        assert_eq!(place_of_base("not a url", t).await, Place::Elsewhere);
    }

    #[tokio::test]
    async fn names_resolve_only_to_allowed_addresses() {
        use reqwest::dns::Resolve as _;
        let place = UpstreamPlace::default();
        place.set(Place::Elsewhere);
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        assert!(
            RealmResolver(place.clone()).resolve(name).await.is_err(),
            "localhost from a remote upstream"
        );
        place.set(Place::ThisHost);
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let addrs: Vec<SocketAddr> = RealmResolver(place).resolve(name).await.unwrap().collect();
        assert!(!addrs.is_empty());
    }

    /// A redirect to a local address is refused for an upstream elsewhere, followed for one
    /// on this host (a realm on loopback redirecting to loopback, so the test sends nothing
    /// off the host either way).
    #[tokio::test]
    async fn redirects_are_checked_hop_by_hop() {
        use axum::routing::get;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let to = format!("{base}/token");
        let app = axum::Router::new()
            .route("/realm", get(move || async move { axum::response::Redirect::temporary(&to) }))
            .route("/token", get(|| async { "{}" }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = |place: Place| {
            let shared = UpstreamPlace::default();
            shared.set(place);
            reqwest::Client::builder().no_proxy().redirect(redirect_policy(shared)).build().unwrap()
        };
        let refused = client(Place::Elsewhere).get(format!("{base}/realm")).send().await;
        assert!(refused.is_err(), "{refused:?}");
        let followed = client(Place::ThisHost).get(format!("{base}/realm")).send().await.unwrap();
        assert_eq!(followed.status(), 200);
    }
}
