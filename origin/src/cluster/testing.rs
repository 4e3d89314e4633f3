//! Test support: [`MemNode`], a [`Node`] in memory that verifies content like a real one, and
//! [`serve`], which puts the internal API over any node on a local port.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use shoal_registry::range::ByteRange;
use shoal_registry::{ByteStream, Digest};

use crate::cluster::internal_api::router;
use crate::cluster::node::{BlobEntry, Holding, Node, NodeError};
use crate::cluster::record::{Record, RecordKey, RecordKind};
use crate::cluster::wire::HealthReply;

/// Builds the error a failing `blob_put` returns, from the node's id.
type PutFailure = fn(&str) -> NodeError;

#[derive(Default)]
struct State {
    blobs: BTreeMap<Digest, (Bytes, u64)>,
    /// Blobs set aside by garbage collection, with when.
    quarantine: BTreeMap<Digest, (Bytes, u64)>,
    metainfo: BTreeMap<Digest, Bytes>,
    repos: BTreeMap<String, BTreeMap<RecordKey, Record>>,
    /// The deadline the last `records_apply_by` was given.
    apply_deadline: Option<std::time::Instant>,
}

/// A node holding everything in maps; `blob_put` checks size and digest like a real node.
pub struct MemNode {
    id: String,
    state: Mutex<State>,
    /// When set, every `blob_put` fails with this error (after reading the body).
    put_failure: Mutex<Option<PutFailure>>,
    /// How long each `blob_peek` takes (a slow owner).
    peek_delay: Mutex<std::time::Duration>,
}

impl MemNode {
    /// The deadline the last `records_apply_by` reached this node with.
    pub fn apply_deadline(&self) -> Option<std::time::Instant> {
        self.state().apply_deadline
    }

    pub fn new(id: &str) -> Arc<MemNode> {
        Arc::new(MemNode {
            id: id.to_string(),
            state: Mutex::new(State::default()),
            put_failure: Mutex::new(None),
            peek_delay: Mutex::new(std::time::Duration::ZERO),
        })
    }

    /// Make every `blob_peek` take `delay`.
    pub fn set_peek_delay(&self, delay: std::time::Duration) {
        *self.peek_delay.lock().unwrap() = delay;
    }

    /// The records of `repo` held here.
    pub fn records_of(&self, repo: &str) -> Vec<Record> {
        self.state().repos.get(repo).map(|r| r.values().cloned().collect()).unwrap_or_default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    pub fn set_metainfo(&self, digest: &Digest, json: &[u8]) {
        self.state().metainfo.insert(digest.clone(), Bytes::copy_from_slice(json));
    }

    pub fn fail_puts(&self, failure: PutFailure) {
        *self.put_failure.lock().unwrap() = Some(failure);
    }

    pub fn blob_count(&self) -> usize {
        self.state().blobs.len()
    }
}

#[async_trait]
impl Node for MemNode {
    fn id(&self) -> &str {
        &self.id
    }

    async fn blob_stat(&self, digest: &Digest) -> Result<Option<u64>, NodeError> {
        Ok(self.state().blobs.get(digest).map(|(b, _)| b.len() as u64))
    }

    async fn blob_peek(&self, digest: &Digest) -> Result<Holding, NodeError> {
        let delay = *self.peek_delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let state = self.state();
        Ok(match state.blobs.get(digest) {
            Some((bytes, _)) => Holding::Held(bytes.len() as u64),
            None if state.quarantine.contains_key(digest) => Holding::Quarantined,
            None => Holding::Absent,
        })
    }

    async fn blob_get(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>, NodeError> {
        let Some((bytes, _)) = self.state().blobs.get(digest).cloned() else { return Ok(None) };
        let part = match range {
            Some(r) => bytes.slice(r.start as usize..=r.end as usize),
            None => bytes,
        };
        // Several chunks, so streaming is exercised.
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            part.chunks(1000).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        Ok(Some(Box::pin(futures_util::stream::iter(chunks))))
    }

    async fn blob_put(&self, digest: &Digest, size: u64, mut body: ByteStream) -> Result<(), NodeError> {
        let mut hasher = digest.algorithm().hasher();
        let mut buf = BytesMut::new();
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|e| NodeError::Storage { node: self.id.clone(), reason: e.to_string() })?;
            hasher.update(&chunk);
            buf.extend_from_slice(&chunk);
        }
        if let Some(fail) = *self.put_failure.lock().unwrap() {
            return Err(fail(&self.id));
        }
        if buf.len() as u64 != size || &hasher.finish() != digest {
            return Err(NodeError::Corrupt(digest.clone()));
        }
        self.state().blobs.insert(digest.clone(), (buf.freeze(), 1234));
        Ok(())
    }

