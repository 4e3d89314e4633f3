//! `shoal origin`: the registry CI pushes to: durable local storage, joined with the other
//! origins into one registry.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::IntGauge;
use shoal_origin::cluster::collected::{self, Collections};
use shoal_origin::cluster::coordinator::{Coordinator, Replication};
use shoal_origin::cluster::gc::{GcError, GcSettings};
use shoal_origin::cluster::internal_api;
use shoal_origin::cluster::local::LocalNode;
use shoal_origin::cluster::membership::{HealthReply, Membership, PeerIdentity};
use shoal_origin::cluster::metrics::ClusterMetrics;
use shoal_origin::cluster::record::VersionClock;
use shoal_origin::cluster::repair::Repairer;
use shoal_origin::cluster::store::ClusterStore;
use shoal_origin::cluster::topology::MemberTopology;
use shoal_origin::pullthrough::{self, Peers, PullThrough};
use shoal_origin::{OriginStore, StoreConfig};
use shoal_p2p::server::PeerServer;
use shoal_p2p::tracker_client::{Locations, Seeder};
use shoal_p2p::{PeerId, SwarmMetrics};
use shoal_registry::Digest;
use shoal_upstream::{Upstream, UpstreamMetrics};

use crate::config::OriginConfig;
use crate::http::{with_basics, BoundServer, HttpMetrics};

/// Cluster secrets shorter than this are warned about at start: they can be guessed online
/// (nothing counts failed tries); the chart makes 48-character ones.
const MIN_SECRET_LEN: usize = 32;

/// How often the storage gauges are refreshed.
const GAUGE_PERIOD: Duration = Duration::from_secs(2);

/// Flags of `shoal origin`; each overrides the same field of the config file.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct OriginArgs {
    /// Address for the registry API, /healthz and /metrics [default: 127.0.0.1:5000]
    #[arg(long, env = "SHOAL_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,
    /// Address for peer connections (seeding into the swarm)
    #[arg(long, env = "SHOAL_PEER_LISTEN")]
    pub peer_listen: Option<std::net::SocketAddr>,
    /// Peer address announced to others when --peer-listen is 0.0.0.0 or [::] (ip:port; an
    /// IPv6 address with or without brackets)
    #[arg(long, env = "SHOAL_PEER_ADVERTISE", value_parser = crate::peer_addr::parse_advertise)]
    pub peer_advertise: Option<std::net::SocketAddr>,
    /// Directory for blobs, uploads and metadata [default: shoal-data/origin]
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Every origin of the cluster, this one included: host:port, dns+name:port or
    /// srv+_service._tcp.name, comma separated
    #[arg(long, env = "SHOAL_CLUSTER", value_delimiter = ',')]
    pub cluster: Option<Vec<String>>,
    /// Copies of every blob and repository [default: 2]
    #[arg(long, env = "SHOAL_REPLICAS")]
    pub replicas: Option<usize>,
    /// This origin's host:port as the other origins reach it [default: --internal-listen, else --listen]
    #[arg(long, env = "SHOAL_ADVERTISE")]
    pub advertise: Option<String>,
    /// A listener for the internal and admin APIs only the cluster's processes may call
    /// (mutual TLS with node certificates); members are then listed by this address
    #[arg(long, env = "SHOAL_INTERNAL_LISTEN")]
    pub internal_listen: Option<std::net::SocketAddr>,
    /// Shared secret of the internal and admin APIs
    #[arg(long = "cluster-secret", env = "SHOAL_CLUSTER_SECRET", hide_env_values = true, hide = true)]
    pub cluster_secret: Option<String>,
    /// Pull through an upstream registry: REGISTRY=URL (e.g.
    /// docker.io=https://registry-1.docker.io), repeatable; added to the config's [[upstream]]
    #[arg(long, env = "SHOAL_UPSTREAM", value_delimiter = ',')]
    pub upstream: Vec<String>,
    /// TOML config file (see docs/configuration.md)
    #[arg(long, env = "SHOAL_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

