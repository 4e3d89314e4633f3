//! The client against a real internal API server on loopback (test nodes, or a real store):
//! every call, its limits and timeouts, and the paged record scan.

use std::collections::BTreeSet;
use std::time::Instant;

use futures_util::StreamExt;
use shoal_registry::Algorithm;

use super::*;
use crate::cluster::record::{ManifestValue, RecordValue, Version};
use crate::cluster::testing::{serve, MemNode};

const TIMEOUT: Duration = Duration::from_secs(5);

fn client(addr: std::net::SocketAddr, secret: Option<&str>, timeout: Duration) -> RemoteNode {
    RemoteNode::new(addr.to_string(), format!("http://{addr}/"), secret.map(str::to_string), timeout).unwrap()
}

fn stream_of(data: &[u8]) -> ByteStream {
    let chunks: Vec<Result<Bytes, std::io::Error>> =
        data.chunks(4096).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    Box::pin(futures_util::stream::iter(chunks))
}

async fn collect(stream: ByteStream) -> Vec<u8> {
    stream.map(|c| c.unwrap().to_vec()).concat().await
}

/// An origin's store in `dir`, as the tests against a real store use it.
async fn real_store(dir: &std::path::Path) -> crate::store::OriginStore {
    let config = crate::StoreConfig {
        data_dir: dir.to_path_buf(),
        upload_idle_timeout: Duration::from_secs(3600),
        max_upload_sessions: 10,
    };
    crate::store::OriginStore::open(config).await.unwrap()
}

fn digest_of(data: &[u8]) -> Digest {
    Digest::of(Algorithm::Sha256, data)
}

#[tokio::test]
async fn blobs_round_trip() {
    let node = MemNode::new("a:1");
    let addr = serve(node.clone(), Some("s")).await;
    let remote = client(addr, Some("s"), TIMEOUT);
    assert_eq!(remote.id(), addr.to_string());
    assert_eq!(remote.health().await.unwrap().id, "a:1");

    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let d = digest_of(&data);
    assert_eq!(remote.blob_stat(&d).await.unwrap(), None);
    assert!(remote.blob_get(&d, None).await.unwrap().is_none());
    remote.blob_put(&d, data.len() as u64, stream_of(&data)).await.unwrap();
    assert_eq!(remote.blob_stat(&d).await.unwrap(), Some(data.len() as u64));
    assert_eq!(collect(remote.blob_get(&d, None).await.unwrap().unwrap()).await, data);
    let range = ByteRange { start: 1000, end: 54_321 };
    let part = collect(remote.blob_get(&d, Some(range)).await.unwrap().unwrap()).await;
    assert_eq!(part, &data[1000..=54_321]);

    let empty = digest_of(b"");
    remote.blob_put(&empty, 0, stream_of(b"")).await.unwrap();
    assert_eq!(remote.blob_stat(&empty).await.unwrap(), Some(0));
    assert!(collect(remote.blob_get(&empty, None).await.unwrap().unwrap()).await.is_empty());

    let all = remote.blob_list(None, 100).await.unwrap();
    let expected: BTreeSet<Digest> = [d.clone(), empty.clone()].into();
    assert_eq!(all.iter().map(|e| e.digest.clone()).collect::<BTreeSet<_>>(), expected);
    assert!(all.iter().all(|e| e.stored_millis == 1234));
    let first = remote.blob_list(None, 1).await.unwrap();
    assert_eq!(first, all[..1]);
    assert_eq!(remote.blob_list(Some(&first[0].digest), 10).await.unwrap(), all[1..]);

    assert_eq!(remote.metainfo(&d).await.unwrap(), None);
    node.set_metainfo(&d, br#"{"pieces":[]}"#);
    assert_eq!(remote.metainfo(&d).await.unwrap().unwrap(), &br#"{"pieces":[]}"#[..]);

    assert!(remote.blob_remove(&d).await.unwrap());
    assert!(!remote.blob_remove(&d).await.unwrap());
    assert_eq!(remote.blob_stat(&d).await.unwrap(), None);
    assert!(remote.blob_get(&d, Some(range)).await.unwrap().is_none());
}

fn v(millis: u64) -> Version {
    Version::new(millis, "a:1")
}

fn manifest(digest: &Digest, subject: Option<&Digest>, millis: u64) -> Record {
    let value = ManifestValue {
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        bytes: "{}".into(),
        blobs: vec![],
        children: vec![],
        subject: subject.cloned(),
        referrer: None,
    };
    Record {
        key: RecordKey::Manifest(digest.clone()),
        version: v(millis),
        value: Some(RecordValue::Manifest(Box::new(value))),
        expect: None,
    }
}

/// The paged scan over the wire against a real store: pages of the asked size that say
/// when more follow, `after` continuing where a page ended, and the whole answer for a
/// caller of an earlier release that asks no page.
#[tokio::test]
async fn record_scans_page_over_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let store = real_store(dir.path()).await;
    let records: Vec<Record> =
        (0..10u8).map(|i| manifest(&Digest::of(Algorithm::Sha256, &[i]), None, u64::from(i) + 1)).collect();
    store.records_apply("team/app", &records).await.unwrap();
    let addr = serve(crate::cluster::local::LocalNode::new("a:1", store), None).await;
    let remote = client(addr, None, TIMEOUT);
    let one = serde_json::to_string(&records[0]).unwrap().len();

    let mut page = ScanPage::of_bytes(3 * one);
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let answer =
            remote.records_page("team/app", RecordKind::Manifest, None, &page).await.unwrap().unwrap();
        pages += 1;
        assert!(answer.records.len() <= 3);
        page.after = answer.records.last().map(|r| r.key.name());
        seen.extend(answer.records);
        if !answer.more {
            break;
        }
    }
    assert_eq!((pages, seen.len()), (4, 10));
    // Pages of at most four records (a listing's page), whatever their bytes.
    let mut page = ScanPage { max_records: 4, ..ScanPage::of_bytes(usize::MAX) };
    let mut counts = Vec::new();
    loop {
        let answer =
            remote.records_page("team/app", RecordKind::Manifest, None, &page).await.unwrap().unwrap();
        counts.push(answer.records.len());
        page.after = answer.records.last().map(|r| r.key.name());
        if !answer.more {
            break;
        }
    }
    assert_eq!(counts, [4, 4, 2]);
    let mut all = remote.records_scan("team/app", RecordKind::Manifest, None).await.unwrap().unwrap();
    all.sort_by_key(|r| r.key.name());
    assert_eq!(all, seen);

    // A caller of an earlier release: no page asked, every record in one answer, no header.
    let url = format!("http://{addr}{RECORDS_SCAN}?repo=team%2Fapp&kind=manifest");
    let old = reqwest::get(url).await.unwrap();
    assert!(!old.headers().contains_key(SCAN_MORE));
    assert_eq!(old.json::<Vec<Record>>().await.unwrap().len(), 10);
}

