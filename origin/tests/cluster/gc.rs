//! Garbage collection across the cluster: what a collection may delete, what stops it, and
//! writes that race its mark, unlink and quarantine.

use super::*;

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

/// A blob held by one owner as a copy `age` old and by the other not at all, uploaded again
/// through the origin that owns neither: the old copy counts as placed at once, and the
/// upload then waits on the copy it sends the other owner. Returns the layer, its owners (the
/// old copy's first), and the upload, waiting at that send (`release` lets it go on).
async fn upload_waiting_on_one_owner(
    world: &World,
    cs: &[std::sync::Arc<Coordinator>],
    repo: &RepoName,
    content: &[u8],
    age: Duration,
) -> (
    Digest,
    [String; 2],
    tokio::task::JoinHandle<Result<Digest, StoreError>>,
    std::sync::Arc<tokio::sync::Notify>,
) {
    let layer = Digest::of(Algorithm::Sha256, content);
    let owned: Vec<String> = owners(&layer.to_string()).into_iter().collect();
    let through = cs.iter().find(|c| !owned.contains(&c.me().to_string())).unwrap().clone();
    let store = ClusterStore::new(through);
    assert_eq!(push(&store, repo, content).await.unwrap(), layer);
    tokio::time::sleep(age).await;
    assert!(world.nodes[&owned[1]].inner.blob_remove(&layer).await.unwrap());
    assert_eq!(holders(world, &layer).await, BTreeSet::from([owned[0].clone()]));
    let (reached, release) = gate(world, GateOn::BlobPut(layer.clone()));
    let upload = tokio::spawn({
        let (repo, content) = (repo.clone(), content.to_vec());
        async move { push(&store, &repo, &content).await }
    });
    tokio::time::timeout(Duration::from_secs(20), reached.notified())
        .await
        .expect("the upload sends the blob to the owner without it");
    (layer, [owned[0].clone(), owned[1].clone()], upload, release)
}

/// Placing a large blob can take minutes, and an owner's old copy counted at the start may be
/// collected meanwhile (by a GC whose listing saw neither a link nor a young copy: done
/// directly here). The upload used to be acknowledged resting on the one copy it sent; it now
/// looks at every copy again once all are placed, and sends the one that went.
#[tokio::test]
async fn an_old_copy_collected_while_an_upload_places_the_blob_is_sent_again() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/counted".parse().unwrap();
    let content = b"an old copy counted at the start";
    let (layer, [old, _], upload, release) =
        upload_waiting_on_one_owner(&world, &cs, &repo, content, Duration::ZERO).await;
    let node = &world.nodes[&old].inner;
    assert!(node.blob_quarantine(&layer).await.unwrap());
    let aside = node.quarantine_list(None, 10).await.unwrap();
    let since = aside.iter().find(|e| e.digest == layer).unwrap().stored_millis;
    assert!(node.blob_purge(&layer, since).await.unwrap().is_some());
    release.notify_one();
    assert_eq!(upload.await.unwrap().unwrap(), layer);
    assert_eq!(holders(&world, &layer).await, owners(&layer.to_string()));
    assert_blob_everywhere(&cs, &repo, &layer, content, "after the upload").await;
}

/// The same wait, with the old copy only set aside (GC's quarantine, not yet decided): the
/// upload's look brings it back, before anything reads it.
#[tokio::test]
async fn an_old_copy_set_aside_while_an_upload_places_the_blob_is_brought_back() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/aside".parse().unwrap();
    let content = b"an old copy set aside meanwhile";
    let (layer, [old, _], upload, release) =
        upload_waiting_on_one_owner(&world, &cs, &repo, content, Duration::ZERO).await;
    let node = &world.nodes[&old].inner;
    assert!(node.blob_quarantine(&layer).await.unwrap());
    release.notify_one();
    assert_eq!(upload.await.unwrap().unwrap(), layer);
    assert!(node.quarantine_list(None, 10).await.unwrap().is_empty(), "brought back by the upload");
    assert!(node.blob_list(None, 10).await.unwrap().iter().any(|e| e.digest == layer));
    assert_eq!(holders(&world, &layer).await, owners(&layer.to_string()));
}

