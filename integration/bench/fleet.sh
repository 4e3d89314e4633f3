#!/usr/bin/env bash
# Fleet benchmark (not a test) over real kernel TCP on shaped links. Each of N hosts is a
# network namespace behind a veth shaped with tbf at HOST Mbit/s in both directions; an
# "origin" namespace sits behind a link of ORIGIN Mbit/s (integration/bench/netns.sh). At
# one absolute instant every host fetches the same fresh random blob with curl into a hash:
#   shoal     through its own `shoal agent` (default settings: no rate limit of Shoal's own,
#             so the kernel's links set the pace, as in production), with `shoal origin` and
#             `shoal tracker` in the origin namespace;
#   registry  straight from Debian's docker-registry in the origin namespace (storage on
#             disk): the central registry a fleet pulls from without Shoal (the baseline).
#   bare      the floor under Shoal at the same N (no Shoal): the origin namespace serves the
#             blob from memory to host 0, and each host passes what it receives on to the
#             next as it arrives, hashing it and keeping in memory what the next has not
#             taken yet, so a straggler further down holds no one back
#             (integration/bench/min_peer.py relay): a chain of
#             hosts that receive the blob and send it on once, as a 20-host swarm's agents
#             about do, with nothing else (no disk, client, scheduler or protocol). Its CPU per
#             GiB is in the same machine state and emulated network as Shoal's (x_bare)
#   shoal_upstream  pull-through: the blob is only in a docker-registry in an "upstream"
#             namespace (10.77.0.2, its own link of BENCH_UPSTREAM_MBIT); the origin is
#             started with --upstream upstream.test=<it>, and every host asks its agent for
#             upstream.test/<repo>: the first byte needs the origin's fetch, then the swarm.
#             Its row adds upstream= (bytes out of the upstream's link ÷ size) and
#             upstream_gets= (GETs of the blob in the upstream's access log). Compare with
#             `registry`, every host pulling from a registry behind the same link rate.
# After the timed window every host's file is hashed and compared with the digest.
#
#   cargo build --release --bin shoal
#   SHOAL_BIN=target/release/shoal bash integration/bench/fleet.sh
#   SHOAL_BIN=target/release/shoal BENCH_PLOT=docs/fleet.svg bash integration/bench/fleet.sh
#
# Environment:
#   BENCH_FLEET="5 10 20"      numbers of hosts; each N gets fresh namespaces
#   BENCH_SIZE_MIB=128         blob size
#   BENCH_HOST_MBIT=50         each host's link (Mbit/s = 10^6 bit/s, as tc counts)
#   BENCH_ORIGIN_MBIT=500      the origin namespace's link
#   BENCH_REPEATS=1            runs per system and N (each: fresh processes, data dirs, blob)
#   BENCH_STRAGGLERS=0         1: a quarter of the hosts (the last ones) at a fifth of HOST
#   BENCH_SYSTEMS="bare shoal registry"  (also shoal_tls: Shoal with TLS everywhere and mutual TLS
#                              between peers, certificates from a CA made for the run;
#                              shoal_upstream: pull-through, below)
#   BENCH_UPSTREAM_MBIT=ORIGIN the upstream namespace's link (shoal_upstream)
#   BENCH_MTU=1500             every veth's MTU; 9000 (jumbo frames) sends a sixth of the
#                              packets, which halves what the emulated links cost this
#                              machine's kernel, so larger fleets stay below saturation
#   BENCH_CC=cubic             TCP congestion control in every namespace: Linux's default,
#                              what a stock node runs (this VM's own default is bbr, whose
#                              probing overran the hosts' 50 ms queues: 17 % of the origin's
#                              segments retransmitted at N = 5, MTU 9000); empty: what a new
#                              namespace inherits from the machine. Recorded as cc=
#   BENCH_RESULTS=/tmp/shoal-fleet-results.txt   machine-readable `fleet: ...` lines appended here
#   BENCH_DUMP_METRICS=        e.g. /tmp/m: each agent's /metrics and log after the window, in
#                              /tmp/m.h<i> and .h<i>.log (the last run's; bench/piece_spread.py)
#   BENCH_TIMELINE=            e.g. /tmp/tl: each run's link rates, per host and the origin's,
#                              every second of the pull, saved to /tmp/tl.<system>-<N>-<rep>
#                              (for seeing where a slow run's time went: which links idled)
#   BENCH_PLOT=                e.g. docs/fleet.svg: draw this run's rows there
#                              (integration/bench/plot_fleet.py); unset, nothing is drawn
#   BENCH_AGENT_CONFIG=        a TOML file every agent reads (`--config`, docs/configuration.md),
#                              e.g. to compare max_connections_per_blob; unset, the defaults
#   BENCH_HOLD_MEMORY_MIB=     memory made cheap to touch before the runs (guest_memory.sh;
#                              default 2 × (largest N + 2) × size); 0: leave the VM as it is
#   BENCH_LOOPBACK_ROUNDS=3    rounds of the loopback one-seeder pull (swarm.sh part 1, 1 GiB)
#                              run first, for x_loop; 0: skip it (x_loop n/a)
#
# Figures, per system × N × repeat:
#   p50 p90 max   each host's completion time (from the common start to its last byte hashed)
#                 ÷ the time its own link needs for the blob (size ÷ link rate); percentiles over
#                 the hosts, the round(1 + p/100 × (N - 1))-th smallest (p50 of 10 hosts is the 6th,
#                 the upper middle; kept so figures compare with every earlier session's).
#                 tbf counts whole frames, so ~1.05 is the floor.
#                 A central registry behind ORIGIN cannot do better than N × HOST ÷ ORIGIN.
#   fast_max      (stragglers only) max over the full-rate hosts ÷ their own link's time
#   origin        bytes out of the origin namespace's veth during the window ÷ size (frames and
#                 headers included; veth counts a GSO packet's headers once, so one copy is ~1.01)
#   o_rtx         TCP segments the origin namespace retransmitted ÷ the segments it sent, in
#                 the window (/proc/net/snmp): what of `origin` was sent twice by TCP, not
#                 by the application (a frame dropped at a full host queue is sent again).
#                 The segments sent include pure ACKs, so by bytes the share is higher
#                 (about 9-10 % where o_rtx says 6-7 %: docs/benchmarks.md, session 19)
#   received      bytes into the hosts' veths ÷ (N × size)
#   timeouts      Σ shoal_agent_piece_timeouts_total over the agents ("n/a" if no agent has it)
#   log_timeouts  Σ agent log lines with "timed out" (piece requests given up)
#   fallback_mib  Σ shoal_agent_received_bytes_total{source="origin"} over the agents, MiB
#   dup_mib       Σ shoal_agent_duplicate_bytes_total: verified pieces that arrived twice, MiB
#   cpu           busy share of the whole machine during the window (/proc/stat); above 0.85
#                 the run measures the machine, not the network: "SATURATED (not counted)"
#   cpu_pegged    share of the window in half-second samples with the machine >= 0.95 busy;
#                 above 0.25 the run is not counted either (results file only)
#   cpu_s_per_gib the agents' user+system CPU seconds ÷ GiB they received (shoal; for bare,
#                 the relays' own)
#   x_loop        cpu_s_per_gib ÷ the same figure of the loopback one-seeder pull measured at
#                 the start of this invocation (swarm.sh part 1's median agent CPU per GiB):
#                 this machine's CPU per byte drifts by 2x with its memory state
#                 (docs/benchmarks.md), so the two are compared only within one run
# Results file only (where a fleet agent's CPU goes, docs/benchmarks.md, sessions 26, 32):
#   x_bare        cpu_s_per_gib ÷ the bare chain's at the same N in this invocation (put bare
#                 before shoal in BENCH_SYSTEMS): Shoal's CPU per byte against hosts that only
#                 receive, hash and send on, on the same links and machine at once
#   usr_s_per_gib sys_s_per_gib   cpu_s_per_gib split into user and system time
#   sent_per_received   the agents' piece bytes sent to peers ÷ those they received: a fleet
#                 agent also serves its peers, the loopback reference's agent does not
#   loop_seed_cpu_s_per_gib   the loopback reference's seeder (the origin) per GiB it served
#   x_link        cpu_s_per_gib ÷ the median of this invocation's N = 1 Shoal runs so far (one
#                 agent pulling from the origin alone over the same shaped link; put 1 first
#                 in BENCH_FLEET): the swarm's CPU per byte against a single pull's on the
#                 same link, apart from what the link's rate costs every pull
#   cs_per_mib    the agents' context switches (voluntary and not, over their threads) per MiB
#                 received: each is a sleep and a wake-up, which a slow link multiplies per
#                 byte and this VM charges tens of microseconds for (session 27)
#   wake_us busy_wake_us exit_us sha_gbs   this machine's state at the start of the
#                 invocation (integration/bench/machine.sh): CPU per wake-up round trip between
#                 threads that go idle in between and between busy ones, the cost of one trip
#                 to the hypervisor, openssl's SHA-256 rate
#   floor_*       the least a host spends per GiB on these links (integration/bench/
#                 link_floor.sh, run once when Shoal is benchmarked; BENCH_FLOOR=0 skips it):
#                 floor_x_loop is a bare receiver's CPU over one host link ÷ over loopback,
#                 the part of x_loop the link itself accounts for
#   machine_{usr,sys,softirq}_s_per_gib   the whole machine's CPU seconds of each kind per GiB
#                 the hosts received: every process plus the emulated network (bridge, tbf,
#                 veth), whose softirq time the kernel charges to whatever process it interrupts;
#                 without IRQ time accounting softirq is sampled by the tick, which idle CPUs
#                 do not take, so it grows with how busy the machine is (benchmarks.md, s. 33)
#   rx_frames_per_mib   frames the hosts' links delivered per MiB they carried (data and
#                 ACKs): each frame costs the emulated network a timer and a softirq pass
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../clients/lib.sh
source "$here/../clients/lib.sh"
# shellcheck source=netns.sh
source "$here/netns.sh"
# shellcheck source=guest_memory.sh
source "$here/guest_memory.sh"
# shellcheck source=cpu.sh
source "$here/cpu.sh"
# shellcheck source=link_timeline.sh
source "$here/link_timeline.sh"
# shellcheck source=bare_chain.sh
source "$here/bare_chain.sh"
lib_init fleet-bench

