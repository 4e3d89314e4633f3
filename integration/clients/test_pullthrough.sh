#!/usr/bin/env bash
# Pull-through with real clients, offline. The upstream is Debian's docker-registry behind TLS
# (a CA made here) at https://upstream.test, a name that resolves only inside this test's own
# network namespace, with Docker's token authentication (token_server.py, also TLS). It holds
# images that were never pushed to Shoal: library/app (two layers), library/multi (an
# amd64 + arm64 index) and private/app (only alice may pull). Shoal (an origin configured with
# [[upstream]] registry = "upstream.test", a tracker, three agents) runs in the same namespace.
#   - containerd with each agent as the mirror of upstream.test (hosts.toml; the upstream's own
#     server is a closed port) pulls library/app on all three at once: digests and every blob
#     checked; the upstream's access log shows each blob sent exactly once;
#   - the arm64 image of the index through a mirror;
#   - docker pulls the explicit form <agent>/upstream.test/library/app:v1 (same image ID);
#   - private/app: ctr --user alice gets it; without credentials the agent answers 401, also
#     for a blob it has cached; with them, 200; another user the upstream admits reads its
#     manifest by digest; its tag list only with credentials; with the upstream down, its
#     stale tag only with credentials the upstream accepted before;
#   - a push into upstream.test/... at the origin is refused (403).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"

# Re-run inside a fresh network namespace where upstream.test is 127.0.0.1. dockerd is
# started out here, in the namespace's network but the machine's mounts: it needs the
# machine's /sys (cgroups), which `ip netns exec` hides.
if [[ -z ${PT_NETNS:-} ]]; then
  lib_init pullthrough-netns
  require_shoal_under_test
  ns=shoal-pt-$$
  ip netns add "$ns"
  on_exit "ip netns del $ns; rm -rf /etc/netns/$ns"
  ip -n "$ns" link set lo up
  mkdir -p "/etc/netns/$ns"
  printf '127.0.0.1 localhost upstream.test\n::1 localhost\n' >"/etc/netns/$ns/hosts"
  printf '#!/bin/sh\nexec nsenter --net=/run/netns/%s %s "$@"\n' "$ns" "$DOCKERD" >"$T/dockerd-in-ns"
  chmod +x "$T/dockerd-in-ns"
  # Docker Hub pulls go to the agent the test starts on 127.0.0.1:5000 (as on a node).
  DOCKERD_MIRRORS=http://127.0.0.1:5000 DOCKERD=$T/dockerd-in-ns start_dockerd
  PT_NETNS=$ns DOCKER_SOCK=$DOCKER_SOCK DOCKER_CONFIG=$DOCKER_CONFIG ip netns exec "$ns" bash "$0" "$@"
  exit 0
fi

lib_init pullthrough
[[ -x $SHOAL_BIN ]] || die "shoal binary not found at SHOAL_BIN=$SHOAL_BIN"
getent hosts upstream.test | grep -q 127.0.0.1 || die "upstream.test does not resolve inside $PT_NETNS"

# --- a CA, the upstream's certificate, the token signing certificate --------------------
pki=$T/up-pki
mkdir -p "$pki" "$T/certs.d"
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/ca-key.pem" -out "$pki/ca.pem" -days 2 \
  -subj "/CN=pull-through test CA" -addext basicConstraints=critical,CA:TRUE \
  -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null || die "openssl: CA"
openssl req -newkey rsa:2048 -nodes -keyout "$pki/up-key.pem" -out "$pki/up.csr" -subj "/CN=upstream.test" 2>/dev/null
printf 'subjectAltName=DNS:upstream.test\nextendedKeyUsage=serverAuth\n' >"$pki/up.ext"
openssl x509 -req -in "$pki/up.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca-key.pem" -CAcreateserial -days 1 \
  -extfile "$pki/up.ext" -out "$pki/up.pem" 2>/dev/null || die "openssl: upstream certificate"
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/sign-key.pem" -out "$pki/sign.pem" -days 2 \
  -subj "/CN=token signer" 2>/dev/null || die "openssl: token signer"
