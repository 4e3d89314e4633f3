//! Metadata in redb: which blobs exist, which repository links which blob, manifests, tags,
//! referrers, repositories and open upload sessions. Every change is one redb transaction, so
//! a crash leaves each record either fully written or absent. All calls block: run them on
//! the blocking pool.

use std::path::Path;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use shoal_registry::manifest::ReferrerDescriptor;
use shoal_registry::store::Page;
use shoal_registry::{Digest, StoreError};

/// digest → size of every blob file present.
const BLOBS: TableDefinition<&str, u64> = TableDefinition::new("blobs");
/// (repo, digest) → size: blobs readable through a repository.
const BLOB_LINKS: TableDefinition<(&str, &str), u64> = TableDefinition::new("blob_links");
/// (repo, digest) → JSON [`ManifestRecord`].
const MANIFESTS: TableDefinition<(&str, &str), &str> = TableDefinition::new("manifests");
/// (repo, tag) → digest.
const TAGS: TableDefinition<(&str, &str), &str> = TableDefinition::new("tags");
/// (repo, subject, referrer digest) → JSON [`ReferrerDescriptor`].
const REFERRERS: TableDefinition<(&str, &str, &str), &str> = TableDefinition::new("referrers");
/// repository name → unused.
const REPOS: TableDefinition<&str, u8> = TableDefinition::new("repos");
/// upload id → JSON [`UploadRecord`].
const UPLOADS: TableDefinition<&str, &str> = TableDefinition::new("uploads");
/// digest → metainfo JSON (piece length and piece hashes), computed once per blob.
const METAINFO: TableDefinition<&str, &[u8]> = TableDefinition::new("metainfo");

/// What is kept about a manifest besides its bytes (which live in the blob store).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub media_type: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Digest>,
}

/// A persisted upload session; its byte count is the length of its data file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UploadRecord {
    pub repo: String,
    /// Unix seconds of the session's start.
    pub created: u64,
}

/// A manifest to record, with what the checks and the referrers index need.
pub struct ManifestInsert<'a> {
    pub repo: &'a str,
    pub digest: &'a Digest,
    pub record: ManifestRecord,
    pub blobs: &'a [Digest],
    pub children: &'a [Digest],
    pub tag: Option<&'a str>,
    pub referrer: Option<ReferrerDescriptor>,
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Internal(format!("metadata database: {}", e.into()))
}

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Internal(format!("metadata record: {e}"))
}

/// The origin's metadata database.
pub struct Meta {
    db: Database,
}

impl Meta {
    /// Open (or create) the database and make sure every table exists.
    pub fn open(path: &Path) -> Result<Meta, StoreError> {
        let db = Database::create(path).map_err(db_err)?;
        let txn = db.begin_write().map_err(db_err)?;
        {
            txn.open_table(BLOBS).map_err(db_err)?;
            txn.open_table(BLOB_LINKS).map_err(db_err)?;
            txn.open_table(MANIFESTS).map_err(db_err)?;
            txn.open_table(TAGS).map_err(db_err)?;
            txn.open_table(REFERRERS).map_err(db_err)?;
            txn.open_table(REPOS).map_err(db_err)?;
            txn.open_table(UPLOADS).map_err(db_err)?;
            txn.open_table(METAINFO).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(Meta { db })
    }

    /// Sum of the sizes of all blob files, for the storage metric.
    pub fn total_blob_bytes(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(BLOBS).map_err(db_err)?;
        let mut total = 0u64;
        for entry in table.iter().map_err(db_err)? {
            total += entry.map_err(db_err)?.1.value();
        }
        Ok(total)
    }

    /// Size of a blob file present on this origin, whichever repository links it.
    pub fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(BLOBS).map_err(db_err)?;
        let d = digest.to_string();
        Ok(table.get(d.as_str()).map_err(db_err)?.map(|v| v.value()))
    }

    pub fn metainfo(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(METAINFO).map_err(db_err)?;
        let d = digest.to_string();
        Ok(table.get(d.as_str()).map_err(db_err)?.map(|v| v.value().to_vec()))
    }

    pub fn put_metainfo(&self, digest: &Digest, json: &[u8]) -> Result<(), StoreError> {
        let d = digest.to_string();
        let txn = self.db.begin_write().map_err(db_err)?;
        txn.open_table(METAINFO).map_err(db_err)?.insert(d.as_str(), json).map_err(db_err)?;
        txn.commit().map_err(db_err)
    }

    pub fn blob_count(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        txn.open_table(BLOBS).map_err(db_err)?.len().map_err(db_err)
    }

