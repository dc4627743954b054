"""The Prometheus textfile on hand-built records: names, one series per socket, escaping and caps.

Every rendering is read back with prometheus_client's text parser, the way a scrape would read it;
tests/integration/test_metrics.py has node_exporter itself serve a file rendered from a real sweep.
"""

from __future__ import annotations

import os
import re
import stat
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aqtune.act import metrics
from aqtune.act.metrics import DaemonFigures, label_text, render
from aqtune.records import COUNTERS, SYSCTLS, Listener, ListenerEvents, Namespace, Process, Snapshot

parser = pytest.importorskip("prometheus_client.parser", reason="needs python3-prometheus-client (Debian)")

README = Path(__file__).resolve().parents[2] / "README.md"
FIGURES = DaemonFigures(sweep_seconds=0.25, last_sweep=1_700_000_001.5, ebpf_active=False, journal_suppressed=3,
                        journal_refused=1)
NAME = re.compile(r"aqtune_[a-z0-9_]+")
SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def listener(address: str, queue: int = 0, backlog: int = 8, drops: int | None = 0, cookie: int = 1,
             netns: str = "host", processes: tuple[Process, ...] = ()) -> Listener:
    proto = "tcp" if address[:1] in "0123456789" and address != "" else "unix"
    port = int(address.rsplit(":", 1)[1]) if proto == "tcp" else None
    return Listener(netns, proto, address, port, queue, backlog, drops, cookie, cookie + 1000, 0, processes)


def namespace(name: str, inode: int, drops: int = 0) -> Namespace:
    return Namespace(name, inode, sysctls={s: 100 + i for i, s in enumerate(SYSCTLS)},
                     counters={c: (drops if c == "ListenDrops" else 10 + i) for i, c in enumerate(COUNTERS)})


def snapshot(listeners: list[Listener], namespaces: list[Namespace] | None = None) -> Snapshot:
    return Snapshot(1_700_000_000.0, 0.25, namespaces if namespaces is not None else [namespace("host", 1)],
                    listeners)


def samples(text: str) -> dict[SampleKey, float]:
    """Every sample of the file by (name, labels); fails on a duplicate series, as node_exporter would."""
    keys: list[SampleKey] = []
    values: dict[SampleKey, float] = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            keys.append(key)
            values[key] = sample.value
    duplicates = [key for key, count in Counter(keys).items() if count > 1]
    assert not duplicates, duplicates
    return values


def series(values: dict[SampleKey, float], name: str) -> dict[str, float]:
    """A per-listener metric by socket label."""
    return {dict(labels)["socket"]: value for (sample, labels), value in values.items() if sample == name}


def test_family_names_follow_node_exporter_conventions() -> None:
    names = [family.name for family in metrics.FAMILIES]
    assert len(names) == len(set(names))
    for family in metrics.FAMILIES:
        assert NAME.fullmatch(family.name), family.name
        assert family.kind in ("gauge", "counter"), family
        # _total marks counters and nothing else; no milliseconds or percentages.
        assert family.name.endswith("_total") == (family.kind == "counter"), family.name
        assert not re.search(r"_(ms|milliseconds|percent)(_|$)", family.name), family.name
        assert family.help and "\n" not in family.help and "\\" not in family.help, family.name


def test_one_metric_per_sysctl_and_per_counter() -> None:
    assert set(metrics.SYSCTL_METRICS) == set(SYSCTLS)
    assert set(metrics.COUNTER_METRICS) == set(COUNTERS)
    values = samples(render(snapshot([]), {}, FIGURES))
    host = (("netns", "host"),)
    for index, sysctl in enumerate(SYSCTLS):
        assert values[(metrics.SYSCTL_METRICS[sysctl].name, host)] == 100 + index
    for index, counter in enumerate(COUNTERS):
        expected = 0 if counter == "ListenDrops" else 10 + index
        assert values[(metrics.COUNTER_METRICS[counter].name, host)] == expected
    assert values[("aqtune_netns_listen_overflows_total", host)] == 10
    assert values[("aqtune_netns_somaxconn", host)] == 100


