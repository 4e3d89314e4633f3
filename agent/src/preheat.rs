//! `POST /v1/preheat`: download every blob of an image (all platforms, or one) so later pulls
//! are local. The answer streams one JSON line per event, so `shoal preheat` can show progress.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use shoal_registry::manifest::parse_manifest;
use shoal_registry::store::Reference;
use shoal_registry::{Digest, RegistryStore, RepoName};
use tokio::sync::mpsc;

use shoal_registry::auth::{AccessCheck, Action, Authorize, Need, FORWARD_AUTHORIZATION};
use shoal_registry::identity::TransportIdentity;

use crate::downloads::Joined;
use crate::mirror::UPSTREAM_CREDENTIALS;
use crate::store::AgentStore;

/// A preheat request: `image` is `repo:tag` or `repo@digest`; `platform` is `os/arch[/variant]`.
#[derive(Debug, Deserialize)]
pub struct PreheatRequest {
    pub image: String,
    #[serde(default)]
    pub platform: Option<String>,
}

/// One line of the progress stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PreheatEvent {
    /// The blobs to fetch, with their total size.
    Plan {
        blobs: usize,
        bytes: u64,
    },
    BlobDone {
        digest: String,
        size: u64,
    },
    Failed {
        message: String,
    },
    Done {
        blobs: usize,
        bytes: u64,
    },
    /// Verified bytes of the plan held so far (cached blobs and pieces of running downloads),
    /// every [`PROGRESS_EVERY`] while blobs are downloading.
    Progress {
        bytes: u64,
    },
}

/// How often a running preheat reports the bytes it holds.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Blobs one preheat downloads at once (as a container runtime pulls a few layers at once):
/// an image of fifty layers does not start fifty downloads, and its first layers finish early.
pub const PREHEAT_PARALLEL_BLOBS: usize = 4;

/// Verified bytes of `digest` held here: all of a cached blob, the pieces of a running download.
fn held_bytes(store: &AgentStore, digest: &Digest, size: u64) -> u64 {
    if store.downloads().cache.contains(digest) {
        return size;
    }
    match store.downloads().running(digest) {
        Some(d) => {
            let pieces = d.pieces();
            let m = pieces.metainfo();
            let have = pieces.have();
            (0..have.len()).filter(|i| have.get(*i)).filter_map(|i| m.piece_len(i)).sum()
        }
        None => 0,
    }
}

fn parse_image(image: &str) -> Result<(RepoName, Reference), String> {
    let (name, reference) = if let Some((n, d)) = image.split_once('@') {
        (n, Reference::Digest(d.parse().map_err(|e| format!("{e}"))?))
    } else {
        match image.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Reference::Tag(t.parse().map_err(|e| format!("{e}"))?)),
            _ => (image, Reference::Tag("latest".parse().map_err(|e| format!("{e}"))?)),
        }
    };
    Ok((name.parse().map_err(|e| format!("{e}"))?, reference))
}