    /// Size of a blob linked into `repo`.
    pub fn linked_size(&self, repo: &str, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(BLOB_LINKS).map_err(db_err)?;
        let d = digest.to_string();
        Ok(table.get((repo, d.as_str())).map_err(db_err)?.map(|v| v.value()))
    }

    /// Record a committed blob file and link it into `repo`; returns whether the file is new.
    pub fn commit_blob(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        upload: Option<&str>,
    ) -> Result<bool, StoreError> {
        let d = digest.to_string();
        let txn = self.db.begin_write().map_err(db_err)?;
        let new = {
            let mut blobs = txn.open_table(BLOBS).map_err(db_err)?;
            let new = blobs.insert(d.as_str(), size).map_err(db_err)?.is_none();
            txn.open_table(BLOB_LINKS).map_err(db_err)?.insert((repo, d.as_str()), size).map_err(db_err)?;
            txn.open_table(REPOS).map_err(db_err)?.insert(repo, 0).map_err(db_err)?;
            if let Some(id) = upload {
                txn.open_table(UPLOADS).map_err(db_err)?.remove(id).map_err(db_err)?;
            }
            new
        };
        txn.commit().map_err(db_err)?;
        Ok(new)
    }

    /// Link a blob that `from` has into `repo`.
    pub fn mount(&self, repo: &str, from: &str, digest: &Digest) -> Result<bool, StoreError> {
        let d = digest.to_string();
        let txn = self.db.begin_write().map_err(db_err)?;
        let mounted = {
            let mut links = txn.open_table(BLOB_LINKS).map_err(db_err)?;
            let size = links.get((from, d.as_str())).map_err(db_err)?.map(|v| v.value());
            match size {
                Some(size) => {
                    links.insert((repo, d.as_str()), size).map_err(db_err)?;
                    txn.open_table(REPOS).map_err(db_err)?.insert(repo, 0).map_err(db_err)?;
                    true
                }
                None => false,
            }
        };
        txn.commit().map_err(db_err)?;
        Ok(mounted)
    }

    pub fn unlink_blob(&self, repo: &str, digest: &Digest) -> Result<bool, StoreError> {
        let d = digest.to_string();
        let txn = self.db.begin_write().map_err(db_err)?;
        let removed =
            txn.open_table(BLOB_LINKS).map_err(db_err)?.remove((repo, d.as_str())).map_err(db_err)?.is_some();
        txn.commit().map_err(db_err)?;
        Ok(removed)
    }

    /// Record a manifest after checking, in the same transaction, that everything it references
    /// is in the repository.
    pub fn put_manifest(&self, m: ManifestInsert<'_>) -> Result<(), StoreError> {
        let d = m.digest.to_string();
        let record = serde_json::to_string(&m.record).map_err(json_err)?;
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut links = txn.open_table(BLOB_LINKS).map_err(db_err)?;
            let mut manifests = txn.open_table(MANIFESTS).map_err(db_err)?;
            for blob in m.blobs {
                if links.get((m.repo, blob.to_string().as_str())).map_err(db_err)?.is_none() {
                    return Err(StoreError::ManifestBlobUnknown(blob.clone()));
                }
            }
            for child in m.children {
                if manifests.get((m.repo, child.to_string().as_str())).map_err(db_err)?.is_none() {
                    return Err(StoreError::ManifestBlobUnknown(child.clone()));
                }
            }
            manifests.insert((m.repo, d.as_str()), record.as_str()).map_err(db_err)?;
            // The manifest is content too: readable through the blobs endpoint like any blob.
            links.insert((m.repo, d.as_str()), m.record.size).map_err(db_err)?;
            txn.open_table(BLOBS).map_err(db_err)?.insert(d.as_str(), m.record.size).map_err(db_err)?;
            txn.open_table(REPOS).map_err(db_err)?.insert(m.repo, 0).map_err(db_err)?;
            if let Some(tag) = m.tag {
                txn.open_table(TAGS).map_err(db_err)?.insert((m.repo, tag), d.as_str()).map_err(db_err)?;
            }
            if let (Some(subject), Some(desc)) = (&m.record.subject, &m.referrer) {
                let json = serde_json::to_string(desc).map_err(json_err)?;
                let s = subject.to_string();
                txn.open_table(REFERRERS)
                    .map_err(db_err)?
                    .insert((m.repo, s.as_str(), d.as_str()), json.as_str())
                    .map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)
    }

