#!/usr/bin/python3
"""Compile-in-a-child benchmark: the daemon's memory with the eBPF layer compiled in-process (today), against
compiling it in a short-lived child that hands the loaded programs, attachments and maps back as file
descriptors and exits (issue 16, "Memory").

    /usr/bin/python3 bench/compile_child.py [--rounds 3] [--connections 5]      (as root)

Each round runs three fresh /usr/bin/python3 processes, one after the other, each importing what the daemon
imports (aqtune.cli, aqtune.surfaces.run) and reporting its own /proc/self/status (VmRSS, RssAnon, RssFile,
RssShmem), smaps_rollup's Private_Dirty and the anonymous memory of /proc/self/smaps grouped by mapping:
  in-process   EventLayer.start(emit=EMIT_DROPS) and malloc_trim(0), as `aqtune run` does (Observer.start_events)
  child        never imports bcc: it starts a child (this script, --compile-child) that does the same
               EventLayer.start, then sends every descriptor that keeps the programs attached and the maps
               alive (tracepoint perf events, raw tracepoint links, programs, maps, the perf buffer's events)
               over a Unix socket with SCM_RIGHTS and exits without bcc's cleanup; the parent maps the perf
               buffers as bcc does, trims its heap and is measured
  imports      the imports alone: the --no-ebpf floor
After being measured, the in-process and child processes open a listener on 127.0.0.1 (host namespace,
loopback only), make --connections connections to it and accept them, and read the listener's counters
(stats.enqueued, accepted.accepts) from the maps by descriptor with bpf(2): in the child case after the
child has exited, which proves the probes still count. Then they close everything, which detaches the
programs and frees the maps.

Figures (a table, and bench/results/compile_child-<time>.json): anonymous, file-backed and RSS in MiB of the
in-process daemon against the imports floor and of the child-compiled parent against the in-process one
(target: anonymous <= 40 MiB, issue 16), the time to compile and load in each (child: start to descriptors
received and child gone), the child's peak RSS, and whether the probes counted every connection. Exit status:
0 after a run, 1 when a measured process failed, 2 (with the reason) when eBPF cannot run here. Every process
is bounded in time and dies with its parent (PR_SET_PDEATHSIG); nothing stays attached after the run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _path  # noqa: F401 - first: the repository's root on sys.path

SCRIPT = Path(__file__).resolve()
PYTHON = "/usr/bin/python3"
MODES = ("inprocess", "child", "imports")
MEASURE_TIMEOUT = 300.0  # seconds for one measured process: a compile takes a few, on a loaded host tens
CHILD_TIMEOUT = 240.0  # seconds for the compiling child to hand its descriptors over
ACK_TIMEOUT = 60.0  # seconds the child waits for the parent to say it has the descriptors
MAX_FDS = 253  # SCM_MAX_FD: descriptors one message can carry (aqtune's layer holds about 30)
MESSAGE_BYTES = 1 << 16
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


# --- bpf(2) by descriptor, without bcc --------------------------------------------------------------------------

BPF_MAP_LOOKUP_ELEM = 1


def lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value at ``key`` of the map behind ``fd``, or None when there is none."""
    from aqtune.collect.bpfmap import _bpf  # the ctypes bpf() aqtune connections uses

    key_buf = ctypes.create_string_buffer(key, len(key))
    value = ctypes.create_string_buffer(value_size)
    attr = ctypes.create_string_buffer(
        struct.pack("=IIQQQ", fd, 0, ctypes.addressof(key_buf), ctypes.addressof(value), 0), 32)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr)
    except OSError:  # ENOENT: not in the map
        return None
    return value.raw


