#!/usr/bin/env bash
# Origin cluster under a network partition. Three origins, each in its own network namespace
# (10.77.0.1-3 on a bridge that lives in a namespace of its own), R = 2, write_quorum = 1 so
# both sides of the partition keep accepting writes. Origin 2's link is cut at the bridge;
# tag `t` is written to image X through origin 0, then (later) to image Y through origin 2.
# After the link is restored and repair has run, every origin answers tag `t` with Y (the
# documented rule: the latest timestamp wins, then the greater origin id), and every blob of
# X and Y is intact, through every origin and as exactly two files on the origins' disks.
#
# Each client call runs inside the namespace of the origin it talks to: a cut link does not
# take an origin's own address away, so origin 2 stays writable from its side.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
lib_init cluster_partition
require_shoal_under_test
command -v ip >/dev/null || die "ip (iproute2) missing"
[[ -x $SHOAL_BIN ]] || die "shoal binary not found at SHOAL_BIN=$SHOAL_BIN"

N=3
PORT=5000
tag=p$$ # short, unique names: interface names are limited to 15 bytes
BR_NS=shoal-$tag-br
NS=() ADDR=() URL=() VETH=() PEER=() PIDS=() DATA=() LOGS=()
for ((i = 0; i < N; i++)); do
  NS[i]=shoal-$tag-o$i
  ADDR[i]=10.77.0.$((i + 1))
  URL[i]=http://${ADDR[i]}:$PORT
  VETH[i]=${tag}n$i # origin side
  PEER[i]=${tag}b$i # bridge side: the end that is cut
  DATA[i]=$T/origin$i
done
LIST=$(printf '%s:'"$PORT"',' "${ADDR[@]}")
LIST=${LIST%,}

# Namespaces go last at exit (cleanups run in reverse): after the processes inside them.
ip netns add "$BR_NS"
on_exit "ip netns del '$BR_NS' 2>/dev/null"
ip -n "$BR_NS" link add br0 type bridge
ip -n "$BR_NS" link set br0 up
ip -n "$BR_NS" link set lo up
for ((i = 0; i < N; i++)); do
  ip netns add "${NS[i]}"
  on_exit "ip netns del '${NS[i]}' 2>/dev/null"
  ip link add "${VETH[i]}" netns "${NS[i]}" type veth peer name "${PEER[i]}" netns "$BR_NS"
  ip -n "${NS[i]}" addr add "${ADDR[i]}/24" dev "${VETH[i]}"
  ip -n "${NS[i]}" link set "${VETH[i]}" up
  ip -n "${NS[i]}" link set lo up
  ip -n "$BR_NS" link set "${PEER[i]}" master br0 up
done
log "namespaces up: ${NS[*]} on bridge br0 in $BR_NS"

# in_ns I CMD...: run CMD inside origin I's namespace.
in_ns() {
  local i=$1
  shift
  ip netns exec "${NS[i]}" "$@"
}

SHOAL_CLUSTER_SECRET=it-secret-$RANDOM$RANDOM$RANDOM
export SHOAL_CLUSTER_SECRET
ORIGIN_CLUSTER_TOML='write_quorum = 1'
origin_cluster_config "$T/config.toml"
for ((i = 0; i < N; i++)); do
  mkdir -p "${DATA[i]}"
  LOGS[i]=$T/origin$i.log
  start_bg "origin$i" "${LOGS[i]}" ip netns exec "${NS[i]}" "$SHOAL_BIN" origin \
    --listen "${ADDR[i]}:$PORT" --peer-listen "${ADDR[i]}:0" --data-dir "${DATA[i]}" \
    --config "$T/config.toml" --cluster "$LIST" --replicas 2
  PIDS[i]=$BG_PID
done
for ((i = 0; i < N; i++)); do
  wait_ready 30 "${PIDS[i]}" "origin $i" in_ns "$i" curl -sf --max-time 2 "${URL[i]}/healthz" ||
    die "$WAIT_ERR (log: ${LOGS[i]})"
done

admin() { # admin I METHOD PATH
  in_ns "$1" curl -sSf --max-time 600 -X "$2" -H "Authorization: Bearer $SHOAL_CLUSTER_SECRET" \
    "${URL[$1]}/shoal/v1/admin/$3"
}
# sees I ID UP: origin I sees member ID with up == UP (true/false).
sees() { [[ $(admin "$1" GET members | jq -r --arg id "$2" '.[] | select(.id == $id) | .up') == "$3" ]]; }
all_see_all_up() {
  local i j
  for ((i = 0; i < N; i++)); do
    for ((j = 0; j < N; j++)); do sees "$i" "${ADDR[j]}:$PORT" true || return 1; done
  done
}
wait_until 30 "every origin to see every origin up" all_see_all_up
log "cluster up: $LIST"

