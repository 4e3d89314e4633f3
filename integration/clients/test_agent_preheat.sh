#!/usr/bin/env bash
# POST /v1/preheat on a Shoal agent: the NDJSON progress stream (plan, one blob_done per
# blob, done), and that a pull after it is served from the agent's cache: skopeo copying
# the image out of the agent and curl of each blob leave shoal_agent_received_bytes_total
# where the preheat left it. Then a multi-arch index preheated for linux/arm64 only (the
# amd64 blobs must still be missing), and the failure cases (unknown image, bad reference).
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
lib_init agent_preheat
require_shoal_under_test

start_shoal_cluster 1

src=$T/src
want=$(oci_random_image "$src" v1 6M,3M)
index=$(oci_multiarch_image "$src" multi)
skopeo_ copy -q --dest-tls-verify=false --preserve-digests "oci:$src:v1" "docker://$ORIGIN/pre/random:v1" ||
  die "skopeo push of the random image to the origin failed"
skopeo_ copy -q --all --dest-tls-verify=false --preserve-digests "oci:$src:multi" "docker://$ORIGIN/pre/multi:v1" ||
  die "skopeo push of the multi-arch index to the origin failed"
log "pushed pre/random:v1 = $want and pre/multi:v1 = $index to the origin"

blob_file() { echo "$src/blobs/sha256/${1#sha256:}"; }
# image_blobs MANIFEST_DIGEST: config and layers, sorted.
image_blobs() { jq -r '.config.digest, .layers[].digest' "$(blob_file "$1")" | sort; }
# bytes_of DIGEST...: their total size on disk in the layout.
bytes_of() {
  local d n=0
  for d in "$@"; do n=$((n + $(stat -c %s "$(blob_file "$d")"))); done
  echo "$n"
}

# check_preheat NDJSON BLOBS...: the stream is plan, one blob_done per blob (any order), done.
check_preheat() {
  local out=$1 n bytes
  shift
  n=$#
  bytes=$(bytes_of "$@")
  jq -e . "$out" >/dev/null || die "preheat answer is not JSON lines: $(cat "$out")"
  assert_eq "done" "$(tail -n 1 "$out" | jq -r .event)" "last preheat event (stream: $(tr '\n' ' ' <"$out"))"
  assert_eq plan "$(head -n 1 "$out" | jq -r .event)" "first preheat event"
  assert_eq "$n $bytes" "$(head -n 1 "$out" | jq -r '"\(.blobs) \(.bytes)"')" "preheat plan (blobs bytes)"
  assert_eq "$n $bytes" "$(tail -n 1 "$out" | jq -r '"\(.blobs) \(.bytes)"')" "preheat done (blobs bytes)"
  assert_eq "$(printf '%s\n' "$@" | sort)" "$(jq -r 'select(.event=="blob_done") | .digest' "$out" | sort)" \
    "blob_done digests"
  assert_eq 0 "$(jq -r 'select(.event=="failed")' "$out" | wc -l)" "failed events"
  # Bytes held are reported while it runs (at least once), never shrinking, never past the plan.
  jq -s -e --argjson total "$bytes" '[.[] | select(.event=="progress") | .bytes] |
    length >= 1 and . == sort and all(. <= $total)' "$out" >/dev/null ||
    die "progress events missing, shrinking or past the plan: $(jq -c 'select(.event=="progress")' "$out" | tr '\n' ' ')"
  local d
  for d in "$@"; do
    assert_eq "$(stat -c %s "$(blob_file "$d")")" "$(jq -r --arg d "$d" 'select(.event=="blob_done" and .digest==$d) | .size' "$out")" \
      "blob_done size of $d"
  done
}

