"""Each listener's processes are exactly the pids holding it, as /proc and `ss -p` see them."""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aqtune import cli
from aqtune.act.state import PUBLISH_EVERY, STALE_AFTER, STATE_FILE
from aqtune.collect.fdwalk import BackgroundScan, socket_holders
from aqtune.collect.sweep import sweep
from tests.helpers.namespace import TestNamespace
from tests.integration.expect import listeners_in

pytestmark = pytest.mark.integration


def read_comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().rstrip("\n")


def test_owners_are_every_pid_holding_the_socket(netns: Callable[[], TestNamespace]) -> None:
    ns = netns()
    helper = ns.listen("tcp4:4", "tcp6:4", f"abstract:2:{ns.name}-owned", forks=3)
    ready = helper.ready()
    parent, children = ready["pid"], set(ready["children"])
    assert len(children) == 3

    snapshot = sweep(ns.name)
    ss = ns.ss_all(owners=True)
    ours = listeners_in(snapshot, ns.name)
    assert set(ours) == {listener["address"] for listener in ready["listeners"]}
    for address, listener in ours.items():
        pids = [process.pid for process in listener.processes]
        assert sorted(pids) == sorted({parent, *children}), f"{address}: each holder once"
        assert set(pids) == ss[address].pids
        for process in listener.processes:
            assert process.comm == read_comm(process.pid)
            assert process.comm == ("aqt-listen" if process.pid == parent else "aqt-listen-kid")
            # The children were forked, not exec'd: they share the parent's command line.
            assert "tests/helpers/listen.py" in process.cmdline
            assert "--forks 3" in process.cmdline


def test_owner_and_uid_of_a_listener_run_as_another_user(netns: Callable[[], TestNamespace]) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to run the listener as nobody")
    nobody = pwd.getpwnam("nobody").pw_uid
    ns = netns()
    # An abstract name, since nobody cannot create a socket file in our directory.
    helper = ns.listen("tcp4:4", "tcp6:4", f"abstract:2:{ns.name}-nobody", user="nobody")
    ready = helper.ready()
    assert ready["uid"] == nobody

    snapshot = sweep(ns.name)
    ss = ns.ss_all()
    ours = listeners_in(snapshot, ns.name)
    assert len(ours) == 3
    for address, listener in ours.items():
        assert listener.uid == nobody
        if listener.proto != "unix":
            assert ss[address].uid == nobody
        assert [(p.pid, p.comm) for p in listener.processes] == [(ready["pid"], "aqt-listen")]


def test_a_background_walk_finds_what_the_inline_walk_finds(netns: Callable[[], TestNamespace]) -> None:
    """`aqtune status` starts the owners' /proc walk in a child before it dumps the namespaces: the
    holders it hands back are the inline walk's, and a walk not needed is killed and reaped."""
    ns = netns()
    helper = ns.listen("tcp4:4", "tcp6:4", f"abstract:2:{ns.name}-walked", forks=2)
    ready = helper.ready()
    walk = BackgroundScan()
    snapshot = sweep(ns.name, background=walk)
    assert walk.finished
    walk.cancel()  # taken already: must not signal whatever process has its pid now
    ours = listeners_in(snapshot, ns.name)
    inodes = {listener.inode for listener in ours.values()}
    assert {inode: sorted(p.pid for p in listener.processes) for listener in ours.values()
            for inode in [listener.inode]} == {inode: sorted(pids) for inode, pids in socket_holders(inodes).items()}
    assert all(sorted(p.pid for p in l.processes) == sorted([ready["pid"], *ready["children"]]) for l in ours.values())

    unused = BackgroundScan()
    unused.cancel()
    with pytest.raises(ChildProcessError):
        os.waitpid(unused.pid, os.WNOHANG)  # reaped: no zombie left


def test_status_walks_alongside_the_dump_unless_a_daemon_may_answer(tmp_path: Path) -> None:
    """A state file left by a stopped daemon does not keep `aqtune status` from starting its walk
    first thing; a recent one (a daemon that may answer) does, and --watch never starts one."""
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o750)
    (state_dir / STATE_FILE).write_text("{}")

    def walk(**given: Any) -> bool:
        started = cli._owner_walk(argparse.Namespace(**{"watch": False, "sweep": False,
                                                        "state_dir": str(state_dir), **given}))
        if started is None:
            return False
        started.cancel()
        return True

    assert not walk() and walk(sweep=True) and not walk(watch=True)
    left = time.time() - 3 * PUBLISH_EVERY - STALE_AFTER - 60
    os.utime(state_dir / STATE_FILE, (left, left))
    assert walk() and not walk(watch=True)

