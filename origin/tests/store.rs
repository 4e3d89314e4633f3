//! Tests of the origin store through the storage trait, on a real data directory.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use shoal_origin::cluster::store::ClusterStore;
use shoal_origin::{OriginStore, StoreConfig};
use shoal_registry::manifest::parse_manifest;
use shoal_registry::store::{NewManifest, Reference};
use shoal_registry::{Algorithm, ByteStream, Digest, RegistryStore, RepoName, StoreError};

fn config(dir: &std::path::Path) -> StoreConfig {
    StoreConfig {
        data_dir: dir.to_path_buf(),
        upload_idle_timeout: Duration::from_secs(3600),
        max_upload_sessions: 100,
    }
}

async fn open_single(config: StoreConfig) -> Result<ClusterStore, StoreError> {
    ClusterStore::single(OriginStore::open(config).await?, "local")
}

fn repo(s: &str) -> RepoName {
    s.parse().unwrap()
}

fn body(data: &[u8]) -> ByteStream {
    let chunks: Vec<Result<Bytes, std::io::Error>> =
        data.chunks(7000).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    Box::pin(stream::iter(chunks))
}

/// A body that delivers `data` and then fails, like a client that drops the connection.
fn broken_body(data: &[u8]) -> ByteStream {
    let head = stream::iter(vec![Ok(Bytes::copy_from_slice(data))]);
    Box::pin(head.chain(stream::iter(vec![Err(std::io::Error::other("connection reset"))])))
}

async fn read_all(store: &ClusterStore, r: &RepoName, d: &Digest) -> Vec<u8> {
    let mut s = store.blob_read(r, d, None).await.unwrap();
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    out
}

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

async fn push(store: &ClusterStore, r: &RepoName, content: &[u8]) -> Digest {
    let digest = Digest::of(Algorithm::Sha256, content);
    let up = store.upload_start(r).await.unwrap();
    store.upload_append(r, &up.id, Some(0), None, body(content)).await.unwrap();
    store.upload_complete(r, &up.id, &digest).await.unwrap();
    digest
}

fn blob_files(dir: &std::path::Path) -> usize {
    fn walk(p: &std::path::Path) -> usize {
        std::fs::read_dir(p)
            .map_or(0, |rd| rd.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum())
    }
    walk(&dir.join("blobs"))
}

#[tokio::test]
async fn chunked_upload_commits_and_is_scoped_to_its_repository() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_single(config(dir.path())).await.unwrap();
    let (a, b) = (repo("team/a"), repo("team/b"));
    let content = data(100_000);
    let digest = Digest::of(Algorithm::Sha256, &content);
    let up = store.upload_start(&a).await.unwrap();
    store.upload_append(&a, &up.id, Some(0), Some(40_000), body(&content[..40_000])).await.unwrap();
    let err = store.upload_append(&a, &up.id, Some(0), Some(10), body(&content[..10])).await.unwrap_err();
    assert!(matches!(err, StoreError::UploadOutOfOrder { offset: 40_000 }));
    store.upload_append(&a, &up.id, None, None, body(&content[40_000..])).await.unwrap();
    assert_eq!(store.upload_status(&a, &up.id).await.unwrap().offset, 100_000);
    // The session is invisible from another repository.
    assert!(matches!(store.upload_status(&b, &up.id).await, Err(StoreError::UploadUnknown)));
    assert_eq!(store.upload_complete(&a, &up.id, &digest).await.unwrap(), 100_000);
    assert_eq!(read_all(&store, &a, &digest).await, content);
    assert_eq!(store.blob_size(&b, &digest).await.unwrap(), None);
    assert!(store.blob_mount(&b, &a, &digest).await.unwrap());
    assert_eq!(store.blob_size(&b, &digest).await.unwrap(), Some(100_000));
    assert_eq!(store.local().stored_bytes(), 100_000);
}

#[tokio::test]
async fn digest_mismatch_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_single(config(dir.path())).await.unwrap();
    let r = repo("x");
    let up = store.upload_start(&r).await.unwrap();
    store.upload_append(&r, &up.id, None, None, body(b"hello")).await.unwrap();
    let wrong = Digest::of(Algorithm::Sha256, b"other");
    let err = store.upload_complete(&r, &up.id, &wrong).await.unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }));
    assert_eq!(store.blob_size(&r, &wrong).await.unwrap(), None);
    assert!(matches!(store.upload_status(&r, &up.id).await, Err(StoreError::UploadUnknown)));
    assert_eq!(blob_files(dir.path()), 0);
    assert_eq!(std::fs::read_dir(dir.path().join("uploads")).unwrap().count(), 0);
}

