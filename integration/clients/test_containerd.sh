#!/usr/bin/env bash
# containerd (ctr) pulls images pushed by skopeo: an OCI image with plain-tar layers, the
# same converted to Docker schema 2 with gzip layers, and a pull by digest. Checks the
# digest containerd records, that every blob arrived, and runs the unpacked busybox.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
lib_init containerd

start_registry_under_test
start_containerd

src=$T/src
oci_digest=$(oci_busybox_image "$src" v1)
oci_random_image "$src" big 8M,3M >/dev/null

skopeo_ copy -q --dest-tls-verify=false --preserve-digests "oci:$src:v1" "docker://$REG/ctr/busybox:oci" ||
  die "skopeo push (oci) failed"
skopeo_ copy -q --dest-tls-verify=false --preserve-digests "oci:$src:big" "docker://$REG/ctr/random:big" ||
  die "skopeo push (random) failed"
# Docker schema 2 with gzip layers: what most registries hold. skopeo converts and compresses.
skopeo_ copy -q --dest-tls-verify=false --format v2s2 --dest-compress-format gzip \
  "oci:$src:v1" "docker://$REG/ctr/busybox:v2s2" || die "skopeo push (v2s2) failed"
skopeo_ inspect --raw --tls-verify=false "docker://$REG/ctr/busybox:v2s2" >"$T/v2s2.json"
v2s2_digest=$(sha256_of "$T/v2s2.json")
assert_eq "application/vnd.docker.distribution.manifest.v2+json" "$(jq -r .mediaType "$T/v2s2.json")" "v2s2 mediaType"

# ctr_pull_check REF EXPECTED_DIGEST: pull, check the recorded digest, completeness and blobs.
ctr_pull_check() {
  local ref=$1 want=$2 name
  log "ctr pull $ref"
  ctr_ images pull --plain-http "$ref" >"$T/pull.out" 2>&1 || {
    cat "$T/pull.out" >&2
    die "ctr images pull $ref failed"
  }
  name=$ref
  got=$(ctr_ images ls | awk -v r="$name" '$1==r {print $3}')
  assert_eq "$want" "$got" "digest of $ref in ctr images ls"
  ctr_ images check | awk -v r="$name" '$1==r' | grep -q complete ||
    die "ctr images check: $ref not complete: $(ctr_ images check)"
  ctr_ content ls -q >"$T/content"
  local m=$T/manifest.json
  ctr_ content get "$want" >"$m"
  for d in "$want" $(jq -r '.config.digest, .layers[].digest' "$m"); do
    grep -qx "$d" "$T/content" || die "$ref: blob $d missing from the content store"
    assert_eq "$d" "$(ctr_ content get "$d" | sha256sum | sed 's/^/sha256:/; s/ .*//')" "$ref: stored blob content"
  done
}

ctr_pull_check "$REG/ctr/busybox:oci" "$oci_digest"
ctr_pull_check "$REG/ctr/busybox:v2s2" "$v2s2_digest"
ctr_pull_check "$REG/ctr/random:big" "$(jq -r '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"]=="big") | .digest' "$src/index.json")"
ctr_pull_check "$REG/ctr/busybox@$oci_digest" "$oci_digest"

# The unpacked image must run (ctr run gives it an empty network namespace).
for r in "$REG/ctr/busybox:oci" "$REG/ctr/busybox:v2s2"; do
  out=$(ctr_ run --rm "$r" "it-$RANDOM" /bin/sh -c 'echo ok') || die "ctr run $r failed"
  assert_eq ok "$out" "output of ctr run $r"
done

log "PASS"
