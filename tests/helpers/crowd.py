#!/usr/bin/python3
"""What one unprivileged local user can create, for the bounded-work test and bench/attack_scale.py.

    crowd.py namespaces COUNT [--life S]
        COUNT user+network namespaces (``unshare -rn`` without a name), each held by one sleeping
        process; prints ``READY {"pids": [...]}``.
    crowd.py listeners COUNT [--life S] [--pad BYTES] [--backlog N] [--fill K]
        COUNT TCP listeners (127.0.0.1 and up, ports 1024-65535) in the network namespace it runs in
        (run it under ``unshare -rn`` after ``ip link set lo up``), held by this process and as many
        children as the file descriptor limit needs; --pad makes their command line that much
        longer, as a user's argv can be; --fill K connects once to each of the first K listeners (never
        accepted: a queue of 1). Prints ``READY {"pid", "pids", "listeners"}``.

Both run as whoever started them (an unprivileged user is the point) and exit when stdin closes or
--life seconds pass; the namespaces' processes get SIGKILL when this process dies (PR_SET_PDEATHSIG),
and are killed and reaped on exit, so nothing outlives it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import select
import signal
import socket
import sys
import time

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
MAX_LIFE = 900.0
MAX_NAMESPACES = 5000
MAX_LISTENERS = 200_000
FIRST_PORT = 1024
PORTS = 65536 - FIRST_PORT
CLIENT_ADDRESS = "127.255.0.1"

_libc = ctypes.CDLL(None, use_errno=True)


def _say(word: str, **fields: object) -> None:
    print(word, json.dumps(fields), flush=True)


def _wait_for_stdin(life: float) -> None:
    """Until stdin closes (the caller is done, or died) or ``life`` passes."""
    deadline = time.monotonic() + life
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sys.stdin], [], [], left)
        if readable and not os.read(sys.stdin.fileno(), 4096):
            return


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):  # reaped already
            os.waitpid(pid, 0)


def namespaces(count: int, life: float) -> int:
    parent = os.getpid()
    pids = []
    try:
        for _ in range(count):
            pid = os.fork()
            if pid == 0:  # the child: its own user and network namespace, then sleep
                try:
                    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                    if os.getppid() != parent or _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
                        os._exit(1)
                    os.execv("/bin/sleep", ["sleep", str(int(life) + 5)])
                finally:
                    os._exit(1)
            pids.append(pid)
        # Each child is in its namespace once its net link differs from ours.
        own = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 60
        for pid in pids:
            while True:
                try:
                    if os.readlink(f"/proc/{pid}/ns/net") != own:
                        break
                except OSError as exc:
                    raise SystemExit(f"namespace holder {pid} exited before entering its namespace: {exc}") from None
                if time.monotonic() > deadline:
                    raise SystemExit(f"namespace holder {pid} did not enter its namespace within 60 s")
                time.sleep(0.001)
        _say("READY", pids=pids)
        _wait_for_stdin(life)
    finally:
        _kill_all(pids)
    return 0


def _open_listeners(first: int, count: int, backlog: int) -> list[socket.socket]:
    held = []
    for index in range(first, first + count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((f"127.0.0.{1 + index // PORTS}", FIRST_PORT + index % PORTS))
        sock.listen(backlog)
        held.append(sock)
    return held


def listeners(count: int, life: float, backlog: int, fill: int) -> int:
    """``count`` listeners over as many processes as the file descriptor limit needs (one
    process can hold at most its hard RLIMIT_NOFILE, which only CAP_SYS_RESOURCE raises)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limit = count + fill + 64 if hard == resource.RLIM_INFINITY else hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    per_process = max(limit - fill - 64, 1)  # the first process also holds the clients
    parent = os.getpid()
    children = []
    try:
        for first in range(per_process, count, per_process):
            pid = os.fork()
            if pid == 0:
                try:
                    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                    if os.getppid() == parent:
                        kept = _open_listeners(first, min(per_process, count - first), backlog)
                        signal.pause()
                        del kept
                finally:
                    os._exit(0)
            children.append(pid)
        held = _open_listeners(0, min(per_process, count), backlog)
        clients = []
        for sock in held[:fill]:
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.bind((CLIENT_ADDRESS, 0))  # the listeners hold 127.0.0.1's ports, ephemeral ones too
            client.connect(sock.getsockname())  # loopback: the handshake completes into the queue at once
            clients.append(client)
        # Every child's listeners are open once the namespace counts them all.
        deadline = time.monotonic() + 120
        while _tcp_sockets() < count:
            if any(os.waitpid(pid, os.WNOHANG)[0] for pid in children):
                raise SystemExit("a listener holder exited before opening its listeners")
            if time.monotonic() > deadline:
                raise SystemExit(f"only {_tcp_sockets()} of {count} listeners open after 120 s")
            time.sleep(0.05)
        _say("READY", pid=parent, pids=[parent, *children], listeners=count)
        _wait_for_stdin(life)
        del held, clients
    finally:
        _kill_all(children)
    return 0


def _tcp_sockets() -> int:
    """TCP sockets in this process's network namespace (/proc/net/protocols counts them per namespace)."""
    with open("/proc/self/net/protocols", encoding="ascii") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0] == "TCP":
                return int(fields[2])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("namespaces", "listeners"))
    parser.add_argument("count", type=int)
    parser.add_argument("--life", type=float, default=300.0)
    parser.add_argument("--backlog", type=int, default=16)
    parser.add_argument("--fill", type=int, default=0)
    parser.add_argument("--pad", type=int, default=0, help="bytes added to this process's command line")
    parser.add_argument("--padding", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    life = min(args.life, MAX_LIFE)
    if args.pad and not args.padding:
        # Re-executed with the padding in argv: /proc/PID/cmdline is what the process was started with.
        # Arguments are at most 128 KiB each (MAX_ARG_STRLEN), so a long one is several.
        chunk = 100_000
        pads = ["x" * min(chunk, args.pad - offset) for offset in range(0, args.pad, chunk)]
        argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
        os.execv(sys.executable, [*argv, *(item for pad in pads for item in ("--padding", pad))])
    if args.what == "namespaces":
        return namespaces(min(args.count, MAX_NAMESPACES), life)
    count = min(args.count, MAX_LISTENERS)
    return listeners(count, life, args.backlog, min(args.fill, count, 1000))


if __name__ == "__main__":
    sys.exit(main())
