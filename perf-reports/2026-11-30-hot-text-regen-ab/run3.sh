#!/bin/bash
# Fresh RSS: idle scenario alone (RSS before = right after the lab is up), 2 rounds each.
cd /tmp/ht
for r in 7 8; do
  for b in old new; do
    [ $r = 8 ] && { [ $b = old ] && b=new || b=old; }
    env -u RUST_BACKTRACE ./zring-bench run --paths no-mesh,ambient,waypoint --scenarios idle --idle-conns 1000 \
      --zring /tmp/ht/zring-$b --loadgen /tmp/ht/zring-loadgen --out /tmp/ht/runs/$b-$r > /tmp/ht/runs/$b-$r.log 2>&1
    echo "$b-$r rc=$?" >> /tmp/ht/runs/done
  done
done
