//! Startup recovery. Every write is ordered (file fsynced, renamed, then the metadata
//! transaction), so recovery only has to drop leftovers: scratch files, upload data without a
//! session record, session records whose data vanished, and blob files (in `blobs/` or
//! `quarantine/`) that no record names: a crash between a file's rename and its commit (never
//! acknowledged), or between a record's removal and the unlink (removed on purpose). Left,
//! they took disk space nothing counted or could reclaim.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use shoal_registry::{Digest, RepoName, StoreError};

use crate::layout::Layout;
use crate::meta::Meta;
use crate::uploads::{Session, Sessions};

fn io(e: std::io::Error) -> StoreError {
    StoreError::from_io(e)
}

/// Prepare the data directory and return the metadata and the surviving upload sessions.
pub fn recover(layout: &Layout) -> Result<(Meta, Sessions), StoreError> {
    for dir in [layout.root().to_path_buf(), layout.uploads(), layout.tmp(), layout.quarantine()] {
        fs::create_dir_all(&dir).map_err(io)?;
    }
    let mut scratch = 0;
    for entry in fs::read_dir(layout.tmp()).map_err(io)? {
        fs::remove_file(entry.map_err(io)?.path()).map_err(io)?;
        scratch += 1;
    }
    let meta = Meta::open(&layout.db())?;
    let sessions = Sessions::default();
    let mut live = HashSet::new();
    for (id, record) in meta.uploads()? {
        let path = layout.upload(&id);
        let (Ok(repo), Ok(md)) = (record.repo.parse::<RepoName>(), fs::metadata(&path)) else {
            meta.remove_upload(&id)?;
            continue;
        };
        // The running hash is lost with the process; it is recomputed from the file at commit.
        sessions.insert(
            id.clone(),
            Session { repo, path, offset: md.len(), hasher: None, touched: Instant::now(), ended: false },
        );
        live.insert(id);
    }
    let mut orphans = 0;
    for entry in fs::read_dir(layout.uploads()).map_err(io)? {
        let entry = entry.map_err(io)?;
        if !live.contains(entry.file_name().to_string_lossy().as_ref()) {
            fs::remove_file(entry.path()).map_err(io)?;
            orphans += 1;
        }
    }
    let mut strays = 0;
    for (digest, path) in blob_files(layout)? {
        if meta.blob_size(&digest)?.is_none() && meta.quarantined(&digest)?.is_none() {
            tracing::warn!(%digest, path = %path.display(), "removing a blob file no record names");
            fs::remove_file(&path).map_err(io)?;
            strays += 1;
        }
    }
    tracing::info!(
        sessions = live.len(),
        removed_scratch = scratch,
        removed_orphan_uploads = orphans,
        removed_stray_blob_files = strays,
        blobs = meta.blob_count()?,
        "storage recovered"
    );
    Ok((meta, sessions))
}

/// Every blob file under `blobs/<alg>/<aa>/<hex>` and `quarantine/<alg>-<hex>`, with the digest
/// its name gives (files whose names give none are left alone).
fn blob_files(layout: &Layout) -> Result<Vec<(Digest, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    let blobs = layout.root().join("blobs");
    for alg in dir_entries(&blobs)? {
        let Some(alg_name) = alg.file_name().and_then(|n| n.to_str()).map(str::to_string) else { continue };
        for prefix in dir_entries(&alg)? {
            for file in dir_entries(&prefix)? {
                let Some(hex) = file.file_name().and_then(|n| n.to_str()) else { continue };
                if let Ok(digest) = format!("{alg_name}:{hex}").parse::<Digest>() {
                    out.push((digest, file));
                }
            }
        }
    }
    for file in dir_entries(&layout.quarantine())? {
        let Some(name) = file.file_name().and_then(|n| n.to_str()) else { continue };
        let Some((alg, hex)) = name.split_once('-') else { continue };
        if let Ok(digest) = format!("{alg}:{hex}").parse::<Digest>() {
            out.push((digest, file));
        }
    }
    Ok(out)
}

/// The entries of `dir` (none if it does not exist).
fn dir_entries(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    match fs::read_dir(dir) {
        Ok(read) => read.map(|e| e.map(|e| e.path()).map_err(io)).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io(e)),
    }
}
