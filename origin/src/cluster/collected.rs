//! The member list of the cluster's last garbage collection. A repository's records live on
//! its R owners only, so when R or more origins leave the member list at once, the
//! repositories whose every copy was on them are hidden until they come back, while their
//! layers (placed by digest) stay on the remaining origins; a collection then would see no
//! manifest naming those layers and delete them. So a collection does not start while R or
//! more members of the last collection's list are missing from the current one, unless an
//! operator says they are gone for good (see `cluster::gc`).
//!
//! The leader records the list when a collection completes; every origin's health replies
//! carry the newest list it knows, and every origin keeps (and persists) the newest it has
//! seen, so a new leader (the old one among those removed) knows it too. Members that join
//! are added to it (repair moves their repositories' records onto them, off the origins that
//! held them, so their leaving hides those too), and a cluster that has never collected
//! starts the list with the members it has.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

/// The file in an origin's data directory that holds [`LastCollection`].
pub const FILE_NAME: &str = "last-collection.json";

/// The largest member list a health reply's [`LastCollection`] may carry: a list past it is
/// not kept (an origin cannot be asked to remember without bound).
pub const MAX_MEMBERS: usize = 10_000;

/// When a collection completed, and the members (their ids) it saw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastCollection {
    /// Wall-clock milliseconds since the epoch at the leader when it completed.
    pub at_millis: u64,
    /// Every member's id, the leader's included.
    pub members: BTreeSet<String>,
}

impl LastCollection {
    /// Members of this list that are not among `current`.
    pub fn departed<'a>(&'a self, current: &[String]) -> Vec<&'a str> {
        let current: BTreeSet<&str> = current.iter().map(String::as_str).collect();
        self.members.iter().map(String::as_str).filter(|m| !current.contains(m)).collect()
    }

    /// `self` merged with `other`: the later collection's list, or both lists' members for
    /// the same collection (members seen joining since are added on every origin alike).
    fn merged(&self, other: &LastCollection) -> LastCollection {
        match self.at_millis.cmp(&other.at_millis) {
            std::cmp::Ordering::Greater => self.clone(),
            std::cmp::Ordering::Less => other.clone(),
            std::cmp::Ordering::Equal => LastCollection {
                at_millis: self.at_millis,
                members: self.members.union(&other.members).cloned().collect(),
            },
        }
    }
}

/// The newest [`LastCollection`] this origin knows, and where it is kept.
#[derive(Debug, Default)]
pub struct Collections {
    /// `None`: kept in memory only (a lone origin's tests, the in-process test clusters).
    path: Option<PathBuf>,
    last: Arc<Mutex<Option<LastCollection>>>,
    /// Held while the file is written, so the newest value is the one left on disk.
    writing: Arc<Mutex<()>>,
}

impl Collections {
    /// Load what `path` holds (nothing if it does not exist). A file that cannot be read or
    /// parsed is logged and left for the next write: the other origins' health replies bring
    /// the list back within a health interval.
    pub fn load(path: PathBuf) -> Collections {
        let last = match std::fs::read(&path).map(|bytes| serde_json::from_slice(&bytes)) {
            Ok(Ok(last)) => Some(last),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Ok(Err(e)) => {
                tracing::warn!(path = %path.display(), error = %e, "the last garbage collection's member list is unreadable; waiting for the other origins'");
                None
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the last garbage collection's member list is unreadable; waiting for the other origins'");
                None
            }
        };
        Collections { path: Some(path), last: Arc::new(Mutex::new(last)), writing: Default::default() }
    }

    /// Record a collection that completed now over `members`: later than any list known,
    /// whatever this origin's clock says.
    pub fn record(&self, members: BTreeSet<String>) {
        let at_millis = {
            let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
            let after = last.as_ref().map_or(0, |l| l.at_millis.saturating_add(1));
            crate::cluster::record::now_millis().max(after)
        };
        self.offer(&LastCollection { at_millis, members });
    }

