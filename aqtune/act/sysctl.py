"""Reading and writing sysctls inside a given network namespace, and rolling aqtune's changes back.

/proc/sys/net resolves against the writing thread's namespace, so every access happens inside
``netns.entered``: a change meant for a container's namespace can never land on the host. A write
is pinned to the namespace's cookie as well as its inode, so it can never land in a new namespace
that took a dead one's inode either; rollback writes only where the ledger proves the namespace is
the one it recorded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from aqtune.act.ledger import VALUE_RANGE, Entry, Ledger
from aqtune.collect import netns
from aqtune.records import TUNABLES


def _proc_path(name: str) -> str:
    # Only the sysctls aqtune tunes, whatever a caller (or a ledger) names: this is a root write.
    if name not in TUNABLES:
        raise ValueError(f"{name!r} is not a sysctl aqtune manages ({', '.join(TUNABLES)})")
    return "/proc/sys/" + name.replace(".", "/")


def _read_here(name: str) -> int:
    with open(_proc_path(name)) as f:
        return int(f.read().split()[0])


def read_in(ref: netns.NamespaceRef, name: str) -> int:
    with netns.entered(ref):
        return _read_here(name)


def write_in(ref: netns.NamespaceRef, name: str, value: int) -> None:
    low, high = VALUE_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}: {value!r} is not a value aqtune writes ([{low}, {high}])")
    path = _proc_path(name)
    with netns.entered(ref), open(path, "w") as f:
        f.write(f"{value}\n")


def apply_change(ledger: Ledger, ref: netns.NamespaceRef, sysctl: str, old: int, new: int) -> None:
    """Write ``new`` with the ledger updated durably around the write; raises OSError on failure
    (NamespaceGone when the namespace went, or its inode now belongs to another one).

    The namespace's cookie is read in the same visit as the current value, recorded with the
    change, and required for the write, so the record and the write are about one namespace.
    """
    with ledger.transaction():
        with netns.entered(ref):
            cookie = netns.current_cookie()
            current = _read_here(sysctl)
        if current != old:
            raise OSError(f"{sysctl} in netns {ref.name} changed to {current} meanwhile; not overwriting it")
        pinned = replace(ref, cookie=cookie if cookie is not None else ref.cookie)
        ledger.begin(ref.name, ref.inode, sysctl, old, new, time.time(), cookie=pinned.cookie)
        try:
            write_in(pinned, sysctl, new)
        except (OSError, ValueError, netns.NamespaceGone):
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
    """Restore one entry's original value unless someone else changed the sysctl after aqtune, or
    the namespace with its inode cannot be proven to be the one the entry was made in."""
    ref = refs.get(entry.netns_inode)
    if ref is None:
        return RollbackResult(entry.netns, entry.sysctl, "gone", "the namespace no longer exists")
    same = entry.same_namespace(ref.inode, ref.cookie, ref.name)
    if same is None:
        return RollbackResult(entry.netns, entry.sysctl, "failed",
                              f"cannot read the cookie of the namespace with inode {ref.inode} ({ref.name}) now, "
                              "so cannot prove it is the one recorded")
    if not same:
        if entry.cookie is None:
            why = (f"recorded without the namespace's cookie (by an older aqtune): inode {ref.inode} "
                   f"({ref.name}) cannot be proven to be the same namespace; not restored (if it is: "
                   f"nsenter --net={ref.path} sysctl -w {entry.sysctl}={entry.original})")
        else:
            why = (f"the namespace ended; inode {ref.inode} now belongs to another namespace ({ref.name}), "
                   "left alone")
        return RollbackResult(entry.netns, entry.sysctl, "gone", why)
    # Pinned to the recorded cookie: if the namespace is replaced between here and the write,
    # entered() refuses.
    pinned = replace(ref, cookie=entry.cookie if entry.cookie is not None else ref.cookie)
    try:
        current = read_in(pinned, entry.sysctl)
        if current not in entry.ours():
            return RollbackResult(entry.netns, entry.sysctl, "left-alone",
                                  f"now {current}, not aqtune's {entry.applied}: changed by hand after aqtune")
        if current != entry.original:
            write_in(pinned, entry.sysctl, entry.original)
        return RollbackResult(entry.netns, entry.sysctl, "restored", f"{current} -> {entry.original}")
    except (OSError, ValueError, netns.NamespaceGone) as exc:
        # Kept for the next rollback: the path may have gone with one process while the namespace
        # lives on in others.
        return RollbackResult(entry.netns, entry.sysctl, "failed", str(exc))


def rollback(ledger: Ledger) -> list[RollbackResult]:
    """Undo every ledger entry; entries that are done with (restored, overridden, gone) are forgotten.

    Holds the ledger's lock throughout, so a daemon running meanwhile waits, then sees the result.
    """
    results = []
    with ledger.transaction():
        # Identities read now, not remembered from earlier sweeps (the daemon's book): what is
        # written below is decided on them.
        refs = {ref.inode: ref for ref in netns.list_namespaces(book=None)}
        for entry in list(ledger.entries):
            result = rollback_entry(entry, refs)
            if result.outcome != "failed":
                ledger.forget(entry)
            results.append(result)
    return results