FLEET=${BENCH_FLEET:-5 10 20}
SIZE_MIB=${BENCH_SIZE_MIB:-128}
HOST_MBIT=${BENCH_HOST_MBIT:-50}
ORIGIN_MBIT=${BENCH_ORIGIN_MBIT:-500}
REPEATS=${BENCH_REPEATS:-1}
FLEET_AGENT_ARGS=()
if [[ -n ${BENCH_AGENT_CONFIG:-} ]]; then FLEET_AGENT_ARGS=(--config "$(realpath "$BENCH_AGENT_CONFIG")"); fi
STRAGGLERS=${BENCH_STRAGGLERS:-0}
SYSTEMS=${BENCH_SYSTEMS:-bare shoal registry}
RESULTS=${BENCH_RESULTS:-/tmp/shoal-fleet-results.txt}
PLOT=${BENCH_PLOT:-}
MTU=${BENCH_MTU:-1500}
export NETNS_MTU=$MTU # read by netns_add_host
export NETNS_CC=${BENCH_CC-cubic} # read by _netns_add
CC=$(netns_cc)
SATURATED=0.85
# A run whose average is below SATURATED can still spend half its window with the machine at
# its limit (docs/benchmarks.md, session 23: 20 hosts at 0.73-0.82 on average, 0.98-1.00 for
# their second half). PEGGED_BUSY is a half-second sample's busy share that counts as at the
# limit; a run with more than PEGGED_SHARE of its window there is not counted either.
PEGGED_BUSY=0.95
PEGGED_SHARE=0.25
PEGGED_SAMPLE_SECS=0.5
BLOB_REPO=bench/fleet
REGISTRY_URL=http://$FLEET_ORIGIN_ADDR:5001
UPSTREAM_ADDR=10.77.0.2
UPSTREAM_URL=http://$UPSTREAM_ADDR:5000
UPSTREAM_MBIT=${BENCH_UPSTREAM_MBIT:-$ORIGIN_MBIT}
RECORD_EXTRA= # more key=value figures for the next record (shoal_upstream)
LOOPBACK_ROUNDS=${BENCH_LOOPBACK_ROUNDS:-3}
LOOP_CPU=n/a # the loopback one-seeder pull's agent CPU-s per GiB, once measured
LOOP_SEED_CPU=n/a # and its seeder's (the origin serving the pieces)
LINK_CPUS=() # CPU-s/GiB of the N = 1 Shoal runs so far: one agent, one seeder, the same link
LINK_CPU=n/a # their median
PULL=fleet_pull # how timed_pull's hosts fetch: curl through fleet_pull, or bare_pull
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)-$$
SIZE=$((SIZE_MIB * 1024 * 1024))

