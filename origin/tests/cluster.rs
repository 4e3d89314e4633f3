//! The cluster logic in one process: three origins, each a real `OriginStore` on its own data
//! directory, joined by a topology whose members can be switched off (they then answer like
//! an unreachable origin). Covers what the process tests cannot pin down exactly: read
//! repair of a stale tag, writes falling back past a dead owner into the repair queue, repair
//! moving those copies home, and a write that cannot reach its quorum. The world, its gate and
//! the helpers are in `cluster/harness.rs`; garbage collection's tests in `cluster/gc.rs`,
//! repair's in `cluster/repair.rs`.

#[path = "cluster/harness.rs"]
mod harness;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use shoal_origin::cluster::coordinator::{Coordinator, MAX_READ_REPAIRS};
use shoal_origin::cluster::gc::{GcError, GcSettings, READ_TO_WRITE_DEADLINE};
use shoal_origin::cluster::node::Node;
use shoal_origin::cluster::record::{now_millis, Record, RecordKey, RecordKind, RecordValue, Version};
use shoal_origin::cluster::repair::{RepairHandle, Repairer};
use shoal_origin::cluster::store::ClusterStore;
use shoal_registry::store::{NewManifest, Reference};
use shoal_registry::{Algorithm, Digest, RegistryStore, RepoName, StoreError};

use harness::*;

#[path = "cluster/gc.rs"]
mod gc;
#[path = "cluster/repair.rs"]
mod repair;

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

/// R = 2. One owner of a repository takes every records write 6 s late (its fsyncs stall)
/// while it answers reads and health checks at once. A manifest put read its blobs' links,
/// then waited for that owner past garbage collection's 5 s read-to-write deadline and failed
/// with "checked too long ago", the third origin never asked. Now the third origin takes the
/// slow owner's copy after a second, the put succeeds, the repository is queued for repair,
/// and once the owner catches up repair brings it the records.
#[tokio::test]
async fn a_slow_owner_does_not_fail_its_repositorys_writes() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/slow".parse().unwrap();
    let repo_owners = owners(repo.as_str());
    let slow = repo_owners.iter().next().unwrap().clone();
    let through = cs.iter().find(|c| c.me() != slow).unwrap().clone();
    let store = ClusterStore::new(through.clone());
    world.nodes[&slow].apply_delay_ms.store(6_000, Ordering::SeqCst);
    let config = push(&store, &repo, b"{}").await.unwrap();
    let layer = push(&store, &repo, b"slow owner layer").await.unwrap();
    let m = manifest(&config, &layer);
    let started = std::time::Instant::now();
    store.manifest_put(&repo, Some(&"v1".parse().unwrap()), m.clone()).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(4), "the put took {:?}", started.elapsed());
    for c in &cs {
        let got =
            ClusterStore::new(c.clone()).manifest_get(&repo, &Reference::Tag("v1".parse().unwrap())).await;
        assert_eq!(got.unwrap().unwrap().digest, m.digest, "through {}", c.me());
    }
    // The owner catches up: repair brings it the records it missed.
    world.nodes[&slow].apply_delay_ms.store(0, Ordering::SeqCst);
    let repairer = Repairer::start(through.clone(), 1 << 30, Duration::from_secs(3600));
    repairer.run_now().await.unwrap();
    let held =
        world.nodes[&slow].inner.records_get(repo.as_str(), &[RecordKey::Tag("v1".into())]).await.unwrap();
    assert!(held[0].as_ref().is_some_and(|r| r.tag_target() == Some(&m.digest)), "{held:?}");
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

/// An index that names one child many times (and a manifest naming one layer many times)
/// checks each once: every key read loads its record, a child's whole manifest, on every
/// owner, and a 4 MiB index naming one padded child 35,000 times read tens of GB.
#[tokio::test]
async fn an_index_naming_one_child_many_times_reads_it_once() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/repeats".parse().unwrap();
    let store = ClusterStore::new(cs[0].clone());
    let config = push(&store, &repo, b"{}").await.unwrap();
    let layer = push(&store, &repo, b"layer").await.unwrap();
    let child = manifest(&config, &layer);
    store.manifest_put(&repo, None, child.clone()).await.unwrap();
    let entry = format!(
        r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":{}}}"#,
        child.digest,
        child.bytes.len()
    );
    let bytes = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
        vec![entry; 500].join(",")
    )
    .into_bytes();
    let parsed = shoal_registry::manifest::parse_manifest(None, &bytes).unwrap();
    let index = NewManifest { digest: Digest::of(Algorithm::Sha256, &bytes), bytes: bytes.into(), parsed };
    let before: u64 = world.nodes.values().map(|n| n.keys_read.load(Ordering::SeqCst)).sum();
    store.manifest_put(&repo, Some(&"multi".parse().unwrap()), index).await.unwrap();
    let read: u64 = world.nodes.values().map(|n| n.keys_read.load(Ordering::SeqCst)).sum::<u64>() - before;
    // The index's own records first (manifest, link, tag), then its one child, per owner.
    assert!(read <= 2 * 4 + 4, "the index's put read {read} keys");
}

/// A page of `tags/list` past a run of deleted tags (tombstones, which stay) asks the owners
/// a few times, not once per deleted tag: each round asked only for the live tags still
/// missing, one record when a page of one lacked one.
#[tokio::test]
async fn a_tag_page_past_many_deleted_tags_takes_few_rounds() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/retention".parse().unwrap();
    let store = ClusterStore::new(cs[0].clone());
    let config = push(&store, &repo, b"{}").await.unwrap();
    let layer = push(&store, &repo, b"layer").await.unwrap();
    let old = manifest(&config, &layer);
    for i in 0..300 {
        store.manifest_put(&repo, Some(&format!("b{i:04}").parse().unwrap()), old.clone()).await.unwrap();
    }
    assert!(store.manifest_delete(&repo, &Reference::Digest(old.digest.clone())).await.unwrap());
    let other = manifest(&layer, &config);
    for tag in ["a", "c"] {
        store.manifest_put(&repo, Some(&tag.parse().unwrap()), other.clone()).await.unwrap();
    }
    let asked = || world.nodes.values().map(|n| n.pages_asked.load(Ordering::SeqCst)).sum::<u64>();
    let first = store.tags(&repo, None, 1).await.unwrap();
    assert_eq!(first.items, ["a"]);
    let before = asked();
    let next = store.tags(&repo, first.next.as_deref(), 1).await.unwrap();
    assert_eq!(next.items, ["c"]);
    let rounds = asked() - before;
    assert!(rounds <= 3 * 12, "a page past 300 deleted tags asked the origins {rounds} times");
}
