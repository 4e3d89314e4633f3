//! The cluster tests' world: three origins on real stores behind switchable members, the
//! gate that stops a call in the middle, and the helpers that push and read through them.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream;
use shoal_origin::cluster::coordinator::{Coordinator, Replication};
use shoal_origin::cluster::gc::GcSettings;
use shoal_origin::cluster::local::LocalNode;
use shoal_origin::cluster::metrics::ClusterMetrics;
use shoal_origin::cluster::node::{BlobEntry, Holding, Node, NodeError, RecordPage, ScanPage};
use shoal_origin::cluster::record::{
    now_millis, Record, RecordKey, RecordKind, VersionClock, MAX_CLOCK_AHEAD,
};
use shoal_origin::cluster::store::ClusterStore;
use shoal_origin::cluster::topology::Topology;
use shoal_origin::{OriginStore, StoreConfig};
use shoal_registry::manifest::parse_manifest;
use shoal_registry::range::ByteRange;
use shoal_registry::store::{NewManifest, Reference};
use shoal_registry::{Algorithm, ByteStream, Digest, RegistryStore, RepoName, StoreError};

/// A member that can be switched off: then every call fails as if it were unreachable.
pub(crate) struct Switchable {
    pub(crate) inner: Arc<LocalNode>,
    pub(crate) down: AtomicBool,
    /// Scans of manifest records fail (as one that times out, or whose answer is too big),
    /// while every other call works.
    pub(crate) failing_manifest_scans: AtomicBool,
    /// How far (ms) this member's wall clock runs behind: it refuses records whose versions
    /// are more than `record::MAX_CLOCK_AHEAD` ahead of that clock, as the internal API does.
    pub(crate) clock_behind_ms: AtomicU64,
    /// Holds one call (the first that matches, on any member) back until the test has done
    /// something in the middle of it; shared by all members.
    pub(crate) gate: Arc<Mutex<Option<Gate>>>,
    /// Calls of `records_apply` that reached this member.
    pub(crate) applies: AtomicU64,
    /// Its repository list fails (as one that times out), while every other call works.
    pub(crate) failing_repo_lists: AtomicBool,
    /// The most names its repository list gives, as the internal API caps them
    /// (`wire::MAX_LIST_LIMIT`, smaller here).
    pub(crate) repo_list_cap: AtomicUsize,
    /// Answers record scans in one page, whatever was asked, as origins of releases before
    /// paging do.
    pub(crate) pages_whole: AtomicBool,
    /// Records its scans and scan pages have answered.
    pub(crate) records_read: AtomicU64,
    /// Keys its `records_get` calls have asked for.
    pub(crate) keys_read: AtomicU64,
    /// Its `records_page` calls.
    pub(crate) pages_asked: AtomicU64,
    /// Each `blob_stat` or `blob_peek` answered takes this long (ms), as over a slow network.
    pub(crate) stat_delay_ms: AtomicU64,
    /// Each `records_apply` takes this long (ms) before it commits, as on a disk whose
    /// fsyncs stall.
    pub(crate) apply_delay_ms: AtomicU64,
}

/// The calls a [`Gate`] stops.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum GateOn {
    /// A batch of records with a link tombstone in it (garbage collection unlinking).
    Tombstone,
    /// A batch of records with a live link in it (a push or a manifest put linking a blob).
    LiveLink,
    /// A batch of records with a live tag in it (repair handing records over).
    TagApply,
    Quarantine(Digest),
    /// Any `blob_stat` or `blob_peek` (a repair pass checking who holds a blob).
    BlobStat,
    /// A copy of this blob being sent to a member (an upload or repair placing it).
    BlobPut(Digest),
}

