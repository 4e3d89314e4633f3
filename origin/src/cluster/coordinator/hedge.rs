//! Asking a write's other owners, with a fallback origin asked beside each one that is slow.
//! An owner that answers every call, but late (a stalled fsync, an exhausted blocking pool),
//! passes its health checks, which are answered from memory, so it stays an owner; a write
//! that waited for it (up to `call_timeout`) missed garbage collection's read-to-write
//! deadline, and every push, mount and link of its repositories failed with "checked too
//! long ago" while the next origin in the ranking was never asked. Records only: they are a
//! few KiB, so a second copy costs nothing, and repair hands it back once the owner catches up.

use std::future::Future;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};

use super::Answer;
use crate::cluster::node::NodeError;

/// How long a write waits for an owner before it asks a fallback origin as well: far above a
/// healthy origin's commit (milliseconds), well inside the read-to-write deadline (5 s).
pub const HEDGE_AFTER: Duration = Duration::from_millis(1000);

/// What [`ask_owners`] gathered.
pub(super) struct Asked {
    /// Each owner's answer; an owner left waiting (a fallback took its copy) as a failure.
    pub owners: Vec<Answer<()>>,
    /// The fallbacks asked beside slow owners, and their answers (one asked but cut short
    /// has none).
    pub hedges: Vec<Answer<()>>,
    /// Every fallback asked, answered or not: not asked again.
    pub asked: Vec<String>,
}

/// Ask every one of `owners` with `attempt`; with `hedge_after`, once it has passed, ask the
/// next of `fallbacks` beside each owner still to answer, and stop waiting for owners once as
/// many fallbacks have taken the write as owners are left waiting. Fallbacks asked are
/// waited for while an owner has failed (they stand for it, as the caller's fallback would).
pub(super) async fn ask_owners<A, Fut>(
    owners: &[String],
    fallbacks: &[String],
    hedge_after: Option<Duration>,
    attempt: A,
) -> Asked
where
    A: Fn(&String) -> Fut,
    Fut: Future<Output = Answer<()>>,
{
    let mut pending = FuturesUnordered::new();
    for id in owners {
        pending.push(tagged(false, attempt(id)));
    }
    // Without hedging the timer is never polled (`hedged` starts true).
    let timer = tokio::time::sleep(hedge_after.unwrap_or(Duration::ZERO));
    tokio::pin!(timer);
    let mut hedged = hedge_after.is_none();
    let mut fallbacks = fallbacks.iter();
    let mut gathered = Asked { owners: Vec::new(), hedges: Vec::new(), asked: Vec::new() };
    loop {
        let waiting = owners.len() - gathered.owners.len();
        let failed = gathered.owners.iter().filter(|(_, a)| a.is_err()).count();
        let covered = gathered.hedges.iter().filter(|(_, a)| a.is_ok()).count();
        let hedges_pending = gathered.asked.len() - gathered.hedges.len();
        // Everything that needs a copy elsewhere has one; or nothing more can come but
        // fallbacks no owner needs (a failed owner is the caller's to fall back for).
        if waiting + failed <= covered || (waiting <= covered && hedges_pending == 0) {
            break;
        }
        tokio::select! {
            answer = pending.next() => match answer {
                Some((false, answer)) => gathered.owners.push(answer),
                Some((true, answer)) => gathered.hedges.push(answer),
                None => break,
            },
            _ = &mut timer, if !hedged => {
                hedged = true;
                for id in fallbacks.by_ref().take(waiting) {
                    gathered.asked.push(id.clone());
                    pending.push(tagged(true, attempt(id)));
                }
            }
        }
    }
    let answered: Vec<String> = gathered.owners.iter().map(|(id, _)| id.clone()).collect();
    for id in owners.iter().filter(|id| !answered.contains(id)) {
        let reason = "slow to answer: a fallback origin took its copy".to_string();
        gathered.owners.push((id.clone(), Err(NodeError::Unreachable { node: id.clone(), reason })));
    }
    gathered
}

