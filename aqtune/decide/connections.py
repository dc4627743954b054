"""Why a full queue does not drain, from the connections already accepted: pure functions.

``held_by_connections``: the owner's workers are all occupied by connections that are long-held or
idle (slowloris-style clients, idle keep-alive, a backend that does not answer), so the queue waits
behind them and a longer queue only adds waiting. Told apart from stalled workers (busy on young
connections: nothing here is long-held or idle) and from bursts (the held connections do not fill
the workers).

``reuseport_stalled``: sockets sharing an address through SO_REUSEPORT each get the connections the
kernel hashes to them; when one is full while its siblings drain, the process serving it has stopped
accepting, and that process, not the backlog, is the fix.

The lead's decide step calls both for saturated listeners (see the module's report); neither raises
a sysctl.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from aqtune.decide import servers
from aqtune.decide.findings import Finding, FindingId
from aqtune.decide.policy import Policy
from aqtune.model.groups import REUSEPORT_PROTOS
from aqtune.records import ConnectionSummary, Listener, Process

# Servers whose worker processes serve one connection each (while single-threaded): for them the
# workers holding the listener are the capacity. Threaded and event-driven servers (Apache's event MPM,
# nginx, HAProxy, gthread gunicorn) serve many connections per worker, and their capacity is a
# configuration value aqtune does not read.
ONE_CONNECTION_PER_WORKER = frozenset({
    servers.APACHE_PREFORK.key, servers.PHP_FPM.key, servers.GUNICORN.key, servers.UWSGI.key,
})
MAX_NAMED = 3  # processes a finding names; the rest are counted


def capacity(server: servers.Server, processes: Iterable[Process]) -> tuple[Process, ...] | None:
    """The workers of a server that serves one connection per worker, or None where capacity is unknown."""
    if server.key not in ONE_CONNECTION_PER_WORKER:
        return None
    workers = servers.workers(server, processes)
    if not workers or any(w.threads > 1 for w in workers):
        return None
    return workers


def _seconds(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.0f} s"


def held_by_connections(listener: Listener, summary: ConnectionSummary, server: servers.Server,
                        policy: Policy) -> Finding | None:
    """For a saturated listener: its workers are all occupied by long-held or idle connections.

    ``summary`` is the listener's (collect.connections.summarize), ``server`` its owner's entry in the
    server table (servers.identify(listener.processes)). None when the workers' capacity cannot be
    known, or the held connections do not occupy all of it (a burst, or workers busy on young
    connections: stalled-workers' case).
    """
    workers = capacity(server, listener.processes)
    if workers is None or summary.accepted == 0:
        return None
    pids = {w.pid for w in workers}
    # Counted by holder where the fd scan named them; otherwise by connection (one per worker).
    occupied = len(pids & set(summary.held_by)) if summary.held_by else min(summary.held, len(workers))
    if occupied < len(workers):
        return None
    ages = ("" if summary.ages == "ebpf" else
            "; ages are lower bounds from tcp_info (eBPF gives exact ones)")
    answered = f", {summary.answered} of them idle keep-alive" if summary.answered else ""
    text = (f"{listener.address}: all {len(workers)} of {server.name}'s workers hold connections that are "
            f"long-held (open over {policy.connections.long_after:g} s) or idle (nothing received for "
            f"{policy.connections.idle_after:g} s): {summary.long_held} long-held, {summary.idle} idle{answered}, "
            f"oldest {_seconds(summary.oldest)}, {summary.queued} waiting behind them{ages}; a longer queue adds "
            f"only waiting: bound how long one connection may hold a worker ({servers.hold_knob_text(server)}), "
            f"or serve more at once ({servers.worker_knob_text(server)}); `aqtune connections --netns "
            f"{listener.netns} --listener {listener.address}` lists them")
    evidence: dict[str, int | float | str | None] = {
        "workers": len(workers), "occupied": occupied, "accepted": summary.accepted, "queued": summary.queued,
        "long_held": summary.long_held, "idle": summary.idle, "held": summary.held, "answered": summary.answered,
        "oldest_s": None if summary.oldest is None else round(summary.oldest, 1), "ages": summary.ages,
        "long_after": policy.connections.long_after, "idle_after": policy.connections.idle_after,
        "server": server.key,
    }
    return Finding(FindingId.HELD_BY_CONNECTIONS, text, evidence)


def _who(processes: Sequence[Process]) -> str:
    named = ", ".join(f"pid {p.pid} ({p.comm})" for p in processes[:MAX_NAMED])
    more = len(processes) - MAX_NAMED
    return named + (f" and {more} more" if more > 0 else "")


def reuseport_stalled(member: Listener, group: Sequence[Listener], policy: Policy,
                      serving: Mapping[int, Iterable[int]] | None = None) -> Finding | None:
    """For a full member of a reuseport ``group`` (all members, ``member`` among them) while a sibling
    drains (below ``clear_ratio``): the process serving it stopped accepting.

    ``serving`` maps listener inodes to the pids that accept on them (collect.connections.serving():
    the holders whose epoll set watches the socket; nginx's workers inherit every socket of the group
    and each watches only its own). Where it says nothing about a socket, its holders stand in. The
    stuck process is the one serving this socket and no draining sibling; where every one of them
    serves the siblings too, all are named, as the ones to look at."""
    if member.proto not in REUSEPORT_PROTOS or member.fill < policy.saturation.fill_ratio:
        return None
    draining = [s for s in group if s.cookie != member.cookie and s.fill < policy.saturation.clear_ratio]
    if not draining:
        return None

    def servers_of(listener: Listener) -> list[Process]:
        pids = set((serving or {}).get(listener.inode, ()))
        chosen = [p for p in listener.processes if p.pid in pids]
        return chosen or list(listener.processes)

    serving_siblings = {p.pid for s in draining for p in servers_of(s)}
    candidates = servers_of(member)
    own = [p for p in candidates if p.pid not in serving_siblings]
    stuck = own or candidates
    if not stuck:
        who = "no process found holding it"
    elif own:
        who = _who(stuck)
    else:
        who = f"{_who(stuck)}, which serve its siblings too (a thread or event loop of theirs)"
    sibling = draining[0]
    text = (f"{member.address}: one of {len(group)} SO_REUSEPORT sockets on this address is full "
            f"({member.queue}/{member.backlog}) while {len(draining)} of its siblings drain (one at "
            f"{sibling.queue}/{sibling.backlog}): the kernel hashes each new connection to one socket, and the "
            f"process serving this one has stopped accepting: {who}; the connections hashed to it wait however "
            f"long the queue: find out why it is stuck (`cat /proc/PID/stack`, a debugger) or restart it")
    evidence: dict[str, int | float | str | None] = {
        "cookie": member.cookie, "members": len(group), "draining": len(draining),
        "queue": member.queue, "backlog": member.backlog,
        "pids": ",".join(str(p.pid) for p in stuck[:MAX_NAMED]) or None,
    }
    return Finding(FindingId.REUSEPORT_STALLED, text, evidence)
