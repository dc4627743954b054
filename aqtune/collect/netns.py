"""Find every network namespace on the host, tell them apart over time, and run code inside one.

Namespaces come from three places: the host's (PID 1's), bind mounts under /run/netns (``ip netns``),
and the namespaces of running processes (containers). They are deduplicated by nsfs inode, which is
what the kernel reports as ``net:[INODE]``.

An inode alone does not identify a namespace over time: the kernel hands a dead namespace's inode
number to the next namespace created (of any type, often within a second). Each namespace is
therefore also identified by its cookie (``SO_NETNS_COOKIE`` on a socket opened inside it, Linux
5.14+), a 64-bit number the kernel never reuses while it runs. Whatever aqtune remembers about a
namespace (its name, the sysctls it changed there) is keyed by both, and ``entered`` refuses to run
code in a namespace whose cookie is not the one expected.

Names: "host"; a /run/netns name (only root can create one); else the systemd unit that owns the
namespace, when every process of a system unit (machine-foo.scope, docker-ID.scope, a .service with
PrivateNetwork=) is inside it; else ``pid:N`` of its longest-lived process. A name, once given, is
kept while the namespace lives (``NameBook``), so it does not change when that process exits; any
pid in the namespace selects it.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import socket
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
RUN_NETNS = "/run/netns"
OWN_NS = "/proc/thread-self/ns/net"
SO_NETNS_COOKIE = 71  # asm-generic/socket.h, Linux 5.14+
NS_GET_USERNS = 0xB701  # _IO(NSIO, 0x1): an fd of the user namespace owning a namespace
NS_GET_OWNER_UID = 0xB704  # _IO(NSIO, 0x4): the uid that created a user namespace
NS_GET_ID = 0x8008B70D  # _IOR(NSIO, 13, __u64), Linux 6.18+: a namespace's id, a network namespace's cookie
INIT_USER_NS_INODE = 0xEFFFFFFD  # PROC_USER_INIT_INO: the initial user namespace's fixed inode
UNIT_DIR_LIMIT = 256  # cgroup directories read to check that a unit lives in one namespace
UNIT_PID_LIMIT = 4096  # processes of such a unit checked; a larger unit is not used as a name
UNIT_HOLDERS = 8  # a namespace's oldest processes whose cgroup is read to find its unit
LISTED_IN_ERRORS = 20  # names an "unknown namespace" message lists at most

_libc = ctypes.CDLL(None, use_errno=True)
# A unit name as systemd writes it into a cgroup path; anything else (odd characters, very long)
# is not used as a namespace name.
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\@-]{1,200}\.(?:service|scope)")


@dataclass(frozen=True, slots=True)
class NamespaceRef:
    name: str  # "host", a /run/netns name, a systemd unit, or "pid:N"
    inode: int
    path: str  # a file that opens the namespace
    # SO_NETNS_COOKIE: with the inode, what proves a namespace is the one seen before. None when
    # unknown (kernel before 5.14, or no privilege to enter it); ``entered`` then checks the inode only.
    cookie: int | None = None
    # Owned by a user namespace other than the host's (a rootless container, `unshare -rn`):
    # whoever created that user namespace is root inside it and controls what listens there.
    user_owned: bool = False
    owner_uid: int | None = None  # the uid that created the owning user namespace, when user_owned


class NamespaceGone(Exception):
    """The namespace disappeared (its last process exited or its mount was removed), or another one
    now has its inode."""


def _ns_inode_of_link(path: str) -> int | None:
    try:
        target = os.readlink(path)
    except OSError:
        return None
    if not target.startswith("net:[") or not target.endswith("]") or not target[5:-1].isdigit():
        return None
    return int(target[5:-1])


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns into {what}: {os.strerror(err)}")


def current_cookie() -> int | None:
    """The cookie of the calling thread's network namespace; None where the kernel has none."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            value: int = struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
            return value
    except OSError:  # ENOPROTOOPT before 5.14
        return None


def _ns_id(fd: int) -> int | None:
    value = bytearray(8)
    try:
        fcntl.ioctl(fd, NS_GET_ID, value)
    except OSError:  # ENOTTY before 6.18
        return None
    number: int = struct.unpack("=Q", value)[0]
    return number


_id_is_cookie: bool | None = None


