"""Reads from /proc: who holds a socket inode, and a namespace's TcpExt counters and sysctls."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from aqtune.collect.fdwalk import BackgroundScan, fd_socket, listing, scan_all, socket_fds, socket_holders
from aqtune.records import COUNTERS, SYSCTLS, Process

# Bounds on what one process can make aqtune read: every one of these files is chosen by whoever
# runs the process (argv and the environment by the process itself, cgroup names under a delegated
# subtree by its user). A command line longer than CMDLINE_MAX is cut and marked.
CMDLINE_MAX = 4096
ENVIRON_MAX = 32768  # systemd puts LISTEN_* first; a server's environment rarely comes near this
CGROUP_MAX = 65536  # cgroup v1 lists a path per hierarchy, each up to PATH_MAX
SMALL_MAX = 4096  # comm, stat, a sysctl
NETSTAT_MAX = 1 << 20  # the kernel's own counter table (4 KB on 6.18 and growing with every release)
TRUNCATED = "..."

_UNIT = re.compile(r"[^/]+\.(?:service|scope|socket|mount|swap)$")
# A user manager's subtree is delegated to that user: every unit name under it is theirs to choose.
_USER_MANAGER = re.compile(r"user@\d+\.service")
# Host units that hold a container's processes even when no manager runs inside it.
_CONTAINER_UNIT = re.compile(
    r"(?:machine|docker|libpod|crio|cri-containerd|podman|lxc)-.+\.scope|systemd-nspawn@.+\.service")


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a process sits in systemd's tree, as its cgroup path says."""

    unit: str | None  # the system manager's unit (a container manager's, with container set)
    user_unit: str | None = None  # the unit of a user manager (user@UID.service), never taken for a system one
    container: str | None = None  # the host unit of the container the process runs in


def _cgroup_paths(text: str) -> list[str]:
    """The paths systemd placed a process at: cgroup v2's ``0::`` line first, then v1's name=systemd.

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
    return paths


def placement_from_cgroup(text: str) -> Placement:
    """The units of /proc/PID/cgroup's path, told apart by whose manager runs them.

    The outermost unit is the host system manager's. Units nested under it belong to a manager
    running inside: a user manager (user@UID.service, where any user names units as they like, so
    ``systemd-run --user --unit=nginx`` must never read as nginx.service) or a container's (its
    innermost unit is the one whose configuration needs a change, marked as the container's).
    """
    for path in _cgroup_paths(text):
        units = [part for part in path.split("/") if _UNIT.fullmatch(part)]
        if not units:
            continue
        outer, inner = units[0], units[-1]
        if _USER_MANAGER.fullmatch(outer):
            return Placement(None, user_unit=inner if len(units) > 1 else None)
        if len(units) > 1 or _CONTAINER_UNIT.fullmatch(outer):
            return Placement(inner, container=outer)
        return Placement(outer)
    return Placement(None)


def unit_from_cgroup(text: str) -> str | None:
    """The system manager's unit in /proc/PID/cgroup (see placement_from_cgroup)."""
    return placement_from_cgroup(text).unit


