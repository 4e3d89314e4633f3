//! Metadata in redb: which blob files exist here, the repository records this origin holds
//! (links, manifests, tags; see `cluster::record`), the referrers index, and open upload
//! sessions. Every change is one redb transaction, so a crash leaves each record either fully
//! written or absent. All calls block: run them on the blocking pool.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use shoal_registry::{Digest, StoreError};

use crate::cluster::node::BlobEntry;
use crate::cluster::record::now_millis;

/// digest → (size, ms since the epoch when stored) of every blob file present.
const BLOBS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("blob_files");
/// (repo, kind, key) → JSON [`Record`]: links, manifests and tags of the repositories this
/// origin holds (see `cluster::record`).
const RECORDS: TableDefinition<(&str, &str, &str), &str> = TableDefinition::new("records");
/// (repo, subject, manifest digest) → unused: the referrers index over manifest records.
const SUBJECTS: TableDefinition<(&str, &str, &str), u8> = TableDefinition::new("subjects");
/// repository name → unused: repositories with at least one record here.
const REPOS: TableDefinition<&str, u8> = TableDefinition::new("repos");
/// upload id → JSON [`UploadRecord`].
const UPLOADS: TableDefinition<&str, &str> = TableDefinition::new("uploads");
/// "blob:<digest>" or "repo:<name>" → ms since the epoch when queued: copies a write could
/// not place on an owner, kept until repair has placed them.
const REPAIR: TableDefinition<&str, u64> = TableDefinition::new("repair_queue");
/// The prefix of a repository's item in the repair queue (`repo:<name>`).
const REPO_ITEMS: &str = "repo:";
/// The first key past every repository's item (`;` follows `:`).
const REPO_ITEMS_END: &str = "repo;";
/// digest → metainfo JSON (piece length and chaining values), computed once per blob; one
/// stored by an older version (per-piece hashes) no longer decodes and is computed again.
const METAINFO: TableDefinition<&str, &[u8]> = TableDefinition::new("metainfo");
/// digest → (size, ms since the epoch when set aside): blob files garbage collection moved to
/// `quarantine/`. Brought back when anything asks for them; deleted only by a later pass that
/// finds them still unreferenced (see `cluster::gc`).
const QUARANTINE: TableDefinition<&str, (u64, u64)> = TableDefinition::new("blob_quarantine");

/// A persisted upload session; its byte count is the length of its data file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UploadRecord {
    pub repo: String,
    /// Unix seconds of the session's start.
    pub created: u64,
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    describe(&e.into())
}

/// A redb error as the store reports it: a full disk as such (507 for uploads), the rest as
/// internal errors.
fn describe(e: &redb::Error) -> StoreError {
    match e {
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => StoreError::StorageFull,
        other => StoreError::Internal(format!("metadata database: {other}")),
    }
}

fn closed() -> StoreError {
    StoreError::Internal("metadata database: closed after an I/O error; reopening".into())
}

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Internal(format!("metadata record: {e}"))
}

/// The origin's metadata database. redb stops at its first I/O error (a full disk during a
/// commit): every later transaction fails with `PreviousIo` until the database is opened
/// again. Kept as it was, one full disk left the origin answering 500 to every write until it
/// restarted, though the space came back at once; so an I/O error marks the handle broken,
/// and the next call closes and opens the file again.
pub struct Meta {
    path: PathBuf,
    /// `None` only between closing a broken handle and opening the file again (or while that
    /// fails).
    db: RwLock<Option<Database>>,
    broken: AtomicBool,
}

impl Meta {
    /// Open (or create) the database and make sure every table exists.
    pub fn open(path: &Path) -> Result<Meta, StoreError> {
        let db = Self::open_db(path)?;
        Ok(Meta { path: path.to_path_buf(), db: RwLock::new(Some(db)), broken: AtomicBool::new(false) })
    }

