//! The containerd `hosts.toml` files `shoal node setup` writes and `restore` takes back: what
//! one registry directory gets (pure plans, tested beside them), and the file-system work
//! (blocking) of writing, sweeping and restoring them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::SetupPlan;
use crate::atomic_file;

/// The first line of every `hosts.toml` we write: `restore` only touches files that start with it.
pub(super) const MARKER_LINE: &str =
    "# Written by `shoal node setup`; `shoal node restore` puts back what was here.";
/// The file containerd reads in each registry's directory.
pub(super) const HOSTS_FILE: &str = "hosts.toml";
/// Where `setup` keeps the user's own `hosts.toml` until `restore` puts it back.
pub(super) const BACKUP_FILE: &str = "hosts.toml.shoal-backup";

/// The `hosts.toml` we write for one registry; `ca` is the mirror's CA as containerd finds it.
/// It is named for the fallback server too: the origins' certificates come from the same
/// cluster CA, and containerd adds a host's `ca` to the system roots rather than replacing
/// them, so public registries still verify.
pub(super) fn hosts_toml(server: &str, mirror: &str, dial_timeout: &str, ca: Option<&Path>) -> String {
    let ca_line =
        |indent: &str| ca.map(|c| format!("{indent}ca = \"{}\"\n", c.display())).unwrap_or_default();
    format!(
        "{MARKER_LINE}\nserver = \"{server}\"\n{}\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  dial_timeout = \"{dial_timeout}\"\n{}",
        ca_line(""),
        ca_line("  ")
    )
}

/// Whether a file's first line is our marker.
pub(super) fn is_ours(content: &[u8]) -> bool {
    let first = content.split(|b| *b == b'\n').next().unwrap_or_default();
    first.strip_suffix(b"\r").unwrap_or(first) == MARKER_LINE.as_bytes()
}

/// What `setup` does in one registry directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SetupAction {
    /// Our file, with the wanted content, is already there.
    Unchanged,
    /// Write ours: there is no hosts.toml, or it is ours with other content.
    Write,
    /// The user's hosts.toml becomes the backup, then ours is written.
    BackUpThenWrite,
    /// The user's hosts.toml is there and so is a backup from an earlier setup: replacing the
    /// file would lose one of the two, so stop and let a person choose.
    Conflict,
}

pub(super) fn plan_setup(current: Option<&[u8]>, backup_exists: bool, wanted: &[u8]) -> SetupAction {
    match current {
        None => SetupAction::Write,
        Some(c) if c == wanted => SetupAction::Unchanged,
        Some(c) if is_ours(c) => SetupAction::Write,
        Some(_) if backup_exists => SetupAction::Conflict,
        Some(_) => SetupAction::BackUpThenWrite,
    }
}

/// What `restore` does in one registry directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RestoreAction {
    /// No hosts.toml, or one that is not ours: nothing to do.
    Nothing,
    /// Not ours, but a backup is there too: left alone, worth saying.
    ForeignWithBackup,
    /// Ours (or none: a setup stopped midway), with the user's original beside it: put the
    /// original back.
    PutBack,
    /// Ours, with nothing to put back: delete it, and the directory if that empties it.
    Remove,
}

pub(super) fn plan_restore(current: Option<&[u8]>, backup_exists: bool) -> RestoreAction {
    match current {
        // A setup that stopped between setting the original aside and writing ours.
        None if backup_exists => RestoreAction::PutBack,
        None => RestoreAction::Nothing,
        Some(c) if !is_ours(c) && backup_exists => RestoreAction::ForeignWithBackup,
        Some(c) if !is_ours(c) => RestoreAction::Nothing,
        Some(_) if backup_exists => RestoreAction::PutBack,
        Some(_) => RestoreAction::Remove,
    }
}

/// The file's bytes, or `None` when it does not exist. A symlink is the user's file, whether
/// or not its target can be seen from here (an absolute link into the host's tree, read from a
/// container): empty bytes, never ours, so it is backed up, not written over or removed.
pub(super) fn read_if_exists(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    // Setup only ever writes regular files: a link is the user's, wherever it leads (to our
    // file in another registry's directory, even).
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink()) {
        return Ok(Some(Vec::new()));
    }
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match exists(path)? {
            true => Ok(Some(Vec::new())),
            false => Ok(None),
        },
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Whether `a` and `b` are one file (hard links of it), not following symlinks.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::symlink_metadata(a), std::fs::symlink_metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Whether there is anything at `path`, a symlink that leads nowhere included.
pub(super) fn exists(path: &Path) -> anyhow::Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("checking {}", path.display())),
    }
}

