//! Cluster-wide garbage collection. A blob no manifest references and no repository links
//! goes, but only by steps that a racing push can always undo, because a `201 Created` must
//! never be followed by a 404:
//!
//! 1. **Mark** every live manifest and link of every repository (merged across owners).
//! 2. **Unlink** each unreferenced blob with *conditional* tombstones: a link's tombstone
//!    applies only where the link still has the version the mark saw (compare-and-set in the
//!    record store), so a link a manifest put refreshed meanwhile survives; and it is versioned
//!    just after that version ([`Version::just_after`]), so a refresh that reaches an owner
//!    after the tombstone still wins there, and in every merge.
//! 3. **Mark again**; a blob that is referenced or linked anywhere now is kept.
//! 4. **Quarantine** the rest: the files move aside, unlisted and unserved, but any request
//!    for the blob (a read through a link refreshed after step 3, a copy being placed)
//!    brings its file back.
//! 5. After [`GcSettings::quarantine`], **mark again** and restore what is referenced or
//!    linked; only what is still garbage is deleted. A write that read a live link before
//!    step 2 finishes within [`READ_TO_WRITE_DEADLINE`] or fails, and the quarantine lasts
//!    longer than that, so the last mark sees every link such a write made.
//!
//! GC runs only when every member is up and no repair queue holds a repository (records
//! written to fallback origins are then on their owners, where the mark looks; blobs still
//! to be copied change nothing it decides), not while R or more members of the last
//! collection's member list are missing from the current one (their repositories' manifests
//! are unseen, see `cluster::collected`; an operator may say they are gone for good with
//! [`Departures::Forget`]), stops if the live set changes while it marks,
//! and runs only on one
//! origin: the first of the full member list by rendezvous hash of [`LEADER_KEY`]. With all
//! members up, every origin agrees on which one that is; it runs one collection at a time.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_registry::{Digest, StoreError};

use crate::cluster::coordinator::Coordinator;
use crate::cluster::record::{now_millis, Record, RecordKey, RecordKind, Version};

/// Names read per page when listing repositories and blobs.
const PAGE: usize = 1000;
/// The key whose rendezvous ranking over the members picks the origin that runs GC.
pub const LEADER_KEY: &str = "shoal-gc-leader";
/// A write that read a live link (a manifest put, a cross-repository mount) must write within
/// this long of the read, or it fails and the client retries; see the module doc.
pub const READ_TO_WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// The shortest quarantine: twice the read-to-write deadline.
pub const MIN_QUARANTINE: Duration = Duration::from_secs(10);

/// How a collection runs.
#[derive(Clone, Copy, Debug)]
pub struct GcSettings {
    /// Blobs stored or linked more recently than this are kept (uploads waiting for their
    /// manifest).
    pub grace: Duration,
    /// How long quarantined files wait before the last mark decides. Configurations keep it
    /// at least [`MIN_QUARANTINE`]; only tests that race nothing go lower.
    pub quarantine: Duration,
}

impl GcSettings {
    pub fn new(grace: Duration) -> GcSettings {
        GcSettings { grace, quarantine: MIN_QUARANTINE }
    }
}

/// What one collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Distinct blobs some live manifest references.
    pub marked_blobs: u64,
    /// Distinct blobs deleted.
    pub swept_blobs: u64,
    /// Bytes freed, summed over every copy deleted.
    pub swept_bytes: u64,
    /// Unreferenced blobs kept because they are within the grace period.
    pub young_blobs: u64,
    /// Blobs set aside by this run.
    #[serde(default)]
    pub quarantined_blobs: u64,
    /// Quarantined blobs brought back because something references or links them again.
    #[serde(default)]
    pub restored_blobs: u64,
    /// Link tombstones that did not apply because the link changed since the mark.
    #[serde(default)]
    pub links_refreshed: u64,
}

