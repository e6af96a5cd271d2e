#!/usr/bin/env python3
"""Prints the A/B table of notes.md from raw/{base,new}-{1,2,3}/results.json."""
import json, os, statistics

here = os.path.dirname(os.path.abspath(__file__))


def runs(v):
    out = {}
    for r in (1, 2, 3):
        d = json.load(open(os.path.join(here, "raw", f"{v}-{r}", "results.json")))
        for p in d["paths"]:
            if p["name"] != "waypoint":
                continue
            for run in p["runs"]:
                wp = [x for x in run["proxies"] if "waypoint" in x["label"]][0]
                key = (run["scenario"], run["conns"])
                out.setdefault(key, []).append((run["rate"], run["p50_ms"], wp["millicores"], wp["rss_mib"]))
    return out


def fmt(xs, f="{:.0f}"):
    return f"{f.format(statistics.median(xs))} ({f.format(min(xs))}-{f.format(max(xs))})"


base, new = runs("base"), runs("new")
print("| scenario | figure | base (median, min-max) | new (median, min-max) |")
print("|---|---|---|---|")
for key in sorted(base):
    sc, c = key
    b, n = base[key], new[key]
    if sc == "max-rps":
        print(f"| max-rps c={c} | rps | {fmt([x[0] for x in b])} | {fmt([x[0] for x in n])} |")
        print(f"| max-rps c={c} | waypoint us CPU per request | {fmt([x[2] * 1e3 / x[0] for x in b], '{:.1f}')} | {fmt([x[2] * 1e3 / x[0] for x in n], '{:.1f}')} |")
    else:
        print(f"| 1000 rps c={c} | waypoint millicores | {fmt([x[2] for x in b])} | {fmt([x[2] for x in n])} |")
        print(f"| 1000 rps c={c} | p50 ms (whole path) | {fmt([x[1] for x in b], '{:.3f}')} | {fmt([x[1] for x in n], '{:.3f}')} |")
    print(f"| {sc} c={c} | waypoint RSS MiB | {fmt([x[3] for x in b], '{:.1f}')} | {fmt([x[3] for x in n], '{:.1f}')} |")
