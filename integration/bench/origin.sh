#!/usr/bin/env bash
# Benchmark (not a test): push and pull a 1 GiB image (4 × 256 MiB random, uncompressed
# layers) with skopeo against shoal origin and against docker-registry, started side by
# side, each with its own data dir on the same filesystem.
#
#   integration/bench/origin.sh
# Environment:
#   BENCH_ROUNDS=3        rounds; medians are reported
#   BENCH_LAYERS=4        layers per image
#   BENCH_LAYER_MIB=256   size of each layer
#   BENCH_DATA_BASE=/tmp  where both registries keep their data (same filesystem for both)
#   SHOAL_BIN             as for the tests; if missing, shoal is skipped with a message
#
# Each round builds a fresh random image (outside the timed window) and pushes it to a
# fresh repository, so no registry can answer "already have it" from an earlier round, and
# skopeo's blob-info cache is emptied before every copy. Pulls go to a fresh OCI layout on
# a tmpfs so the client's disk is not what is measured. Registries run one at a time, and
# which one goes first alternates between rounds.
set -euo pipefail
source "$(dirname "$0")/../clients/lib.sh"
lib_init bench

ROUNDS=${BENCH_ROUNDS:-3}
LAYERS=${BENCH_LAYERS:-4}
LAYER_MIB=${BENCH_LAYER_MIB:-256}
TOTAL_MIB=$((LAYERS * LAYER_MIB))
CLK_TCK=$(getconf CLK_TCK)

# tmpfs for the source image and the pulled copies: one image each, plus slack.
fast=$T/tmpfs
mkdir -p "$fast"
mount -t tmpfs -o size=$((TOTAL_MIB * 2 + 256))m shoal-bench "$fast"
on_exit "umount '$fast' 2>/dev/null || umount -l '$fast'"

data_base=$(mktemp -d "${BENCH_DATA_BASE:-/tmp}/shoal-bench-data.XXXXXX")
on_exit "rm -rf '$data_base'"

kinds=()
declare -A ADDR PID
shoal_skipped=
if [[ ! -x $SHOAL_BIN ]]; then
  shoal_skipped="no binary at SHOAL_BIN=$SHOAL_BIN"
elif REG_SOFT=1 start_registry shoal "$data_base/shoal"; then
  ADDR[shoal]=$REG PID[shoal]=$REG_PID
  kinds+=(shoal)
else
  shoal_skipped="$SHOAL_BIN origin did not come up: $WAIT_ERR"
