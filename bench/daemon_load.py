#!/usr/bin/python3
"""Daemon load benchmark: what `aqtune run` costs when idle, and whether it keeps up under load.

    /usr/bin/python3 bench/daemon_load.py [--idle-seconds 30] [--load-seconds 60] [--phases idle load]   (as root)

Everything happens in a network namespace ``aqt-bench-load-<pid>`` (loopback only); the daemon runs in
the host namespace as a service would, watching that namespace only (``--netns``), in dry-run with a
copy of etc/aqtune/policy.toml whose metrics file points into a temporary directory.

idle   A helper holds 1,000 listeners that nobody connects to. The daemon starts, and once it says
       READY=1 the helper opens the listeners (as services do after a daemon started at boot, so eBPF
       sees their listen() calls); after a 5 s warm-up the daemon's CPU time (utime+stime from
       /proc/PID/stat) is measured over 30 s: ``idle_cpu`` in % of one core, target < 1%. Then again
       with --no-ebpf, for comparison.
load   Two server processes accept on one SO_REUSEPORT port and clients open and reset short
       connections to it as fast as they can; first 5 s without the daemon (what the generator reaches
       on this machine by itself), then for 60 s with the daemon (eBPF on) and, at the same time, a
       churner that opens 10,000 listeners and closes them again in waves, and two floods of SYNs at
       backlog-8 listeners that never accept: one in bursts, so drop episodes open and close, one
       steady at 14,000/s, so one episode lasts the whole load. The daemon
       runs with NOTIFY_SOCKET (read here) and WATCHDOG_USEC=2000000: every WATCHDOG=1 is timed and the
       longest gap is checked against the 2 s period. Its VmRSS is sampled every second: growth from
       after warm-up (median of 10-20 s) to the end (median of the last 10 s), target < 10%. The
       connection rate is handshakes completed per second in the namespace (its PassiveOpens counter),
       target >= 20,000, with the slowest and fastest second; attempts adds those dropped at full
       queues (ListenDrops). When the load stops, the daemon's CPU use
       is measured again over 10 s: cost proportional to trouble means it falls back to the idle figure.

Every figure is printed as it is measured and again, against its target, in a summary at the end;
--keep leaves the work directory (daemon logs and state, load-samples.tsv: CPU, RSS and counters
every second) for a closer look.
The namespace, helpers and daemon are removed whatever happens, Ctrl-C and SIGTERM included; helpers
also exit when their stdin closes, and the daemon gets SIGTERM if this process dies (setpriv
--pdeathsig). Nothing outside the namespace is changed. Exit status: 0 after a run whatever the
figures, 1 when a helper or the daemon failed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import queue
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "etc" / "aqtune" / "policy.toml"
LOOPBACK = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Targets, from the issue.
TARGET_IDLE_CPU = 1.0  # % of one core
TARGET_RATE = 20_000  # connections/s: handshakes completed
TARGET_RSS_GROWTH = 10.0  # %
WATCHDOG_USEC = 2_000_000

IDLE_LISTENERS = 1000
IDLE_WARMUP = 5.0
BASELINE_SECONDS = 5.0
RSS_WARM_AT = 15.0  # seconds into the load: RSS after warm-up, the base of the growth figure
RSS_WINDOW = 10.0  # seconds of samples each RSS figure is the median of
AFTER_SETTLE, AFTER_SECONDS = 5.0, 10.0  # after the load: wait, then measure the daemon's CPU again

LOAD_PORT = 18280
LOAD_BACKLOG = 4096  # somaxconn in a new namespace: a momentarily slow server must not drop
ABORT = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST and leaves no TIME_WAIT to run out of ports
CONNECT_TIMEOUT = struct.pack("ll", 1, 0)  # SO_SNDTIMEO bounds connect(): a dropped SYN must not stall a client
ACCEPT_POLL = struct.pack("ll", 0, 200_000)  # SO_RCVTIMEO: how often an idle server looks for stdin's EOF

FLOOD_PORT = 18281
FLOOD_BACKLOG = 8
FLOOD_HOLD = 2 * FLOOD_BACKLOG + 8  # first connections, kept open so the queue stays full
FLOOD_RATE = 2000  # SYNs/s during a burst
FLOOD_ON, FLOOD_OFF = 3.0, 4.0  # seconds; the gaps let episodes close, so they are logged and restart
# A steady SYN flood at a second full listener: one drop episode that lasts the whole load (the
# sustained, err-priority path) and drops the daemon must count every second.
STEADY_PORT = 18282
STEADY_RATE = 14_000  # SYNs/s

HOLD_NET = 1  # idle listeners on 127.0.1.1, 127.0.2.1, ...
CHURN_NET = 101  # churn listeners on 127.0.101.1, ...
LISTEN_PORT = 19000
PORTS_PER_ADDRESS = 500
CHURN_LISTENERS = 10_000
CHURN_BATCH = 500
CHURN_RISE, CHURN_HOLD, CHURN_FALL, CHURN_PAUSE = 2.0, 1.5, 1.0, 1.5  # seconds of each wave

HELPER_LIFE = 900.0  # seconds; a helper orphaned by a killed benchmark still goes away by itself
READY_TIMEOUT = 120.0  # the daemon compiles its eBPF program first: seconds on a busy machine
STOP_TIMEOUT = 15.0  # for the daemon to finish its sweep and exit after SIGTERM
HELPER_GRACE = 2.0  # for a helper to exit after each request to


# --- helper modes, run inside the namespace ------------------------------------------------------------

def _say(word: str, **fields: Any) -> None:
    print(word, json.dumps(fields), flush=True)


def _stdin_closed(timeout: float = 0.0) -> bool:
    """True once the benchmark closed our stdin (it says "stop" that way, and also when it dies)."""
    readable, _, _ = select.select([sys.stdin], [], [], timeout)
    return bool(readable) and not os.read(sys.stdin.fileno(), 4096)


def _wait_for_go() -> bool:
    """Block until the benchmark writes a line (start) or closes stdin (give up); True to start."""
    readable, _, _ = select.select([sys.stdin], [], [], HELPER_LIFE)
    return bool(readable) and bool(sys.stdin.buffer.readline())


def _raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise OSError(f"RLIMIT_NOFILE hard limit {hard} < {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _addresses(count: int, first_net: int) -> list[tuple[str, int]]:
    # Spread over 127.0.k.1 so every listener gets a port in a small range outside the ephemeral ports.
    return [(f"127.0.{first_net + i // PORTS_PER_ADDRESS}.1", LISTEN_PORT + i % PORTS_PER_ADDRESS)
            for i in range(count)]


def _listen(address: tuple[str, int], backlog: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(backlog)
    return sock


def _sleep_until(when: float) -> None:
    left = when - time.monotonic()
    if left > 0:
        time.sleep(left)


def hold(count: int) -> int:
    """Open ``count`` quiet listeners on "open", close them on "close", until stdin closes."""
    _raise_nofile(count + 64)
    addresses = _addresses(count, HOLD_NET)
    held: list[socket.socket] = []
    _say("READY")
    deadline = time.monotonic() + HELPER_LIFE
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sys.stdin], [], [], left)
        command = sys.stdin.readline().strip() if readable else ""
        if command == "open":
            held = [_listen(address, 128) for address in addresses]
            _say("OPEN", listeners=len(held))
        elif command == "close":
            for sock in held:
                sock.close()
            held = []
            _say("CLOSED")
        else:
            break
    return 0


def serve(port: int) -> int:
    """Accept and close connections on a SO_REUSEPORT listener until stdin closes."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # SO_RCVTIMEO rather than settimeout(): Python would poll() before every accept().
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, ACCEPT_POLL)
    listener.bind((LOOPBACK, port))
    listener.listen(LOAD_BACKLOG)
    _say("READY")
    accepted = 0
    deadline = time.monotonic() + HELPER_LIFE
    while time.monotonic() < deadline:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:  # SO_RCVTIMEO passed with nothing to accept
            if _stdin_closed():
                break
            continue
        conn.close()
        accepted += 1
        # A select() per accept would cost about as much as the accept; EOF is looked for now and then.
        if accepted % 4096 == 0 and _stdin_closed():
            break
    return 0


