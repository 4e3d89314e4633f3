//! Origins whose clocks disagree (libfaketime shifts one origin's wall clock): a later push
//! wins whatever the clocks say, an origin with a wrong clock acknowledges no write that
//! loses, and a push right after a `DELETE` through an origin ahead holds.

use super::*;

/// libfaketime, which shifts one process's wall clock (Debian package `faketime`).
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// `spec` with member `i`'s wall clock shifted by `offset` (libfaketime's syntax, `+5m`);
/// its timers keep the real monotonic clock.
fn skewed(spec: ClusterSpec, i: usize, offset: &str) -> ClusterSpec {
    assert!(
        std::path::Path::new(FAKETIME_LIB).exists(),
        "{FAKETIME_LIB} is missing: apt-get install faketime"
    );
    spec.member_env(i, "LD_PRELOAD", FAKETIME_LIB).member_env(i, "FAKETIME", offset).member_env(
        i,
        "FAKETIME_DONT_FAKE_MONOTONIC",
        "1",
    )
}

/// Clock skew: origin 1's wall clock runs 5 minutes ahead, origin 2's 3 seconds ahead
/// (libfaketime; timers keep the real monotonic clock). One tag is pushed again and again,
/// through each origin in turn, each push a new image. After every `201`, every origin serves
/// that push for the tag: a later push wins everywhere, whichever clock is ahead. The origin
/// minutes ahead may not write at all (its versions are refused as too far in the future); its
/// pushes then fail cleanly, and never win over a later one.
#[tokio::test(flavor = "multi_thread")]
async fn later_pushes_win_whatever_the_clocks_say() {
    skip_if_external!(SKIP);
    let spec = skewed(skewed(ClusterSpec::new(3), 1, "+5m"), 2, "+3s");
    let cluster = OriginCluster::start_cluster(spec).await;
    let repo = unique_repo("skew");
    let (mut acknowledged, mut refused) = (0, 0);
    for round in 0..12 {
        let origin = round % 3;
        let image = TestImage::random(&repo, "t", &[random_size(1024, 8 * KIB)]);
        match try_push_image(&cluster.client(origin), &image).await {
            Ok(()) => acknowledged += 1,
            Err(why) if origin == 1 => {
                refused += 1;
                println!("push {round} through origin 1 (5 min ahead) refused: {why}");
                continue;
            }
            Err(why) => cluster.fail(&format!("push {round} through origin {origin}: {why}")),
        }
        for reader in 0..3 {
            let reply = cluster.client(reader).get(&format!("/v2/{repo}/manifests/t")).try_reply().await;
            let served =
                reply.as_ref().ok().and_then(|r| r.header("docker-content-digest")).map(str::to_string);
            if served.as_deref() != Some(image.manifest_digest()) {
                cluster.fail(&format!(
                    "after push {round} through origin {origin}, origin {reader} serves {served:?} for the tag, not {}",
                    image.manifest_digest()
                ));
            }
        }
    }
    println!("{acknowledged} pushes acknowledged, {refused} refused");
    assert!(acknowledged >= 8, "the origins with sane clocks took every push");
    let skew = cluster.metric_sum(&[0], "shoal_origin_clock_skew_seconds").await;
    assert!(skew >= 250.0, "origin 0 reports the 5-minute skew: {skew}");
}

