#!/usr/bin/python3
"""Listeners that never accept, for the integration tests; meant to run inside a test namespace.

    ip netns exec NAME /usr/bin/python3 tests/helpers/listen.py --listen tcp4:4 --listen unix:3:/tmp/d/s

SPEC is KIND:BACKLOG[:WHERE] with KIND one of tcp4, tcp6 (WHERE = PORT[%DEVICE], port 0 = any,
DEVICE for SO_BINDTODEVICE), unix, seqpacket (WHERE = path) or abstract (WHERE = name). Prints one line
``READY {"pid", "uid", "children", "listeners": [...]}`` and then answers each command line on stdin
with ``OK {...}`` or ``ERROR {"error"}`` (tests/helpers/lineproto.py):

    open SPEC              -> OK {the new listener}
    close INDEX            -> OK {"closed": INDEX}
    relisten INDEX BACKLOG -> OK {"relisten": INDEX, "backlog": BACKLOG}
    drain INDEX PERIOD     -> OK {"drain": INDEX}: from now on accept and close every queued
                              connection each PERIOD seconds (a fast worker that serves bursts)

It exits when stdin closes or --life seconds pass, so a test that dies cannot leave it behind.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: the repository's root, for the imports below
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers.lineproto import answer, commands, say

SO_COOKIE = 57  # not exported by the socket module on 3.11
PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
MAX_LIFE = 300.0
MAX_FORKS = 16

_libc = ctypes.CDLL(None, use_errno=True)


def set_comm(name: str) -> None:
    # A distinctive comm lets the tests check aqtune's comm against a value they chose.
    _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def open_listener(spec: str) -> tuple[socket.socket, dict[str, Any]]:
    kind, _, rest = spec.partition(":")
    backlog_text, _, where = rest.partition(":")
    backlog = int(backlog_text)
    if kind in ("tcp4", "tcp6"):
        family, host = (socket.AF_INET, "127.0.0.1") if kind == "tcp4" else (socket.AF_INET6, "::1")
        port_text, _, device = where.partition("%")
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        sock.bind((host, int(port_text or 0)))
        port = sock.getsockname()[1]
        # Written the way ss writes it, device included.
        scope = f"%{device}" if device else ""
        address = f"{host}{scope}:{port}" if kind == "tcp4" else f"[{host}]{scope}:{port}"
        proto = "tcp" if kind == "tcp4" else "tcp6"
    elif kind in ("unix", "seqpacket", "abstract"):
        if not where:
            raise ValueError(f"{spec}: a {kind} listener needs a path or name")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET if kind == "seqpacket" else socket.SOCK_STREAM)
        if kind == "abstract":
            sock.bind("\0" + where)
            address = "@" + where
        else:
            if os.path.lexists(where):
                os.unlink(where)
            sock.bind(where)
            address = where
        port = None
        proto = "unix"
    else:
        raise ValueError(f"unknown listener kind {kind!r}")
    sock.listen(backlog)
    info = {
        "kind": kind,
        "proto": proto,
        "address": address,
        "port": port,
        "requested_backlog": backlog,
        "inode": os.fstat(sock.fileno()).st_ino,
        "cookie": int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), sys.byteorder),
    }
    return sock, info


def fork_holders(count: int, comm: str, life: float) -> list[int]:
    """Children that inherit every listener and die with the parent: several owners per socket."""
    children = []
    # Each child says on this pipe that it has taken its name: READY (and a test reading the owners'
    # names) must not come before, or a sweep can find a child still under its parent's name.
    named, told = os.pipe()
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            set_comm(comm)
            os.write(told, b"x")
            os.close(told)
            # The death signal is armed only now; a parent that died before that is noticed here.
            deadline = time.monotonic() + life
            while os.getppid() != 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            os._exit(0)
        children.append(pid)
    os.close(told)
    waited = 0
    while waited < count and (byte := os.read(named, count - waited)):
        waited += len(byte)
    os.close(named)
    return children


def serve(sockets: list[socket.socket | None], life: float) -> None:
    for words in commands(life):
        answer(handle(words, sockets))


def listening(sockets: list[socket.socket | None], index: int) -> socket.socket:
    sock = sockets[index]
    if sock is None:
        raise ValueError(f"listener {index} is closed")
    return sock


def drain(sock: socket.socket, period: float) -> None:
    """Accept and close whatever is queued, every ``period`` seconds, until the socket closes."""
    sock.setblocking(False)
    while sock.fileno() >= 0:
        try:
            while True:
                conn, _ = sock.accept()
                conn.close()
        except BlockingIOError:
            pass
        except OSError:
            return
        time.sleep(period)


def handle(words: list[str], sockets: list[socket.socket | None]) -> dict[str, Any]:
    try:
        if words[:1] == ["open"] and len(words) == 2:
            sock, info = open_listener(words[1])
            sockets.append(sock)
            return {**info, "index": len(sockets) - 1}
        if words[:1] == ["close"] and len(words) == 2:
            index = int(words[1])
            listening(sockets, index).close()
            sockets[index] = None
            return {"closed": index}
        if words[:1] == ["relisten"] and len(words) == 3:
            index, backlog = int(words[1]), int(words[2])
            listening(sockets, index).listen(backlog)
            return {"relisten": index, "backlog": backlog}
        if words[:1] == ["drain"] and len(words) == 3:
            index, period = int(words[1]), float(words[2])
            threading.Thread(target=drain, args=(listening(sockets, index), period), daemon=True).start()
            return {"drain": index}
        raise ValueError(f"unknown command {' '.join(words)!r}")
    except (OSError, ValueError, IndexError) as exc:
        return {"error": str(exc)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", action="append", default=[], metavar="SPEC")
    parser.add_argument("--forks", type=int, default=0, help="children that inherit every listener")
    parser.add_argument("--comm", default="aqt-listen")
    parser.add_argument("--child-comm", default="aqt-listen-kid")
    parser.add_argument("--life", type=float, default=120.0)
    args = parser.parse_args()
    life = min(args.life, MAX_LIFE)
    set_comm(args.comm)
    sockets: list[socket.socket | None] = []
    listeners = []
    for index, spec in enumerate(args.listen):
        sock, info = open_listener(spec)
        sockets.append(sock)
        listeners.append({**info, "index": index})
    children = fork_holders(min(args.forks, MAX_FORKS), args.child_comm, life)
    say("READY", pid=os.getpid(), uid=os.geteuid(), children=children, listeners=listeners)
    try:
        serve(sockets, life)
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