cp "$pki/ca.pem" "$T/certs.d/ca.crt" # skopeo --*-cert-dir
UP_CURL=(--cacert "$pki/ca.pem")

# --- the token server and the upstream registry -----------------------------------------
TOKENS=$T/tokens.log
: >"$TOKENS"
start_bg token-server "$T/token-server.log" python3 "$here/token_server.py" --listen 127.0.0.1:8443 \
  --cert "$pki/up.pem" --key "$pki/up-key.pem" --signing-key "$pki/sign-key.pem" \
  --signing-cert "$pki/sign.pem" --issuer shoal-test-issuer --log "$TOKENS"
cat >"$T/upstream.yml" <<EOF
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $T/upstream-storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:443
  tls:
    certificate: $pki/up.pem
    key: $pki/up-key.pem
auth:
  token:
    realm: https://upstream.test:8443/token
    service: upstream.test
    issuer: shoal-test-issuer
    rootcertbundle: $pki/sign.pem
EOF
UP_LOG=$T/upstream.log
start_bg upstream "$UP_LOG" "$DOCKER_REGISTRY" serve "$T/upstream.yml"
UP_PID=$BG_PID
wait_until 20 "the upstream registry" bash -c "[[ \$(curl -s -o /dev/null -w '%{http_code}' ${UP_CURL[*]} https://upstream.test/v2/) == 401 ]]"
log "upstream registry at https://upstream.test (token auth at :8443)"

# upstream_blob_gets DIGEST: how many times the upstream sent that blob's bytes.
upstream_blob_gets() { grep -c "\"GET /v2/[^ ]*/blobs/$1 HTTP/[0-9.]*\" 200 " "$UP_LOG" || true; }

