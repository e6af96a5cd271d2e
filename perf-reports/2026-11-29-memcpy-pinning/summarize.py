# Per-round figures of the ambient path from harness results: rate, CPU per request / per GB.
# usage: python3 summarize.py ab-memcpy/old-1.json ab-memcpy/new-1.json ...
import json,sys,glob
def rows(d):
  # d: a harness --out folder or its results.json
  j=json.load(open(d if d.endswith('.json') else d+'/results.json'))
  for p in j['paths']:
    if p['name']=='no-mesh': continue
    for r in p['runs']:
      pr={x['name'] if 'name' in x else x.get('label',str(i)):x for i,x in enumerate(r['proxies'])}
      cpus=[x['millicores'] for x in r['proxies']]
      key=f"{p['name']} {r['scenario']} c{r['conns']} s{r['streams']}" + (f" {r['target_rps']}rps" if r['target_rps'] else '')
      yield key,r,cpus
for d in sys.argv[1:]:
  for key,r,cpus in rows(d):
    tot=sum(c for c in cpus if c)
    if r['scenario']=='throughput':
      gbs=r['gbit_s']/8
      print(f"{d:14s} {key:32s} {r['gbit_s']:6.2f} Gbit/s cpu {cpus} core-s/GB {tot/1000/gbs:.2f} (n1 {cpus[0]/1000/gbs:.2f} n2 {cpus[1]/1000/gbs:.2f})")
    else:
      print(f"{d:14s} {key:32s} {r['rate']:8.0f}/s p50 {r['p50_ms']:.3f} p99 {r['p99_ms']:.3f} cpu {cpus} us/req {tot/1000/max(r['rate'],1)*1e6:.1f}")
