#!/usr/bin/python3
"""Probe overhead benchmark: loopback TCP connection rate with and without aqtune's eBPF probes.

    /usr/bin/python3 bench/probe_overhead.py [--duration 1] [--rounds 20] [--clients N] [--no-extra]   (as root)

In a network namespace ``aqt-bench-ovh-<pid>`` (loopback only) one server process accepts and closes
connections on 127.0.0.1 with a bare accept4()/close() loop, and ``--clients`` processes each open and
abort (SO_LINGER 0, so close() sends RST) as many connections as they can for ``--duration`` seconds.
The figure is completed connections per second, summed over the clients.

Rounds alternate without and with the probes (EventLayer.start(emit=0), the daemon's normal mode,
compiled once and detached with pause() for the rounds without), starting and ending without, so
that load from elsewhere on the machine falls on both alike:
``--rounds`` rounds with probes, one more without, after a one-second warm-up. The result line gives
the medians and ratio = with/without (target >= 0.97); the line after it says how far to trust that
(each round with probes against its two neighbours, with an interval for the median of those ratios)
and compares CPU time per connection, which other processes' load disturbs less. After every round
with probes, the listener's counters from layer.read() are checked against the connections the
clients made. Then, unless ``--no-extra``, one round each with emit=2 (drop events) and emit=1
(trace: every event, read and counted by this process) is compared with the median without, and one
round gives the time spent in each program per connection (the kernel's BPF run-time statistics).

Exit status: 0 after a run (whatever the ratio), 1 when the probes missed the load or a helper failed,
2 when eBPF is unavailable here (the reason is printed). The namespace, helpers and probes are removed
whatever happens, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import platform
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from math import comb
from pathlib import Path
from typing import TYPE_CHECKING

from helper_pipe import read_line, stop

if TYPE_CHECKING:
    from aqtune.collect.ebpf import Event, EventLayer

REPO = Path(__file__).resolve().parents[1]
ADDRESS = "127.0.0.1"
PORT = 18080
BACKLOG = 4096  # somaxconn's default in a new namespace; a momentarily slow server must not drop
TARGET_RATIO = 0.97
WARMUP_SECONDS = 1.0
SETTLE_SECONDS = 0.2  # before every round: the previous one's helpers have reported and quieten
DRAIN_TIMEOUT = 10.0  # seconds the server gets to accept what is still queued when the clients stop
HELPER_LIFE = 900.0  # seconds; a helper orphaned by a killed benchmark still goes away by itself
READY_TIMEOUT = 30.0
BATCH = 64  # connections between clock reads; overshoot is a few ms and elapsed time is measured
SOCK_CLOEXEC = 0o2000000
ABORT = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST and leaves no TIME_WAIT
# No more processes than CPUs: oversubscribed, the rate swings by 90% from round to round with how
# the scheduler and ksoftirqd happen to share the CPUs (measured on 2 CPUs with 3 clients), and the
# ratio measures that rather than the probes; one client and the server give a spread of about 15%.
DEFAULT_CLIENTS = max(1, (os.cpu_count() or 2) - 1)
CHECK_TOLERANCE = 0.01  # probes must count the clients' connections to within 1%


# --- helper modes, run inside the namespace ------------------------------------------------------------

def _wait_for_eof(timeout: float) -> None:
    """Return once stdin closes (how the benchmark says "done"; also when it dies) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sys.stdin], [], [], left)
        if readable and not os.read(sys.stdin.fileno(), 4096):
            return


