//! The cluster logic in one process: three origins, each a real `OriginStore` on its own data
//! directory, joined by a topology whose members can be switched off (they then answer like
//! an unreachable origin). Covers what the process tests cannot pin down exactly: read
//! repair of a stale tag, writes falling back past a dead owner into the repair queue, repair
//! moving those copies home, and a write that cannot reach its quorum. The world, its gate and
//! the helpers are in `cluster/harness.rs`.

#[path = "cluster/harness.rs"]
mod harness;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use shoal_origin::cluster::coordinator::{Coordinator, MAX_READ_REPAIRS};
use shoal_origin::cluster::gc::{GcError, GcSettings, READ_TO_WRITE_DEADLINE};
use shoal_origin::cluster::node::Node;
use shoal_origin::cluster::record::{now_millis, Record, RecordKey, RecordKind, RecordValue, Version};
use shoal_origin::cluster::repair::Repairer;
use shoal_origin::cluster::store::ClusterStore;
use shoal_registry::store::{NewManifest, Reference};
use shoal_registry::{Algorithm, Digest, RegistryStore, RepoName, StoreError};

use harness::*;

#[tokio::test]
async fn a_push_lands_on_exactly_the_owners_whichever_origin_takes_it() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/app".parse().unwrap();
    for (i, c) in cs.iter().enumerate() {
        let d = push(&ClusterStore::new(c.clone()), &repo, format!("blob {i}").as_bytes()).await.unwrap();
        assert_eq!(holders(&world, &d).await, owners(&d.to_string()), "pushed through {}", IDS[i]);
        for other in &cs {
            let size = ClusterStore::new(other.clone()).blob_size(&repo, &d).await.unwrap();
            assert_eq!(size, Some(6), "visible from every origin");
        }
    }
}

/// The origins cap the repository lists they answer: the catalog asked of an origin that
/// holds none of them, whose two others hold the same names, got a page of exactly `n` names
/// with no `Link` (it asked each for one more, and both gave `n`), and the rest were lost.
#[tokio::test]
async fn a_catalog_of_capped_answers_still_links_to_the_rest() {
    let (world, cs) = world().await;
    let store = ClusterStore::new(cs[0].clone());
    let elsewhere: BTreeSet<String> = [IDS[1], IDS[2]].iter().map(|s| s.to_string()).collect();
    let names: Vec<String> =
        (0..200).map(|i| format!("team/r{i:03}")).filter(|n| owners(n) == elsewhere).take(12).collect();
    assert_eq!(names.len(), 12);
    for (i, name) in names.iter().enumerate() {
        push(&store, &name.parse().unwrap(), format!("blob {i}").as_bytes()).await.unwrap();
    }
    for node in world.nodes.values() {
        node.repo_list_cap.store(5, Ordering::SeqCst);
    }
    assert_eq!(catalog(&store, 5).await, names, "every repository, once, in order");
}

/// Spread over the origins, no origin holds a page's worth while together they hold more:
/// the page still links to the rest.
#[tokio::test]
async fn a_catalog_spread_over_origins_still_links_to_the_rest() {
    let (_world, cs) = world().await;
    let store = ClusterStore::new(cs[0].clone());
    // Four names for each pair of owners (R = 2 of 3): every origin holds 8, 12 together.
    let mut per_pair: std::collections::BTreeMap<BTreeSet<String>, usize> = Default::default();
    let mut names = Vec::new();
    for i in 0..1000 {
        let name = format!("team/s{i:03}");
        let count = per_pair.entry(owners(&name)).or_default();
        if *count < 4 {
            *count += 1;
            names.push(name);
        }
    }
    assert_eq!(names.len(), 12);
    for (i, name) in names.iter().enumerate() {
        push(&store, &name.parse().unwrap(), format!("spread {i}").as_bytes()).await.unwrap();
    }
    assert_eq!(catalog(&store, 10).await, names, "every repository, once, in order");
}

/// The whole catalog, `n` names a page, following each page's link (at most 10 pages).
async fn catalog(store: &ClusterStore, n: usize) -> Vec<String> {
    let (mut listed, mut last) = (Vec::new(), None::<String>);
    for _ in 0..10 {
        let page = store.repositories(last.as_deref(), n).await.unwrap();
        assert!(page.items.len() <= n);
        listed.extend(page.items);
        match page.next {
            Some(next) => last = Some(next),
            None => break,
        }
    }
    listed
}

/// `tags/list` pages read about what they show from each owner, not every tag each time,
/// and still merge the owners: a tag one owner deleted (a newer tombstone) is not listed from
/// the other's live copy, a tag only one owner holds is, and an owner of an earlier release
/// that answers every record at once is merged the same way.
#[tokio::test]
async fn tag_pages_read_about_what_they_show_and_merge_the_owners() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/app".parse().unwrap();
    let (a, b) = {
        let mut o = owners(repo.as_str()).into_iter();
        (o.next().unwrap(), o.next().unwrap())
    };
    let digest = Digest::of(Algorithm::Sha256, b"m");
    let tag = |name: String, millis: u64, live: bool| Record {
        key: RecordKey::Tag(name),
        version: Version::new(millis, "o0:5000"),
        value: live.then(|| RecordValue::Tag { digest: digest.clone() }),
        expect: None,
    };
    let all: Vec<Record> = (0..300).map(|i| tag(format!("t{i:03}"), 10, true)).collect();
    world.nodes[&a].inner.records_apply(repo.as_str(), &all).await.unwrap();
    world.nodes[&b].inner.records_apply(repo.as_str(), &all[..250]).await.unwrap();
    // Deleted on b after both had it; a still holds its live copy.
    let deleted: Vec<Record> = (100..110).map(|i| tag(format!("t{i:03}"), 20, false)).collect();
    world.nodes[&b].inner.records_apply(repo.as_str(), &deleted).await.unwrap();
    let expected: Vec<String> =
        (0..300).filter(|i| !(100..110).contains(i)).map(|i| format!("t{i:03}")).collect();
    let store = ClusterStore::new(cs[0].clone());

    for whole in [false, true] {
        world.nodes[&a].pages_whole.store(whole, Ordering::SeqCst);
        let mut listed = Vec::new();
        let mut last: Option<String> = None;
        loop {
            let before = world.nodes[&b].records_read.load(Ordering::SeqCst);
            let page = store.tags(&repo, last.as_deref(), 20).await.unwrap();
            let read = world.nodes[&b].records_read.load(Ordering::SeqCst) - before;
            assert!(read <= 2 * 21 + 10, "a page of 20 read {read} records from an owner");
            listed.extend(page.items);
            match page.next {
                Some(next) => last = Some(next),
                None => break,
            }
        }
        assert_eq!(listed, expected, "whole answers from one owner: {whole}");
    }
    let everything = store.tags(&repo, None, 10_000).await.unwrap();
    assert_eq!((everything.items, everything.next), (expected, None));
    let missing: RepoName = "team/none".parse().unwrap();
    assert!(matches!(store.tags(&missing, None, 10).await, Err(StoreError::NameUnknown)));
}

