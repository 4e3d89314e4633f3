#!/usr/bin/env bash
# Agents over an origin cluster: three origins (R = 2), a tracker that knows all three, and
# two agents that each know one origin (not the one pushed to). Pulls go through the agents
# with curl. Checks that
#  - every origin's /locations answers the same two seeders for a blob: the peer listeners
#    of its two owners (the tracker hands those out),
#  - any origin answers /metainfo, holder or not,
#  - both agents serve the image with verified digests, and the bytes came from the swarm
#    (peers: the owning origins and the other agent), not from origin HTTP fallback.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
lib_init cluster_agent
require_shoal_under_test

start_origin_cluster 3 2
urls=$(IFS=,; echo "${OC_URLS[*]}")

port=$(free_port)
TRACKER_URL=http://127.0.0.1:$port
shoal_bg "tracker-$port" "$T/tracker.log" tracker --listen "127.0.0.1:$port" --origin "$urls" --announce-interval 1s
wait_ready 30 "$BG_PID" "tracker" is_200 "$TRACKER_URL/healthz" || die "$WAIT_ERR (log: $T/tracker.log)"

AURLS=()
for i in 0 1; do
  port=$(free_port) peer=$(free_port)
  mkdir -p "$T/agent$i"
  AURLS[i]=http://127.0.0.1:$port
  shoal_bg "agent$i-$port" "$T/agent$i.log" agent --listen "127.0.0.1:$port" --peer-listen "127.0.0.1:$peer" \
    --origin "${OC_URLS[i + 1]}" --tracker "$TRACKER_URL" --data-dir "$T/agent$i"
  wait_ready 30 "$BG_PID" "agent $i" is_200 "${AURLS[i]}/healthz" || die "$WAIT_ERR (log: $T/agent$i.log)"
done

src=$T/src
want=$(oci_random_image "$src" v1 24M,5M,100K)
skopeo_ copy -q --dest-tls-verify=false --preserve-digests "oci:$src:v1" "docker://${OC_IDS[0]}/fleet/app:v1" ||
  die "skopeo copy into origin 0 failed"
manifest=$src/blobs/sha256/${want#sha256:}
layers=$(jq -r '.layers[].digest' "$manifest")

for b in $layers; do
  ref=""
  for i in 0 1 2; do
    seeders=$(curl -sf --max-time 5 "${OC_URLS[i]}/shoal/v1/blobs/$b/locations" | jq -c '[.seeders[].addr] | sort')
    assert_eq 2 "$(jq length <<<"$seeders")" "seeders of $b according to origin $i"
    [[ -z $ref ]] && ref=$seeders
    assert_eq "$ref" "$seeders" "seeders of $b: origin $i agrees with origin 0"
    curl -sf --max-time 10 "${OC_URLS[i]}/shoal/v1/blobs/$b/metainfo" | jq -e '.piece_length > 0 and (.chain | type) == "string"' >/dev/null ||
      die "origin $i has no metainfo for $b"
  done
  assert_eq 2 "$(oc_blob_copies "$b")" "copies of $b"
done

for i in 0 1; do
  curl -sf --max-time 30 -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "${AURLS[i]}/v2/fleet/app/manifests/v1" -o "$T/m$i" || die "manifest through agent $i"
  assert_eq "$want" "$(sha256_of "$T/m$i")" "manifest through agent $i"
  for b in $layers; do
    got=$(curl -sf --max-time 60 "${AURLS[i]}/v2/fleet/app/blobs/$b" | sha256sum | cut -d' ' -f1)
    assert_eq "${b#sha256:}" "$got" "layer $b through agent $i"
  done
  from_peers=$(metric "${AURLS[i]}" shoal_agent_received_bytes_total 'source="peer"')
  from_origin=$(metric "${AURLS[i]}" shoal_agent_received_bytes_total 'source="origin"')
  log "agent $i: $from_peers bytes from peers, $from_origin from origin HTTP"
  awk -v p="$from_peers" 'BEGIN { exit !(p >= 29000000) }' || die "agent $i took only $from_peers bytes from the swarm"
done
log "PASS"