/// `REGISTRY=URL` as an `[[upstream]]` section with every other setting at its default.
pub fn upstream_flag(flag: &str) -> anyhow::Result<shoal_upstream::UpstreamConfig> {
    let (registry, url) =
        flag.split_once('=').ok_or_else(|| anyhow::anyhow!("--upstream {flag:?}: expected REGISTRY=URL"))?;
    let mut section = toml::Table::new();
    section.insert("registry".into(), registry.trim().into());
    section.insert("url".into(), url.trim().into());
    let config: shoal_upstream::UpstreamConfig =
        toml::Value::Table(section).try_into().with_context(|| format!("--upstream {flag:?}"))?;
    config.validate().with_context(|| format!("--upstream {flag:?}"))?;
    Ok(config)
}

impl OriginArgs {
    /// The effective config: file, then flags and environment on top.
    pub fn resolve(&self) -> anyhow::Result<OriginConfig> {
        let mut config: OriginConfig = crate::config::load_toml(self.config.as_deref())?;
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(peer) = self.peer_listen {
            config.peer_listen = Some(peer);
        }
        if let Some(peer) = self.peer_advertise {
            config.peer_advertise = Some(peer);
        }
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(members) = &self.cluster {
            config.cluster.members =
                members.iter().map(|m| m.trim().to_string()).filter(|m| !m.is_empty()).collect();
        }
        if let Some(r) = self.replicas {
            config.cluster.replicas = r;
        }
        if let Some(a) = &self.advertise {
            config.cluster.advertise = Some(a.clone());
        }
        if let Some(a) = self.internal_listen {
            config.cluster.internal_listen = Some(a);
        }
        if let Some(secret) = &self.cluster_secret {
            config.cluster.secret = Some(secret.clone());
        }
        config.tls = config.tls.overridden_by(&self.tls.settings());
        for flag in &self.upstream {
            config.upstream.push(upstream_flag(flag)?);
        }
        if let Some(every) = config.cluster.gc_interval {
            crate::config::at_least("cluster.gc_interval", every, crate::config::MIN_GC_INTERVAL)?;
        }
        Ok(config)
    }
}