/// The same race with a real collection (its grace period a multiple of the time it takes):
/// GC runs to its end while the upload waits on one owner. The blob is unreferenced and its
/// link old, but the uploading origin's fresh copy makes it young, on every origin: the old
/// copy is not set aside (GC used to decide per copy, and purged it under the upload).
#[tokio::test]
async fn gc_during_an_upload_leaves_the_old_copy_it_counted() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/young".parse().unwrap();
    let content = b"young on one origin, old on another";
    let grace = Duration::from_secs(2);
    let old_enough = grace + Duration::from_millis(500);
    let (layer, [old, _], upload, release) =
        upload_waiting_on_one_owner(&world, &cs, &repo, content, old_enough).await;
    let settings = GcSettings { grace, quarantine: quick_gc().quarantine };
    let report = shoal_origin::cluster::gc::collect(&leading(&cs), settings).await.unwrap();
    assert_eq!((report.quarantined_blobs, report.swept_blobs), (0, 0), "{report:?}");
    assert!(world.nodes[&old].inner.quarantine_list(None, 10).await.unwrap().is_empty());
    release.notify_one();
    assert_eq!(upload.await.unwrap().unwrap(), layer);
    assert_eq!(holders(&world, &layer).await, owners(&layer.to_string()));
    assert_blob_everywhere(&cs, &repo, &layer, content, "after the upload").await;
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

/// GC refuses to run while a member's health replies name another member list than the
/// leader's (a scale-up whose new list has not reached every origin): marks that list and
/// scan only the leader's members would miss repositories moved to origins it does not know,
/// and delete blobs their manifests use.
#[tokio::test]
async fn gc_refuses_while_the_members_disagree_on_the_member_list() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/app".parse().unwrap();
    let (config, layer) = garbage_image(&cs, &repo, b"layer").await;
    let leader = shoal_origin::cluster::gc::leader(&cs[0]).unwrap();
    let lead = cs[IDS.iter().position(|id| *id == leader).unwrap()].clone();
    let other = IDS.iter().find(|id| **id != leader).unwrap().to_string();
    *world.disagrees.lock().unwrap() = Some(other.clone());
    match shoal_origin::cluster::gc::collect(&lead, quick_gc()).await {
        Err(GcError::MembersDisagree(id)) => assert_eq!(id, other),
        other => panic!("collected while the member lists differ: {other:?}"),
    }
    assert!(!holders(&world, &layer).await.is_empty() && !holders(&world, &config).await.is_empty());
    *world.disagrees.lock().unwrap() = None;
    let report = shoal_origin::cluster::gc::collect(&lead, quick_gc()).await.unwrap();
    assert_eq!((report.quarantined_blobs, report.swept_blobs), (2, 2), "{report:?}");
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

/// A repair pass that runs while garbage collection has set one owner's copy of an
/// unreferenced layer aside (its loop over the holders part way) leaves it aside: it neither
/// brings it back (a stat did, young again, so the collection purged only the other copies
/// and left that one an unlinked orphan for a whole grace period) nor sends or drops a copy.
#[tokio::test]
async fn a_repair_pass_leaves_a_copy_gc_set_aside() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/aside-repair".parse().unwrap();
    let (_, layer) = garbage_image(&cs, &repo, b"set aside while repair runs").await;
    let owned = owners(&layer.to_string());
    let [a, b]: [String; 2] = owned.iter().cloned().collect::<Vec<_>>().try_into().unwrap();
    assert!(world.nodes[&a].inner.blob_quarantine(&layer).await.unwrap());
    for at in [&b, &a] {
        let coordinator = cs.iter().find(|c| c.me() == at.as_str()).unwrap().clone();
        let report =
            Repairer::start(coordinator, 1 << 30, Duration::from_secs(3600)).run_now().await.unwrap();
        assert_eq!((report.copied_blobs, report.removed_blobs), (0, 0), "{report:?}");
        let aside = world.nodes[&a].inner.quarantine_list(None, 10).await.unwrap();
        assert!(aside.iter().any(|e| e.digest == layer), "the repair pass at {at} brought the copy back");
        assert_eq!(holders(&world, &layer).await, BTreeSet::from([b.clone()]));
    }
    // A queued item for the blob stays queued while a copy is set aside (it holds no
    // collection back), and goes once the copy is back.
    let at_b = cs.iter().find(|c| c.me() == b).unwrap().clone();
    at_b.local.store().repair_enqueue(format!("blob:{layer}")).await.unwrap();
    let repairer = Repairer::start(at_b.clone(), 1 << 30, Duration::from_secs(3600));
    repairer.run_now().await.unwrap();
    assert_eq!(at_b.local.store().repair_len().await.unwrap(), 1, "the item was dropped");
    assert!(world.nodes[&a].inner.blob_restore(&layer).await.unwrap());
    repairer.run_now().await.unwrap();
    assert_eq!(at_b.local.store().repair_len().await.unwrap(), 0, "the item stayed");
}

