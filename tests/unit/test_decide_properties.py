"""Safety properties of the tuning decisions, over arbitrary policies, values and histories.

``plan`` and ``refusal`` are pure, so hypothesis drives them directly. The sequence properties run
``simulate``: the daemon's own decision stages (model.observe -> decide -> model.settle, then
refusal) with the kernel replaced by a dict of sysctls and the ledger by a dict of ``Managed``
records, so each plan sees its own earlier changes exactly as the daemon would.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aqtune.decide.findings import Finding
from aqtune.decide.policy import SYSCTL_CEILING, Apply, Limits, Policy, Saturation
from aqtune.decide.tick import decide, history_horizon
from aqtune.decide.tuning import SOMAXCONN, SYN_BACKLOG, Change, NamespaceState, plan, refusal
from aqtune.model.history import Model
from aqtune.records import COUNTERS, Listener, ListenerEvents, Managed, Namespace, Process, Snapshot

# Examples per property, kept low so the unit suite stays fast; AQTUNE_EXAMPLES=2000 for a deep run.
# No deadline: per-example timing is noisy on shared CI machines. No database: its replay and
# pareto phases cost more than the examples here.
EXAMPLES = int(os.environ.get("AQTUNE_EXAMPLES", "100"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
# A simulated run is up to 128 ticks of the whole pipeline.
SIMULATION = settings(PROPERTY, max_examples=max(EXAMPLES * 3 // 5, 1))

NETNS = "ns1"
TUNED = (SOMAXCONN, SYN_BACKLOG)


def limits_of(policy: Policy, sysctl: str) -> Limits:
    return policy.somaxconn if sysctl == SOMAXCONN else policy.syn_backlog


# --- strategies ---

@st.composite
def limits(draw: st.DrawFn) -> Limits:
    # The ranges policy.parse accepts, including its cross-check min <= max.
    low = draw(st.integers(1, 1 << 20))
    return Limits(max=draw(st.integers(low, SYSCTL_CEILING)), min=low,
                  step=draw(st.floats(1.0, 64.0, exclude_min=True, allow_nan=False)),
                  cooldown=draw(st.floats(0.0, 86400.0 * 7, allow_nan=False)))


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    return Policy(
        mode=draw(st.sampled_from(["recommend", "apply"])),
        somaxconn=draw(limits()),
        syn_backlog=draw(limits()),
        apply=Apply(namespaces=draw(st.sampled_from([("*",), (NETNS,), ("other",), (), ("host", NETNS)]))),
        apply_refused=draw(st.none() | st.just("policy file is writable by others")),
    )


optional_int = st.none() | st.integers(0, SYSCTL_CEILING)
listener_findings = st.lists(st.builds(
    Finding,
    id=st.sampled_from(["saturated", "stalled-workers", "capped-by-somaxconn", "capped-by-app", "relisten-needed"]),
    text=st.just("..."),
    evidence=st.fixed_dictionaries({"target": optional_int, "requested": optional_int}),
), max_size=4)
namespace_findings = st.lists(st.builds(
    Finding, id=st.sampled_from(["syn-queue-full", "syn-backlog-limit", "syncookies-active"]), text=st.just("..."),
), max_size=3)
sysctl_values = st.dictionaries(st.sampled_from(TUNED), st.integers(0, SYSCTL_CEILING))
times = st.floats(0.0, 2e9, allow_nan=False)


@st.composite
def ledgers(draw: st.DrawFn, sysctls: dict[str, int]) -> dict[str, Managed]:
    """Records for some of the sysctls; mostly still holding what aqtune wrote, sometimes not."""
    records = {}
    for sysctl in TUNED:
        if draw(st.booleans()):
            current = sysctls.get(sysctl)
            applied = current if current is not None and draw(st.booleans()) else draw(st.integers(0, SYSCTL_CEILING))
            records[sysctl] = Managed(draw(st.integers(0, SYSCTL_CEILING)), applied, draw(times))
    return records


def changes_of(policy: Policy, sysctls: dict[str, int], managed: dict[str, Managed], now: float,
               found: list[Finding], ns_found: list[Finding]) -> tuple[list[Change], list[Finding]]:
    return plan(NamespaceState(NETNS, sysctls, found, ns_found), managed, policy, now)


# --- single plan() calls ---

@PROPERTY
@given(policy=policies(), sysctls=sysctl_values, found=listener_findings, ns_found=namespace_findings,
       now=times, data=st.data())
def test_a_change_only_raises_for_a_reason_to_the_measured_number_or_by_step_and_never_above_max(
        policy: Policy, sysctls: dict[str, int], found: list[Finding], ns_found: list[Finding], now: float,
        data: st.DataObject) -> None:
    managed = data.draw(ledgers(sysctls))
    changes, _ = changes_of(policy, sysctls, managed, now, found, ns_found)
    assert len({c.sysctl for c in changes}) == len(changes), "one change per sysctl and plan"
    capped = [f for f in found if f.id == "capped-by-somaxconn"]
    for change in changes:
        bounds = limits_of(policy, change.sysctl)
        assert change.netns == NETNS
        assert change.old == sysctls[change.sysctl]
        assert change.old < change.new <= bounds.max
        if change.sysctl == SYN_BACKLOG:
            # No measurement sizes it: a step too small to add a whole unit adds one; from 0 the
            # policy's min is the cap.
            assert change.new <= (max(change.old * bounds.step, change.old + 1) if change.old else bounds.min)
        record = managed.get(change.sysctl)
        if record is not None:
            assert record.applied == change.old, "never over a value changed by hand"
            assert now >= record.changed_at + bounds.cooldown, "never inside the cooldown"
        # somaxconn rises only for listeners capped by it, to exactly the number their diagnosis
        # measured (within the policy's min and max); tcp_max_syn_backlog only when its own rule drops SYNs.
        if change.sysctl == SOMAXCONN:
            assert capped
            measured = max(int(f.evidence.get("target") or 0) for f in capped)
            assert change.new == min(max(measured, policy.somaxconn.min), policy.somaxconn.max)
        else:
            assert any(f.id == "syn-backlog-limit" for f in ns_found)


@PROPERTY
@given(policy=policies(), sysctls=st.fixed_dictionaries({SOMAXCONN: st.integers(0, SYSCTL_CEILING),
                                                         SYN_BACKLOG: st.integers(0, SYSCTL_CEILING)}),
       overridden=st.sampled_from([{SOMAXCONN}, {SYN_BACKLOG}, set(TUNED)]),
       offset=st.integers(1, SYSCTL_CEILING), original=st.integers(0, SYSCTL_CEILING), now=times)
def test_a_value_changed_by_hand_is_left_alone_and_reported(policy: Policy, sysctls: dict[str, int],
                                                            overridden: set[str], offset: int, original: int,
                                                            now: float) -> None:
    managed = {}
    for sysctl in TUNED:
        # What aqtune wrote differs from the current value exactly for the overridden sysctls.
        applied = (sysctls[sysctl] + offset) % (SYSCTL_CEILING + 1) if sysctl in overridden else sysctls[sysctl]
        # changed_at long ago: the cooldown is not what holds the change back.
        managed[sysctl] = Managed(original, applied, changed_at=now - 86400.0 * 8)
    # Findings that want both sysctls raised, as far as they can go.
    found = [Finding("capped-by-somaxconn", "...", {"target": SYSCTL_CEILING, "requested": None})]
    ns_found = [Finding("syn-backlog-limit", "...")]
    changes, held = changes_of(policy, sysctls, managed, now, found, ns_found)
    assert not {c.sysctl for c in changes} & overridden
    # One report per overridden sysctl, and none for the other: an override is per sysctl.
    reported = {str(f.evidence["sysctl"]): f for f in held if f.id == "admin-override"}
    assert set(reported) == overridden
    for sysctl, finding in reported.items():
        assert finding.evidence["current"] == sysctls[sysctl]
        assert finding.evidence["aqtune_set"] == managed[sysctl].applied


@PROPERTY
@given(policy=policies(), sysctls=st.fixed_dictionaries({SOMAXCONN: st.integers(0, SYSCTL_CEILING),
                                                         SYN_BACKLOG: st.integers(0, SYSCTL_CEILING)}),
       more=st.integers(1, SYSCTL_CEILING), now=times, data=st.data())
def test_a_wanted_change_is_made_or_explained(policy: Policy, sysctls: dict[str, int], more: int, now: float,
                                              data: st.DataObject) -> None:
    # Otherwise the advice says "raise somaxconn" while the daemon silently never does.
    managed = data.draw(ledgers(sysctls))
    found = [Finding("capped-by-somaxconn", "...", {"target": sysctls[SOMAXCONN] + more, "requested": None})]
    changes, held = changes_of(policy, sysctls, managed, now, found, [Finding("syn-backlog-limit", "...")])
    for sysctl in TUNED:
        made = [c for c in changes if c.sysctl == sysctl]
        explained = [f for f in held if f.evidence.get("sysctl") == sysctl]
        assert len(made) + len(explained) == 1, (sysctl, made, explained)


@pytest.mark.parametrize("current,step", [(0, 4.0), (16, 1.05)])
def test_a_value_too_small_to_grow_by_step_is_still_raised_or_explained(current: int, step: float) -> None:
    # net.core.somaxconn=0 is a value the kernel accepts; every listener then holds one connection.
    policy = Policy(mode="apply", somaxconn=Limits(step=step))
    found = [Finding("capped-by-somaxconn", "...", {"target": 1024, "requested": None})]
    changes, held = changes_of(policy, {SOMAXCONN: current}, {}, 0.0, found, [])
    assert changes or held


# --- refusal() ---

changes = st.builds(Change, netns=st.sampled_from([NETNS, "host", "other", "pid:4242"]),
                    sysctl=st.sampled_from(TUNED), old=st.integers(0, SYSCTL_CEILING),
                    new=st.integers(0, SYSCTL_CEILING), reason=st.text(max_size=20))


@PROPERTY
@given(change=changes, policy=policies(), dry_run=st.booleans())
def test_only_apply_mode_without_dry_run_writes_and_only_where_allowed(change: Change, policy: Policy,
                                                                      dry_run: bool) -> None:
    why_not = refusal(change, policy, dry_run)
    if dry_run:
        assert why_not is not None, "dry run writes, whatever the policy"
    if policy.mode == "recommend":
        assert why_not is not None, "recommend mode writes"
    # The converse, so the above cannot pass by refusing everything.
    allowed = "*" in policy.apply.namespaces or change.netns in policy.apply.namespaces
    assert (why_not is None) == (not dry_run and policy.mode == "apply" and policy.apply_refused is None
                                 and allowed)


# --- simulated runs: run.py's loop over time ---

OWNER = Process(4242, "nginx", "nginx: master process", "nginx.service")
COOKIE = 77
INODE = 99
START = 1_700_000_000.0
NS_INODE = 4026532000


def asked_events(asked: int) -> ListenerEvents:
    """What eBPF reports of a listener whose listen() call it saw."""
    return ListenerEvents(enqueued=0, peak_queue=None, ack_overflow=0, syn_overflow=None, synack_retransmits=0,
                          accepts=0, queue_wait_ms=None, requested_backlog=asked)


@dataclass
class Trace:
    fills: list[float] = field(default_factory=list)
    backlogs: list[int] = field(default_factory=list)
    saturated: list[bool] = field(default_factory=list)
    values: list[dict[str, int]] = field(default_factory=list)  # the sysctls after each tick
    written: list[tuple[float, Change]] = field(default_factory=list)


@dataclass
class World:
    """What one simulated run starts from and is fed each tick."""

    somaxconn: int
    syn_backlog: int
    asked: int  # the backlog the application passes to listen()
    asked_known: bool  # whether eBPF reports it
    interval: float
    queue_at: Callable[[int, int], int]  # (tick, current backlog) -> queue length
    drops: list[int]  # socket drops added per tick
    relisten: list[bool]  # whether the application calls listen() again before the tick
    syn_drops: list[int]  # ListenDrops added per tick that no other counter explains


def simulate(policy: Policy, world: World, dry_run: bool = False) -> Trace:
    trace = Trace()
    model = Model()
    ledger: dict[str, Managed] = {}
    sysctls = {SOMAXCONN: world.somaxconn, SYN_BACKLOG: world.syn_backlog, "net.ipv4.tcp_syncookies": 0}
    counters = dict.fromkeys(COUNTERS, 0)
    backlog = min(world.asked, world.somaxconn)
    socket_drops = 0
    for tick in range(len(world.drops)):
        now = START + tick * world.interval
        if world.relisten[tick]:
            backlog = min(world.asked, sysctls[SOMAXCONN])
        socket_drops += world.drops[tick]
        counters["ListenDrops"] += world.syn_drops[tick]
        listener = Listener(NETNS, "tcp", "0.0.0.0:80", 80, world.queue_at(tick, backlog), backlog, socket_drops,
                            COOKIE, INODE, 0, (OWNER,))
        snapshot = Snapshot(now, 0.01, [Namespace(NETNS, NS_INODE, dict(sysctls), dict(counters))], [listener])
        # A busy owner (one core), so stalled-workers never stands in for the capacity advice.
        model.observe(snapshot, {OWNER.pid: tick * world.interval}, history_horizon(policy))
        events = {INODE: asked_events(world.asked)} if world.asked_known else {}
        decision = decide(snapshot, events, model, policy, {NS_INODE: dict(ledger)})
        model.settle(decision.judged)
        trace.fills.append(listener.fill)
        trace.backlogs.append(backlog)
        # A quiet listener gets no window worked out: it is not saturated.
        window = decision.assessment.windows.get((NETNS, COOKIE))
        trace.saturated.append(window is not None and window.saturated)
        wanted = [planned.change for planned in decision.changes]
        for change in wanted:
            if refusal(change, policy, dry_run) is not None:
                continue
            # What sysctl.apply_change leaves in the ledger: the first original, the last value, its time,
            # and the values written before it.
            record = ledger.get(change.sysctl)
            if record is None:
                ledger[change.sysctl] = Managed(change.old, change.new, now)
            else:
                earlier = record.earlier + ((record.applied,) if record.applied != record.original else ())
                ledger[change.sysctl] = Managed(record.original, change.new, now, earlier)
            sysctls[change.sysctl] = change.new
            trace.written.append((now, change))
        trace.values.append({s: sysctls[s] for s in TUNED})
    return trace


def check_trace(policy: Policy, trace: Trace) -> None:
    """Values never go down, each write is bounded, and writes of one sysctl are a cooldown apart."""
    for sysctl in TUNED:
        series = [values[sysctl] for values in trace.values]
        assert all(a <= b for a, b in itertools.pairwise(series)), f"{sysctl} went down: {series}"
        bounds = limits_of(policy, sysctl)
        writes = [(at, c) for at, c in trace.written if c.sysctl == sysctl]
        for at, change in writes:
            assert change.old < change.new <= bounds.max, (at, change)
            if sysctl == SYN_BACKLOG:
                assert change.new <= max(change.old * bounds.step, change.old + 1), (at, change)
        for (earlier, _), (later, _) in itertools.pairwise(writes):
            # The same comparison plan makes, so float rounding cannot make it disagree.
            assert later >= earlier + bounds.cooldown, f"{sysctl} changed at {earlier} and again at {later}"


@st.composite
def sim_policies(draw: st.DrawFn, mode: str = "apply") -> Policy:
    # Short sustains and cooldowns relative to the run, so runs see several changes and holds.
    fill_ratio = draw(st.floats(0.3, 1.0))
    interval = draw(st.sampled_from([0.25, 0.5, 1.0, 2.0, 5.0]))
    saturation = Saturation(fill_ratio=fill_ratio, clear_ratio=draw(st.floats(0.05, fill_ratio - 0.05)),
                            sustain=draw(st.sampled_from([0.0, 1.0, 3.0, 10.0]) | st.floats(0.0, 30.0)))

    def sim_limits() -> Limits:
        low = draw(st.integers(1, 4096))
        return Limits(max=draw(st.integers(low, 1 << 20)), min=low,
                      step=draw(st.sampled_from([1.5, 2.0, 4.0]) | st.floats(1.01, 8.0)),
                      cooldown=draw(st.sampled_from([0.0, 1.0, 10.0, 30.0]) | st.floats(0.0, 60.0)))

    return Policy(mode=mode, interval=interval, saturation=saturation, somaxconn=sim_limits(),
                  syn_backlog=sim_limits())


@st.composite
def worlds(draw: st.DrawFn, policy: Policy, levels: st.SearchStrategy[Callable[[int], int]]) -> World:
    # Input comes in bursts: a fill level held for a few ticks with its drops, a reload at its start.
    # Bursts of one tick are the fastest oscillation; drawing bursts rather than ticks keeps
    # examples cheap to generate and shrink.
    few = st.just(0) | st.integers(0, 3)
    burst = st.tuples(levels, st.integers(1, 8), few, st.booleans(), few)
    queues: list[Callable[[int], int]] = []
    drops: list[int] = []
    relisten: list[bool] = []
    syn_drops: list[int] = []
    for level, length, dropped, reload, syn_dropped in draw(st.lists(burst, min_size=1, max_size=16)):
        queues += [level] * length
        drops += [dropped] * length
        relisten += [reload] + [False] * (length - 1)
        syn_drops += [syn_dropped] * length
    return World(
        somaxconn=draw(st.integers(64, 70000)),
        syn_backlog=draw(st.integers(64, 70000)),
        asked=draw(st.integers(64, 1 << 20)),
        asked_known=draw(st.booleans()),
        interval=policy.interval,
        queue_at=lambda tick, backlog: queues[tick](backlog),
        drops=drops,
        relisten=relisten,
        syn_drops=syn_drops,
    )


def fill_level(fill: float) -> Callable[[int], int]:
    # A TCP queue holds at most backlog + 1.
    return lambda backlog: min(int(fill * backlog), backlog + 1)


any_fill = st.floats(0.0, 1.2).map(fill_level)


@SIMULATION
@given(data=st.data())
def test_simulated_apply_run_is_monotonic_bounded_and_respects_cooldown(data: st.DataObject) -> None:
    policy = data.draw(sim_policies())
    check_trace(policy, simulate(policy, data.draw(worlds(policy, any_fill))))


@SIMULATION
@given(data=st.data())
def test_simulated_dry_run_and_recommend_runs_write_nothing(data: st.DataObject) -> None:
    # The daemon keeps planning (it logs recommendations) but no value may ever change.
    mode = data.draw(st.sampled_from(["apply", "recommend"]))
    policy = data.draw(sim_policies(mode))
    world = data.draw(worlds(policy, any_fill))
    trace = simulate(policy, world, dry_run=mode == "apply")
    assert trace.written == []
    assert all(v == {SOMAXCONN: world.somaxconn, SYN_BACKLOG: world.syn_backlog} for v in trace.values)


def lowest_queue_at(ratio: float, backlog: int) -> int:
    """The smallest queue whose fill is >= ratio, by the model's own division."""
    queue = math.ceil(ratio * backlog)
    while queue > 0 and (queue - 1) / backlog >= ratio:
        queue -= 1
    while queue / backlog < ratio:
        queue += 1
    return queue


