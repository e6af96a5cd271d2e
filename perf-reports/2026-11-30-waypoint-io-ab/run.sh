#!/bin/bash
cd /work/main
for r in 1 2 3; do
 for v in base epoll nopin; do
  z=target/release/zring; [ $v = epoll ] && z=/tmp/w/ab/wp-epoll.sh; [ $v = nopin ] && z=/tmp/w/ab/wp-nopin.sh
  target/release/zring-bench run --paths no-mesh,waypoint --scenarios latency --zring $z --out /tmp/w/ab/$v-$r > /tmp/w/ab/$v-$r.log 2>&1
 done
done
