#!/usr/bin/python3
"""Loads the eBPF tests need and listen.py / flood.py do not make; meant to run inside a test namespace.

    ip netns exec NAME /usr/bin/python3 tests/helpers/eventload.py clients --to 127.0.0.1:8080 --count 3 --src 127.0.0.2
    ip netns exec NAME /usr/bin/python3 tests/helpers/eventload.py acceptor --clients 5 --every 0.3 [--unix PATH]

``clients``: COUNT non-blocking connects from source address SRC (flood.py always connects from the
default source, and the ACK-stage recipe tells client groups apart by source). Prints
``CONNECTED {"pid", "ports": [...], "results": {...}}`` and holds the sockets until stdin closes or
--hold seconds pass.

``acceptor``: a loopback listener (or a Unix stream one at PATH) that CLIENTS connections (opened by
this process, blocking, so each has completed its handshake and sits in the queue) and then accepts
one every EVERY seconds. The timestamps (CLOCK_MONOTONIC, the clock bpf_ktime_get_ns counts) bracket
every connect and accept, so a test knows each connection's queue wait to within the time the calls
took. Prints
``DONE {"pid", "inode", "address", "port", "peer_ports", "connected": [[before, after]...],
"accepted": [[before, after]...]}`` and waits for stdin to close.
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
from tests.helpers.sockets import loopback, open_connections

MAX_CLIENTS = 64
MAX_HOLD = 120.0
MAX_EVERY = 2.0


def clients(args: argparse.Namespace) -> None:
    host, _, port = args.to.rpartition(":")
    target = (loopback(host), int(port))
    held: list[socket.socket] = []
    results = open_connections(min(args.count, MAX_CLIENTS), socket.AF_INET, socket.SOCK_STREAM, target, held,
                               source=args.src)
    ports = [sock.getsockname()[1] for sock in held]
    say("CONNECTED", pid=os.getpid(), ports=ports, results=results)
    try:
        wait_for_stdin_close(min(args.hold, MAX_HOLD))
    finally:
        for sock in held:
            sock.close()


def acceptor(args: argparse.Namespace) -> None:
    count = min(args.clients, MAX_CLIENTS)
    every = min(args.every, MAX_EVERY)
    family = socket.AF_UNIX if args.unix else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind(args.unix or ("127.0.0.1", 0))
    listener.listen(count)
    address = listener.getsockname()
    port = 0 if args.unix else address[1]
    held: list[socket.socket] = []
    connected: list[list[float]] = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        before = time.monotonic()
        sock.connect(address)
        connected.append([before, time.monotonic()])
        held.append(sock)
    start = time.monotonic()
    accepted: list[list[float]] = []
    peer_ports: list[int] = []
    for k in range(count):
        # Sleep to a schedule, not by a fixed amount each time, so the waits do not drift.
        time.sleep(max(0.0, start + every * (k + 1) - time.monotonic()))
        before = time.monotonic()
        child, peer = listener.accept()
        accepted.append([before, time.monotonic()])
        peer_ports.append(0 if args.unix else peer[1])
        held.append(child)
    say("DONE", pid=os.getpid(), inode=os.fstat(listener.fileno()).st_ino, address=args.unix or f"127.0.0.1:{port}",
        port=port, peer_ports=peer_ports, connected=connected, accepted=accepted)
    try:
        wait_for_stdin_close(MAX_HOLD)
    finally:
        for sock in held:
            sock.close()
        listener.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    client_args = modes.add_parser("clients")
    client_args.add_argument("--to", required=True, metavar="HOST:PORT")
    client_args.add_argument("--count", type=int, required=True)
    client_args.add_argument("--src", metavar="ADDRESS")
    client_args.add_argument("--hold", type=float, default=60.0)
    client_args.set_defaults(run=clients)
    acceptor_args = modes.add_parser("acceptor")
    acceptor_args.add_argument("--clients", type=int, default=5)
    acceptor_args.add_argument("--every", type=float, default=0.3)
    acceptor_args.add_argument("--unix", metavar="PATH")
    acceptor_args.set_defaults(run=acceptor)
    args = parser.parse_args()
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
