//! Startup recovery. Every write is ordered (file fsynced, renamed, then the metadata
//! transaction), so recovery only has to drop leftovers: scratch files, upload data without a
//! session record, and session records whose data vanished.

use std::collections::HashSet;
use std::fs;
use std::time::Instant;

use shoal_registry::{RepoName, StoreError};

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
            Session { repo, path, offset: md.len(), hasher: None, touched: Instant::now() },
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
    tracing::info!(
        sessions = live.len(),
        removed_scratch = scratch,
        removed_orphan_uploads = orphans,
        blobs = meta.blob_count()?,
        "storage recovered"
    );
    Ok((meta, sessions))
}
