//! Cluster-wide garbage collection, mark and sweep. Mark: every live manifest of every
//! repository (merged across its owners) names the blobs it uses. Sweep: a blob no manifest
//! names goes from every origin, unless it is younger than the grace period, counted from
//! when its file was stored and from the newest version of any link to it. A push racing
//! with GC is safe: its blobs are young, and putting a manifest rewrites the links of the
//! blobs it references (see `ClusterStore::manifest_put`), which makes them young again.
//! The mark runs twice, before and after listing the candidates, to narrow the window of a
//! manifest put that lands in between.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_registry::{Digest, StoreError};

use crate::cluster::coordinator::Coordinator;
use crate::cluster::record::{now_millis, Record, RecordKind};

/// Names read per page when listing repositories and blobs.
const PAGE: usize = 1000;

/// What one collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Distinct blobs some live manifest references.
    pub marked_blobs: u64,
    /// Distinct blobs removed.
    pub swept_blobs: u64,
    /// Bytes freed, summed over every copy removed.
    pub swept_bytes: u64,
    /// Unreferenced blobs kept because they are within the grace period.
    pub young_blobs: u64,
}

/// Everything the mark phase learns.
#[derive(Default)]
struct Marks {
    referenced: HashSet<Digest>,
    /// Newest link version (ms) of each blob, and the repositories linking it.
    links: HashMap<Digest, (u64, Vec<String>)>,
}

/// Collect garbage across the cluster now.
pub async fn collect(c: &Coordinator, grace: Duration) -> Result<GcReport, StoreError> {
    let started = now_millis();
    let cutoff = started.saturating_sub(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX));
    let repos = all_repos(c).await?;
    let first = mark(c, &repos).await?;
    let mut candidates: HashMap<Digest, Vec<(String, u64)>> = HashMap::new();
    let mut report = GcReport::default();
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
                let linked_at = first.links.get(&entry.digest).map_or(0, |(m, _)| *m);
                if entry.stored_millis >= cutoff || linked_at >= cutoff {
                    young.insert(entry.digest.clone());
                    continue;
                }
                candidates.entry(entry.digest.clone()).or_default().push((id.clone(), entry.size));
            }
            match page.last() {
                Some(last) if page.len() == PAGE => after = Some(last.digest.clone()),
                _ => break,
            }
        }
    }
    // Mark again: a manifest put since the first mark keeps what it references.
    let second = mark(c, &all_repos(c).await?).await?;
    candidates.retain(|d, _| {
        let relinked = second.links.get(d).is_some_and(|(m, _)| *m >= cutoff);
        !second.referenced.contains(d) && !relinked && !young.contains(d)
    });
    report.marked_blobs = second.referenced.len() as u64;
    report.young_blobs = young.len() as u64;
    for (digest, holders) in candidates {
        // Unlink first, so no repository offers a blob that is about to vanish.
        if let Some((_, repos)) = second.links.get(&digest) {
            for repo in repos {
                let tombstone = Record {
                    key: crate::cluster::record::RecordKey::Link(digest.clone()),
                    version: c.clock.next(),
                    value: None,
                };
                c.write_records(repo, vec![tombstone]).await?;
            }
        }
        let mut removed_any = false;
        for (id, size) in holders {
            let Some(node) = c.node(&id) else { continue };
            match node.blob_remove(&digest).await {
                Ok(true) => {
                    removed_any = true;
                    report.swept_bytes += size;
                    c.metrics.gc_swept_bytes.inc_by(size);
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(%digest, origin = %id, error = %e, "gc could not remove a copy"),
            }
        }
        if removed_any {
            report.swept_blobs += 1;
            c.metrics.gc_swept_blobs.inc();
        }
    }
    tracing::info!(?report, "garbage collection done");
    Ok(report)
}

async fn all_repos(c: &Coordinator) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = c.repos(after.as_deref(), PAGE).await?;
        out.extend(page.iter().cloned());
        match page.last() {
            Some(last) if page.len() == PAGE => after = Some(last.clone()),
            _ => return Ok(out),
        }
    }
}

/// Blobs referenced by live manifests, and the live links of every blob.
async fn mark(c: &Coordinator, repos: &[String]) -> Result<Marks, StoreError> {
    let mut marks = Marks::default();
    for repo in repos {
        let manifests = c.scan_records(repo, RecordKind::Manifest, None).await?.unwrap_or_default();
        for m in manifests.iter().filter_map(Record::manifest) {
            marks.referenced.extend(m.blobs.iter().cloned());
        }
        let links = c.scan_records(repo, RecordKind::Link, None).await?.unwrap_or_default();
        for link in links {
            let crate::cluster::record::RecordKey::Link(digest) = &link.key else { continue };
            let entry = marks.links.entry(digest.clone()).or_default();
            entry.0 = entry.0.max(link.version.millis);
            if link.is_live() {
                entry.1.push(repo.clone());
            }
        }
    }
    Ok(marks)
}
