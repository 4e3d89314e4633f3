#!/usr/bin/env bash
# The API conformance tests (one per MUST clause of the distribution spec) against a cluster
# of three origins, R = 2, with every request sent to the next origin in turn, as through a
# load balancer without session affinity: an upload started on one origin continues on
# another, a manifest put on one is read from another, tags, the catalog and referrers are
# listed by whichever origin is asked. Each origin must have served a share of the requests.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
lib_init cluster_conformance
require_shoal_under_test
command -v cargo >/dev/null || die "cargo missing (the conformance tests are Rust tests)"

start_origin_cluster 3 2
urls=$(IFS=,; echo "${OC_URLS[*]}")
log "conformance tests over $urls"
cd "$(dirname "$0")/../.."
SHOAL_TEST_REGISTRY_URL=$urls cargo test --locked -q -p shoal-integration --no-fail-fast \
  --test base --test blobs --test uploads --test manifests --test tags_catalog --test referrers \
  --test bad_input >"$T/cargo.log" 2>&1 || { tail -60 "$T/cargo.log" >&2; die "conformance tests failed against the cluster"; }
passed=$(grep -o '^test result: ok. [0-9]*' "$T/cargo.log" | awk '{s += $4} END {print s + 0}')
((passed >= 80)) || die "only $passed conformance tests ran"
for ((i = 0; i < 3; i++)); do
  served=$(grep -c '/v2/' "${OC_LOGS[i]}" || true)
  ((served >= 50)) || die "origin $i served only $served registry requests: requests were not spread"
  log "origin $i served $served registry requests"
done
log "$passed conformance tests passed with requests spread over three origins"
