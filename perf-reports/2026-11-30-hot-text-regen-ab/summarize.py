#!/usr/bin/env python3
"""Prints the A/B tables of notes.md from raw/{old,new}-ROUND/results.json (rounds as arguments: 1 2 3, 4 5 6, 7 8)."""
import json, os, statistics, sys

here = os.path.dirname(os.path.abspath(__file__))
rounds = [int(r) for r in (sys.argv[1:] or ["1", "2", "3"])]


def load(v):
    out = {}
    for r in rounds:
        d = json.load(open(os.path.join(here, "raw", f"{v}-{r}", "results.json")))
        for p in d["paths"]:
            if p["name"] == "no-mesh":
                continue
            for run in p["runs"]:
                key = (p["name"], run["scenario"], run["conns"])
                nodes = sum(x["millicores"] for x in run["proxies"] if "node" in x["label"])
                wp = sum(x["millicores"] for x in run["proxies"] if "waypoint" in x["label"])
                rss = {x["label"]: x for x in run["proxies"]}
                out.setdefault(key, []).append(dict(rate=run["rate"], p50=run["p50_ms"], p99=run["p99_ms"], nodes=nodes, wp=wp, rss=rss))
    return out


def fmt(xs, f="{:.0f}"):
    return f"{f.format(statistics.median(xs))} ({f.format(min(xs))}-{f.format(max(xs))})"


old, new = load("old"), load("new")
print("| path | scenario | figure | old layout | new layout |")
print("|---|---|---|---|---|")
for key in sorted(old):
    path, sc, c = key
    o, n = old[key], new[key]
    row = lambda fig, f, fm="{:.0f}": print(f"| {path} | {sc} c={c} | {fig} | {fmt([f(x) for x in o], fm)} | {fmt([f(x) for x in n], fm)} |")
    if sc == "latency":
        row("p50 ms", lambda x: x["p50"], "{:.3f}")
        row("p99 ms", lambda x: x["p99"], "{:.3f}")
        row("node proxies m (sum)", lambda x: x["nodes"])
        if path == "waypoint":
            row("waypoint m", lambda x: x["wp"])
    elif sc == "max-rps":
        row("rps", lambda x: x["rate"])
        row("node proxies us CPU/request (sum)", lambda x: x["nodes"] * 1e3 / x["rate"], "{:.1f}")
        if path == "waypoint":
            row("waypoint us CPU/request", lambda x: x["wp"] * 1e3 / x["rate"], "{:.1f}")
    elif sc == "idle":
        for label in sorted(o[0]["rss"]):
            for fig, k in (("before", "rss_before_mib"), ("1000 held", "rss_mib"), ("30 s after close", "rss_closed_mib")):
                row(f"{label} RSS MiB {fig}", lambda x: x["rss"][label][k], "{:.1f}")

# Per round, the waypoint's millicores at 1000 rps and its CPU per request at max rps.
print()
for r in rounds:
    for v in ("old", "new"):
        d = json.load(open(os.path.join(here, "raw", f"{v}-{r}", "results.json")))
        for p in d["paths"]:
            if p["name"] != "waypoint":
                continue
            row = []
            for run in p["runs"]:
                wp = [x for x in run["proxies"] if "waypoint" in x["label"]][0]
                if run["scenario"] == "latency":
                    row.append(f"c{run['conns']}: {wp['millicores']:.0f} m")
                if run["scenario"] == "max-rps":
                    row.append(f"max: {run['rate']:.0f} rps, {wp['millicores'] * 1e3 / run['rate']:.1f} us/req")
            if row:
                print(f"round {r} {v}: " + ", ".join(row))