/// Open the origin's storage, join the cluster, start seeding, and bind its HTTP server.
pub async fn bind(config: OriginConfig) -> anyhow::Result<BoundServer> {
    config.check()?;
    config.limits.apply();
    let cluster = config.cluster()?;
    let store = OriginStore::open(StoreConfig {
        data_dir: config.data_dir.clone(),
        upload_idle_timeout: config.upload_idle_timeout,
        max_upload_sessions: config.limits.max_upload_sessions,
    })
    .await
    .with_context(|| format!("opening data directory {}", config.data_dir.display()))?;
    let metrics = HttpMetrics::new("origin")?;
    let seeder = match config.peer_listen {
        Some(addr) => Some(start_seeding(&store, addr, &config, &metrics).await?),
        None => None,
    };
    let self_peer = seeder.map(|s| PeerIdentity { peer_id: s.peer_id.to_string(), addr: s.advertise });
    let http = shoal_tls::http_client()
        .timeout(cluster.health_timeout)
        .connect_timeout(cluster.health_timeout)
        .build()?;
    let membership = Membership::start(cluster.clone(), self_peer.clone(), http).await?;
    let me = membership.me().to_string();
    let local = LocalNode::new(me.clone(), store.clone());
    let topology =
        MemberTopology::new(membership.clone(), local.clone(), cluster.secret.clone(), cluster.call_timeout);
    let collections = {
        let path = config.data_dir.join(collected::FILE_NAME);
        Arc::new(tokio::task::spawn_blocking(move || Collections::load(path)).await?)
    };
    let coordinator = Arc::new(Coordinator {
        topology: Arc::new(topology),
        local: local.clone(),
        clock: VersionClock::new(me.clone()),
        replication: Replication { replicas: cluster.replicas, write_quorum: cluster.write_quorum },
        metrics: ClusterMetrics::new(&metrics.registry)?,
        gc_lock: Default::default(),
        skews: Default::default(),
        read_repairs: Default::default(),
        collections,
    });
    let clock_hook = shoal_origin::cluster::clock_sync::reply_hook(Arc::downgrade(&coordinator));
    let collections = coordinator.collections.clone();
    membership.on_reply(Box::new(move |member, reply| {
        clock_hook(member, reply);
        if let Some(seen) = &reply.collected {
            collections.offer(seen);
        }
    }));
    // Not ready, and no new copies, while the data disk is nearly full.
    spawn_disk_watch(membership.clone(), config.data_dir.clone());
    let disk_full = {
        let m = membership.clone();
        Box::new(move || m.self_disk_full().then(|| "data disk nearly full".to_string()))
    };
    let readiness = crate::readiness::Readiness::new(vec![disk_full]);
    spawn_gauges(&store, &membership, &coordinator, &metrics)?;
    let repair = Repairer::start(coordinator.clone(), cluster.repair_rate, cluster.repair_interval);
    spawn_member_watch(coordinator.clone());
    if let Some(every) = config.cluster.gc_interval {
        spawn_periodic_gc(coordinator.clone(), gc_settings(&cluster), every);
    }
    let authority = Arc::new(
        shoal_registry::auth::authority::Authority::new(
            config.auth.clone(),
            &config.data_dir,
            &config.cluster_secrets(),
        )
        .context("[auth]")?,
    );
    if authority.enabled() {
        tracing::info!(
            tokens = config.auth.tokens,
            rules = config.auth.rules.len(),
            users = config.auth.users.len(),
            "access control on"
        );
    }
    // Every origin of a cluster signs with its own key unless they share one: each follows
    // the others' (a `dns+` member is a cluster too, as in the config's checks).
    if config.auth.tokens && !shoal_origin::cluster::lone(&cluster.members) {
        authority.follow_peers(peer_keys(membership.clone(), cluster.call_timeout)?, PEER_KEYS_REFRESH);
    }
    let registry =
        Arc::new(pull_through(&config, &coordinator, &membership, &metrics, cluster.call_timeout)?);
    let forwarder = crate::origin_forward::Forwarder::new(
        membership.clone(),
        cluster.call_timeout,
        config.limits.body_idle_timeout,
    )?;
    let gate = shoal_registry::auth::AuthGate(authority.clone());
    let credentials =
        axum::middleware::from_fn_with_state(authority.enabled(), pullthrough::routes::pass_credentials);
    let registry_list = registry.clone();
    let node_api = seeding_routes(coordinator.clone(), membership.clone(), seeder)
        .merge(pullthrough::routes::routes(registry.clone()).layer(credentials.clone()));
    let mut api = shoal_registry::router(registry, config.api(gate))
        .layer(credentials)
        .layer(axum::middleware::from_fn_with_state(forwarder, crate::origin_forward::forward_uploads))
        .layer(axum::middleware::from_fn_with_state(
            registry_list.clone(),
            pullthrough::routes::explicit_names,
        ))
        .merge(authority.guard_node_api(node_api))
        .merge(pullthrough::routes::public_routes(registry_list.clone()))
        .merge(authority.clone().routes());
    // What only the cluster's processes call: the internal and admin APIs.
    let mut cluster_only = None;
    if config.cluster_secrets().iter().any(|s| s.len() < MIN_SECRET_LEN) {
        tracing::warn!(
            "a cluster secret is shorter than {MIN_SECRET_LEN} bytes: it guards the internal and \
             admin APIs (blob deletes, records, GC), which anyone who reaches the listener may \
             try secrets against; use a random one (e.g. `openssl rand -hex 32`)"
        );
    }
    match config.guards() {
        Some((internal, admin)) => {
            let health = {
                let (me, peer, c) = (me.clone(), self_peer.clone(), Arc::downgrade(&coordinator));
                let m = membership.clone();
                Arc::new(move || HealthReply {
                    id: me.clone(),
                    peer: peer.clone(),
                    clock: c.upgrade().map(|c| c.clock.reading()),
                    wall_millis: Some(shoal_origin::cluster::record::now_millis()),
                    disk_full: m.self_disk_full(),
                    members: Some(m.members_fingerprint()),
                    collected: c.upgrade().and_then(|c| c.collections.last()),
                })
            };
            cluster_only = Some(internal_api::router(local.clone(), internal, health).merge(
                crate::origin_admin::routes(crate::origin_admin::Admin {
                    coordinator: coordinator.clone(),
                    membership: membership.clone(),
                    repair,
                    guard: admin,
                    secret: cluster.secret.clone(),
                    gc: gc_settings(&cluster),
                    // A collection waits out the quarantine: no overall timeout, only connect.
                    http: shoal_tls::http_client().connect_timeout(cluster.call_timeout).build()?,
                }),
            ));
        }
        None => tracing::info!(
            "no cluster secret or node certificates: internal and admin APIs disabled (a lone origin)"
        ),
    }
    let internal = match (config.cluster.internal_listen, cluster_only.clone()) {
        (Some(addr), Some(routes)) => {
            // The public API too: other origins forward clients' requests here.
            let app = with_basics(api.clone().merge(routes), metrics.clone(), readiness.clone());
            // Mutual TLS with a cluster CA; with a certificate but no cluster CA, plain server
            // TLS (the other origins reach members at https:// whenever a certificate is set;
            // plain HTTP here failed every health check, and no member was ever up).
            let tls = shoal_tls::current();
            let mutual_acceptor = tls.mutual_acceptor().context("internal listener TLS")?;
            let mutual = mutual_acceptor.is_some();
            let acceptor = mutual_acceptor.or_else(|| tls.acceptor());
            let server = BoundServer::bind(addr, app, config.limits.http(), readiness.clone())
                .await?
                .with_tls(acceptor);
            tracing::info!(internal_listen = %server.local_addr()?, mutual_tls = mutual, "internal listener");
            Some(server)
        }
        (Some(_), None) => {
            anyhow::bail!("cluster.internal_listen needs node certificates or a cluster secret")
        }
        (None, routes) => {
            if let Some(routes) = routes {
                api = api.merge(routes);
            }
            None
        }
    };
    let mut server = BoundServer::bind(
        config.listen,
        with_basics(api, metrics, readiness.clone()),
        config.limits.http(),
        readiness,
    )
    .await?;
    if let Some(internal) = internal {
        // The internal listener stops after the public one has drained: requests that
        // other origins forward keep arriving until then.
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(internal.serve(async move {
            let _ = stop_rx.await;
        }));
        server = server.after_stop(async move {
            let _ = stop_tx.send(());
            let _ = task.await;
        });
    }
    tracing::info!(
        listen = %server.local_addr()?,
        id = %me,
        members = cluster.members.len(),
        replicas = cluster.replicas,
        data_dir = %config.data_dir.display(),
        "origin ready"
    );
    Ok(server)
}

