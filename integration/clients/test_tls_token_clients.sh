#!/usr/bin/env bash
# Docker's token flow over TLS with real clients: an origin with `[auth] tokens = true`, a
# private and a public repository pattern, TLS everywhere from a CA made here (agents hold
# node certificates, so they read private repositories at the origin as nodes).
# - docker login + docker push to the origin; a pull-only user cannot push;
# - docker login to an agent (its challenge names the origin's realm) + docker pull of the
#   private image through it; anonymous docker pull of it fails;
# - ctr --user through a containerd mirror (hosts.toml with the CA) gets the private image;
#   ctr without credentials does not, but gets the public one;
# - skopeo with --creds and --cert-dir through the other agent.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
lib_init tls_token_clients
require_shoal_under_test

make_tls_pki "$T/pki"
ci_hash=$(printf 'ci-pass' | "$SHOAL_BIN" passwd) || die "shoal passwd failed"
alice_hash=$(printf 'alice-pass' | "$SHOAL_BIN" passwd) || die "shoal passwd failed"
cat >"$T/origin.toml" <<TOML
[auth]
tokens = true
users = [
  { name = "ci", password_argon2 = "$ci_hash", access = "none" },
  { name = "alice", password_argon2 = "$alice_hash", access = "none" },
]
[[auth.rules]]
repositories = "private/*"
pull = ["alice"]
push = ["ci"]
[[auth.rules]]
repositories = "public/*"
push = ["ci"]
anonymous_pull = true
TOML
SHOAL_ORIGIN_ARGS="--config $T/origin.toml" start_shoal_cluster 2
start_containerd
start_dockerd

docker_import_busybox shoal-test/busybox:local
local_id=$(dk image inspect -f '{{.Id}}' shoal-test/busybox:local)

# --- docker login + push to the origin ------------------------------------------------
if dk push "$ORIGIN/private/app:1" >/dev/null 2>&1; then die "docker push without login succeeded"; fi
printf 'alice-pass' | dk login -u alice --password-stdin "$ORIGIN" >/dev/null || die "docker login as alice failed"
dk tag shoal-test/busybox:local "$ORIGIN/private/app:1"
if dk push "$ORIGIN/private/app:1" >"$T/alice-push.out" 2>&1; then die "alice (pull only) could push"; fi
printf 'ci-pass' | dk login -u ci --password-stdin "$ORIGIN" >/dev/null || die "docker login as ci failed"
dk push "$ORIGIN/private/app:1" >"$T/push.out" 2>&1 || { cat "$T/push.out" >&2; die "docker push as ci failed"; }
dk tag shoal-test/busybox:local "$ORIGIN/public/app:1"
dk push "$ORIGIN/public/app:1" >"$T/push2.out" 2>&1 || { cat "$T/push2.out" >&2; die "docker push of the public image failed"; }
pushed=$(awk '/digest: sha256:/ {for (i=1;i<=NF;i++) if ($i=="digest:") print $(i+1)}' "$T/push.out")
log "ci pushed private/app:1 as $pushed over TLS with a token"
grep -q 'ci' "$ORIGIN_LOG" || die "the origin's log names no principal"
dk rmi "$ORIGIN/private/app:1" "$ORIGIN/public/app:1" shoal-test/busybox:local >/dev/null

# --- docker pull through agent 0: anonymous refused, alice allowed --------------------
ref=$AGENT/private/app:1
if dk pull "$ref" >"$T/anon.out" 2>&1; then die "anonymous docker pull of $ref succeeded"; fi
printf 'alice-pass' | dk login -u alice --password-stdin "$AGENT" >/dev/null || die "docker login to the agent failed"
dk pull "$ref" >"$T/pull.out" 2>&1 || { cat "$T/pull.out" >&2; die "docker pull $ref as alice failed"; }
grep -q "Digest: $pushed" "$T/pull.out" || die "docker pull reported another digest: $(cat "$T/pull.out")"
assert_eq "$local_id" "$(dk image inspect -f '{{.Id}}' "$ref")" "image ID through the agent"
assert_eq ok "$(dk run --rm --network none "$ref" /bin/sh -c 'echo ok')" "docker run $ref"

# --- containerd through agent 1 as a TLS mirror ---------------------------------------
hosts=$T/hosts.d
ctr_hosts_dir "$hosts" "$ORIGIN" "${AGENT_URLS[1]}" "$TLS_DIR/ca.pem"
if ctr_ -n anon images pull --hosts-dir "$hosts" "$ORIGIN/private/app:1" >"$T/ctr-anon.out" 2>&1; then
  die "ctr pulled the private image without credentials"
fi
ctr_ -n anon images pull --hosts-dir "$hosts" "$ORIGIN/public/app:1" >"$T/ctr-public.out" 2>&1 || {
  cat "$T/ctr-public.out" >&2
  die "anonymous ctr pull of the public image failed"
}
ctr_ -n alice images pull --user alice:alice-pass --hosts-dir "$hosts" "$ORIGIN/private/app:1" >"$T/ctr.out" 2>&1 || {
  cat "$T/ctr.out" >&2
  die "ctr --user alice pull through the agent failed"
}
assert_eq "$pushed" "$(ctr_ -n alice images ls | awk -v r="$ORIGIN/private/app:1" '$1==r {print $3}')" "digest in ctr"
assert_eq ok "$(ctr_ -n alice run --rm "$ORIGIN/private/app:1" "it-$RANDOM" /bin/sh -c 'echo ok')" "ctr run"

# --- skopeo with credentials through agent 1 ------------------------------------------
certs=$T/skopeo-certs
mkdir -p "$certs"
cp "$TLS_DIR/ca.pem" "$certs/ca.crt"
got=$(skopeo_ inspect --cert-dir "$certs" --creds alice:alice-pass --format '{{.Digest}}' \
  "docker://${AGENTS[1]}/private/app:1") || die "skopeo inspect through agent 1 failed"
assert_eq "$pushed" "$got" "digest skopeo reads through agent 1"
if skopeo_ inspect --cert-dir "$certs" "docker://${AGENTS[1]}/private/app:1" >/dev/null 2>&1; then
  die "anonymous skopeo inspect of the private image succeeded"
fi
# skopeo copy with credentials on both ends: out of the agent as alice, into the origin as ci.
skopeo_ copy -q --src-cert-dir "$certs" --src-creds alice:alice-pass --dest-cert-dir "$certs" \
  --dest-creds ci:ci-pass --preserve-digests "docker://${AGENTS[1]}/private/app:1" \
  "docker://$ORIGIN/private/copy:1" || die "skopeo copy with credentials over TLS failed"
got=$(skopeo_ inspect --cert-dir "$certs" --creds alice:alice-pass --format '{{.Digest}}' \
  "docker://$ORIGIN/private/copy:1") || die "skopeo inspect of the copy failed"
assert_eq "$pushed" "$got" "digest of the copy skopeo made"
log "PASS"
