#!/usr/bin/env bash
# A small fleet over real kernel TCP on shaped links (the setup of integration/bench/fleet.sh):
# an origin and a tracker in one network namespace behind a 200 Mbit/s link, 4 hosts in their
# own namespaces behind 20 Mbit/s links (tbf on both ends of each veth), each running a
# `shoal agent` with default settings. One 16 MiB random blob is pushed to the origin; all
# hosts pull it at the same instant through their own agent.
# Asserts correctness only, no timing: every curl succeeded, every host's file hashes to the
# digest, and the agents took no bytes from the origin's HTTP fallback (Σ
# shoal_agent_received_bytes_total{source="origin"} == 0: the pieces came over the peer
# protocol, from the origin's seeder and from each other).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib.sh"
# shellcheck source=../bench/netns.sh
source "$here/../bench/netns.sh"
lib_init fleet_netns
require_shoal_under_test
[[ -x $SHOAL_BIN ]] || die "shoal binary not found at SHOAL_BIN=$SHOAL_BIN"

N=4
HOST_MBIT=20
ORIGIN_MBIT=200
SIZE_MIB=16
BLOB_REPO=fleet/netns

netns_init
fleet_setup "$N" "$HOST_MBIT" "$ORIGIN_MBIT"
fleet_start_shoal "$T/shoal"

blob=$T/blob
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom >"$blob"
digest=$(sha256_of "$blob")
ns_push "$FLEET_ORIGIN_NS" "$FLEET_ORIGIN_URL" "$BLOB_REPO" "$blob" "$digest"
rm -f "$blob"
fleet_wait_metainfo "$digest"
log "pushed $digest ($SIZE_MIB MiB); $N hosts pull it at once"

mkdir -p "$T/dl"
start=$(awk -v n="$EPOCHREALTIME" 'BEGIN {printf "%.6f", n + 1}')
fleet_pull "$FLEET_AGENT_URL/v2/$BLOB_REPO/blobs/$digest" "$T/dl" "$start"
for ((i = 0; i < N; i++)); do
  log "host $i: curl status ${FLEET_RC[i]}, ${FLEET_SECS[i]}s"
  [[ ${FLEET_RC[i]} == 0 ]] || die "host $i: the pull failed (curl status ${FLEET_RC[i]}; $(cat "$T/pull-$i.log" 2>/dev/null))"
done
fleet_verify "$T/dl" "$digest"
assert_eq "$N" "$FLEET_OK" "hosts whose file hashes to $digest (bad: ${FLEET_BAD[*]:-none})"

fallback=$(fleet_agents_metric shoal_agent_received_bytes_total 'source="origin"')
[[ $fallback == n/a ]] && fallback=0
peer=$(fleet_agents_metric shoal_agent_received_bytes_total 'source="peer"')
timeouts=0
for ((i = 0; i < N; i++)); do
  timeouts=$((timeouts + $(grep -c 'timed out' "${FLEET_AGENT_LOGS[i]}" || true)))
done
log "agents received $peer bytes from peers, $fallback from the origin's HTTP fallback;" \
  "$timeouts piece requests timed out (logs)"
assert_eq 0 "$fallback" "bytes the agents took from the origin's HTTP fallback"
log "PASS: $N hosts hold $digest, pulled at once through their agents over shaped links, no origin fallback"
