#!/bin/bash
# A/B: hot-text.ld at 786e7ab (old) vs regenerated (new); same source otherwise.
cd /tmp/ht
for r in 1 2 3; do
  for b in old new; do
    [ $r = 2 ] && { [ $b = old ] && b=new || b=old; }
    env -u RUST_BACKTRACE ./zring-bench run --paths no-mesh,ambient,waypoint --scenarios latency,max-rps,idle --idle-conns 1000 \
      --zring /tmp/ht/zring-$b --loadgen /tmp/ht/zring-loadgen --out /tmp/ht/runs/$b-$r > /tmp/ht/runs/$b-$r.log 2>&1
    echo "$b-$r rc=$?" >> /tmp/ht/runs/done
  done
done