/// Stops calls on any gated member: `reached` fires, then the call waits. Without `open`, only
/// the first matching call stops, until `release`; with it, every matching call does, until
/// `open` turns `true` ([`hold_every`]).
pub(crate) struct Gate {
    pub(crate) on: GateOn,
    pub(crate) reached: Arc<tokio::sync::Notify>,
    pub(crate) release: Arc<tokio::sync::Notify>,
    pub(crate) open: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Switchable {
    fn check(&self) -> Result<(), NodeError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(NodeError::Unreachable {
                node: self.inner.id().to_string(),
                reason: "switched off".into(),
            });
        }
        Ok(())
    }

    /// What a look at a blob (a stat or a peek) meets first: the switch, the gate, the delay.
    async fn before_stat(&self) -> Result<(), NodeError> {
        self.check()?;
        self.pass(GateOn::BlobStat).await;
        let delay = self.stat_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        Ok(())
    }

    /// Wait at the gate if `call` is what it stops.
    async fn pass(&self, call: GateOn) {
        let (taken, held) = {
            let mut gate = self.gate.lock().unwrap();
            match gate.as_ref() {
                Some(g) if g.on == call && g.open.is_some() => {
                    (None, g.open.clone().map(|open| (g.reached.clone(), open)))
                }
                Some(g) if g.on == call => (gate.take(), None),
                _ => (None, None),
            }
        };
        if let Some((reached, mut open)) = held {
            reached.notify_one();
            let _ = open.wait_for(|&o| o).await;
        }
        if let Some(g) = taken {
            g.reached.notify_one();
            g.release.notified().await;
        }
    }
}

