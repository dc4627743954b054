"""`aqtune status --watch` as a person sees it: run in a real terminal (tmux, 80 columns) during a bounded
flood, with the daemon (eBPF) running; a captured frame shows accept, drop and TcpExt rates, and no line
of it is wider than the terminal (tmux would wrap it: the capture joins wrapped lines back)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.aqtune_run import Daemon, write_policy
from tests.helpers.namespace import PYTHON, REPO, TestNamespace, wait_until
from tests.helpers.service import wait_for_state

pytestmark = pytest.mark.integration

SERVE_PORT, FLOOD_PORT = 18080, 18081
GO_SECONDS = 6  # each load generator's one go
POLICY = 'mode = "recommend"\ninterval = 0.5\n\n[saturation]\nsustain = 1\n'


@pytest.fixture
def tmux() -> Iterator[Callable[..., str]]:
    """``tmux -L <private server> ARGS``; the server is killed afterwards."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux not found: install Debian's tmux (make test-deps does)")
    server = f"aqt-{os.getpid()}"
    env = {**os.environ, "TERM": "xterm-256color"}

    def run(*args: str) -> str:
        return subprocess.run(["tmux", "-L", server, *args], capture_output=True, text=True, timeout=20, env=env,
                              check=True).stdout

    try:
        yield run
    finally:
        subprocess.run(["tmux", "-L", server, "kill-server"], capture_output=True, timeout=20, env=env)


def rows_of(frame: str, address: str) -> list[str]:
    return [line.split() for line in frame.splitlines() if line.startswith(address + " ")]  # type: ignore[misc]


def number(cell: str) -> float:
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}.get(cell[-1:], 1.0)
    return float(cell.rstrip("kMG")) * scale if cell != "-" else 0.0


def test_watch_frame_under_a_flood_shows_the_rates_within_80_columns(
        netns: Callable[[], TestNamespace], tmp_path: Path, tmux: Callable[..., str]) -> None:
    ns = netns()
    policy = write_policy(tmp_path / "policy.toml", POLICY)
    state = tmp_path / "state"
    daemon = Daemon(["--config", str(policy), "--netns", ns.name, "--state-dir", str(state), "--dry-run"],
                    tmp_path / "daemon.log")
    try:
        if not wait_for_state(state, daemon, timeout=60)["ebpf"]["active"]:
            pytest.skip("eBPF is not available here: the accept rates need it")
        server = ns.spawn("loadgen.py", ["serve", "--port", str(SERVE_PORT)], "READY")
        client = ns.spawn("loadgen.py", ["connect", "--port", str(SERVE_PORT)], "READY")
        flood = ns.spawn("loadgen.py", ["synflood", "--port", str(FLOOD_PORT), "--rate", "200", "--steady"], "READY")
        for helper in (server, client, flood):
            helper.ready()
        command = " ".join([PYTHON, "-m", "aqtune", "status", "--watch", "--interval", "1", "--netns", ns.name,
                            "--config", str(policy), "--state-dir", str(state)])
        tmux("new-session", "-d", "-s", "watch", "-x", "80", "-y", "30", "-c", str(REPO), command)
        client.send(f"go {GO_SECONDS}")
        flood.send(f"go {GO_SECONDS}")

        def frame_with_rates() -> str | None:
            frame = tmux("capture-pane", "-p", "-J", "-t", "watch")
            served, flooded = rows_of(frame, f"127.0.0.1:{SERVE_PORT}"), rows_of(frame, f"127.0.0.1:{FLOOD_PORT}")
            tcpext = [line.split() for line in frame.splitlines() if line.startswith("  TcpExt/s:")]
            if not (served and flooded and tcpext and "rates over" in frame):
                return None
            if number(served[0][3]) > 0 and number(flooded[0][4]) > 0 and number(tcpext[0][2]) > 0:
                return frame
            return None

        frame = wait_until(frame_with_rates, "a frame with accept, drop and ListenOverflows rates",
                           timeout=GO_SECONDS + 10, interval=0.3)
        client.expect("OK", GO_SECONDS + 10)
        flood.expect("OK", GO_SECONDS + 10)
        print(frame)  # shown with -s, and on failure
        lines = frame.rstrip("\n").splitlines()
        assert all(len(line.rstrip()) <= 80 for line in lines), [line for line in lines if len(line.rstrip()) > 80]
        assert lines[1].split() == ["LISTENER", "QUEUE/BL", "FILL", "ACC/s", "DROP/s", "RTX/s", "EST", "LONG", "WAIT"]
        assert f"netns {ns.name}" in frame and "eBPF on" in lines[0]
        (flooded,) = rows_of(frame, f"127.0.0.1:{FLOOD_PORT}")
        assert flooded[1] == "9/8"  # the never-accepting backlog-8 listener, full
        # It is full now: its connections were read (9 established, all queued), and they have waited.
        assert flooded[6:8] == ["9", "0"] and flooded[8] != "-", frame
    finally:
        daemon.stop()
