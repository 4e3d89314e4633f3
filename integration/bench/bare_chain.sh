# fleet.sh's `bare` system (sourced by fleet.sh; not by any test): a chain of min_peer.py
# relays on the fleet's links, the floor under the swarm at the same N (fleet.sh's header,
# docs/benchmarks.md session 33). Reads fleet.sh's and netns.sh's state (FLEET_*, T, DL, SIZE,
# here) and calls its timed_pull, save_timeline and record.

declare -A BARE_CPU # N -> the bare chain's CPU-s per GiB at N in this invocation (its last run)
BARE_PORT=8080

# bare_pull URL OUT START: timed_pull's hosts as the bare chain (URL unused): host i relays
# from host i-1 (host 0 from the origin namespace's server) to host i+1, hashing what passes.
# Sets FLEET_RC FLEET_SECS FLEET_LATE as fleet_pull does; each host's CPU is in OUT/h<i>.cpu.
bare_pull() {
  local out=$2 start=$3 i up last pids=()
  for ((i = 0; i < FLEET_N; i++)); do
    up=$FLEET_ORIGIN_ADDR
    ((i > 0)) && up=${FLEET_ADDR[i - 1]}
    last=()
    ((i == FLEET_N - 1)) && last=(last)
    rm -f "$out/h$i.result" "$out/h$i.cpu"
    ns_bg "${FLEET_NS[i]}" "$T/bare-$i.log" python3 "$here/min_peer.py" relay "$up" "$BARE_PORT" "${FLEET_ADDR[i]}" \
      "$start" "$out/h$i" "${last[@]}"
    pids[i]=$NS_PID
  done
  local results=()
  for ((i = 0; i < FLEET_N; i++)); do
    ns_wait "${pids[i]}" || true
    results[i]=$out/h$i.result
  done
  fleet_read_results "$start" "${results[@]}"
}

# run_bare N REP: the bare chain (see the header): its times and its relays' CPU per GiB, the
# floor x_bare divides Shoal's by at the same N.
run_bare() {
  local n=$1 rep=$2 pid digest gib
  ns_bg "$FLEET_ORIGIN_NS" "$T/bare-server.log" python3 "$here/min_peer.py" serve "$FLEET_ORIGIN_ADDR" "$BARE_PORT" "$SIZE"
  pid=$NS_PID
  wait_until 60 "the bare chain's server" grep -q '^ready' "$T/bare-server.log"
  digest=sha256:$(sed -n 's/^ready sha256=//p' "$T/bare-server.log")
  PULL=bare_pull timed_pull unused
  save_timeline "bare-$n-$rep"
  gib=$(cat "$DL"/h*.cpu 2>/dev/null | awk '{c += $1; b += $2} END {if (b > 0) printf "%.2f", c / (b / 1073741824); else print "n/a"}')
  [[ $gib == n/a ]] || BARE_CPU[$n]=$gib
  record bare "$n" "$rep" "$digest" n/a n/a n/a "$gib"
  ns_stop "$pid"
}
