//! The repair loop: after a membership change or a write that missed an owner, copy each blob
//! and each repository's records to their current owners, and only then remove the copies
//! held by origins that are no longer owners, so the last copy is never dropped. Copies go
//! through a token bucket so repair does not starve client traffic.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use shoal_p2p::limiter::RateLimiter;
use shoal_registry::{ByteStream, Digest};
use tokio::sync::{mpsc, oneshot};

use crate::cluster::coordinator::{open_file, Coordinator};
use crate::cluster::node::{BlobEntry, Holding, Node, NodeError};
use crate::cluster::record::{Record, RecordKind};

/// Blobs or repositories read from the local store per page.
const PAGE: usize = 1000;
/// Queue items handled per queue pass.
const QUEUE_BATCH: usize = 10_000;
/// A full pass runs at least this many repair intervals apart when nothing changes.
const FULL_PASS_EVERY: u32 = 10;
/// How often the loop looks at the membership generation.
const TICK: Duration = Duration::from_secs(1);
/// Admin requests for a pass waiting at once.
const REQUEST_QUEUE: usize = 8;
/// A copy's bytes go out in pieces of at most this share of a second at `repair_rate`, so
/// the receiving end sees progress at least that often: a 1 MiB chunk read from the file
/// waited a whole second per MiB/s of rate for its tokens, and below about 200 KiB/s the
/// upload's no-progress watchdog (the call timeout) failed every copy of a large blob.
const PIECE_OF_A_SECOND: u64 = 4;
/// The smallest piece a copy is cut into.
const MIN_PIECE: u64 = 4096;

/// What one repair pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairReport {
    pub copied_blobs: u64,
    pub copied_bytes: u64,
    pub removed_blobs: u64,
    pub synced_repos: u64,
    pub removed_repos: u64,
    pub failures: u64,
}

/// Asks the repair loop for a full pass now (the admin endpoint, tests).
#[derive(Clone)]
pub struct RepairHandle {
    requests: mpsc::Sender<oneshot::Sender<RepairReport>>,
}

impl RepairHandle {
    /// Run a full pass and wait for its report; `None` if the loop has stopped.
    pub async fn run_now(&self) -> Option<RepairReport> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(tx).await.ok()?;
        rx.await.ok()
    }
}

/// The repair worker of one origin.
pub struct Repairer {
    coordinator: Arc<Coordinator>,
    limiter: Arc<RateLimiter>,
    /// Bytes a copy sends between two waits for the bucket (see [`PIECE_OF_A_SECOND`]).
    piece: u64,
    interval: Duration,
}

impl Repairer {
    /// Start the loop; `rate` bytes per second bound what it copies.
    pub fn start(coordinator: Arc<Coordinator>, rate: u64, interval: Duration) -> RepairHandle {
        let limiter = Arc::new(RateLimiter::new(Some(rate.max(1)), rate.max(1 << 20)));
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let piece = (rate / PIECE_OF_A_SECOND).max(MIN_PIECE);
        let repairer = Repairer { coordinator, limiter, piece, interval };
        tokio::spawn(repairer.run(rx));
        RepairHandle { requests: tx }
    }

    async fn run(self, mut requests: mpsc::Receiver<oneshot::Sender<RepairReport>>) {
        let mut seen = self.coordinator.topology.generation();
        let mut changed_at: Option<Instant> = None;
        // The first full pass runs soon after startup: this origin may have been down while
        // the others took writes meant for it, or may hold copies it no longer owns.
        let mut last_full = Instant::now() - self.interval * FULL_PASS_EVERY + self.interval;
        let mut last_queue = Instant::now();
        loop {
            tokio::select! {
                request = requests.recv() => {
                    let Some(reply) = request else { return };
                    let report = self.full_pass().await;
                    last_full = Instant::now();
                    let _ = reply.send(report);
                }
                _ = tokio::time::sleep(TICK) => {
                    let generation = self.coordinator.topology.generation();
                    if generation != seen {
                        seen = generation;
                        changed_at = Some(Instant::now());
                    }
                    // Wait for membership to settle for a tick before moving data around.
                    let settled = changed_at.is_some_and(|t| t.elapsed() >= TICK);
                    if settled || last_full.elapsed() >= self.interval * FULL_PASS_EVERY {
                        changed_at = None;
                        let report = self.full_pass().await;
                        last_full = Instant::now();
                        if report != RepairReport::default() {
                            tracing::info!(?report, "repair pass");
                        }
                    } else if last_queue.elapsed() >= self.interval {
                        let mut report = RepairReport::default();
                        self.queue_pass(&mut report).await;
                        last_queue = Instant::now();
                    }
                }
            }
        }
    }

