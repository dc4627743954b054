"""The example output in README.md and aqtune(8) is what the code prints (as bcc keeps its tools'
*_example.txt): rebuilt here from fixed records and compared, so a format change updates the docs."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aqtune.collect.ebpf import Event
from aqtune.decide.policy import Policy
from aqtune.decide.tick import decide, history_horizon
from aqtune.model.history import Model
from aqtune.records import Listener, ListenerEvents, Namespace, Process, Snapshot
from aqtune.surfaces import status, trace

REPO = Path(__file__).resolve().parents[2]
START = 1_796_400_000.0  # 2026-12-04 16:00:00 UTC
NGINX = (Process(812, "nginx", "nginx: master process /usr/sbin/nginx", "nginx.service", exe="nginx"),
         Process(813, "nginx", "nginx: worker process", "nginx.service", exe="nginx", ppid=812))
REDIS = (Process(640, "redis-server", "/usr/bin/redis-server 127.0.0.1:6379", "redis-server.service",
                 exe="redis-server"),)


@pytest.fixture(autouse=True)
def utc() -> Iterator[None]:
    before = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


def status_example() -> str:
    """The daemon's view of a host after 12 s of bursts at nginx and a stalled Redis."""
    policy = Policy(saturation=Policy().saturation.__class__(sustain=3.0))
    model = Model()
    document = None
    for tick in range(13):
        now = START + tick
        burst = tick % 2 == 1
        web = Listener("host", "tcp", "0.0.0.0:80", 80, 129 if burst else 3, 128, 40 * ((tick + 1) // 2), 11, 5011,
                       0, NGINX)
        cache = Listener("host", "tcp", "127.0.0.1:6379", 6379, 512, 511, 0, 12, 5012, 104, REDIS)
        host = Namespace("host", 4026531840, {"net.core.somaxconn": 4096, "net.ipv4.tcp_max_syn_backlog": 2048,
                                              "net.ipv4.tcp_syncookies": 1, "net.ipv4.tcp_abort_on_overflow": 0},
                         {"ListenOverflows": 40 * ((tick + 1) // 2), "ListenDrops": 40 * ((tick + 1) // 2)},
                         listeners=2)
        snapshot = Snapshot(now, 0.004, [host], [web, cache])
        events = {
            5011: ListenerEvents(enqueued=900 * tick, peak_queue=129 if burst else 40, ack_overflow=0,
                                 syn_overflow=None,
                                 synack_retransmits=0, accepts=900 * tick, queue_wait_ms={"p50": 0.5, "p99": 4.0},
                                 requested_backlog=None, oldest_queued_ms=0.0),
            5012: ListenerEvents(enqueued=512, peak_queue=512, ack_overflow=0, syn_overflow=None,
                                 synack_retransmits=30 * tick, accepts=2000, queue_wait_ms={"p50": 1.0, "p99": 2.0},
                                 requested_backlog=None, oldest_queued_ms=1000.0 * tick + 800.0),
        }
        model.observe(snapshot, {812: 0.2 * tick, 813: 0.2 * tick, 640: 0.0}, history_horizon(policy), events)
        decision = decide(snapshot, events, model, policy, {})
        model.settle(decision.judged)
        ebpf = {"active": True, "probes": {}, "mode": "partial: tcp_conn_request not observed"}
        document = status.snapshot_json(snapshot, decision.assessment, events, ebpf, source="daemon")
    assert document is not None
    return _trimmed(status.render(document))


def trace_example() -> str:
    names = trace.NamespaceNames()
    names.names = {4026531840: "host"}
    events = [
        Event(1_000_000_000, "enqueue", 4026531840, 5011, 2, "0.0.0.0", 80, "127.0.0.7", 51234, 127, 128, 0, 0, ""),
        Event(1_000_200_000, "syn-overflow", 4026531840, 5011, 2, "0.0.0.0", 80, "127.0.0.9", 40022, 129, 128, 0, 0,
              ""),
        Event(1_003_000_000, "accept", 4026531840, 5011, 2, "0.0.0.0", 80, None, 0, 128, 128, 2_800_000, 813,
              "nginx"),
    ]
    return _trimmed("\n".join([trace.HEADER, *(trace.format_event(e, names) for e in events)]))


def _trimmed(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines())


def block(name: str, text: str) -> str:
    match = re.search(rf"<!-- example: {name} -->\n```\n(.*?)```", text, re.S)
    assert match is not None, f"README has no `{name}` example block"
    return match.group(1).rstrip("\n")


def test_the_readme_status_example_is_what_status_prints() -> None:
    assert block("status", (REPO / "README.md").read_text(encoding="utf-8")) == status_example()


def test_the_readme_trace_example_is_what_trace_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace, "_WALL_MINUS_MONOTONIC", START - 1.0)
    assert block("trace", (REPO / "README.md").read_text(encoding="utf-8")) == trace_example()


def test_the_man_page_carries_the_same_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace, "_WALL_MINUS_MONOTONIC", START - 1.0)
    man = (REPO / "packaging/man/aqtune.8").read_text(encoding="utf-8").replace("\\-", "-").replace("\\e", "\\")
    for example in (status_example(), trace_example()):
        for line in example.splitlines():
            assert line in man, line