#[tokio::test]
async fn declared_chunk_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_single(config(dir.path())).await.unwrap();
    let r = repo("x");
    let up = store.upload_start(&r).await.unwrap();
    store.upload_append(&r, &up.id, None, None, body(b"abc")).await.unwrap();
    // Short chunk, long chunk, and a dropped connection: each leaves the offset at 3.
    let short = store.upload_append(&r, &up.id, Some(3), Some(10), body(b"def")).await.unwrap_err();
    assert!(matches!(short, StoreError::SizeMismatch { .. }));
    let long = store.upload_append(&r, &up.id, Some(3), Some(2), body(b"defgh")).await.unwrap_err();
    assert!(matches!(long, StoreError::SizeMismatch { .. }));
    store.upload_append(&r, &up.id, Some(3), Some(10), broken_body(b"def")).await.unwrap_err();
    assert_eq!(store.upload_status(&r, &up.id).await.unwrap().offset, 3);
    store.upload_append(&r, &up.id, Some(3), Some(3), body(b"def")).await.unwrap();
    let digest = Digest::of(Algorithm::Sha256, b"abcdef");
    store.upload_complete(&r, &up.id, &digest).await.unwrap();
    assert_eq!(read_all(&store, &r, &digest).await, b"abcdef");
}

#[tokio::test]
async fn dropped_stream_keeps_progress_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_single(config(dir.path())).await.unwrap();
    let r = repo("x");
    let content = data(50_000);
    let up = store.upload_start(&r).await.unwrap();
    store.upload_append(&r, &up.id, None, None, broken_body(&content[..20_000])).await.unwrap_err();
    let offset = store.upload_status(&r, &up.id).await.unwrap().offset;
    assert_eq!(offset, 20_000);
    store.upload_append(&r, &up.id, Some(offset), None, body(&content[20_000..])).await.unwrap();
    let digest = Digest::of(Algorithm::Sha256, &content);
    store.upload_complete(&r, &up.id, &digest).await.unwrap();
    assert_eq!(read_all(&store, &r, &digest).await, content);
}

