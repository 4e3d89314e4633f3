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
SHOAL_BIN=$PWD/target/release/shoal CHAOS_SECS=$secs \
  cargo test --release -p shoal-integration --test chaos -- --nocapture 2>&1 |
  grep -E '^chaos:|^final gc:|^test result|panicked|acknowledged reads failed' || true