def _cookie_by_ioctl() -> bool:
    """Whether NS_GET_ID gives a network namespace's cookie here (checked once, on aqtune's own):
    then no setns is needed to read one."""
    global _id_is_cookie
    if _id_is_cookie is None:
        try:
            fd = os.open(OWN_NS, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            ns_id = _ns_id(fd)
            _id_is_cookie = ns_id is not None and ns_id == current_cookie()
        finally:
            os.close(fd)
    return _id_is_cookie


def _cookie_of_fd(fd: int, inode: int) -> int | None:
    """The cookie of the namespace open at ``fd``: from NS_GET_ID where that is the cookie, else
    from a socket opened inside the namespace for a moment."""
    if _cookie_by_ioctl():
        return _ns_id(fd)
    if _ns_inode_of_link(OWN_NS) == inode:
        return current_cookie()
    try:
        own = os.open(OWN_NS, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            return None  # not privileged to enter it: the cookie stays unknown
        try:
            return current_cookie()
        finally:
            _setns(own, "aqtune's own network namespace")
    finally:
        os.close(own)


def host_user_namespace(proc: str = "/proc") -> int:
    """The inode of the host's user namespace: PID 1's (in a container with a user namespace of its
    own, the container's), else aqtune's own where PID 1's is hidden (a sandbox)."""
    for path in (f"{proc}/1/ns/user", f"{proc}/self/ns/user"):
        with suppress(OSError):
            target = os.readlink(path)
            if target.startswith("user:[") and target[6:-1].isdigit():
                return int(target[6:-1])
    return INIT_USER_NS_INODE


def _owner_of_fd(fd: int, host_userns: int) -> tuple[bool, int | None]:
    """(owned by a user namespace other than the host's, the uid that created that one)."""
    try:
        userns = fcntl.ioctl(fd, NS_GET_USERNS)
    except OSError:
        # EPERM: its owner is not aqtune's user namespace or one below it (aqtune itself runs in a
        # child user namespace): not provably the host's, so not treated as the host's.
        return True, None
    try:
        if os.fstat(userns).st_ino == host_userns:
            return False, None
        uid = bytearray(4)
        try:
            fcntl.ioctl(userns, NS_GET_OWNER_UID, uid)
        except OSError:
            return True, None
        owner: int = struct.unpack("=I", uid)[0]
        return True, owner
    finally:
        os.close(userns)


@dataclass(frozen=True, slots=True)
class _Identity:
    cookie: int | None
    user_owned: bool
    owner_uid: int | None


def _identify(path: str, inode: int, host_userns: int = INIT_USER_NS_INODE) -> _Identity | None:
    """Cookie and owner of the namespace at ``path``; None if it is gone or now another inode."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_ino != inode:
            return None
        user_owned, owner_uid = _owner_of_fd(fd, host_userns)
        return _Identity(_cookie_of_fd(fd, inode), user_owned, owner_uid)
    finally:
        os.close(fd)


def cookie_of(path: str) -> int | None:
    """The cookie of the namespace a file opens (/run/netns/NAME, /proc/PID/ns/net); None if unknown."""
    try:
        inode = os.stat(path).st_ino
    except OSError:
        return None
    identity = _identify(path, inode)
    return identity.cookie if identity else None


# --- names -------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class NameBook:
    """What aqtune learnt about each namespace only processes hold, kept while it lives: its
    identity (cookie and owner) and the name aqtune gave it.

    Names: such a namespace is named after the oldest of its processes; without this book it would
    be renamed whenever that process exits. Identities: reading a cookie and an owner costs an open
    and three ioctls per namespace, and anyone can create thousands of namespaces; a daemon listing
    them every sweep reads each once, and after that only checks that a process that held it then
    (its witness) still holds that inode: a namespace reusing the inode of a dead one has none of
    the dead one's processes. A remembered cookie is also checked wherever the namespace is entered
    (``entered``). Only identities with a cookie are remembered: without one, inode reuse could not
    be told apart.
    """

    known: dict[int, tuple[_Identity, str, int]] = field(default_factory=dict)  # inode -> identity, name, witness

    def identity(self, inode: int, holders: Iterable[int]) -> _Identity | None:
        """The remembered identity, if its witness is among the namespace's ``holders`` now."""
        entry = self.known.get(inode)
        return entry[0] if entry is not None and entry[2] in holders else None

    def name(self, inode: int, cookie: int | None) -> str | None:
        entry = self.known.get(inode)
        if entry is None or cookie is None or entry[0].cookie != cookie:
            return None
        return entry[1]

    def remember(self, inode: int, identity: _Identity, name: str, witness: int) -> None:
        if identity.cookie is not None:
            self.known[inode] = (identity, name, witness)

    def forget(self, inode: int) -> None:
        self.known.pop(inode, None)

    def keep_only(self, inodes: set[int]) -> None:
        for inode in set(self.known) - inodes:
            del self.known[inode]


# The process-wide book: the daemon lists namespaces every sweep and its names must stay put;
# a one-shot command lists once, where the book changes nothing.
BOOK = NameBook()


def _start_time(pid: int, proc: str) -> int | None:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses; the fields after its last ")" are fixed.
    fields = text.rpartition(b")")[2].split()
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def _cgroup_path(pid: int, proc: str) -> tuple[str, str] | None:
    """("v2" or "v1", the process's systemd cgroup path), from cgroup v2's 0:: line or v1's name=systemd.

    A v1 host with cgroup2 mounted somewhere lists ``0::/`` for every process: an empty path does
    not hide the v1 one.
    """
    try:
        with open(f"{proc}/{pid}/cgroup", "rb") as f:
            text = f.read(65536).decode("utf-8", "replace")
    except OSError:
        return None
    found: list[tuple[str, str]] = []
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "" and path not in ("", "/"):
            found.insert(0, ("v2", path))
        elif controllers == "name=systemd" and path not in ("", "/"):
            found.append(("v1", path))
    return found[0] if found else None


def system_unit(path: str) -> tuple[str, str] | None:
    """The system manager's unit a cgroup path lies in (the first unit below the slices), with the
    path up to it; None when there is none.

    A container's own units (machine-foo.scope/payload/system.slice/nginx.service) and anything
    under user.slice (user managers, login sessions, which any user can create) are not it.
    """
    parts = [part for part in path.split("/") if part]
    if not parts or parts[0] == "user.slice":
        return None
    for depth, part in enumerate(parts):
        if part.endswith(".slice"):
            continue
        return (part, "/" + "/".join(parts[:depth + 1])) if _UNIT_NAME.fullmatch(part) else None
    return None


def _cgroup_mounts(proc: str = "/proc") -> dict[str, str]:
    """{"v2": mount point of cgroup2, "v1": mount point of v1's name=systemd hierarchy}."""
    mounts: dict[str, str] = {}
    try:
        with open(f"{proc}/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return mounts
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or fields[3] != "/":
            continue  # a bind of a sub-tree (cgroup namespace): paths would not line up
        point = fields[4].replace("\\040", " ")
        if tail[0] == "cgroup2":
            mounts.setdefault("v2", point)
        elif tail[0] == "cgroup" and "name=systemd" in tail[2].split(","):
            mounts.setdefault("v1", point)
    return mounts


def _unit_pids(directory: str) -> set[int] | None:
    """Every pid in a cgroup tree, or None if it cannot be read within the limits."""
    pids: set[int] = set()
    pending = [directory]
    seen = 0
    while pending:
        current = pending.pop()
        seen += 1
        if seen > UNIT_DIR_LIMIT:
            return None
        try:
            with open(f"{current}/cgroup.procs", encoding="ascii") as f:
                pids.update(int(line) for line in f.read().split())
            entries = list(os.scandir(current))
        except (OSError, ValueError):
            return None
        if len(pids) > UNIT_PID_LIMIT:
            return None
        pending += [entry.path for entry in entries if entry.is_dir(follow_symlinks=False)]
    return pids


def _unit_name(inode: int, holders: list[int], inode_of: dict[int, int], proc: str,
               mounts: dict[str, str], taken: set[str]) -> str | None:
    """The system unit whose every process is in this namespace, if one of its oldest holders lies in one."""
    for pid in holders[:UNIT_HOLDERS]:
        found = _cgroup_path(pid, proc)
        unit = system_unit(found[1]) if found else None
        if found is None or unit is None or unit[0] in taken or found[0] not in mounts:
            continue
        pids = _unit_pids(mounts[found[0]] + unit[1])
        if not pids:
            return None
        for member in pids:
            where = inode_of.get(member)
            if where is None:
                where = _ns_inode_of_link(f"{proc}/{member}/ns/net")
            # A process that exited meanwhile (or a zombie) says nothing either way.
            if where is not None and where != inode:
                return None
        return unit[0]
    return None


def list_namespaces(run_netns: str = RUN_NETNS, proc: str = "/proc", book: NameBook | None = BOOK,
                    identify: bool = True, processes: bool = True) -> list[NamespaceRef]:
    """Every distinct network namespace, host first, then named ones, then process-only ones.

    ``processes=False``: the host's and the /run/netns ones only, without the walk of every process's
    ns link that finds the others (what a selection by name needs: Selection.by_processes).

    ``identify``: also give each one's cookie and owner: read (an open and three ioctls, or a setns
    before Linux 6.18) for namespaces the ``book`` does not know, remembered for those it does.
    A remembered cookie is verified when the namespace is entered; ``book=None`` reads every one
    now (rollback, which decides on them before entering).
    """
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

    host_userns = host_user_namespace(proc) if identify else INIT_USER_NS_INODE
    unknown = _Identity(None, False, None)

    def identity_of(path: str, inode: int) -> _Identity:
        return (_identify(path, inode, host_userns) or unknown) if identify else unknown

    host = identity_of(host_path, host_inode)
    found[host_inode] = NamespaceRef("host", host_inode, host_path, host.cookie)
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
            ident = identity_of(path, st.st_ino)
            found[st.st_ino] = NamespaceRef(name, st.st_ino, path, ident.cookie, ident.user_owned, ident.owner_uid)
    if not processes:
        return list(found.values())
    holders: dict[int, list[int]] = {}
    inode_of: dict[int, int] = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        pid = int(entry)
        inode = _ns_inode_of_link(f"{proc}/{pid}/ns/net")
        if inode is None:
            continue
        inode_of[pid] = inode
        if inode not in found:
            holders.setdefault(inode, []).append(pid)
    taken = {ref.name for ref in found.values()}
    # Names kept from earlier listings first, so that a new namespace cannot take one of them.
    identities = {inode: (book.identity(inode, pids) if book is not None and identify else None)
                  or identity_of(f"{proc}/{min(pids)}/ns/net", inode) for inode, pids in holders.items()}
    kept = {inode: known for inode in holders
            if book is not None and (known := book.name(inode, identities[inode].cookie)) is not None}
    taken |= set(kept.values())
    mounts: dict[str, str] | None = None
    unnamed: list[NamespaceRef] = []
    for inode, pids in holders.items():
        if inode in kept:
            name = kept[inode]
            held = int(name[4:]) if name.startswith("pid:") and name[4:].isdigit() else None
            witness = held if held in pids else min(pids)
        else:
            # Oldest first: the longest-lived process names it, and is the likeliest to outlive the sweep.
            by_age = sorted(pids, key=lambda p: (_start_time(p, proc) or 0, p))
            if mounts is None:
                mounts = _cgroup_mounts(proc)
            # pid:N of a process that exited may still name another namespace (kept above), and its
            # number may have been reused here: the next oldest then names this one.
            name = (_unit_name(inode, by_age, inode_of, proc, mounts, taken)
                    or next((f"pid:{p}" for p in by_age if f"pid:{p}" not in taken), str(inode)))
            witness = by_age[0]
            taken.add(name)
        ident = identities[inode]
        path = f"{proc}/{witness}/ns/net"
        if book is not None:
            # Only the names aqtune derived: a /run/netns name is the administrator's and goes with
            # its mount (/run/netns namespaces are root's, few, and identified at every listing).
            book.remember(inode, ident, name, witness)
        unnamed.append(NamespaceRef(name, inode, path, ident.cookie, ident.user_owned, ident.owner_uid))
    refs = [*found.values(), *sorted(unnamed, key=_pid_order)]
    if book is not None:
        book.keep_only({ref.inode for ref in refs})
    return refs


def _pid_order(ref: NamespaceRef) -> tuple[int, str]:
    number = ref.name[4:] if ref.name.startswith("pid:") else ""
    return (int(number) if number.isdigit() else -1, ref.name)


# --- selection ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selection:
    """What `--netns` asked for, pinned to the namespace it meant when it was resolved.

    "all", "host" and /run/netns names are followed by name; anything else (``pid:N``, a unit
    name, an inode number) by identity: the namespace it named at start-up, through its inode and
    cookie, so a daemon started with ``--netns pid:N`` follows the namespace after N exits and never
    a new namespace that reuses the inode.
    """

    wanted: str
    inode: int | None = None  # None: follow ``wanted`` by name
    cookie: int | None = None
    name: str | None = None  # the namespace's name when it was resolved

    @property
    def by_processes(self) -> bool:
        """Whether finding it takes the namespaces only processes hold (all, or one pinned by identity):
        "host" and a /run/netns name do not, and a daemon watching one of them skips that /proc walk."""
        return self.wanted == "all" or self.inode is not None


def _by_name(wanted: str, run_netns: str) -> bool:
    if wanted in ("all", "host"):
        return True
    if wanted.startswith("pid:") or wanted.isdigit() or "/" in wanted or wanted in ("", ".", ".."):
        return False
    return os.path.lexists(f"{run_netns}/{wanted}")


def resolve_selection(wanted: str | Selection, available: list[NamespaceRef] | None = None,
                      run_netns: str = RUN_NETNS, proc: str = "/proc") -> Selection:
    """Pin ``wanted`` (as `--netns` takes it) to a namespace now; raises LookupError if none matches.

    The daemon resolves its `--netns` once at start and passes the Selection to every sweep.
    """
    if not isinstance(wanted, str):
        return wanted
    if _by_name(wanted, run_netns):
        if wanted not in ("all", "host"):
            select_namespaces(available if available is not None else list_namespaces(run_netns, proc), wanted,
                              run_netns, proc)
        return Selection(wanted)
    (ref,) = select_namespaces(available if available is not None else list_namespaces(run_netns, proc), wanted,
                               run_netns, proc)
    return Selection(wanted, ref.inode, ref.cookie, ref.name)


def _unknown(wanted: str, available: list[NamespaceRef]) -> LookupError:
    names = [ref.name for ref in available if not ref.name.startswith("pid:")]
    known = ", ".join(names[:LISTED_IN_ERRORS]) + (f", ... ({len(names)} in all)" if len(names) > LISTED_IN_ERRORS
                                                   else "")
    return LookupError(f"unknown network namespace {wanted!r} (known: all, {known}; see `ip netns list`)")


def select_namespaces(available: list[NamespaceRef], wanted: str | Selection, run_netns: str = RUN_NETNS,
                      proc: str = "/proc") -> list[NamespaceRef]:
    """``all``, ``host``, a /run/netns name, a listed name, ``pid:N`` (any process in the namespace),
    an inode number, or a ``Selection`` pinned earlier.

    A namespace is listed under one name, but any pid in it or a second /run/netns name for it
    (``ip netns attach``) selects it too.
    """
    if isinstance(wanted, Selection):
        if wanted.inode is None:
            return select_namespaces(available, wanted.wanted, run_netns, proc)
        for ref in available:
            if ref.inode == wanted.inode:
                if wanted.cookie is not None and ref.cookie is not None and ref.cookie != wanted.cookie:
                    break  # the inode now belongs to a new namespace
                return [ref]
        raise LookupError(f"network namespace {wanted.name or wanted.wanted!r} (inode {wanted.inode}) "
                          "no longer exists")
    if wanted == "all":
        return available
    for ref in available:
        if wanted == ref.name:
            return [ref]
    inode: int | None = None
    if wanted.isdigit():
        inode = int(wanted)
    elif wanted.startswith("pid:") and wanted[4:].isdigit():
        inode = _ns_inode_of_link(f"{proc}/{wanted[4:]}/ns/net")
    elif "/" not in wanted and wanted not in ("", ".", ".."):
        with suppress(OSError):
            inode = os.stat(f"{run_netns}/{wanted}").st_ino
    for ref in available:
        if inode == ref.inode:
            return [ref]
    raise _unknown(wanted, available)


# --- entering ----------------------------------------------------------------------------------------------


@contextmanager
def entered(ref: NamespaceRef) -> Iterator[None]:
    """Move the calling thread into ``ref`` for the block; sockets opened inside stay bound to it.

    /proc/thread-self/net and /proc/sys/net resolve against the calling thread's namespace, so
    counters and sysctls read inside the block are the namespace's own. Raises NamespaceGone when
    the namespace is gone, or when ``ref.path`` now opens another one (other inode, or the same
    inode with another cookie: that one is then forgotten by the BOOK, to be identified afresh).
    """
    try:
        target = os.open(ref.path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise NamespaceGone(f"{ref.name}: {exc.strerror}") from exc
    try:
        if os.fstat(target).st_ino != ref.inode:
            raise NamespaceGone(f"{ref.name}: {ref.path} now holds another namespace")
        by_ioctl = ref.cookie is not None and _cookie_by_ioctl()
        if by_ioctl:
            _check_cookie(ref, _ns_id(target))
        if _ns_inode_of_link(OWN_NS) == ref.inode:
            if not by_ioctl:
                _check_cookie(ref, current_cookie())
            yield
            return
        own = os.open(OWN_NS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, ref.name)
            try:
                if not by_ioctl:
                    _check_cookie(ref, current_cookie())
                yield
            finally:
                _setns(own, "aqtune's own network namespace")
        finally:
            os.close(own)
    finally:
        os.close(target)


def _check_cookie(ref: NamespaceRef, cookie: int | None) -> None:
    if ref.cookie is None or cookie is None or cookie == ref.cookie:
        return
    BOOK.forget(ref.inode)
    raise NamespaceGone(f"{ref.name}: inode {ref.inode} now belongs to another namespace "
                        f"(cookie {cookie}, expected {ref.cookie})")