def test_readme_lists_every_metric() -> None:
    text = README.read_text(encoding="utf-8")
    missing = [family.name for family in metrics.FAMILIES if f"`{family.name}`" not in text]
    assert not missing, f"README.md does not list {missing}"


def test_daemon_figures_and_staleness_signal() -> None:
    values = samples(render(snapshot([listener("127.0.0.1:80")]), {}, FIGURES))
    assert values[("aqtune_last_sweep_timestamp_seconds", ())] == 1_700_000_001.5
    assert values[("aqtune_sweep_duration_seconds", ())] == 0.25
    assert values[("aqtune_ebpf_active", ())] == 0
    assert values[("aqtune_journal_suppressed_total", ())] == 3
    assert values[("aqtune_journal_refused_total", ())] == 1
    assert values[("aqtune_listeners", ())] == 1 and values[("aqtune_listeners_omitted", ())] == 0
    assert values[("aqtune_namespaces", ())] == 1 and values[("aqtune_namespaces_omitted", ())] == 0
    # Constant 1 while node_exporter serves a dead daemon's file: the timestamp says it instead.
    assert not [key for key in values if key[0] == "aqtune_up"]


def test_listener_series_carry_every_figure() -> None:
    nginx = (Process(10, "nginx", "nginx: master", "nginx.service"), Process(11, "nginx", "nginx: worker", "a.service"),
             Process(12, "nginx", "nginx: worker", "nginx.service"), Process(13, "sh", "sh", None))
    values = samples(render(snapshot([listener("127.0.0.1:80", queue=5, backlog=4, drops=7, cookie=42,
                                               processes=nginx)]), {}, FIGURES))
    labels = (("address", "127.0.0.1:80"), ("netns", "host"), ("proto", "tcp"), ("socket", "42"),
              ("unit", "a.service,nginx.service"))
    assert values[("aqtune_listener_queue", labels)] == 5
    assert values[("aqtune_listener_backlog", labels)] == 4
    assert values[("aqtune_listener_fill_ratio", labels)] == 1.25
    assert values[("aqtune_listener_drops_total", labels)] == 7
    # Without eBPF there are no event series at all (not zeros that would claim nothing happened).
    assert not [key for key in values if key[0] == "aqtune_listener_enqueued_total"]


def test_unknown_drops_leave_the_drops_series_out() -> None:
    values = samples(render(snapshot([listener("/run/a.sock", drops=None, cookie=5)]), {}, FIGURES))
    assert series(values, "aqtune_listener_queue") == {"5": 0}
    assert series(values, "aqtune_listener_drops_total") == {}


def test_reuseport_siblings_and_a_rebound_unix_path_are_separate_series() -> None:
    rows = [
        # Two SO_REUSEPORT sockets on one address, one full and one idle.
        listener("0.0.0.0:443", queue=9, backlog=8, drops=4, cookie=101),
        listener("0.0.0.0:443", queue=0, backlog=8, drops=0, cookie=102),
        # A Unix path bound again while the old socket, now nameless on disk, still listens.
        listener("/run/app.sock", queue=3, backlog=16, drops=None, cookie=201),
        listener("/run/app.sock", queue=1, backlog=16, drops=None, cookie=202),
    ]
    values = samples(render(snapshot(rows), {}, FIGURES))
    assert series(values, "aqtune_listener_queue") == {"101": 9, "102": 0, "201": 3, "202": 1}
    assert series(values, "aqtune_listener_drops_total") == {"101": 4, "102": 0}


def test_a_socket_listed_twice_is_written_once() -> None:
    row = listener("127.0.0.1:80", queue=1, cookie=7)
    values = samples(render(snapshot([row, row]), {}, FIGURES))
    assert series(values, "aqtune_listener_queue") == {"7": 1}
    assert values[("aqtune_listeners", ())] == 1


