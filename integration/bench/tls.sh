#!/usr/bin/env bash
# The cost of TLS (not a test): one seeder (the origin) to one cold agent over loopback,
# unshaped, a fresh blob each round, alternating a plain cluster and one with TLS
# everywhere (certificates from a CA made here, HTTPS listeners, the peer protocol over
# mutual TLS), so both see the same machine. Prints the median time and throughput of each,
# the agent's CPU seconds per pull, and the ratio TLS ÷ plain (goal ≥ 0.9).
#
#   cargo build --release --bin shoal
#   SHOAL_BIN=target/release/shoal bash integration/bench/tls.sh
# Environment: BENCH_TLS_MIB (1024), BENCH_TLS_ROUNDS (3 of each).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../clients/lib.sh
source "$here/../clients/lib.sh"
lib_init tls-bench

MIB=${BENCH_TLS_MIB:-1024}
ROUNDS=${BENCH_TLS_ROUNDS:-3}
[[ -x $SHOAL_BIN ]] || die "no shoal binary at SHOAL_BIN=$SHOAL_BIN"
[[ $SHOAL_BIN == */debug/* ]] && log "WARNING: $SHOAL_BIN looks like a debug build; figures will be meaningless"

median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) {print "nan"; exit} m=(NR+1)/2; print (NR%2) ? a[int(m)] : (a[m-0.5]+a[m+0.5])/2}'; }
cpu_seconds() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }
cpu_ticks() { awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t}' /proc/stat; }
busy_share() {
  awk -v a="$1" -v b="$2" 'BEGIN {split(a, x, " "); split(b, y, " "); t = y[2] - x[2];
    printf "%.2f", (t > 0) ? (y[1] - x[1]) / t : 0}'
}
report=$T/report.txt
say() { echo "$*" | tee -a "$report"; }
say "== TLS cost: one seeder -> one cold agent, ${MIB} MiB, loopback, $ROUNDS rounds each," \
  "$(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"

cfg=$T/agent.toml
printf 'announce_interval = "1s"\ncache_high_watermark = "64GiB"\ncache_low_watermark = "48GiB"\n' >"$cfg"

stop_cluster() {
  local p
  for p in "${AGENT_PIDS[@]}" "$TRACKER_PID" "$ORIGIN_PID"; do kill "$p" 2>/dev/null || true; done
  for p in "${AGENT_PIDS[@]}" "$TRACKER_PID" "$ORIGIN_PID"; do
    while kill -0 "$p" 2>/dev/null; do sleep 0.1; done
  done
  rm -rf "$T/cluster"
}

# one_round MODE: prints "seconds agent_cpu_seconds machine_busy_share".
one_round() {
  local mode=$1 f d secs cpu0 ticks0
  if [[ $mode == tls ]]; then make_tls_pki "$T/pki-$RANDOM" >/dev/null 2>&1; else TLS_DIR= CURL_TLS=(); fi
  SHOAL_AGENT_ARGS="--config $cfg" start_shoal_cluster 1 2>/dev/null
  f=$T/blob
  head -c "$((MIB * 1024 * 1024))" /dev/urandom >"$f"
  d=$(sha256_of "$f")
  [[ $(push_blob_monolithic bench/tls "$f") == 201 ]] || die "push to $REG_URL failed"
  rm -f "$f"
  wait_until 60 "metainfo" curl -sf "${CURL_TLS[@]}" -o /dev/null "$ORIGIN_URL/shoal/v1/blobs/$d/metainfo"
  cpu0=$(cpu_seconds "$AGENT_PID")
  ticks0=$(cpu_ticks)
  secs=$(curl -sf "${CURL_TLS[@]}" -o /dev/null -w '%{time_total}' "$AGENT_URL/v2/bench/tls/blobs/$d")
  echo "$secs $(awk -v a="$cpu0" -v b="$(cpu_seconds "$AGENT_PID")" 'BEGIN {printf "%.2f", b - a}') $(busy_share "$ticks0" "$(cpu_ticks)")"
  stop_cluster
  TLS_DIR= CURL_TLS=()
}

plain=() tls=() plain_cpu=() tls_cpu=() busy=()
for ((r = 0; r < ROUNDS; r++)); do
  for mode in plain tls; do
    read -r s c b < <(one_round "$mode")
    log "round $r $mode: ${s}s, agent ${c} CPU-s, machine busy $b"
    busy+=("$b")
    if [[ $mode == tls ]]; then tls+=("$s") tls_cpu+=("$c"); else plain+=("$s") plain_cpu+=("$c"); fi
  done
done
mp=$(printf '%s\n' "${plain[@]}" | median)
mt=$(printf '%s\n' "${tls[@]}" | median)
mbs() { awk -v s="$MIB" -v t="$1" 'BEGIN {printf "%.0f", s * 1.048576 / t}'; }
say "plain: median ${mp}s  $(mbs "$mp") MB/s  agent CPU $(printf '%s\n' "${plain_cpu[@]}" | median) s  (all: ${plain[*]})"
say "TLS:   median ${mt}s  $(mbs "$mt") MB/s  agent CPU $(printf '%s\n' "${tls_cpu[@]}" | median) s  (all: ${tls[*]})"
say "throughput ratio TLS / plain: $(awk -v a="$mp" -v b="$mt" 'BEGIN {printf "%.2f", a / b}') (goal >= 0.9);" \
  "machine busy during the pulls: ${busy[*]} (2 cores: 0.50 = one core)"
cp "$report" "${BENCH_REPORT:-/tmp/shoal-tls-bench.txt}"
