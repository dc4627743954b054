"""Sockets as the helper processes make them: loopback only, non-blocking connects told apart by outcome,
listeners spread over 127.0.k.1 so thousands of them fit in a small port range."""

from __future__ import annotations

import errno
import ipaddress
import resource
import socket

LISTEN_PORT = 19000  # listeners in bulk: below the ephemeral ports, so they never clash with a client's
PORTS_PER_ADDRESS = 500
HELD = ("connected", "in_progress")  # outcomes that leave a socket worth holding


def loopback(host: str) -> str:
    """``host`` itself; refuses anything but a loopback address, whatever a caller passes."""
    if not ipaddress.ip_address(host.strip("[]")).is_loopback:
        raise ValueError(f"{host}: the helpers only connect to loopback addresses")
    return host


def try_connect(sock: socket.socket, address: tuple[str, int] | str) -> str:
    """Connect a non-blocking socket: "connected", "in_progress" (a TCP listener's queue is full, the SYN
    waits), "eagain" (a full Unix listener), or the errno's name in lower case."""
    try:
        sock.connect(address)
        return "connected"
    except BlockingIOError as exc:
        return "in_progress" if exc.errno == errno.EINPROGRESS else "eagain"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno)).lower()


def open_connections(count: int, family: int, kind: int, address: tuple[str, int] | str, held: list[socket.socket],
                     source: str | None = None) -> dict[str, int]:
    """``count`` non-blocking connects to ``address`` (from ``source``, a loopback address, if given): how many
    ended each way (try_connect). The sockets worth holding are appended to ``held``, the others closed."""
    outcome: dict[str, int] = {}
    for _ in range(count):
        sock = socket.socket(family, kind)
        if source:
            sock.bind((loopback(source), 0))
        sock.setblocking(False)
        result = try_connect(sock, address)
        outcome[result] = outcome.get(result, 0) + 1
        if result in HELD:
            held.append(sock)
        else:
            sock.close()
    return outcome


def listen_tcp(address: tuple[str, int], backlog: int, reuseport: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.listen(backlog)
    return sock


def spread_addresses(count: int, first_net: int) -> list[tuple[str, int]]:
    """``count`` addresses 127.0.k.1:19000-19499, k from ``first_net`` up: one port range for every listener."""
    return [(f"127.0.{first_net + i // PORTS_PER_ADDRESS}.1", LISTEN_PORT + i % PORTS_PER_ADDRESS)
            for i in range(count)]


def raise_nofile(needed: int) -> None:
    """Raise the soft limit on open files to ``needed``, up to the hard limit; fails saying so beyond it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise OSError(f"RLIMIT_NOFILE hard limit {hard} < {needed}: cannot hold that many sockets")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
