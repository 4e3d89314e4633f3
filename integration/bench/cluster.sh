#!/usr/bin/env bash
# Benchmark (not a test): what replication costs and how fast a new origin is filled.
#  1. Push of a 1 GiB image (4 × 256 MiB random, uncompressed layers) with skopeo into a
#     3-origin cluster (R = 2, write quorum 2: every blob is written to two origins before
#     201) and into a single origin, both on the same filesystem; medians and their ratio.
#  2. Repair throughput: the cluster's member list has a fourth origin that is not started
#     during the pushes (health checks mark it down, so placement is over the three); then
#     it starts and one repair pass runs on all four origins at once. Reported: bytes copied
#     (the sum of the passes' copied_bytes) ÷ wall time of the passes, in GB/s.
#
#   integration/bench/cluster.sh
# Environment:
#   BENCH_ROUNDS=3            rounds; medians are reported (the cluster keeps every round's image,
#                             so the repair pass moves about ROUNDS × 1 GiB × 1/2)
#   BENCH_LAYERS=4            layers per image
#   BENCH_LAYER_MIB=256       size of each layer
#   BENCH_REPAIR_RATE=100GiB  [cluster] repair_rate (per origin, per second): high, so the pass
#                             measures the origins and not the limiter
#   BENCH_DATA_BASE=/tmp      where every origin keeps its data
#   SHOAL_BIN                 a release build (cargo build --release; SHOAL_BIN=target/release/shoal)
#
# Each round builds a fresh random image on a tmpfs (outside the timed window), pushes it to
# a fresh repository, and empties skopeo's blob-info cache before every copy. Which target
# goes first alternates between rounds. The background repair loop is slowed to once an
# hour so the only repair is the timed pass.
set -euo pipefail
source "$(dirname "$0")/../clients/lib.sh"
lib_init bench-cluster
require_shoal_under_test
[[ -x $SHOAL_BIN ]] || die "shoal binary not found at SHOAL_BIN=$SHOAL_BIN"
if [[ $SHOAL_BIN == */debug/* ]]; then
  log "WARNING: $SHOAL_BIN looks like a debug build; use cargo build --release and SHOAL_BIN=target/release/shoal"
fi

ROUNDS=${BENCH_ROUNDS:-3}
LAYERS=${BENCH_LAYERS:-4}
LAYER_MIB=${BENCH_LAYER_MIB:-256}
REPAIR_RATE=${BENCH_REPAIR_RATE:-100GiB}
TOTAL_MIB=$((LAYERS * LAYER_MIB))

fast=$T/tmpfs
mkdir -p "$fast"
mount -t tmpfs -o size=$((TOTAL_MIB + 256))m shoal-bench "$fast"
on_exit "umount '$fast' 2>/dev/null || umount -l '$fast'"

data_base=$(mktemp -d "${BENCH_DATA_BASE:-/tmp}/shoal-bench-cluster.XXXXXX")
on_exit "rm -rf '$data_base'"

start_registry shoal "$data_base/single"
SINGLE=$REG

# Production health-check defaults: two busy cores must not make an origin look dead.
# shellcheck disable=SC2034 # read by origin_cluster_config in lib.sh
ORIGIN_CLUSTER_TOML=$(printf '%s\n' 'health_interval = "1s"' 'health_fails = 3' 'health_passes = 2' \
  'repair_interval = "1h"' "repair_rate = \"$REPAIR_RATE\"")
OC_DATA_BASE=$data_base/cluster start_origin_cluster 4 2 3
CLUSTER=${OC_IDS[0]}

now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", b - a}'; }

results=$T/results.tsv # target round seconds
: >"$results"
log "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), data on $(findmnt -n -o FSTYPE -T "$data_base") ($data_base)"
log "image: $LAYERS x $LAYER_MIB MiB random layers, $ROUNDS rounds; single origin $SINGLE, cluster via $CLUSTER (R=2 of 3 live)"

declare -A ADDR=([single]=$SINGLE [cluster]=$CLUSTER)
for ((r = 1; r <= ROUNDS; r++)); do
  src=$fast/src
  rm -rf "$src"
  sizes=$(printf "${LAYER_MIB}M,%.0s" $(seq "$LAYERS"))
  want=$(oci_random_image "$src" img "${sizes%,}")
  bytes=$(du -sb --apparent-size "$src/blobs" | cut -f1)
  order=(single cluster)
  ((r % 2 == 0)) && order=(cluster single)
  for target in "${order[@]}"; do
    ref=docker://${ADDR[$target]}/bench/round$r-$RANDOM:img
    skopeo_clear_cache
    sync
    t0=$(now)
    skopeo_ copy -q --preserve-digests --dest-tls-verify=false "oci:$src:img" "$ref" ||
      die "$target: push failed in round $r"
    t1=$(now)
    printf '%s\t%d\t%s\n' "$target" "$r" "$(elapsed "$t0" "$t1")" >>"$results"
    # Outside the timed window: the cluster serves the manifest through another origin.
    if [[ $target == cluster ]]; then
      skopeo_ inspect --tls-verify=false --raw "${ref/${OC_IDS[0]}/${OC_IDS[1]}}" >"$T/raw.json" ||
        die "cluster: inspect through origin 1 failed in round $r"
      assert_eq "$want" "$(sha256_of "$T/raw.json")" "manifest through origin 1, round $r"
    fi
    log "round $r $target: push $(elapsed "$t0" "$t1")s"
  done
done

median() { # median TARGET
  awk -v k="$1" '$1==k {print $3}' "$results" | sort -n |
    awk '{v[NR]=$1} END {if (NR==0) print "nan"; else if (NR%2) print v[(NR+1)/2]; else printf "%.3f\n", (v[NR/2]+v[NR/2+1])/2}'
}
single_s=$(median single)
cluster_s=$(median cluster)

log "starting the fourth origin and running one repair pass on all four"
start_cluster_origin 3
wait_cluster_up 4
t0=$(now)
for ((i = 0; i < 4; i++)); do
  oc_admin POST "${OC_URLS[i]}" repair >"$T/repair$i.json" &
  rpids[i]=$!
done
for ((i = 0; i < 4; i++)); do wait "${rpids[i]}" || die "repair pass on origin $i failed"; done
t1=$(now)
repair_s=$(elapsed "$t0" "$t1")
copied_bytes=$(jq -s 'map(.copied_bytes) | add' "$T"/repair[0-3].json)
copied_blobs=$(jq -s 'map(.copied_blobs) | add' "$T"/repair[0-3].json)
failures=$(jq -s 'map(.failures) | add' "$T"/repair[0-3].json)

echo
echo "== origin cluster, $LAYERS x $LAYER_MIB MiB image ($bytes bytes), median of $ROUNDS rounds =="
echo "(MB = 10^6 bytes)"
printf '%-22s %10s %10s\n' target "push s" "push MB/s"
for target in single cluster; do
  s=$(median "$target")
  printf '%-22s %10s %10.1f\n' "$target" "$s" "$(awk -v b="$bytes" -v s="$s" 'BEGIN {print b / s / 1e6}')"
done
printf '%-22s %10s\n' "cluster/single" "$(awk -v a="$cluster_s" -v b="$single_s" 'BEGIN {printf "%.2f", a / b}')"
echo "(ratio of seconds: above 1 means replication to two origins costs that factor)"
echo
echo "== repair after adding a fourth origin (repair_rate $REPAIR_RATE per origin) =="
printf 'copied %s blobs, %s bytes in %s s: %s GB/s (%s failures)\n' "$copied_blobs" "$copied_bytes" "$repair_s" \
  "$(awk -v b="$copied_bytes" -v s="$repair_s" 'BEGIN {printf "%.3f", b / s / 1e9}')" "$failures"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
