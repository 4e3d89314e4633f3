//! DNS answers for the member list's `dns+host:port` (A/AAAA) and `srv+name` (SRV) entries,
//! each bounded by the cluster's call timeout.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;
use tracing::warn;

use super::MembershipError;
use crate::cluster::member_entry::{normalise, Source};

/// Lookups for a member list's DNS entries.
pub(super) struct Lookups {
    /// Only built when an entry needs SRV lookups.
    resolver: Option<TokioResolver>,
    timeout: Duration,
}

impl Lookups {
    /// Lookups for `sources`, each at most `timeout`; SRV questions go to `nameserver` alone
    /// when given (tests run a DNS server of their own), else to the system's resolvers.
    pub(super) fn new(
        sources: &[Source],
        nameserver: Option<SocketAddr>,
        timeout: Duration,
    ) -> Result<Lookups, MembershipError> {
        let resolver = if sources.iter().any(|s| matches!(s, Source::Srv(_))) {
            Some(srv_resolver(nameserver, timeout)?)
        } else {
            None
        };
        Ok(Lookups { resolver, timeout })
    }

    /// Members behind `dns+host:port`: one per A/AAAA address.
    pub(super) async fn addrs(&self, host: &str, port: u16) -> Result<BTreeSet<String>, String> {
        let addrs = tokio::time::timeout(self.timeout, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| format!("timed out after {:?}", self.timeout))?
            .map_err(|e| e.to_string())?;
        Ok(addrs.map(|a| a.to_string()).collect())
    }

    /// Members behind `srv+name`: one `target:port` per SRV record.
    pub(super) async fn srv(&self, name: &str) -> Result<BTreeSet<String>, String> {
        let resolver = self.resolver.as_ref().ok_or_else(|| "no SRV resolver".to_string())?;
        let lookup = tokio::time::timeout(self.timeout, resolver.srv_lookup(format!("{name}.")))
            .await
            .map_err(|_| format!("timed out after {:?}", self.timeout))?
            .map_err(|e| e.to_string())?;
        let mut ids = BTreeSet::new();
        for record in lookup.iter() {
            let target = record.target().to_utf8();
            let target = target.trim_end_matches('.');
            if target.is_empty() {
                continue; // "." means the service is deliberately unavailable.
            }
            match normalise(&format!("{target}:{}", record.port())) {
                Ok(id) => {
                    ids.insert(id);
                }
                Err(reason) => warn!(srv = name, target, %reason, "skipping SRV target"),
            }
        }
        Ok(ids)
    }
}

/// The resolver for SRV lookups: the system's, or `nameserver` alone.
fn srv_resolver(nameserver: Option<SocketAddr>, timeout: Duration) -> Result<TokioResolver, MembershipError> {
    let mut builder = match nameserver {
        Some(ns) => {
            let group = NameServerConfigGroup::from_ips_clear(&[ns.ip()], ns.port(), true);
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], group),
                TokioConnectionProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio()?,
    };
    let options = builder.options_mut();
    options.timeout = timeout;
    options.attempts = 2;
    Ok(builder.build())
}