#[tokio::test]
async fn records_round_trip() {
    let addr = serve(MemNode::new("a:1"), None).await;
    let remote = client(addr, None, TIMEOUT);
    let (m1, m2, layer) = (digest_of(b"m1"), digest_of(b"m2"), digest_of(b"layer"));
    let link = Record {
        key: RecordKey::Link(layer.clone()),
        version: v(1),
        value: Some(RecordValue::Link { size: 5 }),
        expect: None,
    };
    let tag = Record {
        key: RecordKey::Tag("latest".into()),
        version: v(2),
        value: Some(RecordValue::Tag { digest: m1.clone() }),
        expect: None,
    };
    let gone = Record::new(RecordKey::Tag("old".into()), v(3), None);
    let (base, referrer) = (manifest(&m1, None, 4), manifest(&m2, Some(&m1), 5));
    let all = [link.clone(), tag.clone(), gone.clone(), base.clone(), referrer.clone()];

    assert_eq!(remote.records_scan("team/app", RecordKind::Tag, None).await.unwrap(), None);
    remote.records_apply("team/app", &all).await.unwrap();
    remote.records_apply("other", std::slice::from_ref(&tag)).await.unwrap();
    remote.records_apply("team/app", &[]).await.unwrap();

    let keys = [tag.key.clone(), RecordKey::Tag("missing".into()), link.key.clone(), gone.key.clone()];
    let got = remote.records_get("team/app", &keys).await.unwrap();
    assert_eq!(got, vec![Some(tag.clone()), None, Some(link.clone()), Some(gone.clone())]);
    assert_eq!(remote.records_get("nothing/here", &keys[..1]).await.unwrap(), vec![None]);
    assert!(remote.records_get("team/app", &[]).await.unwrap().is_empty());

    // Last writer wins across the wire too: an older tag changes nothing.
    let stale = Record { version: v(1), value: Some(RecordValue::Tag { digest: m2.clone() }), ..tag.clone() };
    remote.records_apply("team/app", &[stale]).await.unwrap();
    assert_eq!(remote.records_get("team/app", &keys[..1]).await.unwrap(), vec![Some(tag.clone())]);

    let scan = |kind, subject| remote.records_scan("team/app", kind, subject);
    let mut tags = scan(RecordKind::Tag, None).await.unwrap().unwrap();
    tags.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(tags, vec![tag.clone(), gone.clone()]);
    assert_eq!(scan(RecordKind::Link, None).await.unwrap().unwrap(), vec![link.clone()]);
    assert_eq!(scan(RecordKind::Manifest, None).await.unwrap().unwrap().len(), 2);
    assert_eq!(scan(RecordKind::Manifest, Some(&m1)).await.unwrap().unwrap(), vec![referrer.clone()]);

    assert_eq!(remote.repos(None, 10).await.unwrap(), vec!["other".to_string(), "team/app".to_string()]);
    assert_eq!(remote.repos(None, 1).await.unwrap(), vec!["other".to_string()]);
    assert_eq!(remote.repos(Some("other"), 10).await.unwrap(), vec!["team/app".to_string()]);

    let mut all: Vec<Record> = Vec::new();
    for kind in [RecordKind::Link, RecordKind::Manifest, RecordKind::Tag] {
        all.extend(remote.records_scan("team/app", kind, None).await.unwrap().unwrap());
    }
    // A record that changed since it was confirmed is kept.
    let (changed, rest) = all.split_first().unwrap();
    let newer = Record { version: Version::new(changed.version.millis + 1, "z:9"), ..changed.clone() };
    remote.records_apply("team/app", std::slice::from_ref(&newer)).await.unwrap();
    remote.records_forget("team/app", &all).await.unwrap();
    let kept = remote.records_get("team/app", std::slice::from_ref(&changed.key)).await.unwrap();
    assert_eq!(kept, vec![Some(newer.clone())]);
    assert!(!rest.is_empty());
    remote.records_forget("team/app", std::slice::from_ref(&newer)).await.unwrap();
    assert_eq!(remote.records_scan("team/app", RecordKind::Tag, None).await.unwrap(), None);
    assert_eq!(remote.repos(None, 10).await.unwrap(), vec!["other".to_string()]);
}

