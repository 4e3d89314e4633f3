#!/usr/bin/env bash
# Every test Shoal has, in the order that fails fastest: formatting, lints, unit and API tests
# (which start real `shoal` processes), then real clients (dockerd, containerd, skopeo).
# Real-client tests need root and the Debian packages that .ci/run installs.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "cargo build (the shoal binary the tests start)"
cargo build --workspace --bins --locked
# The tests' origins refuse writes once their disk is 95 % full: say how full it is.
df -h . | tail -n 1
step "unit and API tests"
cargo test --workspace --locked
step "real clients: docker, containerd, skopeo"
SHOAL_BIN="$PWD/target/debug/shoal" bash integration/clients/run.sh
step "all tests passed"
