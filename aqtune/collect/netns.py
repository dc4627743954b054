"""Find every network namespace on the host and run code inside one.

Namespaces come from three places: the host's (PID 1's), bind mounts under /run/netns (``ip netns``),
and the namespaces of running processes (containers). They are deduplicated by nsfs inode, which is
what the kernel reports as ``net:[INODE]``; a named mount wins over a ``pid:N`` name.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
RUN_NETNS = "/run/netns"
OWN_NS = "/proc/thread-self/ns/net"

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class NamespaceRef:
    name: str  # "host", a /run/netns name, or "pid:N"
    inode: int
    path: str  # a file that opens the namespace


class NamespaceGone(Exception):
    """The namespace disappeared (its last process exited or its mount was removed)."""


def _ns_inode_of_link(path: str) -> int | None:
    try:
        target = os.readlink(path)
    except OSError:
        return None
    if not target.startswith("net:["):
        return None
    return int(target[5:-1])


def list_namespaces(run_netns: str = RUN_NETNS, proc: str = "/proc") -> list[NamespaceRef]:
    """Every distinct network namespace, host first, then named ones, then process-only ones."""
    found: dict[int, NamespaceRef] = {}
    # PID 1's namespace is the host's; where PID 1 holds capabilities aqtune lacks (a sandbox),
    # its ns link is unreadable and aqtune's own namespace stands in.
    host_path = f"{proc}/1/ns/net"
    host_inode = _ns_inode_of_link(host_path)
    if host_inode is None:
        host_path = f"{proc}/{os.getpid()}/ns/net"
        host_inode = _ns_inode_of_link(host_path)
    if host_inode is None:
        raise PermissionError(f"cannot read {host_path}: aqtune needs root")
    found[host_inode] = NamespaceRef("host", host_inode, host_path)
    try:
        names = sorted(os.listdir(run_netns))
    except OSError:
        names = []
    nsfs_dev = os.stat(host_path).st_dev
    for name in names:
        path = f"{run_netns}/{name}"
        try:
            st = os.stat(path)
        except OSError:
            continue
        # A stale file left by a crashed `ip netns add` is not an nsfs mount.
        if st.st_dev == nsfs_dev and st.st_ino not in found:
            found[st.st_ino] = NamespaceRef(name, st.st_ino, path)
    pids = sorted(int(entry) for entry in os.listdir(proc) if entry.isdigit())
    for pid in pids:
        path = f"{proc}/{pid}/ns/net"
        inode = _ns_inode_of_link(path)
        if inode is not None and inode not in found:
            found[inode] = NamespaceRef(f"pid:{pid}", inode, path)
    return list(found.values())


def select_namespaces(available: list[NamespaceRef], wanted: str, run_netns: str = RUN_NETNS,
                      proc: str = "/proc") -> list[NamespaceRef]:
    """``all``, ``host``, a /run/netns name, ``pid:N`` (any process's namespace) or an inode number.

    A namespace is listed under one name, but a pid in it or a second /run/netns name for it
    (``ip netns attach``) selects it too.
    """
    if wanted == "all":
        return available
    inode: int | None = None
    if wanted.isdigit():
        inode = int(wanted)
    elif wanted.startswith("pid:") and wanted[4:].isdigit():
        inode = _ns_inode_of_link(f"{proc}/{wanted[4:]}/ns/net")
    elif "/" not in wanted and wanted not in ("", ".", ".."):
        with suppress(OSError):
            inode = os.stat(f"{run_netns}/{wanted}").st_ino
    for ref in available:
        if wanted == ref.name or inode == ref.inode:
            return [ref]
    known = ", ".join(ref.name for ref in available if not ref.name.startswith("pid:"))
    raise LookupError(f"unknown network namespace {wanted!r} (known: all, {known}; see `ip netns list`)")


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns into {what}: {os.strerror(err)}")


@contextmanager
def entered(ref: NamespaceRef) -> Iterator[None]:
    """Move the calling thread into ``ref`` for the block; sockets opened inside stay bound to it.

    /proc/thread-self/net and /proc/sys/net resolve against the calling thread's namespace, so
    counters and sysctls read inside the block are the namespace's own.
    """
    try:
        target = os.open(ref.path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise NamespaceGone(f"{ref.name}: {exc.strerror}") from exc
    try:
        if os.fstat(target).st_ino != ref.inode:
            raise NamespaceGone(f"{ref.name}: {ref.path} now holds another namespace")
        if _ns_inode_of_link(OWN_NS) == ref.inode:
            yield
            return
        own = os.open(OWN_NS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, ref.name)
            try:
                yield
            finally:
                _setns(own, "aqtune's own network namespace")
        finally:
            os.close(own)
    finally:
        os.close(target)
