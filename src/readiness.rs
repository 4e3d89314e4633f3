//! What `/readyz` answers. Kubernetes sends traffic to a pod only while it is ready, and
//! sends SIGTERM on every rollout, so a server must stop looking ready before it stops
//! serving: draining starts when the process is asked to stop, then the listener closes after
//! `drain_delay` and in-flight requests get `shutdown_timeout` to finish. Checks such as "the
//! data disk is nearly full" make a server not ready while they fail; they read state kept
//! current elsewhere (a check runs on the async runtime, so it does no I/O). (A server is not
//! reachable at all before it is bound, which is after recovery and the first membership
//! view, so "starting" needs no state of its own.)

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A readiness check: `Some(reason)` while it fails.
pub type Check = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// Share of a filesystem in use above which an origin is not ready and takes no new copies.
pub const DISK_NEARLY_FULL_SHARE: f64 = 0.95;

/// Whether a server should get traffic.
#[derive(Default)]
pub struct Readiness {
    draining: AtomicBool,
    checks: Vec<Check>,
}

impl Readiness {
    pub fn new(checks: Vec<Check>) -> Arc<Readiness> {
        Arc::new(Readiness { draining: AtomicBool::new(false), checks })
    }

    /// Stop looking ready (the process is stopping).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// `Ok` when ready, else why not.
    pub fn status(&self) -> Result<(), String> {
        if self.draining.load(Ordering::SeqCst) {
            return Err("draining: shutting down".into());
        }
        match self.checks.iter().find_map(|check| check()) {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }
}

/// The share of the filesystem holding `path` that is in use (by everyone, as `df` shows).
pub fn used_share(path: &std::path::Path) -> std::io::Result<f64> {
    let st = rustix::fs::statvfs(path)?;
    let total = st.f_blocks as f64;
    if total <= 0.0 {
        return Ok(0.0);
    }
    Ok(1.0 - st.f_bavail as f64 / total)
}

/// Why the filesystem of `dir` counts as nearly full (more than `max_share` in use, or its
/// usage unreadable); `None` while it is not. Blocking (statvfs): call it off the runtime.
pub fn disk_nearly_full(dir: &Path, max_share: f64) -> Option<String> {
    match used_share(dir) {
        Ok(used) if used > max_share => Some(format!(
            "data disk nearly full: {:.1}% of the filesystem of {} used (limit {:.0}%)",
            used * 100.0,
            dir.display(),
            max_share * 100.0
        )),
        Ok(_) => None,
        Err(e) => Some(format!("cannot read the usage of {}: {e}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draining_and_failing_checks_make_it_not_ready() {
        let r = Readiness::new(vec![]);
        assert!(r.status().is_ok());
        r.drain();
        assert!(r.status().unwrap_err().contains("draining"));
        let failing = Readiness::new(vec![Box::new(|| Some("disk".to_string())), Box::new(|| None)]);
        assert_eq!(failing.status(), Err("disk".to_string()));
    }

    #[test]
    fn the_disk_check_reads_the_real_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let used = used_share(dir.path()).unwrap();
        assert!((0.0..=1.0).contains(&used));
        assert!(disk_nearly_full(dir.path(), 1.0).is_none(), "never more than 100% full");
        assert!(disk_nearly_full(dir.path(), -0.1).unwrap().contains("nearly full"));
        assert!(disk_nearly_full(&dir.path().join("missing"), 0.9).unwrap().contains("cannot read"));
    }
}