/// Why a collection did not run.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("garbage collection needs every origin up; {0} is down")]
    MemberDown(String),
    #[error("garbage collection waits for repair: origin {origin} has {pending} items queued")]
    RepairPending { origin: String, pending: u64 },
    #[error("garbage collection waits until every origin has the same member list; {0} names another")]
    MembersDisagree(String),
    #[error(
        "garbage collection waits: {} of the last collection's origins left the member list ({}), \
         and with {replicas} copies of each repository, repositories whose every copy was on them are \
         unseen and their layers would be deleted; bring them back, or, if they are gone for good, \
         collect once with POST /shoal/v1/admin/gc?departed=forget",
        departed.len(),
        departed.join(", ")
    )]
    MembersLeft { departed: Vec<String>, replicas: usize },
    #[error("garbage collection runs on origin {leader}, not here")]
    NotLeader { leader: String },
    #[error("a garbage collection is already running")]
    Running,
    #[error("the origins' membership changed while garbage collection ran; it stopped")]
    MembershipChanged,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a collection does about members of the last collection's list that left it (see
/// `cluster::collected`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Departures {
    /// Wait while R or more of them are missing.
    Guard,
    /// Collect all the same: an operator said they are gone for good.
    Forget,
}

/// Held while a collection runs on this origin.
#[derive(Debug, Default)]
pub struct GcLock(tokio::sync::Mutex<()>);

/// Everything the mark phase learns.
#[derive(Default)]
struct Marks {
    referenced: HashSet<Digest>,
    /// Newest link version (ms) of each blob, live or not.
    newest_link: HashMap<Digest, u64>,
    /// The live links of each blob: (repository, the link's version).
    live_links: HashMap<Digest, Vec<(String, Version)>>,
}

impl Marks {
    /// Whether anything keeps `digest` now: a live manifest references it or a repository
    /// links it. (Tombstones, this run's own included, keep nothing.)
    fn keeps(&self, digest: &Digest) -> bool {
        self.referenced.contains(digest) || self.live_links.get(digest).is_some_and(|l| !l.is_empty())
    }
}

/// The origin that runs garbage collection: the first member by rendezvous hash of
/// [`LEADER_KEY`] (all members are up whenever GC runs).
pub fn leader(c: &Coordinator) -> Option<String> {
    c.ranked(LEADER_KEY).into_iter().next()
}

/// How long a collection waits for every member to name the same member list (a member that
/// has not answered a health check since it came up has named none).
pub const MEMBER_LIST_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether this origin may collect now: every member up and naming the same members, no
/// repair pending, and it leads. The marks list and scan this origin's members only: while a
/// member list changes (a scale-up rolled out to some origins), repositories moved to an
/// origin this one does not know yet would go unseen and their blobs be collected.
async fn precheck(c: &Coordinator, departures: Departures) -> Result<(), GcError> {
    let live: HashSet<String> = c.topology.live().into_iter().collect();
    if let Some(down) = c.topology.members().into_iter().find(|m| !live.contains(m)) {
        return Err(GcError::MemberDown(down));
    }
    // A member just up (or just back) has not told its list yet: a few health intervals.
    let waited_until = std::time::Instant::now() + MEMBER_LIST_WAIT;
    while let Some(other) = c.topology.disagreeing_member() {
        if std::time::Instant::now() >= waited_until {
            return Err(GcError::MembersDisagree(other));
        }
        tokio::time::sleep(MEMBER_LIST_WAIT / 20).await;
    }
    let leader = leader(c).unwrap_or_else(|| c.me().to_string());
    if leader != c.me() {
        return Err(GcError::NotLeader { leader });
    }
    c.collections.observe(&c.topology.identities());
    if departures == Departures::Guard {
        let replicas = c.replication.replicas;
        if let Some(last) = c.collections.last() {
            let departed = last.departed(&c.topology.identities());
            if departed.len() >= replicas {
                let departed = departed.into_iter().map(str::to_string).collect();
                return Err(GcError::MembersLeft { departed, replicas });
            }
        }
    }
    for id in &live {
        let Some(node) = c.node(id) else { return Err(GcError::MemberDown(id.clone())) };
        let pending = node.repair_pending().await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
        if pending > 0 {
            return Err(GcError::RepairPending { origin: id.clone(), pending });
        }
    }
    Ok(())
}

