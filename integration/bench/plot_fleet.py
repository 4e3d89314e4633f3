#!/usr/bin/env python3
"""Plot integration/bench/fleet.sh results as an SVG (standard library only).

    python3 integration/bench/plot_fleet.py RESULTS OUT.svg [--run RUN_ID | --all]

RESULTS holds `fleet: key=value ...` lines (fleet.sh appends one per system x N x repeat).
By default the rows of the last run in the file are drawn (--run picks another, --all takes
every row with the same size and link rates as the last run). One line per system: the
slowest host's pull time / (size / its own link rate) against N, the median over repeats.
Rows flagged saturated (the machine's CPU, not the links, set the pace) or with failed or
unverified pulls are not counted.
"""

import argparse
import statistics
import sys
from collections import defaultdict
from xml.sax.saxutils import escape

LABELS = {
    "shoal": "Shoal (agents, peer swarm)",
    "shoal_tls": "Shoal, TLS and mutual-TLS peers",
    "registry": "central registry (docker-registry)",
    "bare": "bare relay chain (the floor)",
}
COLORS = {"shoal": "#1f77b4", "shoal_tls": "#2ca02c", "registry": "#d62728", "bare": "#7f7f7f"}
# Floors under the others (the bare chain), drawn dashed and without values: they would sit
# on Shoal's and the registry's at every N.
FLOORS = {"bare"}
FLOOR_DASH = ' stroke-dasharray="6 4"'
PARAMS = ("size_mib", "host_mbit", "origin_mbit", "stragglers")


def parse(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("fleet:"):
                continue
            row = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
            if "system" in row and "n" in row and "max" in row:
                rows.append(row)
    return rows


def counted(row):
    if row.get("saturated") == "yes":
        return False
    ok = row.get("ok", "")
    if "/" in ok:
        good, total = ok.split("/", 1)
        if good != total:
            return False
    try:
        float(row["max"])
    except ValueError:
        return False
    return True


def nice_ceiling(v):
    for step in (0.5, 1, 2, 5, 10, 20, 50):
        if v <= step * 6:
            return step, step * max(1, -(-v // step))
    return 100, 100 * max(1, -(-v // 100))


def svg(rows, title, subtitle, dropped):
    series = defaultdict(lambda: defaultdict(list))
    for r in rows:
        series[r["system"]][int(r["n"])].append(float(r["max"]))
    points = {s: sorted((n, statistics.median(v)) for n, v in by_n.items()) for s, by_n in series.items()}
    ns = sorted({n for p in points.values() for n, _ in p})
    ymax_data = max([y for p in points.values() for _, y in p] + [1.0])
    ystep, ymax = nice_ceiling(ymax_data * 1.1)

    W, H = 720, 460
    left, right, top, bottom = 80, 30, 70, 70
    pw, ph = W - left - right, H - top - bottom
    xmin, xmax = 0, max(ns) * 1.08 if ns else 1

    def X(n):
        return left + (n - xmin) / (xmax - xmin) * pw

    def Y(v):
        return top + ph - v / ymax * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="Helvetica, Arial, sans-serif" font-size="13">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="16" font-weight="bold">{escape(title)}</text>',
        f'<text x="{W / 2}" y="44" text-anchor="middle" fill="#555">{escape(subtitle)}</text>',
    ]
    # grid and y ticks
    v = 0.0
    while v <= ymax + 1e-9:
        y = Y(v)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
        v += ystep
    # ideal: the host's own link
    out.append(
        f'<line x1="{left}" y1="{Y(1):.1f}" x2="{left + pw}" y2="{Y(1):.1f}" stroke="#888" stroke-dasharray="6,4"/>'
    )
    out.append(f'<text x="{left + 6}" y="{Y(1) + 16:.1f}" fill="#666">1 = the host link\'s own time</text>')
    # x ticks
    for n in ns:
        x = X(n)
        out.append(f'<line x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 5}" stroke="black"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 20}" text-anchor="middle">{n}</text>')
    # axes
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="black"/>')
    out.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="black"/>')
    out.append(f'<text x="{left + pw / 2}" y="{H - 22}" text-anchor="middle">hosts pulling at once (N)</text>')
    out.append(
        f'<text transform="translate(22 {top + ph / 2}) rotate(-90)" text-anchor="middle">'
        "slowest host's pull time ÷ (size ÷ its link rate)</text>"
    )
    # series
    for s in sorted(points, key=lambda s: (s != "shoal", s)):
        color = COLORS.get(s, "#2ca02c")
        pts = points[s]
        path = " ".join(f"{X(n):.1f},{Y(y):.1f}" for n, y in pts)
        dash = FLOOR_DASH if s in FLOORS else ""
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2.5"{dash}/>')
        dy = -7 if s == "shoal" else 16  # values above Shoal's points, below the others'
        for n, y in pts:
            if s in FLOORS:
                out.append(f'<circle cx="{X(n):.1f}" cy="{Y(y):.1f}" r="3" fill="{color}"/>')
                continue
            out.append(f'<circle cx="{X(n):.1f}" cy="{Y(y):.1f}" r="4" fill="{color}"/>')
            out.append(f'<text x="{X(n) + 7:.1f}" y="{Y(y) + dy:.1f}" fill="{color}" font-size="11">{y:.2f}</text>')
    # legend
    lx, ly = left + 14, top + 12
    names = sorted(points, key=lambda s: (s != "shoal", s))
    out.append(
        f'<rect x="{lx - 8}" y="{ly - 14}" width="270" height="{22 * len(names) + 8}" fill="white" stroke="#ccc"/>'
    )
    for i, s in enumerate(names):
        y = ly + 22 * i
        color = COLORS.get(s, "#2ca02c")
        out.append(
            f'<line x1="{lx}" y1="{y}" x2="{lx + 26}" y2="{y}" stroke="{color}" stroke-width="2.5"{FLOOR_DASH if s in FLOORS else ""}/>'
        )
        out.append(f'<text x="{lx + 34}" y="{y + 4}">{escape(LABELS.get(s, s))}</text>')
    if dropped:
        out.append(
            f'<text x="{W - 8}" y="{H - 6}" text-anchor="end" fill="#888" font-size="11">'
            f"{dropped} saturated or failed run(s) not counted</text>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("out")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--run", help="draw the rows of this run id (default: the last run in the file)")
    g.add_argument("--all", action="store_true", help="every run with the last run's size and link rates")
    a = ap.parse_args()

    rows = parse(a.results)
    if not rows:
        sys.exit(f"{a.results}: no fleet: lines")
    last = rows[-1]
    if a.all:
        rows = [r for r in rows if all(r.get(k) == last.get(k) for k in PARAMS)]
    else:
        run = a.run or last.get("run")
        rows = [r for r in rows if r.get("run") == run]
        if not rows:
            sys.exit(f"{a.results}: no rows of run {run}")
        last = rows[-1]
    kept = [r for r in rows if counted(r)]
    if not kept:
        sys.exit("every row is saturated or failed: nothing to draw")
    title = "Fleet pull over shaped links: slowest host vs. N"
    subtitle = (
        f"{last.get('size_mib', '?')} MiB blob, hosts {last.get('host_mbit', '?')} Mbit/s, "
        f"origin {last.get('origin_mbit', '?')} Mbit/s"
        + (", a quarter of the hosts at 1/5 rate" if last.get("stragglers") == "1" else "")
        + f"; median of {max(1, len({r.get('repeat') for r in kept}))} repeat(s)"
    )
    with open(a.out, "w", encoding="utf-8") as f:
        f.write(svg(kept, title, subtitle, len(rows) - len(kept)))


if __name__ == "__main__":
    main()
