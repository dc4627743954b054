"""What /proc says about a process and the host, for the benchmarks: CPU time, memory, counters."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU time the processes' threads have run, from the scheduler's exact runtime (schedstat, ns), not from
    utime/stime, which count 10 ms ticks: too coarse for a daemon using 0.2% of a core over 5 s. Loopback packets
    are processed in softirq context on the sending thread, charged to it on kernels without IRQ time
    accounting, so this includes the cost of probes on that path. Threads that already exited are not counted
    (aqtune has none)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):  # the process exited
            for task in os.scandir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):  # a thread that just exited
                    total += int(Path(task.path, "schedstat").read_text().split()[0])
    return total / 1e9


def run_queue_seconds(pid: int) -> float:
    """Time the main thread spent runnable but not running (schedstat's second field): tells a process that
    is slow from one that is starved of CPU."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


@dataclass(frozen=True, slots=True)
class Memory:
    """Resident memory in KiB, as /proc/PID/status splits it."""

    rss: int
    anon: int  # private: the heap, what the process itself allocated
    file: int  # file-backed: shared libraries (bcc's and LLVM's among them), shared with other processes
    shmem: int


def memory_kib(pid: int) -> Memory:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0])
    return Memory(fields["VmRSS"], fields["RssAnon"], fields["RssFile"], fields["RssShmem"])


def proc_table(path: str, section: str) -> dict[str, int]:
    """One section of /proc/net/snmp or /proc/net/netstat (a header line, then a value line)."""
    with open(path) as f:
        rows = [line.split() for line in f if line.startswith(section + ":")]
    return dict(zip(rows[0][1:], map(int, rows[1][1:]), strict=True)) if len(rows) >= 2 else {}


def host_cpu() -> tuple[int, int, int, int]:
    """(process time, interrupt time, steal, total) in ticks over all CPUs, from /proc/stat.

    Interrupt time is kept apart: with IRQ time accounting, softirq work (where loopback TCP is processed)
    is not charged to any process, so it would otherwise pass for other processes' load.
    """
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return user + nice + system, irq + softirq, steal, sum(values)

