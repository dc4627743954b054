"""`aqtune status` as an operator runs it: JSON and tables for real namespaces, and its one-line refusals."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import pytest

from aqtune.records import COUNTERS, SYSCTLS
from tests.helpers.aqtune_run import aqtune
from tests.helpers.namespace import HelperProcess, TestNamespace
from tests.integration.expect import flood_target, wait_for_queues

pytestmark = pytest.mark.integration

# The documented keys; later additions (such as advice) are allowed alongside them.
TOP_KEYS = {"source", "taken_at", "duration_ms", "listeners", "namespaces"}
LISTENER_KEYS = {"netns", "proto", "address", "port", "queue", "backlog", "fill", "drops", "cookie", "inode", "uid",
                 "processes"}
PROCESS_KEYS = {"pid", "comm", "cmdline", "unit"}
NAMESPACE_KEYS = {"name", "inode", "sysctls", "counters", "listeners", "skipped_messages", "error"}


def three_fills(ns: TestNamespace) -> tuple[HelperProcess, list[dict[str, Any]]]:
    """A full v4 listener (fill 1.25), a partly filled v6 one (0.375) and an empty Unix one (0),
    announced worst first."""
    helper = ns.listen("tcp4:4", "tcp6:8", f"unix:3:{ns.unix_path('idle.sock')}")
    v4, v6, unix = helper.ready()["listeners"]
    ns.flood([(flood_target(v4), 8), (flood_target(v6), 3)])
    wait_for_queues(ns, {v4["address"]: 5, v6["address"]: 3, unix["address"]: 0}, min_drops={v4["address"]: 3})
    return helper, [v4, v6, unix]


def test_status_json_for_one_namespace(netns: Callable[[], TestNamespace]) -> None:
    ns = netns()
    helper, expected = three_fills(ns)
    started = time.time()
    done = aqtune("status", "--json", "--netns", ns.name)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)

    assert TOP_KEYS.issubset(document)
    assert document["source"] == "sweep"
    assert started - 1 <= document["taken_at"] <= time.time()
    assert document["duration_ms"] >= 0
    (namespace,) = document["namespaces"]
    assert NAMESPACE_KEYS.issubset(namespace)
    assert (namespace["name"], namespace["inode"], namespace["listeners"]) == (ns.name, ns.inode, 3)
    assert set(namespace["sysctls"]) == set(SYSCTLS)
    assert set(namespace["counters"]) == set(COUNTERS)
    assert namespace["error"] is None

    listeners = document["listeners"]
    assert [listener["address"] for listener in listeners] == [e["address"] for e in expected], "worst first"
    for listener, announced in zip(listeners, expected, strict=True):
        assert LISTENER_KEYS.issubset(listener)
        assert listener["netns"] == ns.name
        assert (listener["proto"], listener["port"]) == (announced["proto"], announced["port"])
        assert (listener["cookie"], listener["inode"]) == (announced["cookie"], announced["inode"])
        assert listener["fill"] == pytest.approx(listener["queue"] / listener["backlog"], abs=1e-4)
        (process,) = listener["processes"]
        assert PROCESS_KEYS.issubset(process)
        assert (process["pid"], process["comm"]) == (helper.ready()["pid"], "aqt-listen")
    assert [(listener["queue"], listener["backlog"]) for listener in listeners] == [(5, 4), (3, 8), (0, 3)]
    assert listeners[0]["fill"] == 1.25


def test_status_table_lists_listeners_worst_first(netns: Callable[[], TestNamespace]) -> None:
    ns = netns()
    helper, expected = three_fills(ns)
    done = aqtune("status", "--netns", ns.name)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()

    rows = [line.split() for line in lines if line.split()[:1] == [ns.name]]
    assert [row[2] for row in rows] == [e["address"] for e in expected]
    owner = f"{helper.ready()['pid']}/aqt-listen"
    # WAIT is "-": a one-shot sweep has no eBPF to time the queue with.
    assert rows[0][1:] == ["tcp", expected[0]["address"], "5/4", "1.25", rows[0][5], "-", owner]
    assert int(rows[0][5]) >= 3, "the SYNs beyond the full queue show as drops"
    assert rows[1][1:] == ["tcp6", expected[1]["address"], "3/8", "0.38", "0", "-", owner]
    assert rows[2][1:] == ["unix", expected[2]["address"], "0/3", "0.00", "0", "-", owner]
    assert f"netns {ns.name} (net:[{ns.inode}]), 3 listeners" in lines


def test_status_netns_filter(netns: Callable[[], TestNamespace]) -> None:
    shown, hidden = netns(), netns()
    (mine,) = shown.listen("tcp4:4").ready()["listeners"]
    (other,) = hidden.listen("tcp4:4").ready()["listeners"]

    def listed(*args: str) -> tuple[set[str], set[int]]:
        done = aqtune("status", "--json", *args)
        assert done.returncode == 0, done.stderr
        document = json.loads(done.stdout)
        return {n["name"] for n in document["namespaces"]}, {listener["cookie"] for listener in document["listeners"]}

    assert listed("--netns", shown.name) == ({shown.name}, {mine["cookie"]})
    assert listed("--netns", str(hidden.inode)) == ({hidden.name}, {other["cookie"]})
    names, cookies = listed("--netns", "host")
    assert names == {"host"} and not cookies & {mine["cookie"], other["cookie"]}
    names, cookies = listed()
    assert {"host", shown.name, hidden.name} <= names and {mine["cookie"], other["cookie"]} <= cookies


def test_unknown_netns_exits_1_with_one_line() -> None:
    missing = f"aqt-{os.getpid()}-missing"
    done = aqtune("status", "--netns", missing)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.endswith("\n"), repr(done.stderr)
    assert done.stderr.startswith("aqtune status: ") and missing in done.stderr


def test_non_root_exits_1_with_one_line() -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to run aqtune as nobody")
    for args in (["status"], ["status", "--json"]):
        done = aqtune(*args, user="nobody")
        assert done.returncode == 1, done.stderr
        assert done.stdout == ""
        assert done.stderr.count("\n") == 1 and done.stderr.endswith("\n"), repr(done.stderr)
        assert done.stderr.startswith("aqtune status: ") and "root" in done.stderr
