# A fleet run's link rates over time (sourced by fleet.sh; not by any test): which links
# carried what, second by second, to see where a slow run's time went (which links idled).
# Reads fleet.sh's and netns.sh's state: FLEET_N, FLEET_DEV, FLEET_ORIGIN_DEV, NETNS_BR, T,
# and BENCH_TIMELINE (where save_timeline writes; unset, nothing is sampled or saved).

# link_timeline START: from START until $T/timeline.stop exists (or the bridge is gone, if
# the run died), every 0.5 s a line of the time and the bridge's counters: each host's
# download and upload (its port's tx and rx), then the origin's upload. One `ip netns exec`
# per line, so the sampling costs little.
link_timeline() {
  local files=() i port
  for ((i = 0; i < FLEET_N; i++)); do
    port=/sys/class/net/$(netns_port "${FLEET_DEV[i]}")/statistics
    files+=("$port/tx_bytes" "$port/rx_bytes")
  done
  files+=("/sys/class/net/$(netns_port "$FLEET_ORIGIN_DEV")/statistics/rx_bytes")
  sleep_until "$1"
  while [[ ! -e $T/timeline.stop && -e /run/netns/$NETNS_BR ]]; do
    echo "$EPOCHREALTIME $(ip netns exec "$NETNS_BR" cat "${files[@]}" | paste -sd' ')"
    sleep 0.5
  done
}

# save_timeline NAME: the last pull's link_timeline as Mbit/s per second, to
# $BENCH_TIMELINE.NAME (when BENCH_TIMELINE is set).
save_timeline() {
  [[ -n ${BENCH_TIMELINE:-} && -s $T/timeline ]] || return 0
  awk -v n="$FLEET_N" '
    function mbit(f) { return ($f - p[f]) * 8 / dt / 1e6 }
    NR == 1 { t0 = $1; printf "%5s  %-*s| %-*s| %s\n", "secs", 4 * n, "download, Mbit/s", 4 * n, "upload", "origin" }
    NR == 1 || $1 - pt >= 0.99 {
      if (NR > 1) {
        dt = $1 - pt; line = sprintf("%5.1f  ", $1 - t0)
        for (i = 0; i < n; i++) line = line sprintf("%3.0f ", mbit(2 + 2 * i))
        line = line "| "
        for (i = 0; i < n; i++) line = line sprintf("%3.0f ", mbit(3 + 2 * i))
        print line sprintf("| %4.0f", mbit(2 + 2 * n))
      }
      pt = $1; for (i = 2; i <= NF; i++) p[i] = $i
    }
  ' "$T/timeline" >"$BENCH_TIMELINE.$1"
}