#[async_trait]
impl Node for Switchable {
    fn id(&self) -> &str {
        self.inner.id()
    }
    async fn blob_stat(&self, d: &Digest) -> Result<Option<u64>, NodeError> {
        self.before_stat().await?;
        self.inner.blob_stat(d).await
    }
    async fn blob_peek(&self, d: &Digest) -> Result<Holding, NodeError> {
        self.before_stat().await?;
        self.inner.blob_peek(d).await
    }
    async fn blob_get(&self, d: &Digest, r: Option<ByteRange>) -> Result<Option<ByteStream>, NodeError> {
        self.check()?;
        self.inner.blob_get(d, r).await
    }
    async fn blob_put(&self, d: &Digest, size: u64, body: ByteStream) -> Result<(), NodeError> {
        self.check()?;
        self.pass(GateOn::BlobPut(d.clone())).await;
        self.inner.blob_put(d, size, body).await
    }
    async fn blob_remove(&self, d: &Digest) -> Result<bool, NodeError> {
        self.check()?;
        self.inner.blob_remove(d).await
    }
    async fn blob_list(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<BlobEntry>, NodeError> {
        self.check()?;
        self.inner.blob_list(after, limit).await
    }
    async fn blob_quarantine(&self, d: &Digest) -> Result<bool, NodeError> {
        self.check()?;
        self.pass(GateOn::Quarantine(d.clone())).await;
        self.inner.blob_quarantine(d).await
    }
    async fn blob_restore(&self, d: &Digest) -> Result<bool, NodeError> {
        self.check()?;
        self.inner.blob_restore(d).await
    }
    async fn quarantine_list(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<BlobEntry>, NodeError> {
        self.check()?;
        self.inner.quarantine_list(after, limit).await
    }
    async fn blob_purge(&self, d: &Digest, since: u64) -> Result<Option<u64>, NodeError> {
        self.check()?;
        self.inner.blob_purge(d, since).await
    }
    async fn repair_pending(&self) -> Result<u64, NodeError> {
        self.check()?;
        self.inner.repair_pending().await
    }
    async fn records_get(&self, repo: &str, keys: &[RecordKey]) -> Result<Vec<Option<Record>>, NodeError> {
        self.check()?;
        self.keys_read.fetch_add(keys.len() as u64, Ordering::SeqCst);
        self.inner.records_get(repo, keys).await
    }
    async fn records_scan(
        &self,
        repo: &str,
        kind: RecordKind,
        subject: Option<&Digest>,
    ) -> Result<Option<Vec<Record>>, NodeError> {
        self.check()?;
        if kind == RecordKind::Manifest && self.failing_manifest_scans.load(Ordering::SeqCst) {
            return Err(NodeError::Unreachable {
                node: self.inner.id().to_string(),
                reason: "manifest scan timed out".into(),
            });
        }
        let answer = self.inner.records_scan(repo, kind, subject).await?;
        let answered = answer.as_ref().map_or(0, Vec::len);
        self.records_read.fetch_add(answered as u64, Ordering::SeqCst);
        Ok(answer)
    }
    async fn records_page(
        &self,
        repo: &str,
        kind: RecordKind,
        subject: Option<&Digest>,
        page: &ScanPage,
    ) -> Result<Option<RecordPage>, NodeError> {
        if self.pages_whole.load(Ordering::SeqCst) {
            let records = self.records_scan(repo, kind, subject).await?;
            return Ok(records.map(|records| RecordPage { records, more: false }));
        }
        self.check()?;
        self.pages_asked.fetch_add(1, Ordering::SeqCst);
        let answer = self.inner.records_page(repo, kind, subject, page).await?;
        let answered = answer.as_ref().map_or(0, |p| p.records.len());
        self.records_read.fetch_add(answered as u64, Ordering::SeqCst);
        Ok(answer)
    }
    async fn records_apply(&self, repo: &str, records: &[Record]) -> Result<(), NodeError> {
        self.check()?;
        self.applies.fetch_add(1, Ordering::SeqCst);
        let delay = self.apply_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let wall = now_millis().saturating_sub(self.clock_behind_ms.load(Ordering::SeqCst));
        if records.iter().any(|r| r.version.millis > wall + MAX_CLOCK_AHEAD.as_millis() as u64) {
            return Err(NodeError::ClockRefused {
                node: self.inner.id().to_string(),
                reason: "version too far ahead of this clock".into(),
            });
        }
        if records.iter().any(|r| r.value.is_none() && matches!(r.key, RecordKey::Link(_))) {
            self.pass(GateOn::Tombstone).await;
        }
        if records.iter().any(|r| r.is_live() && matches!(r.key, RecordKey::Link(_))) {
            self.pass(GateOn::LiveLink).await;
        }
        if records.iter().any(|r| r.is_live() && matches!(r.key, RecordKey::Tag(_))) {
            self.pass(GateOn::TagApply).await;
        }
        self.inner.records_apply(repo, records).await
    }
    async fn records_forget(&self, repo: &str, confirmed: &[Record]) -> Result<(), NodeError> {
        self.check()?;
        self.inner.records_forget(repo, confirmed).await
    }
    async fn repos(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, NodeError> {
        self.check()?;
        if self.failing_repo_lists.load(Ordering::SeqCst) {
            return Err(NodeError::Unreachable {
                node: self.inner.id().to_string(),
                reason: "repository list timed out".into(),
            });
        }
        self.inner.repos(after, limit.min(self.repo_list_cap.load(Ordering::SeqCst))).await
    }
    async fn metainfo(&self, d: &Digest) -> Result<Option<Bytes>, NodeError> {
        self.check()?;
        self.inner.metainfo(d).await
    }
}

/// Three origins; `live` is what health checks would report (all members, unless a test
/// says an origin is known to be down).
pub(crate) struct World {
    pub(crate) _dirs: Vec<tempfile::TempDir>,
    pub(crate) gate: Arc<Mutex<Option<Gate>>>,
    pub(crate) nodes: HashMap<String, Arc<Switchable>>,
    pub(crate) live: Mutex<Vec<String>>,
    /// Members whose health replies say their disk is nearly full.
    pub(crate) full: Mutex<BTreeSet<String>>,
    pub(crate) generation: std::sync::atomic::AtomicU64,
    /// A member whose last health reply named another member list than this world's.
    pub(crate) disagrees: Mutex<Option<String>>,
    /// Origins taken out of the member list (a scale-down), as far as every origin knows.
    pub(crate) removed: Mutex<BTreeSet<String>>,
}

/// One origin's view of the world.
pub(crate) struct View {
    pub(crate) me: String,
    pub(crate) world: Arc<World>,
}

impl Topology for View {
    fn me(&self) -> &str {
        &self.me
    }
    fn live(&self) -> Vec<String> {
        self.world.live.lock().unwrap().clone()
    }
    fn members(&self) -> Vec<String> {
        let removed = self.world.removed.lock().unwrap();
        self.world.nodes.keys().filter(|id| !removed.contains(*id)).cloned().collect()
    }
    fn accepts_writes(&self, id: &str) -> bool {
        !self.world.full.lock().unwrap().contains(id)
    }
    fn node(&self, id: &str) -> Option<Arc<dyn Node>> {
        self.world.nodes.get(id).map(|n| n.clone() as Arc<dyn Node>)
    }
    fn generation(&self) -> u64 {
        self.world.generation.load(Ordering::SeqCst)
    }
    fn disagreeing_member(&self) -> Option<String> {
        self.world.disagrees.lock().unwrap().clone()
    }
}

pub(crate) const IDS: [&str; 3] = ["o0:5000", "o1:5000", "o2:5000"];

pub(crate) async fn world() -> (Arc<World>, Vec<Arc<Coordinator>>) {
    world_with(2).await
}

/// [`world`] with `replicas` copies (and as many for a write's quorum).
pub(crate) async fn world_with(replicas: usize) -> (Arc<World>, Vec<Arc<Coordinator>>) {
    let mut dirs = Vec::new();
    let mut nodes = HashMap::new();
    let gate = Arc::new(Mutex::new(None));
    let mut locals = Vec::new();
    for id in IDS {
        let dir = tempfile::tempdir().unwrap();
        let store = OriginStore::open(StoreConfig {
            data_dir: dir.path().to_path_buf(),
            upload_idle_timeout: Duration::from_secs(3600),
            max_upload_sessions: 100,
        })
        .await
        .unwrap();
        let local = LocalNode::new(id, store);
        nodes.insert(
            id.to_string(),
            Arc::new(Switchable {
                inner: local.clone(),
                down: AtomicBool::new(false),
                failing_manifest_scans: AtomicBool::new(false),
                clock_behind_ms: AtomicU64::new(0),
                gate: gate.clone(),
                applies: AtomicU64::new(0),
                failing_repo_lists: AtomicBool::new(false),
                repo_list_cap: AtomicUsize::new(usize::MAX),
                pages_whole: AtomicBool::new(false),
                records_read: AtomicU64::new(0),
                keys_read: AtomicU64::new(0),
                pages_asked: AtomicU64::new(0),
                stat_delay_ms: AtomicU64::new(0),
                apply_delay_ms: AtomicU64::new(0),
            }),
        );
        locals.push(local);
        dirs.push(dir);
    }
    let world = Arc::new(World {
        _dirs: dirs,
        gate,
        nodes,
        live: Mutex::new(IDS.iter().map(|s| s.to_string()).collect()),
        full: Mutex::new(BTreeSet::new()),
        generation: Default::default(),
        disagrees: Mutex::new(None),
        removed: Mutex::new(BTreeSet::new()),
    });
    let coordinators = locals
        .into_iter()
        .map(|local| {
            Arc::new(Coordinator {
                topology: Arc::new(View { me: local.id().to_string(), world: world.clone() }),
                clock: VersionClock::new(local.id()),
                local,
                replication: Replication { replicas, write_quorum: replicas },
                metrics: ClusterMetrics::unregistered().unwrap(),
                gc_lock: Default::default(),
                skews: Default::default(),
                read_repairs: Default::default(),
                collections: Default::default(),
            })
        })
        .collect();
    (world, coordinators)
}

/// Take `ids` out of the member list, or put every origin back (an empty `ids`): the live set
/// follows, and the generation changes as membership's would.
pub(crate) fn set_removed(world: &World, ids: &[&str]) {
    *world.removed.lock().unwrap() = ids.iter().map(|s| s.to_string()).collect();
    *world.live.lock().unwrap() = IDS.iter().filter(|id| !ids.contains(id)).map(|s| s.to_string()).collect();
    world.generation.fetch_add(1, Ordering::SeqCst);
}

pub(crate) fn switch(world: &World, id: &str, down: bool) {
    world.nodes[id].down.store(down, Ordering::SeqCst);
}

pub(crate) fn body(data: &[u8]) -> ByteStream {
    let chunk = Bytes::copy_from_slice(data);
    Box::pin(stream::iter(vec![Ok(chunk)]))
}

pub(crate) async fn push(store: &ClusterStore, repo: &RepoName, data: &[u8]) -> Result<Digest, StoreError> {
    let digest = Digest::of(Algorithm::Sha256, data);
    let up = store.upload_start(repo).await?;
    store.upload_append(repo, &up.id, Some(0), None, body(data)).await?;
    store.upload_complete(repo, &up.id, &digest).await?;
    Ok(digest)
}

/// The origins holding the blob (a copy set aside by garbage collection is not held, and
/// stays set aside: looking changes nothing).
pub(crate) async fn holders(world: &World, digest: &Digest) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (id, node) in &world.nodes {
        if matches!(node.inner.blob_peek(digest).await.unwrap(), Holding::Held(_)) {
            out.insert(id.clone());
        }
    }
    out
}

pub(crate) fn owners(key: &str) -> BTreeSet<String> {
    let all: Vec<String> = IDS.iter().map(|s| s.to_string()).collect();
    shoal_origin::cluster::placement::owners(key, &all, 2).into_iter().collect()
}

pub(crate) fn manifest(config: &Digest, layer: &Digest) -> NewManifest {
    let bytes = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":5}}]}}"#
    )
    .into_bytes();
    let parsed = parse_manifest(None, &bytes).unwrap();
    NewManifest { digest: Digest::of(Algorithm::Sha256, &bytes), bytes: bytes.into(), parsed }
}

/// Close the gate at `on` (the first such call on any member stops); returns (reached, release).
pub(crate) fn gate(world: &World, on: GateOn) -> (Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>) {
    let (reached, release) = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
    *world.gate.lock().unwrap() =
        Some(Gate { on, reached: reached.clone(), release: release.clone(), open: None });
    (reached, release)
}

/// Hold every call `on` matches on every gated member: `reached` fires at the first; sending
/// `true` lets them all go on.
pub(crate) fn hold_every(
    world: &World,
    on: GateOn,
) -> (Arc<tokio::sync::Notify>, tokio::sync::watch::Sender<bool>) {
    let reached = Arc::new(tokio::sync::Notify::new());
    let (open_tx, open) = tokio::sync::watch::channel(false);
    *world.gate.lock().unwrap() = Some(Gate {
        on,
        reached: reached.clone(),
        release: Arc::new(tokio::sync::Notify::new()),
        open: Some(open),
    });
    (reached, open_tx)
}

/// An image whose manifest was deleted: its layer and config are garbage, old enough for any
/// grace period.
pub(crate) async fn garbage_image(
    cs: &[Arc<Coordinator>],
    repo: &RepoName,
    layer: &[u8],
) -> (Digest, Digest) {
    let store = ClusterStore::new(cs[0].clone());
    let config = push(&store, repo, b"{}").await.unwrap();
    let layer = push(&store, repo, layer).await.unwrap();
    let m = manifest(&config, &layer);
    store.manifest_put(repo, Some(&"v1".parse().unwrap()), m.clone()).await.unwrap();
    assert!(store.manifest_delete(repo, &Reference::Digest(m.digest)).await.unwrap());
    tokio::time::sleep(Duration::from_millis(20)).await;
    (config, layer)
}

/// The coordinator of an origin that does not own `repo`'s records: every copy of a write it
/// makes to them crosses a gated member (a coordinator calls its own member directly).
pub(crate) fn non_owner(cs: &[Arc<Coordinator>], repo: &RepoName) -> Arc<Coordinator> {
    let owned = owners(repo.as_str());
    cs.iter().find(|c| !owned.contains(c.me())).unwrap().clone()
}

/// Through every origin, blob `digest` of `repo` reads back as `data` (`when` names the moment
/// in a failure).
pub(crate) async fn assert_blob_everywhere(
    cs: &[Arc<Coordinator>],
    repo: &RepoName,
    digest: &Digest,
    data: &[u8],
    when: &str,
) {
    for c in cs {
        let store = ClusterStore::new(c.clone());
        assert_eq!(read_blob(&store, repo, digest).await, data, "{when}, through {}", c.me());
    }
}

/// Through every origin, `tag` names manifest `digest` and each of `blobs` reads back whole.
pub(crate) async fn assert_image_whole(
    cs: &[Arc<Coordinator>],
    repo: &RepoName,
    tag: &str,
    digest: &Digest,
    blobs: &[(&Digest, &[u8])],
) {
    for c in cs {
        let store = ClusterStore::new(c.clone());
        let got = store.manifest_get(repo, &Reference::Tag(tag.parse().unwrap())).await.unwrap().unwrap();
        assert_eq!(&got.digest, digest, "through {}", c.me());
    }
    for (blob, data) in blobs {
        assert_blob_everywhere(cs, repo, blob, data, "image").await;
    }
}

/// The coordinator of the origin that leads garbage collection.
pub(crate) fn leading(cs: &[Arc<Coordinator>]) -> Arc<Coordinator> {
    let leader = shoal_origin::cluster::gc::leader(&cs[0]).unwrap();
    cs.iter().find(|c| c.me() == leader).unwrap().clone()
}

pub(crate) fn quick_gc() -> GcSettings {
    GcSettings { grace: Duration::from_millis(1), quarantine: Duration::from_millis(300) }
}

pub(crate) async fn read_blob(store: &ClusterStore, repo: &RepoName, d: &Digest) -> Vec<u8> {
    use futures_util::TryStreamExt;
    let s = store.blob_read(repo, d, None).await.unwrap_or_else(|e| panic!("read {d}: {e}"));
    let chunks: Vec<Bytes> = s.try_collect().await.unwrap();
    chunks.concat()
}