#[tokio::test]
async fn reads_return_the_newest_tag_and_repair_the_stale_owner() {
    let (world, cs) = world().await;
    let repo = "team/app";
    let target = |c: char| -> Digest { format!("sha256:{}", c.to_string().repeat(64)).parse().unwrap() };
    let record = |millis, node: &str, d| Record {
        key: RecordKey::Tag("latest".into()),
        version: Version::new(millis, node),
        value: Some(RecordValue::Tag { digest: d }),
        expect: None,
    };
    let repo_owners: Vec<String> = owners(repo).into_iter().collect();
    let (fresh, stale) = (&world.nodes[&repo_owners[0]], &world.nodes[&repo_owners[1]]);
    fresh.inner.records_apply(repo, &[record(20, "o0:5000", target('b'))]).await.unwrap();
    stale.inner.records_apply(repo, &[record(10, "o2:5000", target('a'))]).await.unwrap();

    let got = cs[0].read_records(repo, &[RecordKey::Tag("latest".into())]).await.unwrap();
    assert_eq!(got[0].as_ref().and_then(|r| r.tag_target()), Some(&target('b')));
    // Read repair runs in the background; poll the stale owner.
    for _ in 0..100 {
        let now = stale.inner.records_get(repo, &[RecordKey::Tag("latest".into())]).await.unwrap();
        if now[0].as_ref().and_then(|r| r.tag_target()) == Some(&target('b')) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the stale owner was not repaired");
}

/// An owner whose applies hang: reads that find it stale start one repair for it per
/// repository, and at most `MAX_READ_REPAIRS` in all, however many reads there are; once it
/// answers, the repairs end and the owner holds the newest records.
#[tokio::test]
async fn read_repairs_are_one_per_owner_and_repository_and_capped() {
    let (world, cs) = world().await;
    let target = |c: char| -> Digest { format!("sha256:{}", c.to_string().repeat(64)).parse().unwrap() };
    let record = |millis, d| Record {
        key: RecordKey::Tag("latest".into()),
        version: Version::new(millis, "o0:5000"),
        value: Some(RecordValue::Tag { digest: d }),
        expect: None,
    };
    let key = [RecordKey::Tag("latest".into())];
    let repos: Vec<String> = (0..3 * MAX_READ_REPAIRS).map(|i| format!("team/app{i}")).collect();
    let mut stale_owners = Vec::new();
    for repo in &repos {
        let repo_owners: Vec<String> = owners(repo).into_iter().collect();
        world.nodes[&repo_owners[0]].inner.records_apply(repo, &[record(20, target('b'))]).await.unwrap();
        world.nodes[&repo_owners[1]].inner.records_apply(repo, &[record(10, target('a'))]).await.unwrap();
        stale_owners.push(repo_owners[1].clone());
    }
    let (_reached, open) = hold_every(&world, GateOn::TagApply);
    let applies =
        || world.nodes.values().map(|n| n.applies.load(std::sync::atomic::Ordering::SeqCst)).sum::<u64>();
    for _ in 0..200 {
        let got = cs[0].read_records(&repos[0], &key).await.unwrap();
        assert_eq!(got[0].as_ref().and_then(|r| r.tag_target()), Some(&target('b')));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(applies(), 1, "200 reads of one stale repository started one repair");
    for repo in &repos {
        cs[0].read_records(repo, &key).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(applies() as usize, MAX_READ_REPAIRS, "the cap holds across repositories");
    assert_eq!(cs[0].read_repairs.running(), MAX_READ_REPAIRS);

    open.send(true).unwrap();
    for _ in 0..200 {
        if cs[0].read_repairs.running() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(cs[0].read_repairs.running(), 0, "finished repairs leave the set");
    // Later reads repair the rest.
    for repo in &repos {
        cs[0].read_records(repo, &key).await.unwrap();
        for _ in 0..100 {
            if cs[0].read_repairs.running() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for (repo, stale) in repos.iter().zip(&stale_owners) {
        let now = world.nodes[stale].inner.records_get(repo, &key).await.unwrap();
        assert_eq!(now[0].as_ref().and_then(|r| r.tag_target()), Some(&target('b')), "{repo} on {stale}");
    }
}

#[tokio::test]
async fn a_dead_owner_is_skipped_queued_and_repaired_when_it_returns() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/app".parse().unwrap();
    // Find content whose owners include o2, and push it through o0 while o2 is down but not
    // yet known to be (health checks have not caught up): the write falls back to the third
    // origin and is queued for repair.
    let mut data = Vec::new();
    for i in 0.. {
        data = format!("payload {i}").into_bytes();
        if owners(&Digest::of(Algorithm::Sha256, &data).to_string()).contains("o2:5000") {
            break;
        }
    }
    switch(&world, "o2:5000", true);
    let store0 = ClusterStore::new(cs[0].clone());
    let d = push(&store0, &repo, &data).await.unwrap();
    let all: BTreeSet<String> = IDS.iter().map(|s| s.to_string()).collect();
    let expected_now: BTreeSet<String> = all.iter().filter(|id| *id != "o2:5000").cloned().collect();
    assert_eq!(holders(&world, &d).await, expected_now, "two copies, on the live origins");
    let queued = cs.iter().map(|c| c.local.store().clone());
    let mut total = 0;
    for s in queued {
        total += s.repair_len().await.unwrap();
    }
    assert!(total >= 1, "the missed copy is queued");
    assert!(cs[0].metrics.replication_failures.get() >= 1);

    // o2 comes back; a full repair pass on every origin moves the copy home and removes the
    // extra one.
    switch(&world, "o2:5000", false);
    let handles: Vec<_> =
        cs.iter().map(|c| Repairer::start(c.clone(), 1 << 30, Duration::from_secs(3600))).collect();
    // An owner copies to the owner that missed it; the origin holding the surplus copy drops
    // it once both owners confirm, which may take it a second pass.
    for _round in 0..2 {
        for handle in &handles {
            handle.run_now().await.unwrap();
        }
    }
    assert_eq!(holders(&world, &d).await, owners(&d.to_string()));
    for c in &cs {
        assert_eq!(c.local.store().repair_len().await.unwrap(), 0, "{}: queue drained", c.me());
    }
    let got = ClusterStore::new(cs[2].clone()).blob_size(&repo, &d).await.unwrap();
    assert_eq!(got, Some(data.len() as u64));
}

#[tokio::test]
async fn a_write_that_cannot_reach_its_quorum_fails_and_links_nothing() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/app".parse().unwrap();
    switch(&world, "o1:5000", true);
    switch(&world, "o2:5000", true);
    let store0 = ClusterStore::new(cs[0].clone());
    let err = push(&store0, &repo, b"lonely").await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    switch(&world, "o1:5000", false);
    switch(&world, "o2:5000", false);
    let d = Digest::of(Algorithm::Sha256, b"lonely");
    assert_eq!(store0.blob_size(&repo, &d).await.unwrap(), None, "a failed push is not visible");
    let tag = store0.manifest_get(&repo, &Reference::Tag("latest".parse().unwrap())).await.unwrap();
    assert!(tag.is_none());
}

/// GC's mark must see every owner's manifests. When the owners of a repository fail to list
/// them (a scan that times out, or an answer too big to take) and the other origin answers
/// that it does not know the repository, GC used to mark the repository empty and unlink, then
/// delete, the layers of its live images. Now GC stops, and the image stays whole; reads of
/// the repository's records say "unavailable", not "unknown".
#[tokio::test]
async fn gc_stops_when_the_owners_cannot_list_a_repositorys_manifests() {
    let (world, cs) = world().await;
    let lead = leading(&cs);
    let repo: RepoName = (0..)
        .map(|i| format!("team/listed{i}"))
        .find(|r| !owners(r).contains(lead.me()))
        .unwrap()
        .parse()
        .unwrap();
    let store = ClusterStore::new(cs[0].clone());
    let config = push(&store, &repo, b"{}").await.unwrap();
    let layer = push(&store, &repo, b"layer").await.unwrap();
    let m = manifest(&config, &layer);
    store.manifest_put(&repo, Some(&"v1".parse().unwrap()), m.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for owner in owners(repo.as_str()) {
        world.nodes[&owner].failing_manifest_scans.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    let scanned = lead.scan_records(repo.as_str(), RecordKind::Manifest, None).await;
    assert!(matches!(scanned, Err(StoreError::Unavailable(_))), "{scanned:?}");
    for _ in 0..3 {
        let result = shoal_origin::cluster::gc::collect(&lead, quick_gc()).await;
        assert!(matches!(result, Err(GcError::Store(StoreError::Unavailable(_)))), "{result:?}");
        tokio::time::sleep(quick_gc().quarantine).await;
    }
    for owner in owners(repo.as_str()) {
        world.nodes[&owner].failing_manifest_scans.store(false, std::sync::atomic::Ordering::SeqCst);
    }
    assert_image_whole(&cs, &repo, "v1", &m.digest, &[(&layer, b"layer"), (&config, b"{}")]).await;
    assert_eq!(holders(&world, &layer).await, owners(&layer.to_string()));
    // With the owners answering again, GC runs and finds nothing to take.
    let report = shoal_origin::cluster::gc::collect(&lead, quick_gc()).await.unwrap();
    assert_image_whole(&cs, &repo, "v1", &m.digest, &[(&layer, b"layer"), (&config, b"{}")]).await;
    assert_eq!((report.quarantined_blobs, report.swept_blobs), (0, 0), "{report:?}");
}

/// R = 1. An image is pushed while its repository's owner is down: its records land on the
/// next origin in the ranking, and nothing is queued (every live owner took the write). The
/// owner comes back, holding an older image of the same repository, before any repair pass.
/// GC must read the repository everywhere: asking only the owner (which knows the repository,
/// so nobody else was asked), it missed the new image and purged its layer.
#[tokio::test]
async fn gc_reads_what_a_write_left_beside_a_down_owner() {
    let (world, cs) = world_with(1).await;
    let all: Vec<String> = IDS.iter().map(|s| s.to_string()).collect();
    let repo: RepoName = "team/moved".parse().unwrap();
    let owner = shoal_origin::cluster::placement::owners(repo.as_str(), &all, 1)[0].clone();
    let through = cs.iter().find(|c| c.me() != owner).unwrap().clone();
    let store = ClusterStore::new(through.clone());
    let old_config = push(&store, &repo, b"{\"old\":1}").await.unwrap();
    let old_layer = push(&store, &repo, b"old layer").await.unwrap();
    store.manifest_put(&repo, Some(&"v0".parse().unwrap()), manifest(&old_config, &old_layer)).await.unwrap();

    switch(&world, &owner, true);
    world.live.lock().unwrap().retain(|id| *id != owner);
    let config = push(&store, &repo, b"{}").await.unwrap();
    let layer = push(&store, &repo, b"new layer").await.unwrap();
    let m = manifest(&config, &layer);
    store.manifest_put(&repo, Some(&"v1".parse().unwrap()), m.clone()).await.unwrap();
    switch(&world, &owner, false);
    *world.live.lock().unwrap() = all.clone();
    tokio::time::sleep(Duration::from_millis(20)).await;

    let lead = leading(&cs);
    let report = shoal_origin::cluster::gc::collect(&lead, quick_gc()).await.unwrap();
    assert_eq!(report.swept_blobs, 0, "{report:?}");
    assert_image_whole(&cs, &repo, "v1", &m.digest, &[(&layer, b"new layer"), (&config, b"{}")]).await;
}

/// Origins whose repository lists fail (timing out) would hide the repositories only they
/// hold: GC stops instead of taking those repositories' blobs for garbage.
#[tokio::test]
async fn gc_stops_when_an_origin_cannot_list_its_repositories() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/unlisted".parse().unwrap();
    let store = ClusterStore::new(cs[0].clone());
    let config = push(&store, &repo, b"{}").await.unwrap();
    let layer = push(&store, &repo, b"unlisted layer").await.unwrap();
    let m = manifest(&config, &layer);
    store.manifest_put(&repo, Some(&"v1".parse().unwrap()), m.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for owner in owners(repo.as_str()) {
        world.nodes[&owner].failing_repo_lists.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    let lead = leading(&cs);
    let result = shoal_origin::cluster::gc::collect(&lead, quick_gc()).await;
    assert!(matches!(result, Err(GcError::Store(StoreError::Unavailable(_)))), "{result:?}");
    for owner in owners(repo.as_str()) {
        world.nodes[&owner].failing_repo_lists.store(false, std::sync::atomic::Ordering::SeqCst);
    }
    assert_image_whole(&cs, &repo, "v1", &m.digest, &[(&layer, b"unlisted layer"), (&config, b"{}")]).await;
}

/// A referrer deleted while one owner was down is not listed once that owner is back, before
/// repair reaches it: the subject index of the owners that took the delete says nothing of the
/// referrer, the stale owner's still lists it, and the listing weighs the newer tombstone.
#[tokio::test]
async fn a_deleted_referrer_is_not_listed_while_one_owner_still_holds_it() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/signed".parse().unwrap();
    let store = ClusterStore::new(cs[0].clone());
    let config = push(&store, &repo, b"{}").await.unwrap();
    let layer = push(&store, &repo, b"layer").await.unwrap();
    let subject = manifest(&config, &layer);
    store.manifest_put(&repo, Some(&"v1".parse().unwrap()), subject.clone()).await.unwrap();
    let bytes = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","artifactType":"application/vnd.example.sig","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{config}","size":2}},"layers":[],"subject":{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":{}}}}}"#,
        subject.digest,
        subject.bytes.len()
    )
    .into_bytes();
    let parsed = shoal_registry::manifest::parse_manifest(None, &bytes).unwrap();
    let referrer = NewManifest { digest: Digest::of(Algorithm::Sha256, &bytes), bytes: bytes.into(), parsed };
    store.manifest_put(&repo, None, referrer.clone()).await.unwrap();
    let listed = store.referrers(&repo, &subject.digest).await.unwrap();
    assert_eq!(listed.iter().map(|r| &r.digest).collect::<Vec<_>>(), [&referrer.digest]);
    // The delete reached one owner only (the other was down, and is back before repair).
    let owned: Vec<String> = owners(repo.as_str()).into_iter().collect();
    let tombstone = Record {
        key: RecordKey::Manifest(referrer.digest.clone()),
        version: Version {
            millis: shoal_origin::cluster::record::now_millis() + 1000,
            logical: 0,
            node: owned[0].clone(),
        },
        value: None,
        expect: None,
    };
    world.nodes[&owned[0]].inner.records_apply(repo.as_str(), &[tombstone]).await.unwrap();
    for c in &cs {
        let listed = ClusterStore::new(c.clone()).referrers(&repo, &subject.digest).await.unwrap();
        assert!(listed.is_empty(), "through {}: {listed:?}", c.me());
        let gone = ClusterStore::new(c.clone())
            .manifest_get(&repo, &Reference::Digest(referrer.digest.clone()))
            .await
            .unwrap();
        assert!(gone.is_none(), "through {}", c.me());
    }
}

/// The race users hit: GC marks a layer unreferenced, then `docker push` of a new image that
/// reuses it (HEAD says the layer exists, so only the manifest is put) refreshes the layer's
/// link before GC's tombstone lands. The tombstone is conditional on the marked version, so it
/// does not apply; the new image stays whole, on every origin.
#[tokio::test]
async fn gc_keeps_a_layer_a_manifest_reused_between_mark_and_unlink() {
    let (world, cs) = world().await;
    // A repository the leader does not own: the gate is on the members' wrappers, and a
    // coordinator calls its own member directly, so the leader's own copy of a tombstone
    // would apply at once (and, under load, before the put below reads the links).
    let lead = leading(&cs);
    let repo: RepoName = (0..)
        .map(|i| format!("team/app{i}"))
        .find(|r| !owners(r).contains(lead.me()))
        .unwrap()
        .parse()
        .unwrap();
    let (config, layer) = garbage_image(&cs, &repo, b"layer").await;
    let (reached, open) = hold_every(&world, GateOn::Tombstone);
    let gc = tokio::spawn({
        let c = lead.clone();
        async move { shoal_origin::cluster::gc::collect(&c, quick_gc()).await }
    });
    tokio::time::timeout(Duration::from_secs(20), reached.notified()).await.expect("gc reached the gate");
    // GC has marked and is about to unlink the layer: no owner has applied a tombstone yet.
    for owner in owners(repo.as_str()) {
        let keys = [RecordKey::Link(config.clone()), RecordKey::Link(layer.clone())];
        let links = world.nodes[&owner].inner.records_get(repo.as_str(), &keys).await.unwrap();
        assert!(links.iter().all(|l| l.as_ref().is_some_and(|r| r.is_live())), "{owner}: {links:?}");
    }
    // A manifest reusing the layer is put now.
    let again = manifest(&config, &layer);
    ClusterStore::new(cs[1].clone())
        .manifest_put(&repo, Some(&"v2".parse().unwrap()), again.clone())
        .await
        .unwrap();
    open.send(true).unwrap();
    let report = gc.await.unwrap().unwrap();
    assert!(report.links_refreshed >= 1, "{report:?}");
    assert_image_whole(&cs, &repo, "v2", &again.digest, &[(&layer, b"layer"), (&config, b"{}")]).await;
    assert_eq!(holders(&world, &layer).await, owners(&layer.to_string()));
}

/// The same race, with the put's write slow to reach the owners: it read the layer's live
/// link before GC unlinked it, but its records land after GC's tombstone. The refresh is newer
/// than the link GC marked, and the tombstone outranks only that version, so the refresh wins
/// on every owner and in every read: the acknowledged image stays whole. (With tombstones
/// versioned by the collector's clock, the refresh lost to the later tombstone and reads of the
/// layer said BLOB_UNKNOWN.)
#[tokio::test]
async fn gc_tombstone_loses_to_a_refresh_that_lands_after_it() {
    let (world, cs) = world().await;
    // Put through the one origin that does not own the repository, so every copy of its write
    // crosses a gated member.
    let repo: RepoName = "team/slow".parse().unwrap();
    let owned = owners(repo.as_str());
    let putter = non_owner(&cs, &repo);
    let (config, layer) = garbage_image(&cs, &repo, b"layer").await;
    let again = manifest(&config, &layer);
    let (reached, open) = hold_every(&world, GateOn::LiveLink);
    let put = tokio::spawn({
        let (repo, again) = (repo.clone(), again.clone());
        async move { ClusterStore::new(putter).manifest_put(&repo, Some(&"v2".parse().unwrap()), again).await }
    });
    tokio::time::timeout(Duration::from_secs(20), reached.notified())
        .await
        .expect("the put reached the owners");
    // The put has read the live links and its records wait at both owners. GC runs now.
    let settings = GcSettings { grace: Duration::from_millis(1), quarantine: Duration::from_secs(3) };
    let gc = tokio::spawn({
        let c = leading(&cs);
        async move { shoal_origin::cluster::gc::collect(&c, settings).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    'unlinked: loop {
        let mut dead = 0;
        for owner in &owned {
            let link =
                world.nodes[owner].inner.records_get(repo.as_str(), &[RecordKey::Link(layer.clone())]).await;
            dead += usize::from(link.unwrap()[0].as_ref().is_some_and(|r| !r.is_live()));
        }
        if dead == owned.len() {
            break 'unlinked;
        }
        assert!(tokio::time::Instant::now() < deadline, "GC did not unlink the layer on every owner");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // GC's tombstone is on every owner; the put's records arrive now, and it is acknowledged.
    open.send(true).unwrap();
    put.await.unwrap().expect("the put read live links in time: acknowledged");
    assert_image_whole(&cs, &repo, "v2", &again.digest, &[(&layer, b"layer"), (&config, b"{}")]).await;
    let report = gc.await.unwrap().unwrap();
    assert_eq!(report.swept_blobs, 0, "{report:?}");
    assert_blob_everywhere(&cs, &repo, &layer, b"layer", "after GC").await;
    assert_eq!(holders(&world, &layer).await, owners(&layer.to_string()));
}

/// An upload of a blob the owners already hold (an old copy, a GC candidate) links it with a
/// write that must land within `READ_TO_WRITE_DEADLINE` of the owners' check, as a mount's or
/// a manifest put's must: held past it, the upload fails (the client retries) instead of
/// being acknowledged after GC may have purged the copies it counted on.
#[tokio::test]
async fn an_upload_whose_link_cannot_land_within_the_gc_deadline_fails() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/relinked".parse().unwrap();
    let store = ClusterStore::new(non_owner(&cs, &repo));
    push(&store, &repo, b"held already").await.unwrap();
    let (reached, open) = hold_every(&world, GateOn::LiveLink);
    let upload = tokio::spawn({
        let (store, repo) = (store.clone(), repo.clone());
        async move { push(&store, &repo, b"held already").await }
    });
    tokio::time::timeout(Duration::from_secs(20), reached.notified())
        .await
        .expect("the upload's link reached the owners");
    tokio::time::sleep(READ_TO_WRITE_DEADLINE + Duration::from_secs(1)).await;
    open.send(true).unwrap();
    let result = upload.await.unwrap();
    assert!(matches!(result, Err(StoreError::Unavailable(_))), "{result:?}");
}

/// GC's safety rests on every write that read a live link *landing* within
/// `READ_TO_WRITE_DEADLINE` of the read: its last mark, a quarantine after the unlink, must see
/// it. A manifest put whose records the owners hold past the deadline therefore fails (503, the
/// client retries) rather than being acknowledged after GC may have deleted its layer; and the
/// retry, once the owners answer again, succeeds.
#[tokio::test]
async fn a_manifest_put_that_cannot_land_within_the_gc_deadline_fails() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/late".parse().unwrap();
    let owned = owners(repo.as_str());
    let putter = non_owner(&cs, &repo);
    let store = ClusterStore::new(putter.clone());
    let config = push(&store, &repo, b"{}").await.unwrap();
    let layer = push(&store, &repo, b"late").await.unwrap();
    let m = manifest(&config, &layer);
    let (reached, open) = hold_every(&world, GateOn::LiveLink);
    let started = std::time::Instant::now();
    let put = tokio::spawn({
        let (store, repo, m) = (ClusterStore::new(putter.clone()), repo.clone(), m.clone());
        async move { store.manifest_put(&repo, Some(&"v1".parse().unwrap()), m).await }
    });
    tokio::time::timeout(Duration::from_secs(20), reached.notified())
        .await
        .expect("the put reached the owners");
    let result = tokio::time::timeout(READ_TO_WRITE_DEADLINE + Duration::from_secs(10), put)
        .await
        .expect("the put gave up at its deadline")
        .unwrap();
    assert!(matches!(result, Err(StoreError::Unavailable(_))), "{result:?}");
    assert!(
        started.elapsed() >= READ_TO_WRITE_DEADLINE.mul_f32(0.9),
        "gave up early: {:?}",
        started.elapsed()
    );
    // Nothing was acknowledged, and no owner took the held records.
    for owner in &owned {
        let got = world.nodes[owner]
            .inner
            .records_get(repo.as_str(), &[RecordKey::Manifest(m.digest.clone())])
            .await;
        assert!(got.unwrap()[0].is_none(), "{owner} holds the manifest");
    }
    open.send(true).unwrap();
    store.manifest_put(&repo, Some(&"v1".parse().unwrap()), m.clone()).await.expect("the retry lands");
    assert_image_whole(&cs, &repo, "v1", &m.digest, &[(&layer, b"late")]).await;
}

/// The later window: GC has unlinked a layer and is setting its files aside when the layer is
/// uploaded again and a manifest using it is put (`201`). The files go to quarantine, but
/// reading the image brings them back at once, and GC's last mark restores rather than
/// deletes anything a live manifest uses.
#[tokio::test]
async fn gc_restores_a_layer_pushed_again_while_it_was_being_set_aside() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/app".parse().unwrap();
    // A layer the leader does not hold, so the gate (on the remote members) stops GC before
    // it sets aside the first copy, and the push below finds every copy still in place.
    let lead = leading(&cs);
    let content = (0..)
        .map(|i| format!("layer {i}").into_bytes())
        .find(|c| !owners(&Digest::of(Algorithm::Sha256, c).to_string()).contains(lead.me()))
        .unwrap();
    let (config, layer) = garbage_image(&cs, &repo, &content).await;
    let (reached, release) = gate(&world, GateOn::Quarantine(layer.clone()));
    let gc = tokio::spawn({
        let c = lead.clone();
        async move { shoal_origin::cluster::gc::collect(&c, quick_gc()).await }
    });
    tokio::time::timeout(Duration::from_secs(20), reached.notified()).await.expect("gc reached the gate");
    // The layer's link is a tombstone now: a client pushes it again, then the manifest.
    let store = ClusterStore::new(cs[2].clone());
    assert_eq!(push(&store, &repo, &content).await.unwrap(), layer);
    assert_eq!(push(&store, &repo, b"{}").await.unwrap(), config);
    let again = manifest(&config, &layer);
    store.manifest_put(&repo, Some(&"v2".parse().unwrap()), again.clone()).await.unwrap();
    release.notify_one();
    // Every copy is set aside now; while GC waits out the quarantine, the acknowledged image
    // is readable everywhere (a read brings the files back).
    let aside = || async {
        let mut n = 0;
        for node in world.nodes.values() {
            n += node
                .inner
                .quarantine_list(None, 10)
                .await
                .unwrap()
                .iter()
                .filter(|e| e.digest == layer)
                .count();
        }
        n
    };
    while aside().await < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_blob_everywhere(&cs, &repo, &layer, &content, "during gc").await;
    let report = gc.await.unwrap().unwrap();
    println!("{report:?}");
    assert_image_whole(&cs, &repo, "v2", &again.digest, &[(&layer, &content), (&config, b"{}")]).await;
    // Nothing was lost, and nothing is left aside.
    for node in world.nodes.values() {
        assert!(node.inner.quarantine_list(None, 10).await.unwrap().is_empty());
    }
}

/// Garbage that nothing races is deleted, only after the quarantine, and GC refuses to run
/// with a member down or from an origin that does not lead.
#[tokio::test]
async fn gc_deletes_garbage_after_quarantine_and_only_on_a_whole_cluster() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/app".parse().unwrap();
    let (config, layer) = garbage_image(&cs, &repo, b"layer").await;
    let leader = shoal_origin::cluster::gc::leader(&cs[0]).unwrap();
    let (lead, follower) = {
        let i = IDS.iter().position(|id| *id == leader).unwrap();
        (cs[i].clone(), cs[(i + 1) % 3].clone())
    };
    match shoal_origin::cluster::gc::collect(&follower, quick_gc()).await {
        Err(GcError::NotLeader { leader: l }) => assert_eq!(l, leader),
        other => panic!("a follower collected: {other:?}"),
    }
    switch(&world, IDS[0], true);
    world.live.lock().unwrap().retain(|id| id != IDS[0]);
    assert!(matches!(
        shoal_origin::cluster::gc::collect(&lead, quick_gc()).await,
        Err(GcError::MemberDown(_)) | Err(GcError::NotLeader { .. })
    ));
    switch(&world, IDS[0], false);
    *world.live.lock().unwrap() = IDS.iter().map(|s| s.to_string()).collect();
    let report = shoal_origin::cluster::gc::collect(&lead, quick_gc()).await.unwrap();
    assert_eq!((report.quarantined_blobs, report.swept_blobs), (2, 2), "{report:?}");
    assert!(holders(&world, &layer).await.is_empty() && holders(&world, &config).await.is_empty());
}