#[derive(Deserialize)]
struct IndexEntries {
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
struct IndexEntry {
    digest: Digest,
    #[serde(default)]
    platform: Option<PlatformJson>,
}

#[derive(Deserialize)]
struct PlatformJson {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

fn platform_matches(p: &Option<PlatformJson>, want: &str) -> bool {
    let Some(p) = p else { return false };
    let full = match &p.variant {
        Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
        None => format!("{}/{}", p.os, p.architecture),
    };
    full == want || format!("{}/{}", p.os, p.architecture) == want
}

/// Most child manifests one preheat follows (an index of every platform has a few dozen).
pub const MAX_PREHEAT_MANIFESTS: usize = 1024;
/// Most distinct blobs one preheat plans.
pub const MAX_PREHEAT_BLOBS: usize = 10_000;

/// Add the blobs manifest `bytes` names to `digests`, at most [`MAX_PREHEAT_BLOBS`] in all.
fn add_blobs(digests: &mut BTreeSet<Digest>, media_type: &str, bytes: &[u8]) -> Result<(), String> {
    let parsed = parse_manifest(Some(media_type), bytes).map_err(|e| e.to_string())?;
    digests.extend(parsed.blobs);
    if digests.len() > MAX_PREHEAT_BLOBS {
        return Err(format!("the image names more than {MAX_PREHEAT_BLOBS} blobs; not preheated"));
    }
    Ok(())
}

/// The child manifests of index `bytes` a preheat follows: those for `platform` (all without
/// one), each once (an index may name one any number of times, and each would be fetched and
/// parsed again: 35,000 times a 4 MiB child in a 4 MiB index), at most
/// [`MAX_PREHEAT_MANIFESTS`].
fn children_to_follow(bytes: &[u8], platform: Option<&str>) -> Result<Vec<Digest>, String> {
    let index: IndexEntries = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut seen = BTreeSet::new();
    let mut children = Vec::new();
    for entry in index.manifests {
        if platform.is_some_and(|p| !platform_matches(&entry.platform, p))
            || !seen.insert(entry.digest.clone())
        {
            continue;
        }
        if seen.len() > MAX_PREHEAT_MANIFESTS {
            return Err(format!(
                "the index names more than {MAX_PREHEAT_MANIFESTS} manifests; not preheated"
            ));
        }
        children.push(entry.digest);
    }
    if children.is_empty() {
        return Err(format!("no manifest for platform {}", platform.unwrap_or("")));
    }
    Ok(children)
}

/// Every blob (with size) of the image, following an index into its (matching) manifests.
/// Each child is read and parsed in turn, its bytes dropped before the next: kept until all
/// were read, an index of a few hundred distinct 4 MiB children took a GiB, the agent's
/// whole memory, per preheat.
async fn plan(
    store: &AgentStore,
    repo: &RepoName,
    reference: &Reference,
    platform: Option<&str>,
) -> Result<Vec<(Digest, u64)>, String> {
    let top =
        store.manifest_get(repo, reference).await.map_err(|e| e.to_string())?.ok_or("manifest unknown")?;
    let parsed = parse_manifest(Some(&top.media_type), &top.bytes).map_err(|e| e.to_string())?;
    let mut digests = BTreeSet::new();
    if parsed.children.is_empty() {
        add_blobs(&mut digests, &top.media_type, &top.bytes)?;
    } else {
        let children = children_to_follow(&top.bytes, platform)?;
        drop(top);
        for digest in children {
            let child = store
                .manifest_get(repo, &Reference::Digest(digest.clone()))
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("child manifest {digest} unknown"))?;
            add_blobs(&mut digests, &child.media_type, &child.bytes)?;
        }
    }
    let mut blobs = Vec::new();
    for d in digests {
        let size = store
            .blob_size(repo, &d)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("blob {d} unknown"))?;
        blobs.push((d, size));
    }
    Ok(blobs)
}

/// Preheats running at once on one agent; more are answered 429. A preheat runs on after its
/// client hangs up (the image is still wanted), so without a bound a client posting and
/// closing in a loop started jobs, origin requests and cache churn without end.
pub const MAX_RUNNING_PREHEATS: usize = 16;

/// What the preheat handler needs: the store, who decides access, and the running preheats'
/// slots ([`MAX_RUNNING_PREHEATS`]).
#[derive(Clone)]
pub struct PreheatState {
    pub store: Arc<AgentStore>,
    pub auth: Arc<dyn Authorize>,
    pub running: Arc<tokio::sync::Semaphore>,
}

impl PreheatState {
    pub fn new(store: Arc<AgentStore>, auth: Arc<dyn Authorize>) -> PreheatState {
        PreheatState { store, auth, running: Arc::new(tokio::sync::Semaphore::new(MAX_RUNNING_PREHEATS)) }
    }
}