    /// Work the queue, check every repository and blob held here, then the queue again.
    ///
    /// The queue goes first because it names exactly what was written while an owner was
    /// unreachable: a full pass follows an owner's return, and a walk over every blob held
    /// here can take minutes in a large store, while reads ask the owners only and would see
    /// an owner's older records (a retag) until its records came home. Repositories go
    /// before blobs for the same reason: a write made while its owner was counted down (out
    /// of the live list) landed on the next origin in the ranking, its owner then, and was
    /// not queued; their records are small, and a blob is found on any live origin while it
    /// is away from its owners.
    ///
    /// A membership change during the walk (an owner back while it runs) has the queue
    /// worked again at once, and the repositories walked again, for the same reason.
    ///
    /// The queue is also worked every repair interval during the walk: a walk of a large
    /// store takes minutes, and an item queued meanwhile (a write an owner missed) waited for
    /// its end, holding garbage collection back as long.
    pub async fn full_pass(&self) -> RepairReport {
        let mut report = RepairReport::default();
        let mut walk = Walk { generation: self.coordinator.topology.generation(), queued_at: Instant::now() };
        self.queue_pass(&mut report).await;
        let mut walked_at = walk.generation;
        let started = Instant::now();
        self.repos_pass(&mut walk, &mut report).await;
        // A walk over the repositories again waits as long as the last one took: a member
        // that keeps flapping leaves the blobs at least half of the pass.
        let (mut walk_took, mut walk_ended) = (started.elapsed(), Instant::now());
        let local = self.coordinator.local.clone();
        let mut after: Option<Digest> = None;
        loop {
            let page = match local.blob_list(after.as_ref(), PAGE).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "repair could not list blobs");
                    report.failures += 1;
                    break;
                }
            };
            for entry in &page {
                self.queue_pass_if_due(&mut walk, &mut report).await;
                if walk.generation != walked_at && walk_ended.elapsed() >= walk_took {
                    // An owner came back (or went) during the walk: its repositories first.
                    walked_at = walk.generation;
                    let started = Instant::now();
                    self.repos_pass(&mut walk, &mut report).await;
                    (walk_took, walk_ended) = (started.elapsed(), Instant::now());
                }
                self.reconcile_blob(entry, &mut report).await;
            }
            match page.last() {
                Some(last) if page.len() == PAGE => after = Some(last.digest.clone()),
                _ => break,
            }
        }
        self.queue_pass(&mut report).await;
        self.coordinator.metrics.repair_passes.inc();
        report
    }

    /// Check every repository held here (see [`full_pass`](Self::full_pass)).
    async fn repos_pass(&self, walk: &mut Walk, report: &mut RepairReport) {
        let local = self.coordinator.local.clone();
        let mut after: Option<String> = None;
        loop {
            let page = match local.repos(after.as_deref(), PAGE).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "repair could not list repositories");
                    report.failures += 1;
                    break;
                }
            };
            for repo in &page {
                self.queue_pass_if_due(walk, report).await;
                self.reconcile_repo(repo, report).await;
            }
            match page.last() {
                Some(last) if page.len() == PAGE => after = Some(last.clone()),
                _ => break,
            }
        }
    }

    /// The queue pass a membership change since the walk's last look calls for, or a repair
    /// interval since the last queue pass, if either.
    async fn queue_pass_if_due(&self, walk: &mut Walk, report: &mut RepairReport) {
        let now = self.coordinator.topology.generation();
        if now != walk.generation || walk.queued_at.elapsed() >= self.interval {
            walk.generation = now;
            self.queue_pass(report).await;
            walk.queued_at = Instant::now();
        }
    }

    /// Work through the persistent queue; items that still fail stay queued. Repositories'
    /// records come first (`Meta::repair_pending`): they are small, and they are what reads
    /// compare (a blob is found on any live origin while it is away from its owners).
    async fn queue_pass(&self, report: &mut RepairReport) {
        let store = self.coordinator.local.store().clone();
        let items = match store.repair_pending(QUEUE_BATCH).await {
            Ok(items) => items,
            Err(e) => {
                tracing::warn!(error = %e, "repair could not read its queue");
                return;
            }
        };
        for (item, ticket) in items {
            let before = report.failures;
            let mut settled = true;
            if let Some(digest) = item.strip_prefix("blob:") {
                if let Ok(digest) = digest.parse::<Digest>() {
                    match self.coordinator.local.blob_peek(&digest).await {
                        Ok(Holding::Held(size)) => {
                            let entry = BlobEntry { digest, size, stored_millis: 0 };
                            settled = self.reconcile_blob(&entry, report).await;
                        }
                        Ok(Holding::Absent) => {} // gone (collected): nothing left to place
                        // Being collected: left to garbage collection, which brings the copy
                        // back if its last mark finds the blob used; the item stays (it no
                        // longer holds collections back) until the copy is back or gone.
                        Ok(Holding::Quarantined) => settled = false,
                        Err(_) => report.failures += 1,
                    }
                }
            } else if let Some(repo) = item.strip_prefix("repo:") {
                self.reconcile_repo(repo, report).await;
            }
            if settled && report.failures == before {
                if let Err(e) = store.repair_done(item, ticket).await {
                    tracing::warn!(error = %e, "repair could not update its queue");
                }
            }
        }
        if let Ok(len) = store.repair_len().await {
            self.coordinator.metrics.repair_queue_length.set(i64::try_from(len).unwrap_or(i64::MAX));
        }
    }

    /// Make sure every owner of a blob held here has it; drop the copy here if this origin is
    /// not an owner and all owners confirmed theirs. Returns whether the blob is where it
    /// belongs now (else a queued item stays queued).
    async fn reconcile_blob(&self, entry: &BlobEntry, report: &mut RepairReport) -> bool {
        let c = &self.coordinator;
        let owners = c.owners(&entry.digest.to_string());
        let owner_here = owners.iter().any(|id| id == c.me());
        // Find out who has it first: a copy held by a non-owner is sent only when no owner has
        // one, so that an owner (which repairs too) and a former owner do not both send it.
        let mut missing = Vec::new();
        let mut confirmed = 0;
        // Owners whose copy garbage collection has set aside.
        let mut set_aside = 0;
        for id in &owners {
            if id == c.me() {
                confirmed += 1;
                continue;
            }
            let Some(node) = c.node(id) else {
                report.failures += 1;
                continue;
            };
            // A peek: a stat would bring a set-aside copy back, young, and leave it an
            // unlinked orphan for a whole grace period after the collection.
            match node.blob_peek(&entry.digest).await {
                Ok(Holding::Held(_)) => confirmed += 1,
                Ok(Holding::Quarantined) => set_aside += 1,
                Ok(Holding::Absent) => missing.push(node),
                Err(e) => {
                    tracing::warn!(digest = %entry.digest, origin = %id, error = %e, "repair check failed");
                    report.failures += 1;
                }
            }
        }
        if set_aside > 0 {
            // Garbage collection is deciding this blob's fate: it brings every copy back if
            // its last look finds the blob linked, and purges them all if not. Sending a copy
            // (a write brings the set-aside one back too) or dropping this one, on the strength
            // of copies about to be purged, would undo or pre-empt that. A queued item stays
            // (blobs do not hold collections back) and is looked at again next pass.
            return false;
        }
        if !owner_here && confirmed > 0 {
            missing.clear();
        }
        // An owner whose disk is nearly full takes no copies, as it takes no writes: repair
        // filled it to the brim, and then nothing could be written there at all. The blob
        // stays short of a copy (and a queued item queued) until it has room again.
        missing.retain(|node| c.topology.accepts_writes(node.id()));
        for node in missing {
            let id = node.id().to_string();
            match self.send_blob(node.as_ref(), entry).await {
                Ok(()) => {
                    confirmed += 1;
                    report.copied_blobs += 1;
                    report.copied_bytes += entry.size;
                    c.metrics.repair_copied_blobs.inc();
                    c.metrics.repair_copied_bytes.inc_by(entry.size);
                }
                Err(e) => {
                    tracing::warn!(digest = %entry.digest, origin = %id, error = %e, "repair copy failed");
                    report.failures += 1;
                    c.metrics.repair_failures.inc();
                }
            }
        }
        let all_confirmed = confirmed == owners.len() && !owners.is_empty();
        if owner_here || !all_confirmed {
            return all_confirmed;
        }
        match c.local.blob_remove(&entry.digest).await {
            Ok(true) => {
                report.removed_blobs += 1;
                c.metrics.repair_removed_blobs.inc();
                true
            }
            Ok(false) => true,
            Err(_) => {
                report.failures += 1;
                false
            }
        }
    }

    /// Send the local blob to `node` (which was just found without it).
    async fn send_blob(&self, node: &dyn Node, entry: &BlobEntry) -> Result<(), NodeError> {
        let path = self.coordinator.local.store().blob_path(&entry.digest);
        let body = throttled(open_file(&path, entry.size).await?, self.limiter.clone(), self.piece);
        node.blob_put(&entry.digest, entry.size, body).await
    }

    /// Send this origin's records of `repo` (merged with the owners') to every owner; drop
    /// them here once the owners have them, if this origin is not an owner.
    async fn reconcile_repo(&self, repo: &str, report: &mut RepairReport) {
        let c = &self.coordinator;
        let mut records: Vec<Record> = Vec::new();
        for kind in [RecordKind::Link, RecordKind::Manifest, RecordKind::Tag] {
            match c.local.records_scan(repo, kind, None).await {
                Ok(Some(found)) => records.extend(found),
                Ok(None) => {}
                Err(_) => {
                    report.failures += 1;
                    return;
                }
            }
        }
        let owners = c.owners(repo);
        let mut confirmed = 0;
        for id in &owners {
            if id == c.me() {
                confirmed += 1;
                continue;
            }
            let Some(node) = c.node(id) else {
                report.failures += 1;
                continue;
            };
            if records.is_empty() {
                confirmed += 1;
                continue;
            }
            match node.records_apply(repo, &records).await {
                Ok(()) => confirmed += 1,
                Err(e) => {
                    tracing::warn!(%repo, origin = %id, error = %e, "repair of records failed");
                    report.failures += 1;
                    c.metrics.repair_failures.inc();
                }
            }
        }
        if !records.is_empty() && owners.iter().any(|id| id != c.me()) {
            report.synced_repos += 1;
            c.metrics.repair_synced_repos.inc();
        }
        let owner_here = owners.iter().any(|id| id == c.me());
        if !owner_here && confirmed == owners.len() && !owners.is_empty() {
            // Exactly what the owners took: a record that landed here since the scan stays.
            match c.local.records_forget(repo, &records).await {
                Ok(()) => report.removed_repos += 1,
                Err(_) => report.failures += 1,
            }
        }
    }
}

