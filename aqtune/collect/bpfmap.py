"""The running daemon's eBPF accept times, read from its own map by `aqtune connections`.

A one-shot command cannot learn when an existing connection was accepted: only the daemon's probes
saw it happen. Rather than pin the map in bpffs (a file that outlives the daemon, on a file system
the hardened unit keeps read-only), the command borrows the daemon's map descriptor with
pidfd_getfd(2) (Linux 5.6+, ptrace rights over the daemon: root has them) and looks slots up with
bpf(2) itself: no bcc, no compile. The map is recognised by its name and shape, and a slot's tag
(ebpf.accept_time_ns) makes a stale or foreign word read as "unknown", never as a wrong time.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from aqtune.collect.bpftables import SYS_BPF
from aqtune.collect.bpftables import syscall as _syscall
from aqtune.collect.ebpf import ACCEPT_SLOT_BITS, accept_time_ns, accept_time_slot

MAP_NAME = b"accept_times"
MAP_SHAPE = (4, 8, 1 << ACCEPT_SLOT_BITS)  # key size, value size, entries: BPF_ARRAY(accept_times, u64, ...)
SYS_PIDFD_GETFD = 438  # the same on every architecture (the unified syscall table)
BPF_MAP_LOOKUP_ELEM = 1
BPF_OBJ_GET_INFO_BY_FD = 15
MAP_INFO = struct.Struct("=IIIIII16s")  # bpf_map_info: type, id, key_size, value_size, max_entries, flags, name
MAX_MAP_FDS = 64  # bpf-map descriptors looked at in the daemon (it holds about a dozen)



class Unreadable(Exception):
    """The daemon's map cannot be read; the message says why."""


def _bpf(command: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    number = SYS_BPF.get(platform.machine())
    if number is None:
        raise Unreadable(f"reading eBPF maps is not implemented on {platform.machine()}")
    return _syscall(number, command, ctypes.addressof(attr), ctypes.sizeof(attr))


def map_info(fd: int) -> tuple[int, bytes, tuple[int, int, int]]:
    """(id, name, (key size, value size, entries)) of the map behind ``fd``."""
    info = ctypes.create_string_buffer(MAP_INFO.size)
    attr = ctypes.create_string_buffer(struct.pack("=IIQ", fd, MAP_INFO.size, ctypes.addressof(info)), 16)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    _type, map_id, key_size, value_size, entries, _flags, name = MAP_INFO.unpack(info.raw)
    return map_id, name.rstrip(b"\0"), (key_size, value_size, entries)


def lookup_u64(fd: int, key: int) -> int:
    """The u64 at u32 ``key`` of an array map."""
    key_buf = ctypes.create_string_buffer(struct.pack("=I", key), 4)
    value = ctypes.create_string_buffer(8)
    attr = ctypes.create_string_buffer(
        struct.pack("=IIQQQ", fd, 0, ctypes.addressof(key_buf), ctypes.addressof(value), 0), 32)
    _bpf(BPF_MAP_LOOKUP_ELEM, attr)
    return int(struct.unpack("=Q", value.raw)[0])


@dataclass
class AcceptTimes:
    """Accept times from the daemon's map(s), called like EventLayer.accepted_at; close() when done."""

    fds: list[int] = field(default_factory=list)

    def __call__(self, inodes: Iterable[int]) -> dict[int, float]:
        wall_minus_monotonic = time.time() - time.monotonic()
        found = {}
        for inode in inodes:
            for fd in self.fds:
                try:
                    at_ns = accept_time_ns(inode, lookup_u64(fd, accept_time_slot(inode)))
                except OSError:
                    continue
                if at_ns is not None:
                    found[inode] = at_ns / 1e9 + wall_minus_monotonic
                    break
        return found

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def _getfd(pidfd: int, target: int) -> int:
    return _syscall(SYS_PIDFD_GETFD, pidfd, target, 0)


def daemon_accept_times(pid: int, proc: str = "/proc") -> AcceptTimes:
    """The accept times kept by process ``pid``'s eBPF programs (the daemon's); Unreadable says why not."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        raise Unreadable(f"cannot open the daemon (pid {pid}): {exc.strerror}") from None
    times = AcceptTimes()
    try:
        try:
            fds = sorted(int(fd) for fd in os.listdir(f"{proc}/{pid}/fd"))
        except OSError as exc:
            raise Unreadable(f"cannot list the daemon's descriptors (pid {pid}): {exc.strerror}") from None
        looked = 0
        seen: set[int] = set()  # bcc may hold one map through two descriptors
        for fd in fds:
            try:
                if os.readlink(f"{proc}/{pid}/fd/{fd}") != "anon_inode:bpf-map":
                    continue
            except OSError:
                continue
            looked += 1
            if looked > MAX_MAP_FDS:
                break
            try:
                local = _getfd(pidfd, fd)
            except OSError as exc:
                raise Unreadable(f"pidfd_getfd on the daemon (pid {pid}) refused: {exc.strerror} "
                                 "(needs Linux 5.6+ and ptrace rights over it)") from None
            try:
                map_id, name, shape = map_info(local)
            except OSError:
                map_id, name, shape = 0, b"", (0, 0, 0)
            if name == MAP_NAME and shape == MAP_SHAPE and map_id not in seen:
                seen.add(map_id)
                times.fds.append(local)
            else:
                os.close(local)
    except BaseException:
        times.close()
        raise
    finally:
        os.close(pidfd)
    if not times.fds:
        raise Unreadable(f"the daemon (pid {pid}) holds no accept-times map: it runs without eBPF")
    return times
