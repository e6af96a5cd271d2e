#!/bin/bash
cd /work/main
for r in 1 2 3; do
  for v in base new; do
    env -u RUST_BACKTRACE /tmp/ab/zring-bench run --paths no-mesh,waypoint --scenarios latency,max-rps --zring /tmp/ab/zring-$v --loadgen /work/main/target/release/zring-loadgen --out /tmp/ab2/$v-$r > /tmp/ab2/$v-$r.log 2>&1
  done
done
echo done > /tmp/ab2/DONE