/// A stream of `body` in pieces of at most `piece` bytes, each after the bucket's tokens.
fn throttled(body: ByteStream, limiter: Arc<RateLimiter>, piece: u64) -> ByteStream {
    let piece = usize::try_from(piece).unwrap_or(usize::MAX).max(1);
    let pieces = body.flat_map(move |chunk| {
        let parts: Vec<std::io::Result<Bytes>> = match chunk {
            Ok(bytes) => (0..bytes.len())
                .step_by(piece)
                .map(|at| Ok(bytes.slice(at..bytes.len().min(at + piece))))
                .collect(),
            Err(e) => vec![Err(e)],
        };
        futures_util::stream::iter(parts)
    });
    Box::pin(pieces.then(move |chunk| {
        let limiter = limiter.clone();
        async move {
            if let Ok(bytes) = &chunk {
                limiter.acquire(bytes.len() as u64).await;
            }
            chunk
        }
    }))
}

/// Where a full pass's walk stands: the membership generation it last looked at, and when it
/// last worked the queue.
struct Walk {
    generation: u64,
    queued_at: Instant,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::record::{Record, RecordKey, RecordValue, Version};
    use crate::cluster::testing::fixed_cluster;

    /// An item queued while a full pass walks a large store is worked within a repair
    /// interval or so, not at the walk's end: here every blob's check waits 100 ms on a slow
    /// owner, so the walk takes seconds, and the records reach their owners in well under one.
    #[tokio::test]
    async fn the_queue_is_worked_during_a_long_walk() {
        let dir = tempfile::tempdir().unwrap();
        let (c, b, other) = fixed_cluster(dir.path(), 3, &[]).await;
        for i in 0..30u32 {
            let data = Bytes::from(format!("blob {i}"));
            let digest = Digest::of(shoal_registry::Algorithm::Sha256, &data);
            let body: ByteStream = Box::pin(futures_util::stream::iter([Ok(data.clone())]));
            c.local.blob_put(&digest, data.len() as u64, body).await.unwrap();
        }
        b.set_peek_delay(Duration::from_millis(100));
        let coordinator = Arc::new(c);
        let interval = Duration::from_millis(200);
        let limiter = Arc::new(RateLimiter::new(Some(1 << 30), 1 << 30));
        let repairer = Repairer { coordinator: coordinator.clone(), limiter, piece: 1 << 20, interval };
        let started = Instant::now();
        let pass = tokio::spawn(async move { repairer.full_pass().await });
        tokio::time::sleep(Duration::from_millis(400)).await;
        // A write the other owners missed, queued here mid-walk.
        let tag = Record {
            key: RecordKey::Tag("v1".into()),
            version: Version::new(1, "a:1"),
            value: Some(RecordValue::Tag { digest: Digest::of(shoal_registry::Algorithm::Sha256, b"m") }),
            expect: None,
        };
        coordinator.local.records_apply("team/x", std::slice::from_ref(&tag)).await.unwrap();
        coordinator.enqueue("repo:team/x".into()).await.unwrap();
        let queued = Instant::now();
        while b.records_of("team/x").is_empty() || other.records_of("team/x").is_empty() {
            assert!(!pass.is_finished(), "the records went out only at the walk's end");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = queued.elapsed();
        let report = pass.await.unwrap();
        assert!(started.elapsed() >= Duration::from_secs(2), "the walk was short: {:?}", started.elapsed());
        assert!(took < Duration::from_secs(1), "the queued item waited {took:?}; {report:?}");
    }

    /// A copy goes out in pieces of a quarter second's worth at most, every byte in order
    /// (1 MiB chunks read from the file used to wait for a second's tokens each at 1 MiB/s).
    #[tokio::test]
    async fn a_throttled_copy_goes_in_small_pieces() {
        let data: Vec<u8> = (0..(3 << 20) + 123u32).map(|i| (i % 251) as u8).collect();
        let chunks: Vec<std::io::Result<Bytes>> =
            data.chunks(1 << 20).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        // 256 KiB/s: pieces of 64 KiB (the bucket here is large, so the test does not wait).
        let piece = (256 << 10) / PIECE_OF_A_SECOND;
        let limiter = Arc::new(RateLimiter::new(Some(1 << 30), 1 << 30));
        let mut out = throttled(Box::pin(futures_util::stream::iter(chunks)), limiter, piece);
        let mut got = Vec::new();
        while let Some(part) = out.next().await {
            let part = part.unwrap();
            assert!(part.len() as u64 <= piece, "a piece of {} bytes", part.len());
            got.extend_from_slice(&part);
        }
        assert_eq!(got, data);
    }
}