    /// Resolve a tag to a digest.
    pub fn tag(&self, repo: &str, tag: &str) -> Result<Option<Digest>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(TAGS).map_err(db_err)?;
        let value = table.get((repo, tag)).map_err(db_err)?;
        value
            .map(|v| v.value().parse().map_err(|e| StoreError::Internal(format!("stored digest: {e}"))))
            .transpose()
    }

    pub fn manifest(&self, repo: &str, digest: &Digest) -> Result<Option<ManifestRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(MANIFESTS).map_err(db_err)?;
        let d = digest.to_string();
        let value = table.get((repo, d.as_str())).map_err(db_err)?;
        value.map(|v| serde_json::from_str(v.value()).map_err(json_err)).transpose()
    }

    /// Delete a manifest with its tags and referrer entry; `false` if it was not there.
    pub fn delete_manifest(&self, repo: &str, digest: &Digest) -> Result<bool, StoreError> {
        let d = digest.to_string();
        let txn = self.db.begin_write().map_err(db_err)?;
        let existed = {
            let mut manifests = txn.open_table(MANIFESTS).map_err(db_err)?;
            let record: Option<ManifestRecord> = manifests
                .remove((repo, d.as_str()))
                .map_err(db_err)?
                .map(|v| serde_json::from_str(v.value()).map_err(json_err))
                .transpose()?;
            if let Some(record) = &record {
                let mut tags = txn.open_table(TAGS).map_err(db_err)?;
                let mut doomed = Vec::new();
                for entry in tags.range((repo, "")..).map_err(db_err)? {
                    let (k, v) = entry.map_err(db_err)?;
                    let (r, tag) = k.value();
                    if r != repo {
                        break;
                    }
                    if v.value() == d {
                        doomed.push(tag.to_string());
                    }
                }
                for tag in doomed {
                    tags.remove((repo, tag.as_str())).map_err(db_err)?;
                }
                if let Some(subject) = &record.subject {
                    let s = subject.to_string();
                    txn.open_table(REFERRERS)
                        .map_err(db_err)?
                        .remove((repo, s.as_str(), d.as_str()))
                        .map_err(db_err)?;
                }
                txn.open_table(BLOB_LINKS).map_err(db_err)?.remove((repo, d.as_str())).map_err(db_err)?;
            }
            record.is_some()
        };
        txn.commit().map_err(db_err)?;
        Ok(existed)
    }

    pub fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let removed = txn.open_table(TAGS).map_err(db_err)?.remove((repo, tag)).map_err(db_err)?.is_some();
        txn.commit().map_err(db_err)?;
        Ok(removed)
    }

    /// Tags of `repo` in order, after `last`; `NameUnknown` if the repository does not exist.
    pub fn tags(&self, repo: &str, last: Option<&str>, limit: usize) -> Result<Page, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        if txn.open_table(REPOS).map_err(db_err)?.get(repo).map_err(db_err)?.is_none() {
            return Err(StoreError::NameUnknown);
        }
        let table = txn.open_table(TAGS).map_err(db_err)?;
        let mut items = Vec::new();
        let mut more = false;
        for entry in table.range((repo, last.unwrap_or(""))..).map_err(db_err)? {
            let (k, _) = entry.map_err(db_err)?;
            let (r, tag) = k.value();
            if r != repo {
                break;
            }
            if last == Some(tag) {
                continue;
            }
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(tag.to_string());
        }
        Ok(Page { items, more })
    }

    pub fn repositories(&self, last: Option<&str>, limit: usize) -> Result<Page, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(REPOS).map_err(db_err)?;
        let mut items = Vec::new();
        let mut more = false;
        for entry in table.range(last.unwrap_or("")..).map_err(db_err)? {
            let (k, _) = entry.map_err(db_err)?;
            let name = k.value();
            if last == Some(name) {
                continue;
            }
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(name.to_string());
        }
        Ok(Page { items, more })
    }

    pub fn referrers(&self, repo: &str, subject: &Digest) -> Result<Vec<ReferrerDescriptor>, StoreError> {
        let s = subject.to_string();
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(REFERRERS).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.range((repo, s.as_str(), "")..).map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let (r, subj, _) = k.value();
            if r != repo || subj != s {
                break;
            }
            out.push(serde_json::from_str(v.value()).map_err(json_err)?);
        }
        Ok(out)
    }

    pub fn add_upload(&self, id: &str, record: &UploadRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(record).map_err(json_err)?;
        let txn = self.db.begin_write().map_err(db_err)?;
        txn.open_table(UPLOADS).map_err(db_err)?.insert(id, json.as_str()).map_err(db_err)?;
        txn.commit().map_err(db_err)
    }

    pub fn remove_upload(&self, id: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        txn.open_table(UPLOADS).map_err(db_err)?.remove(id).map_err(db_err)?;
        txn.commit().map_err(db_err)
    }

    pub fn uploads(&self) -> Result<Vec<(String, UploadRecord)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(UPLOADS).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            out.push((k.value().to_string(), serde_json::from_str(v.value()).map_err(json_err)?));
        }
        Ok(out)
    }
}