/// Collect garbage across the cluster now (see the module doc).
pub async fn collect(c: &Coordinator, settings: GcSettings) -> Result<GcReport, GcError> {
    collect_with(c, settings, Departures::Guard).await
}

/// [`collect`], saying what to do about members of the last collection's list that left.
pub async fn collect_with(
    c: &Coordinator,
    settings: GcSettings,
    departures: Departures,
) -> Result<GcReport, GcError> {
    // Taken before the check that every member is up: each mark must see that same live set
    // (one for the marks that set copies aside, a fresh one for the last, after the wait).
    let run = Run { c, generation: c.topology.generation() };
    let members = c.topology.identities();
    precheck(c, departures).await?;
    let _running = c.gc_lock.0.try_lock().map_err(|_| GcError::Running)?;
    let quarantine = settings.quarantine;
    let mut report = GcReport::default();
    // Leftovers of an earlier run that stopped halfway.
    settle_quarantine(&run, &mut report, Some(quarantine)).await?;
    set_aside(&run, settings.grace, &mut report).await?;
    if report.quarantined_blobs > 0 {
        tokio::time::sleep(quarantine).await;
        // A member that went down and came back during the wait changes nothing the last
        // mark sees: it checks the live set from here.
        let last = Run { c, generation: c.topology.generation() };
        precheck(c, departures).await?;
        settle_quarantine(&last, &mut report, Some(quarantine)).await?;
    }
    if c.topology.identities() == members {
        c.collections.record(members.into_iter().collect());
    }
    tracing::info!(?report, "garbage collection done");
    Ok(report)
}

/// One collection: the coordinator, and the membership generation every member was up in.
struct Run<'a> {
    c: &'a Coordinator,
    generation: u64,
}

impl Run<'_> {
    /// Mark (see [`mark`]), and make sure the live set did not change meanwhile. The scans
    /// ask the origins live at each call: a member counted down while a mark ran (or between
    /// two marks) went unasked without an error, and with its repositories' manifests
    /// unseen (R = 1, or every owner of R) their layers were collected.
    async fn mark(&self) -> Result<Marks, GcError> {
        let marks = mark(self.c).await?;
        if self.c.topology.generation() != self.generation {
            return Err(GcError::MembershipChanged);
        }
        Ok(marks)
    }
}

/// Steps 1-4: mark, unlink with conditional tombstones, mark again, quarantine.
async fn set_aside(run: &Run<'_>, grace: Duration, report: &mut GcReport) -> Result<(), GcError> {
    let c = run.c;
    let started = now_millis();
    let cutoff = started.saturating_sub(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX));
    let first = run.mark().await?;
    let mut candidates: HashMap<Digest, Vec<String>> = HashMap::new();
    let mut young = HashSet::new();
    for id in c.topology.live() {
        let Some(node) = c.node(&id) else { continue };
        let mut after: Option<Digest> = None;
        loop {
            let page = node
                .blob_list(after.as_ref(), PAGE)
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            for entry in &page {
                if first.referenced.contains(&entry.digest) {
                    continue;
                }
                let linked_at = first.newest_link.get(&entry.digest).copied().unwrap_or(0);
                if entry.stored_millis >= cutoff || linked_at >= cutoff {
                    young.insert(entry.digest.clone());
                    continue;
                }
                candidates.entry(entry.digest.clone()).or_default().push(id.clone());
            }
            match page.last() {
                Some(last) if page.len() == PAGE => after = Some(last.digest.clone()),
                _ => break,
            }
        }
    }
    // Young is decided per blob: one fresh copy (an upload placing the blob now, whose link
    // is still to come) keeps the old copies its placing counted on.
    candidates.retain(|digest, _| !young.contains(digest));
    report.young_blobs = young.len() as u64;
    // Unlink: each live link goes only if it still has the version the mark saw, and its
    // tombstone outranks that version only (`Version::just_after`), never a refresh written
    // since, wherever the two meet (an owner, a read's merge, repair).
    for digest in candidates.keys() {
        for (repo, version) in first.live_links.get(digest).into_iter().flatten() {
            let tombstone = Record {
                key: RecordKey::Link(digest.clone()),
                version: version.just_after(),
                value: None,
                expect: Some(version.clone()),
            };
            c.write_records(repo, vec![tombstone]).await?;
        }
    }
    // Mark again: a manifest put or a mount since the first mark keeps what it uses.
    let second = run.mark().await?;
    report.marked_blobs = second.referenced.len() as u64;
    for (digest, holders) in candidates {
        if second.keeps(&digest) {
            report.links_refreshed += 1;
            continue;
        }
        let mut moved = false;
        for id in holders {
            let Some(node) = c.node(&id) else { continue };
            match node.blob_quarantine(&digest).await {
                Ok(true) => moved = true,
                Ok(false) => {}
                Err(e) => tracing::warn!(%digest, origin = %id, error = %e, "gc could not set a copy aside"),
            }
        }
        if moved {
            report.quarantined_blobs += 1;
        }
    }
    Ok(())
}