/// Write every listed registry's `hosts.toml` (all planned before any is written), then take
/// ours back from the directories of registries no longer listed; one line per thing done.
pub(super) fn write_registries(plan: &SetupPlan, report: &mut Vec<String>) -> anyhow::Result<()> {
    // Every registry is planned before any is written: a conflict in the last one must not
    // leave the first ones pointing at an agent that never starts.
    let mut planned = Vec::new();
    // Registries whose directories are one (a link between them): containerd reads one file
    // there, the first listed's. Planned twice, the second backed up our first file over the
    // user's original.
    let mut same = Vec::new();
    let mut seen: Vec<(PathBuf, &str)> = Vec::new();
    for registry in &plan.registries {
        let dir = plan.hosts_dir.join(&registry.name);
        anyhow::ensure!(
            !exists(&dir)? || dir.is_dir(),
            "{} is not a directory (or a link to one this container can see); no hosts.toml was written",
            dir.display()
        );
        let real = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
        if let Some((_, first)) = seen.iter().find(|(r, _)| *r == real) {
            same.push(format!("{}: the directory of {first}; its hosts.toml serves both", registry.name));
            continue;
        }
        seen.push((real, registry.name.as_str()));
        let hosts = dir.join(HOSTS_FILE);
        let backup = dir.join(BACKUP_FILE);
        let ca = plan.mirror_ca.as_ref().map(|(_, seen)| seen.as_path());
        let wanted = hosts_toml(&registry.server, &plan.mirror, &plan.dial_timeout, ca);
        let current = read_if_exists(&hosts)?;
        let mut action = plan_setup(current.as_deref(), exists(&backup)?, wanted.as_bytes());
        if action == SetupAction::Conflict && same_file(&hosts, &backup) {
            // A setup stopped between keeping the original and writing ours: the backup is
            // the user's file already.
            action = SetupAction::Write;
        }
        anyhow::ensure!(
            action != SetupAction::Conflict,
            "{} was not written by shoal, and {} already holds an earlier original; \
             move one of them away and run setup again (no hosts.toml was written)",
            hosts.display(),
            backup.display()
        );
        planned.push((registry, dir, wanted, action));
    }
    for (registry, dir, wanted, action) in planned {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let hosts = dir.join(HOSTS_FILE);
        let backup = dir.join(BACKUP_FILE);
        let wrote = format!("wrote {} (mirror {}, then {})", hosts.display(), plan.mirror, registry.server);
        let line = match action {
            SetupAction::Unchanged => format!("unchanged {}", hosts.display()),
            // Refused above, before anything was written.
            SetupAction::Conflict => continue,
            SetupAction::Write => {
                atomic_file::write(&hosts, wanted.as_bytes(), None)?;
                wrote
            }
            SetupAction::BackUpThenWrite => {
                // A link, not a rename: it fails rather than replace a backup that appeared
                // since the plan (the user's original is never written over).
                match std::fs::hard_link(&hosts, &backup) {
                    Ok(()) => {}
                    // A file system without hard links: a rename, the backup checked absent.
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists && !exists(&backup)? => {
                        std::fs::rename(&hosts, &backup).with_context(|| {
                            format!(
                                "renaming {} to {} (no hard link: {e})",
                                hosts.display(),
                                backup.display()
                            )
                        })?
                    }
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("keeping {} as {}", hosts.display(), backup.display()))
                    }
                }
                atomic_file::write(&hosts, wanted.as_bytes(), None)?;
                format!("backed up {} to {BACKUP_FILE}; {wrote}", hosts.display())
            }
        };
        report.push(format!("{}: {line}", registry.name));
    }
    report.extend(same);
    // A registry no longer listed (dropped from the chart's values) keeps no file of ours:
    // its pulls would go on reaching the agent, and the user's original stay set aside. (With
    // a mirror given and no registry listed, none stays.)
    if !plan.mirror.is_empty() {
        // By where they lead: a listed registry's directory may be a symlink to another one.
        let listed: BTreeSet<PathBuf> = plan
            .registries
            .iter()
            .filter_map(|r| std::fs::canonicalize(plan.hosts_dir.join(&r.name)).ok())
            .collect();
        let mirror_line = format!("[host.\"{}\"]", plan.mirror);
        for dir in registry_dirs(&plan.hosts_dir)? {
            let unlisted = std::fs::canonicalize(&dir).is_ok_and(|real| !listed.contains(&real));
            // Not files of ours that name another mirror: another install's stay.
            let other_mirror = std::fs::read(dir.join(HOSTS_FILE))
                .is_ok_and(|c| is_ours(&c) && !String::from_utf8_lossy(&c).contains(&mirror_line));
            if unlisted && !other_mirror {
                // Someone else's directory that cannot be read is not a reason to fail setup.
                match restore_dir(&dir) {
                    Ok(Some(line)) => report.push(format!("no longer listed: {line}")),
                    Ok(None) => {}
                    Err(e) => report.push(format!("could not check {}: {e:#}", dir.display())),
                }
            }
        }
    }
    Ok(())
}

