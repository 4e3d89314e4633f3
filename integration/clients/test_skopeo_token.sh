#!/usr/bin/env bash
# Docker token auth with a real client (issue 12): an origin with `[auth] tokens = true`,
# a private and a public repository pattern, and an agent. skopeo pushes with --dest-creds
# (401 Bearer challenge, token from /token, retry), pulls the private image back with a
# pull-only user's credentials from the origin and through the agent (which checks the
# token itself and forwards it to the origin), and fails without credentials; the public
# image is pulled anonymously (anonymous token) from both. A pull-only user cannot push.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
lib_init skopeo_token
require_shoal_under_test
command -v skopeo >/dev/null || die "skopeo is not installed"

root=$T/token
mkdir -p "$root/origin" "$root/agent"
alice_hash=$(printf 'alice-pass' | "$SHOAL_BIN" passwd) || die "shoal passwd failed"
cat >"$root/origin.toml" <<TOML
[auth]
tokens = true
users = [
  { name = "ci", password = "ci-pass", access = "none" },
  { name = "alice", password_argon2 = "$alice_hash", access = "none" },
]
[[auth.rules]]
repositories = "private/*"
pull = ["alice"]
push = ["ci"]
delete = ["ci"]
[[auth.rules]]
repositories = "public/*"
push = ["ci"]
anonymous_pull = true
TOML

port=$(free_port)
ORIGIN=127.0.0.1:$port
ORIGIN_URL=http://$ORIGIN
ORIGIN_LOG=$T/origin.log
shoal_bg origin "$ORIGIN_LOG" origin --listen "$ORIGIN" --peer-listen "127.0.0.1:$(free_port)" \
  --data-dir "$root/origin" --config "$root/origin.toml"
wait_ready 30 "$BG_PID" "shoal origin" is_200 "$ORIGIN_URL/healthz" || die "$WAIT_ERR (log: $ORIGIN_LOG)"
register_log "$ORIGIN_LOG"

port=$(free_port)
TRACKER_URL=http://127.0.0.1:$port
shoal_bg tracker "$T/tracker.log" tracker --listen "127.0.0.1:$port" --origin "$ORIGIN_URL"
wait_ready 30 "$BG_PID" "shoal tracker" is_200 "$TRACKER_URL/healthz" || die "$WAIT_ERR"

port=$(free_port)
AGENT=127.0.0.1:$port
AGENT_LOG=$T/agent.log
shoal_bg agent "$AGENT_LOG" agent --listen "$AGENT" --peer-listen "127.0.0.1:$(free_port)" \
  --origin "$ORIGIN_URL" --tracker "$TRACKER_URL" --data-dir "$root/agent"
wait_ready 30 "$BG_PID" "shoal agent" is_200 "http://$AGENT/healthz" || die "$WAIT_ERR (log: $AGENT_LOG)"
register_log "$AGENT_LOG"

src=$T/src
want=$(oci_random_image "$src" v1 2M,1K)
log "built $src:v1 = $want"

for repo in private/app public/app; do
  skopeo_ copy -q --dest-tls-verify=false --dest-creds ci:ci-pass --preserve-digests "oci:$src:v1" \
    "docker://$ORIGIN/$repo:v1" || die "skopeo push of $repo with ci's credentials failed"
done
log "pushed private/app and public/app as ci"

if skopeo_ copy -q --dest-tls-verify=false --dest-creds alice:alice-pass "oci:$src:v1" \
  "docker://$ORIGIN/private/app:alice" 2>"$T/alice-push.err"; then
  die "alice (pull only) pushed"
fi
log "alice cannot push: $(tail -1 "$T/alice-push.err")"

for reg in "$ORIGIN" "$AGENT"; do
  skopeo_ inspect --tls-verify=false --creds alice:alice-pass --raw "docker://$reg/private/app:v1" >"$T/raw.json" ||
    die "alice could not read private/app through $reg"
  assert_eq "$want" "$(sha256_of "$T/raw.json")" "private manifest through $reg"
  rm -rf "$T/back"
  skopeo_ copy -q --src-tls-verify=false --src-creds alice:alice-pass --preserve-digests "docker://$reg/private/app:v1" "oci:$T/back:v1" ||
    die "alice could not pull private/app through $reg"
  diff <(layout_blobs "$src") <(layout_blobs "$T/back") >&2 || die "blobs differ after pulling through $reg"
  if skopeo_ inspect --tls-verify=false --raw "docker://$reg/private/app:v1" >/dev/null 2>"$T/anon.err"; then
    die "an anonymous client read private/app through $reg"
  fi
  skopeo_ inspect --tls-verify=false --raw "docker://$reg/public/app:v1" >"$T/pub.json" ||
    die "anonymous pull of public/app through $reg failed"
  assert_eq "$want" "$(sha256_of "$T/pub.json")" "public manifest through $reg"
  log "through $reg: alice pulls private/app, anonymous is refused, public/app is open"
done

# The agent decided from the origin's keys: its log names alice as the principal.
grep -q 'principal=alice' "$AGENT_LOG" || die "the agent's request log does not name alice"
log "PASS"
