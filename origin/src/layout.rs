//! Where things live under the data directory. Temp files share the filesystem with their
//! final place so a rename publishes them atomically.

use std::path::{Path, PathBuf};

use shoal_registry::Digest;

/// Paths of an origin's data directory.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The redb metadata database.
    pub fn db(&self) -> PathBuf {
        self.root.join("meta.redb")
    }

    /// `blobs/<alg>/<first two hex>/<hex>`: the committed, immutable content.
    pub fn blob(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join("blobs").join(digest.algorithm().name()).join(&hex[..2]).join(hex)
    }

    /// `quarantine/<alg>-<hex>`: blob files garbage collection has set aside (see `cluster::gc`).
    pub fn quarantine(&self) -> PathBuf {
        self.root.join("quarantine")
    }

    pub fn quarantined(&self, digest: &Digest) -> PathBuf {
        self.quarantine().join(format!("{}-{}", digest.algorithm().name(), digest.hex()))
    }

    /// Data of upload sessions, one file per session, kept across restarts.
    pub fn uploads(&self) -> PathBuf {
        self.root.join("uploads")
    }

    pub fn upload(&self, id: &str) -> PathBuf {
        self.uploads().join(id)
    }

    /// Scratch space for content written in one go (manifests); emptied at startup.
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }
}
