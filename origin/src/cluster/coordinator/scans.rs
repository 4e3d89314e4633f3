//! The coordinator's scans and listings: every record of a kind in a repository (whole, or a
//! page at a time) merged across its owners, and the repository names across every live
//! origin. Apart from `coordinator.rs`, which places and reads single keys.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use shoal_registry::{Digest, StoreError};

use super::{unavailable, Answer, Coordinator};
use crate::cluster::node::{Node, NodeError, RecordPage, ScanPage};
use crate::cluster::record::{Record, RecordKey, RecordKind};
use crate::cluster::wire::SCAN_PAGE_BYTES;

impl Coordinator {
    /// Every record of `kind` in `repo` across its owners, newest copy of each key; `None`
    /// when no origin knows the repository (and an owner answered so). An owner
    /// that fails is left out when another answers: see [`Coordinator::scan_everywhere`]
    /// for a scan that must miss nothing.
    pub async fn scan_records(
        &self,
        repo: &str,
        kind: RecordKind,
        subject: Option<&Digest>,
    ) -> Result<Option<Vec<Record>>, StoreError> {
        self.scan(repo, kind, subject).await
    }

    /// [`Coordinator::scan_records`] over every live origin, failing unless every one
    /// answered: garbage collection's mark, where a record missed is a blob taken for garbage
    /// while a manifest still uses it. Owners alone are not enough: a write made while an
    /// owner was down landed on the next origins in the ranking, with nothing queued for
    /// repair, and stays there until a full repair pass moves it; an owner that answers with
    /// older records of the repository would hide it.
    pub async fn scan_everywhere(
        &self,
        repo: &str,
        kind: RecordKind,
    ) -> Result<Option<Vec<Record>>, StoreError> {
        let ranked = self.ranked(repo);
        let scan = |n: Arc<dyn Node>| async move { n.records_scan(repo, kind, None).await };
        let answers = self.ask(&ranked, scan).await;
        if let Some(e) = answers.iter().find_map(|(_, a)| a.as_ref().err()) {
            return Err(unavailable(&format!("metadata of {repo}"), Some(e.to_string())));
        }
        Ok(self.merge_scans(&answers))
    }

    async fn scan(
        &self,
        repo: &str,
        kind: RecordKind,
        subject: Option<&Digest>,
    ) -> Result<Option<Vec<Record>>, StoreError> {
        let scan = |n: Arc<dyn Node>| async move { n.records_scan(repo, kind, subject).await };
        let answers = self.ask_owners_first(repo, scan).await?;
        Ok(self.merge_scans(&answers))
    }

    /// One page of `repo`'s records of `kind` whose key names follow `after`, merged across
    /// its owners as [`Coordinator::scan_records`] merges whole scans, each owner asked for
    /// at most `max_records`. The page ends at the smallest last key of an answer that says
    /// more follow (past it, that owner's newer copy or tombstone of a key is still unread);
    /// that key comes back as where the next page starts, `None` after the last page. `None`
    /// if no origin knows the repository.
    pub async fn scan_page(
        &self,
        repo: &str,
        kind: RecordKind,
        after: Option<&str>,
        max_records: usize,
    ) -> Result<Option<(Vec<Record>, Option<String>)>, StoreError> {
        let page = ScanPage { after: after.map(str::to_string), max_bytes: SCAN_PAGE_BYTES, max_records };
        let page = &page;
        let scan = |n: Arc<dyn Node>| async move { n.records_page(repo, kind, None, page).await };
        let answers = self.ask_owners_first(repo, scan).await?;
        let pages: Vec<&RecordPage> =
            answers.iter().filter_map(|(_, a)| a.as_ref().ok().and_then(Option::as_ref)).collect();
        if pages.is_empty() {
            return Ok(None);
        }
        let end =
            pages.iter().filter(|p| p.more).filter_map(|p| p.records.last()).map(|r| r.key.name()).min();
        if let (Some(end), Some(after)) = (&end, after) {
            if end.as_str() <= after {
                return Err(unavailable(
                    &format!("metadata of {repo}"),
                    Some("a page did not move on".into()),
                ));
            }
        }
        // Origins that do not page (tests' nodes, earlier releases) answer everything.
        let wanted = |rec: &&Record| {
            let name = rec.key.name();
            after.is_none_or(|a| name.as_str() > a) && end.as_ref().is_none_or(|e| &name <= e)
        };
        let records = self.newest(pages.into_iter().flat_map(|p| &p.records).filter(wanted));
        Ok(Some((records, end)))
    }

