#!/usr/bin/env bash
# link_floor.sh: what the least possible host spends in CPU per GiB to receive and to send
# a blob over one shaped link, against the same over loopback (not a benchmark of Shoal).
# min_peer.py moves the bytes with nothing else (no disk, no scheduler, one SHA-256 on
# receipt), with Shoal's socket settings (a 256 KiB receive low-water mark, 128 KiB unsent);
# so its link ÷ loopback ratio is what the link itself costs a host that does nothing else
# on this machine, the floor under fleet.sh's x_loop. Prints one line:
#   floor_rx_loop floor_rx_link   min_peer fetch's CPU-s per GiB over loopback / the link
#   floor_x_loop                  their ratio, as fleet.sh's x_loop divides
#   floor_tx_loop floor_tx_link   min_peer serve's CPU-s per GiB sent over loopback / the link
# Two namespaces on a bridge (netns.sh): a sender at BENCH_ORIGIN_MBIT, a host at
# BENCH_HOST_MBIT, veths at BENCH_MTU, cubic. Needs root, iproute2 and python3; ~2 × the
# link time of one blob of BENCH_SIZE_MIB.
#   bash integration/bench/link_floor.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../clients/lib.sh
source "$here/../clients/lib.sh"
# shellcheck source=netns.sh
source "$here/netns.sh"
lib_init link-floor
SIZE=$((${BENCH_SIZE_MIB:-128} * 1024 * 1024))
LOOP_ROUNDS=3
PORT=8080
export NETNS_MTU=${BENCH_MTU:-1500} NETNS_CC=${BENCH_CC-cubic}
netns_init
netns_add_host o 10.77.0.1 "${BENCH_ORIGIN_MBIT:-500}"
O=$NETNS_NS
netns_add_host h 10.77.1.1 "${BENCH_HOST_MBIT:-50}"
H=$NETNS_NS
# addr NS: the address of NS's server.
addr() { if [[ $1 == "$O" ]]; then echo 10.77.0.1; else echo 10.77.1.1; fi; }
for ns in "$O" "$H"; do
  ns_bg "$ns" "$T/serve-$ns.log" python3 "$here/min_peer.py" serve "$(addr "$ns")" "$PORT" "$SIZE"
done
for ns in "$O" "$H"; do
  wait_until 30 "min_peer in $ns" grep -q ready "$T/serve-$ns.log"
done
# fetch FROM_NS SERVER_NS: one GET; prints the receiver's CPU-s per GiB (dies on a short body).
fetch() {
  local out
  out=$(in_ns "$1" python3 "$here/min_peer.py" fetch "$(addr "$2")" "$PORT")
  [[ $out == *" bytes=$SIZE "* ]] || die "min_peer fetch from $2 in $1: $out"
  sed -n 's/.*cpu_s_per_gib=\([0-9.]*\).*/\1/p' <<<"$out"
}
# sends_logged SERVER_NS COUNT: whether the server has printed COUNT figures yet.
sends_logged() { (($(grep -c '^sent ' "$T/serve-$1.log") >= $2)); }
# sent SERVER_NS COUNT: the server's first COUNT figures, one per line, once it has printed
# them (it does after the client's close, so just after `fetch` returns).
sent() {
  wait_until 10 "$2 sends logged by min_peer in $1" sends_logged "$1" "$2"
  sed -n 's/^sent cpu_s_per_gib=//p' "$T/serve-$1.log" | head -n "$2"
}
rx_loop=$(for ((i = 0; i < LOOP_ROUNDS; i++)); do fetch "$O" "$O"; done | median_lines)
rx_link=$(fetch "$H" "$O")
for ((i = 0; i < LOOP_ROUNDS; i++)); do fetch "$H" "$H" >/dev/null; done
tx_loop=$(sent "$H" "$LOOP_ROUNDS" | median_lines)
fetch "$O" "$H" >/dev/null
tx_link=$(sent "$H" $((LOOP_ROUNDS + 1)) | tail -1)
netns_del_all
echo "floor_rx_loop=$rx_loop floor_rx_link=$rx_link floor_x_loop=$(awk -v a="$rx_link" -v b="$rx_loop" 'BEGIN {printf "%.2f", a / b}')" \
  "floor_tx_loop=$tx_loop floor_tx_link=$tx_link"