    async fn blob_remove(&self, digest: &Digest) -> Result<bool, NodeError> {
        Ok(self.state().blobs.remove(digest).is_some())
    }

    async fn blob_list(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<BlobEntry>, NodeError> {
        let state = self.state();
        Ok(state
            .blobs
            .iter()
            .filter(|(d, _)| after.is_none_or(|a| *d > a))
            .take(limit)
            .map(|(d, (b, t))| BlobEntry { digest: d.clone(), size: b.len() as u64, stored_millis: *t })
            .collect())
    }

    async fn blob_quarantine(&self, digest: &Digest) -> Result<bool, NodeError> {
        let mut state = self.state();
        let Some((bytes, _)) = state.blobs.remove(digest) else { return Ok(false) };
        state.quarantine.insert(digest.clone(), (bytes, crate::cluster::record::now_millis()));
        Ok(true)
    }

    async fn blob_restore(&self, digest: &Digest) -> Result<bool, NodeError> {
        let mut state = self.state();
        let Some((bytes, _)) = state.quarantine.remove(digest) else { return Ok(false) };
        state.blobs.entry(digest.clone()).or_insert((bytes, crate::cluster::record::now_millis()));
        Ok(true)
    }

    async fn quarantine_list(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<BlobEntry>, NodeError> {
        let state = self.state();
        Ok(state
            .quarantine
            .iter()
            .filter(|(d, _)| after.is_none_or(|a| *d > a))
            .take(limit)
            .map(|(d, (b, t))| BlobEntry { digest: d.clone(), size: b.len() as u64, stored_millis: *t })
            .collect())
    }

    async fn blob_purge(&self, digest: &Digest, since: u64) -> Result<Option<u64>, NodeError> {
        let mut state = self.state();
        match state.quarantine.get(digest) {
            Some((b, t)) if *t == since => {
                let size = b.len() as u64;
                state.quarantine.remove(digest);
                Ok(Some(size))
            }
            _ => Ok(None),
        }
    }

    async fn repair_pending(&self) -> Result<u64, NodeError> {
        Ok(0)
    }

    async fn records_get(&self, repo: &str, keys: &[RecordKey]) -> Result<Vec<Option<Record>>, NodeError> {
        let state = self.state();
        let records = state.repos.get(repo);
        Ok(keys.iter().map(|k| records.and_then(|r| r.get(k)).cloned()).collect())
    }

    async fn records_scan(
        &self,
        repo: &str,
        kind: RecordKind,
        subject: Option<&Digest>,
    ) -> Result<Option<Vec<Record>>, NodeError> {
        let state = self.state();
        Ok(state.repos.get(repo).map(|records| {
            records
                .values()
                .filter(|r| r.key.kind() == kind)
                .filter(|r| subject.is_none_or(|s| r.manifest().and_then(|m| m.subject.as_ref()) == Some(s)))
                .cloned()
                .collect()
        }))
    }

    async fn records_apply_by(
        &self,
        repo: &str,
        records: &[Record],
        deadline: std::time::Instant,
    ) -> Result<(), NodeError> {
        self.state().apply_deadline = Some(deadline);
        if std::time::Instant::now() >= deadline {
            return Err(NodeError::Unreachable { node: self.id.clone(), reason: "deadline passed".into() });
        }
        self.records_apply(repo, records).await
    }

    async fn records_apply(&self, repo: &str, records: &[Record]) -> Result<(), NodeError> {
        let mut state = self.state();
        let stored = state.repos.entry(repo.to_string()).or_default();
        for r in records {
            if r.applies_over(stored.get(&r.key)) {
                stored.insert(r.key.clone(), r.stored());
            }
        }
        Ok(())
    }

    async fn records_forget(&self, repo: &str, confirmed: &[Record]) -> Result<(), NodeError> {
        let mut state = self.state();
        if let Some(stored) = state.repos.get_mut(repo) {
            for r in confirmed {
                if stored.get(&r.key).is_some_and(|s| s.version == r.version) {
                    stored.remove(&r.key);
                }
            }
            if stored.is_empty() {
                state.repos.remove(repo);
            }
        }
        Ok(())
    }

    async fn repos(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, NodeError> {
        let state = self.state();
        Ok(state.repos.keys().filter(|r| after.is_none_or(|a| r.as_str() > a)).take(limit).cloned().collect())
    }

    async fn metainfo(&self, digest: &Digest) -> Result<Option<Bytes>, NodeError> {
        Ok(self.state().metainfo.get(digest).cloned())
    }
}

/// Serve the internal API over `node` on a free local port; the server lives until the test's
/// runtime ends.
pub async fn serve(node: Arc<dyn Node>, secret: Option<&str>) -> SocketAddr {
    let id = node.id().to_string();
    let health = Arc::new(move || HealthReply {
        id: id.clone(),
        peer: None,
        clock: None,
        wall_millis: None,
        disk_full: false,
        members: None,
        collected: None,
    });
    let guard = crate::cluster::internal_api::Guard {
        secrets: secret.map(str::to_string).into_iter().collect(),
        roles: Vec::new(),
    };
    let app = router(node, guard, health);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Members that never change; `full` ones say their disk is nearly full.
pub struct FixedTopology {
    me: String,
    nodes: BTreeMap<String, Arc<dyn Node>>,
    full: std::collections::BTreeSet<String>,
}

impl crate::cluster::topology::Topology for FixedTopology {
    fn me(&self) -> &str {
        &self.me
    }
    fn live(&self) -> Vec<String> {
        self.nodes.keys().cloned().collect()
    }
    fn members(&self) -> Vec<String> {
        self.live()
    }
    fn accepts_writes(&self, id: &str) -> bool {
        !self.full.contains(id)
    }
    fn node(&self, id: &str) -> Option<Arc<dyn Node>> {
        self.nodes.get(id).cloned()
    }
    fn generation(&self) -> u64 {
        0
    }
}

/// Three origins, `replicas` copies: this one, `a:1`, on a real store in `dir`, and `b:1` and
/// `c:1` in memory; those named in `full` say their disk is nearly full.
pub async fn fixed_cluster(
    dir: &std::path::Path,
    replicas: usize,
    full: &[&str],
) -> (crate::cluster::coordinator::Coordinator, Arc<MemNode>, Arc<MemNode>) {
    use crate::cluster::coordinator::{Coordinator, Replication};
    let store = crate::store::OriginStore::open(crate::StoreConfig {
        data_dir: dir.to_path_buf(),
        upload_idle_timeout: std::time::Duration::from_secs(3600),
        max_upload_sessions: 10,
    })
    .await
    .unwrap();
    let local = crate::cluster::local::LocalNode::new("a:1", store);
    let (b, c) = (MemNode::new("b:1"), MemNode::new("c:1"));
    let nodes: BTreeMap<String, Arc<dyn Node>> = [
        ("a:1".to_string(), local.clone() as Arc<dyn Node>),
        ("b:1".to_string(), b.clone() as Arc<dyn Node>),
        ("c:1".to_string(), c.clone() as Arc<dyn Node>),
    ]
    .into();
    let full = full.iter().map(|s| s.to_string()).collect();
    let coordinator = Coordinator {
        topology: Arc::new(FixedTopology { me: "a:1".into(), nodes, full }),
        local,
        clock: crate::cluster::record::VersionClock::new("a:1"),
        replication: Replication { replicas, write_quorum: replicas },
        metrics: crate::cluster::metrics::ClusterMetrics::unregistered().unwrap(),
        gc_lock: Default::default(),
        skews: Default::default(),
        read_repairs: Default::default(),
        collections: Default::default(),
    };
    (coordinator, b, c)
}
