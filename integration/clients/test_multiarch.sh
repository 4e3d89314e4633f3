#!/usr/bin/env bash
# A two-platform OCI index (linux/amd64 + linux/arm64): push it whole with
# `skopeo copy --all --preserve-digests`, read it back byte-identical, then pull it with
# containerd for one platform and for all platforms and check which blobs arrived.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
lib_init multiarch

start_registry_under_test
start_containerd

src=$T/src
index=$(oci_multiarch_image "$src" v1)
idx_file=$src/blobs/sha256/${index#sha256:}
amd=$(jq -r '.manifests[] | select(.platform.architecture=="amd64") | .digest' "$idx_file")
arm=$(jq -r '.manifests[] | select(.platform.architecture=="arm64") | .digest' "$idx_file")
log "index $index: amd64 $amd, arm64 $arm"

# manifest_blobs LAYOUT MANIFEST_DIGEST: the manifest, its config and layers.
manifest_blobs() {
  local m=$1/blobs/sha256/${2#sha256:}
  echo "$2"
  jq -r '.config.digest, .layers[].digest' "$m"
}

ref=$REG/multi/arch:v1
skopeo_ copy -q --all --preserve-digests --dest-tls-verify=false "oci:$src:v1" "docker://$ref" ||
  die "skopeo copy --all of the index failed"

skopeo_ inspect --raw --tls-verify=false "docker://$ref" >"$T/index.json" || die "skopeo inspect --raw of the index failed"
assert_eq "$index" "$(sha256_of "$T/index.json")" "index digest read back by tag"
cmp -s "$T/index.json" "$idx_file" || die "index bytes differ from what was pushed"
ct=$(curl -sf -o /dev/null -w '%{content_type}' -H "Accept: application/vnd.oci.image.index.v1+json" \
  "$REG_URL/v2/multi/arch/manifests/v1")
assert_eq "application/vnd.oci.image.index.v1+json" "$ct" "Content-Type of GET index"
for m in "$amd" "$arm"; do
  skopeo_ inspect --raw --tls-verify=false "docker://$REG/multi/arch@$m" >"$T/m.json" ||
    die "skopeo inspect --raw of child manifest $m failed"
  assert_eq "$m" "$(sha256_of "$T/m.json")" "child manifest digest"
done

# One platform: containerd must fetch the index and the arm64 image only.
log "ctr pull --platform linux/arm64 $ref"
ctr_ -n arm images pull --plain-http --platform linux/arm64 "$ref" >"$T/pull-arm.out" 2>&1 || {
  cat "$T/pull-arm.out" >&2
  die "ctr pull --platform linux/arm64 failed"
}
# (ctr images ls complains on stderr that it cannot size the absent amd64 image: expected.)
assert_eq "$index" "$(ctr_ -n arm images ls 2>/dev/null | awk -v r="$ref" '$1==r {print $3}')" \
  "digest of $ref in ctr images ls (arm)"
ctr_ -n arm content ls -q | sort >"$T/arm.content"
for d in "$index" $(manifest_blobs "$src" "$arm"); do
  grep -qx "$d" "$T/arm.content" || die "arm64 pull lacks blob $d"
done
amd_layer=$(jq -r '.layers[0].digest' "$src/blobs/sha256/${amd#sha256:}")
if grep -qx "$amd_layer" "$T/arm.content"; then die "arm64-only pull fetched the amd64 layer $amd_layer"; fi

# All platforms: every blob of both images.
log "ctr pull --all-platforms $ref"
ctr_ -n all images pull --plain-http --all-platforms "$ref" >"$T/pull-all.out" 2>&1 || {
  cat "$T/pull-all.out" >&2
  die "ctr pull --all-platforms failed"
}
ctr_ -n all images ls >"$T/ls-all"
assert_eq "$index" "$(awk -v r="$ref" '$1==r {print $3}' "$T/ls-all")" "digest of $ref in ctr images ls (all)"
grep -F "$ref" "$T/ls-all" | grep -q 'linux/amd64' || die "ctr images ls does not list linux/amd64: $(cat "$T/ls-all")"
grep -F "$ref" "$T/ls-all" | grep -q 'linux/arm64' || die "ctr images ls does not list linux/arm64: $(cat "$T/ls-all")"
ctr_ -n all content ls -q | sort >"$T/all.content"
diff <(layout_blobs "$src") "$T/all.content" >&2 || die "all-platforms pull: content differs from the layout (< layout, > containerd)"

# And skopeo can pull the whole index back.
skopeo_ copy -q --all --preserve-digests --src-tls-verify=false "docker://$ref" "oci:$T/back:v1" ||
  die "skopeo copy --all back from the registry failed"
diff <(layout_blobs "$src") <(layout_blobs "$T/back") >&2 || die "skopeo --all round trip: blob sets differ"

log "PASS"
