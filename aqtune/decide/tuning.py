"""Which sysctl changes the findings call for, per network namespace: pure and bounded.

Values only ever go up here (rollback is the one way down): somaxconn to the number the diagnosis
measured, tcp_max_syn_backlog (which no measurement sizes) by at most ``step`` per change; never
above ``max``, at most once per ``cooldown`` per namespace and sysctl, and never over a value an
administrator set by hand after aqtune's change.
"""

from __future__ import annotations

from dataclasses import dataclass

from aqtune.decide.findings import Finding, FindingId, of
from aqtune.decide.policy import Limits, Policy, namespace_allowed
from aqtune.records import Managed

SOMAXCONN = "net.core.somaxconn"
SYN_BACKLOG = "net.ipv4.tcp_max_syn_backlog"


@dataclass(frozen=True, slots=True)
class Change:
    netns: str
    sysctl: str
    old: int
    new: int
    reason: str


@dataclass(frozen=True, slots=True)
class NamespaceState:
    name: str
    sysctls: dict[str, int]
    listener_findings: list[Finding]
    namespace_findings: list[Finding]


def _grow(current: int, wanted: int, limits: Limits) -> int:
    # A step too small to add a whole unit still adds one; from 0 (which the kernel accepts) no
    # multiple helps, so the floor is the cap.
    stepped = max(int(current * limits.step), current + 1) if current > 0 else limits.min
    return min(max(wanted, limits.min), stepped, limits.max)


def _measured(wanted: int, limits: Limits) -> int:
    # somaxconn is raised to the number the diagnosis measured and advised, in one change, so the
    # advice, the journal and the value written agree; the policy's min and max still bound it.
    return min(max(wanted, limits.min), limits.max)


def plan(namespace: NamespaceState, managed: dict[str, Managed], policy: Policy,
         now: float) -> tuple[list[Change], list[Finding]]:
    """Changes for one namespace, plus findings saying why a wanted change is held back."""
    changes: list[Change] = []
    held: list[Finding] = []
    wanted: dict[str, tuple[int, str]] = {}
    capped = of(namespace.listener_findings, FindingId.CAPPED_BY_SOMAXCONN)  # only trusted owners' (tick.py)
    if capped:
        # The diagnosis already chose the number (the request, unless it means "as much as allowed").
        target = max(int(f.evidence.get("target") or 0) for f in capped)
        wanted[SOMAXCONN] = (target,
                             f"{len(capped)} saturated listener(s) capped by somaxconn")
    current_syn = namespace.sysctls.get(SYN_BACKLOG)
    if current_syn is not None and of(namespace.namespace_findings, FindingId.SYN_BACKLOG_LIMIT):
        # No listener asks for a number here: one step at a time, as far as the policy allows.
        wanted[SYN_BACKLOG] = (policy.syn_backlog.max, "SYNs dropped by tcp_max_syn_backlog with syncookies off")
    for sysctl, (want, reason) in wanted.items():
        limits = policy.somaxconn if sysctl == SOMAXCONN else policy.syn_backlog
        current = namespace.sysctls.get(sysctl)
        if current is None:
            continue
        record = managed.get(sysctl)
        if record is not None and current != record.applied:
            held.append(Finding(
                FindingId.ADMIN_OVERRIDE,
                f"netns {namespace.name}: {sysctl} is {current}, not the {record.applied} aqtune set: changed by "
                "hand, so aqtune leaves it alone (`aqtune rollback` forgets its record)",
                {"sysctl": sysctl, "current": current, "aqtune_set": record.applied}))
            continue
        new = _measured(want, limits) if sysctl == SOMAXCONN else _grow(current, want, limits)
        if new <= current:
            if current >= limits.max:
                held.append(Finding(
                    FindingId.AT_MAX,
                    f"netns {namespace.name}: {sysctl} is {current}, at the policy's max ({limits.max})",
                    {"sysctl": sysctl, "current": current, "max": limits.max}))
            continue
        if record is not None and now < record.changed_at + limits.cooldown:
            held.append(Finding(
                FindingId.COOLDOWN,
                f"netns {namespace.name}: {sysctl} was changed {now - record.changed_at:.0f} s ago; the next "
                f"change may come after {limits.cooldown:.0f} s",
                {"sysctl": sysctl, "changed_at": record.changed_at, "cooldown": limits.cooldown}))
            continue
        changes.append(Change(namespace.name, sysctl, current, new, reason))
    return changes, held


def refusal(change: Change, policy: Policy, dry_run: bool) -> str | None:
    """Why ``change`` must not be written, or None when it may be."""
    if dry_run:
        return "dry run"
    if policy.mode != "apply":
        return "policy mode is recommend"
    if policy.apply_refused:
        return policy.apply_refused
    if not namespace_allowed(policy, change.netns):
        return f"netns {change.netns} is not in apply.namespaces"
    return None