/// A PATCH whose request is dropped halfway (its client gone, or the origin forwarding it
/// giving up) still ends consistently: the session's offset is what its file holds, and the
/// upload resumes from it to a whole blob. Before, the dropped append left the old offset with
/// a file that had grown, and the final PUT failed the digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_whose_request_is_dropped_keeps_the_session_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_single(config(dir.path())).await.unwrap();
    let r = repo("x");
    let content = data(3 << 20);
    let up = store.upload_start(&r).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let chunks: ByteStream = Box::pin(tokio_stream_of(rx));
    let request = {
        let (store, r, id) = (store.clone(), r.clone(), up.id.clone());
        tokio::spawn(async move { store.upload_append(&r, &id, None, None, chunks).await })
    };
    tx.send(Ok(Bytes::copy_from_slice(&content[..1 << 20]))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    request.abort();
    let _ = request.await;
    // The client's connection then ends (the body is gone already if the append was dropped).
    let _ = tx.send(Err(std::io::Error::other("connection reset"))).await;
    drop(tx);
    let mut offset = 0;
    for _ in 0..50 {
        offset = store.upload_status(&r, &up.id).await.unwrap().offset;
        if offset > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let on_disk = std::fs::metadata(dir.path().join("uploads").join(&up.id)).unwrap().len();
    assert_eq!(offset, on_disk, "the session's offset is what its file holds");
    assert_eq!(offset, 1 << 20);
    store.upload_append(&r, &up.id, Some(offset), None, body(&content[offset as usize..])).await.unwrap();
    let digest = Digest::of(Algorithm::Sha256, &content);
    store.upload_complete(&r, &up.id, &digest).await.unwrap();
    assert_eq!(read_all(&store, &r, &digest).await, content);
}

/// The chunks a channel receives, as a body stream.
fn tokio_stream_of(
    mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn sessions_and_blobs_survive_restart_and_leftovers_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let r = repo("x");
    let content = data(30_000);
    let (id, kept) = {
        let store = open_single(config(dir.path())).await.unwrap();
        let kept = push(&store, &r, b"committed before the crash").await;
        let up = store.upload_start(&r).await.unwrap();
        store.upload_append(&r, &up.id, None, None, body(&content[..10_000])).await.unwrap();
        (up.id, kept)
    };
    // Background metainfo hashing may still hold the closed store for a moment; a real crash
    // has no such stragglers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Debris a crash could leave: a scratch file, upload data without a session, a blob file
    // renamed into place whose commit never happened, a purged quarantine file not unlinked.
    std::fs::write(dir.path().join("tmp/partial"), b"x").unwrap();
    std::fs::write(dir.path().join("uploads/orphan"), b"x").unwrap();
    let stray = Digest::of(Algorithm::Sha256, b"renamed, never committed");
    let stray_path = dir.path().join("blobs/sha256").join(&stray.hex()[..2]).join(stray.hex());
    std::fs::create_dir_all(stray_path.parent().unwrap()).unwrap();
    std::fs::write(&stray_path, b"renamed, never committed").unwrap();
    let purged = Digest::of(Algorithm::Sha256, b"purged");
    let purged_path = dir.path().join("quarantine").join(format!("sha256-{}", purged.hex()));
    std::fs::write(&purged_path, b"purged").unwrap();
    let store = open_single(config(dir.path())).await.unwrap();
    assert!(!dir.path().join("tmp/partial").exists());
    assert!(!dir.path().join("uploads/orphan").exists());
    assert!(!stray_path.exists(), "a blob file no record names was left");
    assert!(!purged_path.exists(), "a quarantine file no record names was left");
    assert_eq!(read_all(&store, &r, &kept).await, b"committed before the crash");
    assert_eq!(store.upload_status(&r, &id).await.unwrap().offset, 10_000);
    store.upload_append(&r, &id, Some(10_000), None, body(&content[10_000..])).await.unwrap();
    // sha512 forces the reread path too.
    let digest = Digest::of(Algorithm::Sha512, &content);
    store.upload_complete(&r, &id, &digest).await.unwrap();
    assert_eq!(read_all(&store, &r, &digest).await, content);
}

#[tokio::test]
async fn concurrent_pushes_of_one_blob_both_succeed_with_one_copy() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_single(config(dir.path())).await.unwrap();
    let r = repo("x");
    let content = data(200_000);
    let (d1, d2) = tokio::join!(push(&store, &r, &content), push(&store, &r, &content));
    assert_eq!(d1, d2);
    assert_eq!(blob_files(dir.path()), 1);
    assert_eq!(read_all(&store, &r, &d1).await, content);
    assert_eq!(store.local().stored_bytes(), 200_000);
}

#[tokio::test]
async fn idle_sessions_expire() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_single(StoreConfig {
        data_dir: dir.path().to_path_buf(),
        upload_idle_timeout: Duration::from_millis(300),
        max_upload_sessions: 100,
    })
    .await
    .unwrap();
    let r = repo("x");
    let up = store.upload_start(&r).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(matches!(store.upload_status(&r, &up.id).await, Err(StoreError::UploadUnknown)));
    assert!(!dir.path().join("uploads").join(&up.id).exists());
}

fn manifest_json(config: &Digest, layer: &Digest, subject: Option<&Digest>) -> Vec<u8> {
    let subject = subject
        .map(|s| {
            format!(r#","subject":{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{s}","size":1}}"#)
        })
        .unwrap_or_default();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":3}}]{subject}}}"#
    )
    .into_bytes()
}

fn new_manifest(bytes: Vec<u8>) -> NewManifest {
    let parsed = parse_manifest(None, &bytes).unwrap();
    NewManifest { digest: Digest::of(Algorithm::Sha256, &bytes), bytes: bytes.into(), parsed }
}

