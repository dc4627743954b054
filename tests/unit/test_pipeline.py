"""One decision function for the daemon, one-shot status and the property tests, and the tables that
feed the journal and the README."""

from __future__ import annotations

import ast
import tempfile
from collections.abc import Iterator
from pathlib import Path

from aqtune.act.ledger import Ledger
from aqtune.act.log import EventLog
from aqtune.act.throttle import Budget, Throttle
from aqtune.decide.findings import TABLE, FindingId, advice_table
from aqtune.decide.policy import ListenerRule, Policy, Saturation, may_be_judged
from aqtune.decide.tick import decide, history_horizon, one_shot
from aqtune.model.history import Model
from aqtune.records import Listener, Managed, Namespace, Process, Snapshot
from aqtune.surfaces import run, status

REPO = Path(__file__).resolve().parents[2]
OWNER = Process(4242, "nginx", "nginx: master process", "nginx.service")
NS_INODE = 4026532001


def recorded() -> list[Snapshot]:
    """A listener overflowing in bursts it drains in between, then quiet, one sweep a second."""
    queues = [0, 10, 65, 0, 65, 2, 65, 0, 65, 1, 65, 0, 0, 0, 0, 0]
    drops = [0, 0, 3, 3, 9, 9, 15, 15, 21, 21, 27, 27, 27, 27, 27, 27]
    snapshots = []
    for tick, (queue, dropped) in enumerate(zip(queues, drops, strict=True)):
        listener = Listener("web", "tcp", "0.0.0.0:80", 80, queue, 64, dropped, 7, 99, 33, (OWNER,))
        namespace = Namespace("web", NS_INODE, {"net.core.somaxconn": 64, "net.ipv4.tcp_max_syn_backlog": 512,
                                               "net.ipv4.tcp_syncookies": 1},
                              {"ListenOverflows": dropped, "ListenDrops": dropped})
        snapshots.append(Snapshot(1_700_000_000.0 + tick, 0.01, [namespace], [listener]))
    return snapshots


class Replay(run.Observer):
    """The daemon's observer fed recorded sweeps instead of the kernel's."""

    def __init__(self, snapshots: list[Snapshot]) -> None:
        super().__init__("all")
        self.feed: Iterator[Snapshot] = iter(snapshots)

    def observe(self, policy: Policy, focus: object = None) -> run.Observation:
        snapshot = next(self.feed)
        return run.Observation(snapshot, {}, {OWNER.pid: snapshot.taken_at})


class Silent(EventLog):
    def __init__(self) -> None:
        super().__init__(None)
        self.lines: list[str] = []

    def info(self, text: str, message_id: object = None, **_fields: object) -> None:  # type: ignore[override]
        self.lines.append(text)

    warning = error = info  # type: ignore[assignment]


def by_hand(policy: Policy, snapshots: list[Snapshot]) -> list[list[tuple[str, str]]]:
    """The property tests' loop: model.observe -> decide -> model.settle."""
    model = Model()
    out = []
    for snapshot in snapshots:
        model.observe(snapshot, {OWNER.pid: snapshot.taken_at}, history_horizon(policy))
        decision = decide(snapshot, {}, model, policy, {})
        model.settle(decision.judged)
        out.append(ids(decision.assessment.listener_findings, decision.changes))
    return out


def ids(findings: dict[tuple[str, int], list[object]], changes: list[object]) -> list[tuple[str, str]]:
    return sorted([(str(key), str(f.id)) for key, found in findings.items() for f in found]  # type: ignore[attr-defined]
                  + [("change", f"{c.change.sysctl}={c.change.new}") for c in changes])  # type: ignore[attr-defined]


