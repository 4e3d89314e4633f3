//! Whether a download's metainfo may vouch for a range that ends before the blob's last
//! piece. The metainfo's chain is vouched for by the digest only through the last piece, so a
//! tracker's metainfo of the right size but a chain of its own (a tracker not to be trusted,
//! or its answer changed on a plain-HTTP path) would pass made-up pieces of any range short of
//! the end, and a client reading such a range (a lazy-pulling snapshotter) would get them as a
//! complete answer. Good: the origins' metainfo (every attempt after the first, or a first
//! from the origins), a download that finished (its digest checked), or a tracker's found
//! equal to the origins' (asked once per download, as the reading client).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderValue;
use shoal_p2p::Metainfo;
use shoal_registry::RepoName;

use super::{Attempt, Download, Downloads, MetainfoSource};

/// How long a confirmation that found the origins unreachable is not tried again (readers
/// wait for the download's end meanwhile, rather than each wait on the origins in turn).
const CONFIRM_RETRY: Duration = Duration::from_secs(10);

/// Why a range read from an attempt the download discarded (its metainfo found bad at the
/// end) is not answered.
const DISCARDED: &str =
    "the download started again with the origins' metainfo after this range was read; retry the pull";

/// A download's state for [`Download::confirm_metainfo`].
pub(super) struct MetainfoCheck {
    /// Where the first attempt's metainfo came from (later attempts start from the origins').
    first_source: MetainfoSource,
    /// Set once a tracker's metainfo was found equal to the origins'.
    confirmed: tokio::sync::OnceCell<()>,
    /// When a confirmation last found the origins unreachable.
    failed: Mutex<Option<Instant>>,
}

impl MetainfoCheck {
    pub(super) fn new(first_source: MetainfoSource) -> MetainfoCheck {
        MetainfoCheck { first_source, confirmed: tokio::sync::OnceCell::new(), failed: Mutex::new(None) }
    }
}

impl Download {
    /// What [`Download::confirm_metainfo`] answers without asking the origins, if it needs
    /// not ask them.
    fn metainfo_settled(&self, attempt: Attempt) -> Option<Result<(), String>> {
        let check = &self.check;
        if attempt.number > 1 || check.first_source == MetainfoSource::Origin || check.confirmed.initialized()
        {
            return Some(Ok(()));
        }
        // A finished download vouches only for the attempt that finished: the reader's
        // bytes may come from an earlier one, discarded for its made-up chain.
        if matches!(*self.outcome.borrow(), Some(Ok(()))) {
            let finished_as = self.current().1.number == attempt.number;
            return Some(if finished_as { Ok(()) } else { Err(DISCARDED.into()) });
        }
        None
    }

    /// Whether the metainfo that checks `attempt`'s pieces is known good for a range short of
    /// the blob's end (see the module docs), confirming it with the origins if need be within
    /// `deadline`, asked as the reading client (`client`'s credentials for `repo`, fetched only
    /// when the origins are asked: an anonymous client's token comes from a realm that may be
    /// slow); if they cannot be asked, the download's end decides, within `deadline`.
    pub(super) async fn confirm_metainfo(
        &self,
        downloads: &Downloads,
        attempt: Attempt,
        metainfo: &Metainfo,
        (repo, client): (&RepoName, Option<HeaderValue>),
        deadline: tokio::time::Instant,
    ) -> Result<(), String> {
        if let Some(settled) = self.metainfo_settled(attempt) {
            return settled;
        }
        let check = &self.check;
        let finished_as = |d: &Download| d.current().1.number == attempt.number;
        let digest = metainfo.digest();
        let failed = || check.failed.lock().unwrap_or_else(|p| p.into_inner());
        let failed_lately = failed().is_some_and(|at| at.elapsed() < CONFIRM_RETRY);
        // `Err(None)`: the origins answered with another metainfo; `Err(Some(_))`: no answer.
        let asked: Result<(), Option<String>> = if failed_lately {
            Err(Some("the origins could not be asked a moment ago".into()))
        } else {
            let ask = check.confirmed.get_or_try_init(|| async {
                let credentials = downloads.credentials(repo, client).await;
                let asked = shoal_registry::auth::FORWARD_AUTHORIZATION.scope(credentials, downloads.origin_metainfo(digest));
                let origins = asked.await.map_err(|e| Some(e.to_string()))?;
                if origins != *metainfo {
                    tracing::warn!(%digest, "the tracker's metainfo is not the origins'; not serving a range by it");
                    return Err(None);
                }
                Ok(())
            });
            match tokio::time::timeout_at(deadline, ask).await {
                Ok(asked) => asked.map(|_| ()),
                Err(_) => Err(Some("the origins did not answer in time".into())),
            }
        };
        match asked {
            Ok(()) => Ok(()),
            Err(None) => {
                Err("the tracker's metainfo for this blob is not the origins'; retry the pull".into())
            }
            Err(Some(e)) => {
                *failed() = Some(Instant::now());
                tracing::debug!(%digest, error = %e, "cannot confirm a tracker's metainfo; waiting for the download's end");
                match tokio::time::timeout_at(deadline, self.wait()).await {
                    Ok(Ok(())) if finished_as(self) => Ok(()),
                    Ok(Ok(())) => Err(DISCARDED.into()),
                    Ok(Err(failure)) => Err(format!("download failed: {failure}")),
                    Err(_) => Err(format!("cannot confirm the blob's metainfo with the origins: {e}")),
                }
            }
        }
    }
}