/// The registry directories under `hosts_dir` (none if it does not exist), sorted: a symlink
/// to a directory counts as one (setup writes through it, so restore must look there too);
/// one whose target cannot be seen from here does not.
pub(super) fn registry_dirs(hosts_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(hosts_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", hosts_dir.display())),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", hosts_dir.display()))?;
        let kind = entry.file_type().with_context(|| format!("inspecting {}", entry.path().display()))?;
        let linked_dir = kind.is_symlink() && std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir());
        if kind.is_dir() || linked_dir {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Undo `setup` in one registry directory; a line saying what was done, if anything.
pub(super) fn restore_dir(dir: &Path) -> anyhow::Result<Option<String>> {
    let hosts = dir.join(HOSTS_FILE);
    let backup = dir.join(BACKUP_FILE);
    let current = read_if_exists(&hosts)?;
    let line = match plan_restore(current.as_deref(), exists(&backup)?) {
        RestoreAction::Nothing => return Ok(None),
        RestoreAction::ForeignWithBackup => {
            format!("left alone {}: not written by shoal (and {BACKUP_FILE} kept beside it)", hosts.display())
        }
        RestoreAction::PutBack => {
            std::fs::rename(&backup, &hosts)
                .with_context(|| format!("renaming {} to {}", backup.display(), hosts.display()))?;
            atomic_file::sync_dir(dir)?;
            format!("restored {} from {BACKUP_FILE}", hosts.display())
        }
        RestoreAction::Remove => {
            std::fs::remove_file(&hosts).with_context(|| format!("removing {}", hosts.display()))?;
            // A setup that died mid-write leaves its temporary file behind.
            atomic_file::remove_leftovers(&hosts)?;
            if std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_symlink()) {
                atomic_file::sync_dir(dir)?;
                return Ok(Some(format!("removed {} (its directory is a link, kept)", hosts.display())));
            }
            match std::fs::remove_dir(dir) {
                Ok(()) => format!("removed {} and its directory", hosts.display()),
                Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                    atomic_file::sync_dir(dir)?;
                    format!("removed {} (other files kept)", hosts.display())
                }
                Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
            }
        }
    };
    Ok(Some(line))
}

/// Do `restore` in every directory of `hosts_dir`; returns one line per thing done. A
/// directory that cannot be restored (unreadable, say) does not stop the others: they are all
/// tried, then the failures are the error.
pub(super) fn restore_blocking(hosts_dir: &Path) -> anyhow::Result<Vec<String>> {
    if !exists(hosts_dir)? {
        return Ok(vec![format!("{} does not exist: nothing to restore", hosts_dir.display())]);
    }
    let mut report = Vec::new();
    let mut failed = Vec::new();
    for dir in registry_dirs(hosts_dir)? {
        match restore_dir(&dir) {
            Ok(Some(line)) => report.push(line),
            Ok(None) => {}
            Err(e) => failed.push(format!("{:#}", e)),
        }
    }
    anyhow::ensure!(
        failed.is_empty(),
        "restored what could be ({}); failed: {}",
        report.join("; "),
        failed.join("; ")
    );
    if report.is_empty() {
        report.push(format!("nothing of shoal's in {}", hosts_dir.display()));
    }
    Ok(report)
}