/// `call`'s answer, told apart as a fallback's (`hedge`) or an owner's.
async fn tagged<Fut: Future<Output = Answer<()>>>(hedge: bool, call: Fut) -> (bool, Answer<()>) {
    (hedge, call.await)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls that answer after `delays` (ms by id), `Ok` unless the id starts with `x`.
    fn attempt(
        delays: &[(&str, u64)],
    ) -> impl Fn(&String) -> futures_util::future::BoxFuture<'static, Answer<()>> {
        let delays: Vec<(String, u64)> = delays.iter().map(|(id, ms)| (id.to_string(), *ms)).collect();
        move |id: &String| {
            let ms = delays.iter().find(|(d, _)| d == id).map_or(0, |(_, ms)| *ms);
            let id = id.clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let result = if id.starts_with('x') {
                    Err(NodeError::Unreachable { node: id.clone(), reason: "refused".into() })
                } else {
                    Ok(())
                };
                (id, result)
            })
        }
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn owners_that_answer_in_time_are_all_there_is() {
        let started = tokio::time::Instant::now();
        let asked =
            ask_owners(&ids(&["a", "b"]), &ids(&["c"]), Some(HEDGE_AFTER), attempt(&[("a", 5), ("b", 900)]))
                .await;
        assert!(asked.owners.iter().all(|(_, a)| a.is_ok()));
        assert!(asked.hedges.is_empty() && asked.asked.is_empty());
        assert_eq!(started.elapsed(), Duration::from_millis(900));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_owner_has_a_fallback_asked_and_is_not_waited_for() {
        let started = tokio::time::Instant::now();
        let calls = attempt(&[("a", 5), ("slow", 4_000), ("c", 10)]);
        let asked = ask_owners(&ids(&["a", "slow"]), &ids(&["c", "d"]), Some(HEDGE_AFTER), calls).await;
        assert_eq!(started.elapsed(), HEDGE_AFTER + Duration::from_millis(10));
        assert_eq!(asked.asked, ids(&["c"]));
        assert!(asked.hedges.iter().all(|(id, a)| id == "c" && a.is_ok()));
        let slow = asked.owners.iter().find(|(id, _)| id == "slow").unwrap();
        assert!(slow.1.is_err(), "the slow owner counts as not having the copy");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_fallback_leaves_the_slow_owner_waited_for() {
        let calls = attempt(&[("slow", 3_000), ("x-c", 10)]);
        let asked = ask_owners(&ids(&["slow"]), &ids(&["x-c"]), Some(HEDGE_AFTER), calls).await;
        assert!(asked.owners.iter().all(|(id, a)| id == "slow" && a.is_ok()));
        assert!(asked.hedges.iter().all(|(_, a)| a.is_err()));
    }

    /// An owner that fails after its fallback was asked: the fallback's answer still counts.
    #[tokio::test(start_paused = true)]
    async fn a_fallback_asked_for_an_owner_that_then_failed_is_waited_for() {
        let calls = attempt(&[("x-slow", 1_020), ("c", 50)]);
        let asked = ask_owners(&ids(&["x-slow"]), &ids(&["c"]), Some(HEDGE_AFTER), calls).await;
        assert!(asked.owners.iter().all(|(id, a)| id == "x-slow" && a.is_err()));
        assert_eq!(asked.hedges.len(), 1);
        assert!(asked.hedges.iter().all(|(id, a)| id == "c" && a.is_ok()));
    }

    #[tokio::test(start_paused = true)]
    async fn without_hedging_every_owner_is_waited_for() {
        let started = tokio::time::Instant::now();
        let asked = ask_owners(&ids(&["a", "slow"]), &ids(&["c"]), None, attempt(&[("slow", 4_000)])).await;
        assert_eq!(started.elapsed(), Duration::from_millis(4_000));
        assert!(asked.asked.is_empty() && asked.owners.iter().all(|(_, a)| a.is_ok()));
    }
}
