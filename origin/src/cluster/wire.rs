//! The internal API's contract: paths, query and reply types, and limits. The server
//! ([`crate::cluster::internal_api`]) and the client ([`crate::cluster::remote`]) both build on
//! this module, so the two ends cannot drift apart.

use serde::{Deserialize, Serialize};
use shoal_registry::Digest;

use crate::cluster::record::RecordKind;

/// Every internal route lives under this prefix, so it can never collide with `/v2/`.
pub const PREFIX: &str = "/shoal/internal/v1";
/// `GET`: [`HealthReply`].
pub const HEALTH: &str = "/shoal/internal/v1/health";
/// `GET ?after=&n=`: the node's blobs, as `[BlobEntry]`.
pub const BLOBS: &str = "/shoal/internal/v1/blobs";
/// `HEAD|GET|PUT|DELETE`: one blob (route pattern; see [`blob_path`]).
pub const BLOB_ROUTE: &str = "/shoal/internal/v1/blobs/{digest}";
/// `GET`: one blob's metainfo JSON (route pattern; see [`metainfo_path`]).
pub const METAINFO_ROUTE: &str = "/shoal/internal/v1/blobs/{digest}/metainfo";
/// `POST ?repo=` with `[RecordKey]`: `[Option<Record>]`.
pub const RECORDS_GET: &str = "/shoal/internal/v1/records/get";
/// `GET ?repo=&kind=[&subject=][&max_bytes=[&after=]]`: `[Record]`, 404 for an unknown
/// repository. With `max_bytes` the answer is one page ([`ScanQuery`]).
pub const RECORDS_SCAN: &str = "/shoal/internal/v1/records/scan";
/// Set (to `1`) on a `records/scan` page that more records follow; the next page starts
/// after the last key this one holds.
pub const SCAN_MORE: &str = "shoal-scan-more";
/// `POST ?repo=` with `[Record]`: 204.
pub const RECORDS_APPLY: &str = "/shoal/internal/v1/records/apply";
/// Milliseconds a `records/apply` has left to commit, from when the receiver reads it; past
/// them it commits nothing (see `Node::records_apply_by`).
pub const APPLY_DEADLINE_MS: &str = "shoal-apply-deadline-ms";
/// `DELETE ?repo=`: 204.
pub const RECORDS_FORGET: &str = "/shoal/internal/v1/records/forget";
/// `GET ?after=&n=`: repository names, as `[String]`.
pub const REPOS: &str = "/shoal/internal/v1/repos";

/// Listing page size when the caller names none.
pub const DEFAULT_LIST_LIMIT: usize = 1000;
/// Largest listing page, so one call's answer stays small: the registry API's largest
/// answer, since a cluster's catalog merges one page from every origin (shorter, it would
/// skip the names held only on the others).
pub const MAX_LIST_LIMIT: usize = shoal_registry::api::MAX_PAGE;
/// Most record keys one `records/get` call may ask for.
pub const MAX_RECORD_KEYS: usize = 10_000;
/// Largest JSON request body (`records/get`, `records/apply`): 64 MiB.
pub const MAX_RECORDS_BODY: usize = 64 * 1024 * 1024;
/// Largest manifest an origin may be configured to accept: 16 MiB. A manifest travels between
/// origins as a record, a JSON string of up to twice its size (whitespace, quotes and
/// backslashes are escaped), which must fit a [`MAX_RECORDS_BODY`] and a scan page.
pub const MAX_MANIFEST_SIZE: u64 = 16 * 1024 * 1024;
/// Largest JSON answer the client reads: 256 MiB.
pub const MAX_JSON_RESPONSE: usize = 256 * 1024 * 1024;
/// Stored record JSON the client asks one `records/scan` page to hold: 32 MiB, so a page's
/// answer stays inside [`MAX_JSON_RESPONSE`] with any one record on top (a manifest is at
/// most [`MAX_MANIFEST_SIZE`], its record at most twice that).
pub const SCAN_PAGE_BYTES: usize = 32 * 1024 * 1024;
/// Longest error text the client keeps from a refusal.
pub const MAX_ERROR_TEXT: usize = 1024;

/// The path of one blob.
pub fn blob_path(digest: &Digest) -> String {
    format!("{BLOBS}/{digest}")
}

