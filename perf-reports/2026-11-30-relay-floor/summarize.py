#!/usr/bin/env python3
"""Per-round CPU per unit from a harness results.json: relay floor, zring, ztunnel, waypoint.

CPU per unit is per proxy process: millicores / rate (us per request or per connection) and
core-seconds per GB. Medians with min-max over the rounds (`rep`)."""
import json, statistics, sys
from collections import defaultdict

r = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "results.json"))

def fmt(v, d=1):
    v = sorted(v)
    if not v:
        return "-"
    return f"{statistics.median(v):.{d}f} ({v[0]:.{d}f}-{v[-1]:.{d}f})"

rows = defaultdict(lambda: defaultdict(list))  # (figure) -> path -> values
for p in r["paths"]:
    name = p["name"]
    for run in p["runs"]:
        procs = run["proxies"]
        if not procs:
            continue
        sc = run["scenario"]
        by = {q["label"]: q["millicores"] for q in procs}
        nodes = [m for l, m in by.items() if "waypoint" not in l]
        wp = [m for l, m in by.items() if "waypoint" in l]
        if sc == "latency" and run["rate"] > 0:
            us = [m / run["rate"] * 1000 for m in nodes]
            rows[f"node proxy us/request at 1000 rps, c={run['conns']} (mean of the two nodes)"][name].append(sum(us) / len(us))
            if wp:
                rows[f"waypoint us/request at 1000 rps, c={run['conns']}"][name].append(wp[0] / run["rate"] * 1000)
        elif sc == "max-rps" and run["rate"] > 0:
            rows["max rps"][name].append(run["rate"])
            rows["node proxy us/request at max rps (mean of the two nodes)"][name].append(sum(nodes) / len(nodes) / run["rate"] * 1000)
            if wp:
                rows["waypoint us/request at max rps"][name].append(wp[0] / run["rate"] * 1000)
        elif sc == "conns" and run["rate"] > 0:
            rows["new connections/s"][name].append(run["rate"])
            rows["node proxy us/connection (mean of the two nodes)"][name].append(sum(nodes) / len(nodes) / run["rate"] * 1000)
        elif sc == "throughput" and run["gbit_s"] > 0:
            gbs = run["gbit_s"] / 8
            rows[f"Gbit/s, {run['streams']} stream(s)"][name].append(run["gbit_s"])
            rows[f"node-1 + node-2 core-s per GB, {run['streams']} stream(s)"][name].append(sum(nodes) / 1000 / gbs)

paths = [p["name"] for p in r["paths"] if p["runs"] and p["name"] != "no-mesh"]
print("| figure | " + " | ".join(paths) + " | relay / ztunnel | ambient / ztunnel |")
print("|---|" + "---|" * (len(paths) + 2))
for fig, byp in rows.items():
    cells = [fmt(byp.get(p, []), 0 if "rps" in fig and "us" not in fig or "connections/s" in fig else (2 if "Gbit" in fig or "GB" in fig else 1)) for p in paths]
    ratio = lambda a, b: f"{statistics.median(byp[a]) / statistics.median(byp[b]):.2f}x" if byp.get(a) and byp.get(b) else "-"
    print(f"| {fig} | " + " | ".join(cells) + f" | {ratio('relay', 'ztunnel')} | {ratio('ambient', 'ztunnel')} |")
