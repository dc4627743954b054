#!/usr/bin/python3
"""Sweep benchmark: aqtune's in-process sweep and owner scan against ss, at 1,000 and 10,000 listeners.

    /usr/bin/python3 bench/sweep_bench.py [--sizes 1000 10000] [--runs 7]      (as root)

For each size it creates a network namespace ``aqt-bench-<pid>``, starts a helper inside it that holds
that many TCP listeners (127.0.k.1:19000-19499), and times, as medians over ``--runs`` after one
warm-up, with the four timed figures taken in turn in every round:
  sweep_ms     aqtune.collect.sweep.sweep(<namespace>, owners=False), in this process
  ss_ltnm_ms   ``ss -ltnm`` run inside the namespace by a timer started there once, so the cost of
               entering the namespace is not charged to ss
  owners_ms    aqtune.collect.procfs.find_owners() for the listeners' inodes
  ss_ltnp_ms   ``ss -ltnp`` timed the same way as ``ss -ltnm``
  pyroute2_ms  pyroute2's DiagSocket dump of the same listeners, once (it is slow), for reference
The namespace and helper are removed whatever happens, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from helper_pipe import read_line, stop

if TYPE_CHECKING:
    from aqtune.collect.netns import NamespaceRef

REPO = Path(__file__).resolve().parents[1]
HELPER_LIFE = 900.0  # seconds; a helper orphaned by a killed benchmark still goes away by itself
READY_TIMEOUT = 120.0
SS_TIMEOUT = 60.0  # seconds to wait for one ss run; it takes tens of ms
PORTS_PER_ADDRESS = 500
TARGET_RATIO = 1.0
SS_COMMANDS = {"ss_ltnm": ["ss", "-ltnm"], "ss_ltnp": ["ss", "-ltnp"]}


# --- helper modes, run inside the namespace ------------------------------------------------------------

def hold_listeners(count: int) -> int:
    """Hold ``count`` listeners until stdin closes (or HELPER_LIFE passes), after printing READY."""
    needed = count + 100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            print(f"RLIMIT_NOFILE hard limit {hard} < {needed}: cannot hold {count} listeners", flush=True)
            return 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    listeners = []
    for i in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Spread over 127.0.k.1 so every listener gets a port in the agreed 19000-19499 range.
        sock.bind((f"127.0.{1 + i // PORTS_PER_ADDRESS}.1", 19000 + i % PORTS_PER_ADDRESS))
        sock.listen(128)
        listeners.append(sock)
    print("READY", len(listeners), flush=True)
    # EOF on stdin is how the benchmark says "done"; it also arrives if the benchmark dies.
    deadline = time.monotonic() + HELPER_LIFE
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sys.stdin], [], [], left)
        if readable and not sys.stdin.buffer.read1(4096):
            break
    return 0


def serve_timer() -> int:
    """Run the ss command named on each stdin line and answer with its wall time in ms, until EOF."""
    with open(os.devnull, "wb") as devnull:
        for line in sys.stdin:
            command = SS_COMMANDS[line.strip()]
            started = time.perf_counter()
            # No timeout here: with one, Popen.wait polls with doubling sleeps and rounds a 36 ms run up
            # to 64 ms. ss ends by itself, and the benchmark bounds its wait for each answer.
            subprocess.run(command, stdout=devnull, stderr=subprocess.STDOUT, check=True)
            print(f"{(time.perf_counter() - started) * 1000:.3f}", flush=True)
    return 0


# --- the benchmark proper ---------------------------------------------------------------------------------

def _run(*command: str) -> None:
    subprocess.run(command, check=True, timeout=30, stdout=subprocess.DEVNULL)


def _self_command(namespace: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, sys.executable, str(Path(__file__).resolve()), *args]


def _start_helper(namespace: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(_self_command(namespace, *args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


@contextmanager
def bench_namespace(count: int) -> Iterator[tuple[str, int, Callable[[str], float]]]:
    """A fresh namespace whose helper holds ``count`` listeners.

    Yields (name, helper pid, a function timing one named ss command inside the namespace).
    """
    name = f"aqt-bench-{os.getpid()}"
    _run("ip", "netns", "add", name)
    helpers: list[subprocess.Popen[str]] = []
    try:
        _run("ip", "-n", name, "link", "set", "lo", "up")
        holder = _start_helper(name, "--hold", str(count))
        helpers.append(holder)
        line = read_line(holder, READY_TIMEOUT)
        if line != f"READY {count}":
            raise RuntimeError(f"helper failed to start: {line!r}")
        # Started once, so entering the namespace is not charged to ss.
        timer = _start_helper(name, "--timer")
        helpers.append(timer)

        def time_ss(key: str) -> float:
            assert timer.stdin is not None
            timer.stdin.write(key + "\n")
            timer.stdin.flush()
            return float(read_line(timer, SS_TIMEOUT))

        yield name, holder.pid, time_ss
    finally:
        for helper in helpers:
            stop(helper)
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def _timed_ms(call: Callable[[], object]) -> Callable[[], float]:
    def probe() -> float:
        started = time.perf_counter()
        call()
        return (time.perf_counter() - started) * 1000
    return probe


def interleaved_medians(probes: dict[str, Callable[[], float]], runs: int) -> dict[str, float]:
    """Median ms of each probe, taking the probes in turn so that a burst of load from elsewhere on the
    machine hits aqtune and ss alike rather than whichever happened to be running."""
    samples: dict[str, list[float]] = {key: [] for key in probes}
    for probe in probes.values():
        probe()  # warm-up: first-touch allocations and cold dentries are not what is measured
    for _ in range(runs):
        for key, probe in probes.items():
            samples[key].append(probe())
    return {key: statistics.median(values) for key, values in samples.items()}


def pyroute2_ms(ref: NamespaceRef) -> tuple[float, int]:
    """One DiagSocket dump of v4+v6 listeners with SKMEMINFO, as aqtune requests, and its row count."""
    from pyroute2 import DiagSocket

    from aqtune.collect import netns

    # DiagSocket has no namespace argument; a netlink socket belongs to the namespace it was created in.
    with netns.entered(ref):
        diag = DiagSocket()
    try:
        diag.bind()
        started = time.perf_counter()
        rows = 0
        for family in (socket.AF_INET, socket.AF_INET6):
            rows += len(diag.get_sock_stats(family=family, states=1 << 10, extensions=1 << 6))
        return (time.perf_counter() - started) * 1000, rows
    finally:
        diag.close()


def measure(count: int, runs: int) -> str:
    from aqtune.collect import netns, procfs
    from aqtune.collect.sweep import sweep

    with bench_namespace(count) as (name, helper_pid, time_ss):
        snapshot = sweep(name, owners=False)
        tcp = [listener for listener in snapshot.listeners if listener.proto.startswith("tcp")]
        if len(tcp) != count or any(ns.error or ns.skipped_messages for ns in snapshot.namespaces):
            raise RuntimeError(f"sweep saw {len(tcp)} of {count} listeners: {snapshot.namespaces}")
        inodes = {listener.inode for listener in tcp}
        owners = procfs.find_owners(inodes)
        held = sum(1 for inode in inodes if [p.pid for p in owners.get(inode, ())] == [helper_pid])
        if held != count:
            raise RuntimeError(f"find_owners attributed {held} of {count} listeners to the helper")

        ms = interleaved_medians({
            "sweep": _timed_ms(lambda: sweep(name, owners=False)),
            "ss_ltnm": lambda: time_ss("ss_ltnm"),
            "owners": _timed_ms(lambda: procfs.find_owners(inodes)),
            "ss_ltnp": lambda: time_ss("ss_ltnp"),
        }, runs)
        ref = netns.select_namespaces(netns.list_namespaces(), name)[0]
        diag_ms, diag_rows = pyroute2_ms(ref)
        if diag_rows != count:
            raise RuntimeError(f"pyroute2 saw {diag_rows} of {count} listeners")
    return (f"listeners={count} sweep_ms={ms['sweep']:.1f} ss_ltnm_ms={ms['ss_ltnm']:.1f} "
            f"ratio={ms['sweep'] / ms['ss_ltnm']:.2f} (target <= {TARGET_RATIO}) | "
            f"owners_ms={ms['owners']:.1f} ss_ltnp_ms={ms['ss_ltnp']:.1f} ratio={ms['owners'] / ms['ss_ltnp']:.2f} | "
            f"pyroute2_ms={diag_ms:.0f}")


def _terminate(signum: int, _frame: object) -> None:
    # Turn SIGTERM into an exception so the namespace and helper are cleaned up by the finally blocks.
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description="aqtune sweep vs ss, at 1,000 and 10,000 listeners")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], metavar="N")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per figure (median; default 7)")
    parser.add_argument("--hold", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--timer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold is not None or args.timer:
        try:
            return hold_listeners(args.hold) if args.hold is not None else serve_timer()
        except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the benchmark reports it once
            return 130
    if os.geteuid() != 0:
        print("sweep_bench.py: needs root (it creates a network namespace)", file=sys.stderr)
        return 1
    if not 1 <= args.runs <= 100 or not all(1 <= n <= 100_000 for n in args.sizes):
        parser.error("--runs must be 1-100 and sizes 1-100000")
    sys.path.insert(0, str(REPO))
    signal.signal(signal.SIGTERM, _terminate)
    print(f"# aqtune sweep benchmark: kernel {platform.release()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, median of {args.runs} runs after 1 warm-up", flush=True)
    try:
        for count in args.sizes:
            print(measure(count, args.runs), flush=True)
    except KeyboardInterrupt:
        print("interrupted; namespace and helper removed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
