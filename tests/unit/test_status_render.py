"""`aqtune status` output on hand-built records: worst-first order, the JSON document and the tables."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from aqtune.decide.assess import Assessment
from aqtune.decide.findings import Finding
from aqtune.records import Listener, Namespace, Process, Snapshot
from aqtune.surfaces.status import OneShot, compact, render, snapshot_json, snapshot_text, worst_first


def listener(address: str, queue: int, backlog: int, drops: int | None = 0, netns: str = "host",
             cookie: int = 1, processes: tuple[Process, ...] = ()) -> Listener:
    port = int(address.rsplit(":", 1)[1]) if ":" in address else None
    proto = "unix" if port is None else "tcp6" if address.startswith("[") else "tcp"
    return Listener(netns, proto, address, port, queue, backlog, drops, cookie, cookie + 1000, 0, processes)


NGINX = (Process(10, "nginx", "nginx: master", "nginx.service"), Process(11, "nginx", "nginx: worker", "nginx.service"))


def snapshot() -> Snapshot:
    rows = [
        listener("127.0.0.1:80", 2, 128, drops=0, cookie=1),
        listener("127.0.0.1:81", 5, 4, drops=7, cookie=2, processes=NGINX),  # backlog+1: full, fill 1.25
        listener("[::1]:443", 64, 128, drops=3, cookie=3),
        listener("/run/app.sock", 1, 0, drops=None, netns="web", cookie=4),  # listen(0) holding one
        listener("127.0.0.1:82", 64, 128, drops=9, cookie=5),
    ]
    namespaces = [
        Namespace("host", 4026531840, {"net.core.somaxconn": 4096}, {"ListenOverflows": 7}, listeners=4),
        Namespace("web", 4026532200, listeners=1, skipped_messages=2, error="unix_diag unavailable"),
    ]
    return Snapshot(1_700_000_000.0, 0.0123456, namespaces, rows)


def test_worst_first_orders_by_fill_then_drops() -> None:
    ordered = [row.address for row in worst_first(snapshot().listeners)]
    assert ordered == ["127.0.0.1:81", "/run/app.sock", "127.0.0.1:82", "[::1]:443", "127.0.0.1:80"]


def test_worst_first_breaks_ties_by_netns_then_address() -> None:
    rows = [listener("b:1", 0, 8, netns="z"), listener("a:1", 0, 8, netns="z"), listener("c:1", 0, 8, netns="a")]
    assert [(row.netns, row.address) for row in worst_first(rows)] == [("a", "c:1"), ("z", "a:1"), ("z", "b:1")]


def test_unknown_drops_sort_as_zero() -> None:
    rows = [listener("127.0.0.1:1", 1, 2, drops=None), listener("127.0.0.1:2", 1, 2, drops=1)]
    assert [row.port for row in worst_first(rows)] == [2, 1]


def test_fill_over_one_and_backlog_zero() -> None:
    assert listener("127.0.0.1:81", 5, 4).fill == 1.25
    assert listener("/x", 1, 0).fill == 1.0
    assert listener("/x", 0, 0).fill == 0.0


def test_snapshot_json() -> None:
    document = snapshot_json(snapshot(), Assessment())
    json.dumps(document)  # serialisable as is
    assert document["source"] == "sweep"
    assert document["duration_ms"] == 12.346
    first = document["listeners"][0]
    assert first == {
        "netns": "host", "proto": "tcp", "address": "127.0.0.1:81", "port": 81, "queue": 5, "backlog": 4,
        "fill": 1.25, "drops": 7, "cookie": 2, "inode": 1002, "uid": 0, "group": None,
        "processes": [{"pid": 10, "comm": "nginx", "cmdline": "nginx: master", "unit": "nginx.service"},
                      {"pid": 11, "comm": "nginx", "cmdline": "nginx: worker", "unit": "nginx.service"}],
        "events": None,
        "advice": [],
    }
    # A one-shot sweep has no event history, and says so.
    assert document["ebpf"]["active"] is False and "one-shot" in document["ebpf"]["mode"]
    unix = document["listeners"][1]
    assert (unix["port"], unix["drops"], unix["fill"], unix["proto"]) == (None, None, 1.0, "unix")
    assert [ns["name"] for ns in document["namespaces"]] == ["host", "web"]
    assert document["namespaces"][1]["error"] == "unix_diag unavailable"
    assert document["namespaces"][1]["skipped_messages"] == 2


def test_render_table_worst_first() -> None:
    text = render(snapshot_json(snapshot(), Assessment()))
    lines = text.splitlines()
    assert lines[0].startswith("aqtune status: one-shot sweep at ")
    assert "in 12.3 ms, 5 listeners in 2 network namespaces" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("NETNS"))
    table = lines[header + 1:header + 6]
    assert [line.split()[2] for line in table] == ["127.0.0.1:81", "/run/app.sock", "127.0.0.1:82", "[::1]:443",
                                                  "127.0.0.1:80"]
    assert table[0].split()[3:6] == ["5/4", "1.25", "7"]
    assert table[0].endswith("10/nginx +1 (nginx.service)")
    assert table[1].split()[3:7] == ["1/0", "1.00", "-", "-"]


def test_render_namespace_section() -> None:
    text = render(snapshot_json(snapshot(), Assessment()))
    assert "netns host (net:[4026531840]), 4 listeners" in text
    assert "  somaxconn=4096" in text
    assert "  ListenOverflows=7" in text
    assert "  ! unix_diag unavailable" in text
    assert "  ! 2 malformed netlink messages skipped" in text


def test_render_shows_drops_since_last_refresh() -> None:
    # cookie -> drops at the previous refresh; a listener not seen before shows +0.
    text = render(snapshot_json(snapshot(), Assessment()), previous_drops={2: 4, 3: 3})
    rows = {line.split()[2]: line for line in text.splitlines() if line.startswith(("host", "web"))}
    assert "7 (+3)" in rows["127.0.0.1:81"]
    assert "3 (+0)" in rows["[::1]:443"]
    assert "9 (+0)" in rows["127.0.0.1:82"]
    assert " - " in rows["/run/app.sock"] and "(+" not in rows["/run/app.sock"]


def test_render_of_an_empty_host() -> None:
    text = render(snapshot_json(Snapshot(0.0, 0.001, [Namespace("host", 1)], []), Assessment()))
    assert "0 listeners in 1 network namespace" in text
    assert "NETNS" in text


def _advice() -> Assessment:
    # Keyed by (netns, cookie): the listener at 127.0.0.1:81 has cookie 2.
    return Assessment(listener_findings={("host", 2): [Finding("queue-full", "raise the backlog", {"fill": 1.25})]},
                      namespace_findings={"web": [Finding("somaxconn-low", "raise somaxconn")]})


def test_advice_is_attached_to_its_listener_and_namespace_in_json() -> None:
    document = snapshot_json(snapshot(), _advice())
    by_address = {row["address"]: row["advice"] for row in document["listeners"]}
    assert by_address["127.0.0.1:81"] == [{"id": "queue-full", "text": "raise the backlog", "evidence": {"fill": 1.25}}]
    assert all(advice == [] for address, advice in by_address.items() if address != "127.0.0.1:81")
    by_name = {ns["name"]: ns["advice"] for ns in document["namespaces"]}
    assert by_name == {"host": [], "web": [{"id": "somaxconn-low", "text": "raise somaxconn", "evidence": {}}]}


def test_render_lists_advice_worst_listener_first() -> None:
    lines = render(snapshot_json(snapshot(), _advice())).splitlines()
    start = lines.index("ADVICE")
    assert lines[start + 1:start + 3] == ["  [queue-full] raise the backlog", "  [somaxconn-low] raise somaxconn"]
    assert "ADVICE" not in render(snapshot_json(snapshot(), Assessment()))


# --- the one-shot compact JSON text is the document's, byte for byte -------------------------------------

_NAMES = st.text(st.characters() | st.sampled_from('"\\\x00\x1b\n\u2028\ud800'), max_size=12)
_COUNTS = st.integers(0, 2**32)


@st.composite
def _listeners(draw: st.DrawFn) -> list[Listener]:
    owners = draw(st.lists(st.builds(Process, st.integers(1, 2**22), _NAMES, _NAMES, st.none() | _NAMES),
                           max_size=3).map(tuple))
    rows = []
    for cookie in range(draw(st.integers(0, 6))):
        proto = draw(st.sampled_from(["tcp", "tcp6", "unix"]))
        address = draw(st.sampled_from(["127.0.0.1:80", "[::1]:80", "/run/a.sock"]) | _NAMES)
        rows.append(Listener(draw(st.sampled_from(["host", "web"]) | _NAMES), proto, address,
                             None if proto == "unix" else draw(st.integers(0, 65535)), draw(_COUNTS),
                             draw(_COUNTS), draw(st.none() | _COUNTS), cookie, draw(_COUNTS),
                             draw(st.none() | _COUNTS), owners if draw(st.booleans()) else ()))
    return rows


@given(_listeners(), st.data())
def test_one_shot_compact_text_is_the_document_byte_for_byte(rows: list[Listener], data: st.DataObject) -> None:
    """`status --json` prints a one-shot sweep through snapshot_text (plain entries by one format) and
    everything else through the document: both must say exactly the same, hostile names included,
    with findings and reuseport groups (which take the document's path) among plain entries."""
    flagged = data.draw(st.sets(st.sampled_from([(r.netns, r.cookie) for r in rows]) if rows else st.nothing()))
    advice = Assessment(listener_findings={key: [Finding("queue-full", "raise it \x1b", {"n": 1})]
                                           for key in flagged})
    taken = Snapshot(1_700_000_000.5, 0.25, snapshot().namespaces, rows)
    assert snapshot_text(taken, advice) == compact(snapshot_json(taken, advice))
    assert OneShot(taken, advice).text() == compact(OneShot(taken, advice).document())


def test_one_shot_compact_text_of_the_example_snapshot() -> None:
    taken = snapshot()
    assert snapshot_text(taken, _advice()) == compact(snapshot_json(taken, _advice()))
    assert json.loads(snapshot_text(taken, Assessment())) == snapshot_json(taken, Assessment())
