#!/usr/bin/python3
"""What a local user can make the daemon do: sweep time, CPU and memory with thousands of user namespaces
and a hundred thousand listeners (issue 12, finding 2).

    /usr/bin/python3 bench/attack_scale.py [--namespaces 2000] [--listeners 100000] [--seconds 60] [--quick]
                                           [--pad 1000000] [--ebpf] [--output FILE] [--keep]     (as root)

As an unprivileged user (nobody), tests/helpers/crowd.py creates --namespaces user+network namespaces
(``unshare``), each held by a sleeping process, and --listeners TCP listeners in one more, held by
processes whose command line is --pad bytes long; 100 of those listeners have a connection queued, so they
are the worst and listed. Then:

reference  The one-shot sweep of everything in-process (what `aqtune status --sweep` does), and what one
           namespace's TCP dump costs while the listeners exist elsewhere (each namespace's dump walks the
           kernel's host-wide listen table): the unbounded daemon paid that for every namespace, every sweep.
daemon     `aqtune run --dry-run` (eBPF off unless --ebpf) with the shipped policy, its metrics file in the
           work directory, WATCHDOG_USEC=30 s as the unit sets it and a NOTIFY_SOCKET read here. From
           READY=1 for --seconds: every WATCHDOG=1 is timed; the state file is read as it changes (sweep
           time, partial sweeps, which namespaces were read); the daemon's CPU (utime+stime) and, at the
           end, its memory from /proc/PID/status: VmRSS, RssAnon (its own heap: what users' objects cost),
           RssFile (shared libraries), VmHWM (the peak).

Prints each figure as it is measured and a summary against the targets, and writes them as JSON to
--output (default bench/results/attack_scale.json): each figure's value, unit, reference (the issue's
measurement before this work, where there is one), target and verdict. --quick runs 300 namespaces,
10,000 listeners for 20 s. Everything is removed on exit, Ctrl-C and SIGTERM included (the helpers end
when their stdin closes and take their children with them; the daemon runs under --pdeathsig);
--keep leaves the work directory (daemon log, state, metrics). Exit status 0 after a run whatever the
figures, 1 when a helper or the daemon failed, 2 when this host cannot run it.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import itertools
import json
import os
import platform
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aqtune.collect import netlink, netns, sockdiag  # noqa: E402
from aqtune.collect.sweep import sweep  # noqa: E402
from tests.helpers.notify import NotifyListener  # noqa: E402

CROWD = REPO / "tests" / "helpers" / "crowd.py"
POLICY = REPO / "etc" / "aqtune" / "policy.toml"
USER = "nobody"
WATCHDOG_USEC = 30_000_000  # packaging/debian/aqtune.service: WatchdogSec=30
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FILLED = 100  # listeners with a queued connection: the "1 MiB command line on 100 sockets"
DUMP_SAMPLE = 20  # empty namespaces whose forced TCP dump is timed for the reference
READY_TIMEOUT = 600.0
HELPER_LIFE = 3600
# Before this work (issue 12): 2,000 namespaces + 95k listeners, one sweep 33.7 s and a watchdog restart;
# 2,000 empty namespaces alone 0.83 of a core; 314 MB status.json and 643 MB daemon memory from a 1 MiB
# command line on 100 sockets.
BEFORE = {"sweep_max_s": 33.7, "cpu_percent": 83.0, "state_bytes": 314e6, "rss_mib": 643.0}


class Failed(Exception):
    pass


def as_user(*command: str) -> list[str]:
    group = grp.getgrgid(pwd.getpwnam(USER).pw_gid).gr_name
    return ["setpriv", f"--reuid={USER}", f"--regid={group}", "--clear-groups", *command]


def can_run() -> str | None:
    if os.geteuid() != 0:
        return "needs root: it runs the daemon and reads every namespace"
    for tool in ("setpriv", "unshare", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is needed"
    done = subprocess.run(as_user("unshare", "-rn", "true"), capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        return f"{USER} cannot create user namespaces here: {done.stderr.strip()}"
    return None


@dataclass
class Helper:
    process: subprocess.Popen[str]
    ready: dict[str, Any]

    @classmethod
    def start(cls, command: list[str], what: str) -> Helper:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert process.stdout is not None
            line = process.stdout.readline()  # the helper gives up by itself within its own limits
            if not line.startswith("READY "):
                raise Failed(f"{what} did not start: {line.strip() or 'no output'} (exit {process.poll()})")
            return cls(process, json.loads(line[len("READY "):]))
        except BaseException:
            stop(process)
            raise


def stop(process: subprocess.Popen[str]) -> None:
    if process.stdin is not None and not process.stdin.closed:
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@dataclass
class Figure:
    value: float | None
    unit: str
    reference: float | None = None
    target: str | None = None  # "< 30", "<= 50"
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.target is None or self.value is None:
            return None
        operator, limit = self.target.split()
        return self.value < float(limit) if operator == "<" else self.value <= float(limit)

    def as_json(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit, "reference": self.reference, "target": self.target,
                "pass": self.passed, "note": self.note}


@dataclass
class Results:
    figures: dict[str, Figure] = field(default_factory=dict)

    def add(self, name: str, figure: Figure) -> None:
        self.figures[name] = figure
        value = "-" if figure.value is None else f"{figure.value:,.3f}".rstrip("0").rstrip(".")
        reference = f"  (before: {figure.reference:g})" if figure.reference is not None else ""
        target = f"  target {figure.target}" if figure.target else ""
        print(f"  {name:<28} {value:>14} {figure.unit:<10}{target}{reference}  {figure.note}".rstrip(), flush=True)


def forced_dump_ms(refs: list[netns.NamespaceRef]) -> float:
    """Median ms of both TCP dumps inside each of ``refs``, as every namespace paid before the socket count check."""
    times = []
    for ref in refs:
        rows: list[Any] = []
        with netns.entered(ref), netlink.open_diag_socket() as sock:
            started = time.perf_counter()
            for family in (2, 10):  # AF_INET, AF_INET6
                netlink.dump(sock, sockdiag.inet_listen_request(family), sockdiag.decode_inet, ref.name, rows)
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def memory(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon, RssFile, VmHWM in MiB."""
    values = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Watched:
    durations: list[float] = field(default_factory=list)  # ms, one per state document
    partial: int = 0
    documents: int = 0
    fresh: set[str] = field(default_factory=set)
    all_read_at: float | None = None
    state_bytes: int = 0
    last: dict[str, Any] = field(default_factory=dict)