@st.composite
def between_thresholds(draw: st.DrawFn, policy: Policy) -> Callable[[int], int]:
    """A fill either at/above fill_ratio or in [clear_ratio, fill_ratio): the band hysteresis is for."""
    fill, clear = policy.saturation.fill_ratio, policy.saturation.clear_ratio
    level = draw(st.sampled_from(["full", "at-fill", "just-below-fill", "at-clear"]))
    if level == "full":
        return lambda backlog: backlog + 1
    if level == "at-fill":
        return lambda backlog: lowest_queue_at(fill, backlog)
    if level == "just-below-fill":
        return lambda backlog: lowest_queue_at(fill, backlog) - 1
    return lambda backlog: lowest_queue_at(clear, backlog)


@SIMULATION
@given(data=st.data())
def test_fill_oscillating_between_clear_and_fill_ratio_does_not_flap(data: st.DataObject) -> None:
    policy = data.draw(sim_policies())
    world = data.draw(worlds(policy, between_thresholds(policy)))
    trace = simulate(policy, world)
    check_trace(policy, trace)
    # The input really stays in the band: backlogs are >= 64 and the band is >= 0.05 wide.
    assert min(trace.fills) >= policy.saturation.clear_ratio
    # Hysteresis: a fill never below clear_ratio never clears, so once saturated a listener stays so
    # until it calls listen() again with a new backlog, which starts its history afresh.
    for _backlog, run in itertools.groupby(zip(trace.backlogs, trace.saturated, strict=True), key=lambda t: t[0]):
        states = [saturated for _, saturated in run]
        first = states.index(True) if True in states else len(states)
        assert all(states[first:]), trace.saturated


