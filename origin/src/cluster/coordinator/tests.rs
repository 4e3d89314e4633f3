//! Placement over a fixed cluster: this origin on a real store, the others in memory.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use shoal_registry::{Algorithm, ByteStream, Digest};

use super::*;
use crate::cluster::local::LocalNode;
use crate::cluster::metrics::ClusterMetrics;
use crate::cluster::record::{Record, RecordKey, RecordValue, Version};
use crate::cluster::testing::MemNode;

/// Members that never change; `full` ones say their disk is nearly full.
struct Fixed {
    me: String,
    nodes: BTreeMap<String, Arc<dyn Node>>,
    full: BTreeSet<String>,
}

impl Topology for Fixed {
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

async fn cluster(dir: &std::path::Path, full: &[&str]) -> (Coordinator, Arc<MemNode>, Arc<MemNode>) {
    let store = crate::store::OriginStore::open(crate::StoreConfig {
        data_dir: dir.to_path_buf(),
        upload_idle_timeout: Duration::from_secs(3600),
        max_upload_sessions: 10,
    })
    .await
    .unwrap();
    let local = LocalNode::new("a:1", store);
    let (b, c) = (MemNode::new("b:1"), MemNode::new("c:1"));
    let nodes: BTreeMap<String, Arc<dyn Node>> = [
        ("a:1".to_string(), local.clone() as Arc<dyn Node>),
        ("b:1".to_string(), b.clone() as Arc<dyn Node>),
        ("c:1".to_string(), c.clone() as Arc<dyn Node>),
    ]
    .into();
    let topology = Fixed { me: "a:1".into(), nodes, full: full.iter().map(|s| s.to_string()).collect() };
    let coordinator = Coordinator {
        topology: Arc::new(topology),
        local,
        clock: VersionClock::new("a:1"),
        replication: Replication { replicas: 2, write_quorum: 2 },
        metrics: ClusterMetrics::unregistered().unwrap(),
        gc_lock: Default::default(),
        skews: Default::default(),
        read_repairs: Default::default(),
    };
    (coordinator, b, c)
}

/// A repository whose two owners are this origin and `b:1`.
fn owned_with_b(c: &Coordinator) -> String {
    let owners = |key: &str| c.owners(key);
    (0..)
        .map(|i| format!("team/app{i}"))
        .find(|r| owners(r).contains(&"a:1".to_string()) && owners(r).contains(&"b:1".to_string()))
        .unwrap()
}

/// An origin whose disk is nearly full takes no blob copies (the next origin does, and the
/// blob is queued for repair) but still takes its repositories' records: skipped, each write
/// queued a repair item, and garbage collection, which waits for the queues, never ran to
/// free that disk.
#[tokio::test]
async fn a_nearly_full_owner_takes_records_but_no_blob_copies() {
    let dir = tempfile::tempdir().unwrap();
    let (c, b, other) = cluster(dir.path(), &["b:1"]).await;
    let repo = owned_with_b(&c);
    let tag = Record {
        key: RecordKey::Tag("v1".into()),
        version: Version::new(1, "a:1"),
        value: Some(RecordValue::Tag { digest: Digest::of(Algorithm::Sha256, b"m") }),
        expect: None,
    };
    c.write_records(&repo, vec![tag.clone()]).await.unwrap();
    let at_b = b.records_get(&repo, std::slice::from_ref(&tag.key)).await.unwrap();
    assert_eq!(at_b, vec![Some(tag.stored())], "the nearly full owner has the records");
    assert_eq!(c.local.repair_pending().await.unwrap(), 0, "a records write queued repair");
    assert!(other.records_get(&repo, std::slice::from_ref(&tag.key)).await.unwrap()[0].is_none());

    // A blob b:1 owns goes to c:1 instead (and waits for repair).
    let data = (0..).map(|i| format!("blob {i}")).find(|d| {
        let owners = c.owners(&Digest::of(Algorithm::Sha256, d.as_bytes()).to_string());
        owners.contains(&"b:1".to_string())
    });
    let data = data.unwrap().into_bytes();
    let digest = Digest::of(Algorithm::Sha256, &data);
    let body: ByteStream = Box::pin(futures_util::stream::iter([Ok(bytes::Bytes::from(data.clone()))]));
    c.local.blob_put(&digest, data.len() as u64, body).await.unwrap();
    c.replicate_blob(&digest, data.len() as u64).await.unwrap();
    assert_eq!(b.blob_count(), 0, "a nearly full owner took a blob copy");
    assert_eq!(other.blob_count(), 1, "the next origin did not take the copy");
}