#[tokio::test]
async fn more_keys_than_one_call_takes_are_batched() {
    let addr = serve(MemNode::new("a:1"), None).await;
    let remote = client(addr, None, TIMEOUT);
    let tag = Record {
        key: RecordKey::Tag("t5".into()),
        version: v(1),
        value: Some(RecordValue::Tag { digest: digest_of(b"x") }),
        expect: None,
    };
    remote.records_apply("r", std::slice::from_ref(&tag)).await.unwrap();
    let keys: Vec<RecordKey> = (0..MAX_RECORD_KEYS + 10).map(|i| RecordKey::Tag(format!("t{i}"))).collect();
    let got = remote.records_get("r", &keys).await.unwrap();
    assert_eq!(got.len(), keys.len());
    assert_eq!(got.iter().flatten().collect::<Vec<_>>(), vec![&tag]);
}

#[tokio::test]
async fn wrong_content_is_corrupt_and_not_stored() {
    let node = MemNode::new("a:1");
    let addr = serve(node.clone(), None).await;
    let remote = client(addr, None, TIMEOUT);
    let d = digest_of(b"the real content");
    let err = remote.blob_put(&d, 16, stream_of(b"not the content!")).await.unwrap_err();
    assert!(matches!(err, NodeError::Corrupt(ref c) if *c == d), "{err:?}");
    assert_eq!(node.blob_count(), 0);
    assert_eq!(remote.blob_stat(&d).await.unwrap(), None);
}

#[tokio::test]
async fn storage_errors_cross_the_wire() {
    let node = MemNode::new("a:1");
    let addr = serve(node.clone(), None).await;
    let remote = client(addr, None, TIMEOUT);
    let d = digest_of(b"x");
    node.fail_puts(|_| NodeError::StorageFull);
    assert!(matches!(remote.blob_put(&d, 1, stream_of(b"x")).await, Err(NodeError::StorageFull)));
    node.fail_puts(|n| NodeError::Storage { node: n.into(), reason: "disk on fire".into() });
    let err = remote.blob_put(&d, 1, stream_of(b"x")).await.unwrap_err();
    assert!(
        matches!(err, NodeError::Storage { ref reason, .. } if reason.contains("disk on fire")),
        "{err:?}"
    );
    node.fail_puts(|n| NodeError::Unreachable { node: n.into(), reason: "peer gone".into() });
    let err = remote.blob_put(&d, 1, stream_of(b"x")).await.unwrap_err();
    assert!(matches!(err, NodeError::Unreachable { .. }), "{err:?}");
    node.fail_puts(|n| NodeError::Refused { node: n.into(), reason: "no".into() });
    let err = remote.blob_put(&d, 1, stream_of(b"x")).await.unwrap_err();
    assert!(matches!(err, NodeError::Refused { .. }), "{err:?}");
}

