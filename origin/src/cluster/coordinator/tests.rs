//! Placement over a fixed cluster (`testing::fixed_cluster`): this origin on a real store,
//! the others in memory.

use shoal_registry::{Algorithm, ByteStream, Digest};

use super::*;
use crate::cluster::record::{Record, RecordKey, RecordValue, Version};
use crate::cluster::testing::fixed_cluster;

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
    let (c, b, other) = fixed_cluster(dir.path(), 2, &["b:1"]).await;
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
