#!/usr/bin/env python3
"""The A/B's table from raw/*.json: the waypoint's CPU at 1000 rps per variant and round, the
two node proxies' (unchanged in every variant) beside it, and the ratio waypoint / mean node
proxy, which takes out the machine's drift between rounds."""
import glob, json, os, statistics

here = os.path.dirname(os.path.abspath(__file__))
rows = {}
for f in sorted(glob.glob(os.path.join(here, "raw", "*.json"))):
    name = os.path.basename(f)[:-5]
    variant, rnd = name.rsplit("-", 1)
    r = json.load(open(f))
    wp = next(p for p in r["paths"] if p["name"] == "waypoint")
    for x in wp["runs"]:
        m = {q["label"]: q["millicores"] for q in x["proxies"]}
        nodes = statistics.mean([m["zring node-1"], m["zring node-2"]])
        key = "max-rps" if x["scenario"] == "max-rps" else f"c={x['conns']}"
        rows.setdefault(variant, []).append((int(rnd), key, m["zring waypoint"], nodes, x["rate"]))

keys = ["c=1", "c=4", "c=16", "c=64"]
print("| variant | round | " + " | ".join(f"{k}: waypoint m (ratio to a node proxy)" for k in keys) + " | max rps (waypoint us/request) |")
print("|---|---|" + "---|" * (len(keys) + 1))
ratios = {}
for variant in sorted(rows):
    for rnd in sorted({r for r, *_ in rows[variant]}):
        cells = []
        for k in keys:
            hit = [(w, n) for r, kk, w, n, _ in rows[variant] if r == rnd and kk == k]
            if hit:
                w, n = hit[0]
                cells.append(f"{w:.0f} ({w / n:.2f})")
                ratios.setdefault(variant, []).append(w / n)
            else:
                cells.append("-")
        mx = [(w, rate) for r, kk, w, n, rate in rows[variant] if r == rnd and kk == "max-rps"]
        mcell = f"{mx[0][1]:.0f} ({mx[0][0] / mx[0][1] * 1000:.1f})" if mx else "-"
        print(f"| {variant} | {rnd} | " + " | ".join(cells) + f" | {mcell} |")
print()
print("| variant | waypoint / node proxy at 1000 rps, all rounds and connection counts: median (min-max), n |")
print("|---|---|")
for v, rs in sorted(ratios.items()):
    print(f"| {v} | {statistics.median(rs):.2f} ({min(rs):.2f}-{max(rs):.2f}), {len(rs)} |")
