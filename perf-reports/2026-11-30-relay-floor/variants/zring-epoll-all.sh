#!/bin/sh
# zring with every proxy (node proxies, waypoint, relay) on the epoll backend.
case "$1" in run|waypoint|relay) exec /work/main/target/release/zring "$@" --io epoll;; esac
exec /work/main/target/release/zring "$@"
