#!/usr/bin/env python3
"""How much interrupt handling ran in the context of given processes (a diagnostic, not a
benchmark; docs/benchmarks.md, session 32).

Without IRQ time accounting (this VM's kernel has none) the kernel charges a hard or soft
interrupt to whatever task it interrupts, so an agent's CPU seconds include some of the
emulated links' work (tbf's timers, the bridge, veth). This sums, from a system-wide trace,
the time spent between each interrupt's entry and exit, by whether the interrupted task
belonged to one of PIDS (top-level intervals only: nested handlers count once). A VM's exits
around each interrupt happen outside those tracepoints, so this is a lower bound.

    perf record -a -o irq.data \\
      -e irq_vectors:local_timer_entry -e irq_vectors:local_timer_exit \\
      -e irq_vectors:reschedule_entry -e irq_vectors:reschedule_exit \\
      -e irq_vectors:call_function_entry -e irq_vectors:call_function_exit \\
      -e irq_vectors:call_function_single_entry -e irq_vectors:call_function_single_exit \\
      -e irq:irq_handler_entry -e irq:irq_handler_exit \\
      -e irq:softirq_entry -e irq:softirq_exit -- sleep 10
    python3 integration/bench/irq_time.py irq.data PID...
"""
import collections
import subprocess
import sys

# No interrupt handler runs this long; an interval that does lost its exit in the trace.
MAX_SECS = 0.01


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    data, pids = sys.argv[1], set(sys.argv[2:])
    out = subprocess.run(["perf", "script", "-i", data, "-F", "pid,cpu,time,event"],
                         capture_output=True, text=True, check=True).stdout
    # Per CPU: the kinds of interrupt open now, and when and in whose context the outermost
    # one began. A trace can miss an exit (a few in 100,000 here); an entry of a kind already
    # open then drops the interval it would have closed, as does one longer than MAX_SECS.
    open_kinds = collections.defaultdict(set)
    start, owner = {}, {}
    inside, outside, dropped = 0.0, 0.0, 0
    kinds = collections.Counter()
    counts = collections.Counter()
    first = last = None
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        pid, cpu, event = parts[0], parts[1], parts[3].rstrip(':')
        t = float(parts[2].rstrip(':'))
        first = t if first is None else first
        last = t
        kind = event.rsplit('_', 1)[0]
        opened = open_kinds[cpu]
        if event.endswith('_entry'):
            if kind in opened:
                opened.clear()
                dropped += 1
            if not opened:
                start[cpu], owner[cpu] = t, (pid, kind)
            opened.add(kind)
        elif event.endswith('_exit') and kind in opened:
            opened.discard(kind)
            if opened:
                continue
            who, outer = owner[cpu]
            took = t - start[cpu]
            if took > MAX_SECS:
                dropped += 1
            elif who in pids:
                inside += took
                kinds[outer] += took
                counts[outer] += 1
            else:
                outside += took
    if first is None:
        print(f"no interrupt events in {data}", file=sys.stderr)
        return 1
    print(f"window {last - first:.2f} s: interrupt handling in the given processes' context "
          f"{inside:.3f} s, elsewhere {outside:.3f} s ({dropped} intervals without an exit dropped)")
    for kind, took in kinds.most_common():
        print(f"  {kind}: {took:.3f} s in {counts[kind]} interrupts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