/// Step 5: every quarantined copy set aside at least `older_than` ago is restored if
/// anything references or links its blob, and deleted otherwise.
async fn settle_quarantine(
    run: &Run<'_>,
    report: &mut GcReport,
    older_than: Option<Duration>,
) -> Result<(), GcError> {
    let c = run.c;
    // The time the mark starts: a copy is purged only if set aside `older_than` before what
    // the mark read (taken after a long mark, a copy quarantined while it ran could pass).
    let now = now_millis();
    let marks = run.mark().await?;
    let hold = older_than.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut swept = HashSet::new();
    let mut restored = HashSet::new();
    for id in c.topology.live() {
        let Some(node) = c.node(&id) else { continue };
        let mut after: Option<Digest> = None;
        loop {
            let page = node
                .quarantine_list(after.as_ref(), PAGE)
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            for entry in &page {
                if marks.keeps(&entry.digest) {
                    match node.blob_restore(&entry.digest).await {
                        Ok(_) => {
                            restored.insert(entry.digest.clone());
                        }
                        Err(e) => {
                            tracing::warn!(digest = %entry.digest, origin = %id, error = %e, "gc could not restore a copy")
                        }
                    }
                    continue;
                }
                if now.saturating_sub(entry.stored_millis) < hold {
                    continue;
                }
                match node.blob_purge(&entry.digest, entry.stored_millis).await {
                    Ok(Some(size)) => {
                        swept.insert(entry.digest.clone());
                        report.swept_bytes += size;
                        c.metrics.gc_swept_bytes.inc_by(size);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(digest = %entry.digest, origin = %id, error = %e, "gc could not delete a copy")
                    }
                }
            }
            match page.last() {
                Some(last) if page.len() == PAGE => after = Some(last.digest.clone()),
                _ => break,
            }
        }
    }
    report.swept_blobs += swept.len() as u64;
    c.metrics.gc_swept_blobs.inc_by(swept.len() as u64);
    report.restored_blobs += restored.len() as u64;
    Ok(())
}

async fn all_repos(c: &Coordinator) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = c.repos_everywhere(after.as_deref(), PAGE).await?;
        out.extend(page.iter().cloned());
        match page.last() {
            Some(last) if page.len() == PAGE => after = Some(last.clone()),
            _ => return Ok(out),
        }
    }
}

/// Blobs referenced by live manifests, and the links of every blob, across all repositories.
async fn mark(c: &Coordinator) -> Result<Marks, StoreError> {
    let mut marks = Marks::default();
    for repo in all_repos(c).await? {
        let manifests = c.scan_everywhere(&repo, RecordKind::Manifest).await?.unwrap_or_default();
        for m in manifests.iter().filter_map(Record::manifest) {
            marks.referenced.extend(m.blobs.iter().cloned());
        }
        let links = c.scan_everywhere(&repo, RecordKind::Link).await?.unwrap_or_default();
        for link in links {
            let RecordKey::Link(digest) = &link.key else { continue };
            let newest = marks.newest_link.entry(digest.clone()).or_default();
            *newest = (*newest).max(link.version.millis);
            if link.is_live() {
                marks
                    .live_links
                    .entry(digest.clone())
                    .or_default()
                    .push((repo.clone(), link.version.clone()));
            }
        }
    }
    Ok(marks)
}