# --- images that exist only upstream -----------------------------------------------------
push_up() { # LAYOUT TAG REPO [--all]
  skopeo_ copy --preserve-digests "${@:4}" --dest-creds admin:admin-secret --dest-cert-dir "$T/certs.d" \
    "oci:$1:$2" "docker://upstream.test/$3:$2" >/dev/null || die "seeding upstream.test/$3:$2"
}
$MKIMAGE random "$T/app" v1 1M,3M >/dev/null
push_up "$T/app" v1 library/app
app_digest=$(skopeo_ inspect --raw --cert-dir "$T/certs.d" docker://upstream.test/library/app:v1 | sha256sum | cut -d' ' -f1)
mapfile -t app_blobs < <(layout_blobs "$T/app" | grep -v "sha256:$app_digest")
$MKIMAGE multiarch "$T/multi" v1 >/dev/null
push_up "$T/multi" v1 library/multi --all
$MKIMAGE random "$T/private" v1 2M >/dev/null
push_up "$T/private" v1 private/app
private_digest=$(skopeo_ inspect --raw --creds alice:alice-secret --cert-dir "$T/certs.d" docker://upstream.test/private/app:v1 |
  sha256sum | cut -d' ' -f1)
mapfile -t private_blobs < <(layout_blobs "$T/private" | grep -v "sha256:$private_digest")
log "seeded upstream.test: library/app (sha256:$app_digest, ${#app_blobs[@]} blobs), library/multi, private/app"

# --- Shoal, pulling through upstream.test --------------------------------------------------
# The same upstream also plays Docker Hub (docker.io), for Docker Engine's registry-mirrors.
cat >"$T/origin.toml" <<EOF
[[upstream]]
registry = "upstream.test"
url = "https://upstream.test"
ca_file = "$pki/ca.pem"
tag_ttl = "2s"

[[upstream]]
registry = "docker.io"
url = "https://upstream.test"
ca_file = "$pki/ca.pem"
EOF
SHOAL_ORIGIN_ARGS="--config $T/origin.toml" start_shoal_cluster 3
for i in 0 1 2; do
  wait_until 20 "agent $i to learn the upstreams" bash -c \
    "grep -q upstream.test <(curl -s ${ORIGIN_URL}/shoal/v1/upstream/registries)"
  ctr_hosts_dir "$T/hosts$i" upstream.test "http://${AGENTS[i]}"
done
# Agents refresh their list every 2 s until an origin answers; give them that long.
sleep 2.5

start_containerd
log "containerd pulls upstream.test/library/app:v1 through three agents at once"
pids=()
for i in 0 1 2; do
  ctr_ -n "node$i" images pull --hosts-dir "$T/hosts$i" --plain-http upstream.test/library/app:v1 \
    >"$T/ctr-pull-$i.log" 2>&1 &
  pids+=($!)
done
for i in 0 1 2; do
  wait "${pids[i]}" || { cat "$T/ctr-pull-$i.log" >&2; die "ctr pull through agent $i failed"; }
done
for i in 0 1 2; do
  got=$(ctr_ -n "node$i" images ls -q | grep -c . || true)
  [[ $got -ge 1 ]] || die "node$i has no image"
  d=$(ctr_ -n "node$i" images ls | awk '$1 == "upstream.test/library/app:v1" {print $3}')
  assert_eq "sha256:$app_digest" "$d" "node$i's image digest"
  for b in "${app_blobs[@]}"; do
    assert_eq "$b" "sha256:$(ctr_ -n "node$i" content get "$b" | sha256sum | cut -d' ' -f1)" "node$i's copy of $b"
  done
done
for b in "${app_blobs[@]}"; do
  assert_eq 1 "$(upstream_blob_gets "$b")" "times the upstream sent $b"
done
grep -q 'ns=upstream.test' "${AGENT_LOGS[0]}" || die "agent 0 saw no ?ns=upstream.test request"
log "every node has the image; each of its ${#app_blobs[@]} blobs left the upstream once"

log "the arm64 image of an index, through agent 1"
ctr_ -n arm images pull --platform linux/arm64 --hosts-dir "$T/hosts1" --plain-http upstream.test/library/multi:v1 \
  >"$T/ctr-multi.log" 2>&1 || { cat "$T/ctr-multi.log" >&2; die "multi-arch pull failed"; }

log "docker pulls the explicit form through agent 2"
dk pull "${AGENTS[2]}/upstream.test/library/app:v1" >"$T/docker-pull.log" 2>&1 ||
  { cat "$T/docker-pull.log" >&2; die "docker pull of the explicit form failed"; }
for b in "${app_blobs[@]}"; do
  assert_eq 1 "$(upstream_blob_gets "$b")" "times the upstream sent $b (after docker)"
done

log "docker pulls library/app:v1 from \"Docker Hub\" through its registry-mirrors agent (127.0.0.1:5000)"
shoal_bg mirror-agent "$T/mirror-agent.log" agent --listen 127.0.0.1:5000 --peer-listen "127.0.0.1:$(free_port)" \
  --origin "$ORIGIN_URL" --tracker "$TRACKER_URL" --data-dir "$T/cluster/mirror-agent"
wait_ready 30 "$BG_PID" "the mirror agent" is_200 http://127.0.0.1:5000/healthz || die "$WAIT_ERR"
sleep 2.5 # its first list of upstream registries
dk pull library/app:v1 >"$T/docker-hub-pull.log" 2>&1 ||
  { cat "$T/docker-hub-pull.log" >&2; die "docker pull library/app:v1 through registry-mirrors failed"; }
assert_eq "$(dk image inspect -f '{{.Id}}' "${AGENTS[2]}/upstream.test/library/app:v1")" \
  "$(dk image inspect -f '{{.Id}}' library/app:v1)" "image ID through the mirror and the explicit form"
grep -q 'GET /v2/library/app/manifests/\|path=/v2/library/app/manifests/' "$T/mirror-agent.log" ||
  die "the mirror agent never served library/app's manifest"
# Same blobs under another mirrored name: linked, not fetched again.
for b in "${app_blobs[@]}"; do
  assert_eq 1 "$(upstream_blob_gets "$b")" "times the upstream sent $b (after the Docker Hub pull)"
done

log "a private upstream repository"
if ctr_ -n anon images pull --hosts-dir "$T/hosts0" --plain-http upstream.test/private/app:v1 >"$T/ctr-anon.log" 2>&1; then
  die "an anonymous client pulled private/app"
fi
ctr_ -n alice images pull --user alice:alice-secret --hosts-dir "$T/hosts0" --plain-http upstream.test/private/app:v1 \
  >"$T/ctr-alice.log" 2>&1 || { cat "$T/ctr-alice.log" >&2; die "alice could not pull private/app"; }
for b in "${private_blobs[@]}"; do
  url="${AGENT_URLS[0]}/v2/private/app/blobs/$b?ns=upstream.test"
  assert_eq 401 "$(curl -s -o /dev/null -w '%{http_code}' "$url")" "anonymous GET of cached private blob $b"
  assert_eq 200 "$(curl -s -o /dev/null -w '%{http_code}' -u alice:alice-secret "$url")" "alice's GET of $b"
  assert_eq 401 "$(curl -s -o /dev/null -w '%{http_code}' -u alice:wrong "$url")" "a wrong password's GET of $b"
done
assert_eq 401 "$(curl -s -o /dev/null -w '%{http_code}' "${AGENT_URLS[1]}/v2/upstream.test/private/app/manifests/v1")" \
  "anonymous manifest of private/app at agent 1"
# Another user the upstream lets in: access is checked on the manifest itself (a HEAD of a
# manifest digest at /blobs/ is a 404 at registries that keep manifests apart).
assert_eq 200 "$(curl -s -o /dev/null -w '%{http_code}' -u admin:admin-secret \
  -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
  "$ORIGIN_URL/v2/upstream.test/private/app/manifests/sha256:$private_digest")" "admin's manifest of private/app by digest"
