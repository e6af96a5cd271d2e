#!/bin/bash
# Second A/B, waypoint path only, new layout first in rounds 4 and 6.
cd /tmp/ht
for r in 4 5 6; do
  for b in new old; do
    [ $r = 5 ] && { [ $b = new ] && b=old || b=new; }
    env -u RUST_BACKTRACE ./zring-bench run --paths no-mesh,waypoint --scenarios latency,max-rps \
      --zring /tmp/ht/zring-$b --loadgen /tmp/ht/zring-loadgen --out /tmp/ht/runs/$b-$r > /tmp/ht/runs/$b-$r.log 2>&1
    echo "$b-$r rc=$?" >> /tmp/ht/runs/done
  done
done