/// The registry storage: the cluster's, pulling through the configured upstreams.
fn pull_through(
    config: &OriginConfig,
    coordinator: &Arc<Coordinator>,
    membership: &Arc<Membership>,
    metrics: &HttpMetrics,
    call_timeout: Duration,
) -> anyhow::Result<PullThrough> {
    let upstream_metrics = UpstreamMetrics::new(&metrics.registry)?;
    let mut upstreams = Vec::new();
    for u in &config.upstream {
        // Reads the password and CA files and the system's roots.
        let up = tokio::task::block_in_place(|| Upstream::new(u.clone(), upstream_metrics.clone()))
            .with_context(|| format!("[[upstream]] registry = {:?}", u.registry))?;
        tracing::info!(registry = %u.registry, url = %u.url, "pulling through upstream");
        upstreams.push(Arc::new(up));
    }
    let peers = Peers {
        membership: membership.clone(),
        http: shoal_tls::http_client().connect_timeout(call_timeout).build()?,
        secret: config.cluster.secret.clone().filter(|s| !s.is_empty()),
    };
    Ok(PullThrough::new(ClusterStore::new(coordinator.clone()), upstreams, Some(peers), upstream_metrics))
}

/// How often an origin fetches the other origins' token keys.
const PEER_KEYS_REFRESH: Duration = Duration::from_secs(30);

/// Fetch the public keys every other live origin publishes, so a token from any of them is
/// accepted here (a cluster whose origins generated their own keys).
fn peer_keys(
    membership: Arc<Membership>,
    timeout: Duration,
) -> anyhow::Result<shoal_registry::auth::authority::FetchKeys> {
    let http = shoal_tls::http_client().timeout(timeout).connect_timeout(timeout).build()?;
    Ok(Arc::new(move || {
        let (membership, http) = (membership.clone(), http.clone());
        Box::pin(async move {
            let me = membership.me().to_string();
            // Each member at its cluster URL (https when the cluster serves TLS, so the keys
            // come from an origin whose certificate the cluster CA signed).
            let urls =
                membership.live().into_iter().filter(|id| *id != me).filter_map(|id| membership.url(&id));
            let asks = urls.map(|url| {
                let request = http.get(format!("{url}{}", shoal_registry::auth::authority::PUBLISHED_PATH));
                async move {
                    let reply = request.send().await.ok()?;
                    if !reply.status().is_success() {
                        return None;
                    }
                    reply.json::<shoal_registry::auth::remote::Published>().await.ok().map(|p| p.keys)
                }
            });
            let answers: Vec<_> = futures_util::future::join_all(asks).await.into_iter().flatten().collect();
            (!answers.is_empty()).then(|| answers.into_iter().flatten().collect())
        })
    }))
}

