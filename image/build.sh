#!/usr/bin/env bash
# Build Shoal's container image from a binary built on this machine, with no base image and
# no network: the image holds the `shoal` binary, the shared libraries `ldd` says it needs,
# CA certificates, and a non-root user. The same script serves users (`image/build.sh`) and
# the tests (which pass the debug binary they just built).
#
#   image/build.sh [--binary target/release/shoal] [--tag shoal:VERSION] [--context-only DIR]
#
# The docker CLI comes from $DOCKER_CLI (default `docker`) and talks to $DOCKER_HOST as usual.
# --context-only writes the build context to DIR and stops (to build it elsewhere).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

binary=$root/target/release/shoal
tag=
context_only=
while (($#)); do
  case $1 in
    --binary) binary=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --context-only) context_only=$2; shift 2 ;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[[ -x $binary ]] || { echo "no executable at $binary: run 'cargo build --release' first" >&2; exit 1; }
version=$("$binary" --version | awk '{print $2}')
tag=${tag:-shoal:$version}

# The user the image runs as (distroless' "nonroot" id, so volume permissions match theirs).
readonly SHOAL_UID=65532

if [[ -n $context_only ]]; then
  ctx=$context_only
  rm -rf "$ctx"
  mkdir -p "$ctx"
else
  ctx=$(mktemp -d /tmp/shoal-image.XXXXXX)
  trap 'rm -rf "$ctx"' EXIT
fi
rootfs=$ctx/rootfs
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$ctx/home"
install -m 0755 "$binary" "$rootfs/usr/local/bin/shoal"

# Every shared library the binary loads, the dynamic loader included, at the path ldd names
# (symlinks resolved, so the file is real). glibc >= 2.34 has DNS and files lookups built in,
# so no NSS modules are needed.
ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done

cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
cat >"$rootfs/etc/passwd" <<PASSWD
root:x:0:0:root:/root:/sbin/nologin
shoal:x:$SHOAL_UID:$SHOAL_UID:shoal:/var/lib/shoal:/sbin/nologin
PASSWD
cat >"$rootfs/etc/group" <<GROUP
root:x:0:
shoal:x:$SHOAL_UID:
GROUP
printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
chmod 1777 "$rootfs/tmp"
tar --sort=name --owner=0 --group=0 --numeric-owner -C "$rootfs" -cf "$ctx/rootfs.tar" .
rm -rf "$rootfs"
cp "$here/Dockerfile" "$ctx/Dockerfile"

if [[ -n $context_only ]]; then
  echo "build context in $ctx (docker build -t $tag $ctx)"
  exit 0
fi
"${DOCKER_CLI:-docker}" build --build-arg "VERSION=$version" -t "$tag" "$ctx"
echo "built $tag"
