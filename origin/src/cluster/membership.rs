//! Which origins are in the cluster and which of them are up. Placement ranks only the live
//! origins, so this module's answer decides where every blob and record goes.
//!
//! The member list comes from `--cluster` entries: fixed `host:port` addresses, `dns+name:port`
//! names whose A/AAAA addresses are members, and `srv+_service._tcp.name` SRV records. DNS is
//! resolved again every `dns_refresh`. Every other member is checked every `health_interval`;
//! it goes down after `health_fails` failed checks in a row and up again after `health_passes`
//! passed ones. This origin is always a member and always live.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::{ResolveError, TokioResolver};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tracing::{info, warn};

use crate::cluster::member_entry::{normalise, url_of, Source};
use crate::cluster::ClusterConfig;

/// Path of the internal health endpoint every origin serves.
pub const HEALTH_PATH: &str = "/shoal/internal/v1/health";

/// At most this many health checks run at once, so a huge DNS answer cannot open sockets
/// without bound.
const MAX_CONCURRENT_CHECKS: usize = 256;

/// Shortest loop period, so a zero interval in the config cannot spin a core.
const MIN_PERIOD: Duration = Duration::from_millis(10);

/// An origin's peer-protocol identity, so trackers can hand out owners as seeders.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerIdentity {
    /// Its id in the peer protocol's handshake.
    pub peer_id: String,
    /// Where its peer listener accepts connections.
    pub addr: SocketAddr,
}

/// What `GET /shoal/internal/v1/health` answers: the origin's cluster id, and its peer-protocol
/// identity if it seeds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReply {
    /// The answering origin's cluster id (its advertise address).
    pub id: String,
    /// Its peer-protocol identity; absent when it does not seed.
    #[serde(default)]
    pub peer: Option<PeerIdentity>,
    /// Its version clock's reading: the receiver's clock moves past it (see `VersionClock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<crate::cluster::record::Version>,
    /// Its wall clock (ms since the epoch) when it answered, for the skew metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_millis: Option<u64>,
    /// Its data disk is nearly full: placement gives it no new copies.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disk_full: bool,
    /// The fingerprint of its member list ([`Membership::members_fingerprint`]): GC runs only
    /// while every member's is the leader's. Absent from origins before session 40.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<String>,
}

/// One member as seen by this origin, for status pages and the tracker's seeder list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    /// Its cluster id (`host:port`, normalised).
    pub id: String,
    /// Base URL of its API, `http://host:port`.
    pub url: String,
    /// Whether it is in the live set (this origin always is).
    pub up: bool,
    /// Its peer-protocol identity from the last health reply.
    pub peer: Option<PeerIdentity>,
}

/// Why membership could not start: the configuration cannot describe a cluster.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// A `--cluster` entry is not `host:port`, `dns+name:port` or `srv+name`.
    #[error("cluster member {entry:?}: {reason}")]
    BadEntry { entry: String, reason: String },
    /// The advertised address is not a `host:port` other origins can reach.
    #[error("advertise address {entry:?}: {reason}")]
    BadAdvertise { entry: String, reason: String },
    /// The system DNS configuration needed for SRV lookups could not be read.
    #[error("DNS resolver for SRV lookups: {0}")]
    Resolver(#[from] ResolveError),
}

/// The up/down state machine of one member: pure, so its thresholds are tested alone.
#[derive(Clone, Debug)]
struct Health {
    up: bool,
    fails: u32,
    passes: u32,
}

impl Health {
    /// New members start up, so a fresh cluster works before its first round of checks.
    fn new() -> Health {
        Health { up: true, fails: 0, passes: 0 }
    }

    /// Count one check; `true` when the member went up or down.
    fn record(&mut self, pass: bool, fails_needed: u32, passes_needed: u32) -> bool {
        if pass {
            self.fails = 0;
            self.passes = self.passes.saturating_add(1);
            if !self.up && self.passes >= passes_needed.max(1) {
                self.up = true;
                return true;
            }
        } else {
            self.passes = 0;
            self.fails = self.fails.saturating_add(1);
            if self.up && self.fails >= fails_needed.max(1) {
                self.up = false;
                return true;
            }
        }
        false
    }
}