def watch_state(state: Path, wanted: set[str], until: float, started: float, daemon: subprocess.Popen[str]) -> Watched:
    watched = Watched()
    taken = 0.0
    while time.monotonic() < until:
        if daemon.poll() is not None:
            raise Failed(f"the daemon exited with status {daemon.returncode}")
        try:
            raw = (state / "status.json").read_bytes()
            document = json.loads(raw)
        except (OSError, ValueError):
            time.sleep(0.1)
            continue
        if document["taken_at"] != taken:
            taken = document["taken_at"]
            watched.documents += 1
            watched.durations.append(document["duration_ms"])
            watched.partial += bool(document["sweep"]["partial"])
            watched.fresh |= {ns["name"] for ns in document["namespaces"] if not ns["stale"]}
            watched.state_bytes = max(watched.state_bytes, len(raw))
            watched.last = document
            if watched.all_read_at is None and wanted <= watched.fresh:
                watched.all_read_at = time.monotonic() - started
        time.sleep(0.1)
    return watched


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="aqt-bench-attack-"))
    try:
        yield path
    finally:
        if keep:
            print(f"work directory kept: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, results: Results) -> None:
    helpers: list[Helper] = []
    daemon: subprocess.Popen[str] | None = None
    try:
        print(f"creating {args.namespaces} user namespaces and {args.listeners} listeners as {USER}...", flush=True)
        started = time.monotonic()
        helpers.append(Helper.start(as_user(sys.executable, str(CROWD), "namespaces", str(args.namespaces),
                                            "--life", str(HELPER_LIFE)), "the namespace helper"))
        script = (f"ip link set lo up && exec {sys.executable} {CROWD} listeners {args.listeners} "
                  f"--fill {FILLED} --pad {args.pad} --life {HELPER_LIFE}")
        helpers.append(Helper.start(as_user("unshare", "-rn", "sh", "-c", script), "the listener helper"))
        results.add("setup_s", Figure(time.monotonic() - started, "s"))
        pids = helpers[0].ready["pids"]
        wanted = {f"pid:{pid}" for pid in pids} | {f"pid:{helpers[1].ready['pid']}"}

        print("reference:", flush=True)
        clock = time.perf_counter()
        snapshot = sweep("all", owners=False)
        results.add("oneshot_sweep_s", Figure(time.perf_counter() - clock, "s",
                                              note=f"{len(snapshot.namespaces)} namespaces, "
                                                   f"{len(snapshot.listeners)} listeners, no owners"))
        refs = [ref for ref in netns.list_namespaces() if ref.name in wanted][:DUMP_SAMPLE]
        per_namespace = forced_dump_ms(refs)
        results.add("tcp_dump_empty_ns_ms", Figure(per_namespace, "ms", note="per empty namespace, median"))
        results.add("unbounded_dumps_s", Figure(per_namespace * len(wanted) / 1000, "s",
                                                reference=BEFORE["sweep_max_s"],
                                                note="what every sweep paid before: that x namespaces"))

        print("daemon:", flush=True)
        policy = POLICY.read_text(encoding="utf-8").replace(
            'textfile = "/var/lib/prometheus/node-exporter/aqtune.prom"', f'textfile = "{work / "aqtune.prom"}"')
        (work / "policy.toml").write_text(policy, encoding="utf-8")
        notify = NotifyListener(work / "notify")
        command = ["setpriv", "--pdeathsig", "TERM", sys.executable, "-m", "aqtune", "run", "--dry-run",
                   "--config", str(work / "policy.toml"), "--state-dir", str(work / "state")]
        if not args.ebpf:
            command.append("--no-ebpf")
        environment = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        environment.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC=str(WATCHDOG_USEC), AQTUNE_LOG="console")
        with open(work / "daemon.log", "w", encoding="utf-8") as log:
            started = time.monotonic()
            daemon = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=REPO, env=environment, text=True)
        try:
            while not notify.with_line("READY=1"):
                if daemon.poll() is not None or time.monotonic() - started > READY_TIMEOUT:
                    raise Failed(f"no READY=1 (daemon status {daemon.poll()}); see {work / 'daemon.log'}")
                time.sleep(0.05)
            ready = notify.with_line("READY=1")[0].at
            results.add("ready_s", Figure(ready - started, "s", note="start to READY=1, first sweep included"))
            cpu_before, window_start = cpu_seconds(daemon.pid), time.monotonic()
            watched = watch_state(work / "state", wanted, window_start + args.seconds, ready, daemon)
            cpu = (cpu_seconds(daemon.pid) - cpu_before) / (time.monotonic() - window_start) * 100
            used = memory(daemon.pid)
            pings = [m.at for m in notify.received() if m.has("WATCHDOG=1")]
            statuses = [m.value("STATUS") for m in notify.received() if m.value("STATUS")]
        finally:
            notify.close()
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        results.add("watchdog_max_gap_s", Figure(max(gaps) if gaps else None, "s", target=f"< {WATCHDOG_USEC / 1e6:g}",
                                                 note=f"{len(pings)} pings"))
        results.add("sweep_max_s", Figure(max(watched.durations, default=0) / 1000, "s",
                                          reference=BEFORE["sweep_max_s"], target=f"< {WATCHDOG_USEC / 2e6:g}",
                                          note=f"{watched.documents} state documents"))
        results.add("sweep_median_s", Figure(statistics.median(watched.durations) / 1000 if watched.durations else None,
                                             "s"))
        results.add("partial_sweeps", Figure(watched.partial, "sweeps"))
        results.add("all_namespaces_read_s", Figure(watched.all_read_at, "s",
                                                    note=f"READY to every namespace read once; "
                                                         f"{len(watched.fresh & wanted)}/{len(wanted)} read"))
        results.add("cpu_percent", Figure(cpu, "% core", reference=BEFORE["cpu_percent"], target="<= 50",
                                          note=f"over {args.seconds:g} s after READY"))
        results.add("rss_mib", Figure(used.get("VmRSS"), "MiB", reference=BEFORE["rss_mib"]))
        results.add("rss_anon_mib", Figure(used.get("RssAnon"), "MiB"))
        results.add("rss_file_mib", Figure(used.get("RssFile"), "MiB"))
        results.add("rss_peak_mib", Figure(used.get("VmHWM"), "MiB"))
        results.add("state_bytes", Figure(watched.state_bytes, "bytes", reference=BEFORE["state_bytes"],
                                          target=f"<= {4 << 20}"))
        with contextlib.suppress(OSError):
            results.add("metrics_bytes", Figure((work / "aqtune.prom").stat().st_size, "bytes"))
        last = watched.last
        if last:
            results.add("listeners_tracked", Figure(len(last["listeners"]) + last["left_out"]["listeners"], "",
                                                    note=f"{last['sweep']['skipped_listeners']} over the budget"))
        if statuses:
            print(f"  last STATUS: {statuses[-1]}")
    finally:
        if daemon is not None:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=10)
        for helper in helpers:
            stop(helper.process)


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--namespaces", type=int, default=2000)
    parser.add_argument("--listeners", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=60.0, help="daemon measured this long after READY=1")
    parser.add_argument("--pad", type=int, default=1_000_000, help="bytes of the listeners' command line")
    parser.add_argument("--quick", action="store_true", help="300 namespaces, 10,000 listeners, 20 s")
    parser.add_argument("--ebpf", action="store_true", help="load the eBPF programs too (compiles for seconds)")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "attack_scale.json")
    parser.add_argument("--keep", action="store_true", help="leave the work directory")
    args = parser.parse_args()
    if args.quick:
        args.namespaces, args.listeners, args.seconds = 300, 10_000, 20.0
    args.namespaces, args.listeners = min(args.namespaces, 5000), min(args.listeners, 200_000)
    reason = can_run()
    if reason is not None:
        print(f"attack_scale: {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    print(f"aqtune attack-scale benchmark: kernel {platform.release()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}; {args.namespaces} namespaces, {args.listeners} listeners, "
          f"{args.pad} B command line, eBPF {'on' if args.ebpf else 'off'}", flush=True)
    results = Results()
    status = 0
    with workdir(args.keep) as work:
        try:
            run(args, work, results)
        except Failed as exc:
            print(f"attack_scale: {exc}", file=sys.stderr)
            status = 1
    verdicts = [f for f in results.figures.values() if f.passed is not None]
    print(f"summary: {sum(bool(f.passed) for f in verdicts)}/{len(verdicts)} targets met: "
          + ", ".join(f"{name} {'PASS' if f.passed else 'MISSED'}" for name, f in results.figures.items()
                      if f.passed is not None))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": "attack_scale", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "host": {"kernel": platform.release(), "cpus": os.cpu_count(), "load": os.getloadavg()[0]},
                "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "complete": status == 0,
                "figures": {name: figure.as_json() for name, figure in results.figures.items()}}
    args.output.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"results: {args.output}")
    return status


if __name__ == "__main__":
    sys.exit(main())
