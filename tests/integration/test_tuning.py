"""The tuning loop on a real kernel: `aqtune run` raising somaxconn inside one test namespace only, within
the policy's bounds and cooldown, and `aqtune rollback` undoing it (after a stop, a kill -9, a hand change).

Every sysctl is written inside an ``aqt-*`` namespace; the host's somaxconn is read before and after.
"""

from __future__ import annotations

import contextlib
import json
import pwd
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aqtune.act.ledger import FORMAT_VERSION
from aqtune.collect.netns import cookie_of
from tests.helpers.aqtune_run import Daemon, aqtune, ledger_changes, logged, write_policy
from tests.helpers.namespace import HelperProcess, TestNamespace, wait_until
from tests.integration.expect import bursts, draining_listener, flood_target, wait_for_queues

pytestmark = pytest.mark.integration

SOMAXCONN = "net.core.somaxconn"
INTERVAL = 0.5
SUSTAIN = 2
STEP = 4
MIN = 128  # the default, 1024, would exceed MAX
MAX = 1000  # below RAISED * STEP: a second raise, where one happens, is bounded by max
CAPPED = 64  # the test namespace's somaxconn, which caps a listen(1024)
RAISED = CAPPED * STEP
ASKED = 1024  # what the listener passes to listen()
FLOOD = 120  # connects per burst: 65 fill the queue of 64, the rest are dropped and retried a second later
BURST_EVERY = 2.0  # seconds between bursts; the listener drains its queue every 0.1 s in between
RAISE_TIMEOUT = SUSTAIN + 20 * INTERVAL  # sustain, then a few sweeps; aqtune and ip netns exec start slowly
ADMIN_VALUE = 512

POLICY = f"""\
mode = "{{mode}}"
interval = {INTERVAL}

[saturation]
sustain = {{sustain}}

[somaxconn]
min = {MIN}
max = {MAX}
step = {STEP}.0
cooldown = {{cooldown}}
"""


def policy_text(mode: str = "apply", sustain: float = SUSTAIN, cooldown: float = 3600) -> str:
    # The default cooldown is far longer than any test: a second change within one can only mean it was ignored.
    return POLICY.format(mode=mode, sustain=sustain, cooldown=cooldown)


def host_somaxconn() -> int:
    # The test process stays in the host namespace (conftest checks it), so this is the host's value.
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


def somaxconn(ns: TestNamespace) -> int:
    return ns.sysctls(SOMAXCONN)[SOMAXCONN]


def capped_listener(ns: TestNamespace, load: contextlib.ExitStack,
                    count: int = FLOOD) -> tuple[HelperProcess, dict[str, Any]]:
    """A listen(1024) capped to 64 by the namespace's somaxconn, whose worker drains its queue quickly but
    is hit by bursts larger than it (until the test ends): the one case a longer queue helps.

    A burst of 120 overflows the queue by 55: the measured number is (65 + 55) x 1.25 -> 256 = RAISED.
    """
    ns.set_sysctl(SOMAXCONN, CAPPED)
    helper, listener = draining_listener(ns, f"tcp4:{ASKED}")
    assert ns.ss_tcp()[listener["address"]].backlog == CAPPED
    load.enter_context(bursts(ns, listener, count, every=BURST_EVERY))
    return helper, listener


def wait_for_raise(ns: TestNamespace) -> int:
    """Poll the namespace's somaxconn until aqtune changed it; the new value."""
    return wait_until(lambda: (value := somaxconn(ns)) != CAPPED and value, f"{SOMAXCONN} raised in {ns.name}",
                      timeout=RAISE_TIMEOUT, interval=0.05)


def set_line(ns: TestNamespace, old: int = CAPPED, new: int = RAISED) -> str:
    return f"set {SOMAXCONN} {old} -> {new} in netns {ns.name}"


def rollback(state: Path) -> list[list[str]]:
    """`aqtune rollback`'s lines, split in words: [outcome, "netns", NAME, "SYSCTL:", detail...]."""
    done = aqtune("rollback", "--state-dir", str(state))
    assert done.returncode == 0, done.stdout + done.stderr
    return [line.split() for line in done.stdout.splitlines()]


