#!/usr/bin/python3
"""Daemon load benchmark: what `aqtune run` costs when idle, and whether it and the workload keep up under load.

    /usr/bin/python3 bench/daemon_load.py [--idle-seconds 120] [--load-seconds 60] [--phases idle load]   (as root)

Everything happens in a network namespace ``aqt-bench-load-<pid>`` (loopback only); the daemon runs in
the host namespace as a service would, watching that namespace only (``--netns``), in dry-run with a
copy of etc/aqtune/policy.toml whose metrics file points into a temporary directory. The helpers are
tests/helpers/loadgen.py's modes.

idle   A helper holds 1,000 listeners that nobody connects to. The daemon starts, and once it says
       READY=1 the helper opens the listeners (as services do after a daemon started at boot, so eBPF
       sees their listen() calls); after a 5 s warm-up the daemon's CPU time (schedstat) is measured in
       rounds of 5 s over 30 s, and its memory (RSS, anonymous, file-backed) every second. Then again
       with --no-ebpf, the reference.
load   Two server processes accept on one SO_REUSEPORT port and clients open and reset short
       connections to it as fast as they can, while a churner opens 10,000 listeners and closes them
       again in waves, and two floods of SYNs hit backlog-8 listeners that never accept: one in bursts,
       so drop episodes open and close, one steady at 14,000/s, so one episode lasts the whole load.
       First --baseline-seconds of that without the daemon, then --load-seconds with the daemon (eBPF
       on), then --baseline-seconds without it again: the reference, what the workload does on this
       machine by itself, is both baselines' seconds together, because this VM's rate drifts by minutes
       (two consecutive 60 s runs of the load alone: 36,140 and 40,576/s) and one baseline before the
       daemon left the ratio to chance (0.88-0.95 in three runs). The daemon runs with
       NOTIFY_SOCKET (read here) and WATCHDOG_USEC=2000000: every WATCHDOG=1 is timed and the longest
       gap is checked against the 2 s period. The connection rate is handshakes completed per second in
       the namespace (its PassiveOpens counter); the daemon's CPU and memory are sampled every second.
       When the load stops, the daemon's CPU use is measured again: cost proportional to trouble means
       it falls back to the idle figure. It is measured from QUIET_PERIOD (10 s) after the load: until
       then the daemon still closes the load's findings and forgets its listeners, as it should.

Every figure is printed as it is measured and again, against its target, in a table at the end, and
written to bench/results/daemon_load-<time>.json; --keep leaves the work directory (daemon logs and
state, load-samples.tsv: CPU, memory and counters every second) for a closer look.
The namespace, helpers and daemon are removed whatever happens, Ctrl-C and SIGTERM included; helpers
also exit when their stdin closes, and the daemon gets SIGTERM if this process dies (setpriv
--pdeathsig). Nothing outside the namespace is changed. Exit status: 0 after a run whatever the
figures, 1 when a helper or the daemon failed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _path  # noqa: F401 - first: the repository's root on sys.path
from figures import Figure, Reference, Results, Target, refused_without_root
from probestats import ProgramCost, RunTimeCounting, costs, program_ids, program_runs
from procstat import CLOCK_TICKS, Memory, cpu_seconds, host_cpu, memory_kib, proc_table, run_queue_seconds

from aqtune.surfaces.daemon import QUIET_PERIOD
from tests.helpers.lineproto import HelperProcess, stop_all
from tests.helpers.loadgen import sleep_until
from tests.helpers.namespace import TestNamespace, wait_until
from tests.helpers.notify import NotifyListener
from tests.helpers.process import REPO
from tests.helpers.service import ServiceDaemon

POLICY = REPO / "etc" / "aqtune" / "policy.toml"

# Targets: issue 16 (idle, memory, the workload's rate, CPU under load) and the daemon's own promises.
IDLE_CPU_TARGET = Target("<=", 0.2, source="issue 16")  # % of one core, eBPF on, 1,000 quiet listeners
ANON_TARGET = Target("<=", 40.0, source="issue 16")  # MiB of private memory with eBPF at 1,000 listeners
KEPT_TARGET = Target(">=", 0.90, on_ratio=True, source="issue 16")  # the workload's rate with / without
LOAD_CPU_TARGET = Target("<=", 10.0, source="issue 16")  # % of one core under load
RSS_GROWTH_TARGET = Target("<", 10.0, source="no leak under load")  # %
WATCHDOG_USEC = 2_000_000  # under load: a tight period, so that a starved loop shows
# Idle: the shipped unit's WatchdogSec=30 (packaging/debian/aqtune.service), pings every 15 s, as the
# service runs; with the load's 2 s the loop would wake for a ping every second.
IDLE_WATCHDOG_USEC = 30_000_000
WATCHDOG_TARGET = Target("<=", WATCHDOG_USEC / 1e6, source="WATCHDOG_USEC")  # s between pings

IDLE_LISTENERS = 1000
# Idle means steady: the first sweeps after 1,000 listeners appear find their owners (a /proc scan) and
# fill the caches, which is start-up, not idling.
IDLE_WARMUP = 20.0
# Seconds per CPU sample when idle: one quiet sweep and one rewrite of the state and metrics (each
# every 10 s when nothing changes), so every round holds the same work.
CPU_ROUND = 10.0
# RSS growth compares the middle of the load with its end: a leak grows all along, while the heap's
# high-water mark rises in steps until a sweep has met the churn's 10,000-listener peak, which with
# sweeps ~4 s apart under max_cpu_percent 5 came 27-36 s into one run (70 -> 87 MiB, then flat for
# 25 s); measured from 15 s, that read as +24%.
RSS_WINDOW = 10.0  # seconds of samples each RSS figure is the median of
# After the load: wait, then measure the daemon's CPU again, in three rounds. The wait is the daemon's
# QUIET_PERIOD: the floods' findings clear and the listeners the churn closed are forgotten in the
# first sweeps after the load (7-18 ms each), and with two rounds from 5 s on the median (their mean)
# fell on either side of 0.2% from run to run (0.09-0.25%). The settling seconds are printed too.
AFTER_SETTLE, AFTER_SECONDS = QUIET_PERIOD, 30.0

LOAD_PORT = 18280
FLOOD_PORT, FLOOD_RATE = 18281, 2000  # SYNs/s during a burst
STEADY_PORT, STEADY_RATE = 18282, 14_000  # SYNs/s all along: one episode that lasts the whole load
CHURN_LISTENERS = 10_000
CONNECT_TIMEOUT = 1.0  # seconds: a dropped SYN must not stall a client

READY_TIMEOUT = 120.0  # the daemon compiles its eBPF program first: seconds on a busy machine
ANSWER_GRACE = 60.0  # seconds past a run's end that a helper may take to answer
STOP_TIMEOUT = 15.0  # for the daemon to finish its sweep and exit after SIGTERM


def _mib(kib: float) -> float:
    return kib / 1024


# --- the daemon ------------------------------------------------------------------------------------------------

class BenchDaemon(ServiceDaemon):
    """`aqtune run --dry-run` on the benchmark's namespace, as systemd runs it: NOTIFY_SOCKET read here,
    WATCHDOG_USEC set, its log in the work directory."""

    def __init__(self, workdir: Path, label: str, namespace: str, ebpf: bool,
                 watchdog_usec: int = WATCHDOG_USEC) -> None:
        self.notify = NotifyListener(workdir / f"notify-{label}.sock")
        args = ["--dry-run", "--config", str(workdir / "policy.toml"), "--netns", namespace,
                "--state-dir", str(workdir / f"state-{label}"), *([] if ebpf else ["--no-ebpf"])]
        # A benchmark killed outright must not leave a daemon running on a shared machine.
        prefix = ["setpriv", "--pdeathsig", "TERM", "--"] if shutil.which("setpriv") else []
        try:
            super().__init__(args, workdir / f"daemon-{label}.log", prefix=prefix, env={
                "NOTIFY_SOCKET": str(self.notify.path), "WATCHDOG_USEC": str(watchdog_usec), "AQTUNE_LOG": "console"})
        except BaseException:
            self.notify.close()
            raise
        try:
            self.ready_at = wait_until(self._ready_at, "READY=1", timeout=READY_TIMEOUT)
        except BaseException:
            self.kill()
            self.notify.close()
            raise

    def _ready_at(self) -> float | None:
        """When READY=1 arrived, or None; fails once the daemon exited."""
        if ready := self.notify.with_line("READY=1"):
            return ready[0].at
        self.check_alive()
        return None

    def times(self, line: str) -> list[float]:
        """When each notification with ``line`` (``KEY=``: with KEY) arrived."""
        if line.endswith("="):
            return [m.at for m in self.notify.with_key(line[:-1])]
        return [m.at for m in self.notify.with_line(line)]

    def cpu(self) -> float:
        return cpu_seconds([self.pid])

    def memory(self) -> Memory:
        return memory_kib(self.pid)

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(f"  | {line}" for line in self.lines()[-lines:])

    def check_alive(self) -> None:
        if (code := self.popen.poll()) is not None:
            raise AssertionError(f"the daemon exited with status {code}\n" + self.log_tail())

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            return super().stop(timeout)
        finally:
            self.notify.close()


def cpu_rounds(daemon: BenchDaemon, seconds: float) -> tuple[list[float], list[Memory], int]:
    """The daemon's CPU use over the next ``seconds``, in % of one core per CPU_ROUND, its memory every
    second, and how many sweeps it made."""
    started = time.monotonic()
    rounds, memory = [], []
    for _ in range(max(1, round(seconds / CPU_ROUND))):
        begun, before = time.monotonic(), daemon.cpu()
        for second in range(1, int(CPU_ROUND) + 1):
            sleep_until(begun + second)
            memory.append(daemon.memory())
        daemon.check_alive()
        rounds.append(100.0 * (daemon.cpu() - before) / (time.monotonic() - begun))
    sweeps = sum(started <= at for at in daemon.times("STATUS="))
    return rounds, memory, sweeps


# --- idle ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Idle:
    cpu: list[float]  # % of one core per round
    memory: list[Memory]
    sweeps: int
    seconds: float


def measure_idle(ns: TestNamespace, workdir: Path, seconds: float) -> dict[bool, Idle]:
    found: dict[bool, Idle] = {}
    holder = ns.spawn("loadgen.py", ["hold", "--count", str(IDLE_LISTENERS)], "READY")
    holder.ready(READY_TIMEOUT)
    try:
        for ebpf in (True, False):
            daemon = BenchDaemon(workdir, "idle-ebpf" if ebpf else "idle-no-ebpf", ns.name, ebpf,
                                 watchdog_usec=IDLE_WATCHDOG_USEC)
            try:
                opened = holder.request("open", timeout=READY_TIMEOUT)["listeners"]
                sleep_until(daemon.ready_at + IDLE_WARMUP)
                daemon.check_alive()
                cpu, memory, sweeps = cpu_rounds(daemon, seconds)
            finally:
                daemon.stop()
            idle = found[ebpf] = Idle(cpu, memory, sweeps, len(cpu) * CPU_ROUND)
            last = memory[-1]
            per_sweep = _per_sweep_ms(statistics.mean(cpu), idle.seconds, sweeps)
            print(f"idle ({opened} listeners, {'eBPF on' if ebpf else '--no-ebpf'}): "
                  f"{'idle_cpu' if ebpf else 'idle_cpu_no_ebpf'}={statistics.median(cpu):.2f}% of a core (median of "
                  f"{len(cpu)} rounds of {CPU_ROUND:g} s, {min(cpu):.2f}-{max(cpu):.2f}); {sweeps} sweeps, {per_sweep} "
                  f"CPU per sweep; rss {_mib(last.rss):.1f} MiB = anonymous {_mib(last.anon):.1f} + file "
                  f"{_mib(last.file):.1f} + shmem {_mib(last.shmem):.1f}", flush=True)
            holder.request("close", timeout=READY_TIMEOUT)
    finally:
        holder.close()
    return found


def idle_figures(idle: dict[bool, Idle], results: Results) -> None:
    ebpf, bare = idle.get(True), idle.get(False)
    if ebpf is None or bare is None:
        return
    listeners = f"{IDLE_LISTENERS:,} quiet listeners"
    results.add(Figure("idle_cpu_percent", f"daemon CPU, idle, {listeners}, eBPF on", "%", tuple(ebpf.cpu),
                       Reference("--no-ebpf", tuple(bare.cpu)), IDLE_CPU_TARGET,
                       note=f"rounds of {CPU_ROUND:g} s; {ebpf.sweeps} sweeps"))
    for key, what, target in (("rss", "resident memory", None), ("anon", "anonymous (private) memory", ANON_TARGET),
                              ("file", "file-backed memory (shared libraries)", None)):
        results.add(Figure(f"idle_{key}_mib", f"daemon {what}, idle, eBPF on", "MiB",
                           tuple(_mib(getattr(m, key)) for m in ebpf.memory),
                           Reference("--no-ebpf", tuple(_mib(getattr(m, key)) for m in bare.memory)), target,
                           note="sampled every second"))


def _per_sweep_ms(cpu_percent: float, seconds: float, sweeps: int) -> str:
    return f"{cpu_percent / 100 * seconds / sweeps * 1000:.0f} ms" if sweeps else "n/a"


# --- load ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # seconds since the load started
    passive_opens: int
    overflows: int
    listen_drops: int  # SYNs (and handshake ACKs) dropped at full queues in the namespace
    cpu: float = 0.0  # the daemon's CPU seconds so far (0 without a daemon)
    memory: Memory = field(default_factory=lambda: Memory(0, 0, 0, 0))
    waited: float = 0.0  # seconds the daemon's main thread spent runnable but waiting for a CPU, so far


@dataclass(frozen=True, slots=True)
class Window:
    """One run of the whole load, with or without the daemon."""

    start: float  # time.monotonic() when the load started
    samples: list[Sample]
    made: int
    failed: int
    flood: dict[str, Any]
    steady: dict[str, Any]
    churn: dict[str, Any]
    host: tuple[int, int, int, int]  # host_cpu() over the window
    ours: float  # CPU seconds of the daemon and the helpers over the window
    programs: list[ProgramCost] = field(default_factory=list)  # the daemon's eBPF programs, while counted

    @property
    def seconds(self) -> float:
        return self.samples[-1].at

    @property
    def per_second(self) -> list[int]:
        return [b.passive_opens - a.passive_opens for a, b in itertools.pairwise(self.samples)]

    @property
    def rate(self) -> float:
        return (self.samples[-1].passive_opens - self.samples[0].passive_opens) / self.seconds

    @property
    def dropped(self) -> int:
        return self.samples[-1].listen_drops - self.samples[0].listen_drops


def _sample(counters: str, start: float, daemon: BenchDaemon | None) -> Sample:
    tcp_ext = proc_table(f"{counters}/netstat", "TcpExt")
    opens = proc_table(f"{counters}/snmp", "Tcp").get("PassiveOpens", 0)
    at = time.monotonic() - start
    counted = (at, opens, tcp_ext.get("ListenOverflows", 0), tcp_ext.get("ListenDrops", 0))
    if daemon is None:
        return Sample(*counted)
    return Sample(*counted, daemon.cpu(), daemon.memory(), run_queue_seconds(daemon.pid))


def run_load(ns: TestNamespace, servers: list[HelperProcess], seconds: float, clients: int, churn: int,
             daemon: BenchDaemon | None, counting: bool = False) -> Window:
    """The whole load for ``seconds``, sampled every second; its own helpers, stopped at the end. With
    ``counting`` (the kernel's run-time counting on), what the daemon's eBPF programs cost over it."""
    load = [ns.spawn("loadgen.py", ["connect", "--port", str(LOAD_PORT), "--connect-timeout", str(CONNECT_TIMEOUT)],
                     "READY") for _ in range(clients)]
    flooder = ns.spawn("loadgen.py", ["synflood", "--port", str(FLOOD_PORT), "--rate", str(FLOOD_RATE)], "READY")
    steady = ns.spawn("loadgen.py", ["synflood", "--port", str(STEADY_PORT), "--rate", str(STEADY_RATE), "--steady"],
                      "READY")
    churner = ns.spawn("loadgen.py", ["churn", "--count", str(churn)], "READY") if churn else None
    started = [*load, flooder, steady, *([churner] if churner else [])]
    try:
        for helper in started:
            helper.ready(READY_TIMEOUT)
        measured = [*servers, *started]
        counters = f"/proc/{servers[0].pid}/net"  # a process inside the namespace: its counters
        pids = [helper.pid for helper in measured] + ([daemon.pid] if daemon else [])
        host_before, ours_before = host_cpu(), cpu_seconds(pids)
        programs = program_ids(daemon.pid) if daemon is not None and counting else set()
        for helper in started:
            helper.send(f"go {seconds}")
        start = time.monotonic()
        runs_before = program_runs(programs)
        samples = [_sample(counters, start, daemon)]
        for second in range(1, int(seconds) + 1):
            sleep_until(start + second)
            if daemon is not None:
                daemon.check_alive()
            samples.append(_sample(counters, start, daemon))
        host_after, ours_after = host_cpu(), cpu_seconds(pids)
        program_costs = costs(runs_before, program_runs(programs), time.monotonic() - start)
        done = [helper.expect("OK", ANSWER_GRACE) for helper in load]
        flooded, steadied = flooder.expect("OK", ANSWER_GRACE), steady.expect("OK", ANSWER_GRACE)
        churned = churner.expect("OK", ANSWER_GRACE) if churner else {"waves": 0, "opened": 0, "peak": 0}
    finally:
        stop_all(started)
    host = tuple(after - before for after, before in zip(host_after, host_before, strict=True))
    return Window(start, samples, sum(d["made"] for d in done), sum(d["failed"] for d in done), flooded, steadied,
                  churned, (host[0], host[1], host[2], max(host[3], 1)), ours_after - ours_before, program_costs)


@dataclass(frozen=True, slots=True)
class Load:
    baselines: tuple[Window, Window]  # the load without the daemon, before and after it ran
    window: Window
    pings: list[float]  # when each WATCHDOG=1 arrived
    sweeps: int
    episodes: int
    sweep_failures: int
    after_cpu: list[float]
    after_sweeps: int
    settle_cpu: float  # % of one core over the AFTER_SETTLE seconds right after the load

    @property
    def baseline_rates(self) -> tuple[float, ...]:
        """Per second, both baselines: the reference the rate with the daemon is compared with."""
        return tuple(float(rate) for window in self.baselines for rate in window.per_second)

    @property
    def gaps(self) -> list[float]:
        """Gaps between pings over the load, counting from the last ping before it and up to its end: a
        daemon that stopped pinging near either edge shows too."""
        start, end = self.window.start, self.window.start + self.window.seconds
        before = [at for at in self.pings if at < start]
        inside = [at for at in self.pings if start <= at <= end]
        edges = ([before[-1]] if before else [start]) + inside + [end]
        return [b - a for a, b in itertools.pairwise(edges)]


def measure_load(ns: TestNamespace, workdir: Path, args: argparse.Namespace) -> Load:
    servers = [ns.spawn("loadgen.py", ["serve", "--port", str(LOAD_PORT), "--reuseport"], "READY")
               for _ in range(args.servers)]
    try:
        for server in servers:
            server.ready(READY_TIMEOUT)
        before = _baseline(ns, servers, args, "before")
        daemon = BenchDaemon(workdir, "load", ns.name, ebpf=True)
        try:
            with _counting() as counting:
                window = run_load(ns, servers, args.load_seconds, args.clients, args.churn, daemon, counting)
            # Trouble over, cost should fall back towards the idle figure ("cost proportional to trouble").
            settle_from, settle_cpu = time.monotonic(), daemon.cpu()
            time.sleep(AFTER_SETTLE)
            settle = 100.0 * (daemon.cpu() - settle_cpu) / (time.monotonic() - settle_from)
            after_cpu, _, after_sweeps = cpu_rounds(daemon, AFTER_SECONDS)
            pings = daemon.times("WATCHDOG=1")
            sweeps = sum(window.start <= at <= window.start + window.seconds for at in daemon.times("STATUS="))
        finally:
            daemon.stop()
        after = _baseline(ns, servers, args, "after")
    finally:
        stop_all(servers)
    log = daemon.log_path.read_text(errors="replace")
    _write_samples(workdir / "load-samples.tsv", window.samples)
    return Load((before, after), window, pings, sweeps, len(re.findall(r"dropped \d+ connections? in", log)),
                log.count("sweep failed"), after_cpu, after_sweeps, settle)


@contextlib.contextmanager
def _counting() -> Iterator[bool]:
    """The kernel's run-time counting of eBPF programs on (True), or why not, printed (False)."""
    try:
        counting = RunTimeCounting()
    except OSError as exc:
        print(f"load: the probes' own cost is not measured: BPF_ENABLE_STATS refused ({exc.strerror})", flush=True)
        yield False
        return
    with counting:
        yield True


def _baseline(ns: TestNamespace, servers: list[HelperProcess], args: argparse.Namespace, when: str) -> Window:
    """The same load without the daemon (``when``: before or after it ran)."""
    baseline = run_load(ns, servers, args.baseline_seconds, args.clients, args.churn, None)
    print(f"load: without the daemon, {when} it ran ({args.servers} servers, {args.clients} clients, the same "
          f"floods and churn): baseline_rate={baseline.rate:,.0f} conn/s over {baseline.seconds:.0f} s", flush=True)
    return baseline


def _write_samples(path: Path, samples: list[Sample]) -> None:
    """The per-second series, for --keep: CPU and memory over the load, next to the daemon's log."""
    lines = ["seconds\tdaemon_cpu_s\tdaemon_waited_s\trss_kib\tanon_kib\tfile_kib\tpassive_opens\tlisten_overflows"
             "\tlisten_drops"]
    lines += [f"{s.at:.2f}\t{s.cpu:.2f}\t{s.waited:.2f}\t{s.memory.rss}\t{s.memory.anon}\t{s.memory.file}"
              f"\t{s.passive_opens}\t{s.overflows}\t{s.listen_drops}" for s in samples]
    path.write_text("\n".join(lines) + "\n")


def rss_median(samples: list[Sample], first: float, last: float) -> float:
    """Median VmRSS over [first, last] s: the churn swings RSS within a wave, and a single sample would
    measure where in its wave it fell rather than growth."""
    return statistics.median(s.memory.rss for s in samples if first <= s.at <= last)


def load_figures(load: Load, args: argparse.Namespace, results: Results) -> None:
    w, samples = load.window, load.window.samples
    cpu_per_second = [100.0 * (b.cpu - a.cpu) / (b.at - a.at) for a, b in itertools.pairwise(samples)]
    cpu_average = 100.0 * (samples[-1].cpu - samples[0].cpu) / w.seconds
    warm_at = w.seconds / 2
    warm = rss_median(samples, warm_at - RSS_WINDOW / 2, warm_at + RSS_WINDOW / 2)
    end = rss_median(samples, w.seconds - RSS_WINDOW, w.seconds)
    growth = 100.0 * (end - warm) / warm
    gaps = load.gaps
    results.add(Figure("load_rate", "the workload's connections/s with the daemon (PassiveOpens)", "/s",
                       tuple(map(float, w.per_second)),
                       Reference("same load, no daemon, before and after", load.baseline_rates),
                       KEPT_TARGET, note="per second"))
    results.add(Figure("load_cpu_percent", "daemon CPU under load, average", "%", tuple(cpu_per_second),
                       target=LOAD_CPU_TARGET, given=cpu_average, note=f"samples per second; {load.sweeps} sweeps"))
    if w.programs:
        each = "; ".join(f"{cost.name} {cost.per_second:.0f}/s x {cost.ns_per_run:.0f} ns" for cost in w.programs)
        results.add(Figure("load_probe_cpu_percent", "the daemon's eBPF programs under load, run time", "%",
                           (sum(cost.core_percent for cost in w.programs),), note=each,
                           extra={"programs": [asdict(cost) for cost in w.programs]}))
    results.add(Figure("load_anon_mib", "daemon anonymous (private) memory under load", "MiB",
                       tuple(_mib(s.memory.anon) for s in samples), note="per second"))
    results.add(Figure("rss_growth_percent", "daemon RSS growth under load, middle to end", "%", (growth,),
                       target=RSS_GROWTH_TARGET, note=f"medians {_mib(warm):.1f} -> {_mib(end):.1f} MiB"))
    results.add(Figure("watchdog_max_gap_s", "watchdog: longest gap between pings", "s", tuple(gaps),
                       target=WATCHDOG_TARGET, given=max(gaps), note="value: the longest gap"))
    results.add(Figure("after_load_cpu_percent", "daemon CPU once the load stopped", "%", tuple(load.after_cpu),
                       target=IDLE_CPU_TARGET, note=f"rounds of {CPU_ROUND:g} s, from {AFTER_SETTLE:g} s after"))

    per_second = w.per_second
    reference = statistics.mean(load.baseline_rates)
    print(f"load: {w.seconds:.0f} s with the daemon (eBPF on, dry-run), {args.servers} servers, {args.clients} "
          f"clients, {'listener churn, ' if w.churn['waves'] else ''}SYN floods:", flush=True)
    print(f"  rate={w.rate:,.0f} conn/s: {samples[-1].passive_opens - samples[0].passive_opens:,} handshakes "
          f"completed (PassiveOpens), {w.made:,} connects made by the clients and {w.failed:,} failed; per second "
          f"{min(per_second):,}-{max(per_second):,}; the same load without the daemon {reference:,.0f}/s, before and "
          f"after ({' and '.join(f'{b.rate:,.0f}' for b in load.baselines)}) (ratio {w.rate / reference:.3f}, target "
          f"{KEPT_TARGET.text('/s')})")
    print(f"  attempts={(w.rate * w.seconds + w.dropped) / w.seconds:,.0f}/s: those handshakes plus "
          f"{w.dropped / w.seconds:,.0f}/s dropped at full queues (ListenDrops)")
    print(f"  floods at backlog-8 listeners that never accept: {w.flood['syns']:,} SYNs in {w.flood['bursts']} "
          f"bursts and {w.steady['syns']:,} steadily; ListenOverflows "
          f"+{samples[-1].overflows - samples[0].overflows:,}; drop episodes logged {load.episodes}")
    if w.churn["waves"]:
        print(f"  churn: {w.churn['waves']} waves of up to {w.churn['peak']:,} listeners "
              f"({w.churn['opened']:,} opened and closed)")
    else:
        print("  churn: none (--churn 0)")
    inside = sum(w.start <= at <= w.start + w.seconds for at in load.pings)
    print(f"  watchdog: {inside} pings, max_gap={max(gaps):.2f} s, missed={sum(g > WATCHDOG_USEC / 1e6 for g in gaps)} "
          f"(WATCHDOG_USEC={WATCHDOG_USEC}, pings due every {WATCHDOG_USEC / 2e6:g} s)")
    last = samples[-1].memory
    print(f"  rss_warm={_mib(warm):.1f} MiB (median over {warm_at - RSS_WINDOW / 2:.0f}-"
          f"{warm_at + RSS_WINDOW / 2:.0f} s) rss_end={_mib(end):.1f} MiB (the last {RSS_WINDOW:g} s) "
          f"growth={growth:+.1f}%; peak {_mib(max(s.memory.rss for s in samples)):.1f} MiB; at the end anonymous "
          f"{_mib(last.anon):.1f} + file {_mib(last.file):.1f} + shmem {_mib(last.shmem):.1f} MiB")
    print(f"  daemon_cpu={cpu_average:.0f}% of a core on average (busiest second {max(cpu_per_second):.0f}%); "
          f"{load.sweeps} sweeps ({_per_sweep_ms(cpu_average, w.seconds, load.sweeps)} CPU each), "
          f"{load.sweep_failures} failed; runnable but waiting for a CPU "
          f"{100.0 * (samples[-1].waited - samples[0].waited) / w.seconds:.0f}% of the time")
    if w.programs:
        total = sum(cost.core_percent for cost in w.programs)
        print(f"  probes: {total:.1f}% of a core on top of the daemon's own CPU ("
              + ", ".join(f"{cost.name} {cost.per_second:,.0f}/s x {cost.ns_per_run:.0f} ns" for cost in w.programs)
              + "; the kernel's run-time counting, on over the load, adds two clock reads per run)")
    after = statistics.median(load.after_cpu)
    print(f"  after the load: {load.settle_cpu:.2f}% of a core over the first {AFTER_SETTLE:g} s (the load's findings "
          f"clear, its listeners are forgotten), then after_load_cpu={after:.2f}% over {AFTER_SECONDS:g} s (median of "
          f"{', '.join(f'{c:.2f}' for c in load.after_cpu)}), {load.after_sweeps} sweeps "
          f"({_per_sweep_ms(statistics.mean(load.after_cpu), AFTER_SECONDS, load.after_sweeps)} CPU each)")
    processes, irq, steal, total = w.host
    ours = w.ours * CLOCK_TICKS
    print(f"  host: {100.0 * (processes + irq) / total:.0f}% of all CPUs busy: the daemon and the benchmark's "
          f"helpers {100.0 * ours / total:.0f}%, interrupts (the loopback traffic) {100.0 * irq / total:.0f}%, other "
          f"processes {100.0 * max(processes - ours, 0) / total:.0f}%; {100.0 * steal / total:.0f}% stolen by the "
          "hypervisor", flush=True)


# --- main ----------------------------------------------------------------------------------------------------

def _write_policy(workdir: Path) -> None:
    """The shipped policy with the metrics file moved into the work directory (its cost stays measured)."""
    text = POLICY.read_text()
    text, found = re.subn(r'(?m)^textfile = .*$', f'textfile = "{workdir / "aqtune.prom"}"', text)
    if found != 1:
        raise RuntimeError(f"{POLICY}: no [metrics] textfile line to redirect")
    (workdir / "policy.toml").write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description="aqtune daemon: idle CPU and memory; watchdog, memory, CPU and the "
                                                 "workload's rate under load")
    parser.add_argument("--phases", nargs="+", choices=["idle", "load"], default=["idle", "load"])
    # 12 rounds: on a 2-CPU VM single rounds range 0.13-0.29% at 1,000 listeners; 6 left the median
    # on either side of 0.2% from run to run.
    parser.add_argument("--idle-seconds", type=float, default=120.0, help="idle measurement (default 120)")
    parser.add_argument("--load-seconds", type=float, default=60.0, help="load with the daemon (default 60)")
    parser.add_argument("--baseline-seconds", type=float, default=20.0,
                        help="the same load without the daemon, before and again after it (default 20 each)")
    parser.add_argument("--servers", type=int, default=2, help="accepting processes (default 2)")
    parser.add_argument("--clients", type=int, default=2, help="connecting processes (default 2)")
    parser.add_argument("--churn", type=int, default=CHURN_LISTENERS, metavar="N",
                        help=f"listeners per churn wave (default {CHURN_LISTENERS:,}; 0: no churn)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (daemon logs, state)")
    args = parser.parse_args()
    if refused_without_root("daemon_load.py", "it creates a network namespace and runs aqtune"):
        return 1
    if not (3 * CPU_ROUND <= args.idle_seconds <= 600 and 3 * RSS_WINDOW <= args.load_seconds <= 600
            and 5 <= args.baseline_seconds <= 600 and 1 <= args.servers <= 16 and 1 <= args.clients <= 16
            and 0 <= args.churn <= 50_000):
        parser.error(f"--idle-seconds must be {3 * CPU_ROUND:g}-600 (three rounds at least), --load-seconds "
                     f"{3 * RSS_WINDOW:g}-600, --baseline-seconds 5-600, --servers and --clients 1-16, "
                     "--churn 0-50000")
    print(f"# aqtune daemon load benchmark: kernel {platform.release()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}",
          flush=True)
    results = Results("daemon_load", vars(args))
    workdir = Path(tempfile.mkdtemp(prefix=f"aqt-bench-load-{os.getpid()}-"))

    def body() -> None:
        _write_policy(workdir)
        with TestNamespace(f"aqt-bench-load-{os.getpid()}") as ns:
            if "idle" in args.phases:
                idle_figures(measure_idle(ns, workdir, args.idle_seconds), results)
            if "load" in args.phases:
                load_figures(measure_load(ns, workdir, args), args, results)

    try:
        return results.run(body, "namespace, helpers and daemon")
    finally:
        if args.keep:
            print(f"# work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