/// The preheat handler. It needs what a pull of the image needs: a token with pull scope for a
/// private repository (or a node identity), which then goes along to the origin.
pub async fn preheat(
    State(state): State<PreheatState>,
    parts: axum::http::request::Parts,
    Json(req): Json<PreheatRequest>,
) -> Response {
    let (repo, reference) = match parse_image(&req.image) {
        Ok(x) => x,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("invalid image reference: {e}\n")).into_response()
        }
    };
    let needs = [Need::Repo(repo.to_string(), Action::Pull)];
    let identity = parts.extensions.get::<TransportIdentity>();
    let check = AccessCheck { headers: &parts.headers, identity, needs: &needs };
    if let Err(e) = state.auth.authorize(&check).await {
        return e.into_response();
    }
    let Ok(slot) = state.running.clone().try_acquire_owned() else {
        let busy = format!("{MAX_RUNNING_PREHEATS} preheats are running; retry later\n");
        return (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, "10")], busy).into_response();
    };
    // As for a pull: a bearer token goes to the origins, Basic credentials (Shoal checking
    // none) are the client's upstream's, so nothing they fetch is cached for other clients.
    let forward = parts
        .headers
        .get(header::AUTHORIZATION)
        .filter(|v| v.as_bytes().len() > 7 && v.as_bytes()[..7].eq_ignore_ascii_case(b"bearer "))
        .cloned();
    let upstream = crate::mirror::client_upstream_credentials(state.store.auth(), &parts.headers).await;
    let store = state.store;
    let (tx, rx) = mpsc::channel::<PreheatEvent>(64);
    let work = async move {
        let _slot = slot;
        let blobs = match plan(&store, &repo, &reference, req.platform.as_deref()).await {
            Ok(b) => b,
            Err(message) => {
                let _ = tx.send(PreheatEvent::Failed { message }).await;
                return;
            }
        };
        let bytes = blobs.iter().map(|(_, s)| s).sum();
        let _ = tx.send(PreheatEvent::Plan { blobs: blobs.len(), bytes }).await;
        let progress = {
            let (store, blobs, tx) = (store.clone(), blobs.clone(), tx.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(PROGRESS_EVERY);
                let mut last = None;
                loop {
                    tick.tick().await;
                    let held: u64 = blobs.iter().map(|(d, s)| held_bytes(&store, d, *s)).sum();
                    if last != Some(held) && tx.send(PreheatEvent::Progress { bytes: held }).await.is_err() {
                        return;
                    }
                    last = Some(held);
                }
            })
        };
        // Stopped (and waited for) before the last event, so nothing follows it.
        let stop_progress = || async {
            progress.abort();
            let _ = progress.await;
        };
        let fetches = blobs.clone().into_iter().map(|(digest, size)| {
            let store = store.clone();
            let repo = repo.clone();
            async move {
                if store.downloads().cache.get(&digest).is_some() || size == 0 {
                    return Ok((digest, size));
                }
                match store.join_held(&repo, &digest, size).await.map_err(|e| format!("{digest}: {e}"))? {
                    Joined::Download(download) => {
                        download.wait().await.map_err(|e| format!("{digest}: {e}"))?
                    }
                    Joined::Cached(_) => {}
                }
                Ok::<_, String>((digest, size))
            }
        });
        let mut done = futures_util::stream::iter(fetches).buffer_unordered(PREHEAT_PARALLEL_BLOBS);
        while let Some(result) = done.next().await {
            match result {
                Ok((digest, size)) => {
                    let _ = tx.send(PreheatEvent::BlobDone { digest: digest.to_string(), size }).await;
                }
                Err(message) => {
                    stop_progress().await;
                    let _ = tx.send(PreheatEvent::Failed { message }).await;
                    return;
                }
            }
        }
        stop_progress().await;
        // The last word on bytes: everything is held (also when it took less than one tick).
        let _ = tx.send(PreheatEvent::Progress { bytes }).await;
        let _ = tx.send(PreheatEvent::Done { blobs: blobs.len(), bytes }).await;
    };
    tokio::spawn(FORWARD_AUTHORIZATION.scope(forward, UPSTREAM_CREDENTIALS.scope(upstream, work)));
    let lines = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, std::io::Error>(bytes::Bytes::from(line)), rx))
    });
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(lines)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plan's blobs are bounded: an image naming more than [`MAX_PREHEAT_BLOBS`] distinct
    /// blobs is refused, not planned.
    #[test]
    fn a_plan_holds_at_most_so_many_blobs() {
        let manifest = |from: usize, n: usize| {
            let layer = |i: usize| {
                let d = Digest::of(shoal_registry::Algorithm::Sha256, &i.to_le_bytes());
                serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d.to_string(), "size": 1})
            };
            let config = layer(usize::MAX - from);
            let layers: Vec<_> = (from..from + n).map(layer).collect();
            let m = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config["digest"], "size": 1},
                "layers": layers});
            serde_json::to_vec(&m).unwrap()
        };
        let oci = "application/vnd.oci.image.manifest.v1+json";
        let mut digests = BTreeSet::new();
        add_blobs(&mut digests, oci, &manifest(0, MAX_PREHEAT_BLOBS / 2)).unwrap();
        assert_eq!(digests.len(), MAX_PREHEAT_BLOBS / 2 + 1);
        let err =
            add_blobs(&mut digests, oci, &manifest(MAX_PREHEAT_BLOBS, MAX_PREHEAT_BLOBS / 2)).unwrap_err();
        assert!(err.contains("more than"), "{err}");
    }

    /// An index's children are followed once each, for the platform asked, and at most
    /// [`MAX_PREHEAT_MANIFESTS`] of them: past that the preheat is refused, not run.
    #[test]
    fn an_index_has_so_many_children_followed_at_most() {
        let index = |digests: &[Digest]| {
            let manifests: Vec<_> = digests
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let arch = if i % 2 == 0 { "amd64" } else { "arm64" };
                    serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": d.to_string(), "size": 1, "platform": {"os": "linux", "architecture": arch}})
                })
                .collect();
            serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": manifests})).unwrap()
        };
        let digest = |i: usize| Digest::of(shoal_registry::Algorithm::Sha256, &i.to_le_bytes());
        let all: Vec<Digest> = (0..MAX_PREHEAT_MANIFESTS).map(digest).collect();
        assert_eq!(children_to_follow(&index(&all), None).unwrap(), all);
        let amd64 = children_to_follow(&index(&all), Some("linux/amd64")).unwrap();
        assert_eq!(amd64.len(), MAX_PREHEAT_MANIFESTS / 2);
        // One child named 35,000 times is one child.
        let same = vec![digest(7); 35_000];
        assert_eq!(children_to_follow(&index(&same), None).unwrap(), vec![digest(7)]);
        let over: Vec<Digest> = (0..=MAX_PREHEAT_MANIFESTS).map(digest).collect();
        let err = children_to_follow(&index(&over), None).unwrap_err();
        assert!(err.contains("more than 1024 manifests"), "{err}");
        // A platform the index does not have.
        assert!(children_to_follow(&index(&all), Some("linux/s390x")).unwrap_err().contains("no manifest"));
    }

    #[test]
    fn parses_image_references() {
        let (r, t) = parse_image("team/app:1.2").unwrap();
        assert_eq!(r.as_str(), "team/app");
        assert_eq!(t, Reference::Tag("1.2".parse().unwrap()));
        let (r, t) = parse_image("app").unwrap();
        assert_eq!(r.as_str(), "app");
        assert_eq!(t, Reference::Tag("latest".parse().unwrap()));
        let d = Digest::of(shoal_registry::Algorithm::Sha256, b"x");
        let (_, t) = parse_image(&format!("app@{d}")).unwrap();
        assert_eq!(t, Reference::Digest(d));
        assert!(parse_image("App:1").is_err());
    }
}