def serve() -> int:
    """Accept and close connections until stdin closes, after printing ``READY <listener inode>``."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((ADDRESS, PORT))
    listener.listen(BACKLOG)
    libc = ctypes.CDLL(None, use_errno=True)
    accept4, close = libc.accept4, libc.close
    fd = listener.fileno()

    def accept_forever() -> None:
        # accept4 through ctypes with no address buffer: no Python socket object or peer address is
        # built per connection, so the server takes little CPU and the clients get the rest. It is
        # the syscall socket.accept() makes, so the accept probes fire just as for a real server.
        while True:
            child = accept4(fd, None, None, SOCK_CLOEXEC)
            if child >= 0:
                close(child)
                continue
            error = ctypes.get_errno()
            if error == errno.EBADF:  # the listener was closed: serve() is returning
                return
            if error not in (errno.EINTR, errno.ECONNABORTED, errno.EAGAIN):
                os.write(2, f"accept4 failed: {os.strerror(error)}\n".encode())
                os._exit(1)

    # A daemon thread: blocked in accept4 it would never notice stdin closing, the main thread does.
    threading.Thread(target=accept_forever, daemon=True).start()
    print("READY", os.fstat(fd).st_ino, flush=True)
    _wait_for_eof(HELPER_LIFE)
    return 0


def connect_loop(seconds: float) -> tuple[int, float]:
    """Open and abort connections for ``seconds``: (connections completed, seconds actually taken)."""
    address = (ADDRESS, PORT)
    new_socket, family, kind = socket.socket, socket.AF_INET, socket.SOCK_STREAM
    level, option = socket.SOL_SOCKET, socket.SO_LINGER
    count = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(BATCH):
            sock = new_socket(family, kind)
            sock.setsockopt(level, option, ABORT)
            sock.connect(address)
            sock.close()
        count += BATCH
        if (now := time.perf_counter()) >= deadline:
            return count, now - started


def load() -> int:
    """For each ``GO <seconds>`` line on stdin run connect_loop and answer ``<count> <elapsed>``."""
    print("READY", flush=True)
    for line in sys.stdin:
        try:
            count, elapsed = connect_loop(float(line.split()[1]))
        except OSError as exc:
            print("ERROR", exc, flush=True)
            return 1
        print(count, f"{elapsed:.6f}", flush=True)
    return 0


# --- the benchmark proper ---------------------------------------------------------------------------------

def cpu_seconds(pids: list[int]) -> float:
    """CPU time the processes' threads have run, from the scheduler's exact runtime (schedstat), not
    from tick-sampled utime/stime. Loopback packets are processed in softirq context on the sending
    thread, charged to it on kernels without IRQ time accounting, so this includes the probes' cost."""
    total = 0
    for pid in pids:
        for task in os.scandir(f"/proc/{pid}/task"):
            with suppress(OSError):  # a thread that just exited
                total += int(Path(task.path, "schedstat").read_text().split()[0])
    return total / 1e9


@dataclass(frozen=True, slots=True)
class Round:
    rate: float  # completed connections per second, summed over the clients
    connections: int
    cpu: float  # CPU seconds the server and clients used

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.connections * 1e6


@dataclass(slots=True)
class Bench:
    namespace: str
    server: subprocess.Popen[str]
    server_inode: int
    clients: list[subprocess.Popen[str]]

    def run(self, seconds: float, events_from: EventLayer | None = None) -> Round:
        """One round: every client connects for ``seconds``. ``events_from``, a layer started with emit
        set, has its events read meanwhile, as the daemon or ``aqtune trace`` would."""
        time.sleep(SETTLE_SECONDS)
        pids = [self.server.pid, *(client.pid for client in self.clients)]
        cpu_before = cpu_seconds(pids)
        for client in self.clients:
            assert client.stdin is not None
            client.stdin.write(f"GO {seconds}\n")
            client.stdin.flush()
        deadline = time.monotonic() + seconds + 60
        pending = {client.stdout: client for client in self.clients if client.stdout is not None}
        answers = []
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError("a client did not finish its round")
            timeout = 1.0
            if events_from is not None:
                events_from.poll(50)
                timeout = 0.0
            readable, _, _ = select.select(list(pending), [], [], timeout)
            for stream in readable:
                answers.append(read_line(pending.pop(stream), 0).split())
        cpu = cpu_seconds(pids) - cpu_before
        if bad := [answer for answer in answers if len(answer) != 2 or not answer[0].isdigit()]:
            raise RuntimeError(f"client failed: {' '.join(bad[0]) or 'exited'}")
        return Round(sum(int(count) / float(elapsed) for count, elapsed in answers),
                     sum(int(count) for count, _ in answers), cpu)