# --- a two-layer image ----------------------------------------------------------------
mapfile -t blobs < <(image_blobs "$want")
assert_eq 3 "${#blobs[@]}" "blobs (config + 2 layers) of pre/random:v1"
log "preheat pre/random:v1 on the agent"
preheat "$AGENT_URL" pre/random:v1 >"$T/preheat1.ndjson" || die "POST /v1/preheat failed: $(cat "$T/preheat1.ndjson")"
check_preheat "$T/preheat1.ndjson" "${blobs[@]}"
log "preheat stream: $(jq -c . "$T/preheat1.ndjson" | tr '\n' ' ')"
assert_eq "$(bytes_of "${blobs[@]}")" "$(metric "$AGENT_URL" shoal_agent_cache_bytes)" "shoal_agent_cache_bytes after the preheat"
for d in "${blobs[@]}"; do
  [[ -f $AGENT_DATA/cache/sha256/${d#sha256:} ]] || log "note: $d not at cache/sha256/<hex> under $AGENT_DATA (layout changed?)"
done

# Everything now comes from the cache: nothing more is received while the image is pulled.
recv0=$(agent_received "$AGENT_URL")
ok0=$(agent_requests "$AGENT_URL" 'status="200"')
log "skopeo copy docker://$AGENT/pre/random:v1 -> oci:$T/back:v1 (received so far: $recv0 bytes)"
skopeo_ copy -q --src-tls-verify=false --preserve-digests "docker://$AGENT/pre/random:v1" "oci:$T/back:v1" ||
  die "skopeo copy from the agent failed"
got=$(jq -r '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"]=="v1") | .digest' "$T/back/index.json")
assert_eq "$want" "$got" "manifest digest copied from the agent"
for d in "${blobs[@]}"; do
  assert_eq "$d" "$(sha256_of "$T/back/blobs/sha256/${d#sha256:}")" "content of $d copied from the agent"
  curl -sf --max-time 30 -o "$T/blob" "$AGENT_URL/v2/pre/random/blobs/$d" || die "GET blob $d from the agent failed"
  assert_eq "$d" "$(sha256_of "$T/blob")" "content of blob $d from the agent"
done
# A range of a cached layer too.
layer0=$(jq -r '.layers[0].digest' "$(blob_file "$want")")
curl -sf --max-time 30 -r 1000-1999 -o "$T/range" "$AGENT_URL/v2/pre/random/blobs/$layer0" || die "range GET of $layer0 failed"
cmp -s "$T/range" <(tail -c +1001 "$(blob_file "$layer0")" | head -c 1000) || die "range 1000-1999 of $layer0 differs"
recv1=$(agent_received "$AGENT_URL")
assert_eq "$recv0" "$recv1" "shoal_agent_received_bytes_total across the pull after the preheat (must be served from the cache)"
ok1=$(agent_requests "$AGENT_URL" 'status="200"')
((ok1 >= ok0 + 2 * ${#blobs[@]})) || die "agent answered only $((ok1 - ok0)) requests with 200 during the pull"
log "pull after preheat: $((ok1 - ok0)) requests answered, 0 bytes received"

# Preheating it again is immediate and receives nothing; so is a preheat by digest.
preheat "$AGENT_URL" pre/random:v1 >"$T/preheat2.ndjson"
check_preheat "$T/preheat2.ndjson" "${blobs[@]}"
preheat "$AGENT_URL" "pre/random@$want" >"$T/preheat3.ndjson"
check_preheat "$T/preheat3.ndjson" "${blobs[@]}"
assert_eq "$recv0" "$(agent_received "$AGENT_URL")" "received bytes after preheating a cached image again"

# --- a multi-arch index, one platform ---------------------------------------------------
idx_file=$(blob_file "$index")
amd=$(jq -r '.manifests[] | select(.platform.architecture=="amd64") | .digest' "$idx_file")
arm=$(jq -r '.manifests[] | select(.platform.architecture=="arm64") | .digest' "$idx_file")
mapfile -t arm_blobs < <(image_blobs "$arm")
mapfile -t amd_blobs < <(image_blobs "$amd")
log "preheat pre/multi:v1 for linux/arm64"
preheat "$AGENT_URL" pre/multi:v1 linux/arm64 >"$T/preheat-arm.ndjson" || die "POST /v1/preheat (arm64) failed"
check_preheat "$T/preheat-arm.ndjson" "${arm_blobs[@]}"
recv2=$(agent_received "$AGENT_URL")
for d in "${arm_blobs[@]}"; do
  curl -sf --max-time 30 -o "$T/blob" "$AGENT_URL/v2/pre/multi/blobs/$d" || die "GET arm64 blob $d from the agent failed"
  assert_eq "$d" "$(sha256_of "$T/blob")" "content of arm64 blob $d"
done
assert_eq "$recv2" "$(agent_received "$AGENT_URL")" "received bytes while reading the preheated arm64 blobs"
# The amd64 layer was not preheated: reading it makes the agent download it.
amd_layer=$(jq -r '.layers[0].digest' "$(blob_file "$amd")")
curl -sf --max-time 60 -o "$T/blob" "$AGENT_URL/v2/pre/multi/blobs/$amd_layer" || die "GET amd64 layer from the agent failed"
assert_eq "$amd_layer" "$(sha256_of "$T/blob")" "content of the amd64 layer"
wait_until 30 "the agent to count the amd64 layer's bytes" test "$(agent_received "$AGENT_URL")" -gt "$recv2"
log "amd64 layer was not preheated: fetched on demand ($(($(agent_received "$AGENT_URL") - recv2)) bytes received)"

# The whole index (all platforms): the rest of amd64 arrives, arm64 stays cached.
preheat "$AGENT_URL" pre/multi:v1 >"$T/preheat-all.ndjson" || die "POST /v1/preheat (all platforms) failed"
mapfile -t all_blobs < <(printf '%s\n' "${arm_blobs[@]}" "${amd_blobs[@]}" | sort -u)
check_preheat "$T/preheat-all.ndjson" "${all_blobs[@]}"

# --- failures -----------------------------------------------------------------------
preheat "$AGENT_URL" pre/nothing:v1 >"$T/preheat-unknown.ndjson" || true
assert_eq failed "$(tail -n 1 "$T/preheat-unknown.ndjson" | jq -r .event)" \
  "last event of a preheat of an unknown image (stream: $(cat "$T/preheat-unknown.ndjson"))"
[[ -n $(tail -n 1 "$T/preheat-unknown.ndjson" | jq -r '.message // empty') ]] || die "failed event without a message"
preheat "$AGENT_URL" pre/multi:v1 linux/s390x >"$T/preheat-noplat.ndjson" || true
assert_eq failed "$(tail -n 1 "$T/preheat-noplat.ndjson" | jq -r .event)" \
  "last event of a preheat for a platform the index lacks (stream: $(cat "$T/preheat-noplat.ndjson"))"
code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 10 -X POST -H 'Content-Type: application/json' \
  --data '{"image":"Bad Name:v1"}' "$AGENT_URL/v1/preheat")
assert_eq 400 "$code" "status of a preheat with an invalid image reference"

log "PASS"