    /// The newest list known.
    pub fn last(&self) -> Option<LastCollection> {
        self.last.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Merge `seen` (another origin's list) into the list known: a later collection's
    /// replaces it, the same collection's adds its members. `true` if the list changed. The
    /// file is written in the background, off the async runtime.
    pub fn offer(&self, seen: &LastCollection) -> bool {
        {
            let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
            let merged = match last.as_ref() {
                None => seen.clone(),
                Some(known) => known.merged(seen),
            };
            if merged.members.len() > MAX_MEMBERS || last.as_ref() == Some(&merged) {
                return false;
            }
            *last = Some(merged);
        }
        self.persist();
        true
    }

    /// The members now (their identities): added to the list, or the list started with them
    /// if no collection is known (a cluster that has never collected, or not since it ran a
    /// release before this list). `true` if the list changed.
    pub fn observe(&self, members: &[String]) -> bool {
        let at_millis = self.last().map_or(0, |l| l.at_millis);
        self.offer(&LastCollection { at_millis, members: members.iter().cloned().collect() })
    }

    /// Write the newest list to the file, in a blocking task (the list is read there, under
    /// the write lock, so of two writes racing the last leaves the newest). A failure is
    /// logged: the list is still kept in memory and spread by the health replies.
    fn persist(&self) {
        let Some(path) = self.path.clone() else { return };
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        let (writing, last) = (self.writing.clone(), self.last.clone());
        handle.spawn_blocking(move || {
            let _writing = writing.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(newest) = last.lock().unwrap_or_else(PoisonError::into_inner).clone() else { return };
            let written = serde_json::to_vec(&newest)
                .map_err(std::io::Error::other)
                .and_then(|bytes| shoal_registry::durable::replace(&path, &bytes, None));
            if let Err(e) = written {
                tracing::warn!(path = %path.display(), error = %e, "could not keep the last garbage collection's member list");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(at_millis: u64, members: &[&str]) -> LastCollection {
        LastCollection { at_millis, members: members.iter().map(|m| m.to_string()).collect() }
    }

    #[test]
    fn departed_members_are_those_missing_now() {
        let last = list(1, &["a:1", "b:1", "c:1"]);
        assert_eq!(last.departed(&["a:1".into(), "c:1".into(), "d:1".into()]), vec!["b:1"]);
        assert!(last.departed(&["a:1".into(), "b:1".into(), "c:1".into()]).is_empty());
    }

    #[test]
    fn a_later_list_replaces_and_the_same_collections_adds() {
        let c = Collections::default();
        assert!(c.offer(&list(10, &["a:1", "b:1"])));
        assert!(!c.offer(&list(9, &["a:1"])), "older");
        assert!(!c.offer(&list(10, &["a:1", "b:1"])), "the same");
        assert!(c.offer(&list(10, &["c:1"])), "the same collection, a member joined since");
        assert_eq!(c.last(), Some(list(10, &["a:1", "b:1", "c:1"])));
        assert!(c.offer(&list(11, &["a:1"])));
        assert_eq!(c.last(), Some(list(11, &["a:1"])));
        let huge =
            LastCollection { at_millis: 11, members: (0..=MAX_MEMBERS).map(|i| format!("m{i}:1")).collect() };
        assert!(!c.offer(&huge), "too large to remember");
    }

    /// Members that join are added to the list (their leaving hides what repair moved onto
    /// them); with no list, one starts from the members there are.
    #[test]
    fn members_that_join_are_added_and_a_list_starts_without_a_collection() {
        let c = Collections::default();
        assert!(c.observe(&["a:1".into(), "b:1".into()]));
        assert_eq!(c.last(), Some(list(0, &["a:1", "b:1"])));
        assert_eq!(c.last().unwrap().departed(&["a:1".into()]), vec!["b:1"]);
        c.record(["a:1".to_string()].into());
        let recorded = c.last().unwrap();
        assert!(c.observe(&["a:1".into(), "d:1".into()]));
        assert_eq!(c.last().unwrap().members, ["a:1".to_string(), "d:1".to_string()].into());
        assert_eq!(c.last().unwrap().at_millis, recorded.at_millis);
        assert!(!c.observe(&["a:1".into()]), "leaving removes nothing");
    }

    #[test]
    fn a_recorded_collection_is_later_than_any_known_whatever_the_clock() {
        let c = Collections::default();
        let ahead = crate::cluster::record::now_millis() + 3_600_000;
        c.offer(&list(ahead, &["a:1", "b:1"]));
        c.record(["a:1".to_string()].into());
        let last = c.last().unwrap();
        assert_eq!((last.at_millis, last.members.len()), (ahead + 1, 1));
    }

    #[tokio::test]
    async fn the_newest_list_is_kept_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        assert_eq!(Collections::load(path.clone()).last(), None);
        let c = Collections::load(path.clone());
        for at in [5, 7, 6] {
            c.offer(&list(at, &["a:1"]));
        }
        // The writes run in blocking tasks: wait for the last one.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while Collections::load(path.clone()).last() != Some(list(7, &["a:1"])) {
            assert!(std::time::Instant::now() < deadline, "not written");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        std::fs::write(&path, b"{not json").unwrap();
        assert_eq!(Collections::load(path).last(), None, "an unreadable file is not fatal");
    }
}