def test_the_daemon_tick_one_shot_status_and_the_property_loop_agree() -> None:
    policy = Policy(mode="apply", saturation=Saturation(sustain=3.0))
    snapshots = recorded()
    expected = by_hand(policy, snapshots)
    assert any(("change", "net.core.somaxconn=1024") in tick for tick in expected), expected
    with tempfile.TemporaryDirectory() as state:
        runner = run.Runner(policy, "all", Ledger(state), dry_run=True, log=Silent())
        runner.observer = Replay(snapshots)
        daemon = []
        for _ in snapshots:
            _, decision = runner.tick()
            daemon.append(ids(decision.assessment.listener_findings, decision.changes))
    assert daemon == expected
    # One-shot status decides on one sample with the same function: "sustained" means "now".
    first_full = snapshots[2]
    single = one_shot(first_full, policy, {})
    fresh = Model()
    fresh.update(first_full, {})
    assert ids(single.assessment.listener_findings, single.changes) == ids(
        decide(first_full, {}, fresh, policy, {}, one_shot=True).assessment.listener_findings,
        decide(first_full, {}, fresh, policy, {}, one_shot=True).changes)
    assert status.one_shot_advice(first_full, policy, Ledger(tempfile.mkdtemp())).listener_findings


def test_every_warning_and_error_entry_carries_a_message_id() -> None:
    # mypy checks EventLog's signatures; this catches a call that bypasses them (a bare structlog logger).
    missing = []
    for path in (REPO / "aqtune").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("warning", "error") and isinstance(node.func.value, ast.Attribute | ast.Name)
                    and "log" in ast.unparse(node.func.value)):
                has_id = len(node.args) >= 2 or any(k.arg == "message_id" for k in node.keywords)
                if not has_id:
                    missing.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not missing, missing


def test_the_readme_advice_table_is_the_findings_table() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert advice_table() in readme
    assert {spec.id for spec in TABLE} == set(FindingId)


def _constants(node: ast.AST) -> list[object]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant)]


def test_finding_ids_and_probe_states_are_compared_only_in_their_tables() -> None:
    # Outside decide/findings.py no code compares with a finding's string, nor parses a state's text.
    literals = {str(f) for f in FindingId}
    offenders = []
    for path in (REPO / "aqtune").rglob("*.py"):
        if path.name == "findings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            compared = isinstance(node, ast.Compare) and literals & {
                v for part in (node.left, *node.comparators) for v in _constants(part) if isinstance(v, str)}
            parsed = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                      and node.func.attr in ("startswith", "endswith")
                      and any(isinstance(v, str) and (v in literals or v.startswith("attached"))
                              for a in node.args for v in _constants(a)))
            if compared or parsed:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders


def test_throttle_says_again_after_its_period_or_when_the_value_changes() -> None:
    throttle: Throttle[str] = Throttle(10.0)
    assert throttle.due("a", 0.0, 1)
    assert not throttle.due("a", 5.0, 1)
    assert throttle.due("a", 6.0, 2)
    assert throttle.holds("a", 15.0) and not throttle.holds("a", 16.0)
    assert throttle.due("a", 16.0, 2)


def test_budget_keeps_one_source_from_starving_the_others() -> None:
    budget: Budget[str] = Budget(per_minute=8, per_source=2)
    flood = [budget.allow([f"user{i % 60}"], 1.0 + i / 100) for i in range(120)]
    assert sum(flood) == 8
    budget = Budget(per_minute=8, per_source=2)
    assert [budget.allow(["noisy"], float(t)) for t in range(4)] == [True, True, False, False]
    assert budget.allow(["service"], 4.0)
    assert budget.allow(["noisy"], 61.0)  # a minute later


def test_a_users_sockets_cannot_use_up_a_services_journal_entries() -> None:
    from aqtune.act.report import Pools

    pools = Pools(per_minute=30)
    tenant = [pools.allow(1000, f"listener{i}", 1.0 + i / 100)[0] for i in range(60)]
    assert sum(tenant) == 30
    assert pools.allow(33, "www-data's nginx", 2.0) == (True, 0)


