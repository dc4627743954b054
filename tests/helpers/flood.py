#!/usr/bin/python3
"""A bounded connection flood against listeners in the caller's own network namespace.

    ip netns exec NAME /usr/bin/python3 tests/helpers/flood.py --to tcp:127.0.0.1:8080 12 --to unix:/tmp/d/s 8

TARGET is tcp:HOST:PORT (HOST a loopback address; brackets optional for IPv6), unix:PATH or
abstract:NAME. Every connect is non-blocking, so a full TCP listener leaves the SYN in progress
(and the kernel counts a drop) and a full Unix listener answers EAGAIN. Prints one line
``FLOODED {"pid", "targets": [...]}`` with what each connect returned, holds the sockets until stdin
closes or --hold seconds pass, then closes them.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: the repository's root, for the imports below
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers.lineproto import say, wait_for_stdin_close
from tests.helpers.sockets import loopback, open_connections

MAX_CONNECTIONS = 500  # in total, over every target
MAX_HOLD = 300.0


def parse_target(target: str) -> tuple[int, int, Any]:
    """(family, type, connect address) for TARGET; only loopback TCP addresses are accepted."""
    kind, _, rest = target.partition(":")
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = loopback(host.strip("[]"))
        ip = ipaddress.ip_address(host)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        return family, socket.SOCK_STREAM, (host, int(port))
    if kind == "unix":
        return socket.AF_UNIX, socket.SOCK_STREAM, rest
    if kind == "seqpacket":
        return socket.AF_UNIX, socket.SOCK_SEQPACKET, rest
    if kind == "abstract":
        return socket.AF_UNIX, socket.SOCK_STREAM, "\0" + rest
    raise ValueError(f"unknown target kind in {target!r}")


def flood(target: str, count: int, held: list[socket.socket]) -> dict[str, Any]:
    family, sock_type, address = parse_target(target)
    return {"target": target, "count": count, **open_connections(count, family, sock_type, address, held)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", nargs=2, action="append", default=[], metavar=("TARGET", "COUNT"))
    parser.add_argument("--hold", type=float, default=60.0)
    args = parser.parse_args()
    plan = [(target, int(count)) for target, count in args.to]
    total = sum(count for _, count in plan)
    if total > MAX_CONNECTIONS:
        parser.error(f"{total} connections asked for; at most {MAX_CONNECTIONS}")
    held: list[socket.socket] = []
    say("FLOODED", pid=os.getpid(), targets=[flood(target, count, held) for target, count in plan])
    try:
        wait_for_stdin_close(min(args.hold, MAX_HOLD))
    finally:
        for sock in held:
            sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