/// Repair racing a write: a non-owner holds a repository's records (written while an owner was
/// unreachable); while its repair hands them to the owners, another write lands on it the same
/// way. Repair then forgets exactly the records the owners confirmed: the new one stays here
/// (repair hands it over next time) instead of being dropped with the rest.
#[tokio::test]
async fn repair_forgets_only_what_the_owners_confirmed() {
    let (world, cs) = world().await;
    let x = "o2:5000";
    let repo = (0..).map(|i| format!("team/app{i}")).find(|r| !owners(r).contains(x)).unwrap();
    let down = owners(&repo).into_iter().nth(1).unwrap();
    let digest = Digest::of(Algorithm::Sha256, b"m");
    let tag = |name: &str, c: &Coordinator| {
        Record::new(
            RecordKey::Tag(name.into()),
            c.clock.next(),
            Some(RecordValue::Tag { digest: digest.clone() }),
        )
    };
    // Written while an owner is unreachable: the records fall back to x.
    switch(&world, &down, true);
    cs[0].write_records(&repo, vec![tag("t1", &cs[0])]).await.unwrap();
    switch(&world, &down, false);
    let x_node = &world.nodes[x].inner;
    assert!(x_node.records_get(&repo, &[RecordKey::Tag("t1".into())]).await.unwrap()[0].is_some());

    let (reached, release) = gate(&world, GateOn::TagApply);
    let i = IDS.iter().position(|id| *id == x).unwrap();
    let repairer = Repairer::start(cs[i].clone(), 1 << 30, Duration::from_secs(3600));
    let run = tokio::spawn(async move { repairer.run_now().await });
    tokio::time::timeout(Duration::from_secs(20), reached.notified()).await.expect("repair reached the gate");
    // While repair hands t1 over, t2 is written the same way.
    switch(&world, &down, true);
    cs[0].write_records(&repo, vec![tag("t2", &cs[0])]).await.unwrap();
    switch(&world, &down, false);
    release.notify_one();
    run.await.unwrap().unwrap();

    let held =
        x_node.records_get(&repo, &[RecordKey::Tag("t1".into()), RecordKey::Tag("t2".into())]).await.unwrap();
    assert!(held[0].is_none(), "t1 went to the owners and was forgotten here");
    assert!(held[1].is_some(), "t2, which the owners had not confirmed, is still here");
    for owner in owners(&repo) {
        let got = world.nodes[&owner].inner.records_get(&repo, &[RecordKey::Tag("t1".into())]).await.unwrap();
        assert!(got[0].is_some(), "{owner} has t1");
    }
}

