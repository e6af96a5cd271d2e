#!/usr/bin/env python3
"""Stands in for `zring relay` in the harness's relay path: the same --listen/--to pairs served by
HAProxy in TCP mode (Debian's), one thread per CPU, then exec'd in place (same pid, so the
harness measures HAProxy). Every other zring subcommand runs zring."""
import os, sys, tempfile
ZRING = "/work/main/target/release/zring"
args = sys.argv[1:]
if not args or args[0] != "relay":
    os.execv(ZRING, [ZRING] + args)
listen, to = [], []
i = 1
while i < len(args):
    if args[i] == "--listen":
        listen.append(args[i + 1]); i += 2
    elif args[i] == "--to":
        to.append(args[i + 1]); i += 2
    else:
        i += 1 if args[i].startswith("--") and (i + 1 >= len(args) or args[i + 1].startswith("--")) else 2
cfg = ["global", "  nbthread %d" % os.cpu_count(), "  maxconn 9000", "defaults", "  mode tcp",
       "  timeout connect 10s", "  timeout client 1h", "  timeout server 1h"]
for n, (l, t) in enumerate(zip(listen, to)):
    cfg += [f"listen p{n}", f"  bind {l}", f"  server s{n} {t}"]
fd, path = tempfile.mkstemp(prefix="haproxy-relay-", suffix=".cfg")
os.write(fd, ("\n".join(cfg) + "\n").encode()); os.close(fd)
os.execvp("haproxy", ["haproxy", "-db", "-f", path])
