//! A node's announces to the trackers, batched. Every download announces on its own schedule
//! (quickly at first, then every interval the tracker sets), and a node pulling an image's
//! layers runs many downloads at once; sent one request each, a node with 30 layers in flight
//! and 500 nodes pulling is 15,000 requests per interval at the tracker. Here every announce
//! of the node goes through one queue: when the queue's worker is free it sends what waits as
//! one batch per tracker ([`TrackerClient::announce_many`]), so an announce alone goes out at
//! once and announces that meet while a batch is out share the next one.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::tracker_client::{
    AnnounceRequest, AnnounceResponse, TrackerClient, TrackerError, MAX_ANNOUNCE_BATCH,
};

/// Announces waiting to be sent, at most; an announce past it waits for room.
pub const ANNOUNCE_QUEUE: usize = 4096;

/// Batches out at once. More than one, so a tracker that is slow to answer (up to the HTTP
/// timeout) holds back only the announces of its batch, not a new download's first announce.
pub const BATCHES_IN_FLIGHT: usize = 2;

struct Job {
    req: AnnounceRequest,
    reply: oneshot::Sender<Result<AnnounceResponse, TrackerError>>,
}

/// The node's announce queue; cheap to clone.
#[derive(Clone)]
pub struct Announcer {
    jobs: mpsc::Sender<Job>,
}

impl Announcer {
    /// Start the queue's worker on the current runtime; it ends when every clone is dropped.
    pub fn spawn(tracker: Arc<TrackerClient>) -> Announcer {
        let (jobs, rx) = mpsc::channel(ANNOUNCE_QUEUE);
        tokio::spawn(work(tracker, rx));
        Announcer { jobs }
    }

    /// Announce, in the node's next batch.
    pub async fn announce(&self, req: AnnounceRequest) -> Result<AnnounceResponse, TrackerError> {
        let (reply, answer) = oneshot::channel();
        if self.jobs.send(Job { req, reply }).await.is_err() {
            return Err(TrackerError::AllFailed("the announce queue is closed".into()));
        }
        answer.await.unwrap_or_else(|_| Err(TrackerError::AllFailed("the announce was dropped".into())))
    }
}

/// Take what waits (up to a batch), send it while a slot is free, hand out the answers.
async fn work(tracker: Arc<TrackerClient>, mut rx: mpsc::Receiver<Job>) {
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    loop {
        // Wait for a free slot first: what queues meanwhile goes out together.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let Some(first) = rx.recv().await else { return };
        let mut jobs = vec![first];
        while jobs.len() < MAX_ANNOUNCE_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let tracker = tracker.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let (reqs, replies): (Vec<_>, Vec<_>) = jobs.into_iter().map(|j| (j.req, j.reply)).unzip();
            let results = tracker.announce_many(&reqs).await;
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        });
    }
}