/// A push of a layer whose copy garbage collection has set aside brings it back (repair no
/// longer does): the placement's look at each owner is a stat.
#[tokio::test]
async fn a_push_brings_a_set_aside_copy_back() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/aside-push".parse().unwrap();
    let content = b"set aside, then pushed again";
    let (_, layer) = garbage_image(&cs, &repo, content).await;
    let a = owners(&layer.to_string()).into_iter().next().unwrap();
    assert!(world.nodes[&a].inner.blob_quarantine(&layer).await.unwrap());
    assert_eq!(push(&ClusterStore::new(cs[0].clone()), &repo, content).await.unwrap(), layer);
    assert!(world.nodes[&a].inner.quarantine_list(None, 10).await.unwrap().is_empty());
    assert_eq!(holders(&world, &layer).await, owners(&layer.to_string()));
}

/// The live set changes while a collection runs (here: between its first and second mark,
/// while it unlinks): it stops. Marks ask the origins live at each call, so a member counted
/// down during one went unasked without an error; with its repositories' manifests unseen
/// (R = 1, or every owner of R), their layers were set aside and purged.
#[tokio::test]
async fn a_membership_change_during_a_collection_stops_it() {
    let (world, cs) = world().await;
    let repo: RepoName = "team/flapping".parse().unwrap();
    let (_, layer) = garbage_image(&cs, &repo, b"garbage, but not this time").await;
    let before = holders(&world, &layer).await;
    let (reached, release) = gate(&world, GateOn::Tombstone);
    let gc = tokio::spawn({
        let c = leading(&cs);
        async move { shoal_origin::cluster::gc::collect(&c, quick_gc()).await }
    });
    tokio::time::timeout(Duration::from_secs(20), reached.notified()).await.expect("gc reached the gate");
    // A member went down and came back (membership counts each change).
    world.generation.fetch_add(2, Ordering::SeqCst);
    release.notify_one();
    let result = gc.await.unwrap();
    assert!(matches!(result, Err(GcError::MembershipChanged)), "{result:?}");
    assert_eq!(holders(&world, &layer).await, before, "a copy was set aside");
    for node in world.nodes.values() {
        assert!(node.inner.quarantine_list(None, 10).await.unwrap().is_empty());
    }
    // The next collection, in a steady membership, takes the garbage.
    let report = shoal_origin::cluster::gc::collect(&leading(&cs), quick_gc()).await.unwrap();
    assert!(report.swept_blobs >= 1, "{report:?}");
    assert!(holders(&world, &layer).await.is_empty());
    for node in world.nodes.values() {
        assert!(node.inner.quarantine_list(None, 10).await.unwrap().is_empty());
    }
}