#[tokio::test]
async fn wrong_or_missing_secret_is_refused() {
    let addr = serve(MemNode::new("a:1"), Some("right")).await;
    let d = digest_of(b"x");
    for remote in [client(addr, Some("wrong"), TIMEOUT), client(addr, None, TIMEOUT)] {
        let err = remote.blob_stat(&d).await.unwrap_err();
        assert!(matches!(err, NodeError::Refused { ref reason, .. } if reason.contains("401")), "{err:?}");
        let err = remote.blob_put(&d, 1, stream_of(b"x")).await.unwrap_err();
        assert!(matches!(err, NodeError::Refused { .. }), "{err:?}");
        assert!(matches!(remote.health().await, Err(NodeError::Refused { .. })));
        assert!(matches!(remote.repos(None, 1).await, Err(NodeError::Refused { .. })));
    }
    assert!(format!("{:?}", client(addr, Some("right"), TIMEOUT)).contains("<redacted>"));
    assert!(!format!("{:?}", client(addr, Some("right"), TIMEOUT)).contains("right"));
}

#[tokio::test]
async fn closed_port_is_unreachable_quickly() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let remote = client(addr, None, Duration::from_secs(2));
    let d = digest_of(b"x");
    let started = Instant::now();
    assert!(matches!(remote.blob_stat(&d).await, Err(NodeError::Unreachable { .. })));
    assert!(matches!(remote.blob_get(&d, None).await, Err(NodeError::Unreachable { .. })));
    assert!(matches!(remote.blob_put(&d, 1, stream_of(b"x")).await, Err(NodeError::Unreachable { .. })));
    assert!(matches!(
        remote.records_scan("r", RecordKind::Tag, None).await,
        Err(NodeError::Unreachable { .. })
    ));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn silent_node_is_unreachable_after_the_timeout() {
    // Connections complete in the kernel's backlog, but nothing ever answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let timeout = Duration::from_millis(300);
    let remote = client(addr, None, timeout);
    let d = digest_of(b"x");
    for call in 0..2 {
        let started = Instant::now();
        let result = if call == 0 {
            remote.blob_stat(&d).await.map(|_| ())
        } else {
            remote.blob_get(&d, None).await.map(|_| ())
        };
        assert!(matches!(result, Err(NodeError::Unreachable { .. })), "{result:?}");
        let took = started.elapsed();
        assert!(took >= timeout && took < timeout * 5, "{took:?}");
    }
    drop(listener);
}

#[tokio::test]
async fn stalled_upload_is_abandoned() {
    let node = MemNode::new("a:1");
    let addr = serve(node.clone(), None).await;
    let timeout = Duration::from_millis(300);
    let remote = client(addr, None, timeout);
    let first: Result<Bytes, std::io::Error> = Ok(Bytes::from_static(b"abc"));
    let body: ByteStream =
        Box::pin(futures_util::stream::iter([first]).chain(futures_util::stream::pending()));
    let started = Instant::now();
    let err = remote.blob_put(&digest_of(b"abcdef"), 6, body).await.unwrap_err();
    assert!(
        matches!(err, NodeError::Unreachable { ref reason, .. } if reason.contains("no progress")),
        "{err:?}"
    );
    assert!(started.elapsed() < timeout * 5);
    assert_eq!(node.blob_count(), 0);
}

#[tokio::test]
async fn slow_upload_outlasts_the_call_timeout() {
    let node = MemNode::new("a:1");
    let addr = serve(node.clone(), None).await;
    let timeout = Duration::from_millis(300);
    let remote = client(addr, None, timeout);
    let data = b"0123456789ab".to_vec();
    let chunks =
        data.chunks(2).map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c))).collect::<Vec<_>>();
    let body: ByteStream = Box::pin(futures_util::stream::iter(chunks).then(|c| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c
    }));
    let started = Instant::now();
    remote.blob_put(&digest_of(&data), data.len() as u64, body).await.unwrap();
    assert!(started.elapsed() > timeout, "the upload really was slower than one call may take");
    assert_eq!(node.blob_count(), 1);
}