def advice_ids(ns: TestNamespace, address: str, policy: Path, state: Path) -> list[str]:
    # --sweep: the advice for the state right now, not the running daemon's last sweep.
    done = aqtune("status", "--json", "--sweep", "--netns", ns.name, "--config", str(policy),
                  "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    (listener,) = [entry for entry in json_listeners(done.stdout) if entry["address"] == address]
    return [advice["id"] for advice in listener["advice"]]


def json_listeners(text: str) -> list[dict[str, Any]]:
    listeners: list[dict[str, Any]] = json.loads(text)["listeners"]
    return listeners


def write_ledger(state: Path, changes: list[dict[str, Any]]) -> None:
    """A changes.json in aqtune's format, as a daemon killed at some point would have left it (each
    entry with its namespace's cookie, as aqtune records it)."""
    state.mkdir()
    changes = [{"cookie": cookie_of("/proc/self/ns/net" if change["netns"] == "host"
                                    else f"/run/netns/{change['netns']}"), **change} for change in changes]
    (state / "changes.json").write_text(json.dumps({"version": FORMAT_VERSION, "changes": changes}),
                                        encoding="utf-8")


def only_entry(state: Path) -> dict[str, Any]:
    changes = ledger_changes(state)
    assert changes is not None and len(changes) == 1, changes
    return changes[0]


def one_applied_entry(ns: TestNamespace, state: Path) -> dict[str, Any]:
    entry = only_entry(state)
    assert (entry["netns"], entry["netns_inode"], entry["sysctl"]) == (ns.name, ns.inode, SOMAXCONN)
    assert (entry["original"], entry["applied"], entry["pending"]) == (CAPPED, RAISED, None)
    return entry


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def load() -> Iterator[contextlib.ExitStack]:
    """Load started by a test, stopped after it whatever its outcome."""
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.fixture
def start_daemon(tmp_path: Path, state: Path) -> Iterator[Callable[..., Daemon]]:
    """Starts `aqtune run --config POLICY --netns NS --state-dir STATE [EXTRA...]`; every daemon is killed after
    the test, whatever its outcome (it runs in the host namespace, so namespace teardown would not reach it)."""
    started: list[Daemon] = []

    def start(ns: TestNamespace, policy: Path, *extra: str) -> Daemon:
        daemon = Daemon(["--config", str(policy), "--netns", ns.name, "--state-dir", str(state), *extra],
                        tmp_path / f"run-{len(started)}.log")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


def test_raises_somaxconn_once_in_its_namespace_and_rollback_restores_it(
        netns: Callable[[], TestNamespace], start_daemon: Callable[..., Daemon], tmp_path: Path, state: Path,
        load: contextlib.ExitStack) -> None:
    ns = netns()
    host_before = host_somaxconn()
    _, listener = capped_listener(ns, load)
    daemon = start_daemon(ns, write_policy(tmp_path / "policy.toml", policy_text()))

    assert wait_for_raise(ns) == RAISED <= MAX
    assert host_somaxconn() == host_before
    changed = daemon.wait_for(set_line(ns))
    # The listener keeps its backlog of 64 until it calls listen() again, and aqtune says so.
    daemon.wait_for(logged("finding", "relisten-needed"), logged("subject", f"{ns.name} {listener['address']}"),
                    after=changed)
    # The queue stays full for a few more sweeps; a second change now would ignore the cooldown.
    time.sleep(3 * INTERVAL)
    assert daemon.stop() == 0
    assert daemon.count("aqtune stopped") == 1
    assert daemon.count(f"set {SOMAXCONN}") == 1
    assert somaxconn(ns) == RAISED
    assert ns.ss_tcp()[listener["address"]].backlog == CAPPED, "somaxconn reaches a listener only on listen()"
    assert one_applied_entry(ns, state)["changed_at"] <= time.time()

    assert rollback(state) == [["restored", "netns", ns.name, f"{SOMAXCONN}:", str(RAISED), "->", str(CAPPED)]]
    assert somaxconn(ns) == CAPPED
    assert ledger_changes(state) == []
    assert rollback(state)[0][:3] == ["nothing", "to", "roll"]
    assert host_somaxconn() == host_before


def test_relisten_picks_up_the_raise_and_the_cooldown_holds_the_next_one(
        netns: Callable[[], TestNamespace], start_daemon: Callable[..., Daemon], tmp_path: Path, state: Path,
        load: contextlib.ExitStack) -> None:
    ns = netns()
    helper, listener = capped_listener(ns, load)
    address = listener["address"]
    policy = write_policy(tmp_path / "policy.toml", policy_text())
    daemon = start_daemon(ns, policy)
    assert wait_for_raise(ns) == RAISED
    # The positive controls for the checks after the re-listen: both the daemon and status see the stale backlog.
    daemon.wait_for(logged("finding", "relisten-needed"), logged("subject", f"{ns.name} {address}"))
    assert "relisten-needed" in advice_ids(ns, address, policy, state)

    helper.request(f"relisten {listener['index']} {ASKED}")
    assert ns.ss_tcp()[address].backlog == RAISED
    assert "relisten-needed" not in advice_ids(ns, address, policy, state)
    daemon.wait_for(f"{ns.name} {address}: relisten-needed cleared")

    # Bursts larger than the longer queue too: capped by somaxconn again (eBPF saw it ask for 1024), so
    # aqtune wants more, but the cooldown holds it.
    load.enter_context(bursts(ns, listener, RAISED + FLOOD + 24, every=BURST_EVERY))  # 400: flood.py allows 500
    daemon.wait_for(logged("finding", "cooldown"), logged("subject", f"netns {ns.name}"), logged("sysctl", SOMAXCONN),
                    timeout=RAISE_TIMEOUT)
    assert daemon.stop() == 0
    assert daemon.count(f"set {SOMAXCONN}") == 1
    assert somaxconn(ns) == RAISED
    one_applied_entry(ns, state)


def test_app_capped_listener_is_advised_and_never_tuned(
        netns: Callable[[], TestNamespace], start_daemon: Callable[..., Daemon], tmp_path: Path, state: Path,
        load: contextlib.ExitStack) -> None:
    ns = netns()
    default = somaxconn(ns)
    backlog = 8
    assert default > backlog, "a fresh namespace's somaxconn (4096 since Linux 5.4) must not cap listen(8)"
    helper, listener = draining_listener(ns, f"tcp4:{backlog}")
    policy = write_policy(tmp_path / "policy.toml", policy_text())
    daemon = start_daemon(ns, policy)
    daemon.wait_for("aqtune running")
    load.enter_context(bursts(ns, listener, 3 * backlog, every=BURST_EVERY))
    daemon.wait_for(logged("finding", "capped-by-app"), logged("subject", f"{ns.name} {listener['address']}"),
                    timeout=RAISE_TIMEOUT)

    done = aqtune("status", "--json", "--netns", ns.name, "--config", str(policy), "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    (seen,) = json_listeners(done.stdout)
    if seen["advice"]:  # the daemon's live state: its latest sweep may fall between bursts
        advice = {entry["id"]: entry for entry in seen["advice"]}
        assert "capped-by-somaxconn" not in advice, advice
    line = daemon.lines()[daemon.wait_for(logged("finding", "capped-by-app"))]
    assert f"aqt-listen (pid {helper.ready()['pid']})" in line and f"backlog {backlog} is below somaxconn" in line
    # SIGTERM lets the sweep that found it finish, including its plan and apply step.
    assert daemon.stop() == 0
    assert daemon.count(f"set {SOMAXCONN}") == 0 and daemon.count("recommend ") == 0
    assert somaxconn(ns) == default
    assert ledger_changes(state) is None, "nothing was written, so nothing was recorded"


def test_a_stalled_listener_gets_no_backlog_advice_and_no_raise(
        netns: Callable[[], TestNamespace], start_daemon: Callable[..., Daemon], tmp_path: Path, state: Path) -> None:
    # The same capped listen(1024), but its worker never accepts: a longer queue would only add waiting.
    ns = netns()
    ns.set_sysctl(SOMAXCONN, CAPPED)
    helper = ns.listen(f"tcp4:{ASKED}")
    (listener,) = helper.ready()["listeners"]
    daemon = start_daemon(ns, write_policy(tmp_path / "policy.toml", policy_text()))
    daemon.wait_for("aqtune running")
    ns.flood([(flood_target(listener), FLOOD)])
    wait_for_queues(ns, {listener["address"]: CAPPED + 1})
    daemon.wait_for(logged("finding", "stalled-workers"), logged("subject", f"{ns.name} {listener['address']}"),
                    timeout=RAISE_TIMEOUT)
    time.sleep(3 * INTERVAL)
    assert daemon.stop() == 0
    assert daemon.count(logged("finding", "capped-by")) == 0 and daemon.count(f"set {SOMAXCONN}") == 0
    assert somaxconn(ns) == CAPPED and ledger_changes(state) is None


def test_dry_run_recommends_and_writes_nothing(
        netns: Callable[[], TestNamespace], start_daemon: Callable[..., Daemon], tmp_path: Path, state: Path,
        load: contextlib.ExitStack) -> None:
    ns = netns()
    host_before = host_somaxconn()
    capped_listener(ns, load)
    daemon = start_daemon(ns, write_policy(tmp_path / "policy.toml", policy_text()), "--dry-run")
    daemon.wait_for("aqtune running: mode dry-run")
    recommended = daemon.wait_for(f"recommend {SOMAXCONN}=", f"in netns {ns.name} (now {CAPPED}); "
                                  "not applied: dry run", timeout=RAISE_TIMEOUT)
    # The bursts go on, so every sweep wants the change again; it is said once, not every sweep, and
    # again only for a larger number (a worse burst: on a loaded machine the worker drains late), never
    # for a smaller one.
    time.sleep(3 * INTERVAL)
    assert daemon.stop() == 0
    said = daemon.matching("recommend ")
    assert said[0] == recommended
    numbers = [int(daemon.lines()[i].split(f"{SOMAXCONN}=")[1].split()[0]) for i in said]
    assert numbers[0] >= RAISED and numbers == sorted(set(numbers)), numbers
    assert daemon.count(f"set {SOMAXCONN}") == 0
    assert somaxconn(ns) == CAPPED
    assert ledger_changes(state) is None
    assert host_somaxconn() == host_before


def test_rollback_leaves_a_value_changed_by_hand_alone(
        netns: Callable[[], TestNamespace], start_daemon: Callable[..., Daemon], tmp_path: Path, state: Path,
        load: contextlib.ExitStack) -> None:
    ns = netns()
    capped_listener(ns, load)
    daemon = start_daemon(ns, write_policy(tmp_path / "policy.toml", policy_text()))
    assert wait_for_raise(ns) == RAISED
    daemon.wait_for(set_line(ns))
    ns.set_sysctl(SOMAXCONN, ADMIN_VALUE)
    time.sleep(2 * INTERVAL)  # a couple of sweeps with the admin's value in place
    assert daemon.stop() == 0
    assert somaxconn(ns) == ADMIN_VALUE

    (line,) = rollback(state)
    assert line[:4] == ["left-alone", "netns", ns.name, f"{SOMAXCONN}:"], line
    assert " ".join(line[4:]).startswith(f"now {ADMIN_VALUE}, not aqtune's {RAISED}"), line
    assert somaxconn(ns) == ADMIN_VALUE
    assert ledger_changes(state) == [], "an overridden change is forgotten: the admin owns the value now"


def test_rollback_after_kill_9_right_after_a_change(
        netns: Callable[[], TestNamespace], start_daemon: Callable[..., Daemon], tmp_path: Path, state: Path,
        load: contextlib.ExitStack) -> None:
    ns = netns()
    capped_listener(ns, load)
    daemon = start_daemon(ns, write_policy(tmp_path / "policy.toml", policy_text()))
    assert wait_for_raise(ns) == RAISED
    # No grace: killed as soon as the value is seen, possibly before the ledger's "applied" step.
    daemon.kill()
    assert daemon.popen.returncode == -signal.SIGKILL

    entry = only_entry(state)
    assert (entry["netns_inode"], entry["original"]) == (ns.inode, CAPPED), entry
    assert RAISED in (entry["applied"], entry["pending"]), entry
    (line,) = rollback(state)
    assert line == ["restored", "netns", ns.name, f"{SOMAXCONN}:", str(RAISED), "->", str(CAPPED)]
    assert somaxconn(ns) == CAPPED
    assert ledger_changes(state) == []


@pytest.mark.parametrize(("now", "applied", "pending"), [
    (CAPPED, CAPPED, RAISED),  # killed after recording the intent, before writing
    (RAISED, CAPPED, RAISED),  # killed after writing, before recording it as applied
    (MAX, RAISED, MAX),  # the same during a second raise: the first one's original is still what is restored
], ids=["before-write", "after-write", "second-raise"])
def test_rollback_of_a_pending_entry_restores_the_original(
        netns: Callable[[], TestNamespace], state: Path, now: int, applied: int, pending: int) -> None:
    ns = netns()
    ns.set_sysctl(SOMAXCONN, now)
    write_ledger(state, [{"netns": ns.name, "netns_inode": ns.inode, "sysctl": SOMAXCONN, "original": CAPPED,
                          "applied": applied, "pending": pending, "changed_at": 0}])

    (line,) = rollback(state)
    assert line == ["restored", "netns", ns.name, f"{SOMAXCONN}:", str(now), "->", str(CAPPED)]
    assert somaxconn(ns) == CAPPED
    assert ledger_changes(state) == []


@pytest.mark.parametrize(("mode", "owner", "reason"), [
    (0o666, "root", "writable by group or others (mode 666)"),
    (0o644, "nobody", "is owned by uid"),
], ids=["world-writable", "owned-by-nobody"])
def test_unsafe_policy_file_downgrades_apply_to_recommend(
        netns: Callable[[], TestNamespace], start_daemon: Callable[..., Daemon], tmp_path: Path, state: Path,
        load: contextlib.ExitStack, mode: int, owner: str, reason: str) -> None:
    ns = netns()
    capped_listener(ns, load)
    policy = write_policy(tmp_path / "policy.toml", policy_text(), mode=mode, uid=pwd.getpwnam(owner).pw_uid)
    daemon = start_daemon(ns, policy)
    warned = daemon.wait_for("[warning", str(policy), reason, "apply mode refused")
    assert warned < daemon.wait_for("finding="), "said at startup, before the first sweep's findings"
    daemon.wait_for(f"recommend {SOMAXCONN}={RAISED} in netns {ns.name} (now {CAPPED}); not applied: ",
                    "apply mode refused", timeout=RAISE_TIMEOUT)
    assert daemon.stop() == 0
    assert daemon.count(f"set {SOMAXCONN}") == 0
    assert somaxconn(ns) == CAPPED
    assert ledger_changes(state) is None


def cooldown_recorded_before_restart(ns: TestNamespace, tmp_path: Path, state: Path, load: contextlib.ExitStack,
                                     start_daemon: Callable[..., Daemon]) -> Daemon:
    """A daemon started after an earlier one raised somaxconn 32 -> 64 a moment ago (per the ledger), with the
    listener re-listened at 64 and full again: it wants 256 but must wait for the recorded cooldown."""
    capped_listener(ns, load)
    write_ledger(state, [{"netns": ns.name, "netns_inode": ns.inode, "sysctl": SOMAXCONN, "original": CAPPED // 2,
                          "applied": CAPPED, "pending": None, "changed_at": time.time()}])
    daemon = start_daemon(ns, write_policy(tmp_path / "policy.toml", policy_text()))
    daemon.wait_for(logged("finding", "cooldown"), logged("subject", f"netns {ns.name}"), logged("sysctl", SOMAXCONN),
                    timeout=RAISE_TIMEOUT)
    return daemon


def test_restarted_daemon_honours_the_recorded_cooldown(
        netns: Callable[[], TestNamespace], start_daemon: Callable[..., Daemon], tmp_path: Path, state: Path,
        load: contextlib.ExitStack) -> None:
    ns = netns()
    daemon = cooldown_recorded_before_restart(ns, tmp_path, state, load, start_daemon)
    assert daemon.stop() == 0
    assert daemon.count(f"set {SOMAXCONN}") == 0
    assert somaxconn(ns) == CAPPED
    entry = only_entry(state)
    assert (entry["original"], entry["applied"], entry["pending"]) == (CAPPED // 2, CAPPED, None)


def test_cooldown_is_logged_once_not_every_sweep(
        netns: Callable[[], TestNamespace], start_daemon: Callable[..., Daemon], tmp_path: Path, state: Path,
        load: contextlib.ExitStack) -> None:
    ns = netns()
    daemon = cooldown_recorded_before_restart(ns, tmp_path, state, load, start_daemon)
    time.sleep(4 * INTERVAL)  # several more sweeps with the same change held back
    assert daemon.stop() == 0
    assert daemon.count(logged("finding", "cooldown"), logged("subject", f"netns {ns.name}")) == 1


def test_drops_from_before_a_relisten_do_not_call_for_another_raise(
        netns: Callable[[], TestNamespace], start_daemon: Callable[..., Daemon], tmp_path: Path, state: Path,
        load: contextlib.ExitStack) -> None:
    ns = netns()
    helper, listener = capped_listener(ns, load)
    address = listener["address"]
    # A window long enough to still hold the drops of the first seconds; no cooldown to mask a second change.
    daemon = start_daemon(ns, write_policy(tmp_path / "policy.toml", policy_text(sustain=5, cooldown=0)))
    assert wait_for_raise(ns) == RAISED
    daemon.wait_for(logged("finding", "relisten-needed"), logged("subject", f"{ns.name} {address}"))
    helper.request(f"relisten {listener['index']} {ASKED}")
    daemon.wait_for(f"{ns.name} {address}: relisten-needed cleared")
    time.sleep(4 * INTERVAL)  # a few sweeps over the re-listened queue
    assert daemon.stop() == 0
    # At most the flood's connections queue now, under half of the new backlog, and nothing is dropped any more.
    assert ns.ss_tcp()[address].queue <= FLOOD < RAISED // 2
    assert daemon.count(f"set {SOMAXCONN}") == 1
    assert somaxconn(ns) == RAISED