    fn open_db(path: &Path) -> Result<Database, StoreError> {
        let db = Database::create(path).map_err(db_err)?;
        let txn = db.begin_write().map_err(db_err)?;
        {
            txn.open_table(BLOBS).map_err(db_err)?;
            txn.open_table(RECORDS).map_err(db_err)?;
            txn.open_table(SUBJECTS).map_err(db_err)?;
            txn.open_table(REPOS).map_err(db_err)?;
            txn.open_table(UPLOADS).map_err(db_err)?;
            txn.open_table(METAINFO).map_err(db_err)?;
            txn.open_table(REPAIR).map_err(db_err)?;
            txn.open_table(QUARANTINE).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(db)
    }

    /// The database, opened again first if an I/O error broke the handle. Transactions run on
    /// the handle they began on; one still running when the file is opened again keeps the
    /// old handle's lock, and opening waits for a later call. A call that finds the handle
    /// broken and cannot open it now (another call is opening it, which can take long: redb
    /// repairs the file) fails at once rather than waiting behind the opening.
    fn db(&self) -> Result<RwLockReadGuard<'_, Option<Database>>, StoreError> {
        if self.broken.load(Ordering::Acquire) {
            self.reopen();
            if self.broken.load(Ordering::Acquire) {
                return Err(closed());
            }
        }
        let db = self.db.read().unwrap_or_else(|p| p.into_inner());
        if db.is_none() {
            return Err(closed());
        }
        Ok(db)
    }

    fn reopen(&self) {
        // Not waited for: every metadata call would queue behind a repair of the file.
        let mut db = match self.db.try_write() {
            Ok(db) => db,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        if !self.broken.load(Ordering::Acquire) {
            return; // another call did it
        }
        // redb locks its file: the broken handle goes first.
        drop(db.take());
        match Self::open_db(&self.path) {
            Ok(fresh) => {
                *db = Some(fresh);
                self.broken.store(false, Ordering::Release);
                tracing::warn!(path = %self.path.display(), "metadata database opened again after an I/O error");
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot open the metadata database again")
            }
        }
    }

    /// A read transaction (see [`db`](Self::db)).
    fn read(&self) -> Result<redb::ReadTransaction, StoreError> {
        match self.db()?.as_ref() {
            Some(db) => db.begin_read().map_err(|e| self.fail(e)),
            None => Err(closed()),
        }
    }

    /// A write transaction (see [`db`](Self::db)).
    fn write(&self) -> Result<redb::WriteTransaction, StoreError> {
        match self.db()?.as_ref() {
            Some(db) => db.begin_write().map_err(|e| self.fail(e)),
            None => Err(closed()),
        }
    }

    /// Map a redb error, marking the handle broken on an I/O error.
    fn fail(&self, e: impl Into<redb::Error>) -> StoreError {
        let e = e.into();
        if matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo) {
            self.broken.store(true, Ordering::Release);
        }
        describe(&e)
    }

