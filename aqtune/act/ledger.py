"""The change ledger: every sysctl aqtune changed, with the value it replaced, kept durably.

A change is recorded as pending *before* the sysctl is written and marked applied after, each time
with write-to-temp + fsync + rename + fsync(dir), so after a crash or kill -9 at any point the
ledger still names every value aqtune may have touched and what to restore.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field

from aqtune.decide.tuning import Managed

LEDGER_FILE = "changes.json"
FORMAT_VERSION = 1


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

    def managed(self) -> Managed:
        return Managed(self.original, self.applied, self.changed_at, tuple(self.earlier))


class LedgerError(Exception):
    pass


class Ledger:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, LEDGER_FILE)
        self.entries: list[Entry] = self._read()

    def _read(self) -> list[Entry]:
        try:
            with open(self.path, encoding="utf-8") as f:
                document = json.load(f)
        except (FileNotFoundError, NotADirectoryError):
            # Nothing recorded there; a state dir that cannot be created shows when writing.
            return []
        except (OSError, ValueError) as exc:
            raise LedgerError(f"{self.path}: unreadable change ledger ({exc}); it lists what aqtune changed: "
                              "inspect it before deleting it") from None
        if document.get("version") != FORMAT_VERSION:
            raise LedgerError(f"{self.path}: unknown ledger version {document.get('version')!r}")
        return [Entry(**entry) for entry in document.get("changes", [])]

    def _save(self) -> None:
        os.makedirs(self.state_dir, mode=0o750, exist_ok=True)
        document = {"version": FORMAT_VERSION, "changes": [asdict(e) for e in self.entries]}
        fd, tmp = tempfile.mkstemp(prefix=".changes.", dir=self.state_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(document, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        dir_fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def find(self, netns_inode: int, sysctl: str) -> Entry | None:
        return next((e for e in self.entries if e.netns_inode == netns_inode and e.sysctl == sysctl), None)

    def managed(self, netns_inode: int) -> dict[str, Managed]:
        return {e.sysctl: e.managed() for e in self.entries if e.netns_inode == netns_inode}

    def begin(self, netns: str, netns_inode: int, sysctl: str, old: int, new: int, now: float) -> None:
        """Record the intent to write ``new`` (durably) before writing it."""
        entry = self.find(netns_inode, sysctl)
        if entry is None:
            entry = Entry(netns, netns_inode, sysctl, original=old, applied=old, pending=new, changed_at=now)
            self.entries.append(entry)
        else:
            entry.pending = new
            entry.changed_at = now
        self._save()

    def commit(self, netns_inode: int, sysctl: str) -> None:
        entry = self.find(netns_inode, sysctl)
        if entry is None or entry.pending is None:
            return
        if entry.applied != entry.original:
            entry.earlier.append(entry.applied)
        entry.applied, entry.pending = entry.pending, None
        self._save()

    def abandon(self, netns_inode: int, sysctl: str) -> None:
        """The write failed: forget the pending value, and the entry if nothing was ever applied."""
        entry = self.find(netns_inode, sysctl)
        if entry is None:
            return
        entry.pending = None
        if entry.applied == entry.original:
            self.entries.remove(entry)
        self._save()

    def forget(self, entry: Entry) -> None:
        self.entries.remove(entry)
        self._save()
