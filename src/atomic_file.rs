//! Files the binary writes for other programs to read (containerd's `hosts.toml` and its copy
//! of the mirror CA, certificates and keys), through [`shoal_registry::durable`]: a reader sees
//! the old file or the new one, never half of one, and a key is private from its first byte,
//! whatever an older file's mode was. This module only names the file in the error.

use std::path::Path;

use anyhow::Context;
use shoal_registry::durable;

/// Replace `path` with `contents` (a new file gets `mode`, or the default less the umask).
pub fn write(path: &Path, contents: &[u8], mode: Option<u32>) -> anyhow::Result<()> {
    durable::replace(path, contents, mode).with_context(|| format!("writing {}", path.display()))
}

/// Make a directory's entries (a rename, a removal) durable.
pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    durable::sync_dir(dir).with_context(|| format!("syncing directory {}", dir.display()))
}

/// Remove what a write of `path` that died before its rename left beside it.
pub fn remove_leftovers(path: &Path) -> anyhow::Result<()> {
    durable::remove_leftovers(path)
        .map(|_| ())
        .with_context(|| format!("removing temp files of {}", path.display()))
}