assert_eq 401 "$(curl -s -o /dev/null -w '%{http_code}' "$ORIGIN_URL/v2/upstream.test/private/app/tags/list")" \
  "anonymous tag list of private/app"
assert_eq 200 "$(curl -s -o /dev/null -w '%{http_code}' -u alice:alice-secret "$ORIGIN_URL/v2/upstream.test/private/app/tags/list")" \
  "alice's tag list of private/app"
# The origin forgets what it knew in memory: the cluster's record keeps private/app private.
stop_pid "$ORIGIN_PID" origin
shoal_bg origin-again "$T/origin-again.log" origin --listen "$ORIGIN" --peer-listen "$ORIGIN_PEER" \
  --data-dir "$ORIGIN_DATA" --config "$T/origin.toml"
ORIGIN_PID=$BG_PID
wait_ready 30 "$ORIGIN_PID" "the restarted origin" is_200 "$ORIGIN_URL/healthz" || die "$WAIT_ERR"
for b in "${private_blobs[@]}"; do
  url="${AGENT_URLS[2]}/v2/private/app/blobs/$b?ns=upstream.test"
  assert_eq 401 "$(curl -s -o /dev/null -w '%{http_code}' "$url")" "anonymous GET of $b after the origin restarted"
  assert_eq 200 "$(curl -s -o /dev/null -w '%{http_code}' -u alice:alice-secret "$url")" "alice's GET of $b after the restart"
done

log "shoal preheat of an upstream image (explicit name) through agent 0"
"$SHOAL_BIN" preheat "${AGENT_URLS[0]}" upstream.test/library/multi:v1 >"$T/preheat.log" 2>&1 ||
  { cat "$T/preheat.log" >&2; die "preheat of upstream.test/library/multi:v1 failed"; }
