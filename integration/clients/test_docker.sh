#!/usr/bin/env bash
# docker push / pull / run against the registry under test, with a flat and a nested
# repository name. docker re-gzips layers on push, so what we compare is the image ID
# (the config digest), which survives the round trip.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
lib_init docker

start_registry_under_test
start_containerd
start_dockerd

docker_import_busybox shoal-test/busybox:local
local_id=$(dk image inspect -f '{{.Id}}' shoal-test/busybox:local)
log "local busybox image $local_id"

for ref in "$REG/busybox:1" "$REG/team/sub/app:1.0"; do
  log "push $ref"
  dk tag shoal-test/busybox:local "$ref"
  dk push "$ref" >"$T/push.out" 2>&1 || { cat "$T/push.out" >&2; die "docker push $ref failed"; }
  pushed=$(awk '/digest: sha256:/ {for (i=1;i<=NF;i++) if ($i=="digest:") print $(i+1)}' "$T/push.out")
  [[ $pushed == sha256:* ]] || { cat "$T/push.out" >&2; die "docker push $ref printed no digest"; }
  log "pushed $ref as $pushed"

  # The registry must serve the manifest under the digest docker reported.
  ref_noport=${ref#"$REG"/}
  got=$(curl -sf -I -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "$REG_URL/v2/${ref_noport%:*}/manifests/${ref_noport##*:}" | tr -d '\r' |
    awk -F': ' 'tolower($1)=="docker-content-digest" {print $2}')
  assert_eq "$pushed" "$got" "Docker-Content-Digest of HEAD manifests for $ref"

  # Remove every local copy so the pull really downloads.
  dk rmi "$ref" >/dev/null
done
dk rmi shoal-test/busybox:local >/dev/null
if dk image inspect "$local_id" >/dev/null 2>&1; then die "image $local_id still present locally after rmi"; fi

for ref in "$REG/busybox:1" "$REG/team/sub/app:1.0"; do
  log "pull $ref"
  dk pull "$ref" >"$T/pull.out" 2>&1 || { cat "$T/pull.out" >&2; die "docker pull $ref failed"; }
  assert_eq "$local_id" "$(dk image inspect -f '{{.Id}}' "$ref")" "image ID after pulling $ref"
  out=$(dk run --rm --network none "$ref" /bin/sh -c 'echo ok')
  assert_eq ok "$out" "output of docker run $ref"
  dk rmi "$ref" >/dev/null
done

# A pull by digest too (what orchestrators do).
digest_ref="$REG/team/sub/app@$pushed"
log "pull $digest_ref"
dk pull "$digest_ref" >"$T/pull.out" 2>&1 || { cat "$T/pull.out" >&2; die "docker pull $digest_ref failed"; }
assert_eq ok "$(dk run --rm --network none "$digest_ref" /bin/sh -c 'echo ok')" "docker run by digest"

log "PASS"
