//! The open-file limit, raised to its hard limit at start. systemd, Docker 25+ and
//! containerd 2 start processes with a soft limit of 1,024 descriptors while the hard limit
//! is far higher; below the listeners' connection caps (4,096 each, 1,024 per address), one
//! host's connections used every descriptor, accepts failed with EMFILE, and blob files and
//! the database could not be opened (500s), the very exhaustion the caps are there to stop.

use rustix::process::{getrlimit, setrlimit, Resource};

/// Descriptors below which a warning names the limit: one listener's connection cap, the
/// peer connections and the open blob files, with a margin.
pub const WANTED_OPEN_FILES: u64 = 8_192;

/// Raise the soft limit on open files to the hard one (an operator who wants less sets the
/// hard limit), and warn when even that is below [`WANTED_OPEN_FILES`]. Call it first thing in
/// `main`, before logging is set up: the outcome is returned for logging.
pub fn raise() -> Result<u64, String> {
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        setrlimit(Resource::Nofile, limit)
            .map_err(|e| format!("raising the open-file limit to {:?}: {e}", limit.maximum))?;
    }
    // `None` is unlimited.
    Ok(getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX))
}

/// Log what [`raise`] did.
pub fn report(outcome: Result<u64, String>) {
    match outcome {
        Ok(n) if n < WANTED_OPEN_FILES => tracing::warn!(
            open_files = n,
            "the open-file limit is below {WANTED_OPEN_FILES}: connections past it fail (raise the hard limit, e.g. LimitNOFILE or ulimit -Hn)"
        ),
        Ok(n) => tracing::debug!(open_files = n, "open-file limit"),
        Err(e) => tracing::warn!("{e}"),
    }
}
