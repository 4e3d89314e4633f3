#!/usr/bin/env bash
# The chaos benchmark: integration/tests/chaos.rs run for minutes instead of seconds (many more
# crashes, collections and re-pushes), release build. Prints the test's summary line:
#   acknowledged pushes, re-pushes of deleted layers, failed pushes, deletes, kills, GCs run
#   and refused, pulls that failed while faults ran, images checked afterwards, and lost
#   (must be 0; the test fails otherwise).
#   CHAOS_SECS=300 integration/bench/chaos.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${CHAOS_SECS:-300}
cargo build --release --bin shoal >/dev/null
# The whole output goes to a log, the summary lines to the terminal as they come; the exit
# status is cargo's (a failed or non-compiling test fails this script, with the log's end).
log=$(mktemp /tmp/shoal-chaos.XXXXXX)
set +e
SHOAL_BIN=$PWD/target/release/shoal CHAOS_SECS=$secs \
  cargo test --release -p shoal-integration --test chaos -- --nocapture 2>&1 | tee "$log" |
  grep -E '^chaos:|^final gc:|^test result|panicked|acknowledged reads failed'
rc=${PIPESTATUS[0]}
set -e
if ((rc != 0)); then
  echo "cargo test failed (exit status $rc); the last 40 lines of $log:" >&2
  tail -n 40 "$log" >&2
  exit "$rc"
fi
rm -f "$log"