#[tokio::test]
async fn manifests_tags_and_referrers() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_single(config(dir.path())).await.unwrap();
    let r = repo("app");
    let config_d = push(&store, &r, b"{}").await;
    let missing = Digest::of(Algorithm::Sha256, b"missing layer");
    let v1 = "v1".parse().unwrap();
    let refused =
        store.manifest_put(&r, Some(&v1), new_manifest(manifest_json(&config_d, &missing, None))).await;
    assert!(matches!(refused, Err(StoreError::ManifestBlobUnknown(d)) if d == missing));
    assert!(store.manifest_get(&r, &Reference::Tag("v1".parse().unwrap())).await.unwrap().is_none());

    let layer = push(&store, &r, b"abc").await;
    let image = new_manifest(manifest_json(&config_d, &layer, None));
    let image_digest = image.digest.clone();
    for tag in ["v1", "v2", "v3"] {
        store.manifest_put(&r, Some(&tag.parse().unwrap()), image.clone()).await.unwrap();
    }
    let got = store.manifest_get(&r, &Reference::Tag("v2".parse().unwrap())).await.unwrap().unwrap();
    assert_eq!(got.digest, image_digest);
    assert_eq!(got.bytes, image.bytes);
    let page = store.tags(&r, None, 2).await.unwrap();
    assert_eq!(
        (page.items.clone(), page.next),
        (vec!["v1".to_string(), "v2".to_string()], Some("v2".into()))
    );
    let page = store.tags(&r, Some("v2"), 2).await.unwrap();
    assert_eq!((page.items, page.next), (vec!["v3".to_string()], None));
    assert!(matches!(store.tags(&repo("nope"), None, 10).await, Err(StoreError::NameUnknown)));

    let sig = new_manifest(manifest_json(&config_d, &layer, Some(&image_digest)));
    store.manifest_put(&r, None, sig.clone()).await.unwrap();
    let refs = store.referrers(&r, &image_digest).await.unwrap();
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].digest, sig.digest);

    assert!(store.manifest_delete(&r, &Reference::Tag("v1".parse().unwrap())).await.unwrap());
    assert!(store.manifest_delete(&r, &Reference::Digest(sig.digest.clone())).await.unwrap());
    assert!(store.referrers(&r, &image_digest).await.unwrap().is_empty());
    assert!(store.manifest_delete(&r, &Reference::Digest(image_digest.clone())).await.unwrap());
    assert!(store.tags(&r, None, 10).await.unwrap().items.is_empty());
    assert!(store.manifest_get(&r, &Reference::Digest(image_digest)).await.unwrap().is_none());
    let repos = store.repositories(None, 10).await.unwrap();
    assert_eq!(repos.items, vec!["app".to_string()]);
}

#[tokio::test]
async fn gc_sweeps_only_unreferenced_blobs_past_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_single(config(dir.path())).await.unwrap();
    let r = repo("app");
    let config_d = push(&store, &r, b"{}").await;
    let (l1, l2, l3) =
        (push(&store, &r, b"one").await, push(&store, &r, b"two").await, push(&store, &r, b"three").await);
    let a = new_manifest(manifest_json(&config_d, &l1, None));
    let b = new_manifest(manifest_json(&config_d, &l3, None));
    store.manifest_put(&r, Some(&"a".parse().unwrap()), a.clone()).await.unwrap();
    store.manifest_put(&r, Some(&"b".parse().unwrap()), b.clone()).await.unwrap();
    assert!(store.manifest_delete(&r, &Reference::Digest(a.digest.clone())).await.unwrap());
    let c = &store.coordinator;

    // Within the grace period nothing goes, referenced or not.
    let report = shoal_origin::cluster::gc::collect(c, gc_settings(Duration::from_secs(3600))).await.unwrap();
    assert_eq!(report.swept_blobs, 0);
    assert_eq!(report.young_blobs, 2, "{report:?}"); // l1 (no longer referenced) and l2 (never)
    assert_eq!(blob_files(dir.path()), 4); // config and three layers; manifests are records

    tokio::time::sleep(Duration::from_millis(20)).await;
    let report = shoal_origin::cluster::gc::collect(c, gc_settings(Duration::from_millis(1))).await.unwrap();
    assert_eq!(report.swept_blobs, 2, "{report:?}");
    assert_eq!(report.swept_bytes, 6);
    assert_eq!(blob_files(dir.path()), 2);
    for gone in [&l1, &l2] {
        assert_eq!(store.blob_size(&r, gone).await.unwrap(), None, "swept blobs are unlinked");
    }
    assert_eq!(read_all(&store, &r, &l3).await, b"three");
    assert_eq!(read_all(&store, &r, &config_d).await, b"{}");
    let got = store.manifest_get(&r, &Reference::Tag("b".parse().unwrap())).await.unwrap().unwrap();
    assert_eq!(got.digest, b.digest);
}

