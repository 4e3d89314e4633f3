//! The repository records this origin holds (links, manifests, tags; see `cluster::record`)
//! and the referrers index over them: their own file because record scans page (a repository
//! with many large manifests answers more than one response holds).

use std::ops::Bound;

use redb::ReadableTable;
use shoal_registry::{Digest, StoreError};

use super::{json_err, Meta, RECORDS, REPOS, SUBJECTS};
use crate::cluster::node::{RecordPage, ScanPage};
use crate::cluster::record::{Record, RecordKey, RecordKind};

impl Meta {
    /// The records for `keys` of `repo`, in the same order.
    pub fn records_get(&self, repo: &str, keys: &[RecordKey]) -> Result<Vec<Option<Record>>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(RECORDS).map_err(|e| self.fail(e))?;
        keys.iter()
            .map(|k| {
                let name = k.name();
                let value = table.get((repo, k.kind().as_str(), name.as_str())).map_err(|e| self.fail(e))?;
                value.map(|v| serde_json::from_str(v.value()).map_err(json_err)).transpose()
            })
            .collect()
    }

    /// Records of `kind` in `repo` (only manifests referring to `subject` if given), `None` if
    /// no record of the repository is held here: those whose key names follow `page.after`,
    /// in key order, until the next would take their stored JSON past `page.max_bytes` (at
    /// least one record, so any record fits a page). Each page is its own read: a record
    /// present for the whole of a paged scan is in exactly one page.
    pub fn records_page(
        &self,
        repo: &str,
        kind: RecordKind,
        subject: Option<&Digest>,
        page: &ScanPage,
    ) -> Result<Option<RecordPage>, StoreError> {
        let txn = self.read()?;
        if txn.open_table(REPOS).map_err(|e| self.fail(e))?.get(repo).map_err(|e| self.fail(e))?.is_none() {
            return Ok(None);
        }
        let table = txn.open_table(RECORDS).map_err(|e| self.fail(e))?;
        let mut out = Filler { page, bytes: 0, answer: RecordPage::default() };
        let after = page.after.as_deref();
        match subject {
            Some(subject) => {
                let s = subject.to_string();
                let index = txn.open_table(SUBJECTS).map_err(|e| self.fail(e))?;
                let from = after.map_or(Bound::Included((repo, s.as_str(), "")), |a| {
                    Bound::Excluded((repo, s.as_str(), a))
                });
                for entry in index.range((from, Bound::Unbounded)).map_err(|e| self.fail(e))? {
                    let (k, _) = entry.map_err(|e| self.fail(e))?;
                    let (r, subj, digest) = k.value();
                    if r != repo || subj != s {
                        break;
                    }
                    if let Some(v) =
                        table.get((repo, RecordKind::Manifest.as_str(), digest)).map_err(|e| self.fail(e))?
                    {
                        if !out.push(v.value())? {
                            break;
                        }
                    }
                }
            }
            None => {
                let kind = kind.as_str();
                let from =
                    after.map_or(Bound::Included((repo, kind, "")), |a| Bound::Excluded((repo, kind, a)));
                for entry in table.range((from, Bound::Unbounded)).map_err(|e| self.fail(e))? {
                    let (k, v) = entry.map_err(|e| self.fail(e))?;
                    let (r, kd, _) = k.value();
                    if r != repo || kd != kind {
                        break;
                    }
                    if !out.push(v.value())? {
                        break;
                    }
                }
            }
        }
        Ok(Some(out.answer))
    }

    /// `records_apply_by` with no deadline (tests).
    #[cfg(test)]
    pub fn records_apply(&self, repo: &str, records: &[Record]) -> Result<usize, StoreError> {
        self.records_apply_by(repo, records, None)
    }

    /// Merge records into `repo`, keeping the newer version of each key; returns how many
    /// changed something here. Commits nothing if `deadline` has passed once the database's
    /// writer lock is taken or when the records are ready to commit.
    pub fn records_apply_by(
        &self,
        repo: &str,
        records: &[Record],
        deadline: Option<std::time::Instant>,
    ) -> Result<usize, StoreError> {
        let late = || {
            deadline.is_some_and(|d| std::time::Instant::now() >= d).then(|| {
                StoreError::Unavailable("the write's deadline passed before it could commit; retry".into())
            })
        };
        let txn = self.write()?;
        if let Some(e) = late() {
            return Err(e);
        }
        let (mut changed, mut unchanged) = (0, false);
        {
            let mut table = txn.open_table(RECORDS).map_err(|e| self.fail(e))?;
            let mut subjects = txn.open_table(SUBJECTS).map_err(|e| self.fail(e))?;
            for record in records {
                let (kind, name) = (record.key.kind().as_str(), record.key.name());
                let key = (repo, kind, name.as_str());
                let existing: Option<Record> = table
                    .get(key)
                    .map_err(|e| self.fail(e))?
                    .map(|v| serde_json::from_str(v.value()).map_err(json_err))
                    .transpose()?;
                if !record.applies_over(existing.as_ref()) {
                    continue;
                }
                let json = serde_json::to_string(&record.stored()).map_err(json_err)?;
                table.insert(key, json.as_str()).map_err(|e| self.fail(e))?;
                let old_subject =
                    existing.as_ref().and_then(|r| r.manifest()).and_then(|m| m.subject.clone());
                let new_subject = record.manifest().and_then(|m| m.subject.clone());
                if let Some(s) = old_subject {
                    subjects
                        .remove((repo, s.to_string().as_str(), name.as_str()))
                        .map_err(|e| self.fail(e))?;
                }
                if let Some(s) = new_subject {
                    subjects
                        .insert((repo, s.to_string().as_str(), name.as_str()), 0)
                        .map_err(|e| self.fail(e))?;
                }
                changed += 1;
            }
            if !records.is_empty() {
                let mut repos = txn.open_table(REPOS).map_err(|e| self.fail(e))?;
                if changed == 0 && repos.get(repo).map_err(|e| self.fail(e))?.is_some() {
                    unchanged = true;
                } else {
                    repos.insert(repo, 0).map_err(|e| self.fail(e))?;
                }
            }
        }
        if let Some(e) = late() {
            return Err(e);
        }
        if unchanged {
            // Records this origin already holds (every full repair pass sends each owner its
            // repositories' records again): no commit, so no fsync under the one writer lock
            // that client writes wait on.
            txn.abort().map_err(|e| self.fail(e))?;
            return Ok(0);
        }
        txn.commit().map_err(|e| self.fail(e))?;
        Ok(changed)
    }

    /// Forget exactly the `confirmed` records of `repo` (same key and version) in one
    /// transaction; a record that changed since is kept, and so is the repository while any of
    /// its records remains.
    pub fn records_forget(&self, repo: &str, confirmed: &[Record]) -> Result<(), StoreError> {
        let txn = self.write()?;
        {
            let mut table = txn.open_table(RECORDS).map_err(|e| self.fail(e))?;
            let mut subjects = txn.open_table(SUBJECTS).map_err(|e| self.fail(e))?;
            for record in confirmed {
                let (kind, name) = (record.key.kind().as_str(), record.key.name());
                let key = (repo, kind, name.as_str());
                let stored: Option<Record> = table
                    .get(key)
                    .map_err(|e| self.fail(e))?
                    .map(|v| serde_json::from_str(v.value()).map_err(json_err))
                    .transpose()?;
                let Some(stored) = stored.filter(|s| s.version == record.version) else { continue };
                table.remove(key).map_err(|e| self.fail(e))?;
                if let Some(subject) = stored.manifest().and_then(|m| m.subject.clone()) {
                    subjects
                        .remove((repo, subject.to_string().as_str(), name.as_str()))
                        .map_err(|e| self.fail(e))?;
                }
            }
            let remaining = match table.range((repo, "", "")..).map_err(|e| self.fail(e))?.next() {
                Some(entry) => entry.map_err(|e| self.fail(e))?.0.value().0 == repo,
                None => false,
            };
            if !remaining {
                txn.open_table(REPOS).map_err(|e| self.fail(e))?.remove(repo).map_err(|e| self.fail(e))?;
            }
        }
        txn.commit().map_err(|e| self.fail(e))
    }

    /// Repositories with records here, in order, after `after`, at most `limit`.
    pub fn repos(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(REPOS).map_err(|e| self.fail(e))?;
        let mut items = Vec::new();
        for entry in table.range(after.unwrap_or("")..).map_err(|e| self.fail(e))? {
            let (k, _) = entry.map_err(|e| self.fail(e))?;
            let name = k.value();
            if after == Some(name) {
                continue;
            }
            if items.len() == limit {
                break;
            }
            items.push(name.to_string());
        }
        Ok(items)
    }
}

