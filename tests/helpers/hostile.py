#!/usr/bin/python3
"""An unprivileged user's listeners with names chosen to attack whoever reads them; for the tests.

    setpriv --reuid=nobody ... /usr/bin/python3 tests/helpers/hostile.py SPEC_JSON

SPEC_JSON (ASCII: JSON escapes carry ESC and NUL through argv):

    {"comm": "...",                      process name (15 bytes at most, as the kernel keeps it)
     "cwd": "/dir",                      where relative Unix paths are bound
     "lo": "hex bytes",                  rename the loopback interface to these bytes first (needs
                                         CAP_NET_ADMIN in the namespace: run under `unshare -rn`)
     "unix": [{"name": "@abstract\\u0000x" | "relative/or/absolute", "backlog": 1, "connects": 2}],
     "tcp": [{"backlog": 1, "device": true}],   bound to 127.0.0.1, SO_BINDTODEVICE to lo when device
     "life": 60}

``connects`` non-blocking clients are connected to a Unix listener and held, so its queue stays full
(listen(1) holds two). Prints ``READY {"pid", "listeners": [{"address", "cookie", "inode"}]}``, then
exits when stdin closes or ``life`` seconds pass.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import socket
import subprocess
import sys
from typing import Any

PR_SET_NAME = 15
SO_COOKIE = 57
MAX_LIFE = 300.0


def unix_address(name: str) -> bytes:
    return b"\0" + name[1:].encode() if name.startswith("@") else name.encode()


def described(sock: socket.socket, address: str) -> dict[str, Any]:
    return {"address": address, "inode": os.fstat(sock.fileno()).st_ino,
            "cookie": int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), sys.byteorder)}


def main() -> int:
    spec = json.loads(sys.argv[1])
    ctypes.CDLL(None).prctl(PR_SET_NAME, spec.get("comm", "aqt-hostile").encode()[:15], 0, 0, 0)
    if "cwd" in spec:
        os.chdir(spec["cwd"])
    device = b"lo"
    if "lo" in spec:
        device = bytes.fromhex(spec["lo"])
        subprocess.run([b"ip", b"link", b"set", b"lo", b"name", device], check=True)
        subprocess.run([b"ip", b"link", b"set", device, b"up"], check=True)
    held: list[socket.socket] = []
    listeners = []
    for entry in spec.get("unix", []):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(unix_address(entry["name"]))
        sock.listen(entry["backlog"])
        held.append(sock)
        listeners.append(described(sock, entry["name"]))
        for _ in range(entry.get("connects", 0)):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            client.connect(unix_address(entry["name"]))
            held.append(client)
    for entry in spec.get("tcp", []):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if entry.get("device"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device)
        sock.bind(("127.0.0.1", 0))
        sock.listen(entry["backlog"])
        held.append(sock)
        listeners.append(described(sock, f"127.0.0.1:{sock.getsockname()[1]}"))
    print("READY " + json.dumps({"pid": os.getpid(), "listeners": listeners}), flush=True)
    select.select([sys.stdin.fileno()], [], [], min(float(spec.get("life", 60)), MAX_LIFE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
