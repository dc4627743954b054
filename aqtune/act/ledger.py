"""The change ledger: every sysctl aqtune changed, with the value it replaced, kept durably.

A change is recorded as pending *before* the sysctl is written and marked applied after, each time
with write-to-temp + fsync + rename + fsync(dir), so after a crash or kill -9 at any point the
ledger still names every value aqtune may have touched and what to restore.

Root acts on what the ledger says (rollback writes its values), so it is read only from a state
directory only root can write, and every record is checked (known sysctl, integer in range, sane
namespace) before anything is done with any of them. Each record names its namespace by inode
*and* cookie: the kernel reuses inodes, and a record of a dead namespace must never be applied to
a new one that happens to have its inode (``Entry.same_namespace``).

The daemon and `aqtune rollback` may run at once: each change (read, record, write, confirm) and a
whole rollback hold an flock on the state directory's lock file, and ``refresh`` re-reads the file
when another process changed it.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from aqtune.act import files
from aqtune.records import TUNABLES, Managed
from aqtune.trust import untrusted_dir

LEDGER_FILE = "changes.json"
LOCK_FILE = "changes.lock"
FORMAT_VERSION = 2  # 2: each entry carries its namespace's cookie
READABLE_VERSIONS = (1, 2)  # version 1 ledgers have no cookies: see Entry.same_namespace
MAX_LEDGER_SIZE = 16 << 20  # two entries per namespace; thousands of namespaces fit in a few MiB
MAX_EARLIER = 1024  # raises remembered per entry; the oldest go first (see commit)
# The kernel keeps both sysctls as int; 0 is a value an administrator may have set (aqtune then
# records it as the original), a negative one never comes from aqtune.
VALUE_RANGE = (0, 2**31 - 1)
MAX_NAME = 255


class NamespaceLike(Protocol):
    """A live namespace as collect sees it (netns.NamespaceRef or records.Namespace)."""

    @property
    def name(self) -> str: ...
    @property
    def inode(self) -> int: ...
    @property
    def cookie(self) -> int | None: ...


@dataclass(slots=True)
class Entry:
    netns: str
    netns_inode: int
    sysctl: str
    original: int  # before aqtune's first change: what rollback restores
    applied: int  # what aqtune last wrote (== original until the first write completes)
    pending: int | None  # a write that was started but not confirmed
    changed_at: float
    earlier: list[int] = field(default_factory=list)  # values applied before ``applied``
    cookie: int | None = None  # the namespace's SO_NETNS_COOKIE; None: unknown (see same_namespace)

    def managed(self) -> Managed:
        return Managed(self.original, self.applied, self.changed_at, tuple(self.earlier))

    def same_namespace(self, inode: int, cookie: int | None, name: str) -> bool | None:
        """Whether a live namespace (inode, cookie, name) is the one this entry was made in: True
        (proven), False (proven not, or never provable), None (its cookie cannot be read now)."""
        if inode != self.netns_inode:
            return False
        if self.cookie is not None and cookie is not None:
            return self.cookie == cookie
        if self.cookie is not None:
            return None  # the namespace could not be identified this time: try again later
        if cookie is not None:
            # Recorded without a cookie (aqtune before ledger version 2): only the host's namespace,
            # which lives as long as the machine, is provably still the same.
            return self.netns == name == "host"
        return True  # a kernel without cookies (before 5.14): the inode is all there is

    def ours(self) -> set[int]:
        """Every value aqtune wrote or meant to write here."""
        values = {self.applied, self.original, *self.earlier}
        if self.pending is not None:
            values.add(self.pending)
        return values


class LedgerError(OSError):
    """The ledger cannot be trusted or read: one line saying where, what and what to do.

    An OSError, so that whatever handles a ledger that cannot be written (the daemon's apply path
    logs it and carries on) handles one that cannot be read the same way.
    """


# --- validation ------------------------------------------------------------------------------------------


def _integer(value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, got {_short(value)}")
    if not low <= value <= high:
        raise ValueError(f"must be in [{low}, {high}], got {value}")
    return value


def _value(value: Any) -> int:
    return _integer(value, *VALUE_RANGE)


def _optional(check: Any) -> Any:
    return lambda value: None if value is None else check(value)


def _name(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME or not value.isprintable():
        raise ValueError(f"must be a namespace name (1 to {MAX_NAME} printable characters), got {_short(value)}")
    return value


def _sysctl(value: Any) -> str:
    if value not in TUNABLES:
        raise ValueError(f"must be one of {', '.join(TUNABLES)}, got {_short(value)}")
    return str(value)


def _time(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a time in seconds since the epoch, got {_short(value)}")
    return float(value)


def _values(value: Any) -> list[int]:
    if not isinstance(value, list) or len(value) > MAX_EARLIER:
        raise ValueError(f"must be a list of at most {MAX_EARLIER} values, got {_short(value)}")
    return [_value(v) for v in value]


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_FIELDS: dict[str, Any] = {
    "netns": _name,
    "netns_inode": lambda v: _integer(v, 1, 2**64 - 1),
    "sysctl": _sysctl,
    "original": _value,
    "applied": _value,
    "pending": _optional(_value),
    "changed_at": _time,
    "earlier": _values,
    "cookie": _optional(lambda v: _integer(v, 0, 2**64 - 1)),
}
_REQUIRED = ("netns", "netns_inode", "sysctl", "original", "applied", "pending", "changed_at")


def parse_entry(raw: Any) -> Entry:
    """One ledger record, checked field by field; ValueError says which field and why."""
    if not isinstance(raw, dict):
        raise ValueError(f"must be an object, got {_short(raw)}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {_short(unknown[0])}")
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise ValueError(f"{missing[0]}: missing")
    checked: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            checked[key] = _FIELDS[key](value)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    return Entry(**checked)


def parse_document(data: bytes, path: str) -> list[Entry]:
    """Every entry of a ledger file's bytes; LedgerError (one line) on anything malformed."""
    fix = "it lists what aqtune changed: fix or remove that part by hand (inspect it before deleting the file)"
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise LedgerError(f"{path}: not a valid change ledger (malformed JSON: {reason}); {fix}") from None
    if not isinstance(document, dict) or not isinstance(document.get("changes", []), list):
        raise LedgerError(f"{path}: not a valid change ledger (expected {{\"version\": ..., \"changes\": [...]}}); "
                          f"{fix}")
    version = document.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise LedgerError(f"{path}: unknown ledger version {_short(version)} (this aqtune reads "
                          f"{', '.join(map(str, READABLE_VERSIONS))}); {fix}")
    entries = []
    for index, raw in enumerate(document.get("changes", [])):
        try:
            entries.append(parse_entry(raw))
        except ValueError as exc:
            raise LedgerError(f"{path}: change {index}: {exc}; {fix}") from None
    return entries