grep -q 'preheated upstream.test/library/multi:v1' "$T/preheat.log" || die "preheat said: $(cat "$T/preheat.log")"

log "shoal preheat of an upstream image nothing has pulled yet (the origins fetch while it waits)"
$MKIMAGE random "$T/fresh" v1 4M,1M >/dev/null
push_up "$T/fresh" v1 library/fresh
"$SHOAL_BIN" preheat "${AGENT_URLS[1]}" upstream.test/library/fresh:v1 >"$T/preheat-fresh.log" 2>&1 ||
  { cat "$T/preheat-fresh.log" >&2; die "preheat of upstream.test/library/fresh:v1 failed"; }
fresh_digest=$(skopeo_ inspect --raw --cert-dir "$T/certs.d" docker://upstream.test/library/fresh:v1 | sha256sum | cut -d' ' -f1)
mapfile -t fresh_blobs < <(layout_blobs "$T/fresh" | grep -v "sha256:$fresh_digest")
for b in "${fresh_blobs[@]}"; do
  assert_eq 1 "$(upstream_blob_gets "$b")" "times the upstream sent $b (preheated)"
  # Held by agent 1 now: a pull through it takes nothing from the origins' fetch again.
  assert_eq "$b" "sha256:$(curl -sf "${AGENT_URLS[1]}/v2/library/fresh/blobs/$b?ns=upstream.test" | sha256sum | cut -d' ' -f1)" \
    "blob $b through agent 1 after its preheat"
done

log "the tag moves upstream: agents serve the new target within the origin's and their tag_ttl"
$MKIMAGE random "$T/app2" v1 1M >/dev/null
push_up "$T/app2" v1 library/app
new_digest=$(skopeo_ inspect --raw --cert-dir "$T/certs.d" docker://upstream.test/library/app:v1 | sha256sum | cut -d' ' -f1)
[[ $new_digest != "$app_digest" ]] || die "the re-pushed tag did not move"
# manifest_digest URL: the Docker-Content-Digest a HEAD of URL answers.
manifest_digest() {
  curl -sI -H 'Accept: application/vnd.oci.image.manifest.v1+json' "$1" | tr -d '\r' |
    awk 'tolower($1) == "docker-content-digest:" {print $2}'
}
moved_at() { [[ $(manifest_digest "$1") == "sha256:$new_digest" ]]; }
wait_until 10 "agent 1 to serve the moved tag" moved_at "${AGENT_URLS[1]}/v2/library/app/manifests/v1?ns=upstream.test"
wait_until 10 "agent 0 to serve the moved tag" moved_at "${AGENT_URLS[0]}/v2/upstream.test/library/app/manifests/v1"

log "mirrored repositories are read-only"
assert_eq 403 "$(curl -s -o /dev/null -w '%{http_code}' -X POST "$ORIGIN_URL/v2/upstream.test/library/app/blobs/uploads/")" \
  "POST upload into upstream.test/library/app"
metric "$ORIGIN_URL" shoal_upstream_cache_total >/dev/null || die "no shoal_upstream_cache_total on the origin"

log "the upstream goes down: a private tag's last target only to credentials it accepted"
stop_pid "$UP_PID" upstream
sleep 2.5 # past tag_ttl: the origin must ask the upstream, and cannot
private_tag="$ORIGIN_URL/v2/upstream.test/private/app/manifests/v1"
accept='Accept: application/vnd.oci.image.manifest.v1+json'
assert_eq 200 "$(curl -s -o /dev/null -w '%{http_code}' -H "$accept" -u alice:alice-secret "$private_tag")" \
  "alice's stale private tag"
assert_eq 401 "$(curl -s -o /dev/null -w '%{http_code}' -H "$accept" -u alice:wrong "$private_tag")" \
  "a wrong password's stale private tag"
assert_eq 401 "$(curl -s -o /dev/null -w '%{http_code}' -H "$accept" "$private_tag")" "anonymous stale private tag"
log "PASS"
