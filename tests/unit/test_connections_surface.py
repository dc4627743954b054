"""`aqtune connections`: the document and its table, from hand-built listeners and connections; the
command's options against the bash completion and the man page."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from aqtune.cli import build_parser
from aqtune.collect.connections import AGES_EBPF, AGES_NONE, summarize_connections
from aqtune.decide.policy import Policy
from aqtune.records import Connection, Listener, Process
from aqtune.surfaces.connections import TOP_LISTENERS, ages_note, document, render

REPO = Path(__file__).resolve().parents[2]
NOW = 3_000_000.0
POLICY = Policy()


def apache(children: int) -> tuple[Process, ...]:
    master = Process(100, "apache2", "/usr/sbin/apache2 -k start", "apache2.service", exe="apache2", threads=1)
    return (master, *(Process(101 + i, "apache2", "/usr/sbin/apache2 -k start", "apache2.service", exe="apache2",
                              ppid=100, threads=1) for i in range(children)))


def held(pid: int, inode: int, age: float, comm: str = "apache2") -> Connection:
    return Connection("web", "tcp", "127.0.0.1:8080", f"127.0.0.1:{40000 + inode}", "established", inode, inode, 33,
                      recv_idle=age - 0.5, send_idle=age, bytes_in=26, bytes_out=0, accepted_at=NOW - age,
                      holders=(Process(pid, comm, "x", None, ppid=100),))


def build(connections: list[Connection], processes: tuple[Process, ...], queue: int = 3, every: bool = False,
          ages: str = AGES_EBPF, address: str = "127.0.0.1:8080") -> dict[str, object]:
    listener = Listener("web", "tcp", address, 8080, queue, 2, 0, 7, 70, 0, processes)
    summary = summarize_connections(connections, NOW, 30, 10, ages=ages, keep=-1 if every else 20)
    return document([listener], {("web", 7): summary}, POLICY, ages, ages_note(ages, "no daemon"), {}, every, NOW,
                    selected=True)


def test_held_workers_are_listed_longest_first_with_the_finding() -> None:
    connections = [held(101 + i, 10 + i, 40.0 + i) for i in range(4)]
    doc = build(connections, apache(4))
    json.dumps(doc)
    (entry,) = doc["listeners"]  # type: ignore[index]
    assert [c["inode"] for c in entry["connections"]] == [13, 12, 11, 10]
    assert entry["connections"][0]["age_s"] == 43.0 and entry["connections"][0]["holders"][0]["pid"] == 104
    assert [a["id"] for a in entry["advice"]] == ["held-by-connections"]
    text = render(doc)
    lines = text.splitlines()
    assert lines[0].startswith("aqtune connections at ") and "long-held: open over 30 s" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["PEER", "STATE", "AGE"])
    assert [line.split()[0] for line in lines[header + 1:header + 5]] == [
        "127.0.0.1:40013", "127.0.0.1:40012", "127.0.0.1:40011", "127.0.0.1:40010"]
    assert "104" in lines[header + 1] and "43.0s" in lines[header + 1]
    assert any(line.startswith("  [held-by-connections] ") for line in lines)


def test_a_listener_not_full_gets_no_finding_and_young_connections_are_left_out_without_all() -> None:
    young = [held(101, 10, 2.0), held(102, 11, 1.0)]
    young = [Connection(**{**{f: getattr(c, f) for f in c.__slots__}, "recv_idle": 0.5}) for c in young]
    doc = build(young, apache(2), queue=0)
    (entry,) = doc["listeners"]  # type: ignore[index]
    assert entry["advice"] == [] and entry["connections"] == [] and entry["more"] == 0
    assert "none long-held or idle (--all lists every connection)" in render(doc)
    every = build(young, apache(2), queue=0, every=True)
    assert len(every["listeners"][0]["connections"]) == 2  # type: ignore[index]


def test_output_is_bounded_with_a_count_of_the_rest() -> None:
    many = [held(101, 10 + i, 40.0 + i) for i in range(50)]
    doc = build(many, apache(1))
    (entry,) = doc["listeners"]  # type: ignore[index]
    assert len(entry["connections"]) == 20 and entry["more"] == 30
    assert "  and 30 more (--all lists every one)" in render(doc).splitlines()
    listeners = [Listener("web", "tcp", f"127.0.0.1:{9000 + i}", 9000 + i, 0, 8, 0, i, 100 + i, 0) for i in range(30)]
    summaries = {("web", l.cookie): summarize_connections([held(101, 500 + l.cookie, 40)], NOW, 30, 10)
                 for l in listeners}
    doc = document(listeners, summaries, POLICY, AGES_NONE, "x", {}, False, NOW, selected=False)
    assert len(doc["listeners"]) == TOP_LISTENERS and doc["more_listeners"] == 30 - TOP_LISTENERS


def test_untrusted_names_are_escaped_in_the_table_not_in_json() -> None:
    evil_comm = "apache2\x1b[2J"
    evil = [held(101, 10, 40.0, comm=evil_comm)]
    doc = build(evil, apache(1), address="/run/\x1b]0;owned\x07.sock")
    text = render(doc)
    assert "\x1b" not in text and "\x07" not in text
    assert "apache2\\x1b[2J" in text and "/run/\\x1b]0;owned\\a.sock" in text
    assert doc["listeners"][0]["connections"][0]["holders"][0]["comm"] == evil_comm  # type: ignore[index]


def test_without_ebpf_ages_are_marked_as_lower_bounds() -> None:
    blind = [Connection("web", "tcp", "127.0.0.1:8080", "127.0.0.1:5000", "established", 10, 10, 0, recv_idle=35,
                        send_idle=40, bytes_in=26, bytes_out=0)]
    doc = build(blind, apache(1), ages=AGES_NONE)
    row = doc["listeners"][0]["connections"][0]  # type: ignore[index]
    assert row["age_s"] is None and row["age_at_least_s"] == 40
    text = render(doc)
    assert ">=40.0s" in text and "ages: no eBPF accept times (no daemon)" in text


# --- the command's surface -----------------------------------------------------------------------------


def _options(parser: argparse.ArgumentParser, command: str) -> set[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {o for action in sub.choices[command]._actions for o in action.option_strings if o.startswith("--")}


def test_completion_and_man_page_know_the_command_and_its_options() -> None:
    options = _options(build_parser(), "connections")
    assert options == {"--help", "--netns", "--port", "--listener", "--json", "--pretty", "--all", "--config",
                       "--state-dir"}
    completion = (REPO / "packaging/bash-completion/aqtune").read_text()
    listed = re.search(r'connections\) options="([^"]*)"', completion)
    assert listed is not None and set(listed.group(1).split()) == options
    assert "connections" in re.search(r'local commands="([^"]*)"', completion).group(1).split()  # type: ignore[union-attr]
    man = (REPO / "packaging/man/aqtune.8").read_text()
    assert ".B connections" in man
    for option in options - {"--help"}:
        assert option.replace("-", "\\-") in man, option
    assert "aqtune connections [--netns NAME] [--port N | --listener ADDR] [--json] [--all]" in (
        REPO / "README.md").read_text()