def connect(port: int, seconds: float) -> int:
    """Open and reset connections to ``port`` as fast as possible for ``seconds`` after "go"."""
    _say("READY")
    if not _wait_for_go():
        return 0
    address = (LOOPBACK, port)
    made = failed = 0
    started = time.monotonic()
    deadline = started + seconds
    while time.monotonic() < deadline and not (made % 4096 == 0 and _stdin_closed()):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, CONNECT_TIMEOUT)
        try:
            sock.connect(address)
            made += 1
        except OSError:
            failed += 1
        sock.close()
    _say("DONE", made=made, failed=failed, seconds=time.monotonic() - started)
    return 0


def flood(port: int, seconds: float, rate: int, steady: bool) -> int:
    """Hold a small-backlog listener that never accepts, and send it ``rate`` SYNs/s after "go", in
    bursts (FLOOD_ON s on, FLOOD_OFF s off) or, with ``steady``, all along."""
    listener = _listen((LOOPBACK, port), FLOOD_BACKLOG)
    _say("READY")
    if not _wait_for_go():
        return 0
    held: list[socket.socket] = []
    sent = bursts = 0
    per_slice = rate // 100  # paced in 10 ms slices, so a burst is a steady rate, not one spike
    on, off = (seconds, 0.0) if steady else (FLOOD_ON, FLOOD_OFF)
    started = time.monotonic()
    deadline = started + seconds
    while (now := time.monotonic()) < deadline and not _stdin_closed():
        phase = (now - started) % (on + off)
        if phase >= on:
            _sleep_until(min(now + on + off - phase, deadline))
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
        _sleep_until(now + 0.01)
    for sock in held:
        sock.close()
    listener.close()
    _say("DONE", syns=sent, bursts=bursts)
    return 0


