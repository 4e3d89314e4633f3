//! Repair: writes that fell back past an owner, queued and brought home when it returns, and
//! what a repair pass may forget.

use super::*;

/// `n` full repair passes on every origin, one origin after another.
async fn full_passes(handles: &[RepairHandle], n: usize) {
    for _round in 0..n {
        for handle in handles {
            handle.run_now().await.unwrap();
        }
    }
}

/// Two full passes on every origin (an owner copies to the owner that missed it; the origin
/// holding a surplus copy drops it once both owners confirm, which may take it a second
/// pass) leave `d` on exactly its owners and every repair queue empty.
async fn passes_bring_home(
    world: &World,
    cs: &[std::sync::Arc<Coordinator>],
    handles: &[RepairHandle],
    d: &Digest,
) {
    full_passes(handles, 2).await;
    assert_eq!(holders(world, d).await, owners(&d.to_string()));
    for c in cs {
        assert_eq!(c.local.store().repair_len().await.unwrap(), 0, "{}: queue drained", c.me());
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
    passes_bring_home(&world, &cs, &handles, &d).await;
    let got = ClusterStore::new(cs[2].clone()).blob_size(&repo, &d).await.unwrap();
    assert_eq!(got, Some(data.len() as u64));
}

/// An owner whose disk is nearly full takes no writes, and no repair copies either: the blob
/// stays on the origin it fell back to, queued, and garbage collection (which frees disks)
/// still runs; once the owner has room again the copy goes home. Repair used to send it
/// anyway, filling that disk to the brim, and the queued item then held every collection
/// back with `RepairPending`.
#[tokio::test]
async fn a_nearly_full_owner_gets_no_repair_copy_and_gc_still_runs() {
    let (world, cs) = world().await;
    const FULL: &str = "o2:5000";
    let repo: RepoName =
        (0..).map(|i| format!("team/full{i}")).find(|r| !owners(r).contains(FULL)).unwrap().parse().unwrap();
    let data = (0..)
        .map(|i| format!("payload {i}").into_bytes())
        .find(|d| owners(&Digest::of(Algorithm::Sha256, d).to_string()).contains(FULL))
        .unwrap();
    world.full.lock().unwrap().insert(FULL.to_string());
    let store = ClusterStore::new(cs[0].clone());
    let d = push(&store, &repo, &data).await.unwrap();
    let config = push(&store, &repo, b"{}").await.unwrap();
    store.manifest_put(&repo, Some(&"v1".parse().unwrap()), manifest(&config, &d)).await.unwrap();
    assert!(!holders(&world, &d).await.contains(FULL), "a write went to the full disk");
    let handles: Vec<_> =
        cs.iter().map(|c| Repairer::start(c.clone(), 1 << 30, Duration::from_secs(3600))).collect();
    full_passes(&handles, 2).await;
    assert!(!holders(&world, &d).await.contains(FULL), "repair copied to the full disk");
    let mut queued = 0;
    for c in &cs {
        queued += c.local.store().repair_len().await.unwrap();
        assert_eq!(c.local.repair_pending().await.unwrap(), 0, "{}: no repository queued", c.me());
    }
    assert!(queued >= 1, "the missing copy is no longer queued");
    shoal_origin::cluster::gc::collect(&leading(&cs), quick_gc()).await.expect("gc runs");

    world.full.lock().unwrap().clear();
    passes_bring_home(&world, &cs, &handles, &d).await;
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

    /// A cluster whose writer is the next origin in the repository's ranking after its owner:
    /// the owner's stand-in while it is counted down.
    async fn next_in_line() -> Retag {
        let (world, cs) = world_with(1).await;
        let ranked = shoal_origin::cluster::placement::owners(Self::REPO, &ids(), 2);
        let writer = cs.iter().find(|c| c.me() == ranked[1]).unwrap().clone();
        Retag { world, cs, owner: ranked[0].clone(), writer }
    }

    /// The owner goes `away` (`gone`), or comes back.
    fn set_away(&self, away: Away, gone: bool) {
        match away {
            Away::CountedDown if gone => self.world.live.lock().unwrap().retain(|id| *id != self.owner),
            Away::CountedDown => self.world.live.lock().unwrap().push(self.owner.clone()),
            Away::Unreachable => switch(&self.world, &self.owner, gone),
        }
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

/// A write made while its owner was counted down (out of the live list, so the next origin
/// in the ranking was its owner then and nothing was queued) goes home before the walk over
/// every blob: repositories are reconciled first. Before, the owner answered reads with its
/// older records until the walk over every blob held here had ended.
#[tokio::test]
async fn a_write_made_while_its_owner_was_down_goes_home_before_the_walk_over_every_blob() {
    let r = Retag::next_in_line().await;
    let (old, new) = (Digest::of(Algorithm::Sha256, b"old"), Digest::of(Algorithm::Sha256, b"new"));
    r.tag(&old).await;
    r.set_away(Away::CountedDown, true);
    r.world.generation.fetch_add(1, Ordering::SeqCst);
    r.tag(&new).await;
    assert_eq!(r.read().await, Some(new.clone()), "the write landed on the next origin");
    r.set_away(Away::CountedDown, false);
    assert_eq!(r.read().await, Some(old.clone()), "the owner answers reads with what it holds");

    r.hold_foreign_blobs(1).await;
    let (_reached, open) = hold_every(&r.world, GateOn::BlobStat);
    let _repairer = Repairer::start(r.writer.clone(), 1 << 30, Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.world.generation.fetch_add(1, Ordering::SeqCst);
    let home = r.reads_within(&new, Duration::from_secs(10)).await;
    let _ = open.send(true);
    assert!(home, "the retag stayed away from its owner while the blobs were walked");
}

/// The same when the owner, counted down, comes back while a pass (the one its leaving
/// started) walks the blobs: the repositories are walked again at once.
#[tokio::test]
async fn a_write_made_while_its_owner_was_down_goes_home_when_it_returns_during_a_walk() {
    goes_home_when_its_owner_returns_during_a_walk(Retag::next_in_line().await, Away::CountedDown).await;
}

/// The same when the owner comes back while a pass (the one its leaving started) walks the
/// blobs: the walk works the queue as soon as the membership changes, not at its end.
#[tokio::test]
async fn a_write_that_fell_back_goes_home_when_its_owner_returns_during_a_walk() {
    goes_home_when_its_owner_returns_during_a_walk(Retag::new().await, Away::Unreachable).await;
}

/// How an owner is away: out of the live list (the next origin in the ranking stands in as
/// owner, nothing is queued), or unreachable while still counted live (writes fall back past
/// it and are queued).
#[derive(Clone, Copy)]
enum Away {
    CountedDown,
    Unreachable,
}

/// `r`'s owner goes `away` once a repair loop runs, a retag is written meanwhile, and the
/// owner comes back while the pass walks many slow blobs: the retag reads home within 3 s.
async fn goes_home_when_its_owner_returns_during_a_walk(r: Retag, away: Away) {
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
    r.set_away(away, true);
    r.world.generation.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    r.tag(&new).await;
    r.set_away(away, false);
    r.world.generation.fetch_add(1, Ordering::SeqCst);
    assert!(
        r.reads_within(&new, Duration::from_secs(3)).await,
        "the retag waited for the end of the walk over the blobs"
    );
}