@contextmanager
def bench_namespace(clients: int) -> Iterator[Bench]:
    """A fresh namespace with lo up, the accepting server and ``clients`` load generators in it."""
    name = f"aqt-bench-ovh-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    helpers: list[subprocess.Popen[str]] = []
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)

        def start(mode: str) -> subprocess.Popen[str]:
            helper = subprocess.Popen(
                ["ip", "netns", "exec", name, sys.executable, str(Path(__file__).resolve()), mode],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            helpers.append(helper)
            return helper

        server = start("--serve")
        ready = read_line(server, READY_TIMEOUT).split()
        if len(ready) != 2 or ready[0] != "READY":
            raise RuntimeError(f"server failed to start: {' '.join(ready)!r}")
        loaders = [start("--load") for _ in range(clients)]
        for loader in loaders:
            if (line := read_line(loader, READY_TIMEOUT)) != "READY":
                raise RuntimeError(f"client failed to start: {line!r}")
        yield Bench(name, server, int(ready[1]), loaders)
    finally:
        for helper in helpers:
            stop(helper)
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


@contextmanager
def probes(emit: int) -> Iterator[EventLayer]:
    from aqtune.collect.ebpf import EventLayer

    layer = EventLayer.start(emit=emit)
    try:
        yield layer
    finally:
        layer.close()


BPF_ENABLE_STATS = 32  # bpf(2) command; BPF_STATS_RUN_TIME = 0 is its only type
SYS_BPF = {"x86_64": 321, "aarch64": 280}


@contextmanager
def run_time_stats() -> Iterator[None]:
    """Programs count their run time while the fd BPF_ENABLE_STATS returns is open: unlike the
    kernel.bpf_stats_enabled sysctl, nothing stays changed on the host if the benchmark dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(8)  # union bpf_attr { struct { __u32 type; } enable_stats; }
    fd = libc.syscall(SYS_BPF[platform.machine()], BPF_ENABLE_STATS, attr, len(attr))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "bpf(BPF_ENABLE_STATS)")
    try:
        yield
    finally:
        os.close(fd)


def program_time(layer: EventLayer) -> dict[str, int]:
    """Nanoseconds each loaded program has run, from its fd's fdinfo."""
    spent = {}
    for name, function in layer.bpf.funcs.items():
        fields = dict(line.split(":\t", 1) for line in Path(f"/proc/self/fdinfo/{function.fd}").read_text().splitlines()
                      if ":\t" in line)
        spent[name.decode() if isinstance(name, bytes) else name] = int(fields.get("run_time_ns", 0))
    return spent


def counts(layer: EventLayer, inode: int) -> tuple[int, int]:
    """The listener's (enqueued, accepts) so far."""
    seen = layer.read().get(inode)
    return (seen.enqueued, seen.accepts) if seen else (0, 0)


def check_counters(bench: Bench, layer: EventLayer, connections: int,
                   before: tuple[int, int] = (0, 0)) -> tuple[bool, str]:
    """Did the probes see the round's load? Compares the listener's counters, less ``before``, with the
    clients' count."""
    # On a loaded machine the server may still be working through its queue when the clients stop,
    # so wait for it.
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while True:
        enqueued, accepts = (now - then for now, then in zip(counts(layer, bench.server_inode), before, strict=True))
        if accepts >= enqueued or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    ok = all(abs(value - connections) <= CHECK_TOLERANCE * connections for value in (enqueued, accepts))
    return ok, (f"probes saw enqueued={enqueued} accepts={accepts} of {connections} connections "
                f"({'ok' if ok else 'MISMATCH'})")


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float] | None:
    """Distribution-free confidence interval for the median of ``values``: (low, high, coverage).

    The order statistics of ranks k and n+1-k, with k the largest rank for which P(Binomial(n, 1/2) < k)
    stays within (1 - confidence) / 2. No assumption about the noise's distribution, which on a shared
    machine is anything but normal. None when there are too few values for that confidence."""
    n = len(values)
    ordered = sorted(values)
    below = 0.0  # P(Binomial(n, 1/2) < k)
    k = 0
    while k < n and below + comb(n, k) / 2**n <= (1 - confidence) / 2:
        below += comb(n, k) / 2**n
        k += 1
    if k == 0:
        return None
    return ordered[k - 1], ordered[n - k], 1 - 2 * below


