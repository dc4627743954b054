"""`aqtune status` on a stock kernel says which eBPF probes attached and how.

Kernels differ in what aqtune can attach (6.1: fentry on tcp_conn_request, a kprobe where fentry's
six-argument limit refuses; 6.12: fentry throughout; this project's 6.18 VMs: tracepoints, no
kprobes, fentry refused, which the system tier checks). Here the daemon runs as it would on such a
host, and status, reading its state, must list every probe with how it attached; on a stock kernel,
which has kprobes and fentry, every probe attaches one way or the other. The daemon compiles
bpf/aqtune.c once more: about a minute under TCG.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.aqtune_run import Daemon, aqtune, write_policy
from tests.helpers.namespace import TestNamespace
from tests.helpers.service import wait_for_state

pytestmark = pytest.mark.kernel

START_TIMEOUT = 600.0  # bcc compiles at start: about a minute under TCG, more on a busy host
PROBE_STATE = re.compile(r"^(attached \((fentry|kprobe|tracepoint|raw tracepoint)\b.*\)|not attached: .+)$")
POLICY = 'mode = "recommend"\ninterval = 1.0\n'


def test_status_names_each_probe_and_how_it_attached(tmp_path: Path, netns: Callable[[], TestNamespace]) -> None:
    ns = netns()
    state = tmp_path / "state"
    policy = write_policy(tmp_path / "policy.toml", POLICY)
    daemon = Daemon(["--config", str(policy), "--netns", ns.name, "--state-dir", str(state), "--dry-run"],
                    tmp_path / "daemon.log")
    try:
        # eBPF is set up before the first sweep, so the first state document says how it went.
        wait_for_state(state, daemon, timeout=START_TIMEOUT, what="the daemon's first state")
        done = aqtune("status", "--json", "--state-dir", str(state), "--netns", ns.name)
        assert done.returncode == 0, done.stderr
        document = json.loads(done.stdout)
        table = aqtune("status", "--state-dir", str(state), "--netns", ns.name).stdout
    finally:
        daemon.kill()
    assert document["source"] == "daemon"
    ebpf = document["ebpf"]
    # The tier's log keeps what each kernel gives (README: kernels tested and their probes).
    print(f"probes on {os.uname().release}:")
    for probe, how in ebpf["probes"].items():
        print(f"  {probe}: {how}")
    print(f"mode: {ebpf['mode']}")
    assert ebpf["active"] is True, ebpf
    assert all(PROBE_STATE.match(how) for how in ebpf["probes"].values()), ebpf["probes"]
    not_attached = {probe: how for probe, how in ebpf["probes"].items() if not how.startswith("attached")}
    assert not not_attached, f"a stock kernel has kprobes and fentry, yet: {not_attached}"
    assert ebpf["probes"]["tcp_conn_request"].startswith("attached ("), ebpf["probes"]
    assert ebpf["mode"].startswith("full"), ebpf["mode"]
    assert f"eBPF: on: {ebpf['mode']}" in table