/// R = 1: the only owner of [`Retag::REPO`] and another origin that writes its `v1` tag.
struct Retag {
    world: std::sync::Arc<World>,
    cs: Vec<std::sync::Arc<Coordinator>>,
    owner: String,
    writer: std::sync::Arc<Coordinator>,
}

impl Retag {
    const REPO: &'static str = "team/app";

    async fn new() -> Retag {
        let (world, cs) = world_with(1).await;
        let owner = shoal_origin::cluster::placement::owners(Self::REPO, &ids(), 1).remove(0);
        let writer = cs.iter().find(|c| c.me() != owner).unwrap().clone();
        Retag { world, cs, owner, writer }
    }

    /// Point `v1` at `digest`, through the writer.
    async fn tag(&self, digest: &Digest) {
        let value = Some(RecordValue::Tag { digest: digest.clone() });
        let record = Record::new(RecordKey::Tag("v1".into()), self.writer.clock.next(), value);
        self.writer.write_records(Self::REPO, vec![record]).await.unwrap();
    }

    /// What `v1` reads as now.
    async fn read(&self) -> Option<Digest> {
        let got = self.cs[0].read_records(Self::REPO, &[RecordKey::Tag("v1".into())]).await.unwrap();
        got[0].as_ref().and_then(|r| r.tag_target()).cloned()
    }