/// `GET`: quarantined blobs (`?after=&n=`).
pub const QUARANTINE: &str = "/shoal/internal/v1/quarantine";
/// `DELETE ?since=MS`: purge one quarantined blob.
pub const QUARANTINE_ROUTE: &str = "/shoal/internal/v1/quarantine/{digest}";
/// `POST`: set a blob aside for garbage collection.
pub const QUARANTINE_BLOB_ROUTE: &str = "/shoal/internal/v1/blobs/{digest}/quarantine";
/// `POST`: bring a quarantined blob back.
pub const RESTORE_BLOB_ROUTE: &str = "/shoal/internal/v1/blobs/{digest}/restore";
/// `GET`: the repositories in the node's repair queue (JSON number; origins before session
/// 44 answer the whole queue's length).
pub const REPAIR_PENDING: &str = "/shoal/internal/v1/repair-queue";

/// Query of `DELETE /quarantine/{digest}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PurgeQuery {
    /// When the copy was set aside (ms since the epoch), as listed.
    pub since: u64,
}

/// The path of one blob's metainfo.
pub fn metainfo_path(digest: &Digest) -> String {
    format!("{BLOBS}/{digest}/metainfo")
}

/// What `GET /health` answers; defined beside the membership checks that read it.
pub use crate::cluster::membership::{HealthReply, PeerIdentity};

/// Query of `HEAD /blobs/{digest}`: with `peek`, a quarantined copy is not brought back, and
/// a 404 says it is there with [`QUARANTINED_HEADER`] (origins of earlier releases ignore
/// the query, and bring it back).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatQuery {
    #[serde(default)]
    pub peek: bool,
}

/// Header of a peek's 404 for a quarantined copy.
pub const QUARANTINED_HEADER: &str = "shoal-quarantined";

/// Query of `GET /blobs`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BlobListQuery {
    /// List only digests after this one (the previous page's last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<usize>,
}

/// Query of `GET /repos`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RepoListQuery {
    /// List only names after this one (the previous page's last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<usize>,
}

/// Query naming the repository of a records call.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RepoQuery {
    pub repo: String,
}

/// Query of `GET /records/scan`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScanQuery {
    pub repo: String,
    pub kind: RecordKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Digest>,
    /// Page the answer: stored record JSON per page (capped at [`SCAN_PAGE_BYTES`]). Without
    /// it every record comes in one answer, as origins of earlier releases ask and answer:
    /// they ignore these fields and never set [`SCAN_MORE`], so a paging client reads their
    /// one answer as the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<usize>,
    /// The key name the previous page ended with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// At most this many records per page (with `max_bytes`; origins of releases before
    /// session 39 ignore it and fill the page by bytes alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_records: Option<usize>,
}

/// The listing page size to use for a requested `n`: the default when absent, capped.
pub fn list_limit(n: Option<usize>) -> usize {
    n.unwrap_or(DEFAULT_LIST_LIMIT).min(MAX_LIST_LIMIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_reply_field_names_are_stable() {
        let reply = HealthReply {
            id: "a:1".into(),
            peer: Some(PeerIdentity { peer_id: "p".into(), addr: "127.0.0.1:7".parse().unwrap() }),
            clock: None,
            wall_millis: None,
            disk_full: false,
            members: None,
            collected: None,
        };
        let json = serde_json::to_value(&reply).unwrap();
        assert_eq!(json, serde_json::json!({"id": "a:1", "peer": {"peer_id": "p", "addr": "127.0.0.1:7"}}));
        let bare: HealthReply = serde_json::from_str(r#"{"id":"b:2"}"#).unwrap();
        assert_eq!(
            bare,
            HealthReply {
                id: "b:2".into(),
                peer: None,
                clock: None,
                wall_millis: None,
                disk_full: false,
                members: None,
                collected: None,
            }
        );
    }

    #[test]
    fn a_health_reply_carries_the_last_collections_member_list() {
        let collected = crate::cluster::collected::LastCollection {
            at_millis: 7,
            members: ["a:1".to_string(), "b:1".to_string()].into(),
        };
        let json = serde_json::json!({"id": "a:1", "peer": null, "collected": {"at_millis": 7, "members": ["a:1", "b:1"]}});
        let reply: HealthReply = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(reply.collected, Some(collected));
        assert_eq!(serde_json::to_value(&reply).unwrap(), json);
    }

    #[test]
    fn limits() {
        assert_eq!(list_limit(None), DEFAULT_LIST_LIMIT);
        assert_eq!(list_limit(Some(5)), 5);
        assert_eq!(list_limit(Some(usize::MAX)), MAX_LIST_LIMIT);
    }
}