#[tokio::test]
async fn upload_sessions_are_capped_and_a_finished_one_frees_a_slot() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_single(StoreConfig { max_upload_sessions: 2, ..config(dir.path()) }).await.unwrap();
    let r = repo("x");
    let first = store.upload_start(&r).await.unwrap();
    store.upload_start(&r).await.unwrap();
    assert!(matches!(store.upload_start(&r).await, Err(StoreError::TooManyUploads(2))));
    // The origin's own fetches of upstream blobs are not held back by clients' sessions.
    let fetch = store.fetch_start(&r).await.unwrap();
    store.upload_cancel(&r, &fetch.id).await.unwrap();
    store.upload_cancel(&r, &first.id).await.unwrap();
    store.upload_start(&r).await.unwrap();
}

/// `POST`s at once do not overshoot the cap: sessions being opened count with the open
/// ones. Before, each passed a check of the open sessions alone and then made its file and
/// record, so a burst opened about as many sessions as it had requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_sessions_started_at_once_do_not_overshoot_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(
        open_single(StoreConfig { max_upload_sessions: 2, ..config(dir.path()) }).await.unwrap(),
    );
    let starts: Vec<_> = (0..20)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.upload_start(&repo("x")).await })
        })
        .collect();
    let mut opened = 0;
    for start in starts {
        match start.await.unwrap() {
            Ok(_) => opened += 1,
            Err(StoreError::TooManyUploads(2)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(opened, 2, "{opened} sessions opened under a cap of 2");
}

/// GC settings with a short quarantine: nothing races these collections.
fn gc_settings(grace: Duration) -> shoal_origin::cluster::gc::GcSettings {
    shoal_origin::cluster::gc::GcSettings { grace, quarantine: Duration::from_millis(50) }
}

/// A repair pass takes an item off the queue only if nothing queued it again while the pass
/// ran: a write that missed its owners then (and queued the same repository) stays queued,
/// so GC, which waits for empty queues, cannot run before it is placed.
#[tokio::test]
async fn an_item_queued_again_during_its_repair_stays_queued() {
    let dir = tempfile::tempdir().unwrap();
    let store = OriginStore::open(config(dir.path())).await.unwrap();
    store.repair_enqueue("repo:team/app".into()).await.unwrap();
    let taken = store.repair_pending(10).await.unwrap();
    assert_eq!(taken.len(), 1);
    // While the pass works on it, a write queues the same repository again.
    store.repair_enqueue("repo:team/app".into()).await.unwrap();
    let (item, ticket) = taken[0].clone();
    store.repair_done(item.clone(), ticket).await.unwrap();
    assert_eq!(store.repair_len().await.unwrap(), 1, "the second queueing was lost");
    // The next pass settles it.
    let (item, ticket) = store.repair_pending(10).await.unwrap()[0].clone();
    store.repair_done(item, ticket).await.unwrap();
    assert_eq!(store.repair_len().await.unwrap(), 0);
}

/// The queue hands out repositories before blobs, however many blobs are queued ahead of them
/// by key order and whatever the batch size: a repository's records are what reads compare.
#[tokio::test]
async fn repositories_leave_the_repair_queue_before_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = OriginStore::open(config(dir.path())).await.unwrap();
    for i in 0..5 {
        store.repair_enqueue(format!("blob:sha256:{i:064}")).await.unwrap();
    }
    store.repair_enqueue("repo:team/b".into()).await.unwrap();
    store.repair_enqueue("repo:team/a".into()).await.unwrap();
    store.repair_enqueue("zzz".into()).await.unwrap();
    let names = |items: Vec<(String, u64)>| items.into_iter().map(|(item, _)| item).collect::<Vec<_>>();
    assert_eq!(names(store.repair_pending(2).await.unwrap()), ["repo:team/a", "repo:team/b"]);
    let all = names(store.repair_pending(100).await.unwrap());
    assert_eq!(all.len(), 8);
    assert_eq!(
        &all[..3],
        [
            "repo:team/a",
            "repo:team/b",
            "blob:sha256:0000000000000000000000000000000000000000000000000000000000000000"
        ]
    );
    assert_eq!(all[7], "zzz", "an item after the repositories by key order still comes");
}