/// Refresh the storage and membership gauges; ends when the store closes.
fn spawn_gauges(
    store: &OriginStore,
    membership: &Arc<Membership>,
    coordinator: &Arc<Coordinator>,
    metrics: &HttpMetrics,
) -> anyhow::Result<()> {
    let stored = IntGauge::new("shoal_origin_storage_bytes", "Bytes of blob content stored")?;
    metrics.registry.register(Box::new(stored.clone()))?;
    let store = store.downgrade();
    let membership = Arc::downgrade(membership);
    let live = coordinator.metrics.live_members.clone();
    tokio::spawn(async move {
        loop {
            let (Some(store), Some(membership)) = (store.upgrade(), membership.upgrade()) else { return };
            stored.set(i64::try_from(store.stored_bytes()).unwrap_or(i64::MAX));
            live.set(i64::try_from(membership.live_count()).unwrap_or(i64::MAX));
            drop((store, membership));
            tokio::time::sleep(GAUGE_PERIOD).await;
        }
    });
    Ok(())
}

/// How often an origin checks whether its data disk is nearly full (it then tells the others
/// in its health replies, and placement skips it).
const DISK_WATCH_PERIOD: Duration = Duration::from_secs(5);

fn spawn_disk_watch(membership: Arc<Membership>, data_dir: PathBuf) {
    tokio::spawn(async move {
        loop {
            let dir = data_dir.clone();
            let share = crate::readiness::DISK_NEARLY_FULL_SHARE;
            let full = tokio::task::spawn_blocking(move || crate::readiness::disk_nearly_full(&dir, share))
                .await
                .unwrap_or_else(|e| Some(format!("disk check failed: {e}")));
            if full.is_some() != membership.self_disk_full() {
                tracing::warn!(reason = ?full, "data disk nearly-full state changed");
                membership.set_self_disk_full(full.is_some());
            }
            tokio::time::sleep(DISK_WATCH_PERIOD).await;
        }
    });
}

fn gc_settings(cluster: &shoal_origin::cluster::ClusterConfig) -> GcSettings {
    GcSettings { grace: cluster.gc_grace, quarantine: cluster.gc_quarantine }
}

/// How often the members are added to the last collection's member list (see
/// `cluster::collected`): one that joins and leaves again within it goes unremembered.
const MEMBER_WATCH_PERIOD: Duration = Duration::from_secs(5);

/// Add the members there are to the last collection's member list, every
/// [`MEMBER_WATCH_PERIOD`], so a collection counts origins that joined since and left again.
fn spawn_member_watch(coordinator: Arc<Coordinator>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(MEMBER_WATCH_PERIOD).await;
            coordinator.collections.observe(&coordinator.topology.identities());
        }
    });
}

/// Collect garbage every `every` (every origin runs the timer; only the leader collects); a
/// failed run is logged and retried next time.
fn spawn_periodic_gc(coordinator: Arc<Coordinator>, settings: GcSettings, every: Duration) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            match shoal_origin::cluster::gc::collect(&coordinator, settings).await {
                Ok(_) => {}
                Err(GcError::NotLeader { leader }) => {
                    tracing::debug!(%leader, "periodic garbage collection runs on another origin")
                }
                Err(e) => tracing::warn!(error = %e, "periodic garbage collection did not run"),
            }
        }
    });
}

/// The origin's identity in the swarm.
#[derive(Clone, Copy)]
struct SeederIdentity {
    peer_id: PeerId,
    advertise: SocketAddr,
}

