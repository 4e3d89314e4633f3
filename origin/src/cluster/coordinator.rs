//! [`Coordinator`]: replicated reads and writes over the live origins. Writes go to the top R
//! origins for their key and fall back down the rendezvous ranking when an owner cannot take
//! them (a sloppy quorum), so a dead owner does not block pushes; whatever did not land on its
//! rightful owner is queued for repair. Reads merge the owners' answers, newest version wins,
//! and push the winner back to owners that were stale (read repair). Whole-repository scans
//! and listings are in [`scans`].

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::join_all;
use shoal_registry::range::ByteRange;
use shoal_registry::store::file_range_stream;
use shoal_registry::{ByteStream, Digest, StoreError};

use crate::cluster::clock_sync::Skews;
use crate::cluster::local::LocalNode;
use crate::cluster::metrics::ClusterMetrics;
use crate::cluster::node::{Node, NodeError};
use crate::cluster::placement;
pub use crate::cluster::read_repair::{ReadRepairs, MAX_READ_REPAIRS};
use crate::cluster::record::{Record, RecordKey, VersionClock};
use crate::cluster::topology::Topology;

mod hedge;
mod looks;
mod scans;
#[cfg(test)]
mod tests;

/// One origin's answer to a question asked of several.
type Answer<T> = (String, Result<T, NodeError>);

/// Settings the coordinator needs.
#[derive(Clone, Copy, Debug)]
pub struct Replication {
    /// Copies of every blob and repository.
    pub replicas: usize,
    /// Copies that must be durable before a write succeeds.
    pub write_quorum: usize,
}

/// Where a write landed.
#[derive(Debug, Default)]
pub struct Placed {
    /// Origins that hold the write now.
    pub ok: Vec<String>,
    /// Whether every rightful owner has it (else repair has work to do).
    pub all_owners: bool,
    /// The last failure seen, for the error message.
    pub last_error: Option<String>,
}

/// What a placement puts on its owners. An origin whose disk is nearly full takes no blob
/// copies but still takes records (a few KiB each): skipped for those too, every write to one
/// of its repositories queued a repair item, and garbage collection, which waits for the
/// repair queues to empty, hardly ever ran to free the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copies {
    Records,
    Blob,
}

/// Replicated operations over the cluster.
pub struct Coordinator {
    pub topology: Arc<dyn Topology>,
    pub local: Arc<LocalNode>,
    pub clock: VersionClock,
    pub replication: Replication,
    pub metrics: ClusterMetrics,
    /// Held while garbage collection runs here (one at a time).
    pub gc_lock: crate::cluster::gc::GcLock,
    /// The other origins' clocks, as measured from their health replies.
    pub skews: Skews,
    /// Read repairs running in the background.
    pub read_repairs: Arc<ReadRepairs>,
    /// The member list of the cluster's last garbage collection (see `cluster::collected`).
    pub collections: Arc<crate::cluster::collected::Collections>,
}

fn unavailable(what: &str, why: Option<String>) -> StoreError {
    StoreError::Unavailable(format!("{what}: {}", why.unwrap_or_else(|| "no origin answered".into())))
}

fn node_to_store(e: NodeError) -> StoreError {
    match e {
        NodeError::StorageFull => StoreError::StorageFull,
        NodeError::Corrupt(d) => StoreError::Internal(format!("a copy of {d} is corrupt")),
        other => StoreError::Unavailable(other.to_string()),
    }
}

impl Coordinator {
    pub fn me(&self) -> &str {
        self.topology.me()
    }

    /// Live origins ranked for `key`; the first R are its owners.
    pub fn ranked(&self, key: &str) -> Vec<String> {
        placement::ranked(key, &self.topology.live())
    }

    /// The owners of `key` among the live origins.
    pub fn owners(&self, key: &str) -> Vec<String> {
        let mut ranked = self.ranked(key);
        ranked.truncate(self.replication.replicas);
        ranked
    }

