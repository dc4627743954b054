"""What a process's eBPF programs cost the host while they run: each program's runs and run time, from the
kernel's own accounting.

The kernel counts run time only while someone asks it to: BPF_ENABLE_STATS hands out a descriptor, and
counting stops when the last one closes, so nothing outside this process changes (the sysctl
kernel.bpf_stats_enabled is not touched). Counting costs two clock reads per run, which the figures
include. Programs are found through the process's descriptors (/proc/PID/fdinfo: a program's or a
link's ``prog_id``) and read by id (BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD): root only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import _path  # noqa: F401 - the repository's root on sys.path

from aqtune.collect.bpftables import bpf

BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0
# struct bpf_prog_info (include/uapi/linux/bpf.h): name[16] at 64, run_time_ns and run_cnt at 192. A
# kernel fills what it knows of the size given and zeroes nothing past it.
INFO_SIZE = 256
NAME_AT, RUNS_AT = 64, 192


@dataclass(frozen=True, slots=True)
class ProgramRuns:
    name: str
    run_ns: int  # cumulative while counting was on
    runs: int


def program_ids(pid: int) -> set[int]:
    """The ids of the eBPF programs ``pid`` holds, directly or through links."""
    ids = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):  # a descriptor closed meanwhile
            for line in info.read_text().splitlines():
                if line.startswith("prog_id:"):
                    ids.add(int(line.split()[1]))
    return ids


def program_runs(ids: set[int]) -> dict[int, ProgramRuns]:
    """Each program's name and counts now; a program unloaded meanwhile is left out."""
    found = {}
    for prog_id in ids:
        try:
            fd = bpf(BPF_PROG_GET_FD_BY_ID, ctypes.create_string_buffer(struct.pack("=I", prog_id), 16))
        except OSError:
            continue
        try:
            info = ctypes.create_string_buffer(INFO_SIZE)
            bpf(BPF_OBJ_GET_INFO_BY_FD, ctypes.create_string_buffer(
                struct.pack("=IIQ", fd, INFO_SIZE, ctypes.addressof(info)), 16))
        finally:
            os.close(fd)
        run_ns, runs = struct.unpack_from("=QQ", info.raw, RUNS_AT)
        found[prog_id] = ProgramRuns(info.raw[NAME_AT:NAME_AT + 16].split(b"\0")[0].decode(errors="replace"),
                                     run_ns, runs)
    return found


class RunTimeCounting:
    """Run-time counting on while this is open (``with RunTimeCounting(): ...``)."""

    def __init__(self) -> None:
        self.fd = bpf(BPF_ENABLE_STATS, ctypes.create_string_buffer(struct.pack("=I", BPF_STATS_RUN_TIME), 16))

    def __enter__(self) -> RunTimeCounting:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        os.close(self.fd)


@dataclass(frozen=True, slots=True)
class ProgramCost:
    name: str
    per_second: float  # runs
    ns_per_run: float
    core_percent: float  # % of one CPU


def costs(before: dict[int, ProgramRuns], after: dict[int, ProgramRuns], seconds: float) -> list[ProgramCost]:
    """What each program that ran between the two readings cost, busiest first (pure)."""
    found = []
    for prog_id, now in after.items():
        then = before.get(prog_id)
        if then is None or now.runs <= then.runs:
            continue
        runs, run_ns = now.runs - then.runs, now.run_ns - then.run_ns
        found.append(ProgramCost(now.name, runs / seconds, run_ns / runs, 100.0 * run_ns / 1e9 / seconds))
    return sorted(found, key=lambda cost: -cost.core_percent)