/// Bind the peer listener and serve every blob this origin holds to the swarm.
async fn start_seeding(
    store: &OriginStore,
    listen: SocketAddr,
    config: &OriginConfig,
    metrics: &HttpMetrics,
) -> anyhow::Result<SeederIdentity> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding peer listener {listen}"))?;
    let bound = listener.local_addr()?;
    let advertise = crate::peer_addr::advertised(bound, config.peer_advertise)?;
    let peer_id = PeerId::random();
    let server = Arc::new(PeerServer {
        peer_id,
        lookup: Arc::new(store.clone()),
        egress: Arc::new(shoal_p2p::limiter::RateLimiter::unlimited()),
        metrics: SwarmMetrics::new("origin", &metrics.registry)?,
        max_connections: 1024,
        max_connections_per_address: config.limits.max_peer_connections_per_address,
        // Super-seeding already spreads an origin's sends; a cap would only refuse agents.
        max_peers_per_blob: None,
        upload_slots: (config.peer_upload_slots > 0)
            .then(|| Arc::new(tokio::sync::Semaphore::new(config.peer_upload_slots))),
        // Super-seeding sends each piece about once already.
        piece_sends: None,
        // Send each piece to one agent and let the swarm spread it.
        super_seed: Some(shoal_p2p::super_seed::SuperSeed::new(Duration::from_secs(3))),
        // Its uplink is many hosts' links: paced, it does not burst into their queues.
        pace: true,
    });
    tokio::spawn(server.serve(listener));
    tracing::info!(peer_listen = %bound, %advertise, %peer_id, "seeding blobs to the swarm");
    Ok(SeederIdentity { peer_id, advertise })
}

#[derive(Clone)]
struct SeedingState {
    coordinator: Arc<Coordinator>,
    membership: Arc<Membership>,
    seeder: Option<SeederIdentity>,
}

/// `/shoal/v1/blobs/<digest>/{metainfo,locations}`: what trackers and agents ask an origin.
fn seeding_routes(
    coordinator: Arc<Coordinator>,
    membership: Arc<Membership>,
    seeder: Option<SeederIdentity>,
) -> axum::Router {
    axum::Router::new()
        .route("/shoal/v1/blobs/{digest}/metainfo", get(metainfo))
        .route("/shoal/v1/blobs/{digest}/locations", get(locations))
        .with_state(SeedingState { coordinator, membership, seeder })
}

/// The metainfo from this origin's copy, or from an owner's.
async fn metainfo(State(s): State<SeedingState>, Path(digest): Path<String>) -> Response {
    let Ok(digest) = digest.parse::<Digest>() else {
        return (StatusCode::BAD_REQUEST, "invalid digest").into_response();
    };
    let c = &s.coordinator;
    let mut last_error = None;
    let mut candidates = vec![c.me().to_string()];
    candidates.extend(c.ranked(&digest.to_string()).into_iter().filter(|id| id != c.me()));
    for id in candidates {
        let Some(node) = c.node(&id) else { continue };
        match node.metainfo(&digest).await {
            Ok(Some(json)) => {
                return ([(axum::http::header::CONTENT_TYPE, "application/json")], json).into_response()
            }
            Ok(None) => {}
            Err(e) => last_error = Some(e.to_string()),
        }
    }
    match last_error {
        Some(e) => (StatusCode::SERVICE_UNAVAILABLE, e).into_response(),
        None => (StatusCode::NOT_FOUND, "blob unknown").into_response(),
    }
}

/// The peer listeners of the live owners of a blob (and of this origin if it holds a copy
/// outside quarantine): the seeders a tracker hands out.
async fn locations(State(s): State<SeedingState>, Path(digest): Path<String>) -> Response {
    let Ok(digest) = digest.parse::<Digest>() else {
        return (StatusCode::BAD_REQUEST, "invalid digest").into_response();
    };
    let c = &s.coordinator;
    let mut found = Locations::default();
    // Asked for every agent's announce: a quarantined blob stays in quarantine (agents still
    // seeding a deleted image's blob must not keep it from garbage collection).
    let here = matches!(c.local.store().has_blob(&digest).await, Ok(true));
    if let (Some(seeder), true) = (s.seeder, here) {
        found.seeders.push(Seeder { peer_id: seeder.peer_id.to_string(), addr: seeder.advertise });
    }
    for id in c.owners(&digest.to_string()) {
        if id == c.me() {
            continue;
        }
        if let Some(peer) = s.membership.peer(&id) {
            found.seeders.push(Seeder { peer_id: peer.peer_id, addr: peer.addr });
        }
    }
    axum::Json(found).into_response()
}
