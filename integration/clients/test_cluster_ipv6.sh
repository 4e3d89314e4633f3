#!/usr/bin/env bash
# The origin cluster over IPv6 only: three origins on [::1], R = 2, their ids IPv6 literals.
# An image is pushed into origin 0; every origin serves the same manifest and blobs,
# every config and layer is a file on exactly two origins, and the members all see each
# other up (health checks over IPv6).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
lib_init cluster_ipv6
require_shoal_under_test
python3 -c 'import socket; s=socket.socket(socket.AF_INET6); s.bind(("::1", 0))' 2>/dev/null ||
  die "this machine has no IPv6 loopback (::1)"

OC_HOST='[::1]' start_origin_cluster 3 2
log "members: $OC_LIST"

src=$T/src
want=$(oci_random_image "$src" v1 2M,1K,300K)
# Docker references cannot name an IPv6 literal (skopeo refuses docker://[::1]:port/...), so
# the image is pushed with curl, one monolithic upload per blob, then the manifest.
manifest=$src/blobs/sha256/${want#sha256:}
for b in $(jq -r '.config.digest, .layers[].digest' "$manifest"); do
  code=$(curl -sS -o "$T/put" -w '%{http_code}' --max-time 60 -H 'Expect:' -H 'Content-Type: application/octet-stream' \
    --data-binary "@$src/blobs/sha256/${b#sha256:}" "${OC_URLS[0]}/v2/v6/app/blobs/uploads/?digest=$b")
  [[ $code == 201 ]] || die "blob $b into origin 0 over IPv6: $code $(cat "$T/put")"
done
code=$(curl -sS -o "$T/put" -w '%{http_code}' --max-time 60 -X PUT \
  -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' --data-binary "@$manifest" \
  "${OC_URLS[0]}/v2/v6/app/manifests/v1")
[[ $code == 201 ]] || die "manifest into origin 0 over IPv6: $code $(cat "$T/put")"
for i in 0 1 2; do
  curl -sf --max-time 10 -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "${OC_URLS[i]}/v2/v6/app/manifests/v1" >"$T/m$i" || die "manifest through origin $i failed"
  assert_eq "$want" "$(sha256_of "$T/m$i")" "manifest through origin $i"
  for b in $(jq -r '.config.digest, .layers[].digest' "$T/m$i"); do
    got=$(curl -sf --max-time 30 "${OC_URLS[i]}/v2/v6/app/blobs/$b" | sha256sum | cut -d' ' -f1)
    assert_eq "${b#sha256:}" "$got" "blob $b through origin $i"
  done
done
for b in $(jq -r '.config.digest, .layers[].digest' "$T/m0"); do
  assert_eq 2 "$(oc_blob_copies "$b")" "copies of $b"
done
log "IPv6 cluster: image served by every origin, every blob on exactly two"
