#!/usr/bin/env bash
# The container image: image/build.sh builds it offline from the binary under test (no base
# image, no network), and the binary runs inside it as the non-root user: `shoal --version`
# prints the binary's own version, and `shoal node setup` (as the chart's init container runs
# it, as root) writes a containerd hosts.toml into a bind-mounted directory.
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
lib_init image
require_shoal_under_test

start_containerd
start_dockerd

tag=shoal-test/shoal:it
log "building $tag from $SHOAL_BIN"
DOCKER_HOST="unix://$DOCKER_SOCK" DOCKER_CLI=$DOCKER_CLI \
  bash "$(dirname "$0")/../../image/build.sh" --binary "$SHOAL_BIN" --tag "$tag" >"$T/build.log" 2>&1 ||
  { cat "$T/build.log" >&2; die "image/build.sh failed"; }

want=$("$SHOAL_BIN" --version)
got=$(dk run --rm --network none "$tag" --version)
assert_eq "$want" "$got" "shoal --version inside the image"
assert_eq "65532:65532" "$(dk image inspect -f '{{.Config.User}}' "$tag")" "the image's user"

# The working directory belongs to the image's non-root user (default data dirs are relative).
dk run --rm --network none "$tag" node setup --data-dir shoal-data/agent >"$T/home.log" 2>&1 ||
  { cat "$T/home.log" >&2; die "the image's user cannot write its working directory"; }

# The chart's init container: root, read-only root filesystem, the node's certs.d mounted.
mkdir -p "$T/certs.d"
dk run --rm --network none --user 0:0 --read-only -v "$T/certs.d:/host/certs.d" "$tag" \
  node setup --hosts-dir /host/certs.d --registry registry.example:5000 --mirror http://127.0.0.1:5000 \
  >"$T/setup.log" 2>&1 || { cat "$T/setup.log" >&2; die "shoal node setup in the image failed"; }
grep -q '^\[host."http://127.0.0.1:5000"\]' "$T/certs.d/registry.example:5000/hosts.toml" ||
  die "node setup in the image wrote no mirror entry: $(cat "$T/certs.d/registry.example:5000/hosts.toml")"

# Name resolution works in the empty base (glibc's built-in files lookup): `node wait` resolves
# localhost and names the address it could not reach.
out=$(dk run --rm --network none --read-only --tmpfs /var/lib/shoal:uid=65532 "$tag" \
  node wait --endpoint localhost:9 --timeout 1s 2>&1 || true)
grep -qi "127.0.0.1:9\|\[::1\]:9" <<<"$out" || die "node wait could not resolve localhost inside the image: $out"
log "image $tag: $(dk image inspect -f '{{.Size}}' "$tag") bytes"
