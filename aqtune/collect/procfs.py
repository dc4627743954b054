"""Reads from /proc: who holds a socket inode, and a namespace's TcpExt counters and sysctls."""

from __future__ import annotations

import os
import re

from aqtune.records import COUNTERS, SYSCTLS, Process

# The innermost unit wins: for a container's nginx that is its own nginx.service, not the
# host's machine-*.scope, because that is the unit whose configuration needs the change.
_UNIT = re.compile(r"[^/]+\.(?:service|scope|socket|mount|swap)$")


def socket_holders(inodes: set[int], proc: str = "/proc") -> dict[int, list[int]]:
    """inode -> pids holding an fd on it (several after fork or with prefork servers)."""
    holders: dict[int, list[int]] = {}
    if not inodes:
        return holders
    for entry in os.scandir(proc):
        name = entry.name
        if not name.isdigit():
            continue
        fd_dir = f"{proc}/{name}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # exited, or not ours to read
            continue
        pid = int(name)
        for fd in fds:
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inode = int(link[8:-1])
                if inode in inodes:
                    pids = holders.setdefault(inode, [])
                    if not pids or pids[-1] != pid:
                        pids.append(pid)
    return holders


def unit_from_cgroup(text: str) -> str | None:
    """The systemd unit in /proc/PID/cgroup: from cgroup v2's ``0::`` line, else v1's name=systemd.

    A v1 host that has cgroup2 mounted somewhere still lists ``0::/`` for every process, so an empty
    v2 path must not hide the v1 one.
    """
    paths: list[str] = []
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, cgroup = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            paths.insert(0, cgroup)
        elif controllers == "name=systemd":
            paths.append(cgroup)
    for path in paths:
        for part in reversed(path.split("/")):
            if _UNIT.fullmatch(part):
                return part
    return None


CMDLINE_MAX = 4096  # bytes of a command line kept: any user's argv can be megabytes, on every socket


def _read(path: str, limit: int = -1) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", "backslashreplace")


def describe_process(pid: int, proc: str = "/proc") -> Process | None:
    """comm, cmdline and unit of ``pid``; None if it exited meanwhile."""
    try:
        comm = _read(f"{proc}/{pid}/comm").rstrip("\n")
        cmdline = _read(f"{proc}/{pid}/cmdline", CMDLINE_MAX).replace("\0", " ").strip()
        cgroup = _read(f"{proc}/{pid}/cgroup")
    except OSError:
        return None
    return Process(pid, comm, cmdline, unit_from_cgroup(cgroup))


def find_owners(inodes: set[int], proc: str = "/proc") -> dict[int, tuple[Process, ...]]:
    """inode -> the processes holding it, described once per pid."""
    described: dict[int, Process | None] = {}
    owners: dict[int, tuple[Process, ...]] = {}
    for inode, pids in socket_holders(inodes, proc).items():
        processes = []
        for pid in pids:
            if pid not in described:
                described[pid] = describe_process(pid, proc)
            process = described[pid]
            if process is not None:
                processes.append(process)
        owners[inode] = tuple(processes)
    return owners


def parse_netstat(text: str, section: str = "TcpExt") -> dict[str, int]:
    """All counters of one section of /proc/net/netstat (header line, then value line)."""
    prefix = section + ":"
    lines = [line.split() for line in text.splitlines() if line.startswith(prefix)]
    if len(lines) < 2:
        return {}
    names, values = lines[0][1:], lines[1][1:]
    return {name: int(value) for name, value in zip(names, values, strict=False)}


def read_counters() -> dict[str, int]:
    """The TcpExt counters aqtune reports, for the calling thread's network namespace."""
    tcpext = parse_netstat(_read("/proc/thread-self/net/netstat"))
    return {name: tcpext[name] for name in COUNTERS if name in tcpext}


def read_sysctls() -> dict[str, int]:
    """The calling thread's namespace's values of the sysctls aqtune reports."""
    values = {}
    for name in SYSCTLS:
        try:
            values[name] = int(_read("/proc/sys/" + name.replace(".", "/")).split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return values


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: set[int], proc: str = "/proc") -> dict[int, float]:
    """User + system CPU time of each pid (all its threads), for those still running."""
    times = {}
    for pid in pids:
        try:
            stat = _read(f"{proc}/{pid}/stat")
        except OSError:
            continue
        # comm (field 2) may contain spaces and parentheses; fields resume after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        times[pid] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return times


class OwnerCache:
    """Owners by socket inode, rescanned only when unknown sockets appear or ``max_age`` passes.

    The /proc fd scan is the most expensive part of a sweep (it reads every descriptor of every
    process); a daemon sweeping quiet listeners every second need not repeat it each time.
    """

    def __init__(self, max_age: float = 30.0, min_gap: float = 5.0) -> None:
        self.max_age = max_age
        self.min_gap = min_gap  # under listener churn, new sockets wait this long for their owners
        self.owners: dict[int, tuple[Process, ...]] = {}
        self.scanned_at = float("-inf")

    def lookup(self, inodes: set[int], now: float) -> dict[int, tuple[Process, ...]]:
        age = now - self.scanned_at
        if (inodes - self.owners.keys() and age >= self.min_gap) or age >= self.max_age:
            found = find_owners(inodes)
            # Sockets nobody readable holds are remembered as such, or every sweep would rescan.
            self.owners = {inode: found.get(inode, ()) for inode in inodes}
            self.scanned_at = now
        return self.owners