def _read_bounded(path: str, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of a /proc file and whether there was more."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    return data[:limit], len(data) > limit


read_bounded = _read_bounded  # for the other collectors' reads of /proc files a process chooses the size of


def _read(path: str, limit: int = SMALL_MAX) -> str:
    return _read_bounded(path, limit)[0].decode("utf-8", "backslashreplace")


def _complete_lines(data: bytes, truncated: bool, separator: bytes) -> list[bytes]:
    """Entries of a bounded read, less a last one the bound cut short."""
    entries = data.split(separator)
    if truncated and entries:
        entries.pop()
    return entries


def read_argv(pid: int, proc: str = "/proc") -> tuple[list[str], bool]:
    """argv of ``pid`` (at most CMDLINE_MAX bytes of it) and whether it was cut."""
    data, truncated = _read_bounded(f"{proc}/{pid}/cmdline", CMDLINE_MAX)
    # A process that rewrote its title (setproctitle, nginx, postgres) may leave one long string.
    words = data.rstrip(b"\0").split(b"\0") if data else []
    return [word.decode("utf-8", "backslashreplace") for word in words], truncated


@dataclass(frozen=True, slots=True)
class Stat:
    """The fields of /proc/PID/stat aqtune uses."""

    comm: str
    ppid: int
    threads: int
    starttime: int
    cpu_ticks: int  # utime + stime


def parse_stat(text: str) -> Stat | None:
    """/proc/PID/stat: comm (field 2) may hold spaces and parentheses, so fields resume after the last ')'."""
    close = text.rfind(")")
    fields = text[close + 2:].split()
    if close < 0 or len(fields) < 20:
        return None
    try:
        return Stat(text[text.find("(") + 1:close], int(fields[1]), int(fields[17]), int(fields[19]),
                    int(fields[11]) + int(fields[12]))
    except ValueError:
        return None


def read_stat(pid: int, proc: str = "/proc") -> Stat | None:
    try:
        return parse_stat(_read(f"{proc}/{pid}/stat"))
    except OSError:
        return None


def read_exe(pid: int, proc: str = "/proc") -> str:
    """Basename of the program ``pid`` runs; "" where it cannot be read (kernel threads, no ptrace right)."""
    try:
        target = os.readlink(f"{proc}/{pid}/exe")
    except OSError:
        return ""
    target = target.removesuffix(" (deleted)")  # replaced on disk by an upgrade: still the same program
    return target.rsplit("/", 1)[-1]


def parse_socket_activation(pid: int, environ: bytes, truncated: bool) -> bool:
    """Whether an initial environment says systemd passed this very process its sockets (sd_listen_fds)."""
    fds = listen_pid = None
    for entry in _complete_lines(environ, truncated, b"\0"):
        if entry.startswith(b"LISTEN_FDS="):
            fds = entry[11:]
        elif entry.startswith(b"LISTEN_PID="):
            listen_pid = entry[11:]
    return fds is not None and fds.isdigit() and int(fds) > 0 and listen_pid == str(pid).encode()


def read_socket_activation(pid: int, proc: str = "/proc") -> bool:
    try:
        environ, truncated = _read_bounded(f"{proc}/{pid}/environ", ENVIRON_MAX)
    except OSError:
        return False
    return parse_socket_activation(pid, environ, truncated)


@dataclass(frozen=True, slots=True)
class _Interpreter:
    """How an interpreter's argv names the program it runs."""

    takes_value: frozenset[str]  # options followed by a separate value that is not the program
    names_app: frozenset[str]  # options whose value is the program (python -m MODULE, php -f FILE)
    inline: frozenset[str]  # options that run code given on the command line: no program file
    combined: bool  # short options combine (python -um MODULE, -mMODULE)


_PYTHON = _Interpreter(frozenset({"-W", "-X", "--check-hash-based-pycs"}), frozenset({"-m"}),
                       frozenset({"-c"}), combined=True)
_NODE = _Interpreter(
    frozenset({"-r", "--require", "--import", "--loader", "--experimental-loader", "--input-type", "--title",
               "-C", "--conditions", "--env-file", "--inspect-port", "--openssl-config"}),
    frozenset(), frozenset({"-e", "--eval", "-p", "--print"}), combined=False)
_PHP = _Interpreter(frozenset({"-c", "-d", "-t", "-z"}), frozenset({"-f"}),
                    frozenset({"-r", "-B", "-R", "-F", "-E", "-S"}), combined=False)
_INTERPRETERS = (
    (re.compile(r"python[0-9.]*|pypy[0-9.]*"), _PYTHON),
    (re.compile(r"node(?:js)?[0-9.]*"), _NODE),
    (re.compile(r"php[0-9.]*(?:-cli)?"), _PHP),
)
_APP_MAX = 64


def interpreter_of(exe: str) -> tuple[re.Pattern[str], _Interpreter] | None:
    for pattern, interpreter in _INTERPRETERS:
        if pattern.fullmatch(exe):
            return pattern, interpreter
    return None


def _app_name(value: str, module: bool) -> str:
    name = value.split(".", 1)[0] if module else value.rsplit("/", 1)[-1]
    return name[:_APP_MAX]


def app_from_argv(exe: str, argv: list[str]) -> str:
    """The program an interpreter runs, from its argv: the script's basename, python's -m module's
    top package, or "" (inline code, stdin, not an interpreter, or nothing to go on).

    Options are skipped by the interpreter's own rules, and only the first operand counts: the
    arguments after it are the program's, whatever they mention (a uWSGI or a Python tool whose
    arguments name gunicorn is not gunicorn). A process that rewrote its title (setproctitle:
    "gunicorn: master [app]") leaves one string whose first word is the name it gave itself.
    """
    found = interpreter_of(exe)
    if found is None or not argv:
        return ""
    pattern, interpreter = found
    words = argv[0].split()
    first = words[0] if words else ""
    if not pattern.fullmatch(first.rsplit("/", 1)[-1]):
        return _app_name(first.rstrip(":"), module=False)
    args = argv[1:]
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            arg = args[i] if i < len(args) else "-"
        if arg == "-" or not arg.startswith("-"):
            return "" if arg == "-" else _app_name(arg, module=False)  # "-": the program comes on stdin
        if arg in interpreter.inline:
            return ""
        if arg in interpreter.names_app:
            return _app_name(args[i] if i < len(args) else "", module=arg == "-m")
        if arg in interpreter.takes_value:
            i += 1
            continue
        if arg.startswith("--") or not interpreter.combined:
            continue
        # Combined short options (python -uBm MODULE, -mMODULE): the first that takes a value ends the word.
        for index, option in enumerate(arg[1:], start=1):
            flag, rest = "-" + option, arg[index + 1:]
            if flag in interpreter.inline:
                return ""
            if flag in interpreter.names_app:
                value = rest or (args[i] if i < len(args) else "")
                return _app_name(value, module=flag == "-m")
            if flag in interpreter.takes_value:
                i += 0 if rest else 1
                break
    return ""


def describe_process(pid: int, proc: str = "/proc") -> Process | None:
    """Who ``pid`` is (comm, cmdline, exe, the app an interpreter runs, units, parent, threads, start);
    None if it exited meanwhile. Every read is bounded: all of it is the process owner's to choose."""
    try:
        comm = _read(f"{proc}/{pid}/comm").rstrip("\n")
        argv, truncated = read_argv(pid, proc)
        cgroup_bytes, cgroup_cut = _read_bounded(f"{proc}/{pid}/cgroup", CGROUP_MAX)
    except OSError:
        return None
    cgroup = b"\n".join(_complete_lines(cgroup_bytes, cgroup_cut, b"\n")).decode("utf-8", "backslashreplace")
    cmdline = " ".join(argv).strip() + (TRUNCATED if truncated else "")
    placement = placement_from_cgroup(cgroup)
    exe = read_exe(pid, proc)
    stat = read_stat(pid, proc)
    return Process(
        pid, comm, cmdline, placement.unit,
        exe=exe,
        app=app_from_argv(exe, argv),
        socket_activated=read_socket_activation(pid, proc),
        user_unit=placement.user_unit,
        container=placement.container,
        ppid=stat.ppid if stat else 0,
        threads=stat.threads if stat else 0,
        starttime=stat.starttime if stat else 0,
    )


def find_owners(inodes: set[int], proc: str = "/proc",
                background: BackgroundScan | None = None) -> dict[int, tuple[Process, ...]]:
    """inode -> the processes holding it, described once per pid; ``background`` is a walk already
    under way (BackgroundScan) to take the holders from."""
    described: dict[int, Process | None] = {}
    # One tuple per set of holders: a server's sockets share it, and status encodes it once.
    shared: dict[tuple[int, ...], tuple[Process, ...]] = {}
    owners: dict[int, tuple[Process, ...]] = {}
    holders = background.holders(inodes) if background is not None else socket_holders(inodes, proc)
    for inode, pids in holders.items():
        key = tuple(pids)
        if key not in shared:
            for pid in key:
                if pid not in described:
                    described[pid] = describe_process(pid, proc)
            shared[key] = tuple(process for pid in key if (process := described[pid]) is not None)
        owners[inode] = shared[key]
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
    return _reported(_read("/proc/thread-self/net/netstat", NETSTAT_MAX))


def _reported(netstat: str) -> dict[str, int]:
    tcpext = parse_netstat(netstat)
    return {name: tcpext[name] for name in COUNTERS if name in tcpext}


def open_counters() -> int:
    """/proc/net/netstat of the calling thread's network namespace, kept open: the file stays bound
    to that namespace, so read_counters_at reads it again from anywhere, without entering it."""
    return os.open("/proc/thread-self/net/netstat", os.O_RDONLY | os.O_CLOEXEC)


def read_counters_at(fd: int) -> dict[str, int]:
    """read_counters for the namespace an open_counters() descriptor is bound to (the kernel writes
    the text afresh for each read from the start)."""
    chunks: list[bytes] = []
    size = 0
    while size <= NETSTAT_MAX:
        chunk = os.pread(fd, min(1 << 16, NETSTAT_MAX + 1 - size), size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return _reported(b"".join(chunks)[:NETSTAT_MAX].decode("utf-8", "backslashreplace"))


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
        stat = read_stat(pid, proc)
        if stat is not None:
            times[pid] = stat.cpu_ticks / _CLOCK_TICKS
    return times


def follow_exec(process: Process, proc: str = "/proc") -> Process | None:
    """``process`` as it is now: itself if it still runs the same program, described afresh after an
    exec (its name or program changed), None once the pid is gone or names another process (same
    pid, another start time: the pid was reused, and the newcomer does not hold the old sockets)."""
    stat = read_stat(process.pid, proc)
    if stat is None or (process.starttime and stat.starttime != process.starttime):
        return None
    if stat.comm == process.comm and (not process.exe or read_exe(process.pid, proc) == process.exe):
        return process
    fresh = describe_process(process.pid, proc)
    if fresh is None or (process.starttime and fresh.starttime != process.starttime):
        return None
    return fresh


# The owner cache's bounds and periods. Any local user can start processes and open descriptors, so
# what one lookup reads of /proc between full scans is bounded; the rest waits for the next lookup.
# A new process costs ~160 us when it holds a tracked socket (its fds, then describe_process), so 32
# bound a lookup near 5 ms: a prefork server starting 64 workers is known within two sweeps, and a
# fork-per-connection server under load, or a burst of short-lived processes, cannot make each
# sweep read hundreds of them (the backlog is read oldest first, so none waits for ever).
SCAN_PIDS_PER_LOOKUP = 32
# Descriptors read per lookup for those (a readlink each, ~5 us: ~20 ms). One process's scan reads
# at most this many too, so a lookup reads at most twice it; a process with more descriptors (a
# server's connections) has the rest read by the full scans: inherited listeners sit at low numbers.
SCAN_FDS_PER_LOOKUP = 4096
# The full scan's safety period. Between full scans a process that did not hold a socket when it was
# first seen is never read again, so one that is handed a listener later (SCM_RIGHTS, pidfd_getfd)
# is found only by the next full scan: rare, and costly at many listeners (a readlink per descriptor
# of every process, 60 ms at 10,000 listeners).
FULL_SCAN_EVERY = 600.0


@dataclass(slots=True)
class _Holder:
    """A process known to hold tracked sockets: one of its fds on each (enough to re-check it cheaply)."""

    process: Process
    fds: dict[int, int] = field(default_factory=dict)  # inode -> fd


class OwnerCache:
    """Owners by socket inode, with only what changed read again.

    The /proc fd scan (every descriptor of every process) is the most expensive part of a sweep; a
    daemon sweeping quiet listeners every second does it rarely. A full scan happens when sockets
    no full scan looked for appear (at most every ``min_gap``) and every ``full_every`` regardless.
    Between them each lookup:

    - lists /proc once and scans the fds of processes not seen before (a prefork server's new
      worker, a socket-activated service), a bounded number per lookup, and forgets those gone;
    - checks each holder with one stat read: one that exec'd is described again (owner names follow
      exec), one that exited or whose pid now names another process (another start time) is dropped;
    - every ``max_age``, re-reads the one fd remembered per holder and socket (a readlink); a holder
      whose fd no longer names the socket has its fds scanned again (it may hold it on another).

    Memory: the holders of the sockets asked for in the last ``max_age``, and the /proc listing
    (one entry per process).
    """

    # A holder that closed its fd on a listener but lives on is shown as its owner until max_age: the
    # re-read costs a readlink per listener (~3.5 ms at 1,000), a tenth of an idle daemon's CPU at 30 s.
    def __init__(self, max_age: float = 60.0, min_gap: float = 5.0, proc: str = "/proc",
                 full_every: float = FULL_SCAN_EVERY) -> None:
        self.max_age = max_age  # a holder's fd is re-read at least this often
        self.min_gap = min_gap  # under listener churn, new sockets wait this long for the full scan
        self.full_every = full_every
        self.proc = proc
        self.owners: dict[int, tuple[Process, ...]] = {}
        self.scanned_at = float("-inf")  # the last full scan
        self.checked_at = float("-inf")  # the last re-read of the holders' fds
        self.full_scans = 0  # counters, for tests and benchmarks
        self.pid_scans = 0
        self._holders: dict[int, _Holder] = {}  # by pid
        self._asked: dict[int, float] = {}  # tracked inode -> when it was last asked for
        self._last_asked: set[int] = set()
        self._known: set[int] = set()  # inodes the last full scan looked for: all their holders are known
        self._listed: dict[str, int] = {}  # the last /proc listing
        self._new: dict[int, None] = {}  # pids listed but not yet scanned, oldest first
        self._rescan: dict[int, None] = {}  # holders whose remembered fd no longer names its socket

    def lookup(self, inodes: set[int], now: float, complete: bool = False) -> dict[int, tuple[Process, ...]]:
        """inode -> the processes holding it, for ``inodes`` and the others asked for lately.

        ``complete``: ``inodes`` are every listener there is (the sweep tracked all it found), so one
        not among them is closed and forgotten now; otherwise it is kept for ``max_age``, as the next
        sweep may track it again. Under a churn of listeners this keeps the cache at the listeners of
        now instead of every one opened within ``max_age`` (ten times as many in the load benchmark)."""
        asked = inodes != self._last_asked
        if asked:  # only when the set moved: a quiet daemon asks for the same one every sweep
            self._last_asked = set(inodes)
            self._forget(now, complete)
        age = now - self.scanned_at
        due = age < 0 or age >= self.full_every  # (a clock stepped back counts as due)
        if due or (not inodes <= self._known and age >= self.min_gap):
            self._full_scan(now, complete)
            changed = True
        elif not self._asked:
            changed = False  # no socket to look for: no reason to read /proc
        else:
            changed = self._follow_listing()
            changed |= self._follow_holders()
            since = now - self.checked_at
            if since < 0 or since >= self.max_age:
                changed |= self._recheck_fds()
                self.checked_at = now
            changed |= self._scan_some()
        if changed or asked:
            self._rebuild()
        return self.owners

    def _forget(self, now: float, complete: bool) -> None:
        """Track the sockets asked for now and, unless that was ``complete``, in the last ``max_age`` (a
        sweep over more listeners than its budget asks for a different share each time); forget the
        others and their holders."""
        for inode in self._last_asked:
            self._asked[inode] = now
        if len(self._asked) == len(self._last_asked):
            return
        self._asked = {inode: at for inode, at in self._asked.items()
                       if now - at < self.max_age and (not complete or at == now)}
        self._known &= self._asked.keys()
        for pid, holder in list(self._holders.items()):
            holder.fds = {inode: fd for inode, fd in holder.fds.items() if inode in self._asked}
            if not holder.fds:
                del self._holders[pid]

    def _full_scan(self, now: float, complete: bool) -> None:
        self._forget(now, complete)
        wanted = set(self._asked)
        held, self._listed = scan_all(wanted, self.proc) if wanted else ({}, listing(self.proc))
        holders: dict[int, _Holder] = {}
        for pid, fds in held.items():
            old = self._holders.get(pid)
            # The same process (same start time) is kept as it is, or described again after an exec.
            process = follow_exec(old.process, self.proc) if old else None
            if process is None:
                process = describe_process(pid, self.proc)
            if process is not None:
                holders[pid] = _Holder(process, fds)
        self._holders = holders
        self._known = wanted
        self._new.clear()
        self._rescan.clear()
        self.scanned_at = self.checked_at = now
        self.full_scans += 1

    def _follow_listing(self) -> bool:
        """Queue the pids new to /proc (or reused: another entry inode), forget the ones gone."""
        listed = listing(self.proc)
        if listed == self._listed:
            return False
        changed = False
        before = self._listed
        for name, inode in listed.items():
            if before.get(name) != inode and name.isdigit():
                # New, or a pid reused (a holder's reuse is caught by its start time, below).
                self._new[int(name)] = None
        for name in before.keys() - listed.keys():
            if name.isdigit():
                pid = int(name)
                self._new.pop(pid, None)
                self._rescan.pop(pid, None)
                changed |= self._holders.pop(pid, None) is not None
        self._listed = listed
        return changed

    def _follow_holders(self) -> bool:
        changed = False
        for pid, holder in list(self._holders.items()):
            process = follow_exec(holder.process, self.proc)
            if process is None:
                del self._holders[pid]
                self._rescan.pop(pid, None)
                changed = True
            elif process is not holder.process:
                holder.process = process
                changed = True
        return changed

    def _recheck_fds(self) -> bool:
        """One readlink per holder and socket; a socket whose fd names something else now is taken
        from the holder, and the holder queued for a scan of its fds."""
        changed = False
        for pid, holder in self._holders.items():
            try:
                directory = os.open(f"{self.proc}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                directory = None  # exited: every fd below reads as gone
            try:
                for inode, fd in list(holder.fds.items()):
                    try:  # relative to the opened directory, as in socket_fds
                        named = fd_socket(os.readlink(str(fd), dir_fd=directory)) if directory is not None else None
                    except OSError:
                        named = None
                    if named != inode:
                        del holder.fds[inode]
                        self._rescan[pid] = None
                        changed = True
            finally:
                if directory is not None:
                    os.close(directory)
        return changed

    def _scan_some(self) -> bool:
        """Scan the queued pids' fds for the tracked sockets, holders to re-check first, within the bounds."""
        wanted = self._asked.keys()
        if not wanted:  # nothing to look for: the queued pids count as seen
            self._new.clear()
            self._rescan.clear()
            return False
        changed = False
        scanned = read = 0
        for queue, rescan in ((self._rescan, True), (self._new, False)):
            for pid in list(queue):
                if scanned >= SCAN_PIDS_PER_LOOKUP or read >= SCAN_FDS_PER_LOOKUP:
                    return changed
                del queue[pid]
                fds, count = socket_fds(f"{self.proc}/{pid}/fd", wanted, SCAN_FDS_PER_LOOKUP)
                scanned += 1
                read += count
                self.pid_scans += 1
                changed |= self._found(pid, fds, rescan)
        return changed

    def _found(self, pid: int, fds: dict[int, int], rescan: bool) -> bool:
        """Record a scan of ``pid``'s fds: all of them (a new pid), or a holder's after a failed re-check."""
        holder = self._holders.get(pid)
        if holder is not None:  # the same process (its start time was checked this lookup)
            if rescan:
                fds = holder.fds | fds  # what it still held passed its re-check
            changed = fds != holder.fds or not fds
            holder.fds = fds
            if not fds:
                del self._holders[pid]
            return changed
        if not fds:
            return False
        process = describe_process(pid, self.proc)
        if process is None:
            return False
        self._holders[pid] = _Holder(process, fds)
        return True

    def _rebuild(self) -> None:
        owners: dict[int, list[Process]] = {inode: [] for inode in self._asked}
        for pid in sorted(self._holders):
            holder = self._holders[pid]
            for inode in holder.fds:
                owners.setdefault(inode, []).append(holder.process)
        self.owners = {inode: tuple(processes) for inode, processes in owners.items()}