def _median_text(values: list[float]) -> str:
    interval = median_interval(values)
    bounds = f" ({interval[2]:.0%} interval {interval[0]:.3f}-{interval[1]:.3f})" if interval else ""
    return f"{statistics.median(values):.3f}{bounds}"


def header(layer: EventLayer, args: argparse.Namespace) -> list[str]:
    probes_state: dict[str, str] = layer.status()["probes"]
    attached = [name for name, state in probes_state.items() if state.startswith("attached")]
    missing = [f"{name} ({state.removeprefix('not attached: ')})" for name, state in probes_state.items()
               if not state.startswith("attached")]
    try:
        jit = Path("/proc/sys/net/core/bpf_jit_enable").read_text().strip()
    except OSError:
        jit = "?"
    load1, load5, _ = os.getloadavg()
    return [
        f"# aqtune probe overhead: kernel {platform.release()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, bpf_jit_enable={jit}, loadavg {load1:.2f}/{load5:.2f}; "
        f"{args.rounds} rounds with probes (emit=0) between {args.rounds + 1} without, {args.duration:g} s each; "
        f"{args.clients} clients + 1 accept4 server on loopback",
        f"# probes attached ({len(attached)}/{len(probes_state)}): {', '.join(attached)}"
        + (f"; not attached: {'; '.join(missing)}" if missing else ""),
    ]


def _round_line(index: int, label: str, result: Round, note: str = "") -> str:
    return f"round {index:2d} {label:<8} {result.rate:8.0f}/s {result.cpu_us:6.1f} us CPU/conn  {note}".rstrip()