for s in $SYSTEMS; do
  case $s in
  shoal | shoal_tls)
    [[ -x $SHOAL_BIN ]] || die "no shoal binary at SHOAL_BIN=$SHOAL_BIN"
    [[ $SHOAL_BIN == */debug/* ]] && log "WARNING: $SHOAL_BIN looks like a debug build; figures will be meaningless"
    ;;
  shoal_upstream)
    [[ -x $SHOAL_BIN && -x $DOCKER_REGISTRY ]] || die "shoal_upstream needs SHOAL_BIN and $DOCKER_REGISTRY"
    ;;
  registry) [[ -x $DOCKER_REGISTRY ]] || die "$DOCKER_REGISTRY missing (apt-get install docker-registry)" ;;
  bare) ;;
  *) die "unknown system '$s' in BENCH_SYSTEMS (bare, shoal, shoal_tls, shoal_upstream, registry)" ;;
  esac
done
for c in curl jq sha256sum openssl awk python3; do command -v "$c" >/dev/null || die "$c missing"; done
netns_init

# The hosts' sums (and nothing else of the downloads) go to a private tmpfs.
max_n=0
for n in $FLEET; do ((n > max_n)) && max_n=$n; done
DL=$T/dl
mkdir -p "$DL"
mount -t tmpfs -o size=64m shoal-fleet "$DL"
on_exit "umount '$DL' 2>/dev/null || umount -l '$DL'"
# Every agent, the origin and the registry each keep a copy; twice that covers the pieces
# written before the cached copy.
hold_guest_memory $((2 * (max_n + 2) * SIZE_MIB))

report=$T/report.txt
say() { echo "$*" | tee -a "$report"; }
# pct P: the P-th percentile of the numbers on stdin, as the header says.
pct() { sort -g | awk -v p="$1" '{a[NR]=$1} END {if (NR==0) {print "nan"; exit} i=int((NR-1)*p/100+0.5)+1; if (i>NR) i=NR; printf "%.2f", a[i]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b == 0) ? 0 : a / b}'; }
# sleep_until EPOCH (fractional seconds)
sleep_until() { sleep "$(awk -v s="$1" -v n="$EPOCHREALTIME" 'BEGIN {d = s - n; printf "%.6f", (d > 0) ? d : 0}')"; }

# random_blob: a fresh random blob of SIZE_MIB in $T (on disk); sets BLOB BLOB_DIGEST.
random_blob() {
  BLOB=$T/blob-$RANDOM$RANDOM
  head -c "$SIZE" /dev/urandom >"$BLOB"
  BLOB_DIGEST=$(sha256_of "$BLOB")
}

# ideal_secs I: host I's link time for the blob.
ideal_secs() { awk -v s="$SIZE" -v m="${FLEET_MBIT[$1]}" 'BEGIN {print s * 8 / (m * 1e6)}'; }

# tcp_segs NS: "OutSegs RetransSegs" of NS's TCP stack so far.
tcp_segs() {
  in_ns "$1" awk '$1 == "Tcp:" && $2 ~ /^[0-9]+$/ {print $12, $13}' /proc/net/snmp
}

# hosts_rx: "BYTES FRAMES" the hosts' links have received so far, summed.
hosts_rx() {
  local i
  for ((i = 0; i < FLEET_N; i++)); do link_counts "${FLEET_NS[i]}" "${FLEET_DEV[i]}" rx; done |
    awk '{b += $1; f += $2} END {printf "%.0f %.0f\n", b, f}' # mawk prints past 2^31 as 2.7e+09
}

# BUSY_PID: timed_pull's busy sampler while it runs; killed at exit if a run dies mid-pull
# (it would sample until $T/busy.stop, which no one creates then).
BUSY_PID=
stop_busy_sampler() { [[ -z $BUSY_PID ]] || kill "$BUSY_PID" 2>/dev/null; }
on_exit stop_busy_sampler

# timed_pull URL SAMPLE_PIDS...: every host fetches URL at one instant; measures the window.
# Sets WIN_CPU WIN_PEGGED (share of the window at the machine's limit) WIN_PROC_CPU (Σ CPU
# seconds of SAMPLE_PIDS; WIN_PROC_USR + WIN_PROC_SYS) WIN_PROC_CS (their context switches)
# WIN_MUSR WIN_MSYS WIN_MSOFTIRQ (the whole machine's user, system and softirq CPU seconds)
# WIN_ORIGIN_TX WIN_HOSTS_RX WIN_HOSTS_RX_PKTS (frames) WIN_ORIGIN_RTX.
timed_pull() {
  local url=$1 start tx0 rx0 rx1 proc0=0 segs0
  shift
  rx0=$(hosts_rx)
  tx0=$(link_bytes "$FLEET_ORIGIN_NS" "$FLEET_ORIGIN_DEV" tx)
  segs0=$(tcp_segs "$FLEET_ORIGIN_NS")
  # The pulls are launched first and wait for START; the window's samples are taken at START.
  start=$(awk -v n="$EPOCHREALTIME" -v k="$FLEET_N" 'BEGIN {printf "%.6f", n + 1 + 0.05 * k}')
  (
    sleep_until "$start"
    cpu_ticks >"$T/ticks0"
    cpu_kinds >"$T/kinds0"
    if (($# > 0)); then cpu_seconds "$@" >"$T/proc0"; else echo "0 0" >"$T/proc0"; fi
    context_switches "$@" >"$T/cs0"
  ) &
  local sampler=$! timeline= busy
  rm -f "$T/busy" "$T/busy.stop"
  (
    sleep_until "$start"
    busy_samples "$PEGGED_SAMPLE_SECS" "$T/busy.stop"
  ) >"$T/busy" &
  busy=$!
  BUSY_PID=$busy
  rm -f "$T/timeline" "$T/timeline.stop"
  if [[ -n ${BENCH_TIMELINE:-} ]]; then
    link_timeline "$start" >"$T/timeline" &
    timeline=$!
  fi
  "$PULL" "$url" "$DL" "$start"
  wait "$sampler"
  if [[ -n $timeline ]]; then
    touch "$T/timeline.stop"
    wait "$timeline" || true
  fi
  WIN_CPU=$(busy_share "$(cat "$T/ticks0")" "$(cpu_ticks)")
  touch "$T/busy.stop"
  wait "$busy" || true
  BUSY_PID=
  WIN_PEGGED=$(awk -v p="$PEGGED_BUSY" '{n += $2; if ($1 >= p) k += $2} END {printf "%.2f", n ? k / n : 0}' "$T/busy")
  proc0=$(cat "$T/proc0")
  WIN_PROC_USR=0 WIN_PROC_SYS=0
  if (($# > 0)); then
    read -r WIN_PROC_USR WIN_PROC_SYS < <(awk -v a="$proc0" -v b="$(cpu_seconds "$@")" 'BEGIN {
      split(a, x, " "); split(b, y, " "); printf "%.2f %.2f\n", y[1] - x[1], y[2] - x[2] }')
  fi
  WIN_PROC_CPU=$(awk -v u="$WIN_PROC_USR" -v s="$WIN_PROC_SYS" 'BEGIN {printf "%.2f", u + s}')
  WIN_PROC_CS=$(($(context_switches "$@") - $(cat "$T/cs0")))
  read -r WIN_MUSR WIN_MSYS WIN_MSOFTIRQ < <(awk -v a="$(cat "$T/kinds0")" -v b="$(cpu_kinds)" -v hz="$(getconf CLK_TCK)" 'BEGIN {
    split(a, x, " "); split(b, y, " "); printf "%.2f %.2f %.2f\n", (y[1] - x[1]) / hz, (y[2] - x[2]) / hz, (y[3] - x[3]) / hz }')
  WIN_ORIGIN_TX=$(($(link_bytes "$FLEET_ORIGIN_NS" "$FLEET_ORIGIN_DEV" tx) - tx0))
  rx1=$(hosts_rx)
  WIN_HOSTS_RX=$((${rx1% *} - ${rx0% *})) WIN_HOSTS_RX_PKTS=$((${rx1#* } - ${rx0#* }))
  WIN_ORIGIN_RTX=$(awk -v a="$segs0" -v b="$(tcp_segs "$FLEET_ORIGIN_NS")" 'BEGIN {
    split(a, x, " "); split(b, y, " "); out = y[1] - x[1]
    if (out > 0) printf "%.3f", (y[2] - x[2]) / out; else print "n/a" }')
  if awk -v l="$FLEET_LATE" 'BEGIN {exit !(l > 0.2)}'; then
    log "WARNING: a host started its pull ${FLEET_LATE}s after the common start"
  fi
}

# record SYSTEM N REPEAT DIGEST TIMEOUTS LOG_TIMEOUTS FALLBACK_MIB CPU_S_PER_GIB: the figures
# of the run just measured (FLEET_SECS, FLEET_RC, WIN_*): verify, print, append to RESULTS.
ROWS=()
record() {
  local sys=$1 n=$2 rep=$3 digest=$4 timeouts=$5 logto=$6 fallback=$7 cpugib=$8 dup=${9:-n/a}
  local i ok good=0 all=() fast=() r p50 p90 max fast_max=n/a note='' sat=no
  for ((i = 0; i < n; i++)); do
    [[ ${FLEET_RC[i]} == 0 ]] || { log "$sys host $i: curl failed (status ${FLEET_RC[i]}; $T/pull-$i.log)"; continue; }
    good=$((good + 1))
    r=$(awk -v t="${FLEET_SECS[i]}" -v i="$(ideal_secs "$i")" 'BEGIN {printf "%.4f", t / i}')
    all+=("$r")
    [[ ${FLEET_SLOW[i]} == 1 ]] || fast+=("$r")
  done
  fleet_verify "$DL" "$digest"
  ok=$FLEET_OK
  ((${#FLEET_BAD[@]} == 0)) || log "$sys: hosts ${FLEET_BAD[*]} do not hold $digest"
  rm -f "$DL"/h*
  p50=$(printf '%s\n' "${all[@]}" | pct 50)
  p90=$(printf '%s\n' "${all[@]}" | pct 90)
  max=$(printf '%s\n' "${all[@]}" | pct 100)
  ((STRAGGLERS)) && fast_max=$(printf '%s\n' "${fast[@]}" | pct 100)
  if awk -v c="$WIN_CPU" -v s="$SATURATED" 'BEGIN {exit !(c > s)}'; then
    sat=yes note="SATURATED (not counted)"
  elif awk -v c="$WIN_PEGGED" -v s="$PEGGED_SHARE" 'BEGIN {exit !(c > s)}'; then
    sat=yes note="SATURATED $WIN_PEGGED of the time (not counted)"
  fi
  if ((ok < n || good < n)); then note="FAILED ($ok/$n verified, $good/$n curl ok)${note:+; $note}"; fi
  [[ -n $RECORD_EXTRA ]] && note="$RECORD_EXTRA${note:+; $note}"
  local origin received
  origin=$(ratio "$WIN_ORIGIN_TX" "$SIZE")
  received=$(ratio "$WIN_HOSTS_RX" "$((n * SIZE))")
  local x_loop=n/a machine
  [[ $cpugib != n/a && $LOOP_CPU != n/a ]] && x_loop=$(ratio "$cpugib" "$LOOP_CPU")
  # The whole machine's CPU per GiB the hosts received, by kind: what the run cost, the
  # emulated network's kernel work (bridge, tbf, veth; softirq) included.
  machine=$(awk -v u="$WIN_MUSR" -v s="$WIN_MSYS" -v q="$WIN_MSOFTIRQ" -v b="$WIN_HOSTS_RX" 'BEGIN {
    g = b / 1073741824; if (g == 0) g = 1; printf "machine_usr_s_per_gib=%.2f machine_sys_s_per_gib=%.2f machine_softirq_s_per_gib=%.2f", u / g, s / g, q / g }')
  machine+=" rx_frames_per_mib=$(awk -v p="$WIN_HOSTS_RX_PKTS" -v b="$WIN_HOSTS_RX" 'BEGIN {printf "%.1f", b ? p / (b / 1048576) : 0}')"
  ROWS+=("$(printf '%-8s %3s %3s  %5s %5s %5s %8s  %6s %5s %8s  %8s %6s %8s %7s  %4s %7s %6s  %s' "$sys" "$n" "$rep" \
    "$p50" "$p90" "$max" "$fast_max" "$origin" "$WIN_ORIGIN_RTX" "$received" "$timeouts" "$logto" "$fallback" "$dup" "$WIN_CPU" "$cpugib" "$x_loop" "$note")")
  say "${ROWS[-1]}"
  echo "fleet: system=$sys n=$n p50=$p50 p90=$p90 max=$max origin=$origin origin_rtx=$WIN_ORIGIN_RTX received=$received" \
    "timeouts=$timeouts fallback_mib=$fallback dup_mib=$dup cpu=$WIN_CPU cpu_pegged=$WIN_PEGGED cpu_s_per_gib=$cpugib fast_max=$fast_max" \
    "loop_cpu_s_per_gib=$LOOP_CPU loop_seed_cpu_s_per_gib=$LOOP_SEED_CPU cpu_x_loop=$x_loop $machine" \
    "log_timeouts=$logto saturated=$sat ok=$ok/$n repeat=$rep size_mib=$SIZE_MIB host_mbit=$HOST_MBIT" \
    "origin_mbit=$ORIGIN_MBIT mtu=$MTU cc=$CC stragglers=$STRAGGLERS run=$RUN_ID $MACHINE${RECORD_EXTRA:+ $RECORD_EXTRA}" >>"$RESULTS"
  RECORD_EXTRA=
}

# run_shoal N REP [LABEL [DIGEST]]: with DIGEST, the blob is not pushed (it is upstream) and
# hosts ask for it at SHOAL_PULL_PATH.
run_shoal() {
  local n=$1 rep=$2 label=${3:-shoal} dir=$T/${3:-shoal}-$1-$2 i timeouts logto=0 fallback received gib dup
  local path=${SHOAL_PULL_PATH:-$BLOB_REPO} up_tx0=0
  fleet_start_shoal "$dir"
  if [[ -z ${4:-} ]]; then
    random_blob
    ns_push "$FLEET_ORIGIN_NS" "$FLEET_ORIGIN_URL" "$BLOB_REPO" "$BLOB" "$BLOB_DIGEST"
    rm -f "$BLOB"
    fleet_wait_metainfo "$BLOB_DIGEST"
  else
    up_tx0=$(link_bytes "$UPSTREAM_NS" "$UPSTREAM_DEV" tx)
  fi
  sync # the blob on disk, not in dirty pages written back during the window
  timed_pull "$FLEET_AGENT_URL/v2/$path/blobs/$BLOB_DIGEST" "${FLEET_AGENT_PIDS[@]}"
  save_timeline "$label-$n-$rep"
  if [[ -n ${4:-} ]]; then
    RECORD_EXTRA="upstream=$(ratio "$(($(link_bytes "$UPSTREAM_NS" "$UPSTREAM_DEV" tx) - up_tx0))" "$SIZE")"
    RECORD_EXTRA+=" upstream_gets=$(grep -c "\"GET /v2/$BLOB_REPO/blobs/$BLOB_DIGEST " "$T/shoal_upstream-$n-$rep/upstream.log" || true)"
  fi
  if [[ -n ${BENCH_DUMP_METRICS:-} ]]; then
    for ((i = 0; i < n; i++)); do
      ip netns exec "${FLEET_NS[i]}" curl -sf "$FLEET_AGENT_URL/metrics" >"$BENCH_DUMP_METRICS.h$i" || true
      cp "${FLEET_AGENT_LOGS[i]}" "$BENCH_DUMP_METRICS.h$i.log" || true
    done
  fi
  timeouts=$(fleet_agents_metric shoal_agent_piece_timeouts_total)
  fallback=$(fleet_agents_metric shoal_agent_received_bytes_total 'source="origin"')
  [[ $fallback == n/a ]] && fallback=0
  fallback=$(awk -v b="$fallback" 'BEGIN {printf "%.1f", b / 1048576}')
  dup=$(fleet_agents_metric shoal_agent_duplicate_bytes_total)
  [[ $dup == n/a ]] || dup=$(awk -v b="$dup" 'BEGIN {printf "%.1f", b / 1048576}')
  received=$(fleet_agents_metric shoal_agent_received_bytes_total)
  [[ $received == n/a ]] && received=0
  gib=n/a
  ((received > 0)) && gib=$(awk -v c="$WIN_PROC_CPU" -v b="$received" 'BEGIN {printf "%.2f", c / (b / 1073741824)}')
  # N = 1 is the same pull as the loopback reference's (one agent, one seeder, no peers to
  # serve) over this run's shaped link: the reference x_link divides by, so the swarm's own
  # cost is seen apart from what the link's rate costs (docs/benchmarks.md, session 26).
  if ((n == 1)) && [[ $gib != n/a && $label == shoal ]]; then
    LINK_CPUS+=("$gib")
    LINK_CPU=$(printf '%.2f' "$(printf '%s\n' "${LINK_CPUS[@]}" | median_lines)")
  fi
  [[ $gib != n/a && $LINK_CPU != n/a ]] && RECORD_EXTRA="${RECORD_EXTRA:+$RECORD_EXTRA }x_link=$(ratio "$gib" "$LINK_CPU")"
  [[ $gib != n/a && -n ${BARE_CPU[$n]:-} ]] && RECORD_EXTRA="${RECORD_EXTRA:+$RECORD_EXTRA }x_bare=$(ratio "$gib" "${BARE_CPU[$n]}")"
  # The agents' CPU split into user and system time per GiB received, and the bytes they sent
  # their peers ÷ the bytes they received: a fleet agent uploads about as much as it
  # downloads, the loopback reference's agent only downloads.
  local sent
  sent=$(fleet_agents_metric shoal_agent_peer_sent_bytes_total)
  [[ $sent == n/a ]] && sent=0
  ((received > 0)) && RECORD_EXTRA="${RECORD_EXTRA:+$RECORD_EXTRA }$(awk -v u="$WIN_PROC_USR" -v s="$WIN_PROC_SYS" -v b="$received" -v o="$sent" 'BEGIN {
    g = b / 1073741824; printf "usr_s_per_gib=%.2f sys_s_per_gib=%.2f sent_per_received=%.2f", u / g, s / g, o / b }')"
  ((received > 0)) && RECORD_EXTRA+=" cs_per_mib=$(awk -v c="$WIN_PROC_CS" -v b="$received" 'BEGIN {printf "%.1f", c / (b / 1048576)}')"
  for ((i = 0; i < n; i++)); do
    logto=$((logto + $(grep -c 'timed out' "${FLEET_AGENT_LOGS[i]}" || true)))
  done
  # When each agent held every piece (its log's "blob downloaded and verified swarm_secs=",
  # from the client's request; before the blob's fsync into the cache) ÷ the host's limit,
  # beside the client's own time: a client reads in order while pieces arrive rarest first,
  # so it can end well after the swarm, and this shows how much of its time is that tail.
  local swarm=() secs swarm_max=n/a
  for ((i = 0; i < n; i++)); do
    secs=$(grep -h 'blob downloaded and verified' "${FLEET_AGENT_LOGS[i]}" | grep -o 'swarm_secs=[0-9.]*' | tail -1 | cut -d= -f2)
    [[ -n $secs ]] && swarm+=("$(awk -v t="$secs" -v l="$(ideal_secs "$i")" 'BEGIN {printf "%.4f", t / l}')")
  done
  ((${#swarm[@]} > 0)) && swarm_max=$(printf '%s\n' "${swarm[@]}" | pct 100)
  RECORD_EXTRA="${RECORD_EXTRA:+$RECORD_EXTRA }swarm_max=$swarm_max"
  record "$label" "$n" "$rep" "$BLOB_DIGEST" "$timeouts" "$logto" "$fallback" "$gib" "$dup"
  fleet_stop_shoal
  rm -rf "$dir/origin" "$dir"/agent*/ # the data; the logs stay (with KEEP_TMP=1, after the run too)
}

# run_shoal_tls N REP: run_shoal with TLS everywhere: certificates from a CA made for the run,
# https listeners, the peer protocol over mutual TLS (the cost of TLS, against run_shoal).
run_shoal_tls() {
  FLEET_TLS=1
  run_shoal "$1" "$2" shoal_tls
  FLEET_TLS=0
  _fleet_tls "$T/unused"
}

# registry_config DIR ADDR: a docker-registry config with storage in DIR/data and an access log.
registry_config() {
  mkdir -p "$1/data"
  cat >"$1/config.yml" <<EOF
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $1/data
  delete:
    enabled: true
http:
  addr: $2
EOF
}

# run_shoal_upstream N REP: the blob only upstream; hosts pull it through their agents.
run_shoal_upstream() {
  local n=$1 rep=$2 dir=$T/shoal_upstream-$1-$2 pid
  registry_config "$dir/upstream" "${UPSTREAM_URL#http://}"
  ns_bg "$UPSTREAM_NS" "$dir/upstream.log" "$DOCKER_REGISTRY" serve "$dir/upstream/config.yml"
  pid=$NS_PID
  wait_ready 30 "$pid" docker-registry in_ns "$UPSTREAM_NS" curl -sf --max-time 2 -o /dev/null "$UPSTREAM_URL/v2/" ||
    die "$WAIT_ERR (log: $dir/upstream.log)"
  random_blob
  ns_push "$UPSTREAM_NS" "$UPSTREAM_URL" "$BLOB_REPO" "$BLOB" "$BLOB_DIGEST"
  rm -f "$BLOB"
  sync
  FLEET_ORIGIN_ARGS=(--upstream "upstream.test=$UPSTREAM_URL")
  SHOAL_PULL_PATH="upstream.test/$BLOB_REPO" run_shoal "$n" "$rep" shoal_up "$BLOB_DIGEST"
  FLEET_ORIGIN_ARGS=()
  ns_stop "$pid"
  rm -rf "$dir/upstream/data"
}

run_registry() {
  local n=$1 rep=$2 dir=$T/registry-$1-$2 pid
  mkdir -p "$dir/data"
  cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: ${REGISTRY_URL#http://}
EOF
  ns_bg "$FLEET_ORIGIN_NS" "$dir/registry.log" "$DOCKER_REGISTRY" serve "$dir/config.yml"
  pid=$NS_PID
  wait_ready 30 "$pid" docker-registry in_ns "$FLEET_ORIGIN_NS" curl -sf --max-time 2 -o /dev/null "$REGISTRY_URL/v2/" ||
    die "$WAIT_ERR (log: $dir/registry.log)"
  random_blob
  ns_push "$FLEET_ORIGIN_NS" "$REGISTRY_URL" "$BLOB_REPO" "$BLOB" "$BLOB_DIGEST"
  rm -f "$BLOB"
  sync # the blob on disk, not in dirty pages written back during the window
  timed_pull "$REGISTRY_URL/v2/$BLOB_REPO/blobs/$BLOB_DIGEST"
  save_timeline "registry-$n-$rep"
  record registry "$n" "$rep" "$BLOB_DIGEST" n/a n/a n/a n/a
  ns_stop "$pid"
  rm -rf "$dir/data"
}

header() {
  printf '%-8s %3s %3s  %5s %5s %5s %8s  %6s %5s %8s  %8s %6s %8s %7s  %4s %7s %6s  %s' system N rep p50 p90 max fast_max \
    origin o_rtx received timeouts tmo_log fb_MiB dup_MiB cpu cpu_s/G x_loop note
}

# loopback_reference: the loopback one-seeder pull (swarm.sh part 1, 1 GiB, LOOPBACK_ROUNDS
# rounds) on this machine now; sets LOOP_CPU to its median agent CPU-s per GiB.
loopback_reference() {
  local out cpu
  ((LOOPBACK_ROUNDS > 0)) || return 0
  [[ " $SYSTEMS " == *" shoal"* ]] || return 0
  log "loopback reference: swarm.sh part 1, $LOOPBACK_ROUNDS rounds"
  out=$(BENCH_PARTS=1 BENCH_BIG_MIB=1024 BENCH_BIG_ROUNDS=$LOOPBACK_ROUNDS BENCH_BIG_RATE_MIB= bash "$here/swarm.sh" 2>&1) ||
    die "the loopback reference failed: $(tail -5 <<<"$out")"
  cpu=$(sed -n 's/^agent CPU per pull: median \([0-9.]*\) s.*/\1/p' <<<"$out")
  [[ -n $cpu ]] || die "no 'agent CPU per pull' in the loopback reference's output: $(tail -5 <<<"$out")"
  LOOP_CPU=$cpu
  LOOP_SEED_CPU=$(sed -n 's/^seeder (origin) CPU per pull: median \([0-9.]*\) s.*/\1/p' <<<"$out")
  LOOP_SEED_CPU=${LOOP_SEED_CPU:-n/a}
  say "loopback one-seeder pull (swarm.sh part 1, 1 GiB): $(grep -E '^(agent \(swarm|agent CPU|seeder|throughput ratio)' <<<"$out" | paste -sd';')"
}

MACHINE=$(bash "$here/machine.sh")
if [[ ${BENCH_FLOOR:-1} != 0 && " $SYSTEMS " == *" shoal"* ]]; then
  log "the links' floor: link_floor.sh"
  MACHINE+=" $(bash "$here/link_floor.sh")"
fi
say "== fleet benchmark over shaped links, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ), run $RUN_ID"
say "blob ${SIZE_MIB} MiB, hosts ${HOST_MBIT} Mbit/s, origin ${ORIGIN_MBIT} Mbit/s, MTU $MTU, TCP $CC, stragglers $STRAGGLERS," \
  "repeats $REPEATS, systems: $SYSTEMS; shoal: $SHOAL_BIN; guest memory $GUEST_MEMORY; machine: $MACHINE"
say "times ÷ (size ÷ host link) = $(awk -v s="$SIZE" -v m="$HOST_MBIT" 'BEGIN {printf "%.1f", s * 8 / (m * 1e6)}')s" \
  "at $HOST_MBIT Mbit/s; a central registry's floor is N × $HOST_MBIT ÷ $ORIGIN_MBIT when that exceeds 1"
loopback_reference
say "$(header)"
for n in $FLEET; do
  slow=0
  ((STRAGGLERS)) && slow=$((n / 4))
  fleet_setup "$n" "$HOST_MBIT" "$ORIGIN_MBIT" "$slow"
  if [[ " $SYSTEMS " == *" shoal_upstream "* ]]; then
    netns_add_host u "$UPSTREAM_ADDR" "$UPSTREAM_MBIT"
    UPSTREAM_NS=$NETNS_NS UPSTREAM_DEV=$NETNS_DEV
  fi
  for ((rep = 1; rep <= REPEATS; rep++)); do
    for s in $SYSTEMS; do
      "run_$s" "$n" "$rep"
    done
  done
  netns_del_all
done

say ""
say "== summary (run $RUN_ID; results appended to $RESULTS)"
say "$(header)"
for r in "${ROWS[@]}"; do say "$r"; done
say "(p50/p90/max: completion ÷ the host link's time for the blob; origin: origin-link bytes ÷ size;"
say " received: host-link bytes ÷ (N × size); cpu: machine busy share, > $SATURATED = not counted,"
say " as is a run with more than $PEGGED_SHARE of its ${PEGGED_SAMPLE_SECS}s samples at >= $PEGGED_BUSY busy;"
say " x_loop: cpu_s/G ÷ the loopback one-seeder pull's agent CPU-s per GiB, $LOOP_CPU, measured first)"
say "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
cp "$report" "${BENCH_REPORT:-/tmp/shoal-fleet-bench.txt}"
if [[ -n $PLOT ]]; then
  python3 "$here/plot_fleet.py" "$RESULTS" "$PLOT" --run "$RUN_ID"
  log "plot written to $PLOT"
fi