# --- the ledger ------------------------------------------------------------------------------------------


class Ledger:
    def __init__(self, state_dir: str, load: bool = True) -> None:
        """The ledger in ``state_dir``; LedgerError when it cannot be trusted or read.

        ``load=False``: an empty ledger that was not read (for `status` when the file cannot be
        trusted: advice then goes without it).
        """
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, LEDGER_FILE)
        self._signature: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) of what was read
        self._lock_depth = 0
        self.entries: list[Entry] = self._read() if load else []

    def _untrusted(self) -> str | None:
        reason = untrusted_dir(self.state_dir)
        if reason is None:
            return None
        return (f"{reason}: refusing to use {self.path}, since whoever can write there could make aqtune "
                f"write any value as root; use a state directory only root can write (fix with: "
                f"chown root:root {self.state_dir}; chmod 750 {self.state_dir}, and the same for any "
                "parent it names)")

    def _read(self) -> list[Entry]:
        reason = self._untrusted()
        if reason:
            raise LedgerError(reason)
        try:
            data = files.read_trusted(self.path, MAX_LEDGER_SIZE)
        except ValueError as exc:
            raise LedgerError(f"{exc}: refusing to use this change ledger; only root may write it "
                              f"(fix with: chown root:root {self.path}; chmod 600 {self.path})") from None
        except OSError as exc:
            raise LedgerError(f"{self.path}: unreadable change ledger ({exc.strerror}); it lists what "
                              "aqtune changed: inspect it before deleting it") from None
        self._signature = self._stat()
        if data is None:
            return []
        return parse_document(data, self.path)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def refresh(self) -> bool:
        """Re-read the file if another process changed it (`aqtune rollback` while the daemon runs).

        True when the entries were re-read. Cheap when nothing changed: one stat. Raises LedgerError
        (keeping the entries it had) when the new file cannot be trusted or read.
        """
        if self._stat() == self._signature:
            return False
        self.entries = self._read()
        return True

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the state directory's lock (and the latest entries) for a read-record-write sequence.

        Re-entrant within one Ledger. Raises OSError when the lock cannot be taken (the state
        directory cannot be created or written), LedgerError when the ledger became untrusted.
        """
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        reason = self._untrusted()
        if reason:
            raise LedgerError(reason)
        os.makedirs(self.state_dir, mode=0o750, exist_ok=True)
        fd = os.open(os.path.join(self.state_dir, LOCK_FILE),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_depth = 1
            try:
                self.refresh()
                yield
            finally:
                self._lock_depth = 0
        finally:
            os.close(fd)  # releases the lock

    def _save(self) -> None:
        os.makedirs(self.state_dir, mode=0o750, exist_ok=True)
        document = {"version": FORMAT_VERSION, "changes": [asdict(e) for e in self.entries]}
        files.write_atomically(self.path, json.dumps(document, indent=1), mode=0o600, durable=True)
        self._signature = self._stat()

    def find(self, netns_inode: int, sysctl: str) -> Entry | None:
        return next((e for e in self.entries if e.netns_inode == netns_inode and e.sysctl == sysctl), None)

    def managed(self, netns_inode: int) -> dict[str, Managed]:
        """What aqtune changed in a namespace, by sysctl. Call ``drop_stale`` first in each sweep, so
        that a new namespace reusing a dead one's inode does not inherit its records."""
        return {e.sysctl: e.managed() for e in self.entries if e.netns_inode == netns_inode}

    def stale(self, live: Iterable[NamespaceLike]) -> list[Entry]:
        """Entries whose inode now belongs to a namespace they were provably not made in (one whose
        cookie could not be read is left for a later sweep)."""
        by_inode = {ns.inode: ns for ns in live}
        return [e for e in self.entries if (ns := by_inode.get(e.netns_inode)) is not None
                and e.same_namespace(ns.inode, ns.cookie, ns.name) is False]

    def drop_stale(self, live: Iterable[NamespaceLike], save: bool = True) -> list[Entry]:
        """Forget the entries ``stale`` finds, and return them (to be reported).

        Their namespace is gone and its values with it: there is nothing to restore, and a new
        namespace must not be judged by them. ``save=False`` forgets them in memory only (a
        read-only command such as `status`).
        """
        stale = self.stale(live)
        if not stale:
            return []
        if not save:
            self.entries = [e for e in self.entries if e not in stale]
            return stale
        with self.transaction():
            stale = self.stale(live)  # the file may have changed meanwhile
            if stale:
                self.entries = [e for e in self.entries if e not in stale]
                self._save()
        return stale

    def begin(self, netns: str, netns_inode: int, sysctl: str, old: int, new: int, now: float,
              cookie: int | None = None) -> None:
        """Record the intent to write ``new`` (durably) before writing it."""
        with self.transaction():
            entry = self.find(netns_inode, sysctl)
            if entry is not None and entry.same_namespace(netns_inode, cookie, netns) is False:
                self.entries.remove(entry)  # a dead namespace's record: this is a new namespace
                entry = None
            if entry is None:
                entry = Entry(netns, netns_inode, sysctl, original=old, applied=old, pending=new, changed_at=now,
                              cookie=cookie)
                self.entries.append(entry)
            else:
                entry.pending = new
                entry.changed_at = now
                entry.cookie = cookie if cookie is not None else entry.cookie
            self._save()

    def commit(self, netns_inode: int, sysctl: str) -> None:
        with self.transaction():
            entry = self.find(netns_inode, sysctl)
            if entry is None or entry.pending is None:
                return
            if entry.applied != entry.original:
                entry.earlier = [*entry.earlier, entry.applied][-MAX_EARLIER:]
            entry.applied, entry.pending = entry.pending, None
            self._save()

    def abandon(self, netns_inode: int, sysctl: str) -> None:
        """The write failed: forget the pending value, and the entry if nothing was ever applied."""
        with self.transaction():
            entry = self.find(netns_inode, sysctl)
            if entry is None:
                return
            entry.pending = None
            if entry.applied == entry.original:
                self.entries.remove(entry)
            self._save()

    def forget(self, entry: Entry) -> None:
        """Drop ``entry`` (the one for its inode, sysctl and cookie, if the file was re-read meanwhile)."""
        with self.transaction():
            key = (entry.netns_inode, entry.sysctl, entry.cookie)
            kept = [e for e in self.entries if (e.netns_inode, e.sysctl, e.cookie) != key]
            if len(kept) != len(self.entries):
                self.entries = kept
                self._save()