    pub fn node(&self, id: &str) -> Option<Arc<dyn Node>> {
        if id == self.me() {
            return Some(self.local.clone());
        }
        self.topology.node(id)
    }

    /// Whether origin `id` takes `what`.
    fn takes(&self, id: &str, what: Copies) -> bool {
        match what {
            Copies::Records => self.topology.takes_records(id),
            Copies::Blob => self.topology.accepts_writes(id),
        }
    }

    /// Run `op` on the owners of `key`, falling back to the next origins in the ranking for
    /// each owner that fails, until R origins took it or none is left. This origin takes its
    /// part last, after the others answered: a write another origin refuses as coming from a
    /// clock too far ahead (when that origin's clock is not known to be the wrong one) ends
    /// there, with no copy left here and no fallback, and fails.
    pub async fn place<F, Fut>(&self, key: &str, what: Copies, op: F) -> Result<Placed, StoreError>
    where
        F: Fn(Arc<dyn Node>) -> Fut,
        Fut: Future<Output = Result<(), NodeError>>,
    {
        let ranked = self.ranked(key);
        let r = self.replication.replicas.min(ranked.len());
        let me = self.me();
        let attempt = |id: &String| {
            let node = self.node(id).filter(|_| self.takes(id, what));
            let op = &op;
            let id = id.clone();
            async move {
                let result = match node {
                    Some(n) => op(n).await,
                    None => Err(NodeError::Unreachable {
                        node: id.clone(),
                        reason: "not a member, or its disk is nearly full".into(),
                    }),
                };
                (id, result)
            }
        };
        let (owners_here, owners_elsewhere): (Vec<String>, Vec<String>) =
            ranked[..r].iter().cloned().partition(|id| id == me);
        // The other origins first, this one last (as above), when falling back too.
        let (fallback_here, fallback_elsewhere): (Vec<&String>, Vec<&String>) =
            ranked[r..].iter().partition(|id| *id == me);
        // Records only: a blob's second copy would cost its size (see `hedge`).
        let hedge_after = (what == Copies::Records).then_some(hedge::HEDGE_AFTER);
        let takers: Vec<String> = fallback_elsewhere
            .iter()
            .filter(|id| self.node(id).is_some() && self.takes(id, what))
            .map(|id| id.to_string())
            .collect();
        let asked = hedge::ask_owners(&owners_elsewhere, &takers, hedge_after, attempt).await;
        self.stop_if_clock_refused(&asked.owners)?;
        self.stop_if_clock_refused(&asked.hedges)?;
        let mut results = asked.owners;
        for id in &owners_here {
            results.push(attempt(id).await);
        }
        let mut placed = Placed { all_owners: true, ..Placed::default() };
        let mut failed: usize = 0;
        for (id, result) in results {
            match result {
                Ok(()) => placed.ok.push(id),
                Err(NodeError::Corrupt(d)) => return Err(node_to_store(NodeError::Corrupt(d))),
                Err(e) => {
                    tracing::warn!(origin = %id, %key, error = %e, "owner could not take a write");
                    self.metrics.replication_failures.inc();
                    placed.all_owners = false;
                    placed.last_error = Some(e.to_string());
                    failed += 1;
                }
            }
        }
        for (id, result) in asked.hedges {
            match result {
                Ok(()) => {
                    placed.ok.push(id);
                    // Stands for a slow owner's copy.
                    failed = failed.saturating_sub(1);
                }
                Err(NodeError::Corrupt(d)) => return Err(node_to_store(NodeError::Corrupt(d))),
                Err(e) => placed.last_error = Some(e.to_string()),
            }
        }
        for id in fallback_elsewhere.into_iter().chain(fallback_here) {
            if failed == 0 {
                break;
            }
            if asked.asked.contains(id) || self.node(id).is_none() || !self.takes(id, what) {
                continue;
            }
            let answer = attempt(id).await;
            self.stop_if_clock_refused(std::slice::from_ref(&answer))?;
            match answer.1 {
                Ok(()) => {
                    placed.ok.push(answer.0);
                    failed -= 1;
                }
                Err(NodeError::Corrupt(d)) => return Err(node_to_store(NodeError::Corrupt(d))),
                Err(e) => placed.last_error = Some(e.to_string()),
            }
        }
        Ok(placed)
    }

