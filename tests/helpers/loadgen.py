#!/usr/bin/python3
"""Load generators for the benchmarks, bounded in count and time, on loopback in the caller's namespace.

    ip netns exec NAME /usr/bin/python3 tests/helpers/loadgen.py MODE [OPTIONS]

Each mode speaks tests/helpers/lineproto.py: it says ``READY {...}`` once set up, answers each command
line with ``OK {...}`` or ``ERROR {"error"}``, and exits when stdin closes or after 15 minutes.

    hold --count N          N quiet listeners (backlog 128) on 127.0.k.1:19000-19499, k from 1.
                            open -> OK {"listeners"}; close -> OK {}
    serve --port P          accepts and closes connections on 127.0.0.1:P (backlog 4096; --reuseport to
                            share the port), with a bare accept4()/close() loop that leaves the CPU to the
                            clients; READY {"inode"}
    connect --port P        go SECONDS -> opens and resets (SO_LINGER 0: no TIME_WAIT, so ports never run out)
                            connections as fast as it can -> OK {"made", "failed", "seconds"};
                            --connect-timeout S bounds each connect (a dropped SYN must not stall it)
    synflood --port P --rate R [--steady]
                            holds a backlog-8 listener on P that never accepts; go SECONDS -> R SYNs/s at it,
                            in 3 s bursts 4 s apart (drop episodes open and close) or, --steady, all along
                            -> OK {"syns", "bursts"}
    churn --count N         go SECONDS -> opens N listeners on 127.0.k.1, k from 101, and closes them again,
                            in waves -> OK {"waves", "opened", "peak"}
    timer                   each line is a command (ss -ltnm, ...) run here, in the namespace; the answer is
                            its wall time, OK {"ms"}: started once, so entering the namespace is not charged
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: the repository's root, for the imports below
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers.lineproto import answer, commands, say, stdin_closed, wait_for_stdin_close
from tests.helpers.sockets import listen_tcp, raise_nofile, spread_addresses

LOOPBACK = "127.0.0.1"
LIFE = 900.0  # seconds; a helper orphaned by a killed benchmark still goes away by itself
MAX_SECONDS = 600.0  # one go
MAX_LISTENERS = 100_000
MAX_RATE = 50_000  # SYNs/s
SERVE_BACKLOG = 4096  # somaxconn in a new namespace: a momentarily slow server must not drop
QUIET_BACKLOG = 128
SOCK_CLOEXEC = 0o2000000
ABORT = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST and leaves no TIME_WAIT
BATCH = 64  # connections between clock reads
EOF_EVERY = 4096  # connections between looks at stdin: a select() costs about as much as a connect

HOLD_NET = 1  # quiet listeners on 127.0.1.1, 127.0.2.1, ...
CHURN_NET = 101  # churn listeners on 127.0.101.1, ...
CHURN_BATCH = 500
CHURN_RISE, CHURN_HOLD, CHURN_FALL, CHURN_PAUSE = 2.0, 1.5, 1.0, 1.5  # seconds of each wave
FLOOD_BACKLOG = 8
FLOOD_HOLD = 2 * FLOOD_BACKLOG + 8  # first connections, kept open so the queue stays full
FLOOD_ON, FLOOD_OFF = 3.0, 4.0  # seconds; the gaps let drop episodes close, so they are logged and restart


def sleep_until(when: float) -> None:
    left = when - time.monotonic()
    if left > 0:
        time.sleep(left)


def _rounds(run: Callable[[float], dict[str, Any]]) -> None:
    """Answer ``go SECONDS`` with run(SECONDS), until stdin closes."""
    for words in commands(LIFE):
        seconds = float(words[1]) if words[:1] == ["go"] and len(words) == 2 and _is_number(words[1]) else 0.0
        if 0 < seconds <= MAX_SECONDS:
            answer(run(seconds))
        else:
            answer({"error": f"expected go SECONDS (at most {MAX_SECONDS:g}), got {' '.join(words)!r}"})


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def hold(count: int) -> None:
    raise_nofile(count + 64)
    addresses = spread_addresses(count, HOLD_NET)
    held: list[socket.socket] = []
    say("READY")
    for words in commands(LIFE):
        if words == ["open"]:
            held += [listen_tcp(address, QUIET_BACKLOG) for address in addresses[len(held):]]
            answer({"listeners": len(held)})
        elif words == ["close"]:
            for sock in held:
                sock.close()
            held = []
            answer({})
        else:
            answer({"error": f"expected open or close, got {' '.join(words)!r}"})


def serve(port: int, reuseport: bool) -> None:
    listener = listen_tcp((LOOPBACK, port), SERVE_BACKLOG, reuseport=reuseport)
    libc = ctypes.CDLL(None, use_errno=True)
    accept4, close = libc.accept4, libc.close
    fd = listener.fileno()

    def accept_forever() -> None:
        # accept4 through ctypes with no address buffer: no Python socket object or peer address is built
        # per connection, so the server takes little CPU and the clients get the rest. It is the syscall
        # socket.accept() makes, so aqtune's accept probes fire just as for a real server.
        while True:
            child = accept4(fd, None, None, SOCK_CLOEXEC)
            if child >= 0:
                close(child)
                continue
            error = ctypes.get_errno()
            if error not in (errno.EINTR, errno.ECONNABORTED, errno.EAGAIN):
                os.write(2, f"accept4 failed: {os.strerror(error)}\n".encode())
                os._exit(1)

    # A daemon thread: blocked in accept4 it would never notice stdin closing; the main thread does.
    threading.Thread(target=accept_forever, daemon=True).start()
    say("READY", pid=os.getpid(), inode=os.fstat(fd).st_ino)
    wait_for_stdin_close(LIFE)


def connect(port: int, timeout: float, seconds: float) -> dict[str, Any]:
    address = (LOOPBACK, port)
    new_socket, family, kind, level = socket.socket, socket.AF_INET, socket.SOCK_STREAM, socket.SOL_SOCKET
    bound = struct.pack("ll", int(timeout), int(timeout % 1 * 1e6)) if timeout else None
    made = failed = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(BATCH):
            sock = new_socket(family, kind)
            sock.setsockopt(level, socket.SO_LINGER, ABORT)
            if bound is not None:
                sock.setsockopt(level, socket.SO_SNDTIMEO, bound)
            try:
                sock.connect(address)
                made += 1
            except OSError:
                failed += 1
            sock.close()
        now = time.perf_counter()
        if now >= deadline or ((made + failed) % EOF_EVERY == 0 and stdin_closed()):
            return {"made": made, "failed": failed, "seconds": now - started}


def synflood(port: int, rate: int, steady: bool, seconds: float) -> dict[str, Any]:
    held: list[socket.socket] = []
    sent = bursts = 0
    per_slice = rate // 100  # paced in 10 ms slices, so a burst is a steady rate, not one spike
    on, off = (seconds, 0.0) if steady else (FLOOD_ON, FLOOD_OFF)
    started = time.monotonic()
    deadline = started + seconds
    while (now := time.monotonic()) < deadline and not stdin_closed():
        phase = (now - started) % (on + off)
        if phase >= on:
            sleep_until(min(now + on + off - phase, deadline))
            continue
        bursts = int((now - started) // (on + off)) + 1
        for _ in range(per_slice):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            # On loopback the handshake (or the drop of the SYN at the full queue) happens inside connect().
            sock.connect_ex((LOOPBACK, port))
            sent += 1
            if len(held) < FLOOD_HOLD:
                held.append(sock)
            else:
                sock.close()  # still in SYN-SENT: nothing is sent, the dropped SYN is never retried
        sleep_until(now + 0.01)
    for sock in held:
        sock.close()
    return {"syns": sent, "bursts": bursts}


def churn(count: int, seconds: float) -> dict[str, Any]:
    addresses = spread_addresses(count, CHURN_NET)
    deadline = time.monotonic() + seconds
    waves = opened = peak = 0
    while time.monotonic() < deadline:
        held: list[socket.socket] = []
        step = CHURN_RISE * CHURN_BATCH / count
        for first in range(0, count, CHURN_BATCH):
            if time.monotonic() >= deadline:
                break
            batch_started = time.monotonic()
            held += [listen_tcp(address, QUIET_BACKLOG) for address in addresses[first:first + CHURN_BATCH]]
            sleep_until(batch_started + step)
        opened += len(held)
        peak = max(peak, len(held))
        if stdin_closed(min(CHURN_HOLD, max(deadline - time.monotonic(), 0.0))):
            break
        step = CHURN_FALL * CHURN_BATCH / count
        for first in range(0, len(held), CHURN_BATCH):
            batch_started = time.monotonic()
            for sock in held[first:first + CHURN_BATCH]:
                sock.close()
            sleep_until(min(batch_started + step, deadline))
        waves += 1
        sleep_until(min(time.monotonic() + CHURN_PAUSE, deadline))
    return {"waves": waves, "opened": opened, "peak": peak}


def timer() -> None:
    say("READY")
    with open(os.devnull, "wb") as devnull:
        for words in commands(LIFE):
            started = time.perf_counter()
            # No timeout: with one, Popen.wait polls with doubling sleeps and rounds a 36 ms run up to 64 ms.
            # The command ends by itself, and the parent bounds its wait for each answer.
            done = subprocess.run(words, stdout=devnull, stderr=subprocess.PIPE, check=False)
            took = (time.perf_counter() - started) * 1000
            answer({"ms": took} if done.returncode == 0 else
                   {"error": f"{' '.join(words)} exited {done.returncode}: {done.stderr.decode(errors='replace')}"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    modes.add_parser("hold").add_argument("--count", type=int, required=True)
    serve_args = modes.add_parser("serve")
    serve_args.add_argument("--port", type=int, required=True)
    serve_args.add_argument("--reuseport", action="store_true")
    connect_args = modes.add_parser("connect")
    connect_args.add_argument("--port", type=int, required=True)
    connect_args.add_argument("--connect-timeout", type=float, default=0.0)
    flood_args = modes.add_parser("synflood")
    flood_args.add_argument("--port", type=int, required=True)
    flood_args.add_argument("--rate", type=int, required=True)
    flood_args.add_argument("--steady", action="store_true")
    modes.add_parser("churn").add_argument("--count", type=int, required=True)
    modes.add_parser("timer")
    args = parser.parse_args()
    if not 0 <= getattr(args, "count", 0) <= MAX_LISTENERS or not 0 <= getattr(args, "rate", 0) <= MAX_RATE:
        parser.error(f"at most {MAX_LISTENERS} listeners and {MAX_RATE} SYNs/s")
    try:
        if args.mode == "hold":
            hold(args.count)
        elif args.mode == "serve":
            serve(args.port, args.reuseport)
        elif args.mode == "connect":
            say("READY", pid=os.getpid())
            _rounds(lambda seconds: connect(args.port, args.connect_timeout, seconds))
        elif args.mode == "synflood":
            with listen_tcp((LOOPBACK, args.port), FLOOD_BACKLOG):
                say("READY")
                _rounds(lambda seconds: synflood(args.port, args.rate, args.steady, seconds))
        elif args.mode == "churn":
            raise_nofile(args.count + 64)
            say("READY")
            _rounds(lambda seconds: churn(args.count, seconds))
        else:
            timer()
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the benchmark reports it once
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