def churn(count: int, seconds: float) -> int:
    """After "go", open ``count`` listeners and close them again, in waves, for ``seconds``."""
    _raise_nofile(count + 64)
    addresses = _addresses(count, CHURN_NET)
    _say("READY")
    if not _wait_for_go():
        return 0
    deadline = time.monotonic() + seconds
    waves = opened = peak = 0
    while time.monotonic() < deadline:
        held: list[socket.socket] = []
        step = CHURN_RISE * CHURN_BATCH / count
        for first in range(0, count, CHURN_BATCH):
            if time.monotonic() >= deadline:
                break
            batch_started = time.monotonic()
            held += [_listen(address, 128) for address in addresses[first:first + CHURN_BATCH]]
            _sleep_until(batch_started + step)
        opened += len(held)
        peak = max(peak, len(held))
        if _stdin_closed(min(CHURN_HOLD, max(deadline - time.monotonic(), 0.0))):
            break
        step = CHURN_FALL * CHURN_BATCH / count
        for first in range(0, len(held), CHURN_BATCH):
            batch_started = time.monotonic()
            for sock in held[first:first + CHURN_BATCH]:
                sock.close()
            _sleep_until(min(batch_started + step, deadline))
        waves += 1
        _sleep_until(min(time.monotonic() + CHURN_PAUSE, deadline))
    _say("DONE", waves=waves, opened=opened, peak=peak)
    return 0


# --- processes the benchmark runs ------------------------------------------------------------------------

class Failed(Exception):
    """A helper or the daemon did not do its part; the message says which and how."""