    /// Whether `v1` reads as `digest` within `within`.
    async fn reads_within(&self, digest: &Digest, within: Duration) -> bool {
        let home = async {
            while self.read().await.as_ref() != Some(digest) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(within, home).await.is_ok()
    }

    /// Put `n` blobs that other origins own on the writer, as a repair pass walks them.
    async fn hold_foreign_blobs(&self, n: usize) {
        let mut held = 0;
        for i in 0.. {
            let data = format!("blob {i}").into_bytes();
            let digest = Digest::of(Algorithm::Sha256, &data);
            if shoal_origin::cluster::placement::owners(&digest.to_string(), &ids(), 1)[0] == self.writer.me()
            {
                continue;
            }
            self.writer.local.blob_put(&digest, data.len() as u64, body(&data)).await.unwrap();
            held += 1;
            if held == n {
                return;
            }
        }
    }
}

fn ids() -> Vec<String> {
    IDS.iter().map(|s| s.to_string()).collect()
}

/// A retag written while a repository's only owner (R = 1) was unreachable lands on another
/// origin; reads ask the owner and see the old tag until the record comes home. The pass that
/// follows the owner's return works the queue before its walk over every blob held here
/// (held at the first blob check here, as a walk over a large store would be), so the
/// record is home within seconds.
#[tokio::test]
async fn a_write_that_fell_back_goes_home_before_the_walk_over_every_blob() {
    let r = Retag::new().await;
    let (old, new) = (Digest::of(Algorithm::Sha256, b"old"), Digest::of(Algorithm::Sha256, b"new"));
    r.tag(&old).await;
    switch(&r.world, &r.owner, true);
    r.tag(&new).await;
    switch(&r.world, &r.owner, false);
    assert_eq!(r.read().await, Some(old.clone()), "the owner answers reads with what it holds");

    // A blob held here that another origin owns: the walk stops at its check.
    r.hold_foreign_blobs(1).await;
    let (reached, open) = hold_every(&r.world, GateOn::BlobStat);
    let _repairer = Repairer::start(r.writer.clone(), 1 << 30, Duration::from_secs(3600));
    // The membership changes once the loop has taken note of the generation it started in.
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.world.generation.fetch_add(1, Ordering::SeqCst);
    let home = r.reads_within(&new, Duration::from_secs(10)).await;
    let walked = tokio::time::timeout(Duration::from_secs(1), reached.notified()).await.is_ok();
    let _ = open.send(true);
    assert!(home, "the retag stayed away from its owner while the blobs were walked");
    assert!(walked, "the pass went on to the blobs");
}

/// The same when the owner comes back while a pass (the one its leaving started) walks the
/// blobs: the walk works the queue as soon as the membership changes, not at its end.
#[tokio::test]
async fn a_write_that_fell_back_goes_home_when_its_owner_returns_during_a_walk() {
    let r = Retag::new().await;
    let (old, new) = (Digest::of(Algorithm::Sha256, b"old"), Digest::of(Algorithm::Sha256, b"new"));
    r.tag(&old).await;
    // Blobs held here that others own, each check 100 ms: a walk of many seconds.
    r.hold_foreign_blobs(200).await;
    for node in r.world.nodes.values() {
        node.stat_delay_ms.store(100, Ordering::SeqCst);
    }
    let _repairer = Repairer::start(r.writer.clone(), 1 << 30, Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The owner leaves: a pass starts a tick or two later and walks the blobs.
    switch(&r.world, &r.owner, true);
    r.world.generation.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    r.tag(&new).await;
    switch(&r.world, &r.owner, false);
    r.world.generation.fetch_add(1, Ordering::SeqCst);
    assert!(
        r.reads_within(&new, Duration::from_secs(3)).await,
        "the retag waited for the end of the walk over the blobs"
    );
}

/// Two collections asked of the leader at once: one runs, the other is refused while it does.
#[tokio::test]
async fn only_one_collection_runs_at_a_time() {
    let (_world, cs) = world().await;
    let repo: RepoName = "team/app".parse().unwrap();
    garbage_image(&cs, &repo, b"layer").await;
    let lead = leading(&cs);
    let settings = GcSettings { grace: Duration::from_millis(1), quarantine: Duration::from_millis(500) };
    let (a, b) = tokio::join!(
        shoal_origin::cluster::gc::collect(&lead, settings),
        shoal_origin::cluster::gc::collect(&lead, settings)
    );
    let refused = [&a, &b].iter().filter(|r| matches!(r, Err(GcError::Running))).count();
    let ran = [&a, &b].iter().filter(|r| r.is_ok()).count();
    assert_eq!((ran, refused), (1, 1), "{a:?} {b:?}");
}

/// An owner whose disk is nearly full gets no new copies: the write lands on the next origin
/// of the ranking (queued for repair), and is readable everywhere.
#[tokio::test]
async fn placement_skips_an_origin_whose_disk_is_nearly_full() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/app".parse().unwrap();
    let data = b"a blob while a disk is full".to_vec();
    let d = Digest::of(Algorithm::Sha256, &data);
    let full = owners(&d.to_string()).into_iter().next().unwrap();
    world.full.lock().unwrap().insert(full.clone());
    // Pushed through another origin (the full one is not ready, so clients are not sent to it).
    let through = cs.iter().find(|c| c.me() != full).unwrap();
    let pushed = push(&ClusterStore::new(through.clone()), &repo, &data).await.unwrap();
    let held = holders(&world, &pushed).await;
    assert!(!held.contains(&full), "the full origin took a copy: {held:?}");
    assert_eq!(held.len(), 2, "two copies on the others: {held:?}");
    for c in &cs {
        assert_eq!(
            ClusterStore::new(c.clone()).blob_size(&repo, &pushed).await.unwrap(),
            Some(data.len() as u64)
        );
    }
}

/// An owner whose clock runs minutes behind refuses this origin's records as too far ahead.
/// While this origin has not measured that clock, it cannot tell whose clock is wrong: the
/// write ends there, failed, with no copy on this origin or on a fallback (a copy would win
/// reads over later writes, and spread once the clocks agree). Once it has measured the other
/// clock as the odd one, the write goes past it as past a dead owner. An origin whose clock
/// disagrees with most others', or that read a version its clock cannot follow, writes nothing.
#[tokio::test]
async fn a_write_refused_for_its_clock_lands_nowhere_unless_the_refusing_clock_is_the_odd_one() {
    let (world, cs) = world().await;
    let repo = "team/app";
    let coordinator = |id: &str| cs[IDS.iter().position(|i| *i == id).unwrap()].clone();
    let repo_owners: Vec<String> = owners(repo).into_iter().collect();
    let (writer, refuser) = (coordinator(&repo_owners[0]), &repo_owners[1]);
    let third = IDS.iter().find(|id| !repo_owners.contains(&id.to_string())).unwrap().to_string();
    let minutes = 5 * 60_000;
    world.nodes[refuser].clock_behind_ms.store(minutes, std::sync::atomic::Ordering::SeqCst);
    let key = RecordKey::Tag("latest".into());
    let target = |c: char| -> Digest { format!("sha256:{}", c.to_string().repeat(64)).parse().unwrap() };
    let tag = |c: &Coordinator, d: char| {
        Record::new(key.clone(), c.clock.next(), Some(RecordValue::Tag { digest: target(d) }))
    };
    let held = |id: String| {
        let world = world.clone();
        let key = key.clone();
        async move { world.nodes[&id].inner.records_get(repo, &[key]).await.unwrap()[0].clone() }
    };

    let err = writer.write_records(repo, vec![tag(&writer, 'a')]).await.unwrap_err();
    assert!(matches!(&err, StoreError::Unavailable(why) if why.contains("clocks in sync")), "{err:?}");
    for id in IDS {
        assert_eq!(held(id.to_string()).await, None, "{id} holds a write that failed");
    }

    // Measured: the refusing clock is the odd one out (the third agrees with the writer).
    writer.skews.update(refuser, -(minutes as i64));
    writer.skews.update(&third, 40);
    writer.write_records(repo, vec![tag(&writer, 'b')]).await.unwrap();
    assert_eq!(held(refuser.clone()).await, None);
    for id in [writer.me().to_string(), third.clone()] {
        assert_eq!(held(id.clone()).await.and_then(|r| r.tag_target().cloned()), Some(target('b')), "{id}");
    }

    // The writer's clock is the odd one: most others disagree with it.
    writer.skews.update(&third, minutes as i64);
    let err = writer.write_records(repo, vec![tag(&writer, 'c')]).await.unwrap_err();
    assert!(matches!(&err, StoreError::Unavailable(why) if why.contains("2 of the 2")), "{err:?}");

    // An origin that read a version far ahead of its clock would write an older one.
    let behind = coordinator(&third);
    let future = Version::new(now_millis() + minutes, refuser);
    assert!(!behind.clock.observe(&future));
    let err = behind.write_records(repo, vec![tag(&behind, 'd')]).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable(why) if why.contains("behind a version it has read")),
        "{err:?}"
    );
    for id in IDS {
        let kept = held(id.to_string()).await.and_then(|r| r.tag_target().cloned());
        assert_ne!(kept, Some(target('c')), "{id}");
        assert_ne!(kept, Some(target('d')), "{id}");
    }
}
