#!/usr/bin/env bash
# The cost of TLS (not a test): one seeder (the origin) to one cold agent over loopback,
# unshaped, a fresh blob each round, rounds of three setups alternating so all see the same
# machine:
#   plain     no TLS anywhere;
#   https     HTTPS listeners (certificates from a CA made here), the peer protocol plain
#             ([tls] peer = false on the origin and the agent);
#   tls       HTTPS listeners and the peer protocol over mutual TLS.
# Prints the median time and throughput of each, the agent's CPU seconds per pull, and the
# ratios: peer TLS on ÷ off (tls ÷ https, the issue's measure, goal ≥ 0.9) and TLS
# everywhere ÷ none (tls ÷ plain).
#
#   cargo build --release --bin shoal
#   SHOAL_BIN=target/release/shoal bash integration/bench/tls.sh
# Environment: BENCH_TLS_MIB (1024), BENCH_TLS_ROUNDS (3 of each).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../clients/lib.sh
source "$here/../clients/lib.sh"
# shellcheck source=cpu.sh
source "$here/cpu.sh"
lib_init tls-bench

MIB=${BENCH_TLS_MIB:-1024}
ROUNDS=${BENCH_TLS_ROUNDS:-3}
[[ -x $SHOAL_BIN ]] || die "no shoal binary at SHOAL_BIN=$SHOAL_BIN"
[[ $SHOAL_BIN == */debug/* ]] && log "WARNING: $SHOAL_BIN looks like a debug build; figures will be meaningless"

report=$T/report.txt
say() { echo "$*" | tee -a "$report"; }
say "== TLS cost: one seeder -> one cold agent, ${MIB} MiB, loopback, $ROUNDS rounds each," \
  "$(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"

cfg=$T/agent.toml
printf 'announce_interval = "1s"\ncache_high_watermark = "64GiB"\ncache_low_watermark = "48GiB"\n' >"$cfg"
# The https setup: the same, with the peer protocol left plain.
nopeer_agent=$T/agent-nopeer.toml
nopeer_origin=$T/origin-nopeer.toml
{ cat "$cfg"; printf '[tls]\npeer = false\n'; } >"$nopeer_agent"
printf '[tls]\npeer = false\n' >"$nopeer_origin"

# stop_cluster: with stop_pid, which waits for each, so their stops registered at exit are
# skipped: by then the kernel may have given their PIDs to other processes.
stop_cluster() {
  local p
  for p in "${AGENT_PIDS[@]}" "$TRACKER_PID" "$ORIGIN_PID"; do kill "$p" 2>/dev/null || true; done
  for p in "${AGENT_PIDS[@]}" "$TRACKER_PID" "$ORIGIN_PID"; do stop_pid "$p" "pid $p"; done
  rm -rf "$T/cluster"
}

# one_round MODE: prints "seconds agent_cpu_seconds machine_busy_share". Run it in this
# shell, not in a subshell: the cluster's stops at exit are registered here, and its die
# ends the script.
one_round() {
  local mode=$1 f d secs cpu0 ticks0 agent_cfg=$cfg origin_args=
  case $mode in
  plain) TLS_DIR= CURL_TLS=() ;;
  https)
    make_tls_pki "$T/pki-$RANDOM" >/dev/null
    agent_cfg=$nopeer_agent origin_args="--config $nopeer_origin"
    ;;
  tls) make_tls_pki "$T/pki-$RANDOM" >/dev/null ;;
  esac
  SHOAL_ORIGIN_ARGS=$origin_args SHOAL_AGENT_ARGS="--config $agent_cfg" start_shoal_cluster 1
  if [[ $mode == https ]]; then grep -q 'peer_tls=false' "$AGENT_LOG" || die "the https setup runs peer TLS"; fi
  if [[ $mode == tls ]]; then grep -q 'peer_tls=true' "$AGENT_LOG" || die "the tls setup has no peer TLS"; fi
  f=$T/blob
  head -c "$((MIB * 1024 * 1024))" /dev/urandom >"$f"
  d=$(sha256_of "$f")
  [[ $(push_blob_monolithic bench/tls "$f") == 201 ]] || die "push to $REG_URL failed"
  rm -f "$f"
  wait_until 60 "metainfo" curl -sf "${CURL_TLS[@]}" -o /dev/null "$ORIGIN_URL/shoal/v1/blobs/$d/metainfo"
  cpu0=$(cpu_seconds "$AGENT_PID")
  ticks0=$(cpu_ticks)
  secs=$(curl -sf "${CURL_TLS[@]}" -o /dev/null -w '%{time_total}' "$AGENT_URL/v2/bench/tls/blobs/$d") ||
    die "$mode: pull of $d through the agent failed (curl status $?)"
  echo "$secs $(cpu_delta "$cpu0" "$(cpu_seconds "$AGENT_PID")" | cut -d' ' -f3) $(busy_share "$ticks0" "$(cpu_ticks)")"
  stop_cluster
  TLS_DIR= CURL_TLS=()
}

declare -A times cpus
busy=()
for ((r = 0; r < ROUNDS; r++)); do
  for mode in plain https tls; do
    one_round "$mode" >"$T/round"
    read -r s c b <"$T/round"
    log "round $r $mode: ${s}s, agent ${c} CPU-s, machine busy $b"
    busy+=("$b")
    times[$mode]+="$s " cpus[$mode]+="$c "
  done
done
mbs() { awk -v s="$MIB" -v t="$1" 'BEGIN {printf "%.0f", s * 1.048576 / t}'; }
declare -A med
for mode in plain https tls; do
  # shellcheck disable=SC2086 # word lists on purpose
  med[$mode]=$(printf '%s\n' ${times[$mode]} | median_lines)
  # shellcheck disable=SC2086
  say "$(printf '%-6s' "$mode") median ${med[$mode]}s  $(mbs "${med[$mode]}") MB/s  agent CPU $(printf '%s\n' ${cpus[$mode]} | median_lines) s  (all: ${times[$mode]})"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
say "peer TLS on / off (tls / https): $(ratio "${med[https]}" "${med[tls]}") (goal >= 0.9);" \
  "TLS everywhere / none (tls / plain): $(ratio "${med[plain]}" "${med[tls]}")"
say "machine busy during the pulls: ${busy[*]} (2 cores: 0.50 = one core)"
cp "$report" "${BENCH_REPORT:-/tmp/shoal-tls-bench.txt}"