class Helper:
    """One helper mode of this script, run inside the namespace, talking in lines on stdin/stdout."""

    def __init__(self, namespace: str, mode: str, *args: str) -> None:
        self.mode = mode
        command = ["ip", "netns", "exec", namespace, sys.executable, str(Path(__file__).resolve()),
                   "--helper", mode, *args]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.process.pid  # `ip netns exec` execs the command, so this is the helper itself
        # A reader thread, because select() on a buffered pipe misses lines already read into the buffer.
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def expect(self, word: str, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise Failed(f"{self.mode} helper said nothing within {timeout:.0f} s (waiting for {word})") from None
        if line is None or not line.startswith(word):
            raise Failed(f"{self.mode} helper: expected {word}, got {line!r} (exit status {self.process.poll()})")
        fields: dict[str, Any] = json.loads(line[len(word):] or "{}")
        return fields

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def close_stdin(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(BrokenPipeError):  # it already exited
                self.process.stdin.close()

    def stop(self) -> None:
        """EOF on stdin, then SIGTERM: a client or churner in the middle of its run does not read stdin."""
        self.close_stdin()
        for signum in (None, signal.SIGTERM, signal.SIGKILL):
            if signum is not None:
                self.process.send_signal(signum)
            try:
                self.process.wait(timeout=HELPER_GRACE)
                return
            except subprocess.TimeoutExpired:
                continue


class NotifyListener:
    """The NOTIFY_SOCKET end of sd_notify, as systemd would hold it: when each message arrived."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        # The reader may be kept off the CPU for a moment; the daemon must not block on a full queue.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stopping.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            arrived = time.monotonic()
            with self.lock:
                self.messages += [(arrived, line) for line in data.decode(errors="replace").splitlines()]

    def times(self, prefix: str) -> list[float]:
        with self.lock:
            return [at for at, line in self.messages if line.startswith(prefix)]

    def wait_for(self, prefix: str, timeout: float, alive: Daemon) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := self.times(prefix):
                return found[0]
            if alive.process.poll() is not None:
                raise Failed(f"the daemon exited with status {alive.process.returncode} before {prefix}\n"
                             + alive.log_tail())
            time.sleep(0.05)
        raise Failed(f"the daemon sent no {prefix} within {timeout:.0f} s\n" + alive.log_tail())

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=2)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class Daemon:
    """`aqtune run --dry-run` on the benchmark's namespace, with its notifications and log captured."""

    def __init__(self, workdir: Path, label: str, namespace: str, ebpf: bool) -> None:
        self.log_path = workdir / f"daemon-{label}.log"
        self.notify = NotifyListener(str(workdir / f"notify-{label}.sock"))
        command = [sys.executable, "-m", "aqtune", "run", "--dry-run", "--config", str(workdir / "policy.toml"),
                   "--netns", namespace, "--state-dir", str(workdir / f"state-{label}")]
        if not ebpf:
            command.append("--no-ebpf")
        if shutil.which("setpriv"):
            # A benchmark killed outright must not leave a daemon running on a shared machine.
            command = ["setpriv", "--pdeathsig", "TERM", "--", *command]
        env = {**os.environ, "NOTIFY_SOCKET": self.notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC),
               "AQTUNE_LOG": "console"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid  # setpriv execs the command
        self.ready_at = 0.0

    def wait_ready(self) -> None:
        self.ready_at = self.notify.wait_for("READY=1", READY_TIMEOUT, self)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def run_queue_seconds(self) -> float:
        """Time the main thread spent runnable but not running (/proc/PID/schedstat, second field):
        tells a daemon that is slow from one that is starved of CPU."""
        with open(f"/proc/{self.pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise Failed(f"no VmRSS in /proc/{self.pid}/status")

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  | {line}" for line in text[-lines:])

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise Failed(f"the daemon exited with status {self.process.returncode}\n" + self.log_tail())

    def stop(self) -> None:
        """SIGTERM, as systemd stops it; safe to call again."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
        self.notify.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads; readable until it is reaped, so also just after it exits."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # comm may contain spaces and parentheses; the fields resume after the last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@contextlib.contextmanager
def scratch_namespace() -> Iterator[str]:
    name = f"aqt-bench-load-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


class Processes:
    """Everything started for one phase, stopped in reverse order whatever happens: the load goes
    before the daemon, so a daemon starved by it is not what holds up the cleanup."""

    def __init__(self) -> None:
        self.started: list[Helper | Daemon] = []

    def helper(self, namespace: str, mode: str, *args: str) -> Helper:
        helper = Helper(namespace, mode, *args)
        self.started.append(helper)
        return helper

    def daemon(self, workdir: Path, label: str, namespace: str, ebpf: bool) -> Daemon:
        """A daemon that has said READY=1 (it compiles and attaches its eBPF program first)."""
        daemon = Daemon(workdir, label, namespace, ebpf)
        self.started.append(daemon)
        daemon.wait_ready()
        return daemon

    def cpu_times(self) -> dict[int, float]:
        """CPU seconds of everything started so far and not yet reaped, by pid."""
        times = {}
        for process in self.started:
            with contextlib.suppress(FileNotFoundError):
                times[process.pid] = cpu_seconds(process.pid)
        return times

    def stop_all(self) -> None:
        for process in self.started:
            if isinstance(process, Helper):
                process.close_stdin()  # all of them at once: each then exits while the others are waited for
        for process in reversed(self.started):
            process.stop()
        self.started = []


# --- measuring ---------------------------------------------------------------------------------------------

def read_proc_table(path: str, section: str) -> dict[str, int]:
    """One section of /proc/net/snmp or /proc/net/netstat (header line, then value line)."""
    with open(path) as f:
        rows = [line.split() for line in f if line.startswith(section + ":")]
    return dict(zip(rows[0][1:], map(int, rows[1][1:]), strict=True)) if len(rows) >= 2 else {}


def host_cpu() -> tuple[int, int, int, int]:
    """(process time, interrupt time, steal, total) in jiffies over all CPUs, from /proc/stat.

    Interrupt time is kept apart: with IRQ time accounting, softirq work (where loopback TCP is
    processed) is not charged to any process, so it would otherwise pass for other processes' load.
    """
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return user + nice + system, irq + softirq, steal, sum(values)


@dataclass(frozen=True, slots=True)
class IdleResult:
    ebpf: bool
    cpu_percent: float
    seconds: float
    sweeps: int
    rss_kib: int


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # seconds since the load started
    cpu: float  # the daemon's CPU seconds so far
    rss_kib: int
    passive_opens: int
    overflows: int
    listen_drops: int  # SYNs (and handshake ACKs) dropped at full queues in the namespace
    waited: float  # seconds the daemon's main thread spent runnable but waiting for a CPU, so far


@dataclass(frozen=True, slots=True)
class LoadResult:
    seconds: float
    baseline_rate: float
    completed: int  # handshakes completed in the namespace over the window (PassiveOpens)
    dropped: int  # connection attempts dropped at full queues over the window (ListenDrops)
    made: int  # connect() calls that succeeded, over the clients' own time
    failed: int
    per_second_min: int
    per_second_max: int
    flood: dict[str, Any]
    steady: dict[str, Any]
    overflows: int
    churn: dict[str, Any]
    pings: int
    max_gap: float
    missed: int
    rss_warm_kib: int
    rss_end_kib: int
    rss_peak_kib: int
    cpu_percent: float
    cpu_peak_percent: float
    waited_percent: float  # of the window, waiting on a run queue
    sweeps: int
    episodes: int
    sweep_failures: int
    host_busy_percent: float  # of all CPUs: processes and interrupts
    host_irq_percent: float  # interrupts and softirqs (mostly the loopback traffic itself)
    host_steal_percent: float
    ours_percent: float  # of all CPUs, the daemon's and the helpers' process time
    others_percent: float  # of all CPUs, the process time of everything else on the host
    after_cpu_percent: float  # the daemon's CPU use once the load has stopped
    after_sweeps: int

    @property
    def rate(self) -> float:
        return self.completed / self.seconds

    @property
    def attempt_rate(self) -> float:
        return (self.completed + self.dropped) / self.seconds

    @property
    def growth(self) -> float:
        return 100.0 * (self.rss_end_kib - self.rss_warm_kib) / self.rss_warm_kib


def measure_idle(namespace: str, workdir: Path, seconds: float) -> list[IdleResult]:
    results = []
    processes = Processes()
    try:
        holder = processes.helper(namespace, "hold", "--count", str(IDLE_LISTENERS))
        holder.expect("READY", READY_TIMEOUT)
        for ebpf in (True, False):
            label = "idle-ebpf" if ebpf else "idle-no-ebpf"
            daemon = processes.daemon(workdir, label, namespace, ebpf)
            holder.send("open")
            opened = holder.expect("OPEN", READY_TIMEOUT)["listeners"]
            _sleep_until(daemon.ready_at + IDLE_WARMUP)
            daemon.check_alive()
            cpu, sweeps, took = cpu_share(daemon, seconds)
            result = IdleResult(ebpf, cpu, took, sweeps, daemon.rss_kib())
            results.append(result)
            key = "idle_cpu" if ebpf else "idle_cpu_no_ebpf"
            print(f"idle ({opened} listeners, {'eBPF on' if ebpf else '--no-ebpf'}): {key}={cpu:.2f}% of a core"
                  f"{f' (target < {TARGET_IDLE_CPU:g}%)' if ebpf else ''} over {took:.0f} s; {sweeps} sweeps, "
                  f"{_per_sweep_ms(cpu, took, sweeps)} CPU per sweep; rss {result.rss_kib / 1024:.1f} MiB",
                  flush=True)
            daemon.stop()
            holder.send("close")
            holder.expect("CLOSED", READY_TIMEOUT)
    finally:
        processes.stop_all()
    return results


def _per_sweep_ms(cpu_percent: float, seconds: float, sweeps: int) -> str:
    return f"{cpu_percent / 100 * seconds / sweeps * 1000:.0f} ms" if sweeps else "n/a"


def generator_rate(processes: Processes, namespace: str, clients: int, seconds: float) -> float:
    """Connections per second the clients make over ``seconds``."""
    helpers = [processes.helper(namespace, "connect", "--port", str(LOAD_PORT), "--seconds", str(seconds))
               for _ in range(clients)]
    for helper in helpers:
        helper.expect("READY", READY_TIMEOUT)
    for helper in helpers:
        helper.send("go")
    done = [helper.expect("DONE", seconds + READY_TIMEOUT) for helper in helpers]
    return float(sum(d["made"] for d in done) / max(d["seconds"] for d in done))


def cpu_share(daemon: Daemon, seconds: float) -> tuple[float, int, float]:
    """The daemon's CPU use over the next ``seconds``: (% of one core, sweeps, wall seconds)."""
    started, before = time.monotonic(), daemon.cpu_seconds()
    time.sleep(seconds)
    ended, after = time.monotonic(), daemon.cpu_seconds()
    daemon.check_alive()
    sweeps = sum(started <= at < ended for at in daemon.notify.times("STATUS="))
    return 100.0 * (after - before) / (ended - started), sweeps, ended - started


def watchdog_gaps(pings: list[float], start: float, end: float) -> list[float]:
    """Gaps between pings over [start, end], counting from the last ping before ``start`` and up to
    ``end``: a daemon that stopped pinging near either edge shows too."""
    before = [at for at in pings if at < start]
    inside = [at for at in pings if start <= at <= end]
    edges = ([before[-1]] if before else [start]) + inside + [end]
    return [b - a for a, b in itertools.pairwise(edges)]


def rss_median(samples: list[Sample], first: float, last: float) -> int:
    """Median VmRSS over [first, last] s: the churn swings RSS within a wave, and a single sample
    would measure where in its wave it fell rather than growth."""
    return int(statistics.median(s.rss_kib for s in samples if first <= s.at <= last))


def measure_load(namespace: str, workdir: Path, seconds: float, servers: int, clients: int,
                 churn_listeners: int) -> LoadResult:
    processes = Processes()
    try:
        server_helpers = [processes.helper(namespace, "serve", "--port", str(LOAD_PORT)) for _ in range(servers)]
        for helper in server_helpers:
            helper.expect("READY", READY_TIMEOUT)
        baseline = generator_rate(processes, namespace, clients, BASELINE_SECONDS)
        print(f"load: generator alone ({servers} servers, {clients} clients, no daemon): "
              f"baseline_rate={baseline:,.0f} conn/s", flush=True)

        daemon = processes.daemon(workdir, "load", namespace, ebpf=True)
        load = [processes.helper(namespace, "connect", "--port", str(LOAD_PORT), "--seconds", str(seconds))
                for _ in range(clients)]
        flooder = processes.helper(namespace, "flood", "--port", str(FLOOD_PORT), "--seconds", str(seconds),
                                   "--rate", str(FLOOD_RATE))
        steady = processes.helper(namespace, "flood", "--port", str(STEADY_PORT), "--seconds", str(seconds),
                                  "--rate", str(STEADY_RATE), "--steady")
        churner = (processes.helper(namespace, "churn", "--count", str(churn_listeners), "--seconds", str(seconds))
                   if churn_listeners else None)
        started = [*load, flooder, steady, *([churner] if churner else [])]
        for helper in started:
            helper.expect("READY", READY_TIMEOUT)
        counters = f"/proc/{server_helpers[0].pid}/net"  # a process inside the namespace: its counters
        host_before, ours_before = host_cpu(), processes.cpu_times()
        for helper in started:
            helper.send("go")
        start = time.monotonic()
        samples = [_sample(daemon, counters, start)]
        for second in range(1, int(seconds) + 1):
            _sleep_until(start + second)
            daemon.check_alive()
            samples.append(_sample(daemon, counters, start))
        end = start + samples[-1].at
        host_after, ours_after = host_cpu(), processes.cpu_times()
        done = [helper.expect("DONE", READY_TIMEOUT) for helper in load]
        flooded = flooder.expect("DONE", READY_TIMEOUT)
        steadied = steady.expect("DONE", READY_TIMEOUT)
        churned = churner.expect("DONE", READY_TIMEOUT) if churner else {"waves": 0, "opened": 0, "peak": 0}
        # Trouble over, cost should fall back towards the idle figure ("cost proportional to trouble").
        time.sleep(AFTER_SETTLE)
        after_cpu, after_sweeps, _ = cpu_share(daemon, AFTER_SECONDS)
        pings = daemon.notify.times("WATCHDOG=1")
        sweeps = sum(start <= at <= end for at in daemon.notify.times("STATUS="))
        daemon.stop()
    finally:
        processes.stop_all()

    _write_samples(workdir / "load-samples.tsv", samples)
    gaps = watchdog_gaps(pings, start, end)
    per_second = [b.passive_opens - a.passive_opens for a, b in itertools.pairwise(samples)]
    cpu_per_second = [100.0 * (b.cpu - a.cpu) / (b.at - a.at) for a, b in itertools.pairwise(samples)]
    log = daemon.log_path.read_text(errors="replace")
    processes_time, irq, steal, total = (after - before for after, before in zip(host_after, host_before, strict=True))
    total = max(total, 1)
    ours = sum(ours_after[pid] - ours_before[pid] for pid in ours_after.keys() & ours_before.keys()) * CLOCK_TICKS
    return LoadResult(
        seconds=samples[-1].at, baseline_rate=baseline,
        completed=samples[-1].passive_opens - samples[0].passive_opens,
        dropped=samples[-1].listen_drops - samples[0].listen_drops, made=sum(d["made"] for d in done),
        failed=sum(d["failed"] for d in done), per_second_min=min(per_second), per_second_max=max(per_second),
        flood=flooded, steady=steadied, overflows=samples[-1].overflows - samples[0].overflows, churn=churned,
        pings=sum(start <= at <= end for at in pings), max_gap=max(gaps),
        missed=sum(gap > WATCHDOG_USEC / 1e6 for gap in gaps),
        rss_warm_kib=rss_median(samples, RSS_WARM_AT - RSS_WINDOW / 2, RSS_WARM_AT + RSS_WINDOW / 2),
        rss_end_kib=rss_median(samples, samples[-1].at - RSS_WINDOW, samples[-1].at),
        rss_peak_kib=max(s.rss_kib for s in samples),
        cpu_percent=100.0 * (samples[-1].cpu - samples[0].cpu) / samples[-1].at,
        cpu_peak_percent=max(cpu_per_second), sweeps=sweeps,
        waited_percent=100.0 * (samples[-1].waited - samples[0].waited) / samples[-1].at,
        episodes=len(re.findall(r"dropped \d+ connections? in", log)), sweep_failures=log.count("sweep failed"),
        host_busy_percent=100.0 * (processes_time + irq) / total, host_irq_percent=100.0 * irq / total,
        host_steal_percent=100.0 * steal / total, ours_percent=100.0 * ours / total,
        others_percent=100.0 * max(processes_time - ours, 0) / total,
        after_cpu_percent=after_cpu, after_sweeps=after_sweeps,
    )


def _sample(daemon: Daemon, counters: str, start: float) -> Sample:
    tcp_ext = read_proc_table(f"{counters}/netstat", "TcpExt")
    return Sample(time.monotonic() - start, daemon.cpu_seconds(), daemon.rss_kib(),
                  read_proc_table(f"{counters}/snmp", "Tcp").get("PassiveOpens", 0),
                  tcp_ext.get("ListenOverflows", 0), tcp_ext.get("ListenDrops", 0), daemon.run_queue_seconds())


def _write_samples(path: Path, samples: list[Sample]) -> None:
    """The per-second series, for --keep: RSS and CPU over the load, next to the daemon's log."""
    lines = ["seconds\tdaemon_cpu_s\tdaemon_waited_s\trss_kib\tpassive_opens\tlisten_overflows\tlisten_drops"]
    lines += [f"{s.at:.2f}\t{s.cpu:.2f}\t{s.waited:.2f}\t{s.rss_kib}\t{s.passive_opens}\t{s.overflows}"
              f"\t{s.listen_drops}" for s in samples]
    path.write_text("\n".join(lines) + "\n")


def print_load(result: LoadResult, servers: int, clients: int) -> None:
    print(f"load: {result.seconds:.0f} s with the daemon (eBPF on, dry-run), {servers} servers, {clients} clients, "
          f"{'listener churn, ' if result.churn['waves'] else ''}SYN floods:", flush=True)
    print(f"  rate={result.rate:,.0f} conn/s (target >= {TARGET_RATE:,}): {result.completed:,} handshakes completed "
          f"(PassiveOpens), {result.made:,} connects made by the clients and {result.failed:,} failed; per second "
          f"{result.per_second_min:,}-{result.per_second_max:,}; generator alone {result.baseline_rate:,.0f}/s")
    print(f"  attempts={result.attempt_rate:,.0f}/s: those handshakes plus {result.dropped / result.seconds:,.0f}/s "
          f"dropped at full queues (ListenDrops)")
    print(f"  floods at backlog-{FLOOD_BACKLOG} listeners that never accept: {result.flood['syns']:,} SYNs in "
          f"{result.flood['bursts']} bursts and {result.steady['syns']:,} steadily; ListenOverflows "
          f"+{result.overflows:,}; drop episodes logged {result.episodes}")
    if result.churn["waves"]:
        print(f"  churn: {result.churn['waves']} waves of up to {result.churn['peak']:,} listeners "
              f"({result.churn['opened']:,} opened and closed)")
    else:
        print("  churn: none (--churn 0)")
    print(f"  watchdog: {result.pings} pings, max_gap={result.max_gap:.2f} s, missed={result.missed} "
          f"(WATCHDOG_USEC={WATCHDOG_USEC}, pings due every {WATCHDOG_USEC / 2e6:g} s)")
    print(f"  rss_warm={result.rss_warm_kib / 1024:.1f} MiB (median over {RSS_WARM_AT - RSS_WINDOW / 2:g}-"
          f"{RSS_WARM_AT + RSS_WINDOW / 2:g} s) rss_end={result.rss_end_kib / 1024:.1f} MiB (the last "
          f"{RSS_WINDOW:g} s) growth={result.growth:+.1f}% (target < {TARGET_RSS_GROWTH:g}%); "
          f"peak {result.rss_peak_kib / 1024:.1f} MiB")
    print(f"  daemon_cpu={result.cpu_percent:.0f}% of a core on average (busiest second "
          f"{result.cpu_peak_percent:.0f}%); {result.sweeps} sweeps "
          f"({_per_sweep_ms(result.cpu_percent, result.seconds, result.sweeps)} CPU each), "
          f"{result.sweep_failures} failed; runnable but waiting for a CPU {result.waited_percent:.0f}% of the time")
    print(f"  after the load ({AFTER_SETTLE:g} s later, over {AFTER_SECONDS:g} s): after_load_cpu="
          f"{result.after_cpu_percent:.2f}% of a core, {result.after_sweeps} sweeps "
          f"({_per_sweep_ms(result.after_cpu_percent, AFTER_SECONDS, result.after_sweeps)} CPU each)")
    print(f"  host: {result.host_busy_percent:.0f}% of all CPUs busy: the daemon and the benchmark's helpers "
          f"{result.ours_percent:.0f}%, interrupts (the loopback traffic) {result.host_irq_percent:.0f}%, other "
          f"processes {result.others_percent:.0f}%; {result.host_steal_percent:.0f}% stolen by the hypervisor",
          flush=True)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISSED"


def print_summary(idle: list[IdleResult], load: LoadResult | None) -> None:
    rows: list[tuple[str, str, str, str]] = []
    for result in idle:
        if result.ebpf:
            rows.append(("idle CPU, 1,000 listeners, eBPF on", f"{result.cpu_percent:.2f}% of a core",
                         f"< {TARGET_IDLE_CPU:g}%", _verdict(result.cpu_percent < TARGET_IDLE_CPU)))
        else:
            rows.append(("idle CPU, 1,000 listeners, --no-ebpf", f"{result.cpu_percent:.2f}% of a core",
                         "(comparison)", ""))
    if load is not None:
        rows += [
            ("connections per second under load", f"{load.rate:,.0f}/s", f">= {TARGET_RATE:,}/s",
             _verdict(load.rate >= TARGET_RATE)),
            ("connection attempts, drops included", f"{load.attempt_rate:,.0f}/s", "(information)", ""),
            ("watchdog: longest gap between pings", f"{load.max_gap:.2f} s", f"<= {WATCHDOG_USEC / 1e6:g} s",
             _verdict(load.missed == 0)),
            ("RSS growth after warm-up", f"{load.growth:+.1f}%", f"< {TARGET_RSS_GROWTH:g}%",
             _verdict(load.growth < TARGET_RSS_GROWTH)),
            ("daemon CPU under load", f"{load.cpu_percent:.0f}% of a core", "(information)", ""),
            ("idle CPU after the load", f"{load.after_cpu_percent:.2f}% of a core", f"< {TARGET_IDLE_CPU:g}%",
             _verdict(load.after_cpu_percent < TARGET_IDLE_CPU)),
        ]
    width = max(len(row[0]) for row in rows)
    print("\n== summary ==")
    for name, value, target, verdict in rows:
        print(f"{name:<{width}}  {value:>18}  {target:<13} {verdict}".rstrip())
    if load is not None and load.rate < TARGET_RATE:
        print(f"note: {load.rate:,.0f} connections/s is what this machine reached with the daemon and the rest of the "
              f"load on its {os.cpu_count()} CPUs ({load.host_busy_percent:.0f}% busy, "
              f"{load.others_percent:.0f}% with other processes); the generator alone reached "
              f"{load.baseline_rate:,.0f}/s, so the {TARGET_RATE:,}/s target was not reached here"
              + (" even without aqtune." if load.baseline_rate < TARGET_RATE else "."))
    sys.stdout.flush()


# --- main ----------------------------------------------------------------------------------------------------

def _terminate(signum: int, _frame: object) -> None:
    # Turn SIGTERM into an exception so the finally blocks remove the namespace, helpers and daemon.
    raise KeyboardInterrupt(f"signal {signum}")


def _write_policy(workdir: Path) -> None:
    """The shipped policy with the metrics file moved into the work directory (its cost stays measured)."""
    text = POLICY.read_text()
    text, found = re.subn(r'(?m)^textfile = .*$', f'textfile = "{workdir / "aqtune.prom"}"', text)
    if found != 1:
        raise Failed(f"{POLICY}: no [metrics] textfile line to redirect")
    (workdir / "policy.toml").write_text(text)


def run_helper(args: argparse.Namespace) -> int:
    modes = {
        "hold": lambda: hold(args.count),
        "serve": lambda: serve(args.port),
        "connect": lambda: connect(args.port, args.seconds),
        "flood": lambda: flood(args.port, args.seconds, args.rate, args.steady),
        "churn": lambda: churn(args.count, args.seconds),
    }
    try:
        return modes[args.helper]()
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the benchmark reports it once
        return 130


def main() -> int:
    parser = argparse.ArgumentParser(description="aqtune daemon: idle CPU, and watchdog, memory and CPU under load")
    parser.add_argument("--phases", nargs="+", choices=["idle", "load"], default=["idle", "load"])
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="idle measurement (default 30)")
    parser.add_argument("--load-seconds", type=float, default=60.0, help="load duration (default 60)")
    parser.add_argument("--servers", type=int, default=2, help="accepting processes (default 2)")
    parser.add_argument("--clients", type=int, default=2, help="connecting processes (default 2)")
    parser.add_argument("--churn", type=int, default=CHURN_LISTENERS, metavar="N",
                        help=f"listeners per churn wave (default {CHURN_LISTENERS:,}; 0: no churn)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (daemon logs, state)")
    parser.add_argument("--helper", choices=["hold", "serve", "connect", "flood", "churn"], help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--steady", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.helper:
        return run_helper(args)
    if os.geteuid() != 0:
        print("daemon_load.py: needs root (it creates a network namespace and runs aqtune)", file=sys.stderr)
        return 1
    if not (5 <= args.idle_seconds <= 600 and RSS_WARM_AT + RSS_WINDOW <= args.load_seconds <= 600
            and 1 <= args.servers <= 16 and 1 <= args.clients <= 16 and 0 <= args.churn <= 50_000):
        parser.error(f"--idle-seconds must be 5-600, --load-seconds {RSS_WARM_AT + RSS_WINDOW:g}-600, "
                     "--servers and --clients 1-16, --churn 0-50000")
    signal.signal(signal.SIGTERM, _terminate)
    print(f"# aqtune daemon load benchmark: kernel {platform.release()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}",
          flush=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"aqt-bench-load-{os.getpid()}-"))
    idle: list[IdleResult] = []
    load: LoadResult | None = None
    try:
        _write_policy(workdir)
        with scratch_namespace() as namespace:
            if "idle" in args.phases:
                idle = measure_idle(namespace, workdir, args.idle_seconds)
            if "load" in args.phases:
                load = measure_load(namespace, workdir, args.load_seconds, args.servers, args.clients, args.churn)
                print_load(load, args.servers, args.clients)
    except KeyboardInterrupt:
        print("interrupted; namespace, helpers and daemon removed", file=sys.stderr)
        return 130
    except (Failed, OSError, subprocess.SubprocessError) as exc:
        print(f"daemon_load.py: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"# work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_summary(idle, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
