#!/usr/bin/env python3
"""How a fleet run's pieces spread: when each left the origin and reached the hosts.

Reads the agent logs `fleet.sh` keeps with BENCH_DUMP_METRICS=PREFIX (PREFIX.h<i>.log), from
a run whose agents logged every piece they requested and received:

    SHOAL_LOG="shoal_p2p::swarm=trace,info" BENCH_DUMP_METRICS=/tmp/m BENCH_FLEET=20 \
        BENCH_REPEATS=1 BENCH_SYSTEMS=shoal SHOAL_BIN=target/release/shoal \
        bash integration/bench/fleet.sh
    python3 integration/bench/piece_spread.py /tmp/m

Times are seconds from the run's first request. A peer that is no host's agent is an origin.
Prints, per piece (every 16th, and the blob's last 16): when an origin first delivered it and
when the first, median and last host had it; then each host's last pieces and their senders.
It found that a 20-host pull's end waits on the pieces the origin hands out last
(docs/benchmarks.md, session 31).
"""

import datetime
import glob
import re
import statistics
import sys

READY = re.compile(r"agent ready .*peer_id=([0-9a-f]+)")
EVENT = re.compile(r"piece (requested|received|request cancelled) peer=([0-9a-f]+) index=(\d+)")


def stamp(line):
    when = datetime.datetime.strptime(line[:26], "%Y-%m-%dT%H:%M:%S.%f")
    return when.replace(tzinfo=datetime.timezone.utc).timestamp()


def main(prefix):
    paths = sorted(glob.glob(prefix + ".h*.log"), key=lambda p: int(re.search(r"\.h(\d+)\.log$", p).group(1)))
    if not paths:
        sys.exit(f"no {prefix}.h<i>.log files")
    hosts, events = {}, []
    for host, path in enumerate(paths):
        for line in open(path, errors="replace"):
            if m := READY.search(line):
                hosts[m.group(1)] = host
            elif m := EVENT.search(line):
                events.append((stamp(line), host, m.group(1), m.group(2), int(m.group(3))))
    if not events:
        sys.exit("no piece events: run the agents with SHOAL_LOG=shoal_p2p::swarm=trace")
    t0 = min(e[0] for e in events)
    from_origin, reached, origin_asks, last = {}, {}, 0, {}
    for when, host, kind, peer, index in sorted(events):
        t, sender = when - t0, hosts.get(peer)
        if sender is None and kind == "requested":
            origin_asks += 1
        if kind != "received":
            continue
        if sender is None:
            from_origin.setdefault(index, t)
        reached.setdefault(index, {}).setdefault(host, t)
        last.setdefault(host, []).append((t, index, "origin" if sender is None else f"h{sender}"))
    pieces = max(reached) + 1
    print(f"{len(paths)} hosts, {pieces} pieces; {origin_asks} requests to an origin, "
          f"{len(from_origin)} pieces delivered by one")
    print("piece  origin   first  median    last  (s from the first request)")
    for index in sorted(set(range(0, pieces, 16)) | set(range(max(0, pieces - 16), pieces))):
        times = sorted(reached.get(index, {}).values())
        if times:
            origin = from_origin.get(index)
            print(f"{index:5d}  {'   -  ' if origin is None else f'{origin:6.2f}'}  {times[0]:6.2f}  "
                  f"{statistics.median(times):6.2f}  {times[-1]:6.2f}  ({len(times)} hosts)")
    for host in sorted(last):
        got = sorted(last[host])[-5:]
        print(f"h{host:<3d} done {got[-1][0]:6.2f}; last: " + " ".join(f"{i}@{t:.2f}<{s}" for t, i, s in got))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
