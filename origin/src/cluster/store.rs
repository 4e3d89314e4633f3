//! [`ClusterStore`]: the registry API's storage over the whole cluster. Upload sessions live
//! on the origin that opened them; a finished blob is copied to the owners of its digest
//! before the client hears `201 Created`; a repository's links, manifests and tags are
//! records on the owners of its name. Whichever origin is asked gives the same answer.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use shoal_registry::manifest::ReferrerDescriptor;
use shoal_registry::range::ByteRange;
use shoal_registry::store::{NewManifest, Page, Reference, StoredManifest, UploadState};
use shoal_registry::{ByteStream, Digest, RegistryStore, RepoName, StoreError, Tag};

use crate::cluster::coordinator::{Coordinator, Replication};
use crate::cluster::local::LocalNode;
use crate::cluster::metrics::ClusterMetrics;
use crate::cluster::record::{ManifestValue, Record, RecordKey, RecordKind, RecordValue, VersionClock};
use crate::cluster::topology::SingleTopology;
use crate::store::OriginStore;

/// Tag records whose name starts with this are the store's own markers: no client can
/// write or list them (tags must start with a letter, digit or `_`).
const MARKER_PREFIX: &str = ".";
/// Marks a mirrored repository the upstream keeps private (see [`ClusterStore::mark_private`]).
const PRIVATE_MARKER: &str = ".shoal-private";
/// The most tag records a page of `tags/list` asks the owners for in one round.
const TAG_SCAN_MAX: usize = 10_000;

/// Whether a stored manifest's references must already be in the repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum References {
    /// A push: every blob and child manifest it names must be there.
    Required,
    /// Mirrored from an upstream: its blobs are fetched when first asked for.
    Fetched,
}

/// The registry storage of an origin that is part of a cluster (possibly of one).
#[derive(Clone)]
pub struct ClusterStore {
    pub coordinator: Arc<Coordinator>,
}

impl ClusterStore {
    pub fn new(coordinator: Arc<Coordinator>) -> ClusterStore {
        ClusterStore { coordinator }
    }

    /// Open an upload session for this origin's own fetch of an upstream blob: not counted
    /// against the clients' `max_upload_sessions` (fetches have their own cap).
    pub async fn fetch_start(&self, repo: &RepoName) -> Result<UploadState, StoreError> {
        self.local().upload_start_for(repo, self.c().me(), crate::store::Opener::Fetch).await
    }

    /// A lone origin: a cluster of one, with one copy of everything.
    pub fn single(store: OriginStore, id: &str) -> Result<ClusterStore, StoreError> {
        let local = LocalNode::new(id, store);
        let metrics = ClusterMetrics::unregistered().map_err(|e| StoreError::Internal(e.to_string()))?;
        Ok(ClusterStore::new(Arc::new(Coordinator {
            topology: Arc::new(SingleTopology::new(local.clone())),
            local,
            clock: VersionClock::new(id),
            replication: Replication { replicas: 1, write_quorum: 1 },
            metrics,
            gc_lock: Default::default(),
            skews: Default::default(),
            read_repairs: Default::default(),
            collections: Default::default(),
        })))
    }

    /// This origin's own storage.
    pub fn local(&self) -> &OriginStore {
        self.coordinator.local.store()
    }

    fn c(&self) -> &Coordinator {
        &self.coordinator
    }

    fn record(&self, key: RecordKey, value: Option<RecordValue>) -> Record {
        Record::new(key, self.c().clock.next(), value)
    }

    /// Read the records a write is about to replace, for their versions only: a read moves
    /// this origin's clock past what it sees, so the write's records are made later than
    /// them, and a re-push or a mount right after a `DELETE` through an origin whose clock is
    /// ahead wins over its tombstones instead of losing to them after its `201`. Done before
    /// a write's read-to-write deadline starts: a key no owner has is asked of every origin.
    async fn read_replaced(&self, repo: &str, keys: &[RecordKey]) -> Result<(), StoreError> {
        self.c().read_records(repo, keys).await.map(drop)
    }

