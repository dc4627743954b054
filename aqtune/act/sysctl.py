"""Reading and writing sysctls inside a given network namespace, and rolling aqtune's changes back.

/proc/sys/net resolves against the writing thread's namespace, so every access happens inside
``netns.entered``: a change meant for a container's namespace can never land on the host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aqtune.act.ledger import Entry, Ledger
from aqtune.collect import netns


def _proc_path(name: str) -> str:
    return "/proc/sys/" + name.replace(".", "/")


def read_in(ref: netns.NamespaceRef, name: str) -> int:
    with netns.entered(ref), open(_proc_path(name)) as f:
        return int(f.read().split()[0])


def write_in(ref: netns.NamespaceRef, name: str, value: int) -> None:
    with netns.entered(ref), open(_proc_path(name), "w") as f:
        f.write(f"{value}\n")


def apply_change(ledger: Ledger, ref: netns.NamespaceRef, sysctl: str, old: int, new: int) -> None:
    """Write ``new`` with the ledger updated durably around the write; raises OSError on failure."""
    current = read_in(ref, sysctl)
    if current != old:
        raise OSError(f"{sysctl} in netns {ref.name} changed to {current} meanwhile; not overwriting it")
    ledger.begin(ref.name, ref.inode, sysctl, old, new, time.time())
    try:
        write_in(ref, sysctl, new)
    except OSError:
        ledger.abandon(ref.inode, sysctl)
        raise
    ledger.commit(ref.inode, sysctl)


@dataclass(frozen=True, slots=True)
class RollbackResult:
    netns: str
    sysctl: str
    outcome: str  # "restored", "left-alone", "gone", "failed"
    detail: str


def rollback_entry(entry: Entry, refs: dict[int, netns.NamespaceRef]) -> RollbackResult:
    """Restore one entry's original value unless someone else changed the sysctl after aqtune."""
    ref = refs.get(entry.netns_inode)
    if ref is None:
        return RollbackResult(entry.netns, entry.sysctl, "gone", "the namespace no longer exists")
    try:
        current = read_in(ref, entry.sysctl)
        ours = {entry.applied, entry.original, *entry.earlier}
        if entry.pending is not None:
            ours.add(entry.pending)
        if current not in ours:
            return RollbackResult(entry.netns, entry.sysctl, "left-alone",
                                  f"now {current}, not aqtune's {entry.applied}: changed by hand after aqtune")
        if current != entry.original:
            write_in(ref, entry.sysctl, entry.original)
        return RollbackResult(entry.netns, entry.sysctl, "restored", f"{current} -> {entry.original}")
    except (OSError, netns.NamespaceGone) as exc:
        return RollbackResult(entry.netns, entry.sysctl, "failed", str(exc))


def rollback(ledger: Ledger) -> list[RollbackResult]:
    """Undo every ledger entry; entries that are done with (restored, overridden, gone) are forgotten."""
    refs = {ref.inode: ref for ref in netns.list_namespaces()}
    results = []
    for entry in list(ledger.entries):
        result = rollback_entry(entry, refs)
        if result.outcome != "failed":
            ledger.forget(entry)
        results.append(result)
    return results
