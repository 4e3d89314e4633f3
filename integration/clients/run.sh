#!/usr/bin/env bash
# Run the client integration tests one after another and print a summary.
#   integration/clients/run.sh                 # all test_*.sh against shoal
#   SHOAL_UNDER_TEST=docker-registry integration/clients/run.sh
#   integration/clients/run.sh docker skopeo   # a subset, by name
#   integration/clients/run.sh cluster_skopeo cluster_partition   # the origin cluster tests
# Each test's output goes to a log; logs are kept (and their directory printed) only if
# something failed. Exits non-zero if any test failed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib.sh" # for SHOAL_BIN / SHOAL_UNDER_TEST defaults only; no lib_init here

if [[ $SHOAL_UNDER_TEST == shoal && ! -x $SHOAL_BIN ]]; then
  echo "shoal binary not found at SHOAL_BIN=$SHOAL_BIN: build it, or run with SHOAL_UNDER_TEST=docker-registry" >&2
  exit 2
fi

if [[ $# -gt 0 ]]; then
  tests=()
  for n in "$@"; do tests+=("$here/test_${n#test_}"); done
  tests=("${tests[@]/%.sh/}")
  tests=("${tests[@]/%/.sh}")
else
  tests=("$here"/test_*.sh)
fi

logs=$(mktemp -d /tmp/shoal-it-results.XXXXXX)
echo "registry under test: $SHOAL_UNDER_TEST$([[ $SHOAL_UNDER_TEST == shoal ]] && echo " ($SHOAL_BIN)")"
declare -a results
failed=0
for t in "${tests[@]}"; do
  name=$(basename "$t" .sh)
  name=${name#test_}
  [[ -x $t ]] || { results+=("$(printf '%-18s MISSING  %s' "$name" "$t")"); failed=$((failed + 1)); continue; }
  printf '%-18s ... ' "$name"
  start=$SECONDS
  if "$t" >"$logs/$name.log" 2>&1; then
    status=PASS
  else
    status=FAIL
    failed=$((failed + 1))
  fi
  secs=$((SECONDS - start))
  echo "$status (${secs}s)"
  if [[ $status == FAIL ]]; then
    # CI keeps only what is printed: show the end of the log, not just the verdict.
    tail -n 60 "$logs/$name.log" | sed 's/^/    /'
  fi
  results+=("$(printf '%-18s %-5s %4ss' "$name" "$status" "$secs")")
done

echo
echo "== summary ($SHOAL_UNDER_TEST) =="
printf '%s\n' "${results[@]}"
if ((failed > 0)); then
  echo "$failed of ${#tests[@]} failed; full logs in $logs"
  exit 1
fi
rm -rf "$logs"
echo "all ${#tests[@]} passed"
