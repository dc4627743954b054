"""Listeners that share an address through SO_REUSEPORT: the kernel hashes each new connection to one
member, so a group is judged member by member (decide.connections) and shown with its size."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aqtune.records import Listener

REUSEPORT_PROTOS = frozenset({"tcp", "tcp6"})  # two Unix sockets on one path are a rebind, not a group
GroupKey = tuple[str, str, str]  # (netns, proto, address)


def reuseport_groups(listeners: Iterable[Listener]) -> dict[GroupKey, list[Listener]]:
    """TCP listeners sharing a namespace and address (SO_REUSEPORT), by (netns, proto, address); groups
    of two or more only, members in the order given."""
    groups: dict[GroupKey, list[Listener]] = {}
    for listener in listeners:
        if listener.proto in REUSEPORT_PROTOS:
            groups.setdefault((listener.netns, listener.proto, listener.address), []).append(listener)
    return {key: members for key, members in groups.items() if len(members) > 1}


def group_json(listener: Listener, groups: dict[GroupKey, list[Listener]]) -> dict[str, Any] | None:
    """The ``group`` field of a listener in the status document: its reuseport group, or None."""
    members = groups.get((listener.netns, listener.proto, listener.address))
    if members is None:
        return None
    return {"address": listener.address, "members": len(members)}
