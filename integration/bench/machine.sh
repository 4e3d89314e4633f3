#!/usr/bin/env bash
# machine.sh: figures of this machine's state, printed as "wake_us=X busy_wake_us=Y
# exit_us=E sha_gbs=Z" (not a benchmark of Shoal). The same build's CPU per byte moves by up
# to 2x on this VM between runs (docs/benchmarks.md, sessions 24-27); the benchmarks record
# these beside their own figures so that runs from different states are not compared as equals.
#   wake_us       CPU microseconds per round trip between two threads that go idle in between
#                 (wake_cost.c, 5 ms apart: a timer sleep and two wake-ups from idle), the
#                 price of every sleep a slow link's reader and writer take
#   busy_wake_us  the same hand-offs between threads that never go idle
#   exit_us       microseconds per trip to the hypervisor (exit_cost.c: CPUID, which always
#                 leaves a VM), the unit a VM pays in for every timer interrupt, timer
#                 reprogramming, wake-up IPI and halt: 6 on the VM measured in session 32,
#                 about a microsecond or less on a VM directly on hardware, none on bare metal
#   sha_gbs       openssl's SHA-256 over 256 KiB blocks in GB/s (the agents verify every piece)
# Needs gcc and openssl; prints "wake_us=n/a ..." for what it cannot measure.
#   bash integration/bench/machine.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
wake=n/a busy=n/a exits=n/a sha=n/a
if command -v gcc >/dev/null && gcc -O2 -pthread "$here/wake_cost.c" -o "$dir/wake_cost" 2>"$dir/gcc.log"; then
  wake=$("$dir/wake_cost" 400 5000)
  busy=$("$dir/wake_cost" 20000 0)
fi
if command -v gcc >/dev/null && gcc -O2 "$here/exit_cost.c" -o "$dir/exit_cost" 2>>"$dir/gcc.log"; then
  exits=$("$dir/exit_cost" 100000)
fi
if command -v openssl >/dev/null; then
  sha=$(openssl speed -evp sha256 -bytes 262144 -seconds 1 2>/dev/null |
    awk '$1 == "sha256" {v = $2; sub(/k$/, "", v); printf "%.2f", v * 1000 / 1e9}')
  [[ -n $sha ]] || sha=n/a
fi
echo "wake_us=$wake busy_wake_us=$busy exit_us=$exits sha_gbs=$sha"