fi
[[ -z $shoal_skipped ]] || log "SKIPPING shoal: $shoal_skipped"
# An unoptimised build hashes at a few tens of MB/s: its numbers say nothing about shoal.
if [[ -z $shoal_skipped && $SHOAL_BIN == */debug/* ]]; then
  log "WARNING: $SHOAL_BIN looks like a debug build; use cargo build --release and SHOAL_BIN=target/release/shoal"
fi
start_registry docker-registry "$data_base/docker-registry"
ADDR[docker-registry]=$REG PID[docker-registry]=$REG_PID
kinds+=(docker-registry)

cpu_secs() { awk -v t="$CLK_TCK" '{printf "%.2f", ($14 + $15) / t}' "/proc/$1/stat"; }
now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", b - a}'; }

results=$T/results.tsv # kind op round seconds server_cpu_seconds
: >"$results"
log "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), data on $(findmnt -n -o FSTYPE -T "$data_base") ($data_base)"
log "image: $LAYERS x $LAYER_MIB MiB random layers, $ROUNDS rounds, registries: ${kinds[*]}"

for ((r = 1; r <= ROUNDS; r++)); do
  src=$fast/src
  rm -rf "$src"
  sizes=$(printf "${LAYER_MIB}M,%.0s" $(seq "$LAYERS"))
  oci_random_image "$src" img "${sizes%,}" >/dev/null
  bytes=$(du -sb --apparent-size "$src/blobs" | cut -f1)

  order=("${kinds[@]}")
  if ((r % 2 == 0)); then mapfile -t order < <(printf '%s\n' "${kinds[@]}" | tac); fi
  for kind in "${order[@]}"; do
    reg=${ADDR[$kind]} pid=${PID[$kind]}
    ref=docker://$reg/bench/round$r-$RANDOM:img

    skopeo_clear_cache
    sync
    c0=$(cpu_secs "$pid") t0=$(now)
    skopeo_ copy -q --preserve-digests --dest-tls-verify=false "oci:$src:img" "$ref" ||
      die "$kind: push failed in round $r"
    t1=$(now) c1=$(cpu_secs "$pid")
    printf '%s\tpush\t%d\t%s\t%s\n' "$kind" "$r" "$(elapsed "$t0" "$t1")" "$(elapsed "$c0" "$c1")" >>"$results"

    dst=$fast/pull
    rm -rf "$dst"
    skopeo_clear_cache
    c0=$(cpu_secs "$pid") t0=$(now)
    skopeo_ copy -q --preserve-digests --src-tls-verify=false "$ref" "oci:$dst:img" ||
      die "$kind: pull failed in round $r"
    t1=$(now) c1=$(cpu_secs "$pid")
    printf '%s\tpull\t%d\t%s\t%s\n' "$kind" "$r" "$(elapsed "$t0" "$t1")" "$(elapsed "$c0" "$c1")" >>"$results"
    # Outside the timed window: what came back is what went in.
    diff -q <(layout_blobs "$src") <(layout_blobs "$dst") >/dev/null || die "$kind: pulled blobs differ in round $r"
    rm -rf "$dst"
    log "round $r $kind: push $(awk -v k="$kind" -v r="$r" '$1==k && $2=="push" && $3==r {print $4}' "$results")s," \
      "pull $(awk -v k="$kind" -v r="$r" '$1==k && $2=="pull" && $3==r {print $4}' "$results")s"
  done
done

median() { # median KIND OP COLUMN
  awk -v k="$1" -v o="$2" -v c="$3" '$1==k && $2==o {print $c}' "$results" | sort -n |
    awk '{v[NR]=$1} END {if (NR==0) print "nan"; else if (NR%2) print v[(NR+1)/2]; else printf "%.3f\n", (v[NR/2]+v[NR/2+1])/2}'
}

declare -A RSS
for kind in "${kinds[@]}"; do RSS[$kind]=$(peak_rss_kib "${PID[$kind]}"); done

echo
echo "== origin push/pull, $LAYERS x $LAYER_MIB MiB image ($bytes bytes), median of $ROUNDS rounds =="
echo "(MB = 10^6 bytes; server CPU = user+sys seconds of the registry process during the copy)"
printf '%-16s %10s %9s %9s %10s %9s %9s %12s\n' registry "push s" "push MB/s" "push cpu" "pull s" "pull MB/s" "pull cpu" "peak RSS MiB"
for kind in "${kinds[@]}"; do
  ps=$(median "$kind" push 4) pl=$(median "$kind" pull 4)
  printf '%-16s %10s %9.1f %9s %10s %9.1f %9s %12.1f\n' "$kind" \
    "$ps" "$(awk -v b="$bytes" -v s="$ps" 'BEGIN {print b / s / 1e6}')" "$(median "$kind" push 5)" \
    "$pl" "$(awk -v b="$bytes" -v s="$pl" 'BEGIN {print b / s / 1e6}')" "$(median "$kind" pull 5)" \
    "$(awk -v k="${RSS[$kind]}" 'BEGIN {print k / 1024}')"
done
if [[ -n ${PID[shoal]:-} ]]; then
  ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
  printf '%-16s %10s %9s %9s %10s %9s %9s %12s\n' "shoal/registry" \
    "$(ratio "$(median shoal push 4)" "$(median docker-registry push 4)")" "" "" \
    "$(ratio "$(median shoal pull 4)" "$(median docker-registry pull 4)")" "" "" \
    "$(ratio "${RSS[shoal]}" "${RSS[docker-registry]}")"
  echo "(ratios of seconds and of RSS: below 1 means shoal is faster / smaller)"
else
  echo "shoal skipped: $shoal_skipped"
fi
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
