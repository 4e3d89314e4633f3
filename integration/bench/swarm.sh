#!/usr/bin/env bash
# Swarm benchmarks (not tests): what the agents and tracker deliver, measured against a
# baseline in the same run.
#   1. one seeder (the origin) to one cold agent over loopback, unshaped: a 1 GiB blob through
#      the swarm vs. curl fetching the same blob from Debian's docker-registry (ratio);
#   2. time to first byte and total time of 1 MiB blobs through a cold agent (median);
#   3. N agents (N = 2, 4, 8, 16) pulling one blob at once, each agent's ingress and egress
#      limited to RATE by Shoal's own limiter: p50/p99 completion time ÷ (size ÷ rate), and
#      origin egress ÷ size;
#   4. an agent's peak RSS while it moves a 2 GiB blob.
#
#   cargo build --release --bin shoal
#   SHOAL_BIN=target/release/shoal bash integration/bench/swarm.sh
# Environment: BENCH_BIG_MIB (1024), BENCH_BIG_ROUNDS (3), BENCH_SMALL_ROUNDS (11), BENCH_FLEET ("2 4 8 16"),
# BENCH_FLEET_MIB (512), BENCH_RATE_MIB (25, per agent, MiB/s), BENCH_RSS_MIB (2048),
# BENCH_PARTS ("1 2 3 4"), BENCH_HOLD_MEMORY_MIB (guest_memory.sh; default 3 × the larger of
# BENCH_BIG_MIB and BENCH_RSS_MIB; 0: leave the VM as it is), BENCH_SETTLE_SECS (8: see settle_memory), BENCH_BIG_RATE_MIB (part 1's agent
# ingress and egress limit in MiB/s, so the network sets the pace; unset: none), BENCH_PERF (a path:
# part 1 records the agent's pull with `perf record -g` into PATH.ROUND).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../clients/lib.sh
source "$here/../clients/lib.sh"
# shellcheck source=guest_memory.sh
source "$here/guest_memory.sh"
# shellcheck source=cpu.sh
source "$here/cpu.sh"
lib_init swarm-bench