    /// Ask `repo`'s owners, and the other live origins too when none of them knows it
    /// (ownership may have just moved). Fails when nothing knows it unless an owner answered
    /// (then the repository is unknown; the other origins may have nothing of a repository
    /// whose owners all failed to answer).
    async fn ask_owners_first<'a, T, F, Fut>(
        &self,
        repo: &str,
        op: F,
    ) -> Result<Vec<Answer<Option<T>>>, StoreError>
    where
        F: Fn(Arc<dyn Node>) -> Fut,
        Fut: Future<Output = Result<Option<T>, NodeError>> + 'a,
    {
        let ranked = self.ranked(repo);
        let r = self.replication.replicas.min(ranked.len());
        let mut answers = self.ask(&ranked[..r], &op).await;
        let owner_answered = answers.iter().any(|(_, a)| a.is_ok());
        let known = |answers: &[Answer<Option<T>>]| answers.iter().any(|(_, a)| matches!(a, Ok(Some(_))));
        if !known(&answers) {
            answers.extend(self.ask(&ranked[r..], &op).await);
        }
        if !known(&answers) && !owner_answered {
            let why = answers.into_iter().find_map(|(_, a)| a.err()).map(|e| e.to_string());
            return Err(unavailable(&format!("metadata of {repo}"), why));
        }
        Ok(answers)
    }

    /// The newest copy of each key the scans answered; `None` if none knew the repository.
    fn merge_scans(&self, answers: &[Answer<Option<Vec<Record>>>]) -> Option<Vec<Record>> {
        if !answers.iter().any(|(_, a)| matches!(a, Ok(Some(_)))) {
            return None;
        }
        let records = answers.iter().filter_map(|(_, a)| a.as_ref().ok().and_then(Option::as_ref)).flatten();
        Some(self.newest(records))
    }

    /// The newest copy of each key among `records`, in key order; the clock moves past them.
    fn newest<'a>(&self, records: impl Iterator<Item = &'a Record>) -> Vec<Record> {
        let mut by_key: BTreeMap<RecordKey, Record> = BTreeMap::new();
        for rec in records {
            if rec.supersedes(by_key.get(&rec.key)) {
                by_key.insert(rec.key.clone(), rec.clone());
            }
        }
        self.observe(by_key.values());
        by_key.into_values().collect()
    }

    /// Repository names across every live origin, sorted, after `after`, at most `limit`
    /// (origins that fail are left out while one answers), and whether more may follow: the
    /// origins gave more than `limit` together, or one of them gave a full answer (capped
    /// answers of the same names merge to no more than `limit`).
    pub async fn repos(&self, after: Option<&str>, limit: usize) -> Result<(Vec<String>, bool), StoreError> {
        self.list_repos(after, limit, false).await
    }

    /// [`repos`](Self::repos) that fails unless every live origin answered: garbage
    /// collection's list, where a repository missed is a repository whose blobs look unused.
    pub async fn repos_everywhere(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self.list_repos(after, limit, true).await?.0)
    }

    async fn list_repos(
        &self,
        after: Option<&str>,
        limit: usize,
        all_must_answer: bool,
    ) -> Result<(Vec<String>, bool), StoreError> {
        let live = self.topology.live();
        let answers = self.ask(&live, |n| async move { n.repos(after, limit).await }).await;
        let mut all = std::collections::BTreeSet::new();
        let mut answered = false;
        let mut full = false;
        for (_, answer) in answers {
            match answer {
                Ok(names) => {
                    answered = true;
                    full |= names.len() >= limit.min(crate::cluster::wire::MAX_LIST_LIMIT);
                    all.extend(names);
                }
                Err(e) if all_must_answer => return Err(unavailable("repository list", Some(e.to_string()))),
                Err(_) => {}
            }
        }
        if !answered {
            return Err(unavailable("repository list", None));
        }
        // More follow when the origins together gave more than `limit`, or when one of them
        // gave a full answer (it may hold more than it said).
        let more = full || all.len() > limit;
        Ok((all.into_iter().take(limit).collect(), more))
    }
}