/// R = 1. An origin that owns a repository leaves the member list (a scale-down, a renamed
/// StatefulSet), while the image's layer stays on an origin that remains. A collection then
/// saw no manifest naming the layer and deleted it: when the origin came back its image was
/// broken. Now a collection waits while R or more of the last collection's members are
/// missing, deletes nothing, and runs once they are back; an operator's `departed=forget`
/// collects all the same (and, as it warns, takes the hidden repository's layers).
#[tokio::test]
async fn gc_waits_while_r_of_the_last_collections_origins_left_the_member_list() {
    use shoal_origin::cluster::gc::{collect, collect_with, Departures};
    let (world, cs) = world_with(1).await;
    let lead = leading(&cs);
    let all: Vec<String> = IDS.iter().map(|s| s.to_string()).collect();
    let owner_of = |key: &str| shoal_origin::cluster::placement::owners(key, &all, 1)[0].clone();
    let repo: RepoName =
        (0..).map(|i| format!("team/hidden{i}")).find(|r| owner_of(r) != lead.me()).unwrap().parse().unwrap();
    let leaving = owner_of(repo.as_str());
    let data = (0..)
        .map(|i| format!("layer {i}").into_bytes())
        .find(|d| owner_of(&Digest::of(Algorithm::Sha256, d).to_string()) != leaving)
        .unwrap();
    let store = ClusterStore::new(lead.clone());
    let config = push(&store, &repo, b"{}").await.unwrap();
    let layer = push(&store, &repo, &data).await.unwrap();
    let m = manifest(&config, &layer);
    store.manifest_put(&repo, Some(&"v1".parse().unwrap()), m.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The first collection (nothing to take) records the member list.
    let report = collect(&lead, quick_gc()).await.unwrap();
    assert_eq!(report.swept_blobs, 0, "{report:?}");
    let recorded = lead.collections.last().expect("a completed collection is recorded");
    assert_eq!(recorded.members, all.iter().cloned().collect());

    set_removed(&world, &[&leaving]);
    for _ in 0..3 {
        let result = collect(&lead, quick_gc()).await;
        match result {
            Err(GcError::MembersLeft { departed, replicas: 1 }) => {
                assert_eq!(departed, vec![leaving.clone()])
            }
            other => panic!("{other:?}"),
        }
        assert!(!holders(&world, &layer).await.is_empty(), "the hidden image's layer was taken");
    }
    assert_eq!(lead.collections.last(), Some(recorded.clone()), "a refused collection records nothing");

    // Back: the image is whole, and collections run again.
    set_removed(&world, &[]);
    assert_image_whole(&cs, &repo, "v1", &m.digest, &[(&layer, &data), (&config, b"{}")]).await;
    let report = collect(&lead, quick_gc()).await.unwrap();
    assert_eq!(report.swept_blobs, 0, "{report:?}");

    // Gone for good, the operator says: collected, and the remaining members recorded.
    set_removed(&world, &[&leaving]);
    let report = collect_with(&lead, quick_gc(), Departures::Forget).await.unwrap();
    assert!(report.swept_blobs >= 1, "{report:?}");
    assert!(holders(&world, &layer).await.is_empty());
    let remaining: BTreeSet<String> = all.iter().filter(|id| **id != leaving).cloned().collect();
    assert_eq!(lead.collections.last().unwrap().members, remaining);
    collect(&lead, quick_gc()).await.unwrap();
}

/// R = 2. Origins that joined after the last collection and left again before the next one
/// count as having left: repair moved their repositories' records onto them (off the origins
/// that held them before), so with them gone those repositories are hidden, and their layers
/// on the remaining origins were collected.
#[tokio::test]
async fn gc_counts_origins_that_joined_since_the_last_collection() {
    use shoal_origin::cluster::gc::collect;
    let (world, cs) = world().await;
    let lead = leading(&cs);
    let others: Vec<String> = IDS.iter().filter(|id| **id != lead.me()).map(|s| s.to_string()).collect();
    let others: Vec<&str> = others.iter().map(String::as_str).collect();
    set_removed(&world, &others);
    collect(&lead, quick_gc()).await.unwrap();
    assert_eq!(lead.collections.last().unwrap().members, [lead.me().to_string()].into());
    // They join; the origin's member watch adds them to the list.
    set_removed(&world, &[]);
    lead.collections.observe(&lead.topology.identities());
    let all: BTreeSet<String> = IDS.iter().map(|s| s.to_string()).collect();
    assert_eq!(lead.collections.last().unwrap().members, all);
    // And leave again before any collection: it waits.
    set_removed(&world, &others);
    match collect(&lead, quick_gc()).await {
        Err(GcError::MembersLeft { departed, replicas: 2 }) => assert_eq!(departed.len(), 2),
        other => panic!("{other:?}"),
    }
}
