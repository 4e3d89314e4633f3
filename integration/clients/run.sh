#!/usr/bin/env bash
# Run the client integration tests one after another and print a summary.
#   integration/clients/run.sh                 # all test_*.sh against shoal
#   SHOAL_UNDER_TEST=docker-registry integration/clients/run.sh
#   integration/clients/run.sh docker skopeo   # a subset, by name
#   integration/clients/run.sh cluster_skopeo cluster_partition   # the origin cluster tests
# Each test's output goes to a log; logs are kept (and their directory printed) only if
# something failed. Exits non-zero if any test failed.
# A test still running after TEST_TIMEOUT seconds (default 900; the longest take under two
# minutes) is stopped and fails, so one hung test cannot eat CI's whole time limit unseen.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib.sh" # for SHOAL_BIN / SHOAL_UNDER_TEST defaults only; no lib_init here
TEST_TIMEOUT=${TEST_TIMEOUT:-900}

# run_test SCRIPT LOG: SCRIPT under timeout(1), output to LOG; returns its exit status (124,
# or 137 after SIGKILL, when it timed out). timeout(1) puts the test in a process group of
# its own, so its SIGTERM also reaches whatever the test is blocked in and the test's exit
# trap cleans up; the terminal's Ctrl-C no longer reaches that group, so INT and TERM to this
# script are passed on (see the traps below). -k 30: SIGKILL if the cleanup hangs too.
TEST_PID=
run_test() {
  local rc=0
  timeout -k 30 "$TEST_TIMEOUT" "$1" >"$2" 2>&1 &
  TEST_PID=$!
  wait "$TEST_PID" 2>/dev/null || rc=$? # 2>/dev/null: no "Killed" line from bash after -k
  TEST_PID=
  return "$rc"
}
# stop_test: end the running test (timeout(1) passes SIGTERM on to its group) and wait for it.
stop_test() {
  [[ -n $TEST_PID ]] || return 0
  kill -TERM "$TEST_PID" 2>/dev/null || true
  wait "$TEST_PID" 2>/dev/null || true
}
trap 'stop_test; exit 130' INT
trap 'stop_test; exit 143' TERM

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
  rc=0
  run_test "$t" "$logs/$name.log" || rc=$?
  secs=$((SECONDS - start))
  note=
  if ((rc == 0)); then
    status=PASS
  else
    status=FAIL
    failed=$((failed + 1))
    # 137 alone may be any SIGKILL (the OOM killer's too); only timeout(1)'s comes this late.
    if ((rc == 124 || (rc == 137 && secs >= TEST_TIMEOUT))); then
      note=" timed out after ${TEST_TIMEOUT}s"
    fi
  fi
  echo "$status (${secs}s)$note"
  if [[ $status == FAIL ]]; then
    # CI keeps only what is printed: show the end of the log, not just the verdict.
    tail -n 60 "$logs/$name.log" | sed 's/^/    /'
  fi
  results+=("$(printf '%-18s %-5s %4ss%s' "$name" "$status" "$secs" "$note")")
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
