#!/usr/bin/env python3
"""Usage: summarize.py RESULTS.json [SIDECAR-NAME]. Tables for notes.md from the harness's results.json: each proxy process's CPU at 1000 rps
(millicores = us of CPU per request), its user-space part, and per-round ratios of the
waypoint against one relay process and one zring node proxy measured in the same round."""
import json, statistics, sys

r = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "results.json"))
sidecar = sys.argv[2] if len(sys.argv) > 2 else "HAProxy"
paths = {p["name"]: p for p in r["paths"] if p["runs"]}

def runs(path, scenario, conns=None):
    return [x for x in paths[path]["runs"] if x["scenario"] == scenario and (conns is None or x["conns"] == conns)]

def med(v):
    return statistics.median(v) if v else float("nan")

def span(v):
    return f"{med(v):.0f} ({min(v):.0f}-{max(v):.0f})" if v else "-"

def proc(path, label_part, scenario, conns, key="millicores"):
    out = []
    for x in runs(path, scenario, conns):
        vals = [q[key] for q in x["proxies"] if label_part in q["label"] and q.get(key) is not None]
        if vals:
            out.append((x["rep"], statistics.mean(vals)))
    return out

conns = r["plan"]["latency_conns"]
print("## Per proxy process at 1000 rps: millicores (us of CPU per request), median (min-max) of the rounds\n")
print("| process | " + " | ".join(f"c={c}" for c in conns) + " |")
print("|---|" + "---|" * len(conns))
rows = [("relay", "relay node", "relay, one node (mean of the two)"),
        ("ambient", "zring node", "zring node proxy, one node (mean of the two)"),
        ("sidecar", "sidecar", f"{sidecar} sidecar, one (mean of the two)"),
        ("waypoint", "zring node", "waypoint path: zring node proxy (mean of the two)"),
        ("waypoint", "zring waypoint", "waypoint path: zring waypoint"),
        ("waypoint-envoy", "zring node", "waypoint-envoy path: zring node proxy (mean of the two)"),
        ("waypoint-envoy", "envoy waypoint", "waypoint-envoy path: Envoy waypoint")]
for path, part, name in rows:
    if path not in paths:
        continue
    for key, suffix in (("millicores", ""), ("user_millicores", ", user space")):
        cells = [span([v for _, v in proc(path, part, "latency", c, key)]) for c in conns]
        if all(c == "-" for c in cells):
            continue
        print(f"| {name}{suffix} | " + " | ".join(cells) + " |")

print("\n## zring's waypoint against other processes of the same round at 1000 rps (per-round ratios of millicores)\n")
others = [("relay", "relay", "relay node", "one relay process"),
          ("sidecar", "sidecar", "sidecar", f"one {sidecar} sidecar"),
          ("waypoint-envoy", "envoy waypoint", "envoy waypoint", "the Envoy waypoint")]
others = [o for o in others if o[0] in paths]
print("| c | against | " + " | ".join(f"round {k+1}" for k in range(r['plan']['repeat'])) + " |")
print("|---|---|" + "---|" * r["plan"]["repeat"])
for c in conns:
    wp = dict(proc("waypoint", "zring waypoint", "latency", c))
    for path, _, part, name in others:
        ot = dict(proc(path, part, "latency", c))
        cells = [f"{wp[k]:.0f} / {ot[k]:.0f} = {wp[k]/ot[k]:.2f}x" if k in wp and k in ot else "-" for k in range(r["plan"]["repeat"])]
        print(f"| {c} | {name} | " + " | ".join(cells) + " |")

print("\n## Max rps, 16 connections\n")
print("| path | rps | busiest process: us CPU per request | its user-space part |")
print("|---|---|---|---|")
for path in paths:
    xs = runs(path, "max-rps")
    if not xs:
        continue
    rates = [x["rate"] for x in xs]
    busiest = [max(x["proxies"], key=lambda q: q["millicores"]) for x in xs if x["proxies"]]
    per = [q["millicores"] / x["rate"] * 1000 for q, x in zip(busiest, xs)]
    user = [q["user_millicores"] / x["rate"] * 1000 for q, x in zip(busiest, xs) if q.get("user_millicores") is not None]
    fmt = lambda v: f"{med(v):.1f} ({min(v):.1f}-{max(v):.1f})" if v else "-"
    print(f"| {path} | {span(rates)} | {fmt(per)} | {fmt(user)} |")

print("\n## RSS at the end of the 1000 rps runs: the largest over the connection counts, median (min-max) of the rounds, MiB\n")
print("| process | RSS MiB |")
print("|---|---|")
for path, part, name in rows:
    if path not in paths:
        continue
    per_round = {}
    for x in runs(path, "latency"):
        for q in x["proxies"]:
            if part in q["label"]:
                per_round[x["rep"]] = max(per_round.get(x["rep"], 0.0), q["rss_mib"])
    v = list(per_round.values())
    if v:
        print(f"| {name.replace(' (mean of the two)', '')} | {med(v):.1f} ({min(v):.1f}-{max(v):.1f}) |")
