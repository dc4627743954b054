#!/usr/bin/python3
"""Slow clients (slowloris-style), bounded, against a loopback listener in the caller's namespace.

    ip netns exec NAME /usr/bin/python3 tests/helpers/slowclients.py --to 127.0.0.1:8080 --count 7 --hold 30

Each client connects (blocking: a queued connection completes its handshake all the same), notes the
wall-clock time connect() returned on its own clock, sends the first part of a request line and
nothing more, and keeps the connection open. Announces ``SLOW {"pid", "clients": [{"port",
"connected_at"}]}`` (tests/helpers/lineproto.py) and holds the connections until stdin closes or
--hold seconds pass.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repository's root, for the imports below
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers.lineproto import say, wait_for_stdin_close
from tests.helpers.sockets import loopback

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
    host = loopback(host.strip("[]"))
    if not 0 < args.count <= MAX_CLIENTS:
        parser.error(f"--count must be 1..{MAX_CLIENTS}")
    held: list[socket.socket] = []
    clients = []
    try:
        for _ in range(args.count):
            sock = socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT)
            connected_at = time.time()
            held.append(sock)
            sock.sendall(args.send.encode())
            clients.append({"port": sock.getsockname()[1], "connected_at": connected_at})
        say("SLOW", pid=os.getpid(), clients=clients)
        wait_for_stdin_close(min(args.hold, MAX_HOLD))
    finally:
        for sock in held:
            sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