BIG_MIB=${BENCH_BIG_MIB:-1024}
BIG_ROUNDS=${BENCH_BIG_ROUNDS:-3}
BIG_RATE_MIB=${BENCH_BIG_RATE_MIB:-}
SMALL_ROUNDS=${BENCH_SMALL_ROUNDS:-11}
FLEET=${BENCH_FLEET:-2 4 8 16}
FLEET_MIB=${BENCH_FLEET_MIB:-512}
RATE_MIB=${BENCH_RATE_MIB:-25}
RSS_MIB=${BENCH_RSS_MIB:-2048}
PARTS=${BENCH_PARTS:-1 2 3 4}
[[ -x $SHOAL_BIN ]] || die "no shoal binary at SHOAL_BIN=$SHOAL_BIN"
[[ $SHOAL_BIN == */debug/* ]] && log "WARNING: $SHOAL_BIN looks like a debug build; figures will be meaningless"

# pct P: the P-th percentile of the numbers on stdin, the round(1 + P/100 × (N - 1))-th smallest
# (as fleet.sh; kept so figures compare with earlier sessions').
pct() { sort -g | awk -v p="$1" '{a[NR]=$1} END {i=int((NR-1)*p/100+0.5)+1; if (i>NR) i=NR; print a[i]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b == 0) ? 0 : a / b}'; }
report=$T/report.txt
say() { echo "$*" | tee -a "$report"; }
hold_guest_memory $((3 * (BIG_MIB > RSS_MIB ? BIG_MIB : RSS_MIB)))
say "== swarm benchmarks, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)," \
  "guest memory $GUEST_MEMORY"

# A random blob of N MiB, in a file; prints its path.
random_blob() {
  local f=$T/blob-$1-$RANDOM
  head -c "$(($1 * 1024 * 1024))" /dev/urandom >"$f"
  echo "$f"
}

# push FILE REPO to the registry at REG_URL; dies unless 201.
push() {
  local code
  code=$(push_blob_monolithic "$2" "$1")
  [[ $code == 201 ]] || die "push of $1 to $REG_URL answered $code"
}

agent_config() { # agent_config FILE [RATE_MIB]
  {
    echo 'announce_interval = "1s"'
    echo 'fallback_after = "5s"'
    echo 'cache_high_watermark = "64GiB"'
    echo 'cache_low_watermark = "48GiB"'
    if [[ -n ${2:-} ]]; then
      echo "ingress_rate = \"${2}MiB\""
      echo "egress_rate = \"${2}MiB\""
    fi
  } >"$1"
}

# settle_memory: let memory freed by earlier steps go back to the hypervisor before a measured
# transfer. On the VMs this runs on, the balloon's free page reporting hands freed memory back
# within seconds, and touching it again costs 2-3 CPU-s/GiB (dd of 1 GiB: 2.9 s of system time
# into returned memory, 0.3 s right after a delete). A transfer that starts right after another
# step deleted a file gets cheap page cache, one that starts later does not; before this, the
# baselines' order gave them that luck (curl > file: 1.07 s after a delete, 3.0 s otherwise).
# Now every transfer that writes pays the same, and the floor is printed beside the figures.
settle_memory() {
  sync
  sleep "${BENCH_SETTLE_SECS:-8}"
}

# page_cache_floor MIB: system CPU seconds dd spends writing MIB MiB of zeros into a fresh file,
# 128 KiB at a time as Shoal writes (registry/src/file_write.rs),
# after settle_memory: what any program pays on this machine to put that much into page cache.
page_cache_floor() {
  local out
  settle_memory
  out=$( { TIMEFORMAT=%S; time dd if=/dev/zero of="$T/floor" bs=128k count="$(($1 * 8))" status=none; } 2>&1)
  rm -f "$T/floor"
  echo "$out"
}

part1() {
  say ""
  say "-- 1. one seeder -> one cold agent, ${BIG_MIB} MiB, loopback, ${BIG_RATE_MIB:+agent paced at $BIG_RATE_MIB MiB/s, }unshaped, $BIG_ROUNDS rounds (fresh blob each)"
  local f d cfg reg_url round t0
  local t_swarm=() t_null=() t_file=() t_verify=() cpu=() cpu_usr=() cpu_sys=() cpu_seed=() floor=() u sy tot seed_before
  cfg=$T/agent1.toml
  agent_config "$cfg" "$BIG_RATE_MIB"
  command -v openssl >/dev/null || die "openssl is needed for the verify baseline"
  # Every round starts from scratch (new processes, empty data dirs), so each finds the
  # machine's memory in the same state: on this kind of VM writing page cache is fast while
  # it reuses recently freed memory and falls to a fifth of that once ~3 GiB more is held
  # (docs/benchmarks.md), which made later rounds of one long-lived setup 2x slower.
  for ((round = 0; round < BIG_ROUNDS; round++)); do
    SHOAL_AGENT_ARGS="--config $cfg" start_shoal_cluster 1
    local origin_url=$REG_URL
    start_registry docker-registry "$T/dr"
    reg_url=$REG_URL
    f=$(random_blob "$BIG_MIB")
    d=$(sha256_of "$f")
    REG_URL=$origin_url push "$f" bench/big
    REG_URL=$reg_url push "$f" bench/big
    rm -f "$f"
    sleep 1 # let the origin finish its metainfo
    # Baselines: the registry's bytes into /dev/null (the issue's baseline), into a file on the
    # agent's filesystem, and into a file while checking the digest: the work a `docker pull`
    # from a central registry does, and the least an agent must do (it also hashes every piece).
    t_null+=("$(curl -sf -o /dev/null -w '%{time_total}' "$reg_url/v2/bench/big/blobs/$d")")
    settle_memory
    t_file+=("$(curl -sf -o "$T/curl-out" -w '%{time_total}' "$reg_url/v2/bench/big/blobs/$d")")
    rm -f "$T/curl-out"
    settle_memory
    t0=$(date +%s.%N)
    # Download, then check the digest. openssl, not coreutils' sha256sum: it uses the CPU's
    # SHA instructions, as Shoal does. (A pipe through tee was slower still: 3.1 s per GiB.)
    curl -sf -o "$T/curl-out" "$reg_url/v2/bench/big/blobs/$d"
    openssl dgst -sha256 "$T/curl-out" >/dev/null
    t_verify+=("$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.6f", b - a}')")
    rm -f "$T/curl-out"
    settle_memory
    local cpu_before perf_pid=
    if [[ -n ${BENCH_PERF:-} ]]; then
      perf record -q -F 1999 -g -p "$AGENT_PID" -o "$BENCH_PERF.$round" 2>/dev/null &
      perf_pid=$!
      sleep 0.5
    fi
    cpu_before=$(cpu_seconds "$AGENT_PID")
    seed_before=$(cpu_seconds "$ORIGIN_PID")
    t_swarm+=("$(curl -sf -o /dev/null -w '%{time_total}' "$AGENT_URL/v2/bench/big/blobs/$d")")
    read -r u sy tot < <(cpu_delta "$cpu_before" "$(cpu_seconds "$AGENT_PID")")
    cpu+=("$tot") cpu_usr+=("$u") cpu_sys+=("$sy")
    read -r _ _ tot < <(cpu_delta "$seed_before" "$(cpu_seconds "$ORIGIN_PID")")
    cpu_seed+=("$tot")
    if [[ -n $perf_pid ]]; then
      kill -INT "$perf_pid"
      wait "$perf_pid" || true
    fi
    stop_cluster
    rm -rf "$T/dr"
    floor+=("$(page_cache_floor "$BIG_MIB")")
  done
  local m_swarm m_null m_file m_verify
  m_swarm=$(printf '%s\n' "${t_swarm[@]}" | median_lines)
  m_null=$(printf '%s\n' "${t_null[@]}" | median_lines)
  m_file=$(printf '%s\n' "${t_file[@]}" | median_lines)
  m_verify=$(printf '%s\n' "${t_verify[@]}" | median_lines)
  mbs() { awk -v s="$BIG_MIB" -v t="$1" 'BEGIN {printf "%.0f", s*1.048576/t}'; }
  say "agent (swarm, cold):                 median ${m_swarm}s  $(mbs "$m_swarm") MB/s  (all: ${t_swarm[*]})"
  say "docker-registry, curl > /dev/null:   median ${m_null}s  $(mbs "$m_null") MB/s  (all: ${t_null[*]})"
  say "docker-registry, curl > file:        median ${m_file}s  $(mbs "$m_file") MB/s  (all: ${t_file[*]})"
  say "docker-registry, curl > file, then openssl dgst -sha256 file (fetch, store, verify):"
  say "                                     median ${m_verify}s  $(mbs "$m_verify") MB/s  (all: ${t_verify[*]})"
  say "agent CPU per pull: median $(printf '%s\n' "${cpu[@]}" | median_lines) s  (all: ${cpu[*]}; user + system)"
  # The seeder's side of the same transfer: the origin serving the pieces (a fleet's agent
  # does both, receiving a blob and serving about as much of it to its peers).
  say "seeder (origin) CPU per pull: median $(printf '%s\n' "${cpu_seed[@]}" | median_lines) s  (all: ${cpu_seed[*]}; user + system)"
  say "agent CPU per pull by kind: user median $(printf '%s\n' "${cpu_usr[@]}" | median_lines) s, system median $(printf '%s\n' "${cpu_sys[@]}" | median_lines) s  (user: ${cpu_usr[*]}; system: ${cpu_sys[*]})"
  say "page-cache floor: dd of ${BIG_MIB} MiB into a fresh file after the same settling: median $(printf '%s\n' "${floor[@]}" | median_lines) system CPU-s  (all: ${floor[*]})"
  say "throughput ratio agent/registry: $(ratio "$m_null" "$m_swarm") (to /dev/null), $(ratio "$m_file" "$m_swarm") (to a file), $(ratio "$m_verify" "$m_swarm") (stored and verified)  (goal >= 1)"
}

part2() {
  say ""
  say "-- 2. 1 MiB blobs through a cold agent, $SMALL_ROUNDS rounds (fresh blob each round)"
  local cfg i f d out code size ttfb=() total=()
  cfg=$T/agent2.toml
  agent_config "$cfg"
  SHOAL_AGENT_ARGS="--config $cfg" start_shoal_cluster 1
  for ((i = 0; i < SMALL_ROUNDS; i++)); do
    f=$(random_blob 1)
    d=$(sha256_of "$f")
    push "$f" bench/small
    sleep 0.3
    # curl prints the times of a failed pull too: its status, code and byte count say whether
    # it was one. The digest is checked by a second read, outside the timing.
    out=$(curl -s -o /dev/null -w '%{http_code} %{size_download} %{time_starttransfer} %{time_total}' \
      "$AGENT_URL/v2/bench/small/blobs/$d") || die "pull of $d through the agent failed (curl status $?)"
    read -r code size a b <<<"$out"
    [[ $code == 200 && $size == $((1024 * 1024)) ]] || die "pull of $d through the agent answered $code with $size bytes"
    [[ $(curl -sf "$AGENT_URL/v2/bench/small/blobs/$d" | sha256sum | cut -d' ' -f1) == "${d#sha256:}" ]] ||
      die "the agent's bytes of $d do not hash to it"
    ttfb+=("$a") total+=("$b")
    rm -f "$f"
  done
  say "time to first byte: median $(printf '%s\n' "${ttfb[@]}" | median_lines)s  (all: ${ttfb[*]})"
  say "total time:         median $(printf '%s\n' "${total[@]}" | median_lines)s"
  stop_cluster
}

part3() {
  say ""
  say "-- 3. N agents pull one ${FLEET_MIB} MiB blob at once, each limited to ${RATE_MIB} MiB/s in and out"
  say "N    p50/ideal  p99/ideal  origin-egress/size  cpu-busy  (ideal = size/rate = $(awk -v s="$FLEET_MIB" -v r="$RATE_MIB" 'BEGIN {printf "%.1f", s/r}')s)"
  local n cfg f d i ideal times egress
  ideal=$(awk -v s="$FLEET_MIB" -v r="$RATE_MIB" 'BEGIN {print s/r}')
  for n in $FLEET; do
    cfg=$T/agent3.toml
    agent_config "$cfg" "$RATE_MIB"
    SHOAL_AGENT_ARGS="--config $cfg" start_shoal_cluster "$n"
    f=$(random_blob "$FLEET_MIB")
    d=$(sha256_of "$f")
    push "$f" bench/fleet
    sleep 1
    : >"$T/times"
    local pulls=() ticks_before p failed=0
    ticks_before=$(cpu_ticks)
    for ((i = 0; i < n; i++)); do
      # With the status and byte count: curl prints the time of a failed pull too.
      curl -s -o /dev/null -w '%{http_code} %{size_download} %{time_total}\n' "${AGENT_URLS[i]}/v2/bench/fleet/blobs/$d" >>"$T/times" &
      pulls+=($!)
    done
    # Wait for the pulls only (the daemons are children of this shell too), each one, so
    # every curl's exit status counts.
    for p in "${pulls[@]}"; do wait "$p" || failed=$((failed + 1)); done
    local busy
    busy=$(busy_share "$ticks_before" "$(cpu_ticks)")
    ((failed == 0)) || die "$failed of $n pulls failed (curl); code, bytes, time of each: $(paste -sd' ' "$T/times")"
    # Only whole 200 answers count. No digest check: hashing N copies would load the machine
    # this measures, and the agents verify every piece.
    awk -v s="$((FLEET_MIB * 1024 * 1024))" '$1 == 200 && $2 == s {print $3}' "$T/times" >"$T/times.ok"
    [[ $(wc -l <"$T/times.ok") -eq $n ]] ||
      die "not all $n pulls answered 200 with ${FLEET_MIB} MiB; code, bytes, time of each: $(paste -sd' ' "$T/times")"
    local peer_egress http_egress
    peer_egress=$(metric "$ORIGIN_URL" shoal_origin_peer_sent_bytes_total)
    http_egress=$(metric "$ORIGIN_URL" shoal_origin_http_sent_bytes_total)
    egress=$((peer_egress + http_egress))
    times=$(cat "$T/times.ok")
    say "$(printf '%-4s %-10s %-10s %-19s %-9s (peer protocol %s, HTTP fallback %s)' "$n" \
      "$(ratio "$(echo "$times" | median_lines)" "$ideal")" \
      "$(ratio "$(echo "$times" | pct 99)" "$ideal")" \
      "$(ratio "$egress" "$((FLEET_MIB * 1024 * 1024))")" "$busy" \
      "$(ratio "$peer_egress" "$((FLEET_MIB * 1024 * 1024))")" \
      "$(ratio "$http_egress" "$((FLEET_MIB * 1024 * 1024))")")"
    stop_cluster
    rm -f "$f"
  done
  say "(goal: p99/ideal <= 1.3 and origin egress/size <= 1.5, flat as N grows; cpu-busy is the"
  say " share of this machine's $(nproc) cores in use during the pulls: near 1.00 the machine, not the"
  say " swarm, sets the pace, because all N agents share it)"
}

part4() {
  say ""
  say "-- 4. agent peak RSS while moving a ${RSS_MIB} MiB blob"
  local cfg f d
  cfg=$T/agent4.toml
  agent_config "$cfg"
  SHOAL_AGENT_ARGS="--config $cfg" start_shoal_cluster 1
  f=$(random_blob "$RSS_MIB")
  d=$(sha256_of "$f")
  push "$f" bench/rss
  rm -f "$f"
  sleep 2
  curl -sf -o /dev/null "$AGENT_URL/v2/bench/rss/blobs/$d"
  say "agent peak RSS: $(($(peak_rss_kib "$AGENT_PID") / 1024)) MiB  (goal <= 100 MiB); origin peak RSS: $(($(peak_rss_kib "$ORIGIN_PID") / 1024)) MiB"
  stop_cluster
}

# stop_cluster: stop the current cluster's processes now and wait for them. With stop_pid,
# so their stops registered at exit are skipped: by then the kernel may have given their
# PIDs to other processes.
stop_cluster() {
  local p pids=("${AGENT_PIDS[@]}" "$TRACKER_PID" "$ORIGIN_PID")
  # REG_PID: part 1's docker-registry; otherwise the origin again.
  [[ -z ${REG_PID:-} || $REG_PID == "$ORIGIN_PID" ]] || pids+=("$REG_PID")
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done # all at once, then wait
  for p in "${pids[@]}"; do stop_pid "$p" "pid $p"; done
  rm -rf "$T/cluster"
}

for p in $PARTS; do "part$p"; done
say ""
say "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
cp "$report" "${BENCH_REPORT:-/tmp/shoal-swarm-bench.txt}"
