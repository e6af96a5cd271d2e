#!/bin/sh
# zring, with the relay on epoll (for the floor variant); everything else unchanged.
if [ "$1" = relay ]; then exec /work/main/target/release/zring "$@" --io epoll; fi
exec /work/main/target/release/zring "$@"