def benchmark(args: argparse.Namespace) -> int:
    from aqtune.collect.ebpf import EMIT_ALL, EMIT_DROPS

    without: list[Round] = []
    with_probes: list[Round] = []
    all_seen = True
    # One layer, compiled once (Unavailable is reported before any namespace), detached for the rounds
    # without: rounds a moment apart rather than a compile apart, so drift on the host falls on both.
    with probes(0) as layer, bench_namespace(args.clients) as bench:
        for line in header(layer, args):
            print(line, flush=True)
        if staying := layer.pause():
            print(f"# attached in every round (bcc attaches fentry as it loads): {', '.join(staying)}", flush=True)
        bench.run(WARMUP_SECONDS)  # first connections fault in pages and warm caches: not measured
        # Without, with, without, ..., without: every round with probes sits between two without.
        for index in range(1, 2 * args.rounds + 2):
            if index % 2:
                without.append(result := bench.run(args.duration))
                print(_round_line(index, "without", result), flush=True)
                continue
            before = counts(layer, bench.server_inode)
            layer.resume()
            with_probes.append(result := bench.run(args.duration))
            ok, seen = check_counters(bench, layer, result.connections, before)
            layer.pause()
            all_seen &= ok
            print(_round_line(index, "with", result, seen), flush=True)

        base = statistics.median(r.rate for r in without)
        probed = statistics.median(r.rate for r in with_probes)
        ratio = probed / base
        print(f"conn_rate_without={base:.0f}/s conn_rate_with={probed:.0f}/s ratio={ratio:.3f} "
              f"(target >= {TARGET_RATIO}) {'met' if ratio >= TARGET_RATIO else 'NOT MET'}", flush=True)

        # How far to trust it: each round with probes against the mean of its two neighbours (linear
        # drift cancels), with an interval for the median of those ratios; the same for CPU time per
        # connection, which depends less on how much of the CPUs other processes left to the benchmark.
        rate_pairs = [r.rate * 2 / (without[i].rate + without[i + 1].rate) for i, r in enumerate(with_probes)]
        cpu_pairs = [(without[i].cpu_us + without[i + 1].cpu_us) / 2 / r.cpu_us for i, r in enumerate(with_probes)]
        spread = (max(r.rate for r in without) - min(r.rate for r in without)) / base
        print(f"# paired rate ratio {_median_text(rate_pairs)}; paired CPU ratio {_median_text(cpu_pairs)} "
              f"({statistics.median(r.cpu_us for r in without):.1f} us/conn without, "
              f"{statistics.median(r.cpu_us for r in with_probes):.1f} with); "
              f"rounds without probes spread {spread:.0%}", flush=True)

        if not args.no_extra:
            for emit, label in ((EMIT_DROPS, "drop events"), (EMIT_ALL, "trace, every event")):
                events = 0

                def count(_event: Event) -> None:
                    nonlocal events
                    events += 1

                with probes(emit) as extra:
                    extra.on_event(count)
                    result = bench.run(args.duration, events_from=extra)
                    extra.poll(0)
                    ok, seen = check_counters(bench, extra, result.connections)
                    lost = extra.status()["lost_events"]
                all_seen &= ok
                print(f"# emit={emit} ({label}), 1 round, informational: conn_rate={result.rate:.0f}/s "
                      f"ratio={result.rate / base:.3f} events={events} lost={lost}; {seen}", flush=True)
            layer.resume()
            with run_time_stats():
                ran_before = program_time(layer)
                result = bench.run(args.duration)
                ran_after = program_time(layer)
            spent = {name: ran_after[name] - ns for name, ns in ran_before.items()}
            layer.pause()
            per_connection = {name: ns / result.connections for name, ns in spent.items() if ns}
            print("# time in each program per connection (bpf_stats, 1 round, informational; counting adds "
                  "a clock read or two per run): "
                  + ", ".join(f"{name} {ns:.0f} ns" for name, ns in sorted(per_connection.items()))
                  + f"; total {sum(per_connection.values()):.0f} ns", flush=True)
    if not all_seen:
        print("probe_overhead.py: the probes did not count the load the clients made, so the ratio "
              "measures nothing", file=sys.stderr)
        return 1
    return 0


def _terminate(signum: int, _frame: object) -> None:
    # Turn SIGTERM into an exception so the namespace, helpers and probes are cleaned up by finally blocks.
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description="loopback connection rate with and without aqtune's eBPF probes")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per round (default 1)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds with probes (default 20; one more without)")
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS,
                        help=f"load generator processes (default {DEFAULT_CLIENTS}: one per CPU besides the server's)")
    parser.add_argument("--no-extra", action="store_true", help="skip the emit=2 and emit=1 rounds")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve or args.load:
        try:
            return serve() if args.serve else load()
        except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the benchmark reports it once
            return 130
    if os.geteuid() != 0:
        print("probe_overhead.py: needs root (network namespace, eBPF)", file=sys.stderr)
        return 1
    if not (0.5 <= args.duration <= 60 and 3 <= args.rounds <= 50 and 1 <= args.clients <= 32):
        parser.error("--duration must be 0.5-60, --rounds 3-50, --clients 1-32")
    sys.path.insert(0, str(REPO))
    from aqtune.collect.ebpf import Unavailable

    signal.signal(signal.SIGTERM, _terminate)
    try:
        return benchmark(args)
    except Unavailable as exc:
        print(f"probe_overhead.py: eBPF unavailable: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; namespace, helpers and probes removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
