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
use hickory_resolver::ResolveError;
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
    /// The newest member list of a completed garbage collection it knows (see
    /// `cluster::collected`). Absent from origins before session 47, and before any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collected: Option<crate::cluster::collected::LastCollection>,
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
    /// It answered with the id of another entry of this table: the same origin under a second
    /// address (the A and AAAA records of one `dns+` name), so not a member of its own; every
    /// origin then names the same members. Decided again at each reply.
    alias: bool,
    /// It answered with an id other than the one we know it by (warned once).
    warned_id: bool,
    /// The id its last successful reply gave (`None` until it answers once).
    answered: Option<String>,
    /// It is in the member list only through a DNS source (`dns+`, `srv+`), whose addresses
    /// may be a second address of another member: until it answers once it takes no writes
    /// (see [`Membership::accepts_writes`]).
    named_by_dns: bool,
    /// Its first check failed and it is an address of this host with this origin's port
    /// ([`Membership::is_own_address`]): most likely this origin, whose listener was not up
    /// yet. Not a member until a reply decides (checked as any member).
    maybe_self: bool,
}

impl Member {
    fn new() -> Member {
        Member {
            health: Health::new(),
            peer: None,
            disk_full: false,
            members: None,
            is_self: false,
            alias: false,
            warned_id: false,
            maybe_self: false,
            answered: None,
            named_by_dns: false,
        }
    }

    fn live(&self) -> bool {
        self.health.up && self.is_member()
    }

    /// A member of its own, up or down: not this origin, nor another's second address, nor
    /// (until it answers) maybe this origin.
    fn is_member(&self) -> bool {
        !self.is_self && !self.alias && !self.maybe_self
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
    http: reqwest::Client,
    /// Answers for the `dns+` and `srv+` entries.
    dns: dns::Lookups,
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
        let dns = dns::Lookups::new(&sources, nameserver, config.call_timeout)?;
        let (generation, _) = watch::channel(0);
        let membership = Arc::new(Membership {
            me,
            self_peer,
            secret: config.secret.clone(),
            sources,
            health_timeout: config.health_timeout,
            health_fails: config.health_fails,
            health_passes: config.health_passes,
            http,
            dns,
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
    /// full, as far as its last health reply said, and it has answered once if a DNS name
    /// gave it. Before its first reply such an entry may be a second address of another
    /// member (the A and AAAA records of a pod that is not listening yet): counted up, both
    /// addresses were a write's two owners once the origin listened, and a write was
    /// acknowledged on one machine until the next round of checks told them apart.
    pub fn accepts_writes(&self, id: &str) -> bool {
        if id == self.me {
            return !self.self_disk_full();
        }
        !self.lock().others.get(id).is_some_and(|m| m.disk_full || (m.named_by_dns && m.answered.is_none()))
    }

    /// Whether member `id` takes a repository's records: every member but a DNS entry that
    /// has not answered yet (see [`accepts_writes`](Self::accepts_writes)), whatever its disk.
    pub fn takes_records(&self, id: &str) -> bool {
        id == self.me || !self.lock().others.get(id).is_some_and(|m| m.named_by_dns && m.answered.is_none())
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
            .filter(|(_, m)| m.is_member())
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

    /// Every member that has answered, as it names itself (its last health reply's id), this
    /// origin included, sorted (see
    /// [`Topology::identities`](crate::cluster::topology::Topology::identities)). One that has
    /// not answered yet is left out: a `dns+` entry's address is not the name it will answer
    /// with, and remembered it would count as an origin that left.
    pub fn identities(&self) -> Vec<String> {
        let table = self.lock();
        let mut ids: Vec<String> =
            table.others.values().filter(|m| m.is_member()).filter_map(|m| m.answered.clone()).collect();
        ids.push(self.me.clone());
        ids.sort();
        ids.dedup();
        ids
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

    /// Whether `id` is a member of the cluster, up or down (this origin included), as
    /// [`Membership::members`] lists them.
    pub fn is_member(&self, id: &str) -> bool {
        id == self.me || self.lock().others.get(id).is_some_and(Member::is_member)
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

    /// Check each of `ids`, a few at a time.
    async fn check_each(&self, ids: Vec<String>) -> Vec<(String, Result<HealthReply, String>)> {
        stream::iter(ids)
            .map(|id| async move {
                let result = self.check(&id).await;
                (id, result)
            })
            .buffer_unordered(MAX_CONCURRENT_CHECKS)
            .collect()
            .await
    }

    /// One round of health checks: every other member, concurrently.
    async fn check_all(&self) {
        let targets: Vec<String> =
            self.lock().others.iter().filter(|(_, m)| !m.is_self).map(|(id, _)| id.clone()).collect();
        let results = self.check_each(targets).await;
        let mut changed = false;
        {
            let mut table = self.lock();
            for (id, result) in results {
                let alias = matches!(&result, Ok(r) if r.id != id && table.others.contains_key(&r.id));
                if let Some(member) = table.others.get_mut(&id) {
                    changed |= self.apply(&id, member, result, alias);
                }
            }
        }
        if changed {
            self.bump();
        }
    }

    /// Count one check's result against `member` (`alias`: it answered as another entry of
    /// the table); `true` if it joined or left the live set, or the member list.
    fn apply(&self, id: &str, member: &mut Member, result: Result<HealthReply, String>, alias: bool) -> bool {
        let (was_live, was_alias) = (member.live(), member.alias);
        match result {
            Ok(reply) => {
                if let Some(hook) = self.on_reply.get() {
                    hook(id, &reply);
                }
                if reply.id == self.me {
                    info!(member = id, "cluster member is this origin under another name; ignoring it");
                    member.is_self = true;
                } else if alias {
                    if !member.alias {
                        info!(member = id, answered = %reply.id, "cluster member is another member under a second address; counting it once");
                    }
                } else if reply.id != id && !member.warned_id {
                    warn!(member = id, answered = %reply.id, "cluster member answers with another id");
                    member.warned_id = true;
                }
                member.alias = alias && reply.id != self.me;
                member.maybe_self = false;
                member.answered = Some(reply.id.clone());
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
        was_live != member.live() || was_alias != member.alias
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

mod dns;
mod joining;
#[cfg(test)]
mod tests;