/// Another origin in the member list.
#[derive(Clone, Debug)]
struct Member {
    health: Health,
    peer: Option<PeerIdentity>,
    /// Its last health reply said its disk is nearly full.
    disk_full: bool,
    /// The fingerprint of the member list its last health reply named.
    members: Option<String>,
    /// It answered with this origin's own id: another name for us, so not a member.
    is_self: bool,
    /// It answered with an id other than the one we know it by (warned once).
    warned_id: bool,
}

impl Member {
    fn new() -> Member {
        Member {
            health: Health::new(),
            peer: None,
            disk_full: false,
            members: None,
            is_self: false,
            warned_id: false,
        }
    }

    fn live(&self) -> bool {
        self.health.up && !self.is_self
    }
}

/// What the lock guards.
#[derive(Debug, Default)]
struct Table {
    /// Every member but this origin, by id.
    others: BTreeMap<String, Member>,
    /// The last successful answer for each DNS source (by index in `sources`); kept when a
    /// lookup fails, so a DNS outage does not empty the cluster.
    resolved: BTreeMap<usize, BTreeSet<String>>,
}

/// The cluster's members and their health. Background tasks keep it current until the last
/// `Arc` is dropped.
pub struct Membership {
    me: String,
    self_peer: Option<PeerIdentity>,
    secret: Option<String>,
    sources: Vec<Source>,
    health_timeout: Duration,
    health_fails: u32,
    health_passes: u32,
    dns_timeout: Duration,
    http: reqwest::Client,
    /// Only built when an entry needs SRV lookups.
    srv: Option<TokioResolver>,
    table: Mutex<Table>,
    generation: watch::Sender<u64>,
    /// Called with every member's health reply (the origin moves its version clock and
    /// measures clock skew there).
    on_reply: std::sync::OnceLock<ReplyHook>,
    /// This origin's own data disk is nearly full (set by the origin's disk watch).
    self_disk_full: std::sync::atomic::AtomicBool,
}

/// See [`Membership::on_reply`].
pub type ReplyHook = Box<dyn Fn(&str, &HealthReply) + Send + Sync>;

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership").field("me", &self.me).field("sources", &self.sources).finish()
    }
}

impl Membership {
    /// Resolve the member list and start the health-check and DNS-refresh tasks. The tasks hold
    /// only a `Weak`, so they end once the returned `Arc` and its clones are dropped.
    pub async fn start(
        config: ClusterConfig,
        self_peer: Option<PeerIdentity>,
        http: reqwest::Client,
    ) -> Result<Arc<Membership>, MembershipError> {
        Self::start_with_nameserver(config, self_peer, http, None).await
    }

    /// [`Membership::start`] with SRV lookups sent to `nameserver` instead of the system's
    /// resolvers (tests run a DNS server of their own).
    async fn start_with_nameserver(
        config: ClusterConfig,
        self_peer: Option<PeerIdentity>,
        http: reqwest::Client,
        nameserver: Option<SocketAddr>,
    ) -> Result<Arc<Membership>, MembershipError> {
        let me = normalise(&config.advertise)
            .map_err(|reason| MembershipError::BadAdvertise { entry: config.advertise.clone(), reason })?;
        let mut sources = Vec::new();
        for entry in &config.members {
            let source = Source::parse(entry)
                .map_err(|reason| MembershipError::BadEntry { entry: entry.to_string(), reason })?;
            if !sources.contains(&source) {
                sources.push(source);
            }
        }
        let dynamic = sources.iter().any(|s| !matches!(s, Source::Fixed(_)));
        let srv = if sources.iter().any(|s| matches!(s, Source::Srv(_))) {
            Some(srv_resolver(nameserver, config.call_timeout)?)
        } else {
            None
        };
        let (generation, _) = watch::channel(0);
        let membership = Arc::new(Membership {
            me,
            self_peer,
            secret: config.secret.clone(),
            sources,
            health_timeout: config.health_timeout,
            health_fails: config.health_fails,
            health_passes: config.health_passes,
            dns_timeout: config.call_timeout,
            http,
            srv,
            table: Mutex::new(Table::default()),
            generation,
            on_reply: std::sync::OnceLock::new(),
            self_disk_full: std::sync::atomic::AtomicBool::new(false),
        });
        membership.refresh().await;
        info!(me = %membership.me, members = ?membership.live(), "cluster membership started");

        let weak = Arc::downgrade(&membership);
        tokio::spawn(every(weak, config.health_interval, |m| async move { m.check_all().await }));
        if dynamic {
            let weak = Arc::downgrade(&membership);
            tokio::spawn(every(weak, config.dns_refresh, |m| async move { m.refresh().await }));
        }
        Ok(membership)
    }

