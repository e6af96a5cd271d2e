#!/bin/bash
cd /work/main
for r in 4 5 6; do
 order="epoll base"; [ $r = 5 ] && order="base epoll"
 for v in $order; do
  z=target/release/zring; [ $v = epoll ] && z=/tmp/w/ab/wp-epoll.sh
  target/release/zring-bench run --paths no-mesh,waypoint --scenarios latency,max-rps --zring $z --out /tmp/w/ab/$v-$r > /tmp/w/ab/$v-$r.log 2>&1
 done
done
