# Guest memory for the benchmarks (sourced by fleet.sh and swarm.sh; not by any test).
#
# Why: on a VM whose balloon reports free pages (virtio-balloon free page reporting), the
# kernel hands memory back to the hypervisor seconds after it is freed, and touching it again
# costs about 8 system CPU-seconds per GiB here (one hypervisor fault per 4 KiB page; `dd` of
# 256 MiB: 0.04 s into memory still backed, 1.7-2.1 s into memory handed back). A benchmark
# that emulates 20 hosts in one kernel writes 20 copies of the blob into that one kernel's
# page cache, and pays it 20 times in the same seconds: its 20-host runs were pegged at
# 0.98-1.00 busy from the moment their page cache passed about 1 GiB (docs/benchmarks.md,
# session 23). A real host writes only its own copy, once, on its own cores.
#
# hold_guest_memory MIB: while the script runs, stop the kernel reporting free pages (raise
# page_reporting_order above the buddy allocator's largest block, so no free block
# qualifies; the old value is restored at exit), then write MIB MiB into a tmpfs file and
# delete it: that memory stays backed, and the runs' page cache reuses it at the cheap rate.
# A no-op (with a log line) where the kernel has no page reporting or the knob is read-only.
# BENCH_HOLD_MEMORY_MIB overrides MIB; 0 turns the whole thing off.

# The knob, and an order above every buddy block (MAX_PAGE_ORDER is 10 on x86-64).
GUEST_REPORTING_ORDER=/sys/module/page_reporting/parameters/page_reporting_order
GUEST_NO_REPORTING_ORDER=11

hold_guest_memory() {
  local mib=${BENCH_HOLD_MEMORY_MIB:-$1} old f t0
  GUEST_MEMORY="not held"
  ((mib > 0)) || return 0
  if [[ ! -w $GUEST_REPORTING_ORDER ]]; then
    log "guest memory: no writable $GUEST_REPORTING_ORDER; freed memory may cost more to touch again"
    return 0
  fi
  old=$(cat "$GUEST_REPORTING_ORDER")
  if ! echo "$GUEST_NO_REPORTING_ORDER" >"$GUEST_REPORTING_ORDER" 2>/dev/null; then
    log "guest memory: this kernel refused page_reporting_order=$GUEST_NO_REPORTING_ORDER; not held"
    return 0
  fi
  on_exit "echo $old >$GUEST_REPORTING_ORDER"
  f=$(mktemp /dev/shm/shoal-bench-hold.XXXXXX)
  on_exit "rm -f '$f'" # an interrupted dd would leave gigabytes in tmpfs
  t0=$EPOCHREALTIME
  if ! dd if=/dev/zero of="$f" bs=1M count="$mib" status=none; then
    log "guest memory: could not write $mib MiB to /dev/shm; reporting is off, but less is held"
  fi
  rm -f "$f"
  GUEST_MEMORY="held ${mib} MiB (page_reporting_order $old -> $GUEST_NO_REPORTING_ORDER for the run)"
  log "guest memory: $GUEST_MEMORY, touched in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}') s"
}