/// A blob deleted through an origin whose clock runs 3 s ahead, then pushed again at once
/// through an origin with a sane clock, mounted into a second repository deleted the same
/// way, and a manifest deleted and put again the same way: each `201` must hold, through
/// every origin. The new records were versioned by their own origin's clock alone, older
/// than the tombstones, and lost to them (201, then 404); each write now reads the records it
/// replaces first, and its versions follow what it read.
#[tokio::test(flavor = "multi_thread")]
async fn a_push_right_after_a_delete_through_a_clock_ahead_holds() {
    skip_if_external!(SKIP);
    let cluster = OriginCluster::start_cluster(skewed(ClusterSpec::new(3), 2, "+3s")).await;
    let (repo, other) = (unique_repo("relink"), unique_repo("remount"));
    let found_everywhere = |repo: &str, digest: &str, step: &str| {
        let (cluster, path, step) = (&cluster, format!("/v2/{repo}/blobs/{digest}"), step.to_string());
        async move {
            for reader in 0..3 {
                let status = cluster.client(reader).head(&path).try_reply().await.map(|r| r.status);
                if status.as_ref().ok() != Some(&StatusCode::OK) {
                    cluster.fail(&format!("{step}: origin {reader} answers {status:?} for {path}"));
                }
            }
        }
    };
    for round in 0..5 {
        let blob = Blob::random_layer(oci::OCI_LAYER, 4 * KIB);
        let digest = blob.digest.to_string();
        cluster.check(try_push_blob(&cluster.client(0), &repo, &blob).await, "first push");
        cluster.check(try_push_blob(&cluster.client(0), &other, &blob).await, "push to the other");
        for r in [&repo, &other] {
            let deleted = cluster.client(2).delete(&format!("/v2/{r}/blobs/{digest}")).try_reply().await;
            assert_eq!(
                deleted.map(|r| r.status).ok(),
                Some(StatusCode::ACCEPTED),
                "round {round}: delete in {r}"
            );
        }
        cluster.check(try_push_blob(&cluster.client(0), &repo, &blob).await, "push after the delete");
        found_everywhere(&repo, &digest, &format!("round {round}, pushed again")).await;
        let mounted = cluster
            .client(1)
            .post(&format!("/v2/{other}/blobs/uploads/?mount={digest}&from={repo}"))
            .try_reply()
            .await;
        assert_eq!(mounted.map(|r| r.status).ok(), Some(StatusCode::CREATED), "round {round}: mount");
        found_everywhere(&other, &digest, &format!("round {round}, mounted again")).await;
        let image = TestImage::random(&repo, "t", &[4 * KIB]);
        cluster.check(try_push_image(&cluster.client(0), &image).await, "image push");
        let manifest = format!("/v2/{repo}/manifests/{}", image.manifest_digest());
        let deleted = cluster.client(2).delete(&manifest).try_reply().await;
        assert_eq!(
            deleted.map(|r| r.status).ok(),
            Some(StatusCode::ACCEPTED),
            "round {round}: manifest delete"
        );
        // Put again by digest: a tag's tombstone, read by a put under the tag, would move the
        // clock past the others anyway.
        let put = cluster
            .client(0)
            .put(&manifest)
            .header("content-type", image.image.manifest.media_type.as_str())
            .body(image.image.manifest.bytes.clone())
            .try_reply()
            .await;
        assert_eq!(
            put.map(|r| r.status).ok(),
            Some(StatusCode::CREATED),
            "round {round}: manifest put again"
        );
        for reader in 0..3 {
            let status = cluster.client(reader).get(&manifest).try_reply().await.map(|r| r.status);
            if status.as_ref().ok() != Some(&StatusCode::OK) {
                cluster
                    .fail(&format!("round {round}, manifest put again: origin {reader} answers {status:?}"));
            }
        }
    }
}

/// A re-tag through an origin whose clock is 5 minutes off, ahead and then behind, in a
/// repository that origin owns. Ahead, the other owners refuse its versions; behind, its
/// versions are older than the tag it replaces. Either way it must not answer `201` for a
/// write that loses, nor keep a copy of a refused one that wins reads over the later pushes
/// of the origins with sane clocks. It refuses the write (it sees that its clock disagrees
/// with both others'), and every origin serves what was acknowledged.
#[tokio::test(flavor = "multi_thread")]
async fn an_origin_with_a_wrong_clock_acknowledges_no_write_that_loses() {
    skip_if_external!(SKIP);
    for offset in ["+5m", "-5m"] {
        let cluster = OriginCluster::start_cluster(skewed(ClusterSpec::new(3), 1, offset)).await;
        let repo = std::iter::repeat_with(|| unique_repo("wrong-clock"))
            .find(|repo| cluster.owners(repo, &[0, 1, 2]).contains(&1))
            .expect("some repository is owned by origin 1");
        // Origin 1 has measured the others' clocks (health replies every few hundred ms).
        let measured = Instant::now();
        while cluster.metric_sum(&[1], "shoal_origin_clock_skew_seconds").await < 250.0 {
            assert!(measured.elapsed() < Duration::from_secs(30), "origin 1 never measured the skew");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let first = TestImage::random(&repo, "t", &[random_size(1024, 8 * KIB)]);
        cluster.check(try_push_image(&cluster.client(0), &first).await, "push through origin 0");
        let retag = TestImage::random(&repo, "t", &[random_size(1024, 8 * KIB)]);
        for blob in retag.blobs() {
            cluster.check(try_push_blob(&cluster.client(0), &repo, blob).await, "blob through origin 0");
        }
        let through_odd = try_put_manifest(&cluster.client(1), &retag).await;
        println!("re-tag through origin 1 ({offset}): {through_odd:?}");
        let serves_everywhere = |step: &'static str, expected: String| {
            let (cluster, repo, through_odd) = (&cluster, &repo, &through_odd);
            async move {
                for reader in 0..3 {
                    let reply =
                        cluster.client(reader).get(&format!("/v2/{repo}/manifests/t")).try_reply().await;
                    let served = reply
                        .as_ref()
                        .ok()
                        .and_then(|r| r.header("docker-content-digest"))
                        .map(str::to_string);
                    if served.as_deref() != Some(expected.as_str()) {
                        cluster.fail(&format!(
                            "clock {offset}: after the {step}, origin {reader} serves {served:?} for the tag, not {expected} (re-tag: {through_odd:?})"
                        ));
                    }
                }
            }
        };
        let expected = if through_odd.is_ok() { &retag } else { &first };
        serves_everywhere("re-tag through origin 1", expected.manifest_digest().to_string()).await;
        let last = TestImage::random(&repo, "t", &[random_size(1024, 8 * KIB)]);
        cluster.check(try_push_image(&cluster.client(2), &last).await, "push through origin 2");
        serves_everywhere("later push through origin 2", last.manifest_digest().to_string()).await;
        if through_odd.is_ok() {
            cluster.fail(&format!("clock {offset}: origin 1 acknowledged a write that lost"));
        }
    }
}
