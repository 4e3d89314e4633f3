#!/usr/bin/env bash
# containerd uses a Shoal agent as a registry mirror, the way nodes are set up in
# production: images are pushed to the origin, and `ctr images pull --hosts-dir` names the
# origin but may only reach the agent (hosts.toml points the origin's own server at a
# closed port). Checks that the agent answered (its log shows containerd's ?ns=<origin>
# query, its request counter grows), the digest containerd records, every blob's content,
# that the image runs, and a multi-arch index pulled for one platform and for all.
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
lib_init agent_containerd
require_shoal_under_test

start_shoal_cluster 1
start_containerd

src=$T/src
bb_digest=$(oci_busybox_image "$src" v1)
index=$(oci_multiarch_image "$src" multi)
skopeo_ copy -q --dest-tls-verify=false --preserve-digests "oci:$src:v1" "docker://$ORIGIN/mirror/busybox:v1" ||
  die "skopeo push of busybox to the origin failed"
skopeo_ copy -q --all --dest-tls-verify=false --preserve-digests "oci:$src:multi" "docker://$ORIGIN/mirror/multi:v1" ||
  die "skopeo push of the multi-arch index to the origin failed"
log "pushed busybox $bb_digest and index $index to the origin $ORIGIN"

hosts=$T/hosts.d
ctr_hosts_dir "$hosts" "$ORIGIN" "$AGENT_URL"
log "hosts.toml: $(tr '\n' ' ' <"$hosts/$ORIGIN/hosts.toml")"

# ctr_mirror_pull NS REF [ctr pull flags...]: pull REF (named after the origin) through the mirror.
ctr_mirror_pull() {
  local ns=$1 ref=$2
  shift 2
  log "ctr -n $ns pull --hosts-dir $hosts --plain-http $* $ref"
  ctr_ -n "$ns" images pull --hosts-dir "$hosts" --plain-http "$@" "$ref" >"$T/pull-$ns.out" 2>&1 || {
    cat "$T/pull-$ns.out" >&2
    die "ctr images pull $ref through the agent failed"
  }
}

# manifest_blobs LAYOUT MANIFEST_DIGEST: the manifest, its config and layers.
manifest_blobs() {
  local m=$1/blobs/sha256/${2#sha256:}
  echo "$2"
  jq -r '.config.digest, .layers[].digest' "$m"
}

# check_content NS DIGEST...: each blob is in NS's content store with the right bytes.
check_content() {
  local ns=$1 d
  shift
  ctr_ -n "$ns" content ls -q | sort >"$T/content-$ns"
  for d in "$@"; do
    grep -qx "$d" "$T/content-$ns" || die "namespace $ns: blob $d missing from the content store"
    assert_eq "$d" "$(ctr_ -n "$ns" content get "$d" | sha256sum | sed 's/^/sha256:/; s/ .*//')" "namespace $ns: content of $d"
  done
}

# --- a single-platform image, by tag --------------------------------------------------
req0=$(agent_requests "$AGENT_URL")
ref=$ORIGIN/mirror/busybox:v1
ctr_mirror_pull bb "$ref"
assert_eq "$bb_digest" "$(ctr_ -n bb images ls | awk -v r="$ref" '$1==r {print $3}')" "digest of $ref in ctr images ls"
ctr_ -n bb images check | awk -v r="$ref" '$1==r' | grep -q complete || die "ctr images check: $ref not complete"
mapfile -t bb_blobs < <(manifest_blobs "$src" "$bb_digest")
check_content bb "${bb_blobs[@]}"

# The agent, not the origin, answered containerd: its log has every request with the
# ?ns=<origin> query containerd adds for mirrors (the colon may come percent-encoded).
origin_host=${ORIGIN%:*}
ns_re="ns=${origin_host//./\\.}(:|%3A|%3a)${ORIGIN##*:}"
grep -Eq "path=/v2/mirror/busybox/manifests/v1\?$ns_re status=200" "$AGENT_LOG" ||
  die "agent log has no GET/HEAD of mirror/busybox/manifests/v1?ns=$ORIGIN with status 200: $(grep -F /v2/mirror/busybox "$AGENT_LOG" | head -n 5)"
for d in "${bb_blobs[@]:1}"; do
  grep -Eq "method=GET path=/v2/mirror/busybox/blobs/$d\?$ns_re status=200" "$AGENT_LOG" ||
    die "agent log has no GET of blob $d with ?ns=$ORIGIN"
done
req1=$(agent_requests "$AGENT_URL")
((req1 >= req0 + 1 + ${#bb_blobs[@]})) ||
  die "shoal_agent_http_requests_total grew by $((req1 - req0)); want at least $((1 + ${#bb_blobs[@]})) (resolve + manifest + blobs)"
log "agent answered $((req1 - req0)) requests for the busybox pull"

# It runs (ctr run gives it an empty network namespace).
assert_eq ok "$(ctr_ -n bb run --rm "$ref" "it-$RANDOM" /bin/sh -c 'echo ok')" "output of ctr run $ref"

# The same image by digest.
ctr_mirror_pull bbd "$ORIGIN/mirror/busybox@$bb_digest"
check_content bbd "${bb_blobs[@]}"

# --- a multi-arch index -------------------------------------------------------------
idx_file=$src/blobs/sha256/${index#sha256:}
amd=$(jq -r '.manifests[] | select(.platform.architecture=="amd64") | .digest' "$idx_file")
arm=$(jq -r '.manifests[] | select(.platform.architecture=="arm64") | .digest' "$idx_file")
mref=$ORIGIN/mirror/multi:v1

ctr_mirror_pull arm "$mref" --platform linux/arm64
assert_eq "$index" "$(ctr_ -n arm images ls 2>/dev/null | awk -v r="$mref" '$1==r {print $3}')" "digest of $mref (arm64 pull)"
mapfile -t arm_blobs < <(manifest_blobs "$src" "$arm")
check_content arm "$index" "${arm_blobs[@]}"
amd_layer=$(jq -r '.layers[0].digest' "$src/blobs/sha256/${amd#sha256:}")
if grep -qx "$amd_layer" "$T/content-arm"; then die "arm64-only pull fetched the amd64 layer $amd_layer"; fi
grep -Eq "path=/v2/mirror/multi/manifests/v1\?$ns_re status=200" "$AGENT_LOG" ||
  die "agent log has no request of mirror/multi/manifests/v1?ns=$ORIGIN"

ctr_mirror_pull all "$mref" --all-platforms
ctr_ -n all images ls >"$T/ls-all"
assert_eq "$index" "$(awk -v r="$mref" '$1==r {print $3}' "$T/ls-all")" "digest of $mref (all platforms)"
grep -F "$mref" "$T/ls-all" | grep -q 'linux/amd64' || die "ctr images ls does not list linux/amd64: $(cat "$T/ls-all")"
grep -F "$mref" "$T/ls-all" | grep -q 'linux/arm64' || die "ctr images ls does not list linux/arm64: $(cat "$T/ls-all")"
mapfile -t amd_blobs < <(manifest_blobs "$src" "$amd")
check_content all "$index" "${arm_blobs[@]}" "${amd_blobs[@]}"
# The amd64 half is busybox: it runs.
assert_eq ok "$(ctr_ -n all run --rm --platform linux/amd64 "$mref" "it-$RANDOM" /bin/sh -c 'echo ok')" "output of ctr run $mref"

log "agent answered $(($(agent_requests "$AGENT_URL") - req0)) requests in all; received $(agent_received "$AGENT_URL") piece bytes"
log "PASS"