# push_layout I REPO TAG LAYOUT: push the image of LAYOUT:TAG through origin I with curl
# (monolithic POST ?digest= per blob, then the manifest PUT under TAG); prints its digest.
push_layout() {
  local i=$1 repo=$2 ref=$3 layout=$4 manifest digest code
  manifest=$(jq -r --arg t "$ref" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"]==$t) | .digest' "$layout/index.json")
  for digest in $(jq -r '.config.digest, .layers[].digest' "$layout/blobs/sha256/${manifest#sha256:}"); do
    code=$(in_ns "$i" curl -sS -o "$T/push-body" -w '%{http_code}' --max-time 60 -H 'Expect:' \
      -H 'Content-Type: application/octet-stream' --data-binary "@$layout/blobs/sha256/${digest#sha256:}" \
      "${URL[i]}/v2/$repo/blobs/uploads/?digest=$digest")
    [[ $code == 201 ]] || die "blob $digest through origin $i: $code $(cat "$T/push-body")"
  done
  code=$(in_ns "$i" curl -sS -o "$T/push-body" -w '%{http_code}' --max-time 60 -X PUT \
    -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
    --data-binary "@$layout/blobs/sha256/${manifest#sha256:}" "${URL[i]}/v2/$repo/manifests/$ref")
  [[ $code == 201 ]] || die "manifest $repo:$ref through origin $i: $code $(cat "$T/push-body")"
  echo "$manifest"
}

# tag_digest I REPO TAG: the digest origin I answers for REPO:TAG (empty if none).
tag_digest() {
  in_ns "$1" curl -sf --max-time 10 -o "$T/m-$1" -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "${URL[$1]}/v2/$2/manifests/$3" || return 0
  sha256_of "$T/m-$1"
}

oci_random_image "$T/x" t 1M,300K >/dev/null
oci_random_image "$T/y" t 2M,100K >/dev/null
repo=partition/app

log "cutting origin 2's link (${PEER[2]} in $BR_NS)"
ip -n "$BR_NS" link set "${PEER[2]}" down
on_exit "ip -n '$BR_NS' link set '${PEER[2]}' up 2>/dev/null"
for ((i = 0; i < 2; i++)); do
  wait_until 30 "origin $i to see origin 2 down" sees "$i" "${ADDR[2]}:$PORT" false
  wait_until 30 "origin 2 to see origin $i down" sees 2 "${ADDR[i]}:$PORT" false
done

x=$(push_layout 0 "$repo" t "$T/x")
log "tag t -> X $x through origin 0"
# Tag versions carry a wall-clock timestamp: make sure Y's is strictly later than X's.
sleep 1
y=$(push_layout 2 "$repo" t "$T/y")
log "tag t -> Y $y through origin 2 (later)"
assert_eq "$x" "$(tag_digest 0 "$repo" t)" "tag t on the majority side during the partition"
assert_eq "$y" "$(tag_digest 2 "$repo" t)" "tag t on origin 2 during the partition"

log "restoring origin 2's link"
ip -n "$BR_NS" link set "${PEER[2]}" up
wait_until 30 "every origin to see every origin up again" all_see_all_up

settled() {
  local i b
  for ((i = 0; i < N; i++)); do admin "$i" POST repair >/dev/null || return 1; done
  for ((i = 0; i < N; i++)); do [[ $(tag_digest "$i" "$repo" t) == "$y" ]] || return 1; done
  for b in $(jq -r '.config.digest, .layers[].digest' "$T/x/blobs/sha256/${x#sha256:}" "$T/y/blobs/sha256/${y#sha256:}"); do
    [[ $(copies "$b") == 2 ]] || return 1
  done
}
copies() {
  local hex=${1#sha256:} i n=0
  for ((i = 0; i < N; i++)); do [[ -f ${DATA[i]}/blobs/sha256/${hex:0:2}/$hex ]] && n=$((n + 1)); done
  echo "$n"
}
wait_until 60 "repair to settle tag t on Y everywhere and two copies of every blob" settled
for ((i = 0; i < N; i++)); do
  assert_eq "$y" "$(tag_digest "$i" "$repo" t)" "tag t through origin $i after the partition healed"
done

# Every blob of both images, through every origin, re-hashed; both manifests by digest.
for ((i = 0; i < N; i++)); do
  for layout in "$T/x:$x" "$T/y:$y"; do
    dir=${layout%%:*} m=${layout#*:}
    got=$(in_ns "$i" curl -sf --max-time 10 -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
      "${URL[i]}/v2/$repo/manifests/$m" | sha256sum | cut -d' ' -f1)
    assert_eq "${m#sha256:}" "$got" "manifest $m through origin $i"
    for b in $(jq -r '.config.digest, .layers[].digest' "$dir/blobs/sha256/${m#sha256:}"); do
      got=$(in_ns "$i" curl -sf --max-time 30 "${URL[i]}/v2/$repo/blobs/$b" | sha256sum | cut -d' ' -f1)
      assert_eq "${b#sha256:}" "$got" "blob $b through origin $i"
    done
  done
done
log "PASS: tag t = Y everywhere; every blob of X and Y intact on two origins"
