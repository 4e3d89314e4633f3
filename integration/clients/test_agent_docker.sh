#!/usr/bin/env bash
# dockerd pulls through a Shoal agent: push a busybox image to the origin, remove every
# local copy, `docker pull AGENT/repo:tag` (the agent resolves the tag at the origin and
# fetches the blobs from the swarm), check the image ID and run it. A second pull by digest
# through a second agent. Writes to an agent are refused: a raw POST of an upload answers
# 405 UNSUPPORTED and `docker push` to the agent fails.
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
lib_init agent_docker
require_shoal_under_test

start_shoal_cluster 2
start_containerd
start_dockerd

docker_import_busybox shoal-test/busybox:local
local_id=$(dk image inspect -f '{{.Id}}' shoal-test/busybox:local)
log "local busybox image $local_id"

# Push to the origin.
dk tag shoal-test/busybox:local "$ORIGIN/agent/busybox:1"
dk push "$ORIGIN/agent/busybox:1" >"$T/push.out" 2>&1 || { cat "$T/push.out" >&2; die "docker push to the origin failed"; }
pushed=$(awk '/digest: sha256:/ {for (i=1;i<=NF;i++) if ($i=="digest:") print $(i+1)}' "$T/push.out")
[[ $pushed == sha256:* ]] || { cat "$T/push.out" >&2; die "docker push printed no digest"; }
log "pushed $ORIGIN/agent/busybox:1 as $pushed"

# Nothing of the image may stay local, or docker would not download it again.
dk rmi "$ORIGIN/agent/busybox:1" shoal-test/busybox:local >/dev/null
if dk image inspect "$local_id" >/dev/null 2>&1; then die "image $local_id still present locally after rmi"; fi

# Pull through the first agent, by tag.
before=$(agent_received "$AGENT_URL")
ref=$AGENT/agent/busybox:1
log "docker pull $ref"
dk pull "$ref" >"$T/pull.out" 2>&1 || { cat "$T/pull.out" >&2; die "docker pull $ref (through the agent) failed"; }
grep -q "Digest: $pushed" "$T/pull.out" || { cat "$T/pull.out" >&2; die "docker pull $ref did not report digest $pushed"; }
assert_eq "$local_id" "$(dk image inspect -f '{{.Id}}' "$ref")" "image ID after pulling $ref"
assert_eq ok "$(dk run --rm --network none "$ref" /bin/sh -c 'echo ok')" "output of docker run $ref"

# The bytes came through the agent: its log has the requests, its counters moved.
grep -q "path=/v2/agent/busybox/manifests/1 status=200" "$AGENT_LOG" ||
  die "agent log has no successful GET of the manifest by tag"
layers=$(curl -sf -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
  "$ORIGIN_URL/v2/agent/busybox/manifests/$pushed" | jq -r '.config.digest, .layers[].digest')
for d in $layers; do
  grep -q "path=/v2/agent/busybox/blobs/$d status=200" "$AGENT_LOG" || die "agent log has no successful GET of blob $d"
done
after=$(agent_received "$AGENT_URL")
((after > before)) || die "shoal_agent_received_bytes_total did not grow during the pull ($before -> $after)"
log "agent 0 received $((after - before)) piece bytes"

# Pull by digest through the second agent (the first one now seeds too).
dk rmi "$ref" >/dev/null
ref2=${AGENTS[1]}/agent/busybox@$pushed
log "docker pull $ref2"
dk pull "$ref2" >"$T/pull2.out" 2>&1 || { cat "$T/pull2.out" >&2; die "docker pull $ref2 (through agent 1) failed"; }
assert_eq "$local_id" "$(dk image inspect -f '{{.Id}}' "$ref2")" "image ID after pulling $ref2"
assert_eq ok "$(dk run --rm --network none "$ref2" /bin/sh -c 'echo ok')" "output of docker run $ref2"
log "agent 1 received $(agent_received "${AGENT_URLS[1]}") piece bytes; agent 0 sent $(metric "$AGENT_URL" shoal_agent_peer_sent_bytes_total) to peers"

# Writes to an agent are refused with the spec's UNSUPPORTED.
code=$(curl -sS -o "$T/post.json" -w '%{http_code}' --max-time 10 -X POST "$AGENT_URL/v2/agent/pushed/blobs/uploads/")
assert_eq 405 "$code" "status of POST /v2/agent/pushed/blobs/uploads/ on the agent"
assert_eq UNSUPPORTED "$(jq -r '.errors[0].code' "$T/post.json")" "error code of a POST upload on the agent"
for m in PUT DELETE; do
  code=$(curl -sS -o "$T/w.json" -w '%{http_code}' --max-time 10 -X "$m" \
    -H 'Content-Type: application/vnd.docker.distribution.manifest.v2+json' --data '{}' \
    "$AGENT_URL/v2/agent/busybox/manifests/1")
  assert_eq 405 "$code" "status of $m manifest on the agent"
  assert_eq UNSUPPORTED "$(jq -r '.errors[0].code' "$T/w.json")" "error code of $m manifest on the agent"
done

dk tag "$ref2" "$AGENT/agent/pushed:1"
log "docker push $AGENT/agent/pushed:1 (must fail)"
if timeout 120 "$DOCKER_CLI" -H "unix://$DOCKER_SOCK" push "$AGENT/agent/pushed:1" >"$T/push-agent.out" 2>&1; then
  cat "$T/push-agent.out" >&2
  die "docker push to the agent succeeded"
fi
log "docker push to the agent failed as it should: $(tail -n 1 "$T/push-agent.out")"
code=$(http_code "$ORIGIN_URL/v2/agent/pushed/manifests/1")
assert_eq 404 "$code" "the refused push must not reach the origin: GET agent/pushed:1 on the origin"

log "PASS"