/// A page being filled: records are added while they fit the page's byte budget.
struct Filler<'a> {
    page: &'a ScanPage,
    bytes: usize,
    answer: RecordPage,
}

impl Filler<'_> {
    /// Add one stored record; `false` (and `more` set) once it does not fit.
    fn push(&mut self, json: &str) -> Result<bool, StoreError> {
        let full = self.bytes.saturating_add(json.len()) > self.page.max_bytes
            || self.answer.records.len() >= self.page.max_records;
        if !self.answer.records.is_empty() && full {
            self.answer.more = true;
            return Ok(false);
        }
        self.bytes = self.bytes.saturating_add(json.len());
        self.answer.records.push(serde_json::from_str(json).map_err(json_err)?);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use shoal_registry::Algorithm;

    use super::*;
    use crate::cluster::record::{ManifestValue, RecordValue, Version};

    fn manifest(i: u32, subject: Option<&Digest>, pad: usize) -> Record {
        let value = ManifestValue {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes: format!("{{}}{}", "\n".repeat(pad)),
            blobs: vec![],
            children: vec![],
            subject: subject.cloned(),
            referrer: None,
        };
        let digest = Digest::of(Algorithm::Sha256, &i.to_le_bytes());
        Record::new(
            RecordKey::Manifest(digest),
            Version::new(1, "a:1"),
            Some(RecordValue::Manifest(Box::new(value))),
        )
    }

    /// Records the store already holds commit nothing (each full repair pass sends every
    /// owner its repositories' records again: one fsync each under the writer lock), and the
    /// database file is left as it was; anything new still commits.
    #[test]
    fn records_already_held_commit_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let meta = Meta::open(&path).unwrap();
        let records: Vec<Record> = (0..5).map(|i| manifest(i, None, 10)).collect();
        assert_eq!(meta.records_apply("r", &records).unwrap(), 5);
        let written = |p: &std::path::Path| std::fs::metadata(p).unwrap().modified().unwrap();
        let before = written(&path);
        std::thread::sleep(std::time::Duration::from_millis(20));
        for _ in 0..3 {
            assert_eq!(meta.records_apply("r", &records).unwrap(), 0);
            assert_eq!(meta.records_apply("r", &records[..2]).unwrap(), 0);
        }
        assert_eq!(written(&path), before, "applying held records wrote the database");
        // A repository not listed yet is listed, and a new record commits.
        assert_eq!(meta.records_apply("r", &[manifest(9, None, 10)]).unwrap(), 1);
        assert_ne!(written(&path), before);
        assert_eq!(meta.records_apply("r", &records).unwrap(), 0);
    }

    /// Reads pages of at most `max_bytes` until the last, as a remote caller does.
    fn all_pages(meta: &Meta, subject: Option<&Digest>, max_bytes: usize) -> Vec<Vec<Record>> {
        let mut page = ScanPage::of_bytes(max_bytes);
        let mut pages = Vec::new();
        loop {
            let answer = meta.records_page("r", RecordKind::Manifest, subject, &page).unwrap().unwrap();
            page.after = answer.records.last().map(|r| r.key.name());
            pages.push(answer.records);
            if !answer.more {
                return pages;
            }
        }
    }

    /// Pages hold at most their byte budget (or one record larger than it), follow key
    /// order, and together hold every record once; the same for a referrers scan.
    #[test]
    fn pages_hold_every_record_once_within_their_budget() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::open(&dir.path().join("meta.redb")).unwrap();
        let subject = Digest::of(Algorithm::Sha256, b"subject");
        let mut records: Vec<Record> =
            (0..40).map(|i| manifest(i, (i % 2 == 0).then_some(&subject), 1000)).collect();
        records.push(manifest(1000, None, 10_000));
        meta.records_apply("r", &records).unwrap();
        meta.records_apply("s", &[manifest(2000, None, 10)]).unwrap();
        let size = |r: &Record| serde_json::to_string(r).unwrap().len();
        let (one, referrer, big) = (size(&records[1]), size(&records[0]), size(&records[40]));
        assert!(big > 3 * one);

        let pages = all_pages(&meta, None, 3 * one);
        let mut seen: Vec<Record> = pages.iter().flatten().cloned().collect();
        assert!(seen.windows(2).all(|w| w[0].key.name() < w[1].key.name()), "key order across pages");
        records.sort_by_key(|r| r.key.name());
        seen.sort_by_key(|r| r.key.name());
        assert_eq!(seen, records);
        assert!(pages.len() >= 14, "{} pages", pages.len());
        for page in &pages {
            let bytes: usize = page.iter().map(size).sum();
            assert!(bytes <= 3 * one || page.len() == 1, "{} records, {bytes} bytes", page.len());
        }
        assert!(pages.iter().any(|p| p.len() == 1 && size(&p[0]) == big), "the large record alone");

        let referrers: Vec<Record> =
            all_pages(&meta, Some(&subject), 2 * referrer).into_iter().flatten().collect();
        assert_eq!(referrers.len(), 20);
        assert!(referrers.iter().all(|r| r.manifest().and_then(|m| m.subject.as_ref()) == Some(&subject)));
        assert_eq!(all_pages(&meta, Some(&subject), 2 * referrer).len(), 10);

        let whole = meta.records_page("r", RecordKind::Manifest, None, &ScanPage::ALL).unwrap().unwrap();
        assert_eq!((whole.records.len(), whole.more), (41, false));
        assert_eq!(meta.records_page("none", RecordKind::Manifest, None, &ScanPage::ALL).unwrap(), None);
    }

    /// A write that waited for the database's writer lock past its deadline (another write
    /// held it: a stalled disk) commits nothing: GC's last mark may have run meanwhile.
    #[test]
    fn a_write_past_its_deadline_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let meta = std::sync::Arc::new(Meta::open(&dir.path().join("meta.redb")).unwrap());
        let holding = meta.write().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = meta.clone();
        let late = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(100);
            tx.send(()).unwrap();
            writer.records_apply_by("r", &[manifest(1, None, 0)], Some(deadline))
        });
        rx.recv().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(holding);
        assert!(matches!(late.join().unwrap(), Err(StoreError::Unavailable(_))));
        let found = meta.records_page("r", RecordKind::Manifest, None, &ScanPage::of_bytes(1 << 20)).unwrap();
        assert!(found.is_none_or(|p| p.records.is_empty()), "the late write landed");
        // In time, it lands.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        assert_eq!(meta.records_apply_by("r", &[manifest(1, None, 0)], Some(deadline)).unwrap(), 1);
    }
}
