//! The store's failure paths that need its insides: a full disk at an upload's commit, and a
//! copy from another origin dropped halfway.

use bytes::Bytes;
use futures_util::stream;
use shoal_registry::{Algorithm, RepoName};

use super::*;
use crate::meta::tests::Tmpfs;

fn body(data: &[u8]) -> ByteStream {
    Box::pin(stream::iter(vec![Ok(Bytes::copy_from_slice(data))]))
}

/// Fill the disk at `dir` (a small tmpfs) up to less than a page, then the store's metadata
/// file's free pages: the next commit meets a full disk. Returns the file to remove to make
/// room again.
fn fill_disk(dir: &std::path::Path, store: &OriginStore) -> std::path::PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4 << 10];
    while f.write_all(&chunk).is_ok() {}
    for i in 0u32..400 {
        let d = Digest::of(Algorithm::Sha256, &i.to_le_bytes());
        let meta = &store.inner.meta;
        if meta.commit_blob(&d, 10, None).and_then(|_| meta.put_metainfo(&d, &vec![7u8; 32 << 10])).is_err() {
            break;
        }
    }
    filler
}

async fn open(dir: &std::path::Path) -> OriginStore {
    OriginStore::open(StoreConfig {
        data_dir: dir.to_path_buf(),
        upload_idle_timeout: Duration::from_secs(3600),
        max_upload_sessions: 10,
    })
    .await
    .unwrap()
}

/// An upload whose commit meets a full disk fails as "storage full" and leaves nothing in
/// the blob store; once space is back, the same `PUT` finishes it. Before, the verified file
/// had already moved into the blob store (with no record: never counted, listed or
/// collected) and every retry failed with a 500 (its session's file was gone).
#[tokio::test]
async fn a_commit_on_a_full_disk_can_be_retried_once_space_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_tmpfs) = Tmpfs::mount(dir.path(), 16) else { return };
    let store = open(dir.path()).await;
    let repo: RepoName = "team/app".parse().unwrap();
    let data = vec![5u8; 256 << 10];
    let digest = Digest::of(Algorithm::Sha256, &data);
    let up = store.upload_start(&repo, "o:1").await.unwrap();
    store.upload_append(&repo, &up.id, Some(0), None, body(&data)).await.unwrap();
    let filler = fill_disk(dir.path(), &store);
    let err = store.upload_finish(&repo, &up.id, &digest, None).await.unwrap_err();
    assert!(matches!(err, StoreError::StorageFull), "{err:?}");
    assert!(!store.blob_path(&digest).exists(), "an unrecorded file was left in the blob store");
    std::fs::remove_file(&filler).unwrap();
    let size = store.upload_finish(&repo, &up.id, &digest, None).await.expect("the retry once space is back");
    assert_eq!(size, data.len() as u64);
    assert_eq!(store.blob_size(&digest).await.unwrap(), Some(size));
}

/// A final `PUT` carrying the last bytes whose commit meets a full disk (507) can be sent
/// again as it was once space is back: its body is cut off the session when the commit
/// fails. Before, the retry appended the body a second time, the digest no longer matched,
/// and the session was discarded (400 `DIGEST_INVALID`, then 404 for every retry).
#[tokio::test]
async fn a_final_put_with_a_body_can_be_sent_again_after_a_full_disk() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_tmpfs) = Tmpfs::mount(dir.path(), 16) else { return };
    let store = open(dir.path()).await;
    let api = shoal_registry::api::router(
        std::sync::Arc::new(crate::cluster::store::ClusterStore::single(store.clone(), "o:1").unwrap()),
        shoal_registry::api::ApiConfig::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, api).await });
    let http = reqwest::Client::new();
    // The first PATCH ends inside a page, so the PUT's few bytes need no new one on the
    // full disk: the append succeeds and the commit (the metadata file) fails.
    let data: Vec<u8> = (0..(256u32 << 10) - 50).map(|i| (i % 251) as u8).collect();
    let (head, tail) = data.split_at(data.len() - 50);
    let digest = Digest::of(Algorithm::Sha256, &data);
    let started = http.post(format!("{base}/v2/team/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(started.status(), 202);
    let location = format!("{base}{}", started.headers()["location"].to_str().unwrap());
    let patch = http
        .patch(&location)
        .header("content-range", format!("0-{}", head.len() - 1))
        .body(head.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(patch.status(), 202);
    let filler = fill_disk(dir.path(), &store);
    let sep = if location.contains('?') { '&' } else { '?' };
    let put = || http.put(format!("{location}{sep}digest={digest}")).body(tail.to_vec()).send();
    let failed = put().await.unwrap();
    assert_eq!(failed.status(), 507, "{:?}", failed.text().await);
    std::fs::remove_file(&filler).unwrap();
    let retried = put().await.unwrap();
    assert_eq!(retried.status(), 201, "{:?}", retried.text().await);
    let got = http.get(format!("{base}/v2/team/app/blobs/{digest}")).send().await.unwrap();
    assert_eq!(got.bytes().await.unwrap().as_ref(), data.as_slice());
}

/// A copy from another origin whose request is dropped halfway (the sender gave up) still
/// ends, and removes its scratch file, when its body does. Before, the scratch file stayed
/// until the next start.
#[tokio::test]
async fn a_copy_dropped_halfway_leaves_no_scratch_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let digest = Digest::of(Algorithm::Sha256, b"whole");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    tx.send(Ok(Bytes::from_static(b"who"))).await.unwrap();
    let stream: ByteStream =
        Box::pin(futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|item| (item, rx)) },
        ));
    let put = {
        let store = store.clone();
        let digest = digest.clone();
        tokio::spawn(async move { store.blob_put(&digest, 5, stream).await })
    };
    let scratch = |store: &OriginStore| std::fs::read_dir(store.inner.layout.tmp()).unwrap().count();
    let started = Instant::now();
    while scratch(&store) == 0 {
        assert!(started.elapsed() < Duration::from_secs(5), "the copy never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    put.abort();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The sender's connection closes: the body ends in an error.
    let _ = tx.send(Err(std::io::Error::other("connection reset"))).await;
    drop(tx);
    while scratch(&store) > 0 {
        assert!(started.elapsed() < Duration::from_secs(5), "the scratch file stayed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(store.blob_size(&digest).await.unwrap(), None);
}
