"""Which process holds which socket: the walk over /proc/<pid>/fd, in this process or in a child
started first thing by a one-shot `aqtune status` (BackgroundScan).

Kept apart from procfs (and free of dataclasses) so that the command can fork the walk before it
imports the rest: the walk then overlaps every import and the namespaces' dumps."""

from __future__ import annotations

import contextlib
import marshal
import os
import signal
from collections.abc import Collection


def fd_socket(link: str) -> int | None:
    """The socket inode an fd's link names (``socket:[N]``), None for anything else."""
    if link.startswith("socket:[") and link.endswith("]"):
        try:
            return int(link[8:-1])
        except ValueError:
            return None
    return None


def socket_fds(fd_dir: str, inodes: Collection[int] | None,
               limit: int | None = None) -> tuple[dict[int, int], int]:
    """inode -> one fd of ``fd_dir`` on it, for the sockets of ``inodes`` (every socket for None)
    among its first ``limit`` entries (all without one), and how many entries were read. An fd
    directory that vanished (the process exited) or cannot be read gives what was read so far."""
    found: dict[int, int] = {}
    try:
        # Links read relative to the opened directory: the kernel walks one name per readlink
        # instead of four (/proc, the pid, fd, the fd), a sixth of a 10,000-descriptor scan.
        directory = os.open(fd_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:  # exited, or not ours to read
        return found, 0
    read = 0
    try:
        with os.scandir(directory) as entries:  # streamed: a process may hold a million descriptors
            for entry in entries:
                if limit is not None and read >= limit:
                    break
                read += 1
                try:
                    link = os.readlink(entry.name, dir_fd=directory)
                except OSError:
                    continue
                if link.startswith("socket:[") and (inode := fd_socket(link)) is not None \
                        and (inodes is None or inode in inodes) and inode not in found:
                    found[inode] = int(entry.name)
    except OSError:
        pass
    finally:
        os.close(directory)
    return found, read


def listing(proc: str) -> dict[str, int]:
    """Every entry of /proc with the inode its directory entry has. A process's entry keeps its inode
    while it lives; a pid reused by another process comes back with another one (procfs makes a new
    inode), so the pair tells a newcomer apart without reading anything of it."""
    with os.scandir(proc) as entries:
        return {entry.name: entry.inode() for entry in entries}


def scan_all(inodes: Collection[int], proc: str) -> tuple[dict[int, dict[int, int]], dict[str, int]]:
    """Every process's fds: pid -> {inode: fd} for the pids holding any of ``inodes``, and the listing."""
    held: dict[int, dict[int, int]] = {}
    listed = listing(proc)
    for name in listed:
        if name.isdigit():
            fds, _ = socket_fds(f"{proc}/{name}/fd", inodes)
            if fds:
                held[int(name)] = fds
    return held, listed


def socket_holders(inodes: set[int], proc: str = "/proc") -> dict[int, list[int]]:
    """inode -> pids holding an fd on it (several after fork or with prefork servers)."""
    holders: dict[int, list[int]] = {}
    if not inodes:
        return holders
    held, _ = scan_all(inodes, proc)
    for pid, fds in held.items():
        for inode in fds:
            holders.setdefault(inode, []).append(pid)
    return holders


# Socket descriptors a background scan hands back at most (a dozen bytes each through the pipe);
# beyond that it gives up and the caller scans for the sockets it wants itself.
BACKGROUND_SOCKETS_MAX = 500_000


def every_socket_holder(proc: str) -> dict[int, list[int]] | None:
    """socket inode -> pids holding it, for every socket of every process; None past BACKGROUND_SOCKETS_MAX."""
    holders: dict[int, list[int]] = {}
    count = 0
    for name in listing(proc):
        if name.isdigit():
            fds, _ = socket_fds(f"{proc}/{name}/fd", None)
            for inode in fds:
                holders.setdefault(inode, []).append(int(name))
            count += len(fds)
            if count > BACKGROUND_SOCKETS_MAX:
                return None
    return holders


class BackgroundScan:
    """The /proc descriptor walk of find_owners, run in a child process while the caller does other
    work: a one-shot `aqtune status` starts it first thing and dumps the namespaces meanwhile, so the
    walk (most of its time on a host with many sockets) runs on another CPU instead of after them.

    The child cannot know which sockets will be asked for, so it reports every socket's holders
    (bounded by BACKGROUND_SOCKETS_MAX); whatever goes wrong with it, ``holders`` scans in-process.
    """

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self.read_end, write_end = os.pipe2(os.O_CLOEXEC)
        self.finished = False  # reaped: its pid may name another process from then on
        try:
            self.pid = os.fork()
        except OSError:
            os.close(self.read_end)
            os.close(write_end)
            raise
        if self.pid == 0:  # the child: walk, send, and leave without running the parent's cleanup
            status = 1
            try:
                os.close(self.read_end)
                die_with_parent()
                found = every_socket_holder(proc)
                with os.fdopen(write_end, "wb") as out:
                    out.write(marshal.dumps(found))
                status = 0
            finally:
                os._exit(status)
        os.close(write_end)

    def holders(self, inodes: set[int]) -> dict[int, list[int]]:
        """inode -> pids holding it, for ``inodes``: from the child's walk, or scanned now if it failed."""
        try:
            pipe, self.read_end = os.fdopen(self.read_end, "rb"), -1  # the file object closes it
            with pipe:
                data = pipe.read()
            _, status = os.waitpid(self.pid, 0)
            self.finished = True
            found = marshal.loads(data) if status == 0 and data else None
        except (OSError, EOFError, ValueError, TypeError):
            found = None
        if not isinstance(found, dict):
            return socket_holders(inodes, self.proc)
        return {inode: found[inode] for inode in inodes if inode in found}

    def cancel(self) -> None:
        """Stop the walk if its result was not taken (the daemon's state answered, or an error)."""
        if self.finished:
            return
        self.finished = True
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        if self.read_end >= 0:
            with contextlib.suppress(OSError):
                os.close(self.read_end)
            self.read_end = -1


def die_with_parent() -> None:
    """PR_SET_PDEATHSIG: the walk ends if the command is killed before it reads the result."""
    import ctypes  # in the child only: the command itself need not load it

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
