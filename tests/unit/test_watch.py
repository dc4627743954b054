"""`status --watch`'s screen from hand-built status documents: rates between two frames, every line within
80 columns, colour only when asked, escaped names, bounded rows."""

from __future__ import annotations

import re
from typing import Any

from aqtune.collect.connections import summarize_connections
from aqtune.decide.policy import Policy
from aqtune.records import COUNTERS, Connection
from aqtune.surfaces.watch import RED, WIDTH, YELLOW, frame_of, render

POLICY = Policy()
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def listener(address: str, cookie: int, queue: int, backlog: int, drops: int | None, events: dict[str, Any] | None,
             netns: str = "web", advice: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"netns": netns, "proto": "tcp", "address": address, "port": 8080, "queue": queue, "backlog": backlog,
            "fill": round(queue / max(backlog, 1), 4), "drops": drops, "cookie": cookie, "inode": cookie + 100,
            "uid": 0, "group": None, "processes": [], "events": events, "advice": advice or []}


def events(accepts: int, rtx: int, oldest_ms: float | None = 0.0, p99: float | None = None) -> dict[str, Any]:
    return {"enqueued": accepts, "peak_queue": 0, "ack_overflow": 0, "syn_overflow": None,
            "synack_retransmits": rtx, "accepts": accepts, "queue_wait_ms": {"p50": 1.0, "p99": p99} if p99 else None,
            "requested_backlog": None, "oldest_queued_ms": oldest_ms}


def document(at: float, rows: list[dict[str, Any]], counters: dict[str, int], source: str = "daemon") -> dict[str, Any]:
    return {"source": source, "taken_at": at, "duration_ms": 3.0, "listeners": rows,
            "namespaces": [{"name": "web", "inode": 1, "sysctls": {}, "counters": counters, "listeners": len(rows),
                            "skipped_messages": 0, "error": None, "advice": []}],
            "ebpf": {"active": source == "daemon", "probes": {}, "mode": "full"}}


HELD = {"id": "held-by-connections", "text": "127.0.0.1:8080: all 4 of Apache (prefork MPM)'s workers hold "
        "connections that are long-held (open over 30 s) or idle ... " + "x" * 200, "evidence": {}}
SATURATED = {"id": "saturated", "text": "127.0.0.1:8080: accept queue saturated", "evidence": {}}


def frames() -> tuple[dict[str, Any], dict[str, Any]]:
    first = document(1000.0, [
        listener("127.0.0.1:8080", 1, 65, 64, 100, events(1000, 10, oldest_ms=1500.0), advice=[SATURATED, HELD]),
        listener("[::]:22", 2, 0, 128, 0, events(50, 0, oldest_ms=0.0, p99=2.0)),
    ], {"ListenOverflows": 100, "ListenDrops": 100, "TCPReqQFullDrop": 0, "SyncookiesSent": 0, "TCPSynRetrans": 40})
    second = document(1002.0, [
        listener("127.0.0.1:8080", 1, 65, 64, 190, events(1500, 16, oldest_ms=2500.0), advice=[SATURATED, HELD]),
        listener("[::]:22", 2, 0, 128, 0, events(52, 0, oldest_ms=0.0, p99=2.0)),
    ], {"ListenOverflows": 145, "ListenDrops": 145, "TCPReqQFullDrop": 0, "SyncookiesSent": 0, "TCPSynRetrans": 52})
    return first, second


def held_summary() -> dict[int, Any]:
    conns = [Connection("web", "tcp", "127.0.0.1:8080", f"127.0.0.1:{5000 + i}", "established", 10 + i, i, 0,
                        recv_idle=40, send_idle=40, accepted_at=None) for i in range(4)]
    return {1: summarize_connections(conns, 1002.0, 30, 10)}