def counted(maps: dict[str, int], layout: dict[str, dict[str, int]], connections: int) -> dict[str, int]:
    """Open a listener on 127.0.0.1, make ``connections`` connections to it and accept them; what the probes
    counted for it: {"enqueued": ..., "accepts": ...} from the stats and accepted maps, read by descriptor."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(connections + 1)
        listener.settimeout(10)
        inode = os.fstat(listener.fileno()).st_ino
        for _ in range(connections):
            with socket.create_connection(listener.getsockname(), timeout=10):
                accepted, _ = listener.accept()  # accept4(2): the exit tracepoint's syscall
                accepted.close()
        seen = {}
        for name, field in (("stats", "enqueued"), ("accepted", "accepts")):
            shape = layout[name]
            raw = lookup(maps[name], struct.pack("=Q", inode), shape["value_size"])
            seen[field] = 0 if raw is None else int(struct.unpack_from("=Q", raw, shape[field])[0])
    return seen


# --- the three measured processes, and the compiling child ------------------------------------------------------

def _daemon_imports() -> None:
    import aqtune.cli
    import aqtune.surfaces.run  # noqa: F401 - what `aqtune run` has loaded before it starts the layer


def _trim() -> None:
    from aqtune.surfaces.run import _return_heap  # the daemon's malloc_trim(0)

    _return_heap()


def _layout(bpf: Any) -> dict[str, dict[str, int]]:
    """Where the counters are in the stats and accepted maps' values, from bcc's ctypes types."""
    stats, accepted = bpf["stats"].Leaf, bpf["accepted"].Leaf
    return {"stats": {"value_size": ctypes.sizeof(stats), "enqueued": stats.enqueued.offset},
            "accepted": {"value_size": ctypes.sizeof(accepted), "accepts": accepted.accepts.offset}}


def _held_fds(bpf: Any) -> Iterator[tuple[str, str, int]]:
    """(kind, name, fd) of every descriptor bcc holds for the loaded layer: attachments (tracepoint perf
    events, raw tracepoint and fentry links, kprobe perf events), programs, maps and the perf buffer's events."""
    from bcc.libbcc import lib

    for kind, held in (("tracepoint", bpf.tracepoint_fds), ("raw_tracepoint", bpf.raw_tracepoint_fds),
                       ("kprobe", bpf.kprobe_fds), ("fentry", bpf.kfunc_entry_fds),
                       ("fexit", bpf.kfunc_exit_fds)):
        for name, fd in held.items():
            yield kind, name.decode() if isinstance(name, bytes) else str(name), int(fd)
    for name, function in bpf.funcs.items():
        yield "program", name.decode() if isinstance(name, bytes) else str(name), int(function.fd)
    lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.bpf_table_name.restype, lib.bpf_table_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_size_t]
    lib.bpf_table_fd_id.restype, lib.bpf_table_fd_id.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t]
    for index in range(lib.bpf_num_tables(bpf.module)):
        yield "map", lib.bpf_table_name(bpf.module, index).decode(), lib.bpf_table_fd_id(bpf.module, index)
    for (_table, cpu), reader in bpf.perf_buffers.items():
        yield "perf_buffer", f"events cpu {cpu}", int(lib.perf_reader_fd(reader))


def compile_child(fd: int) -> int:
    """The short-lived child: compile and attach as the daemon does, send the descriptors, exit."""
    _die_with_parent()
    channel = socket.socket(fileno=fd)
    from aqtune.collect.ebpf import EMIT_DROPS, EventLayer, Unavailable

    started = time.perf_counter()
    try:
        layer = EventLayer.start(emit=EMIT_DROPS)
    except Unavailable as exc:
        channel.send(json.dumps({"unavailable": str(exc)}).encode())
        return 2
    compile_s = time.perf_counter() - started
    held = list(_held_fds(layer.bpf))
    if len(held) > MAX_FDS:
        channel.send(json.dumps({"error": f"{len(held)} descriptors, more than one message carries"}).encode())
        return 1
    message = {"held": [[kind, name] for kind, name, _ in held], "layout": _layout(layer.bpf),
               "probes": {probe: state.text for probe, state in layer.probes.items()}, "compile_s": compile_s,
               "perf_pages": 64, "child_status_kib": status_kib()}
    socket.send_fds(channel, [json.dumps(message).encode()], [fd for _, _, fd in held])
    channel.settimeout(ACK_TIMEOUT)
    with contextlib.suppress(OSError):
        channel.recv(16)  # the parent has them (or died: the kernel then frees everything)
    # Exit without bcc's atexit cleanup: it would close its copies only, but there is nothing to gain.
    os._exit(0)