    /// The end of a write that an origin refused for its versions, unless that origin's
    /// clock is known to be out of sync with this one's (then the other origins, which agree
    /// with this one, take the write: see [`Skews::write_refusal`]).
    fn stop_if_clock_refused(&self, answers: &[Answer<()>]) -> Result<(), StoreError> {
        for (id, answer) in answers {
            if let Err(e @ NodeError::ClockRefused { .. }) = answer {
                if !self.skews.out_of_sync(id) {
                    tracing::warn!(origin = %id, error = %e, "write refused for this origin's clock: not written anywhere else");
                    return Err(StoreError::Unavailable(format!(
                        "{e} (the write was stopped: keep the origins' clocks in sync with NTP)"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Whether this origin may hand out versions for a write now: not while it has read a
    /// version its clock cannot follow (its write would be older and lose after its `201`),
    /// nor while most other live origins' clocks disagree with its own.
    fn may_write(&self) -> Result<(), StoreError> {
        let why = match self.clock.unfollowed_ahead() {
            Some(ms) => Some(format!(
                "this origin's clock is {:.1} s behind a version it has read: writes are refused until the clocks agree (fix NTP)",
                ms as f64 / 1000.0
            )),
            None => {
                let others: Vec<String> =
                    self.topology.live().into_iter().filter(|id| id != self.me()).collect();
                self.skews.write_refusal(&others)
            }
        };
        match why {
            Some(why) => {
                tracing::warn!(reason = %why, "write refused");
                Err(StoreError::Unavailable(why))
            }
            None => Ok(()),
        }
    }

    /// Queue `item` for repair on this origin; losing the entry would lose a copy, so a
    /// failure to queue fails the write.
    pub(crate) async fn enqueue(&self, item: String) -> Result<(), StoreError> {
        self.local.store().repair_enqueue(item).await?;
        self.metrics.repair_queue_length.inc();
        Ok(())
    }

    /// Write records to the owners of `repo` with the write quorum.
    pub async fn write_records(&self, repo: &str, records: Vec<Record>) -> Result<(), StoreError> {
        self.write_records_by(repo, records, None).await
    }

    /// [`write_records`](Self::write_records) where no copy commits past `deadline`, on
    /// whichever origin it lands (see `Node::records_apply_by`).
    pub async fn write_records_by(
        &self,
        repo: &str,
        records: Vec<Record>,
        deadline: Option<std::time::Instant>,
    ) -> Result<(), StoreError> {
        self.may_write()?;
        let records = Arc::new(records);
        let placed = self
            .place(repo, Copies::Records, |node| {
                let records = records.clone();
                let repo = repo.to_string();
                async move {
                    match deadline {
                        Some(deadline) => node.records_apply_by(&repo, &records, deadline).await,
                        None => node.records_apply(&repo, &records).await,
                    }
                }
            })
            .await?;
        if placed.ok.len() < self.replication.write_quorum {
            // Some origins may hold the records already (readers see them): queue the
            // repository so repair brings every owner to the same state.
            if !placed.ok.is_empty() {
                if !placed.ok.iter().any(|id| id == self.me()) {
                    let _ = self.apply_here(repo, &records, deadline).await;
                }
                let _ = self.enqueue(format!("repo:{repo}")).await;
            }
            return Err(unavailable(
                &format!("metadata of {repo} reached too few origins"),
                placed.last_error,
            ));
        }
        if !placed.all_owners {
            // A copy of the records is on this origin only if it took part; make sure one is,
            // so repair has a source.
            if !placed.ok.iter().any(|id| id == self.me()) {
                self.apply_here(repo, &records, deadline).await.map_err(node_to_store)?;
            }
            self.enqueue(format!("repo:{repo}")).await?;
        }
        Ok(())
    }

    /// A copy of `records` on this origin, within `deadline` if there is one.
    async fn apply_here(
        &self,
        repo: &str,
        records: &[Record],
        deadline: Option<std::time::Instant>,
    ) -> Result<(), NodeError> {
        match deadline {
            Some(deadline) => self.local.records_apply_by(repo, records, deadline).await,
            None => self.local.records_apply(repo, records).await,
        }
    }

    /// Copy the blob this origin holds to the owners of its digest; drop the local copy when
    /// this origin is not an owner and every owner confirmed. Returns when the copies it counts
    /// were last seen: placing a large blob takes minutes, and a copy counted at the start (an
    /// owner's old copy, which garbage collection may be setting aside) can go meanwhile. So
    /// once all are placed every copy is looked at again (a look brings a quarantined copy
    /// back; one deleted is sent again), and a link relying on them must land within GC's
    /// read-to-write deadline of that look (see `cluster::gc`).
    pub async fn replicate_blob(&self, digest: &Digest, size: u64) -> Result<Instant, StoreError> {
        let path = self.local.store().blob_path(digest);
        let me = self.me().to_string();
        let mut placed = self
            .place(&digest.to_string(), Copies::Blob, |node| {
                let path = path.clone();
                let me = me.clone();
                async move {
                    if node.id() == me || node.blob_stat(digest).await?.is_some() {
                        return Ok(());
                    }
                    let body = open_file(&path, size).await?;
                    node.blob_put(digest, size, body).await
                }
            })
            .await?;
        let seen_at = self.look_again(digest, size, &mut placed).await;
        if placed.ok.len() < self.replication.write_quorum {
            self.enqueue(format!("blob:{digest}")).await?;
            return Err(unavailable(&format!("blob {digest} reached too few origins"), placed.last_error));
        }
        let here = placed.ok.iter().any(|id| id == &me);
        if !placed.all_owners {
            self.enqueue(format!("blob:{digest}")).await?;
        } else if !here {
            self.local.blob_remove(digest).await.map_err(node_to_store)?;
        }
        if here || !placed.all_owners {
            // This copy stays and will be seeded: hash its pieces now, not at the first pull.
            self.local.store().precompute_metainfo(digest);
        }
        Ok(seen_at)
    }

    /// Stream a blob from wherever a copy is: here, its owners, then any live origin.
    pub async fn open_blob(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>, StoreError> {
        if let Some(s) = self.local.blob_get(digest, range).await.map_err(node_to_store)? {
            return Ok(Some(s));
        }
        let mut last_error = None;
        for id in self.ranked(&digest.to_string()) {
            if id == self.me() {
                continue;
            }
            let Some(node) = self.node(&id) else { continue };
            match node.blob_get(digest, range).await {
                Ok(Some(s)) => return Ok(Some(s)),
                Ok(None) => {}
                Err(e) => last_error = Some(e.to_string()),
            }
        }
        match last_error {
            Some(e) => Err(unavailable(&format!("blob {digest}"), Some(e))),
            None => Ok(None),
        }
    }

    /// Records for `keys` of `repo`, newest copy of each across its owners (and across the
    /// other live origins for keys no owner has: ownership may have just moved).
    pub async fn read_records(
        &self,
        repo: &str,
        keys: &[RecordKey],
    ) -> Result<Vec<Option<Record>>, StoreError> {
        let ranked = self.ranked(repo);
        let r = self.replication.replicas.min(ranked.len());
        let answers = self.ask(&ranked[..r], |n| async move { n.records_get(repo, keys).await }).await;
        let mut merged: Vec<Option<Record>> = vec![None; keys.len()];
        let mut owners_answered = 0;
        for (_, answer) in &answers {
            if let Ok(records) = answer {
                owners_answered += 1;
                merge_into(&mut merged, records);
            }
        }
        if merged.iter().any(Option::is_none) || owners_answered == 0 {
            let more = self.ask(&ranked[r..], |n| async move { n.records_get(repo, keys).await }).await;
            for (_, answer) in &more {
                if let Ok(records) = answer {
                    merge_into(&mut merged, records);
                }
            }
        }
        // What the other origins hold is only added to an owner's answer: with no owner
        // answering, "not found" is not known (a client would take a 404 for good, a manifest
        // put would call its blobs unknown), only what some origin still had.
        if owners_answered == 0 && merged.iter().any(Option::is_none) {
            let why = answers.into_iter().find_map(|(_, a)| a.err()).map(|e| e.to_string());
            return Err(unavailable(&format!("metadata of {repo}"), why));
        }
        self.repair_on_read(repo, &answers, |i| merged.get(i).cloned().flatten());
        self.observe(merged.iter().flatten());
        Ok(merged)
    }

    /// Move the version clock past the versions of records read, so a write that follows
    /// gets a later version (see `VersionClock`).
    fn observe<'a>(&self, records: impl IntoIterator<Item = &'a Record>) {
        for r in records {
            if !self.clock.observe(&r.version) {
                tracing::warn!(node = %r.version.node, millis = r.version.millis, "record version far ahead of this origin's clock: not followed");
            }
        }
    }

    /// Ask each of `ids` concurrently.
    async fn ask<'a, T, F, Fut>(&self, ids: &[String], op: F) -> Vec<Answer<T>>
    where
        F: Fn(Arc<dyn Node>) -> Fut,
        Fut: Future<Output = Result<T, NodeError>> + 'a,
    {
        let calls = ids.iter().map(|id| {
            let node = self.node(id);
            let call = node.map(&op);
            async move {
                let result = match call {
                    Some(call) => call.await,
                    None => Err(NodeError::Unreachable { node: id.clone(), reason: "not a member".into() }),
                };
                (id.clone(), result)
            }
        });
        join_all(calls).await
    }

    /// Send the winning copies to owners whose answer was older or missing (best effort, in
    /// the background, within [`ReadRepairs`]' limits).
    fn repair_on_read(
        &self,
        repo: &str,
        answers: &[Answer<Vec<Option<Record>>>],
        winner: impl Fn(usize) -> Option<Record>,
    ) {
        for (id, answer) in answers {
            let Ok(records) = answer else { continue };
            let stale: Vec<Record> = records
                .iter()
                .enumerate()
                .filter_map(|(i, have)| {
                    let best = winner(i)?;
                    best.supersedes(have.as_ref()).then_some(best)
                })
                .collect();
            if stale.is_empty() {
                continue;
            }
            let Some(node) = self.node(id) else { continue };
            let Some(slot) = self.read_repairs.claim(id, repo) else {
                tracing::debug!(origin = %id, %repo, "read repair skipped: one runs already, or too many do");
                continue;
            };
            let repo = repo.to_string();
            tracing::info!(origin = %id, %repo, records = stale.len(), "read repair");
            tokio::spawn(async move {
                let _slot = slot;
                if let Err(e) = node.records_apply(&repo, &stale).await {
                    tracing::warn!(%repo, error = %e, "read repair failed");
                }
            });
        }
    }
}

fn merge_into(merged: &mut [Option<Record>], records: &[Option<Record>]) {
    for (slot, rec) in merged.iter_mut().zip(records) {
        if let Some(rec) = rec {
            if rec.supersedes(slot.as_ref()) {
                *slot = Some(rec.clone());
            }
        }
    }
}

/// A stream of a whole local blob file.
pub async fn open_file(path: &std::path::Path, size: u64) -> Result<ByteStream, NodeError> {
    let range = ByteRange { start: 0, end: size.saturating_sub(1) };
    file_range_stream(path, range, size)
        .await
        .map_err(|e| NodeError::Storage { node: "local".into(), reason: e.to_string() })
}