def test_event_series_with_ebpf() -> None:
    rows = [listener("127.0.0.1:80", cookie=1), listener("127.0.0.1:81", cookie=2),
            listener("127.0.0.1:82", cookie=3)]
    events = {
        1001: ListenerEvents(enqueued=20, peak_queue=6, ack_overflow=3, syn_overflow=2, synack_retransmits=4,
                             accepts=17, queue_wait_ms={"p50": 0.004, "p99": 2.048}, requested_backlog=511),
        # No SYN probe, no wait yet, no listen() seen: those series are left out, not written as 0.
        1002: ListenerEvents(enqueued=1, peak_queue=None, ack_overflow=0, syn_overflow=None, synack_retransmits=0,
                             accepts=0, queue_wait_ms=None, requested_backlog=None),
    }
    values = samples(render(snapshot(rows), events, DaemonFigures(0.1, 1.0, True, 0, 0)))
    assert values[("aqtune_ebpf_active", ())] == 1
    assert series(values, "aqtune_listener_enqueued_total") == {"1": 20, "2": 1, "3": 0}
    assert series(values, "aqtune_listener_accepts_total") == {"1": 17, "2": 0, "3": 0}
    assert series(values, "aqtune_listener_ack_overflows_total") == {"1": 3, "2": 0, "3": 0}
    assert series(values, "aqtune_listener_syn_overflows_total") == {"1": 2}
    assert series(values, "aqtune_listener_synack_retransmits_total") == {"1": 4, "2": 0, "3": 0}
    assert series(values, "aqtune_listener_peak_queue") == {"1": 6}
    assert series(values, "aqtune_listener_requested_backlog") == {"1": 511}
    waits = {dict(labels)["quantile"]: value for (name, labels), value in values.items()
             if name == "aqtune_listener_queue_wait_seconds"}
    assert waits == {"0.5": 0.000004, "0.99": 0.002048}


HOSTILE = [
    '@x\nWATCHDOG_USEC=1\nX',  # what made systemd kill aqtune through STATUS=
    'quote " and backslash \\ and } brace',
    "\x1b]0;title\x07\x1b[2J\r\t\x7f\x9b",  # terminal controls
    "caf\u00e9 \u202e \U0001f600",
    "undecodable \udcff byte",  # os.listdir's surrogateescape
    "/" + "a" * 300,
]


def test_hostile_names_are_escaped_and_bounded() -> None:
    rows = [listener(name, queue=1, cookie=index, netns=f"ns{index}",
                     processes=(Process(1, "x", "x", name + ".service"),)) for index, name in enumerate(HOSTILE)]
    namespaces = [namespace(f"ns{index}", 10 + index) for index in range(len(HOSTILE) - 1)]
    namespaces.append(namespace(HOSTILE[-2], 99))
    text = render(snapshot(rows, namespaces), {}, FIGURES)
    # One sample or comment per line, nothing a terminal would act on.
    assert all(line.startswith(("# HELP aqtune_", "# TYPE aqtune_", "aqtune_")) for line in text.splitlines())
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", text)
    text.encode("utf-8")  # writable as UTF-8, surrogates included
    values = samples(text)
    addresses = {dict(labels)["socket"]: dict(labels) for (name, labels), _ in values.items()
                 if name == "aqtune_listener_queue"}
    for index, name in enumerate(HOSTILE):
        shown = addresses[str(index)]
        assert shown["address"] == label_text(name)
        assert shown["unit"] == label_text(name + ".service")
        assert len(shown["address"]) <= metrics.MAX_LABEL and len(shown["unit"]) <= metrics.MAX_LABEL
    assert addresses["0"]["address"] == "@x\\nWATCHDOG_USEC=1\\nX"
    assert addresses["1"]["address"] == HOSTILE[1]  # printable text is shown as it is
    assert addresses["2"]["address"] == "\\x1b]0;title\\x07\\x1b[2J\\r\\t\\x7f\\x9b"
    assert addresses["4"]["address"] == "undecodable \\udcff byte"


