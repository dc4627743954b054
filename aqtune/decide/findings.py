"""Every finding aqtune can report, in one table (as bpftune's scenario tables): its stable id, whether
it is a problem or a reason a change is held back, how loudly the journal says it, and what it means.

Tuning, the journal, status and the README's advice table all read this table; nothing else compares
finding ids, so adding a diagnosis is one row here plus the code that detects it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import TYPE_CHECKING

from aqtune.messages import MessageId

if TYPE_CHECKING:
    from aqtune.model.history import ListenerKey, ListenerWindow
    from aqtune.records import Snapshot


class FindingId(StrEnum):
    SATURATED = "saturated"
    STALLED_WORKERS = "stalled-workers"
    WORKERS_SATURATED = "workers-saturated"
    QUEUE_WAIT = "queue-wait"
    HELD_BY_CONNECTIONS = "held-by-connections"
    REUSEPORT_STALLED = "reuseport-stalled"
    CAPPED_BY_SOMAXCONN = "capped-by-somaxconn"
    CAPPED_BY_APP = "capped-by-app"
    RELISTEN_NEEDED = "relisten-needed"
    SYN_QUEUE_FULL = "syn-queue-full"
    SYN_BACKLOG_LIMIT = "syn-backlog-limit"
    SYNCOOKIES_ACTIVE = "syncookies-active"
    COOLDOWN = "cooldown"
    AT_MAX = "at-max"
    ADMIN_OVERRIDE = "admin-override"
    OWNER_UNTRUSTED = "owner-untrusted"


class Role(Enum):
    STATE = "state"  # what is happening (a listener is saturated): no advice of its own
    PROBLEM = "problem"  # a diagnosis with what to do about it
    NOTE = "note"  # worth knowing, nothing to do
    HELD = "held"  # why a change aqtune wants is held back


class Level(Enum):
    INFO = "info"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class FindingSpec:
    id: FindingId
    role: Role
    level: Level  # journal priority when it is logged
    subject: str  # "listener" or "netns"
    meaning: str  # one line for the README's advice table
    aqtune_does: str  # what aqtune itself does about it
    message_id: MessageId = MessageId.FINDING

    @property
    def advises(self) -> bool:
        """A finding that tells the operator what to change."""
        return self.role is Role.PROBLEM

    @property
    def held_back(self) -> bool:
        return self.role is Role.HELD

    @property
    def drives_tuning(self) -> bool:
        """A finding that makes aqtune want a sysctl changed."""
        return self.id in (FindingId.CAPPED_BY_SOMAXCONN, FindingId.SYN_BACKLOG_LIMIT)


def _spec(id: FindingId, role: Role, level: Level, subject: str, meaning: str, does: str) -> FindingSpec:
    return FindingSpec(id, role, level, subject, meaning, does)


_I, _W = Level.INFO, Level.WARNING
TABLE: tuple[FindingSpec, ...] = (
    _spec(FindingId.SATURATED, Role.STATE, _W, "listener",
          "fill at or above `fill_ratio` for `sustain` seconds, or drops in that window",
          "logs it; the other findings say why and what to do"),
    _spec(FindingId.STALLED_WORKERS, Role.PROBLEM, _W, "listener",
          "saturated and not draining while the owners accept nothing (eBPF) or use under 5% of a CPU: a longer "
          "queue adds only latency",
          "names the workers as the limit; never raises a sysctl for it"),
    _spec(FindingId.WORKERS_SATURATED, Role.PROBLEM, _W, "listener",
          "the queue never drains while the workers keep accepting: they cannot keep up (CPU-bound or all busy)",
          "names the server's worker knob; never raises a sysctl for it"),
    _spec(FindingId.QUEUE_WAIT, Role.PROBLEM, _W, "listener",
          "connections wait in the queue longer than `max_queue_wait_ms` (the oldest queued, or accept-wait p99),"
          " even at a low fill: the workers are the limit",
          "names the server's worker knob; never raises a sysctl for it"),
    _spec(FindingId.HELD_BY_CONNECTIONS, Role.PROBLEM, _W, "listener",
          "saturated while every worker holds a connection open over `[connections] long_after` or idle for "
          "`idle_after` (slow or idle clients, or a slow backend): a longer queue adds only waiting",
          "names the server's knobs that bound how long a connection holds a worker, and its worker count; "
          "never raises a sysctl for it"),
    _spec(FindingId.REUSEPORT_STALLED, Role.PROBLEM, _W, "listener",
          "one socket of an SO_REUSEPORT group is full while its siblings drain: the process serving it "
          "stopped accepting, and the connections hashed to it wait",
          "names that process; never raises a sysctl for it"),
    _spec(FindingId.CAPPED_BY_SOMAXCONN, Role.PROBLEM, _W, "listener",
          "saturated in bursts the workers drain, and the backlog equals the namespace's somaxconn: raise it "
          "there to the measured number (worst burst + headroom), then the owner must call listen() again",
          "raises somaxconn to that number in apply mode (within the policy's min and max), recommends it "
          "otherwise"),
    _spec(FindingId.CAPPED_BY_APP, Role.PROBLEM, _W, "listener",
          "saturated in bursts the workers drain, and the backlog is below somaxconn: the owner's own knob "
          "(nginx `backlog=`, Apache `ListenBacklog`, HAProxy `backlog`, php-fpm `listen.backlog`, gunicorn/uvicorn "
          "`--backlog`, Node, Redis `tcp-backlog`, systemd `Backlog=`), with the measured number",
          "names the knob and the number; changes no sysctl"),
    _spec(FindingId.RELISTEN_NEEDED, Role.PROBLEM, _W, "listener",
          "aqtune raised somaxconn but the listener still has the old backlog: reload or restart its unit",
          "names the command; waits for the listener"),
    _spec(FindingId.SYN_QUEUE_FULL, Role.PROBLEM, _W, "netns",
          "SYNs dropped at a full SYN queue with syncookies off",
          "recommends syncookies and a longer backlog"),
    _spec(FindingId.SYN_BACKLOG_LIMIT, Role.PROBLEM, _W, "netns",
          "SYNs dropped by `tcp_max_syn_backlog`'s rule with syncookies off",
          "raises tcp_max_syn_backlog in apply mode, recommends it otherwise"),
    _spec(FindingId.SYNCOOKIES_ACTIVE, Role.NOTE, _I, "netns",
          "the SYN queue overflowed and syncookies answered: tcp_max_syn_backlog limits nothing then",
          "nothing"),
    _spec(FindingId.COOLDOWN, Role.HELD, _I, "netns",
          "a wanted change waits for the policy's `cooldown` since the last one",
          "changes it once the cooldown has passed"),
    _spec(FindingId.AT_MAX, Role.HELD, _I, "netns",
          "a wanted change is at the policy's `max`", "nothing more; raise `max` to allow more"),
    _spec(FindingId.ADMIN_OVERRIDE, Role.HELD, _W, "netns",
          "the sysctl was changed by hand after aqtune's change",
          "leaves it alone; `aqtune rollback` forgets its record"),
    _spec(FindingId.OWNER_UNTRUSTED, Role.HELD, _I, "netns",
          "a listener that would call for a raise belongs to an owner `[apply] owners` does not trust (a local "
          "user, a user's unit, a rootless container)",
          "changes nothing for it; the listener's own advice still shows"),
)
SPECS: dict[FindingId, FindingSpec] = {spec.id: spec for spec in TABLE}


@dataclass(frozen=True, slots=True)
class Finding:
    """One finding: its id (a row of TABLE), one line of text for a person, and the figures behind it."""

    id: FindingId
    text: str
    evidence: dict[str, int | float | str | None] = field(default_factory=dict)

    @property
    def spec(self) -> FindingSpec:
        return SPECS[self.id]


@dataclass(slots=True)
class Assessment:
    """Every finding of one judgement (decide/assess.py), and the windows they were judged on."""

    windows: dict[ListenerKey, ListenerWindow] = field(default_factory=dict)
    listener_findings: dict[ListenerKey, list[Finding]] = field(default_factory=dict)
    namespace_findings: dict[str, list[Finding]] = field(default_factory=dict)
    ignored: set[ListenerKey] = field(default_factory=set)

    def by_namespace(self, snapshot: Snapshot) -> dict[str, list[Finding]]:
        """Listener findings grouped by the listener's namespace."""
        grouped: dict[str, list[Finding]] = {}
        for listener in snapshot.listeners:
            grouped.setdefault(listener.netns, []).extend(
                self.listener_findings.get((listener.netns, listener.cookie), []))
        return grouped


def of(findings: list[Finding], *ids: FindingId) -> list[Finding]:
    """The findings with one of ``ids``."""
    return [f for f in findings if f.id in ids]


def advice_table() -> str:
    """The README's advice table, generated so it cannot drift from TABLE (a test compares them)."""
    rows = ["| id | about | meaning | what aqtune does |", "|---|---|---|---|"]
    rows += [f"| `{s.id}` | {s.subject} | {s.meaning} | {s.aqtune_does} |" for s in TABLE]
    return "\n".join(rows)