def _in_process(connections: int) -> dict[str, Any]:
    from aqtune.collect.ebpf import EMIT_DROPS, EventLayer

    started = time.perf_counter()
    layer = EventLayer.start(emit=EMIT_DROPS)
    load_s = time.perf_counter() - started
    _trim()
    report = {"load_s": load_s, "memory": memory_report(),
              "probes": {probe: state.text for probe, state in layer.probes.items()}}
    maps = {name: layer.bpf[name].map_fd for name in ("stats", "accepted")}
    report["counted"] = counted(maps, _layout(layer.bpf), connections)
    layer.close()
    return report


def _receive(channel: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, flags, _ = socket.recv_fds(channel, MESSAGE_BYTES, MAX_FDS)
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in fds:
            os.close(fd)
        raise RuntimeError("the child's descriptors or message were truncated in transit")
    message: dict[str, Any] = json.loads(data) if data else {"error": "the child closed the socket"}
    if "held" in message and len(fds) != len(message["held"]):
        for fd in fds:
            os.close(fd)
        raise RuntimeError(f"the child sent {len(fds)} descriptors for {len(message['held'])} names")
    return message, fds


def _from_child(connections: int) -> dict[str, Any]:
    """The parent: bcc never imported here; the layer arrives as descriptors from a child that then exits."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    started = time.perf_counter()
    child = subprocess.Popen([PYTHON, str(SCRIPT), "--compile-child", str(theirs.fileno())],
                             pass_fds=[theirs.fileno()])
    theirs.close()
    fds: list[int] = []
    rings: list[mmap.mmap] = []
    try:
        ours.settimeout(CHILD_TIMEOUT)
        message, fds = _receive(ours)
        if "unavailable" in message or "error" in message:
            child.wait(timeout=CHILD_TIMEOUT)
            return message
        ours.send(b"ok")
        status = child.wait(timeout=CHILD_TIMEOUT)
        load_s = time.perf_counter() - started
        if status != 0:
            raise RuntimeError(f"the compiling child exited with status {status}")
        held = [(kind, name, fd) for (kind, name), fd in zip(message["held"], fds, strict=True)]
        # The perf buffers, mapped as bcc maps them (1 + 64 pages per CPU), so the parent pays what the daemon
        # would; touching the header page is what reading them costs at idle.
        size = (1 + message["perf_pages"]) * mmap.PAGESIZE
        for kind, _, fd in held:
            if kind == "perf_buffer":
                rings.append(ring := mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
                ring.read_byte()  # faults the header page in
        _trim()
        if "bcc" in sys.modules:
            raise RuntimeError("the parent imported bcc: the measurement is void")
        report = {"load_s": load_s, "compile_s": message["compile_s"], "memory": memory_report(),
                  "probes": message["probes"], "child_status_kib": message["child_status_kib"],
                  "held": [[kind, name] for kind, name, _ in held]}
        maps = {name: fd for kind, name, fd in held if kind == "map"}
        report["counted"] = counted(maps, message["layout"], connections)
        return report
    finally:
        for ring in rings:
            ring.close()
        for fd in fds:  # the attachments last held: closing them detaches the programs, frees the maps
            os.close(fd)
        ours.close()
        if child.poll() is None:
            child.kill()
            child.wait()


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
    child = last["child"]
    print(f"# child handed over {len(child['held'])} descriptors: "
          + ", ".join(f"{kind} {name}" for kind, name in child["held"]))
    print(f"# compiling child: peak RSS {child['child_status_kib']['VmHWM'] / KIB_PER_MIB:.1f} MiB, at hand-over "
          f"RSS {child['child_status_kib']['VmRSS'] / KIB_PER_MIB:.1f} anon "
          f"{child['child_status_kib']['RssAnon'] / KIB_PER_MIB:.1f} MiB")
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
        results.add(Figure(f"inprocess_{key}_mib", f"{what}, compiled in-process (today)", "MiB", today, floor,
                           anon_target if key == "anon" else None,
                           extra=extra["inprocess"] if key == "anon" else {}))
        results.add(Figure(f"child_{key}_mib", f"{what}, compiled in a child, fds kept", "MiB",
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
                       samples("child", lambda r: r["child_status_kib"]["VmHWM"] / KIB_PER_MIB)))
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
    parser.add_argument("--compile-child", type=int, metavar="FD", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (1 <= args.rounds <= 20 and 1 <= args.connections <= 100):
        parser.error("--rounds must be 1-20, --connections 1-100")
    if args.compile_child is not None:
        return compile_child(args.compile_child)
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
