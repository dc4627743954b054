#!/usr/bin/python3
"""Slow clients (slowloris-style), bounded, against a loopback listener in the caller's namespace.

    ip netns exec NAME /usr/bin/python3 tests/helpers/slowclients.py --to 127.0.0.1:8080 --count 7 --hold 30

Each client connects (blocking: a queued connection completes its handshake all the same), notes the
wall-clock time connect() returned on its own clock, sends the first part of a request line and
nothing more, and keeps the connection open. Prints one line ``SLOW {"pid", "clients": [{"port",
"connected_at"}]}`` and holds the connections until stdin closes or --hold seconds pass.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import select
import socket
import sys
import time

MAX_CLIENTS = 100
MAX_HOLD = 120.0
CONNECT_TIMEOUT = 5.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", required=True, metavar="HOST:PORT")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--send", default="GET / HTTP/1.1\r\nHost: loc", help="the partial request each sends")
    parser.add_argument("--hold", type=float, default=30.0)
    args = parser.parse_args()
    host, _, port = args.to.rpartition(":")
    if not ipaddress.ip_address(host.strip("[]")).is_loopback:
        parser.error("slow clients only target loopback addresses")
    if not 0 < args.count <= MAX_CLIENTS:
        parser.error(f"--count must be 1..{MAX_CLIENTS}")
    held = []
    clients = []
    try:
        for _ in range(args.count):
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT)
            connected_at = time.time()
            sock.sendall(args.send.encode())
            held.append(sock)
            clients.append({"port": sock.getsockname()[1], "connected_at": connected_at})
        print("SLOW " + json.dumps({"pid": os.getpid(), "clients": clients}), flush=True)
        deadline = time.monotonic() + min(args.hold, MAX_HOLD)
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([sys.stdin.fileno()], [], [], left)
            if readable and not os.read(sys.stdin.fileno(), 4096):
                break
    finally:
        for sock in held:
            sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
