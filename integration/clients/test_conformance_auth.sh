#!/usr/bin/env bash
# The API conformance tests (one per MUST clause of the distribution spec) against an origin
# with access control on: token auth, a user with push rights whose credentials every test
# request carries (Basic, which the origin keeps accepting beside tokens), and nothing
# allowed anonymously. The spec's behaviour must not change for an authorized client.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
lib_init conformance_auth
require_shoal_under_test
command -v cargo >/dev/null || die "cargo missing (the conformance tests are Rust tests)"

hash=$(printf 'conformance-pass' | "$SHOAL_BIN" passwd) || die "shoal passwd failed"
cat >"$T/origin.toml" <<TOML
[auth]
tokens = true
anonymous = "none"
users = [{ name = "tester", password_argon2 = "$hash", access = "push" }]
TOML
SHOAL_ARGS="--config $T/origin.toml" start_registry shoal "$T/data"
# Without credentials, nothing.
assert_eq 401 "$(http_code "$REG_URL/v2/")" "GET /v2/ without credentials"
cd "$(dirname "$0")/../.."
SHOAL_TEST_REGISTRY_URL=$REG_URL SHOAL_TEST_REGISTRY_CREDS=tester:conformance-pass \
  cargo test --locked -q -p shoal-integration --no-fail-fast \
  --test base --test blobs --test uploads --test manifests --test tags_catalog --test referrers \
  --test bad_input >"$T/cargo.log" 2>&1 || { tail -60 "$T/cargo.log" >&2; die "conformance tests failed with auth on"; }
passed=$(grep -o '^test result: ok. [0-9]*' "$T/cargo.log" | awk '{s += $4} END {print s + 0}')
((passed >= 80)) || die "only $passed conformance tests ran"
grep -q 'principal=tester\|user=tester\|tester' "$REG_LOG" || die "the origin's log names no principal"
log "$passed conformance tests passed with auth on"
