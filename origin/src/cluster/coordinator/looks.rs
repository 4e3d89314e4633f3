//! The looks an upload takes at the copies it placed ([`Coordinator::replicate_blob`]): a
//! copy counted at the start of a long placement can go meanwhile (garbage collection sets an
//! owner's old copy aside), so every copy is looked at again, and one gone is sent again.

use std::time::Instant;

use futures_util::future::join_all;
use shoal_registry::Digest;

use super::{open_file, Coordinator, Placed};
use crate::cluster::node::Node as _;

/// How many times an upload looks at the copies it placed, at most (see
/// [`Coordinator::replicate_blob`]): each look after the first follows a copy sent again,
/// and the last sends nothing.
const LOOKS_AFTER_PLACING: usize = 3;

/// What one look at a placed copy found (see [`Coordinator::replicate_blob`]).
enum Look {
    Held,
    /// It had gone, and was sent again.
    SentAgain,
    /// The origin did not answer: whether it holds the copy is not known.
    Unknown(String),
    /// It had gone and was not sent again (why).
    Gone(String),
}

impl Coordinator {
    /// Look at every copy `placed` counts, all at once. A copy that went is sent again from
    /// this origin's copy (brought back first if GC set it aside), and then every copy is
    /// looked at again (that send may have been long); the last of the
    /// [`LOOKS_AFTER_PLACING`] looks sends nothing, so the instant returned (when the last
    /// look started) is after every send. A copy gone that cannot be sent again is no longer
    /// counted; one that cannot be looked at (a timeout) still is, and is queued for repair
    /// (this origin keeps its own copy meanwhile). If GC set it aside, GC's last mark sees
    /// the upload's link and brings it back; if the upload fails, it was garbage.
    pub(super) async fn look_again(&self, digest: &Digest, size: u64, placed: &mut Placed) -> Instant {
        let path = self.local.store().blob_path(digest);
        let mut seen_at = Instant::now();
        for look in 1..=LOOKS_AFTER_PLACING {
            seen_at = Instant::now();
            let may_send = look < LOOKS_AFTER_PLACING;
            let looks = join_all(placed.ok.iter().map(|id| {
                let path = &path;
                async move { (id.clone(), self.look_at_copy(id, digest, size, path, may_send).await) }
            }))
            .await;
            let mut sent_again = false;
            for (id, look) in looks {
                match look {
                    Look::Held => {}
                    Look::SentAgain => sent_again = true,
                    Look::Unknown(e) => {
                        tracing::warn!(origin = %id, %digest, error = %e, "a copy counted as placed could not be looked at again; left to repair");
                        placed.all_owners = false;
                    }
                    Look::Gone(why) => {
                        tracing::warn!(origin = %id, %digest, %why, "a copy counted as placed went");
                        placed.ok.retain(|o| o != &id);
                        placed.all_owners = false;
                        placed.last_error = Some(why);
                    }
                }
            }
            if !sent_again {
                break;
            }
        }
        seen_at
    }

    /// One look of [`look_again`](Self::look_again) at the copy on `id`.
    async fn look_at_copy(
        &self,
        id: &str,
        digest: &Digest,
        size: u64,
        path: &std::path::Path,
        may_send: bool,
    ) -> Look {
        let Some(node) = self.node(id) else { return Look::Gone(format!("{id} is no longer a member")) };
        match node.blob_stat(digest).await {
            Ok(Some(_)) => return Look::Held,
            Err(e) => return Look::Unknown(e.to_string()),
            Ok(None) => {}
        }
        if id == self.me() {
            return Look::Gone(format!("this origin's copy of {digest} went while it was being placed"));
        }
        if !may_send || !self.topology.accepts_writes(id) {
            return Look::Gone(format!("the copy of {digest} on {id} went while the blob was being placed"));
        }
        // The source: this origin's copy, brought back if GC set it aside meanwhile.
        if !matches!(self.local.blob_stat(digest).await, Ok(Some(_))) {
            return Look::Gone(format!("the copy of {digest} on {id} went, and this origin's too"));
        }
        let sent = match open_file(path, size).await {
            Ok(body) => node.blob_put(digest, size, body).await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => Look::SentAgain,
            Err(e) => {
                Look::Gone(format!("the copy of {digest} on {id} went and could not be sent again: {e}"))
            }
        }
    }
}