def test_clipped_values_stay_apart() -> None:
    first, second = "/" + "a" * 200 + "1", "/" + "a" * 200 + "2"
    assert len(label_text(first)) == len(label_text(second)) == metrics.MAX_LABEL
    assert label_text(first) != label_text(second)
    assert label_text(first).startswith("/aaaa")
    assert label_text("/" + "a" * 127) == "/" + "a" * 127  # at the limit: as it is


def test_namespace_names_that_collide_still_give_one_series_each() -> None:
    long = "n" * 300
    namespaces = [namespace("host", 1), namespace("host", 2), namespace(long + "1", 3), namespace(long + "2", 4)]
    values = samples(render(snapshot([], namespaces), {}, FIGURES))
    shown = [dict(labels)["netns"] for name, labels in values if name == "aqtune_netns_somaxconn"]
    assert len(shown) == len(set(shown)) == 4
    assert "host" in shown and "host net:[2]" in shown


def test_listener_cap_keeps_the_fullest_and_counts_the_rest() -> None:
    # 50 listeners; fill i/100, and among equal fills the one with more drops is worse.
    rows = [listener(f"127.0.0.1:{1000 + i}", queue=i // 2, backlog=50, drops=i % 2, cookie=i) for i in range(50)]
    values = samples(render(snapshot(rows), {}, FIGURES, max_listeners=10))
    kept = series(values, "aqtune_listener_queue")
    assert set(kept) == {str(i) for i in range(40, 50)}
    assert values[("aqtune_listeners", ())] == 50
    assert values[("aqtune_listeners_omitted", ())] == 40
    # Every per-listener family is capped, not only the first one.
    assert len(series(values, "aqtune_listener_fill_ratio")) == len(series(values, "aqtune_listener_drops_total")) == 10


def test_listener_cap_orders_by_fill_then_drops() -> None:
    rows = [listener("127.0.0.1:1", queue=4, backlog=8, drops=100, cookie=1),
            listener("127.0.0.1:2", queue=8, backlog=8, drops=0, cookie=2),
            listener("127.0.0.1:3", queue=4, backlog=8, drops=101, cookie=3)]
    values = samples(render(snapshot(rows), {}, FIGURES, max_listeners=2))
    assert set(series(values, "aqtune_listener_queue")) == {"2", "3"}


def test_namespace_cap_keeps_the_host_and_the_most_drops() -> None:
    namespaces = [namespace(f"pid:{i}", 100 + i, drops=i) for i in range(20)] + [namespace("host", 1, drops=0)]
    values = samples(render(snapshot([], namespaces), {}, FIGURES, max_namespaces=4))
    shown = {dict(labels)["netns"] for name, labels in values if name == "aqtune_netns_listen_drops_total"}
    assert shown == {"host", "pid:19", "pid:18", "pid:17"}
    assert values[("aqtune_namespaces", ())] == 21
    assert values[("aqtune_namespaces_omitted", ())] == 17
    for family in (*metrics.SYSCTL_METRICS.values(), *metrics.COUNTER_METRICS.values()):
        assert sum(name == family.name for name, _ in values) == 4, family.name


def test_namespace_series() -> None:
    broken = Namespace("pid:7", 7, error="vanished during the sweep")
    good = namespace("host", 1)
    good.listeners = 3
    values = samples(render(snapshot([], [good, broken]), {}, FIGURES))
    assert values[("aqtune_netns_listeners", (("netns", "host"),))] == 3
    assert values[("aqtune_netns_read_error", (("netns", "host"),))] == 0
    assert values[("aqtune_netns_read_error", (("netns", "pid:7"),))] == 1
    assert ("aqtune_netns_somaxconn", (("netns", "pid:7"),)) not in values  # nothing read, nothing written


def test_write_replaces_the_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "aqtune.prom"
    path.write_text("old", encoding="utf-8")
    rows = [listener("127.0.0.1:80", cookie=1)]
    metrics.write(str(path), snapshot(rows), {}, FIGURES)
    assert path.read_text(encoding="utf-8") == render(snapshot(rows), {}, FIGURES)
    # node_exporter runs as its own user: the file must be readable by it.
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert os.listdir(tmp_path) == ["aqtune.prom"]


# Any code point, lone surrogates included, and often the ones the format or a terminal cares about.
names = st.text(alphabet=st.one_of(st.sampled_from('\n"\\{}=,\x1b\x00\udcff\u2028'),
                                   st.integers(0, 0x10FFFF).map(chr)), max_size=200)


@given(st.lists(st.tuples(names, names, st.integers(0, 3), st.integers(0, 10), st.integers(1, 5)), max_size=30),
       st.lists(names, max_size=8), st.integers(0, 40), st.integers(0, 10))
def test_any_names_and_sockets_give_a_parseable_file_without_duplicates(
        rows: list[tuple[str, str, int, int, int]], netns_names: list[str], max_listeners: int,
        max_namespaces: int) -> None:
    # Few distinct cookies, so the same socket may also appear twice.
    listeners = [listener(address, queue=queue, cookie=cookie, netns=netns,
                          processes=(Process(1, "x", "x", netns + address),))
                 for address, netns, cookie, queue, _ in rows]
    namespaces = [Namespace(name, index + 1, sysctls={"net.core.somaxconn": 4096}) for index, name in
                  enumerate(netns_names)]
    text = render(snapshot(listeners, namespaces), {}, FIGURES, max_listeners, max_namespaces)
    text.encode("utf-8")
    values = samples(text)
    unique = len({row.cookie for row in listeners})
    assert len(series(values, "aqtune_listener_queue")) == min(unique, max_listeners)
    assert values[("aqtune_listeners_omitted", ())] == unique - min(unique, max_listeners)
    assert sum(name == "aqtune_netns_somaxconn" for name, _ in values) == min(len(netns_names), max_namespaces)
    for _, labels in values:
        assert all(len(value) <= metrics.MAX_LABEL for _, value in labels)


def test_line_cache_reuses_a_quiet_listeners_lines_and_remakes_a_changed_ones() -> None:
    cache = metrics.LineCache()
    quiet, busy = listener("127.0.0.1:80", cookie=1), listener("127.0.0.1:81", queue=2, cookie=2)
    first = render(snapshot([quiet, busy]), {}, FIGURES, cache=cache)
    kept = cache.entries[1][1]
    # The next sweep's records are new objects with the same figures: the same lines, not remade.
    quiet_again, busy_now = listener("127.0.0.1:80", cookie=1), listener("127.0.0.1:81", queue=7, cookie=2)
    second = render(snapshot([quiet_again, busy_now]), {}, FIGURES, cache=cache)
    assert cache.entries[1][1] is kept
    assert samples(second) == {**samples(first), **{
        ("aqtune_listener_queue", (("address", "127.0.0.1:81"), ("netns", "host"), ("proto", "tcp"),
                                   ("socket", "2"), ("unit", ""))): 7.0,
        ("aqtune_listener_fill_ratio", (("address", "127.0.0.1:81"), ("netns", "host"), ("proto", "tcp"),
                                        ("socket", "2"), ("unit", ""))): 7 / 8}}
    # What renders with the cache is what renders without it, and a closed listener is forgotten.
    assert second == render(snapshot([quiet_again, busy_now]), {}, FIGURES)
    owned = listener("127.0.0.1:80", cookie=1, processes=(Process(7, "nginx", "nginx", "nginx.service"),))
    assert 'unit="nginx.service"' in render(snapshot([owned]), {}, FIGURES, cache=cache)
    assert set(cache.entries) == {1}
