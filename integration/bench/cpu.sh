# What the machine and the measured processes spent on CPU (sourced by fleet.sh, swarm.sh
# and tls.sh; not by any test). One copy of each reading, so every benchmark counts CPU the
# same way: from /proc, in the kernel's clock ticks (getconf CLK_TCK).

# cpu_ticks: "BUSY TOTAL" ticks of the whole machine so far (busy: all but idle and iowait).
cpu_ticks() { awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t}' /proc/stat; }

# busy_share "B0 T0" "B1 T1": the share of the machine's CPU time that was busy in between.
busy_share() {
  awk -v a="$1" -v b="$2" 'BEGIN {split(a, x, " "); split(b, y, " "); t = y[2] - x[2];
    printf "%.2f", (t > 0) ? (y[1] - x[1]) / t : 0}'
}

# cpu_kinds: the whole machine's "USER SYSTEM SOFTIRQ" ticks so far (user includes nice).
cpu_kinds() { awk '/^cpu / {print $2 + $3, $4, $8}' /proc/stat; }

# cpu_seconds PID...: "USER SYSTEM" CPU seconds the processes have used so far, summed.
cpu_seconds() {
  local p hz
  hz=$(getconf CLK_TCK)
  for p in "$@"; do cat "/proc/$p/stat"; done | awk -v hz="$hz" '{u += $14; s += $15} END {printf "%.2f %.2f\n", u / hz, s / hz}'
}

# cpu_delta "U0 S0" "U1 S1": "USER SYSTEM TOTAL" seconds in between.
cpu_delta() {
  awk -v a="$1" -v b="$2" 'BEGIN {split(a, x, " "); split(b, y, " "); u = y[1] - x[1]; s = y[2] - x[2]
    printf "%.2f %.2f %.2f\n", u, s, u + s}'
}

# context_switches PID...: the processes' context switches so far, voluntary and not, summed
# over their threads (a thread that exits takes its count along: the agents' tokio workers
# live throughout, their blocking threads idle 10 s before exiting, longer than a window's gaps).
context_switches() {
  local p
  for p in "$@"; do cat /proc/"$p"/task/*/status 2>/dev/null; done |
    awk '/^(voluntary|nonvoluntary)_ctxt_switches:/ {c += $2} END {printf "%d", c}'
}

# busy_samples SECS STOP_FILE: the machine's busy share over each SECS and the sample's
# length in ticks, one per line, until STOP_FILE exists, or its directory does not (the
# script died and its temp dir went: no one will create STOP_FILE). (A loaded machine
# stretches the samples, so they are weighed by length.)
busy_samples() {
  local a b dir
  dir=$(dirname "$2")
  a=$(cpu_ticks)
  while [[ ! -e $2 && -d $dir ]]; do
    sleep "$1"
    b=$(cpu_ticks)
    echo "$(busy_share "$a" "$b") $((${b#* } - ${a#* }))"
    a=$b
  done
}
