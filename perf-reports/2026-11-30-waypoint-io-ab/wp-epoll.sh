#!/bin/bash
if [ "$1" = waypoint ]; then exec /work/main/target/release/zring "$@" --io epoll; fi
exec /work/main/target/release/zring "$@"