    /// The live link of `digest` in `repo`.
    async fn link(&self, repo: &RepoName, digest: &Digest) -> Result<Option<Record>, StoreError> {
        let found = self.c().read_records(repo.as_str(), &[RecordKey::Link(digest.clone())]).await?;
        Ok(found.into_iter().next().flatten().filter(Record::is_live))
    }

    /// The live manifest record of `digest` in `repo`.
    async fn manifest_record(&self, repo: &RepoName, digest: &Digest) -> Result<Option<Record>, StoreError> {
        let found = self.c().read_records(repo.as_str(), &[RecordKey::Manifest(digest.clone())]).await?;
        Ok(found.into_iter().next().flatten().filter(Record::is_live))
    }

    /// Store a manifest (and point `tag` at it). With [`References::Required`] everything it
    /// references must be in `repo` (a push); a mirrored upstream manifest is stored before
    /// its blobs are fetched ([`References::Fetched`]).
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        tag: Option<&Tag>,
        manifest: NewManifest,
        references: References,
    ) -> Result<(), StoreError> {
        let NewManifest { digest, bytes, parsed } = manifest;
        let mut replaced = vec![RecordKey::Manifest(digest.clone()), RecordKey::Link(digest.clone())];
        replaced.extend(tag.map(|t| RecordKey::Tag(t.to_string())));
        self.read_replaced(repo.as_str(), &replaced).await?;
        let read_at = std::time::Instant::now();
        let text = String::from_utf8(bytes.to_vec())
            .map_err(|_| StoreError::Internal("a parsed manifest is not UTF-8".into()))?;
        let size = bytes.len() as u64;
        // What it references, checked to be in the repository when that is required.
        // Each once: an index may name one child (or a manifest one layer) any number of
        // times, and every key read loads its record (a child's whole manifest), on every
        // owner: a 4 MiB index naming one padded child 35,000 times took tens of GB.
        let mut keys: Vec<RecordKey> = parsed.blobs.iter().cloned().map(RecordKey::Link).collect();
        keys.extend(parsed.children.iter().cloned().map(RecordKey::Manifest));
        let mut seen = std::collections::HashSet::new();
        keys.retain(|k| seen.insert(k.clone()));
        let found = self.c().read_records(repo.as_str(), &keys).await?;
        let mut refreshed = Vec::new();
        for (key, rec) in keys.iter().zip(found) {
            let live = rec.as_ref().filter(|r| r.is_live());
            match (key, live) {
                (RecordKey::Link(d), None) | (RecordKey::Manifest(d), None)
                    if references == References::Required =>
                {
                    return Err(StoreError::ManifestBlobUnknown(d.clone()))
                }
                // Rewriting the link with a new version tells garbage collection the blob is
                // in use from now on, even if it runs before this manifest is visible to it.
                (RecordKey::Link(d), Some(r)) => refreshed.push(self.record(
                    RecordKey::Link(d.clone()),
                    Some(RecordValue::Link { size: r.link_size().unwrap_or(0) }),
                )),
                _ => {}
            }
        }
        let referrer = parsed.subject.as_ref().map(|_| parsed.referrer_descriptor(&digest, size));
        let value = ManifestValue {
            media_type: parsed.media_type.clone(),
            bytes: text,
            // Foreign layers too: if one was pushed after all, garbage collection keeps it.
            blobs: parsed.blobs.iter().chain(&parsed.foreign).cloned().collect(),
            children: parsed.children.clone(),
            subject: parsed.subject.clone(),
            referrer,
        };
        let mut records = refreshed;
        records.push(
            self.record(RecordKey::Manifest(digest.clone()), Some(RecordValue::Manifest(Box::new(value)))),
        );
        records.push(self.record(RecordKey::Link(digest.clone()), Some(RecordValue::Link { size })));
        if let Some(tag) = tag {
            records.push(self.record(RecordKey::Tag(tag.to_string()), Some(RecordValue::Tag { digest })));
        }
        self.write_after_read(read_at, repo.as_str(), records).await
    }

    /// Write records that rely on links read at `read_at` (a manifest put, a mount). They must
    /// *land* within garbage collection's deadline of the read: GC's last mark, a quarantine
    /// after it unlinked a blob, has to see every such write (see `cluster::gc`). So the write
    /// fails, and the client retries, if the deadline passes before it starts or while it runs
    /// (an owner slow to answer). A write cut off may have reached some owners: the client was
    /// not told it succeeded, and the repository is queued for repair. Unlike a write that
    /// missed its quorum, no copy is added here: a link written after the deadline is what GC's
    /// last mark might not see.
    async fn write_after_read(
        &self,
        read_at: std::time::Instant,
        repo: &str,
        records: Vec<Record>,
    ) -> Result<(), StoreError> {
        let late = || {
            StoreError::Unavailable("the blobs this write references were checked too long ago; retry".into())
        };
        let left =
            crate::cluster::gc::READ_TO_WRITE_DEADLINE.checked_sub(read_at.elapsed()).ok_or_else(late)?;
        // The deadline goes with the write: an origin that takes it late (its disk stalled)
        // commits nothing, rather than a link GC's last mark did not see.
        let deadline = std::time::Instant::now() + left;
        match tokio::time::timeout(left, self.c().write_records_by(repo, records, Some(deadline))).await {
            Ok(written) => written,
            Err(_) => {
                let _ = self.c().enqueue(format!("repo:{repo}")).await;
                Err(late())
            }
        }
    }

    /// Link a blob the cluster already holds (under any repository) into `repo`: its size, or
    /// `None` if none of its owners holds it. For mirrored content, whose blobs many
    /// repositories share (base layers): the bytes are not fetched again.
    pub async fn link_held(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, StoreError> {
        self.read_replaced(repo.as_str(), &[RecordKey::Link(digest.clone())]).await?;
        let read_at = std::time::Instant::now();
        for id in self.c().owners(&digest.to_string()) {
            let Some(node) = self.c().node(&id) else { continue };
            if let Ok(Some(size)) = node.blob_stat(digest).await {
                let link = self.record(RecordKey::Link(digest.clone()), Some(RecordValue::Link { size }));
                self.write_after_read(read_at, repo.as_str(), vec![link]).await?;
                return Ok(Some(size));
            }
        }
        Ok(None)
    }

    /// A tag's target and when it was last written (milliseconds since the epoch).
    pub async fn tag_written(&self, repo: &RepoName, tag: &Tag) -> Result<Option<(Digest, u64)>, StoreError> {
        let found = self.c().read_records(repo.as_str(), &[RecordKey::Tag(tag.to_string())]).await?;
        Ok(found
            .into_iter()
            .next()
            .flatten()
            .and_then(|r| r.tag_target().map(|d| (d.clone(), r.version.millis))))
    }

    /// Record, for the whole cluster and for good, that `repo` is private at its upstream:
    /// every read of it then needs credentials the upstream accepts. A tag record under a
    /// name clients cannot use, so it is replicated, repaired and never collected.
    pub async fn mark_private(&self, repo: &RepoName) -> Result<(), StoreError> {
        let digest = Digest::of(shoal_registry::Algorithm::Sha256, PRIVATE_MARKER.as_bytes());
        let record = self.record(RecordKey::Tag(PRIVATE_MARKER.into()), Some(RecordValue::Tag { digest }));
        self.c().write_records(repo.as_str(), vec![record]).await
    }

    /// Take back [`mark_private`](Self::mark_private): the upstream answers without a
    /// client's credentials again.
    pub async fn unmark_private(&self, repo: &RepoName) -> Result<(), StoreError> {
        let key = RecordKey::Tag(PRIVATE_MARKER.into());
        // Reading first moves the clock past the mark's version, so this write wins.
        self.c().read_records(repo.as_str(), std::slice::from_ref(&key)).await?;
        self.c().write_records(repo.as_str(), vec![self.record(key, None)]).await
    }

    /// Whether [`mark_private`](Self::mark_private) was recorded for `repo`.
    pub async fn marked_private(&self, repo: &RepoName) -> Result<bool, StoreError> {
        let found = self.c().read_records(repo.as_str(), &[RecordKey::Tag(PRIVATE_MARKER.into())]).await?;
        Ok(found.into_iter().next().flatten().is_some_and(|r| r.is_live()))
    }

    /// Point `tag` at `digest` with a new version (also when it already does: the version's
    /// time then records that the target was confirmed now).
    pub async fn write_tag(&self, repo: &RepoName, tag: &Tag, digest: &Digest) -> Result<(), StoreError> {
        let key = RecordKey::Tag(tag.to_string());
        // Reading first moves the clock past the current version, so this write wins.
        self.c().read_records(repo.as_str(), std::slice::from_ref(&key)).await?;
        let record = self.record(key, Some(RecordValue::Tag { digest: digest.clone() }));
        self.c().write_records(repo.as_str(), vec![record]).await
    }
}

