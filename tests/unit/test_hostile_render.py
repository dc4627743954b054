"""The status table with names a local user chose to attack a terminal, and Unix paths that look
like TCP addresses: on hand-built records, as the integration tests see them on the kernel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aqtune.collect.sockdiag import _ip_text, format_unix_path
from aqtune.decide.assess import Assessment
from aqtune.decide.diagnose import Finding
from aqtune.decide.policy import ListenerRule, Policy, rule_for
from aqtune.records import Listener, Namespace, Process, Snapshot
from aqtune.surfaces.status import owner_text, render, snapshot_json
from aqtune.text import cescape, width
from tests.helpers.policy_corpus import REPO

OSC_TITLE = "\x1b]0;owned\x07"
CSI_ERASE = "\x1b[2K\x1b[1A"
RLO = "\u202e"
NAMES = {
    "address": f"@x\nWATCHDOG_USEC=1\nX{OSC_TITLE}",
    "netns": f"ns{CSI_ERASE}",
    "comm": f"ngin{RLO}x\x07",
    "unit": "evil\x1b[31m.service",
    "advice": f"raise it\r{CSI_ERASE}done",
    "error": f"gone\n{OSC_TITLE}",
}


def hostile_document() -> dict[str, object]:
    process = Process(42, NAMES["comm"], "cmd\x1b", NAMES["unit"])
    listeners = [
        Listener(NAMES["netns"], "unix", NAMES["address"], None, 2, 1, None, 7, 99, 1000, (process,)),
        Listener("host", "tcp", "127.0.0.1%" + "eth\x1b[0m" + ":80", 80, 0, 128, 0, 8, 100, 0),
        Listener("host", "unix", "@名前\u2066", None, 0, 1, None, 9, 101, 1000),
    ]
    namespaces = [Namespace(NAMES["netns"], 4026532999, {"net.core.somaxconn": 4096}, {"Listen\x1bOverflows": 1},
                            listeners=1, error=NAMES["error"]),
                  Namespace("host", 4026531840, listeners=2)]
    advice = Assessment(listener_findings={(NAMES["netns"], 7): [Finding("saturated\x1b", NAMES["advice"])]},
                        namespace_findings={"host": [Finding("somaxconn", f"netns {NAMES['netns']}")]})
    return snapshot_json(Snapshot(1_700_000_000.0, 0.01, namespaces, listeners), advice)


def control_characters(text: str) -> list[str]:
    """What a terminal would act on: anything but printable characters and the line breaks."""
    return sorted({char for line in text.split("\n") for char in line if not char.isprintable()})


def test_the_table_holds_no_character_a_terminal_acts_on() -> None:
    text = render(hostile_document())
    assert control_characters(text) == []
    watched = render(hostile_document(), previous_drops={8: 0})
    assert control_characters(watched) == []


def test_every_hostile_name_is_shown_escaped() -> None:
    text = render(hostile_document())
    for name in (NAMES["address"], NAMES["netns"], NAMES["unit"], NAMES["error"]):
        assert cescape(name) in text, name
    assert f"42/{cescape(NAMES['comm'])}" in text
    assert f"  [saturated\\x1b] {cescape(NAMES['advice'])}" in text.splitlines()
    assert "127.0.0.1%eth\\x1b[0m:80" in text
    assert "@名前\\u2066" in text
    assert "Listen\\x1bOverflows=1" in text


def test_rows_stay_one_line_each_and_aligned() -> None:
    lines = render(hostile_document()).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("NETNS"))
    rows = lines[header + 1:header + 4]
    assert len(rows) == 3 and all(row.split()[1] in ("unix", "tcp") for row in rows)
    # The wide characters of @名前 take two columns each: QUEUE/BACKLOG ends in the same column.
    end = lines[header].index("QUEUE/BACKLOG") + len("QUEUE/BACKLOG")
    for row in rows:
        queue = row.split()[3]
        cell_end = row.index(f" {queue} ") + 1 + len(queue)
        assert width(row[:cell_end]) == end, row


def test_json_keeps_the_names_as_they_are_and_is_ascii() -> None:
    document = hostile_document()
    text = json.dumps(document)
    assert text.isascii()
    assert json.loads(text)["listeners"][0]["address"] == NAMES["address"]


def test_owner_text_escapes_comm_and_units() -> None:
    processes = [{"pid": 1, "comm": "a\nb", "cmdline": "", "unit": "u\x1b.service"},
                 {"pid": 2, "comm": "c", "cmdline": "", "unit": None}]
    assert owner_text(processes) == "1/a\\nb +1 (u\\x1b.service)"


# --- a Unix path is always shown as a path ---------------------------------------------------------------

@pytest.mark.parametrize(("raw", "shown"), [
    (b"0.0.0.0:443\0", "./0.0.0.0:443"),  # bound at a relative path that reads as a TCP address
    (b"[::1]:443\0", "./[::1]:443"),
    (b"@abstract-lookalike\0", "./@abstract-lookalike"),  # a file named @..., not an abstract name
    (b".hidden.sock\0", "./.hidden.sock"),
    (b"./run.sock\0", "./run.sock"),
    (b"../run.sock\0", "../run.sock"),
    (b"/run/app.sock\0", "/run/app.sock"),
    (b"\0abstract", "@abstract"),
    (b"\0with\0nul", "@with@nul"),
    (b"", ""),
])
def test_unix_paths_are_shown_as_paths(raw: bytes, shown: str) -> None:
    assert format_unix_path(raw) == shown


def test_a_relative_unix_path_does_not_match_a_tcp_address_rule() -> None:
    policy = Policy(listeners=(ListenerRule(address="0.0.0.0:443", ignore=True),))
    assert rule_for(policy, "host", "0.0.0.0:443", 443, (), ()) is not None
    assert rule_for(policy, "host", format_unix_path(b"0.0.0.0:443\0"), None, (), ()) is None


def test_interface_names_that_are_not_utf8_become_valid_text() -> None:
    # socket.if_nameindex() keeps such bytes as lone surrogates, which no UTF-8 sink can write.
    raw_name = b"e\xffth".decode("utf-8", "surrogateescape")
    text = _ip_text(2, bytes(4), 3, {3: raw_name})
    assert text == "0.0.0.0%e\\xffth"
    text.encode("utf-8")
    assert _ip_text(2, bytes(4), 3, {3: "eth\x1b"}) == "0.0.0.0%eth\x1b"  # kept; escaped where shown


# --- `aqtune check`: key names and values come from the file, the file name from whoever wrote it ----------

def test_check_prints_hostile_keys_and_paths_escaped(tmp_path: Path) -> None:
    policy = tmp_path / "p\x1b[2K\u202e.toml"
    policy.write_text('"\\u001b]0;owned\\u0007" = 1\nmode = "\\u001b[2K\\r"\n[saturation]\n"a\\nb" = 2\n',
                      encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "aqtune", "check", "--config", str(policy)], cwd=REPO,
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    stderr = result.stderr.decode("utf-8")
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 3, stderr
    assert all(char.isprintable() for line in lines for char in line), stderr
    shown_path = str(tmp_path) + "/p\\x1b[2K\\u202e.toml"
    assert all(line.startswith(shown_path + ":") for line in lines), stderr
    assert any("\\x1b]0;owned\\a" in line for line in lines), stderr
    assert any("a\\nb" in line for line in lines), stderr


def test_check_ok_line_escapes_the_path(tmp_path: Path) -> None:
    policy = tmp_path / "ok\x07.toml"
    policy.write_text('mode = "recommend"\n', encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "aqtune", "check", "--config", str(policy)], cwd=REPO,
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith(str(tmp_path) + "/ok\\a.toml: OK")