    /// Sum of the sizes of all blob files, for the storage metric.
    pub fn total_blob_bytes(&self) -> Result<u64, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(BLOBS).map_err(|e| self.fail(e))?;
        let mut total = 0u64;
        for entry in table.iter().map_err(|e| self.fail(e))? {
            total += entry.map_err(|e| self.fail(e))?.1.value().0;
        }
        Ok(total)
    }

    /// Size of a blob file present on this origin.
    pub fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(BLOBS).map_err(|e| self.fail(e))?;
        let d = digest.to_string();
        Ok(table.get(d.as_str()).map_err(|e| self.fail(e))?.map(|v| v.value().0))
    }

    /// The blob's size if stored here, and whether it is quarantined, read in one transaction
    /// (a restore between two reads made a blob that is here look absent).
    pub fn blob_or_quarantined(&self, digest: &Digest) -> Result<(Option<u64>, bool), StoreError> {
        let txn = self.read()?;
        let d = digest.to_string();
        let blobs = txn.open_table(BLOBS).map_err(|e| self.fail(e))?;
        let size = blobs.get(d.as_str()).map_err(|e| self.fail(e))?.map(|v| v.value().0);
        let quarantine = txn.open_table(QUARANTINE).map_err(|e| self.fail(e))?;
        let quarantined = quarantine.get(d.as_str()).map_err(|e| self.fail(e))?.is_some();
        Ok((size, quarantined))
    }

    pub fn metainfo(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(METAINFO).map_err(|e| self.fail(e))?;
        let d = digest.to_string();
        Ok(table.get(d.as_str()).map_err(|e| self.fail(e))?.map(|v| v.value().to_vec()))
    }

    /// Record a blob's metainfo, if the blob is still here: one computed while its blob was
    /// removed (GC, repair) or set aside is not written back, where nothing would remove it.
    pub fn put_metainfo(&self, digest: &Digest, json: &[u8]) -> Result<(), StoreError> {
        let d = digest.to_string();
        let txn = self.write()?;
        let held = txn
            .open_table(BLOBS)
            .map_err(|e| self.fail(e))?
            .get(d.as_str())
            .map_err(|e| self.fail(e))?
            .is_some();
        if !held {
            return Ok(());
        }
        txn.open_table(METAINFO)
            .map_err(|e| self.fail(e))?
            .insert(d.as_str(), json)
            .map_err(|e| self.fail(e))?;
        txn.commit().map_err(|e| self.fail(e))
    }

    pub fn blob_count(&self) -> Result<u64, StoreError> {
        let txn = self.read()?;
        txn.open_table(BLOBS).map_err(|e| self.fail(e))?.len().map_err(|e| self.fail(e))
    }

    /// Record a blob file that was just published (and end its upload session, if any, in the
    /// same transaction); returns whether the file is new here.
    pub fn commit_blob(&self, digest: &Digest, size: u64, upload: Option<&str>) -> Result<bool, StoreError> {
        let d = digest.to_string();
        let txn = self.write()?;
        let new = {
            let mut blobs = txn.open_table(BLOBS).map_err(|e| self.fail(e))?;
            let new = blobs.get(d.as_str()).map_err(|e| self.fail(e))?.is_none();
            // A blob stored again is young again: a client is about to use it (GC's grace).
            blobs.insert(d.as_str(), (size, now_millis())).map_err(|e| self.fail(e))?;
            if let Some(id) = upload {
                txn.open_table(UPLOADS).map_err(|e| self.fail(e))?.remove(id).map_err(|e| self.fail(e))?;
            }
            new
        };
        txn.commit().map_err(|e| self.fail(e))?;
        Ok(new)
    }

    /// Forget a blob file (before it is unlinked); returns its size if it was recorded.
    pub fn remove_blob(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let d = digest.to_string();
        let txn = self.write()?;
        let size = {
            let mut blobs = txn.open_table(BLOBS).map_err(|e| self.fail(e))?;
            let size = blobs.remove(d.as_str()).map_err(|e| self.fail(e))?.map(|v| v.value().0);
            txn.open_table(METAINFO)
                .map_err(|e| self.fail(e))?
                .remove(d.as_str())
                .map_err(|e| self.fail(e))?;
            size
        };
        txn.commit().map_err(|e| self.fail(e))?;
        Ok(size)
    }

    /// Move a blob's entry to the quarantine (before its file moves); returns its size if it
    /// was recorded here.
    pub fn quarantine_blob(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let d = digest.to_string();
        let txn = self.write()?;
        let size = {
            let mut blobs = txn.open_table(BLOBS).map_err(|e| self.fail(e))?;
            let size = blobs.remove(d.as_str()).map_err(|e| self.fail(e))?.map(|v| v.value().0);
            if let Some(size) = size {
                txn.open_table(METAINFO)
                    .map_err(|e| self.fail(e))?
                    .remove(d.as_str())
                    .map_err(|e| self.fail(e))?;
                txn.open_table(QUARANTINE)
                    .map_err(|e| self.fail(e))?
                    .insert(d.as_str(), (size, now_millis()))
                    .map_err(|e| self.fail(e))?;
            }
            size
        };
        txn.commit().map_err(|e| self.fail(e))?;
        Ok(size)
    }

    /// A quarantined blob's (size, ms when set aside).
    pub fn quarantined(&self, digest: &Digest) -> Result<Option<(u64, u64)>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(QUARANTINE).map_err(|e| self.fail(e))?;
        let d = digest.to_string();
        Ok(table.get(d.as_str()).map_err(|e| self.fail(e))?.map(|v| v.value()))
    }

    /// Take a blob out of quarantine (after its file is back, or because a new copy was
    /// published meanwhile): its entry is a stored blob again, young, so the grace period
    /// starts over. Returns its size if it was quarantined.
    pub fn unquarantine_blob(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let d = digest.to_string();
        let txn = self.write()?;
        let size = {
            let size = txn
                .open_table(QUARANTINE)
                .map_err(|e| self.fail(e))?
                .remove(d.as_str())
                .map_err(|e| self.fail(e))?
                .map(|v| v.value().0);
            if let Some(size) = size {
                let mut blobs = txn.open_table(BLOBS).map_err(|e| self.fail(e))?;
                if blobs.get(d.as_str()).map_err(|e| self.fail(e))?.is_none() {
                    blobs.insert(d.as_str(), (size, now_millis())).map_err(|e| self.fail(e))?;
                }
            }
            size
        };
        txn.commit().map_err(|e| self.fail(e))?;
        Ok(size)
    }

    /// Forget a quarantined blob if it was set aside exactly at `since` (so one that came back
    /// and was set aside again later is not forgotten early); returns its size.
    pub fn purge_quarantined(&self, digest: &Digest, since: u64) -> Result<Option<u64>, StoreError> {
        let d = digest.to_string();
        let txn = self.write()?;
        let size = {
            let mut table = txn.open_table(QUARANTINE).map_err(|e| self.fail(e))?;
            let found = table.get(d.as_str()).map_err(|e| self.fail(e))?.map(|v| v.value());
            match found {
                Some((size, at)) if at == since => {
                    table.remove(d.as_str()).map_err(|e| self.fail(e))?;
                    Some(size)
                }
                _ => None,
            }
        };
        txn.commit().map_err(|e| self.fail(e))?;
        Ok(size)
    }

    /// Quarantined blobs in digest order after `after`, at most `limit`; `stored_millis` is when
    /// each was set aside.
    pub fn quarantine_list(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<BlobEntry>, StoreError> {
        self.list_blob_table(QUARANTINE, after, limit)
    }

    /// Blob files in digest order after `after`, at most `limit`.
    pub fn blob_list(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<BlobEntry>, StoreError> {
        self.list_blob_table(BLOBS, after, limit)
    }

    /// A page of a digest → (size, ms) table, in digest order after `after`.
    fn list_blob_table(
        &self,
        table: TableDefinition<&str, (u64, u64)>,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<BlobEntry>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(table).map_err(|e| self.fail(e))?;
        let after = after.map(|d| d.to_string());
        let mut out = Vec::new();
        for entry in table.range(after.as_deref().unwrap_or("")..).map_err(|e| self.fail(e))? {
            let (k, v) = entry.map_err(|e| self.fail(e))?;
            if after.as_deref() == Some(k.value()) {
                continue;
            }
            if out.len() == limit {
                break;
            }
            let Ok(digest) = k.value().parse::<Digest>() else { continue };
            let (size, stored_millis) = v.value();
            out.push(BlobEntry { digest, size, stored_millis });
        }
        Ok(out)
    }

    /// Queue an item for repair. An item already queued stays queued once, with a new ticket:
    /// a pass that took the old ticket must not remove what was queued while it ran
    /// ([`Meta::repair_done`]).
    pub fn repair_enqueue(&self, item: &str) -> Result<(), StoreError> {
        let txn = self.write()?;
        {
            let mut table = txn.open_table(REPAIR).map_err(|e| self.fail(e))?;
            let old = table.get(item).map_err(|e| self.fail(e))?.map(|v| v.value());
            let ticket = old.map_or(0, |t| t.saturating_add(1)).max(now_millis());
            table.insert(item, ticket).map_err(|e| self.fail(e))?;
        }
        txn.commit().map_err(|e| self.fail(e))
    }

    /// Up to `limit` queued items, each with its ticket: the repositories (`repo:…`) first,
    /// then everything else, each in key order. Records go home first: they are what reads
    /// compare, and a long queue of blobs must not hold them back.
    pub fn repair_pending(&self, limit: usize) -> Result<Vec<(String, u64)>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(REPAIR).map_err(|e| self.fail(e))?;
        let mut out = Vec::new();
        let repos = table.range(REPO_ITEMS..REPO_ITEMS_END).map_err(|e| self.fail(e))?;
        let before = table.range(..REPO_ITEMS).map_err(|e| self.fail(e))?;
        let after = table.range(REPO_ITEMS_END..).map_err(|e| self.fail(e))?;
        for entry in repos.chain(before).chain(after).take(limit) {
            let entry = entry.map_err(|e| self.fail(e))?;
            out.push((entry.0.value().to_string(), entry.1.value()));
        }
        Ok(out)
    }

    pub fn repair_len(&self) -> Result<u64, StoreError> {
        let txn = self.read()?;
        txn.open_table(REPAIR).map_err(|e| self.fail(e))?.len().map_err(|e| self.fail(e))
    }

    /// Repositories queued for repair (their records not yet on every owner).
    pub fn repair_repos_len(&self) -> Result<u64, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(REPAIR).map_err(|e| self.fail(e))?;
        let mut n = 0;
        for entry in table.range(REPO_ITEMS..REPO_ITEMS_END).map_err(|e| self.fail(e))? {
            entry.map_err(|e| self.fail(e))?;
            n += 1;
        }
        Ok(n)
    }

    /// Take `item` off the queue if it is still queued with `ticket`: queued again since (a
    /// write that missed its owners while the pass ran), it stays for the next pass.
    pub fn repair_done(&self, item: &str, ticket: u64) -> Result<(), StoreError> {
        let txn = self.write()?;
        {
            let mut table = txn.open_table(REPAIR).map_err(|e| self.fail(e))?;
            let current = table.get(item).map_err(|e| self.fail(e))?.map(|v| v.value());
            if current == Some(ticket) {
                table.remove(item).map_err(|e| self.fail(e))?;
            }
        }
        txn.commit().map_err(|e| self.fail(e))
    }

    pub fn add_upload(&self, id: &str, record: &UploadRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(record).map_err(json_err)?;
        let txn = self.write()?;
        txn.open_table(UPLOADS)
            .map_err(|e| self.fail(e))?
            .insert(id, json.as_str())
            .map_err(|e| self.fail(e))?;
        txn.commit().map_err(|e| self.fail(e))
    }

    pub fn remove_upload(&self, id: &str) -> Result<(), StoreError> {
        let txn = self.write()?;
        txn.open_table(UPLOADS).map_err(|e| self.fail(e))?.remove(id).map_err(|e| self.fail(e))?;
        txn.commit().map_err(|e| self.fail(e))
    }

    pub fn uploads(&self) -> Result<Vec<(String, UploadRecord)>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(UPLOADS).map_err(|e| self.fail(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.fail(e))? {
            let (k, v) = entry.map_err(|e| self.fail(e))?;
            out.push((k.value().to_string(), serde_json::from_str(v.value()).map_err(json_err)?));
        }
        Ok(out)
    }
}

mod records;

#[cfg(test)]
pub(crate) mod tests;