#[test]
fn bad_urls_and_secrets_are_refused() {
    let new = |url: &str, secret: Option<&str>| {
        RemoteNode::new("n".into(), url.into(), secret.map(str::to_string), TIMEOUT)
    };
    assert!(matches!(new("not a url", None), Err(NodeError::Refused { .. })));
    assert!(matches!(new("ftp://host:1", None), Err(NodeError::Refused { .. })));
    assert!(matches!(new("http://host:1", Some("bad\nsecret")), Err(NodeError::Refused { .. })));
    assert!(new("http://host:1/", Some("ok")).is_ok());
}

/// A write's deadline travels with it as the time left: the receiver applies it against its
/// own clock (a caller's timeout would only stop the caller's waiting), and one already
/// past is not sent.
#[tokio::test]
async fn a_writes_deadline_reaches_the_node_that_applies_it() {
    let node = MemNode::new("a:1");
    let addr = serve(node.clone(), None).await;
    let remote = client(addr, None, TIMEOUT);
    let tag = Record::new(
        RecordKey::Tag("v1".into()),
        Version::new(1, "a:1"),
        Some(RecordValue::Tag { digest: digest_of(b"m") }),
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    remote.records_apply_by("r", std::slice::from_ref(&tag), deadline).await.unwrap();
    let got = node.apply_deadline().expect("a deadline reached the node");
    assert!(
        got <= deadline + Duration::from_millis(50) && got + Duration::from_millis(500) >= deadline,
        "{got:?} for {deadline:?}"
    );
    let past = Instant::now() - Duration::from_millis(1);
    assert!(remote.records_apply_by("other", &[tag], past).await.is_err());
    assert!(node.records_scan("other", RecordKind::Tag, None).await.unwrap().is_none());
}

/// The time left a writer sends is checked: a value that is not a number is refused (a write
/// must not go ahead with no deadline because its header was garbled), and one past the
/// read-to-write deadline is cut to it (it cannot overflow the clock either).
#[tokio::test]
async fn a_writes_deadline_header_is_checked_and_capped() {
    let node = MemNode::new("a:1");
    let addr = serve(node.clone(), None).await;
    let http = reqwest::Client::new();
    let tag = Record::new(
        RecordKey::Tag("v1".into()),
        Version::new(1, "a:1"),
        Some(RecordValue::Tag { digest: digest_of(b"m") }),
    );
    let body = serde_json::to_vec(&[tag]).unwrap();
    let post = |value: &str| {
        http.post(format!("http://{addr}{RECORDS_APPLY}?repo=r"))
            .header(header::CONTENT_TYPE, "application/json")
            .header(APPLY_DEADLINE_MS, value)
            .body(body.clone())
            .send()
    };
    assert_eq!(post("soon").await.unwrap().status(), StatusCode::BAD_REQUEST);
    assert!(
        node.records_scan("r", RecordKind::Tag, None).await.unwrap().is_none(),
        "applied without a deadline"
    );
    let sent = Instant::now();
    assert_eq!(post(&u64::MAX.to_string()).await.unwrap().status(), StatusCode::NO_CONTENT);
    let got = node.apply_deadline().unwrap();
    assert!(got <= sent + crate::cluster::gc::READ_TO_WRITE_DEADLINE + Duration::from_secs(1), "not capped");
}

/// A peek over the wire against a real store tells a held, a set-aside and an absent copy
/// apart, and leaves the set-aside one where it is; a stat brings it back.
#[tokio::test]
async fn a_peek_leaves_a_quarantined_copy_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let store = real_store(dir.path()).await;
    let addr = serve(crate::cluster::local::LocalNode::new("a:1", store), None).await;
    let remote = client(addr, None, TIMEOUT);
    let data = b"set aside by garbage collection";
    let d = digest_of(data);
    assert_eq!(remote.blob_peek(&d).await.unwrap(), Holding::Absent);
    remote.blob_put(&d, data.len() as u64, stream_of(data)).await.unwrap();
    assert_eq!(remote.blob_peek(&d).await.unwrap(), Holding::Held(data.len() as u64));
    assert!(remote.blob_quarantine(&d).await.unwrap());
    for _ in 0..2 {
        assert_eq!(remote.blob_peek(&d).await.unwrap(), Holding::Quarantined);
    }
    let aside = remote.quarantine_list(None, 10).await.unwrap();
    assert_eq!(aside.iter().map(|e| &e.digest).collect::<Vec<_>>(), [&d], "still set aside");
    assert_eq!(remote.blob_stat(&d).await.unwrap(), Some(data.len() as u64), "a stat brings it back");
    assert!(remote.quarantine_list(None, 10).await.unwrap().is_empty());
}