def test_simulation_raises_somaxconn_to_the_measured_burst_a_cooldown_apart() -> None:
    # A pinned run, so the properties above are known not to pass on a loop that never changes anything:
    # bursts that overflow the queue every other second (drained in between), an application asking
    # for 65535 (as much as somaxconn allows) that re-listens at once.
    policy = Policy(mode="apply", saturation=Saturation(sustain=10.0),
                    somaxconn=Limits(max=65535, min=1024, step=4.0, cooldown=30.0))
    n = 120
    world = World(somaxconn=128, syn_backlog=512, asked=65535, asked_known=True, interval=1.0,
                  queue_at=lambda tick, backlog: backlog + 1 if tick % 2 else 0, drops=[400] * n,
                  relisten=[True] * n, syn_drops=[0] * n)
    trace = simulate(policy, world)
    written = [(at - START, c.old, c.new) for at, c in trace.written]
    # Saturated by the first drops, judged bursts once the queue has drained (a sweep later); each
    # raise is the worst burst (a full queue + 400 dropped) with 25%
    # headroom, rounded up to a power of two, and waits out the 30 s cooldown.
    assert written == [(2.0, 128, 1024), (32.0, 1024, 2048), (62.0, 2048, 4096), (92.0, 4096, 8192)]
    check_trace(policy, trace)


def test_simulation_never_raises_for_a_queue_that_never_drains() -> None:
    # Always full, the owner busy: the workers are the limit, and no sysctl is raised for that.
    policy = Policy(mode="apply", saturation=Saturation(sustain=10.0))
    n = 60
    world = World(somaxconn=128, syn_backlog=512, asked=65535, asked_known=True, interval=1.0,
                  queue_at=lambda _tick, backlog: backlog + 1, drops=[5] * n, relisten=[True] * n, syn_drops=[0] * n)
    assert simulate(policy, world).written == []