def test_a_local_users_listener_never_decides_a_sysctl_change() -> None:
    # The same bursts, but the socket belongs to uid 1000 outside any system unit: advised, never tuned.
    policy = Policy(mode="apply", saturation=Saturation(sustain=3.0))
    model = Model()
    held = []
    for snapshot in recorded():
        for listener in snapshot.listeners:
            listener.uid, listener.processes = 1000, (Process(4242, "nginx", "nginx", None, user_unit="nginx.service"),)
        model.observe(snapshot, {4242: snapshot.taken_at}, history_horizon(policy))
        decision = decide(snapshot, {}, model, policy, {})
        model.settle(decision.judged)
        assert decision.changes == []
        held += [f.id for f in decision.held.get("web", [])]
    assert FindingId.OWNER_UNTRUSTED in held


def test_a_recommendation_is_repeated_only_for_a_larger_number() -> None:
    throttle: Throttle[str] = Throttle(300.0)
    assert throttle.due_if_grown("somaxconn", 0.0, 256)
    assert not throttle.due_if_grown("somaxconn", 1.0, 256)
    assert not throttle.due_if_grown("somaxconn", 2.0, 128)
    assert throttle.due_if_grown("somaxconn", 3.0, 512)
    assert throttle.due_if_grown("somaxconn", 400.0, 128)  # the period passed: said as it is now


def test_a_users_cleared_findings_are_charged_to_the_users_pool() -> None:
    from aqtune.act.report import FindingReporter
    from aqtune.decide.policy import JournalPolicy

    reporter = FindingReporter(Silent())
    policy = Policy(saturation=Saturation(sustain=0.0))
    cleared = 0
    for snapshot in recorded():
        for listener in snapshot.listeners:
            listener.uid = 1000
        model = Model()
        model.update(snapshot, {})
        reporter.report(snapshot, decide(snapshot, {}, model, policy, {}), JournalPolicy())
        cleared += sum("cleared" in line for line in reporter.log.lines)  # type: ignore[attr-defined]
        reporter.log.lines.clear()  # type: ignore[attr-defined]
    assert cleared > 0, "the run must clear findings for this to test anything"
    assert reporter.owners == {}, "forgotten once nothing of theirs is logged"
    assert reporter.pools.budgets["users"].sent and "system" not in reporter.pools.budgets


def test_one_shot_judges_only_listeners_a_single_sample_can_give_a_finding() -> None:
    """`aqtune status` builds no history for quiet listeners, and its advice is what judging them all gives."""
    def row(address: str, queue: int, cookie: int, netns: str = "web") -> Listener:
        return Listener(netns, "tcp", address, 80, queue, 64, 0, cookie, cookie + 100, 33, (OWNER,))

    namespaces = [Namespace(name, inode, {"net.core.somaxconn": 64}, {}) for name, inode in (("web", NS_INODE),
                                                                                              ("db", NS_INODE + 1))]
    rows = [row("0.0.0.0:80", 0, 1), row("0.0.0.0:81", 64, 2), row("0.0.0.0:82", 40, 3), row("0.0.0.0:83", 1, 4, "db")]
    snapshot = Snapshot(1_700_000_000.0, 0.01, namespaces, rows)
    policy = Policy()
    assert [l.cookie for l in may_be_judged(snapshot, policy, {})] == [2]
    # A rule's lower threshold, a namespace aqtune changed and eBPF's view widen the set.
    lowered = Policy(listeners=(ListenerRule(port=80, fill_ratio=0.5),))
    assert [l.cookie for l in may_be_judged(snapshot, lowered, {})] == [2, 3]
    changed = {NS_INODE + 1: {"net.core.somaxconn": Managed(64, 128, 1_700_000_000.0)}}
    assert [l.cookie for l in may_be_judged(snapshot, policy, changed)] == [2, 4]
    model = Model()
    model.update(snapshot, {})
    everyone = decide(snapshot, {}, model, policy, {}, one_shot=True).assessment
    assert one_shot(snapshot, policy, {}).assessment.listener_findings == everyone.listener_findings