    /// Have `hook` called with every health reply from now on (set once; later calls are
    /// ignored).
    pub fn on_reply(&self, hook: ReplyHook) {
        let _ = self.on_reply.set(hook);
    }

    /// Whether this origin's data disk is nearly full.
    pub fn self_disk_full(&self) -> bool {
        self.self_disk_full.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_self_disk_full(&self, full: bool) {
        self.self_disk_full.store(full, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether member `id` (this origin included) takes new copies: its disk is not nearly
    /// full, as far as its last health reply said.
    pub fn accepts_writes(&self, id: &str) -> bool {
        if id == self.me {
            return !self.self_disk_full();
        }
        !self.lock().others.get(id).is_some_and(|m| m.disk_full)
    }

    /// This origin's id (its normalised advertise address).
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Ids of the members currently up, this origin always among them, sorted: the set
    /// placement ranks.
    pub fn live(&self) -> Vec<String> {
        let table = self.lock();
        let mut ids: Vec<String> =
            table.others.iter().filter(|(_, m)| m.live()).map(|(id, _)| id.clone()).collect();
        ids.push(self.me.clone());
        ids.sort();
        ids.dedup();
        ids
    }

    /// How many members are live (this origin included), for metrics.
    pub fn live_count(&self) -> usize {
        self.live().len()
    }

    /// Every known member, up or down, this origin included, sorted by id.
    pub fn members(&self) -> Vec<MemberInfo> {
        let table = self.lock();
        let mut all: Vec<MemberInfo> = table
            .others
            .iter()
            .filter(|(_, m)| !m.is_self)
            .map(|(id, m)| MemberInfo {
                id: id.clone(),
                url: url_of(id),
                up: m.health.up,
                peer: m.peer.clone(),
            })
            .collect();
        all.push(MemberInfo {
            id: self.me.clone(),
            url: url_of(&self.me),
            up: true,
            peer: self.self_peer.clone(),
        });
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// A fingerprint of the member list (every id, this origin's included, sorted): origins
    /// that name the same members have the same one.
    pub fn members_fingerprint(&self) -> String {
        use sha2::Digest as _;
        let ids: Vec<String> = self.members().into_iter().map(|m| m.id).collect();
        hex::encode(&sha2::Sha256::digest(ids.join("\n").as_bytes())[..16])
    }

    /// A live member whose last health reply named another member list than this origin's
    /// (or none: an older build), if there is one. Such a cluster is mid-change: what one
    /// origin scans, another may have moved to a member the first does not know.
    pub fn disagreeing_member(&self) -> Option<String> {
        let mine = self.members_fingerprint();
        let table = self.lock();
        table
            .others
            .iter()
            .find(|(_, m)| m.live() && m.members.as_deref() != Some(mine.as_str()))
            .map(|(id, _)| id.clone())
    }

    /// Base URL of a known member's API (`http://host:port`, IPv6 bracketed).
    pub fn url(&self, id: &str) -> Option<String> {
        (id == self.me || self.lock().others.contains_key(id)).then(|| url_of(id))
    }

    /// A member's peer-protocol identity, from its last health reply (ours for this origin).
    pub fn peer(&self, id: &str) -> Option<PeerIdentity> {
        if id == self.me {
            return self.self_peer.clone();
        }
        self.lock().others.get(id).and_then(|m| m.peer.clone())
    }

    /// A generation number bumped whenever the live set or the member list changes, so
    /// placement and repair know when to look again.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// A caller could not reach `id`: count it as a failed check, so a dead origin leaves the
    /// live set without waiting for the next round.
    pub fn mark_down(&self, id: &str) {
        let changed = {
            let mut table = self.lock();
            match table.others.get_mut(id) {
                Some(m) if !m.is_self => {
                    let changed = m.health.record(false, self.health_fails, self.health_passes);
                    if changed {
                        info!(member = id, "cluster member down (call failed)");
                    }
                    changed
                }
                _ => false,
            }
        };
        if changed {
            self.bump();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// One round of health checks: every other member, concurrently.
    async fn check_all(&self) {
        let targets: Vec<String> =
            self.lock().others.iter().filter(|(_, m)| !m.is_self).map(|(id, _)| id.clone()).collect();
        let results: Vec<(String, Result<HealthReply, String>)> = stream::iter(targets)
            .map(|id| async move {
                let result = self.check(&id).await;
                (id, result)
            })
            .buffer_unordered(MAX_CONCURRENT_CHECKS)
            .collect()
            .await;
        let mut changed = false;
        {
            let mut table = self.lock();
            for (id, result) in results {
                if let Some(member) = table.others.get_mut(&id) {
                    changed |= self.apply(&id, member, result);
                }
            }
        }
        if changed {
            self.bump();
        }
    }

    /// Count one check's result against `member`; `true` if it joined or left the live set.
    fn apply(&self, id: &str, member: &mut Member, result: Result<HealthReply, String>) -> bool {
        let was_live = member.live();
        match result {
            Ok(reply) => {
                if let Some(hook) = self.on_reply.get() {
                    hook(id, &reply);
                }
                if reply.id == self.me {
                    info!(member = id, "cluster member is this origin under another name; ignoring it");
                    member.is_self = true;
                } else if reply.id != id && !member.warned_id {
                    warn!(member = id, answered = %reply.id, "cluster member answers with another id");
                    member.warned_id = true;
                }
                member.peer = reply.peer;
                member.disk_full = reply.disk_full;
                member.members = reply.members;
                if member.health.record(true, self.health_fails, self.health_passes) {
                    info!(member = id, "cluster member up");
                }
            }
            Err(reason) => {
                if member.health.record(false, self.health_fails, self.health_passes) {
                    info!(member = id, %reason, "cluster member down");
                }
            }
        }
        was_live != member.live()
    }

    /// One health check: a 200 with a parseable [`HealthReply`] passes, anything else fails.
    async fn check(&self, id: &str) -> Result<HealthReply, String> {
        let mut request = self.http.get(format!("{}{HEALTH_PATH}", url_of(id))).timeout(self.health_timeout);
        if let Some(secret) = &self.secret {
            request = request.bearer_auth(secret);
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(format!("status {}", response.status()));
        }
        response.json::<HealthReply>().await.map_err(|e| format!("bad health reply: {e}"))
    }

    /// Resolve every DNS source again and bring the member list in line with the answers.
    async fn refresh(&self) {
        let mut answers = Vec::new();
        for (index, source) in self.sources.iter().enumerate() {
            let answer = match source {
                Source::Fixed(_) => continue,
                Source::Dns { host, port } => self.lookup_addrs(host, *port).await,
                Source::Srv(name) => self.lookup_srv(name).await,
            };
            match answer {
                Ok(ids) => answers.push((index, ids)),
                Err(reason) => warn!(?source, %reason, "cluster DNS lookup failed; keeping the last answer"),
            }
        }
        let mut changed = false;
        {
            let mut table = self.lock();
            for (index, ids) in answers {
                table.resolved.insert(index, ids);
            }
            let mut wanted: BTreeSet<String> = table.resolved.values().flatten().cloned().collect();
            for source in &self.sources {
                if let Source::Fixed(id) = source {
                    wanted.insert(id.clone());
                }
            }
            wanted.remove(&self.me);
            let gone: Vec<String> = table.others.keys().filter(|id| !wanted.contains(*id)).cloned().collect();
            for id in gone {
                if let Some(m) = table.others.remove(&id) {
                    info!(member = %id, "cluster member left the member list");
                    changed |= !m.is_self;
                }
            }
            for id in wanted {
                if let std::collections::btree_map::Entry::Vacant(slot) = table.others.entry(id) {
                    info!(member = %slot.key(), "cluster member joined the member list");
                    slot.insert(Member::new());
                    changed = true;
                }
            }
        }
        if changed {
            self.bump();
        }
    }

    /// Members behind `dns+host:port`: one per A/AAAA address.
    async fn lookup_addrs(&self, host: &str, port: u16) -> Result<BTreeSet<String>, String> {
        let addrs = tokio::time::timeout(self.dns_timeout, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| format!("timed out after {:?}", self.dns_timeout))?
            .map_err(|e| e.to_string())?;
        Ok(addrs.map(|a| a.to_string()).collect())
    }

    /// Members behind `srv+name`: one `target:port` per SRV record.
    async fn lookup_srv(&self, name: &str) -> Result<BTreeSet<String>, String> {
        let resolver = self.srv.as_ref().ok_or_else(|| "no SRV resolver".to_string())?;
        let lookup = tokio::time::timeout(self.dns_timeout, resolver.srv_lookup(format!("{name}.")))
            .await
            .map_err(|_| format!("timed out after {:?}", self.dns_timeout))?
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

/// Run `job` every `period` while the membership is alive. The first run is one period after
/// start, since `start` has just resolved everything and new members begin up.
async fn every<F, Fut>(weak: Weak<Membership>, period: Duration, job: F)
where
    F: Fn(Arc<Membership>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let period = period.max(MIN_PERIOD);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(membership) = weak.upgrade() else { return };
        job(membership).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Instant;

    use axum::extract::State;
    use axum::http::{header, HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use axum::{Json, Router};
    use hickory_resolver::proto::op::{Message, MessageType};
    use hickory_resolver::proto::rr::rdata::SRV;
    use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};

    use super::*;

    fn config(advertise: &str, members: &[&str]) -> ClusterConfig {
        ClusterConfig {
            advertise: advertise.to_string(),
            members: members.iter().map(|m| m.to_string()).collect(),
            replicas: 2,
            write_quorum: 1,
            secret: None,
            health_interval: Duration::from_millis(50),
            health_timeout: Duration::from_millis(300),
            health_fails: 2,
            health_passes: 3,
            dns_refresh: Duration::from_millis(100),
            call_timeout: Duration::from_secs(2),
            repair_interval: Duration::from_secs(60),
            repair_rate: 1 << 20,
            gc_grace: Duration::from_secs(3600),
            gc_quarantine: Duration::from_secs(60),
        }
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().expect("client")
    }

    /// A fake origin's health endpoint, switched between passing and failing by `ok`.
    struct Fake {
        ok: AtomicBool,
        id: Mutex<String>,
        secret: Option<String>,
        peer: Option<PeerIdentity>,
        hits: AtomicUsize,
        members: Mutex<Option<String>>,
    }

    async fn health(State(fake): State<Arc<Fake>>, headers: HeaderMap) -> Response {
        fake.hits.fetch_add(1, Ordering::SeqCst);
        if let Some(secret) = &fake.secret {
            let want = format!("Bearer {secret}");
            if headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(want.as_str()) {
                return StatusCode::UNAUTHORIZED.into_response();
            }
        }
        if !fake.ok.load(Ordering::SeqCst) {
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        let id = fake.id.lock().expect("id").clone();
        let members = fake.members.lock().expect("members").clone();
        Json(HealthReply {
            id,
            peer: fake.peer.clone(),
            clock: None,
            wall_millis: None,
            disk_full: false,
            members,
        })
        .into_response()
    }

    fn fake(id: &str, secret: Option<&str>) -> Arc<Fake> {
        Arc::new(Fake {
            ok: AtomicBool::new(true),
            id: Mutex::new(id.to_string()),
            secret: secret.map(str::to_string),
            peer: Some(PeerIdentity {
                peer_id: format!("peer-{id}"),
                addr: "127.0.0.1:7000".parse().expect("addr"),
            }),
            hits: AtomicUsize::new(0),
            members: Mutex::new(None),
        })
    }

    fn serve(listener: tokio::net::TcpListener, fake: Arc<Fake>) {
        let app = Router::new().route(HEALTH_PATH, get(health)).with_state(fake);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
    }

    /// A fake origin on an ephemeral loopback port; returns its id.
    async fn spawn_fake(secret: Option<&str>) -> (String, Arc<Fake>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let id = listener.local_addr().expect("addr").to_string();
        let fake = fake(&id, secret);
        serve(listener, fake.clone());
        (id, fake)
    }

    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn health_thresholds() {
        let mut h = Health::new();
        assert!(h.up);
        assert!(!h.record(false, 3, 2));
        assert!(!h.record(false, 3, 2));
        assert!(!h.record(true, 3, 2), "a pass resets the fail count");
        assert!(!h.record(false, 3, 2));
        assert!(!h.record(false, 3, 2));
        assert!(h.record(false, 3, 2));
        assert!(!h.up);
        assert!(!h.record(false, 3, 2), "already down");
        assert!(!h.record(true, 3, 2));
        assert!(h.record(true, 3, 2));
        assert!(h.up);
        let mut zero = Health::new();
        assert!(zero.record(false, 0, 0), "thresholds of zero count as one");
    }

    /// A member that names another member list (or none) disagrees until it names ours.
    #[tokio::test]
    async fn members_that_name_another_member_list_disagree() {
        let (id, fake) = spawn_fake(None).await;
        let me = "127.0.0.1:1";
        let m = Membership::start(config(me, &[me, &id]), None, client()).await.expect("start");
        eventually("first health reply", || m.peer(&id).is_some()).await;
        assert_eq!(m.disagreeing_member(), Some(id.clone()), "an origin that names no list");
        *fake.members.lock().expect("members") = Some(m.members_fingerprint());
        eventually("the same list", || m.disagreeing_member().is_none()).await;
        let other =
            Membership::start(config(me, &[me, &id, "127.0.0.1:2"]), None, client()).await.expect("start");
        assert_ne!(other.members_fingerprint(), m.members_fingerprint());
        *fake.members.lock().expect("members") = Some(other.members_fingerprint());
        eventually("another list", || m.disagreeing_member() == Some(id.clone())).await;
    }

    #[tokio::test]
    async fn member_goes_down_and_comes_back() {
        let (id, fake) = spawn_fake(None).await;
        let me = "127.0.0.1:1";
        let m = Membership::start(config(me, &[me, &id]), None, client()).await.expect("start");
        assert_eq!(m.me(), me);
        assert_eq!(m.live(), {
            let mut v = vec![id.clone(), me.to_string()];
            v.sort();
            v
        });
        assert_eq!(m.url(&id), Some(format!("http://{id}")));
        assert_eq!(m.url("10.9.9.9:1"), None);
        eventually("first health reply", || m.peer(&id).is_some()).await;
        assert_eq!(m.peer(&id).expect("peer").peer_id, format!("peer-{id}"));

        let mut changes = m.changes();
        let gen0 = *changes.borrow_and_update();
        fake.ok.store(false, Ordering::SeqCst);
        let hits = fake.hits.load(Ordering::SeqCst);
        eventually("member down", || !m.live().contains(&id)).await;
        let failed = fake.hits.load(Ordering::SeqCst) - hits;
        assert!(failed >= 2, "down only after health_fails checks, saw {failed}");
        assert_eq!(m.live(), vec![me.to_string()], "self always live");
        assert_eq!(m.live_count(), 1);
        assert!(changes.has_changed().expect("sender alive"));
        let gen1 = *changes.borrow_and_update();
        assert!(gen1 > gen0);
        let info = m.members();
        assert_eq!(info.len(), 2);
        assert!(info.iter().any(|i| i.id == id && !i.up));
        assert!(info.iter().any(|i| i.id == me && i.up));

        fake.ok.store(true, Ordering::SeqCst);
        let hits = fake.hits.load(Ordering::SeqCst);
        eventually("member up", || m.live().contains(&id)).await;
        let passed = fake.hits.load(Ordering::SeqCst) - hits;
        assert!(passed >= 3, "up only after health_passes checks, saw {passed}");
        assert!(*changes.borrow_and_update() > gen1);
        assert_eq!(m.live_count(), 2);
    }

    #[tokio::test]
    async fn mark_down_counts_as_a_failed_check() {
        let (id, fake) = spawn_fake(None).await;
        let me = "127.0.0.1:1";
        let mut cfg = config(me, &[me, &id]);
        cfg.health_interval = Duration::from_secs(3600);
        let m = Membership::start(cfg, None, client()).await.expect("start");
        let mut changes = m.changes();
        m.mark_down(&id);
        assert!(m.live().contains(&id), "one failure is not enough");
        m.mark_down(&id);
        assert_eq!(m.live(), vec![me.to_string()]);
        assert!(changes.has_changed().expect("alive"));
        changes.borrow_and_update();
        m.mark_down(me);
        m.mark_down("unknown:1");
        assert!(!changes.has_changed().expect("alive"));
        assert_eq!(fake.hits.load(Ordering::SeqCst), 0, "no check ran yet");
    }

    #[tokio::test]
    async fn wrong_secret_fails_the_check() {
        let (good_id, _good) = spawn_fake(Some("s3cret")).await;
        let (bad_id, bad) = spawn_fake(Some("other")).await;
        let me = "127.0.0.1:1";
        let mut cfg = config(me, &[&good_id, &bad_id]);
        cfg.secret = Some("s3cret".to_string());
        let m = Membership::start(cfg, None, client()).await.expect("start");
        eventually("wrong-secret member down", || !m.live().contains(&bad_id)).await;
        assert!(bad.hits.load(Ordering::SeqCst) >= 2);
        assert!(m.live().contains(&good_id));
        assert!(m.live().contains(&me.to_string()), "self is a member even when not listed");

        let unauthenticated =
            Membership::start(config(me, &[&good_id]), None, client()).await.expect("start");
        eventually("no-secret member down", || !unauthenticated.live().contains(&good_id)).await;
    }

    #[tokio::test]
    async fn ipv6_loopback_member() {
        let listener = match tokio::net::TcpListener::bind("[::1]:0").await {
            Ok(l) => l,
            Err(e) => {
                println!("skipping: cannot bind [::1]: {e}");
                return;
            }
        };
        let port = listener.local_addr().expect("addr").port();
        let id = format!("[::1]:{port}");
        let fake = fake(&id, None);
        serve(listener, fake.clone());
        let me = "127.0.0.1:1";
        let m = Membership::start(config(me, &[me, &format!("[0::1]:{port}")]), None, client())
            .await
            .expect("start");
        assert_eq!(m.url(&id), Some(format!("http://[::1]:{port}")));
        eventually("ipv6 health reply", || m.peer(&id).is_some()).await;
        fake.ok.store(false, Ordering::SeqCst);
        eventually("ipv6 member down", || !m.live().contains(&id)).await;
        fake.ok.store(true, Ordering::SeqCst);
        eventually("ipv6 member up", || m.live().contains(&id)).await;
    }

    #[tokio::test]
    async fn dns_name_resolves_to_loopback_members() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let v4 = format!("127.0.0.1:{port}");
        serve(listener, fake(&v4, None));
        let me = "origin-0.test:5000";
        let m = Membership::start(config(me, &[&format!("dns+localhost:{port}")]), None, client())
            .await
            .expect("start");
        let ids: Vec<String> = m.members().into_iter().map(|i| i.id).collect();
        assert!(ids.contains(&v4), "{ids:?}");
        let v6 = format!("[::1]:{port}");
        for id in &ids {
            assert!(*id == v4 || *id == v6 || id == me, "unexpected member {id}");
        }
        assert_eq!(m.me(), me);
        assert!(m.live().contains(&me.to_string()));
        eventually("v4 member checked", || m.peer(&v4).is_some()).await;
        assert!(m.live().contains(&v4));
    }

    #[tokio::test]
    async fn self_under_another_name_is_dropped() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let me = "origin-0.test:5000";
        let fake = fake(me, None);
        serve(listener, fake.clone());
        let v4 = format!("127.0.0.1:{port}");
        let m = Membership::start(config(me, &[&format!("dns+localhost:{port}")]), None, client())
            .await
            .expect("start");
        let changes = m.changes();
        eventually("alias dropped", || !m.live().contains(&v4)).await;
        assert!(changes.has_changed().expect("alive"));
        assert!(m.members().iter().all(|i| i.id != v4));
        let hits = fake.hits.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(fake.hits.load(Ordering::SeqCst), hits, "this origin is not checked");
    }

    #[tokio::test]
    async fn tasks_end_when_membership_is_dropped() {
        let (id, fake) = spawn_fake(None).await;
        let m = Membership::start(config("127.0.0.1:1", &[&id]), None, client()).await.expect("start");
        eventually("checked", || fake.hits.load(Ordering::SeqCst) > 0).await;
        let changes = m.changes();
        drop(m);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let hits = fake.hits.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(fake.hits.load(Ordering::SeqCst), hits, "no checks after drop");
        assert!(changes.has_changed().is_err(), "the watch sender is gone");
    }

    /// A one-zone DNS server on UDP loopback answering SRV queries with `targets`.
    async fn spawn_dns(targets: Arc<Mutex<Vec<(String, u16)>>>) -> SocketAddr {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
        let addr = socket.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else { return };
                let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
                let mut reply = Message::new();
                reply
                    .set_id(query.id())
                    .set_message_type(MessageType::Response)
                    .set_op_code(query.op_code())
                    .set_recursion_desired(query.recursion_desired())
                    .set_recursion_available(true)
                    .set_authoritative(true);
                for q in query.queries() {
                    reply.add_query(q.clone());
                    if q.query_type() != RecordType::SRV {
                        continue;
                    }
                    for (target, port) in targets.lock().expect("targets").iter() {
                        let target = Name::from_ascii(target).expect("name");
                        let srv = SRV::new(10, 10, *port, target);
                        reply.add_answer(Record::from_rdata(q.name().clone(), 0, RData::SRV(srv)));
                    }
                }
                let Ok(bytes) = reply.to_vec() else { continue };
                let _ = socket.send_to(&bytes, from).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn srv_records_become_members_and_leave_on_refresh() {
        let targets = Arc::new(Mutex::new(vec![
            ("origin-0.origin.test.".to_string(), 5000),
            ("Origin-1.origin.test.".to_string(), 5001),
        ]));
        let ns = spawn_dns(targets.clone()).await;
        let me = "origin-0.origin.test:5000";
        let mut cfg = config(me, &["srv+_shoal._tcp.origin.test"]);
        cfg.health_interval = Duration::from_secs(3600);
        let m = Membership::start_with_nameserver(cfg, None, client(), Some(ns)).await.expect("start");
        let ids: Vec<String> = m.members().into_iter().map(|i| i.id).collect();
        assert_eq!(ids, vec![me.to_string(), "origin-1.origin.test:5001".to_string()]);
        assert_eq!(m.live(), ids);
        let local =
            crate::cluster::remote::RemoteNode::new(me.into(), url_of(me), None, Duration::from_secs(1))
                .expect("client");
        use crate::cluster::topology::{MemberTopology, Topology};
        let topology = MemberTopology::new(m.clone(), Arc::new(local), None, Duration::from_secs(1));
        assert!(topology.node("origin-1.origin.test:5001").is_some());
        assert_eq!(topology.clients(), vec!["origin-1.origin.test:5001".to_string()]);

        let mut changes = m.changes();
        changes.borrow_and_update();
        targets.lock().expect("targets").push(("origin-2.origin.test".to_string(), 5000));
        targets.lock().expect("targets").retain(|(t, _)| !t.starts_with("Origin-1"));
        eventually("refresh", || m.live().contains(&"origin-2.origin.test:5000".to_string())).await;
        assert!(changes.has_changed().expect("alive"));
        assert_eq!(m.live(), vec![me.to_string(), "origin-2.origin.test:5000".to_string()]);
        assert_eq!(m.url("origin-1.origin.test:5001"), None);
        // The departed member's client goes with it.
        assert!(topology.node("origin-1.origin.test:5001").is_none());
        assert!(topology.node("origin-2.origin.test:5000").is_some());
        assert_eq!(topology.clients(), vec!["origin-2.origin.test:5000".to_string()]);
    }
}
