#!/usr/bin/python3
"""Compile-in-a-child benchmark: the daemon's memory with the eBPF layer compiled in-process, against
compiling it in a short-lived child that hands the loaded programs, attachments and maps back as file
descriptors and exits, which is what `aqtune run` does (EventLayer.start_in_child; issue 16, "Memory").

    /usr/bin/python3 bench/compile_child.py [--rounds 3] [--connections 5]      (as root)

Each round runs three fresh /usr/bin/python3 processes, one after the other, each importing what the daemon
imports (aqtune.cli, aqtune.surfaces.run) and reporting its own /proc/self/status (VmRSS, RssAnon, RssFile,
RssShmem), smaps_rollup's Private_Dirty and the anonymous memory of /proc/self/smaps grouped by mapping:
  in-process   EventLayer.start(emit=EMIT_DROPS) and malloc_trim(0): bcc, clang and LLVM stay loaded
  child        EventLayer.start_in_child(emit=EMIT_DROPS) and malloc_trim(0), as `aqtune run` does
               (Observer.start_events): this process never imports bcc
  imports      the imports alone: the --no-ebpf floor
After being measured, the in-process and child processes open a listener on 127.0.0.1 (host namespace,
loopback only), make --connections connections to it and accept them, and read what the probes counted for
it through the layer (EventLayer.read: by descriptor with bpf(2) in the child case, after the child has
exited), which proves the probes still count. Then they close the layer, which detaches the programs and
frees the maps.

Figures (a table, and bench/results/compile_child-<time>.json): anonymous, file-backed and RSS in MiB of the
in-process layer against the imports floor and of the child-compiled one against the in-process one
(target: anonymous <= 40 MiB, issue 16), the time to compile and load in each (child: until the descriptors
are received and the child is gone), the compiling child's peak RSS, and whether the probes counted every
connection. Exit status: 0 after a run, 1 when a measured process failed, 2 (with the reason) when eBPF
cannot run here. Every process is bounded in time and dies with its parent (PR_SET_PDEATHSIG); nothing stays
attached after the run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _path  # noqa: F401 - first: the repository's root on sys.path

SCRIPT = Path(__file__).resolve()
PYTHON = "/usr/bin/python3"
MODES = ("inprocess", "child", "imports")
MEASURE_TIMEOUT = 300.0  # seconds for one measured process: a compile takes a few, on a loaded host tens
ANON_TARGET_MIB = 40.0
PR_SET_PDEATHSIG = 1
KIB_PER_MIB = 1024

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    # A measured process or the compiling child must not outlive the benchmark that started it.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(1)


# --- what a process holds: read from /proc/self -----------------------------------------------------------------

STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")
# Mapping pathname -> the group the breakdown shows it in, first match wins (a table, so README can name them).
MAPPING_GROUPS: tuple[tuple[str, str], ...] = (
    (r"^\[heap\]$", "[heap] (brk: glibc's main arena)"),
    (r"^$", "anonymous mmap (Python arenas, large mallocs, thread arenas)"),
    (r"^\[stack", "[stack]"),
    (r"libLLVM", "libLLVM (relocated/COW pages)"),
    (r"libclang", "libclang-cpp (relocated/COW pages)"),
    (r"libbcc", "libbcc (relocated/COW pages)"),
    (r"/python3[.0-9]*$", "python3 binary (COW pages)"),
    (r"\.so", "other shared libraries (COW pages)"),
    (r"^\[anon:", "named anonymous"),
)
SMAPS_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$")


def status_kib() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
            fields[key] = int(value.split()[0])
    return fields


def private_dirty_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    return 0


def group_of(pathname: str) -> str:
    for pattern, group in MAPPING_GROUPS:
        if re.search(pattern, pathname):
            return group
    return "other mappings"


def anon_breakdown_kib() -> dict[str, dict[str, int]]:
    """Per mapping group: Anonymous (private pages: written heap, or a library's pages written at relocation),
    Rss and the number of mappings, from /proc/self/smaps."""
    groups: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        header = SMAPS_HEADER.match(line)
        if header:
            current = groups.setdefault(group_of(header.group(1).strip()), {"anon": 0, "rss": 0, "mappings": 0})
            current["mappings"] += 1
        elif current is not None and line.startswith(("Anonymous:", "Rss:")):
            current["anon" if line.startswith("A") else "rss"] += int(line.split()[1])
    return dict(sorted(groups.items(), key=lambda item: -item[1]["anon"]))


def memory_report() -> dict[str, Any]:
    return {"status_kib": status_kib(), "private_dirty_kib": private_dirty_kib(), "groups": anon_breakdown_kib()}


def counted(layer: Any, connections: int) -> dict[str, int]:
    """Open a listener on 127.0.0.1, make ``connections`` connections to it and accept them; what the probes
    counted for it, read through the layer: {"enqueued": ..., "accepts": ...}."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(connections + 1)
        listener.settimeout(10)
        inode = os.fstat(listener.fileno()).st_ino
        for _ in range(connections):
            with socket.create_connection(listener.getsockname(), timeout=10):
                accepted, _ = listener.accept()  # accept4(2): the exit tracepoint's syscall
                accepted.close()
        seen = layer.read({inode: 0}).get(inode)
    return {"enqueued": seen.enqueued if seen else 0, "accepts": seen.accepts if seen else 0}


# --- the three measured processes, and the compiling child ------------------------------------------------------

def _daemon_imports() -> None:
    import aqtune.cli
    import aqtune.surfaces.run  # noqa: F401 - what `aqtune run` has loaded before it starts the layer


def _trim() -> None:
    from aqtune.surfaces.run import _return_heap  # the daemon's malloc_trim(0)

    _return_heap()


def _in_process(connections: int) -> dict[str, Any]:
    from aqtune.collect.ebpf import EMIT_DROPS, EventLayer

    started = time.perf_counter()
    layer = EventLayer.start(emit=EMIT_DROPS)
    load_s = time.perf_counter() - started
    _trim()
    report = {"load_s": load_s, "memory": memory_report(),
              "probes": {probe: state.text for probe, state in layer.probes.items()}}
    report["counted"] = counted(layer, connections)
    layer.close()
    return report


def _from_child(connections: int) -> dict[str, Any]:
    """The daemon's way: bcc never imported here; the layer arrives as descriptors from a child that exits."""
    from aqtune.collect.ebpf import EMIT_DROPS, EventLayer

    started = time.perf_counter()
    layer = EventLayer.start_in_child(emit=EMIT_DROPS)
    load_s = time.perf_counter() - started
    _trim()
    if "bcc" in sys.modules:
        return {"error": "the process imported bcc: start_in_child fell back to compiling in-process"}
    report = {"load_s": load_s, "memory": memory_report(),
              "probes": {probe: state.text for probe, state in layer.probes.items()},
              # The largest child reaped so far: the compiler's peak, gone once the descriptors arrived.
              "child_peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}
    report["counted"] = counted(layer, connections)
    layer.close()
    return report


def measure(mode: str, connections: int) -> int:
    """One measured process: prints one JSON line on stdout."""
    _die_with_parent()
    _daemon_imports()
    from aqtune.collect.ebpf import Unavailable

    try:
        if mode == "inprocess":
            report = _in_process(connections)
        elif mode == "child":
            report = _from_child(connections)
        else:
            _trim()
            report = {"memory": memory_report()}
    except Unavailable as exc:
        report = {"unavailable": str(exc)}
    print(json.dumps(report), flush=True)
    return 2 if "unavailable" in report else 1 if "error" in report else 0


# --- the benchmark: runs the measured processes and reports ------------------------------------------------------

def run_measured(mode: str, connections: int) -> dict[str, Any]:
    done = subprocess.run([PYTHON, str(SCRIPT), "--measure", mode, "--connections", str(connections)],
                          capture_output=True, text=True, timeout=MEASURE_TIMEOUT, check=False)
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"the {mode} process said nothing (status {done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")
    report: dict[str, Any] = json.loads(lines[-1])
    if "error" in report:
        raise RuntimeError(f"{mode}: {report['error']}")
    return report


def mib(report: dict[str, Any], field: str) -> float:
    return float(report["memory"]["status_kib"][field]) / KIB_PER_MIB


def breakdown_table(reports: dict[str, dict[str, Any]]) -> str:
    """The anonymous KiB of each mapping group, each process in a column pair with its resident KiB."""
    groups: list[str] = []
    for report in reports.values():
        groups += [group for group in report["memory"]["groups"] if group not in groups]
    rows = [("KiB by mapping", *(f"{mode} {what}" for mode in reports for what in ("anon", "rss")))]
    for group in groups:
        cells = [str(report["memory"]["groups"].get(group, {}).get(what, 0)) for report in reports.values()
                 for what in ("anon", "rss")]
        if any(cell != "0" for cell in cells):
            rows.append((group, *cells))
    rows.append(("status RssAnon / VmRSS", *(str(r["memory"]["status_kib"][field]) for r in reports.values()
                                             for field in ("RssAnon", "VmRSS"))))
    rows.append(("smaps_rollup Private_Dirty", *(cell for r in reports.values()
                                                 for cell in (str(r["memory"]["private_dirty_kib"]), ""))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                               enumerate(zip(row, widths, strict=True))).rstrip() for row in rows)


def benchmark(args: argparse.Namespace, results: Any, unavailable: list[str]) -> str | None:
    from figures import Figure, Reference, Target

    taken: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for round_number in range(1, args.rounds + 1):
        for mode in MODES:
            report = run_measured(mode, args.connections)
            if "unavailable" in report:
                unavailable.append(report["unavailable"])
                return f"eBPF unavailable: {report['unavailable']}"
            taken[mode].append(report)
            line = (f"round {round_number} {mode:<10} RSS {mib(report, 'VmRSS'):6.1f} MiB  "
                    f"anon {mib(report, 'RssAnon'):5.1f}  file {mib(report, 'RssFile'):5.1f}  "
                    f"shmem {mib(report, 'RssShmem'):4.1f}  private dirty "
                    f"{report['memory']['private_dirty_kib'] / KIB_PER_MIB:5.1f}")
            if "load_s" in report:
                line += f"  load {report['load_s']:.2f} s"
            if "counted" in report:
                line += f"  counted {report['counted']} of {args.connections}"
            print(line, flush=True)
    last = {mode: reports[-1] for mode, reports in taken.items()}
    print(f"# compiling child: peak RSS {last['child']['child_peak_kib'] / KIB_PER_MIB:.1f} MiB (gone once the "
          "descriptors arrived)")
    print(f"\n== the last round's memory by mapping, KiB (anon: private pages; rss: resident, file pages too) ==\n"
          f"{breakdown_table(last)}")

    def samples(mode: str, pick: Callable[[dict[str, Any]], float]) -> tuple[float, ...]:
        return tuple(pick(report) for report in taken[mode])

    def in_mib(mode: str, field: str) -> tuple[float, ...]:
        return tuple(mib(report, field) for report in taken[mode])

    anon_target = Target("<=", ANON_TARGET_MIB, source="issue 16")
    extra = {mode: {"groups_kib": reports[-1]["memory"]["groups"],
                    "private_dirty_kib": [r["memory"]["private_dirty_kib"] for r in reports]}
             for mode, reports in taken.items()}
    for field, key, what in (("RssAnon", "anon", "anonymous"), ("RssFile", "file", "file-backed"),
                             ("VmRSS", "rss", "RSS")):
        floor = Reference("imports only (--no-ebpf floor)", in_mib("imports", field))
        today = in_mib("inprocess", field)
        results.add(Figure(f"inprocess_{key}_mib", f"{what}, compiled in-process", "MiB", today, floor,
                           anon_target if key == "anon" else None,
                           extra=extra["inprocess"] if key == "anon" else {}))
        results.add(Figure(f"child_{key}_mib", f"{what}, compiled in a child (the daemon's way)", "MiB",
                           in_mib("child", field), Reference("in-process", today),
                           anon_target if key == "anon" else None,
                           extra=extra["child"] if key == "anon" else {}))
    results.add(Figure("imports_anon_mib", "anonymous, imports only (--no-ebpf floor)", "MiB",
                       in_mib("imports", "RssAnon"), extra=extra["imports"]))
    in_process_s = samples("inprocess", lambda r: float(r["load_s"]))
    results.add(Figure("inprocess_load_s", "compile + load, in-process", "s", in_process_s))
    results.add(Figure("child_load_s", "compile + load in a child, until fds received and child gone", "s",
                       samples("child", lambda r: float(r["load_s"])), Reference("in-process", in_process_s)))
    results.add(Figure("child_peak_rss_mib", "the compiling child's peak RSS (VmHWM, transient)", "MiB",
                       samples("child", lambda r: r["child_peak_kib"] / KIB_PER_MIB)))
    for mode, what in (("inprocess", "in-process"), ("child", "after the child exited")):
        fraction = samples(mode, lambda r: min(r["counted"].values()) / args.connections)
        results.add(Figure(f"{mode}_probes_counted", f"probes counted every connection, {what} (fraction)", "",
                           fraction, target=Target(">=", 1.0, source="the option must work"), given=min(fraction),
                           note="the lowest round", extra={"counted": [r["counted"] for r in taken[mode]]}))
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description="daemon memory: eBPF compiled in-process vs in a short-lived child")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per way (default 3)")
    parser.add_argument("--connections", type=int, default=5, help="loopback connections for the check (5)")
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (1 <= args.rounds <= 20 and 1 <= args.connections <= 100):
        parser.error("--rounds must be 1-20, --connections 1-100")
    if args.measure:
        return measure(args.measure, args.connections)

    from figures import Results, refused_without_root

    if refused_without_root("compile_child.py", "eBPF"):
        return 1
    print(f"# compile in a child: kernel {os.uname().release}, {os.cpu_count()} CPUs, {args.rounds} rounds of "
          f"{', '.join(MODES)}, each a fresh {PYTHON}", flush=True)
    results = Results("compile_child", vars(args))
    unavailable: list[str] = []
    status = results.run(lambda: benchmark(args, results, unavailable), "measured processes and probes")
    return 2 if unavailable else status


if __name__ == "__main__":
    sys.exit(main())
