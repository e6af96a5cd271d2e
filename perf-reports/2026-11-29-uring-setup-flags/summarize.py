"""Medians (min-max) per mode: `python3 summarize.py plain,coop,defer`."""
import json, os, sys, glob, statistics as st
base = os.path.dirname(os.path.abspath(__file__))
modes = sys.argv[1].split(',') if len(sys.argv) > 1 else ['plain', 'coop', 'defer']
rows={}
for m in modes:
    for f in sorted(glob.glob(f'{base}/raw/{m}-[1-9].json')):
        d=json.load(open(f))
        for p in d['paths']:
            if p['name']=='no-mesh': continue
            for r in p['runs']:
                key=(p['name'],r['scenario'],r['conns'])
                cpu={x['label']:x['millicores'] for x in r['proxies']}
                if p['name']=='ambient': c=sum(cpu.values())
                else: c=cpu.get('zring waypoint',0)
                v=rows.setdefault(key,{}).setdefault(m,[])
                if r['scenario']=='max-rps':
                    v.append((r['rate'], c*1000/r['rate']))
                else:
                    v.append((r['p50_ms'], c))
def fmt(xs,i,nd):
    a=sorted(x[i] for x in xs)
    return f"{st.median(a):.{nd}f} ({a[0]:.{nd}f}-{a[-1]:.{nd}f})" if a else '-'
print('| path | scenario | c | '+' | '.join(f'{m} p50ms/rps' for m in modes)+' | '+' | '.join(f'{m} m or us/req' for m in modes)+' |')
for k in sorted(rows):
    v=rows[k]
    nd0=0 if k[1]=='max-rps' else 3
    print(f'| {k[0]} | {k[1]} | {k[2]} | '+' | '.join(fmt(v.get(m,[]),0,nd0) for m in modes)+' | '+' | '.join(fmt(v.get(m,[]),1,1) for m in modes)+' |')
