#!/bin/bash
if [ "$1" = waypoint ]; then exec /work/main/target/release/zring "$@" --pin off; fi
exec /work/main/target/release/zring "$@"