def test_rates_between_two_frames_and_the_namespace_beneath() -> None:
    first, second = frames()
    text = render(second, frame_of(first), held_summary(), POLICY)
    lines = text.splitlines()
    assert "rates over 2.0 s" in lines[0]
    assert lines[1].split() == ["LISTENER", "QUEUE/BL", "FILL", "ACC/s", "DROP/s", "RTX/s", "EST", "LONG", "WAIT"]
    row = next(line for line in lines if line.startswith("127.0.0.1:8080"))
    # accepts (1500-1000)/2, drops (190-100)/2, SYN-ACK retransmits (16-10)/2, 4 established and long-held,
    # the oldest queued waited 2.5 s
    assert row.split()[1:] == ["65/64", "1.02", "250", "45", "3", "4", "4", "2.5s"]
    ssh = next(line for line in lines if line.startswith("[::]:22"))
    assert ssh.split()[1:] == ["0/128", "0.00", "1", "0", "0", "-", "-", "2ms"]  # p99 when nothing is queued
    advice = lines[lines.index(row) + 1]
    assert advice.startswith("  [held-by-connections] 127.0.0.1:8080: all 4") and advice.endswith("...")
    tcpext = next(line for line in lines if line.startswith("  TcpExt/s:"))
    assert tcpext.split() == ["TcpExt/s:", "ovfl", "22.5", "ldrop", "22.5", "reqq", "0", "cookie", "0", "synrtx", "6"]
    assert all(len(line) <= WIDTH for line in lines), [line for line in lines if len(line) > WIDTH]


def test_every_column_fits_80_at_its_widest() -> None:
    huge = listener("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535", 1, 65535, 65535, 10**12,
                    events(10**12, 10**12, oldest_ms=10**9))
    before = document(1000.0, [listener(huge["address"], 1, 0, 65535, 0, events(0, 0))], {c: 0 for c in COUNTERS})
    after = document(1001.0, [huge], {c: 10**12 for c in COUNTERS})
    lines = render(after, frame_of(before), {}, POLICY).splitlines()
    assert all(len(line) <= WIDTH for line in lines), [line for line in lines if len(line) > WIDTH]
    tcpext = next(line for line in lines if line.startswith("  TcpExt/s:"))
    assert not tcpext.endswith("...") and tcpext.split()[-1] == "1.0T"


def test_numbers_stay_short() -> None:
    from aqtune.surfaces.watch import _number

    assert [_number(v) for v in (None, 0, 7, 4.5, 250, 999.4, 12_345, 450_000, 1_200_000, 1e20)] == [
        "-", "0", "7", "4.5", "250", "999", "12.3k", "450k", "1.2M", "huge"]


def test_first_frame_has_no_rates_yet() -> None:
    first, _ = frames()
    text = render(first, None, {}, POLICY)
    assert "rates from the next frame on" in text
    row = next(line for line in text.splitlines() if line.startswith("127.0.0.1:8080"))
    assert row.split()[3:8] == ["-", "-", "-", "-", "-"]


def test_colour_marks_fill_and_waits_only_when_asked() -> None:
    first, second = frames()
    plain = render(second, frame_of(first), {}, POLICY)
    assert "\x1b" not in plain
    coloured = render(second, frame_of(first), {}, POLICY, colour=True)
    row = next(line for line in coloured.splitlines() if line.startswith("127.0.0.1:8080"))
    assert f"{RED} 1.02" in row and f"{RED}  2.5s" in row  # full, and waiting over max_queue_wait_ms
    assert all(len(ANSI.sub("", line)) <= WIDTH for line in coloured.splitlines())
    assert YELLOW not in next(line for line in coloured.splitlines() if line.startswith("[::]:22"))


def test_names_are_escaped_and_clipped_and_rows_are_bounded() -> None:
    hostile = "/run/\x1b]0;owned\x07" + "a" * 100
    rows = [listener(hostile, 1, 5, 4, None, None, netns="web\x1b[2J")]
    rows += [listener(f"127.0.0.1:{9000 + i}", 10 + i, 0, 8, 0, None) for i in range(40)]
    doc = document(1000.0, rows, {}, source="sweep")
    text = render(doc, None, {}, POLICY, rows=24)
    assert "\x1b" not in text and "\x07" not in text
    assert "netns web\\x1b[2J" in text
    lines = text.splitlines()
    assert len(lines) <= 24 and lines[-1].startswith("and ") and "more listeners" in lines[-1]
    assert all(len(line) <= WIDTH for line in lines)
