#!/usr/bin/env bash
# Origin cluster with a real client: three origins on loopback, R = 2. skopeo pushes an OCI
# image with random layers (--preserve-digests) into origin 0; `skopeo inspect --raw` through
# origins 1 and 2 returns the very manifest bytes, `skopeo copy` out of each returns the same
# blobs (re-hashed on disk), tags/list agrees everywhere, and every config and layer is a file
# on exactly two origins (manifests live in the metadata database, not as files).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
lib_init cluster_skopeo
require_shoal_under_test

start_origin_cluster 3 2

src=$T/src
want=$(oci_random_image "$src" v1 3M,1K,12345,9M)
log "built $src:v1 = $want"

log "skopeo copy oci:$src:v1 -> docker://${OC_IDS[0]}/cluster/random:v1"
skopeo_ copy -q --dest-tls-verify=false --preserve-digests "oci:$src:v1" "docker://${OC_IDS[0]}/cluster/random:v1" ||
  die "skopeo copy into origin 0 failed"

for i in 1 2; do
  ref=docker://${OC_IDS[i]}/cluster/random:v1
  skopeo_ inspect --tls-verify=false --raw "$ref" >"$T/raw$i.json" || die "skopeo inspect --raw through origin $i failed"
  cmp -s "$T/raw$i.json" "$src/blobs/sha256/${want#sha256:}" || die "origin $i: inspect --raw differs from the pushed manifest"

  back=$T/back$i
  skopeo_ copy -q --src-tls-verify=false --preserve-digests "$ref" "oci:$back:v1" ||
    die "skopeo copy out of origin $i failed"
  got=$(jq -r '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"]=="v1") | .digest' "$back/index.json")
  assert_eq "$want" "$got" "manifest digest copied out of origin $i"
  diff <(layout_blobs "$src") <(layout_blobs "$back") >&2 || die "origin $i: blob sets differ (< pushed, > pulled)"
  for b in $(layout_blobs "$back"); do
    assert_eq "$b" "$(sha256_of "$back/blobs/sha256/${b#sha256:}")" "content of a blob copied out of origin $i"
  done
  log "origin $i: manifest $want and $(layout_blobs "$back" | wc -l) blobs identical"
done

for i in 0 1 2; do
  tags=$(curl -sf "${OC_URLS[i]}/v2/cluster/random/tags/list" | jq -r '.tags | sort | join(",")')
  assert_eq "v1" "$tags" "tags/list of cluster/random through origin $i"
done

for b in $(layout_blobs "$src"); do
  [[ $b == "$want" ]] && continue
  assert_eq 2 "$(oc_blob_copies "$b")" "copies of blob $b on the origins' disks"
done
log "PASS"
