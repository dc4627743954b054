"""The journal's MESSAGE_IDs: one per kind of entry, documented in packaging/aqtune.catalog.

Every layer may name a kind of message (the findings table does), so this sits beside records.py
rather than in act/; the ids never change once shipped, since alerts and `journalctl MESSAGE_ID=`
queries key on them.
"""

from __future__ import annotations

from enum import StrEnum


class MessageId(StrEnum):
    DROPS = "d146ae63c10b45aab745fa44f5ab820e"
    RECOMMENDATION = "2a3a9ee93ea94e0690551308cc44d593"
    SYSCTL_CHANGE = "3e20d95d691c4f76bc246238768a260c"
    ROLLBACK = "93e848e2522947daa9a8f03fa3390b61"
    DEGRADED = "2e83ae8f7ce24a85b9ace2fd5f3a16fb"
    FINDING = "1d5f56aead9445859e419cd4e873a9da"
    LIFECYCLE = "2128cf4097d44eeb821982ac5ff362bb"


# The names the catalog and the tests use ("drops", "sysctl-change", ...).
MESSAGE_IDS: dict[str, str] = {kind.name.lower().replace("_", "-"): kind.value for kind in MessageId}