/// Sort, skip to after `last`, and cut a page of `limit` names.
fn page(mut names: Vec<String>, last: Option<&str>, limit: usize) -> Page {
    names.sort();
    names.dedup();
    let items: Vec<String> = names.into_iter().filter(|n| last.is_none_or(|l| n.as_str() > l)).collect();
    Page::cut(items, limit)
}

#[async_trait]
impl RegistryStore for ClusterStore {
    async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, StoreError> {
        Ok(self.link(repo, digest).await?.and_then(|r| r.link_size()))
    }

    async fn blob_read(
        &self,
        repo: &RepoName,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<ByteStream, StoreError> {
        if self.link(repo, digest).await?.is_none() {
            return Err(StoreError::BlobUnknown);
        }
        if let Some(stream) = self.c().open_blob(digest, range).await? {
            return Ok(stream);
        }
        // A manifest is content too, readable through the blobs endpoint; its bytes live in
        // the repository's records.
        if let Some(m) = self.manifest_record(repo, digest).await?.as_ref().and_then(Record::manifest) {
            let bytes = bytes::Bytes::from(m.bytes.clone().into_bytes());
            let bytes = match range {
                Some(r) => {
                    bytes.slice((r.start as usize).min(bytes.len())..(r.end as usize + 1).min(bytes.len()))
                }
                None => bytes,
            };
            return Ok(Box::pin(futures_util::stream::once(async move { Ok(bytes) })));
        }
        Err(StoreError::Unavailable(format!("no live origin holds a copy of {digest}")))
    }

    async fn blob_delete(&self, repo: &RepoName, digest: &Digest) -> Result<bool, StoreError> {
        if self.link(repo, digest).await?.is_none() {
            return Ok(false);
        }
        let tombstone = self.record(RecordKey::Link(digest.clone()), None);
        self.c().write_records(repo.as_str(), vec![tombstone]).await?;
        Ok(true)
    }

    async fn blob_mount(
        &self,
        repo: &RepoName,
        from: &RepoName,
        digest: &Digest,
    ) -> Result<bool, StoreError> {
        self.read_replaced(repo.as_str(), &[RecordKey::Link(digest.clone())]).await?;
        let read_at = std::time::Instant::now();
        let keys = [RecordKey::Link(digest.clone()), RecordKey::Manifest(digest.clone())];
        let mut found =
            self.c().read_records(from.as_str(), &keys).await?.into_iter().map(|r| r.filter(Record::is_live));
        let (link, manifest) = (found.next().flatten(), found.next().flatten());
        // A manifest's own link (its bytes readable as a blob of its repository) is served
        // from the manifest record there, not from a blob copy: linked into another
        // repository it would answer `HEAD` and fail every `GET`. The client uploads instead.
        if manifest.is_some() {
            return Ok(false);
        }
        let Some(size) = link.and_then(|r| r.link_size()) else {
            return Ok(false);
        };
        let link = self.record(RecordKey::Link(digest.clone()), Some(RecordValue::Link { size }));
        self.write_after_read(read_at, repo.as_str(), vec![link]).await?;
        Ok(true)
    }

    async fn upload_start(&self, repo: &RepoName) -> Result<UploadState, StoreError> {
        self.c().local.store().upload_start(repo, self.c().me()).await
    }

    async fn upload_status(&self, repo: &RepoName, id: &str) -> Result<UploadState, StoreError> {
        self.c().local.store().upload_status(repo, id).await
    }

    async fn upload_append(
        &self,
        repo: &RepoName,
        id: &str,
        start: Option<u64>,
        len: Option<u64>,
        body: ByteStream,
    ) -> Result<UploadState, StoreError> {
        self.c().local.store().upload_append(repo, id, start, len, body).await
    }

    /// Runs to its end in a task of its own, even if the request is dropped (its client gone,
    /// or a forwarding origin giving up): the blob is then committed, copied and linked, so a
    /// client that asks again (a `HEAD`) finds it. A session already published as `digest`
    /// (a retried final `PUT`: its answer was lost, or the copying or linking failed) is
    /// copied and linked again if its link was not written; if it was, the retry is answered
    /// from the link as it stands: a blob deleted since is not linked again.
    async fn upload_commit(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        body_from: Option<u64>,
    ) -> Result<u64, StoreError> {
        let (store, repo, id, digest) = (self.clone(), repo.clone(), id.to_string(), digest.clone());
        crate::store::to_the_end("upload", async move {
            let local = store.c().local.store();
            let size = match local.upload_finish(&repo, &id, &digest, body_from).await {
                Err(StoreError::UploadUnknown) => {
                    let (size, linked) =
                        local.upload_finished(&repo, &id, &digest).ok_or(StoreError::UploadUnknown)?;
                    if linked {
                        return match store.link(&repo, &digest).await? {
                            Some(_) => Ok(size),
                            None => Err(StoreError::UploadUnknown),
                        };
                    }
                    size
                }
                other => other?,
            };
            store.read_replaced(repo.as_str(), &[RecordKey::Link(digest.clone())]).await?;
            // The copies were last seen at `read_at` (an old copy counts as placed): the link
            // lands within GC's read-to-write deadline of that, as a mount's does, or fails.
            let read_at = store.c().replicate_blob(&digest, size).await?;
            let link = store.record(RecordKey::Link(digest.clone()), Some(RecordValue::Link { size }));
            store.write_after_read(read_at, repo.as_str(), vec![link]).await?;
            local.upload_linked(&id);
            Ok(size)
        })
        .await
    }

    async fn upload_cancel(&self, repo: &RepoName, id: &str) -> Result<(), StoreError> {
        self.c().local.store().upload_cancel(repo, id).await
    }

    async fn manifest_get(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<StoredManifest>, StoreError> {
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => {
                let found = self.c().read_records(repo.as_str(), &[RecordKey::Tag(t.to_string())]).await?;
                match found.into_iter().next().flatten().as_ref().and_then(Record::tag_target) {
                    Some(d) => d.clone(),
                    None => return Ok(None),
                }
            }
        };
        let Some(record) = self.manifest_record(repo, &digest).await? else { return Ok(None) };
        let Some(m) = record.manifest() else { return Ok(None) };
        Ok(Some(StoredManifest {
            digest,
            media_type: m.media_type.clone(),
            bytes: bytes::Bytes::from(m.bytes.clone().into_bytes()),
            serve_stale_until: None,
        }))
    }

    async fn manifest_put(
        &self,
        repo: &RepoName,
        tag: Option<&Tag>,
        manifest: NewManifest,
    ) -> Result<(), StoreError> {
        self.put_manifest(repo, tag, manifest, References::Required).await
    }

    async fn manifest_delete(&self, repo: &RepoName, reference: &Reference) -> Result<bool, StoreError> {
        match reference {
            Reference::Tag(t) => {
                let key = RecordKey::Tag(t.to_string());
                let found = self.c().read_records(repo.as_str(), std::slice::from_ref(&key)).await?;
                if !found.into_iter().next().flatten().is_some_and(|r| r.is_live()) {
                    return Ok(false);
                }
                self.c().write_records(repo.as_str(), vec![self.record(key, None)]).await?;
                Ok(true)
            }
            Reference::Digest(d) => {
                // The link is read with the manifest: its tombstone must follow it too (a
                // mount of the manifest's bytes through an origin whose clock is ahead).
                let keys = [RecordKey::Manifest(d.clone()), RecordKey::Link(d.clone())];
                let found = self.c().read_records(repo.as_str(), &keys).await?;
                if !found.first().and_then(Option::as_ref).is_some_and(Record::is_live) {
                    return Ok(false);
                }
                let tags =
                    self.c().scan_records(repo.as_str(), RecordKind::Tag, None).await?.unwrap_or_default();
                let mut records: Vec<Record> = tags
                    .into_iter()
                    .filter(|r| r.tag_target() == Some(d))
                    .map(|r| self.record(r.key, None))
                    .collect();
                records.push(self.record(RecordKey::Manifest(d.clone()), None));
                records.push(self.record(RecordKey::Link(d.clone()), None));
                self.c().write_records(repo.as_str(), records).await?;
                Ok(true)
            }
        }
    }

    /// Read from the owners a page at a time from `last` on, until one more live tag than
    /// the page shows is known (then more follow) or the tags end: a page costs about what
    /// it shows, not every tag of the repository. From the third round on, each asks for at
    /// least twice what the last did: deleted tags stay as tombstones, and asking for only
    /// the live tags still missing read a run of 5,000 of them one round trip each.
    async fn tags(&self, repo: &RepoName, last: Option<&str>, limit: usize) -> Result<Page, StoreError> {
        let mut names = Vec::new();
        let mut after = last.map(str::to_string);
        let (mut asked, mut round) = (0usize, 0);
        loop {
            let missing = limit.saturating_add(1).saturating_sub(names.len()).max(1);
            // The first two rounds ask for what is missing: a few deleted tags cost little.
            let grown = if round < 2 { 0 } else { asked.saturating_mul(2) };
            let want = missing.max(grown).min(TAG_SCAN_MAX);
            (asked, round) = (want, round + 1);
            let scanned = self.c().scan_page(repo.as_str(), RecordKind::Tag, after.as_deref(), want).await?;
            let Some((records, next)) = scanned else {
                if after.as_deref() == last {
                    return Err(StoreError::NameUnknown);
                }
                break; // forgotten between two reads: nothing left to list
            };
            names.extend(
                records
                    .into_iter()
                    .filter(Record::is_live)
                    .map(|r| r.key.name())
                    .filter(|name| !name.starts_with(MARKER_PREFIX)),
            );
            match next {
                Some(next) if names.len() <= limit => after = Some(next),
                _ => break,
            }
        }
        Ok(page(names, last, limit))
    }

    async fn repositories(&self, last: Option<&str>, limit: usize) -> Result<Page, StoreError> {
        // `limit`, not one more: the origins cap their answers at the largest page, so one
        // more was not given, and capped answers of the same names merged to exactly `limit`,
        // with no sign that more followed. More than `limit` together, or an origin that gave
        // a full page, is that sign (the last page may then come out empty).
        let (names, more) = self.c().repos(last, limit).await?;
        let mut page = page(names, last, limit);
        if more && page.next.is_none() {
            page.next = page.items.last().cloned();
        }
        Ok(page)
    }

    async fn referrers(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Vec<ReferrerDescriptor>, StoreError> {
        let records = self
            .c()
            .scan_records(repo.as_str(), RecordKind::Manifest, Some(digest))
            .await?
            .unwrap_or_default();
        // The subject index lists live manifests only, so an owner that has a referrer's
        // tombstone says nothing of it while one that missed the delete still lists it: the
        // candidates are read again by key, which weighs the tombstone (and repairs the stale
        // owner), so a deleted referrer is not listed.
        let mut seen = HashSet::new();
        let keys: Vec<RecordKey> = records
            .iter()
            .filter(|r| r.manifest().is_some_and(|m| m.subject.as_ref() == Some(digest)))
            .map(|r| r.key.clone())
            .filter(|k| seen.insert(k.clone()))
            .collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let current = self.c().read_records(repo.as_str(), &keys).await?;
        Ok(current
            .iter()
            .flatten()
            .filter_map(|r| r.manifest())
            .filter(|m| m.subject.as_ref() == Some(digest))
            .filter_map(|m| m.referrer.clone())
            .collect())
    }
}
