"""Prometheus metrics in node_exporter's textfile-collector format, rendered from a sweep's records.

node_exporter (with --collector.textfile.directory) serves the file with the host's other metrics,
so fleets scrape aqtune where they already scrape the host; no port of aqtune's own to secure.

Names follow node_exporter's conventions: one metric per kernel counter and per sysctl (a sum over
a ``counter=`` label would add unlike things), base units (seconds, ratios), ``_total`` on counters
only. Every listener's series carry ``socket``, the socket cookie: SO_REUSEPORT siblings and a Unix
path bound again while the old socket still listens share every other label, and node_exporter drops
duplicate series with an error on every scrape. Any local user sets how many listeners and
namespaces there are and what they are called, so the series are capped (the worst kept, the rest
counted in ``*_omitted``) and every label value is escaped and clipped.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from aqtune.act.state import write_atomically
from aqtune.records import Listener, ListenerEvents, Namespace, Process, Snapshot

# Listeners whose series are written, the worst first: with eBPF, 13 series each, 2,000 listeners make
# up to ~5 MB for node_exporter to parse every scrape, and more than 2,000 listeners worth a look at
# once is rare.
MAX_LISTENERS = 2_000
# Namespaces whose series are written; any user can make thousands (`unshare -rn`).
MAX_NAMESPACES = 500
# Characters a label value keeps: addresses, unit and namespace names are chosen by local users.
MAX_LABEL = 128
_DIGEST_BYTES = 4  # of the hash that keeps clipped values apart: 8 hex digits


@dataclass(frozen=True, slots=True)
class DaemonFigures:
    """What the daemon knows about itself, beside the sweep."""

    sweep_seconds: float
    last_sweep: float  # time.time() of the sweep
    ebpf_active: bool
    journal_suppressed: int  # entries the rate limit swallowed, cumulative
    journal_refused: int  # entries journald refused or that could not be sent, cumulative


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    kind: str  # "gauge" or "counter"; only counters end in _total
    help: str


Value = int | float | None

# Per listener. Labels: netns, proto, address, socket (the cookie), unit.
LISTENER_METRICS: tuple[tuple[Family, Callable[[Listener], Value]], ...] = (
    (Family("aqtune_listener_queue", "gauge", "Connections waiting in the accept queue."), lambda l: l.queue),
    (Family("aqtune_listener_backlog", "gauge", "Effective backlog: min(listen() backlog, somaxconn at that call)."),
     lambda l: l.backlog),
    (Family("aqtune_listener_fill_ratio", "gauge", "Accept queue length / effective backlog (above 1 when full)."),
     lambda l: l.fill),
    (Family("aqtune_listener_drops_total", "counter",
            "Socket drop counter (SK_MEMINFO_DROPS): 1 per SYN-stage, 2 per ACK-stage overflow."), lambda l: l.drops),
)
# Per listener, where eBPF runs; counted since aqtune began watching the listener.
EVENT_METRICS: tuple[tuple[Family, Callable[[ListenerEvents], Value]], ...] = (
    (Family("aqtune_listener_enqueued_total", "counter", "Connections queued (eBPF)."), lambda e: e.enqueued),
    (Family("aqtune_listener_accepts_total", "counter", "Connections accept() took from the queue (eBPF)."),
     lambda e: e.accepts),
    (Family("aqtune_listener_ack_overflows_total", "counter", "Handshake ACKs dropped at a full queue (eBPF)."),
     lambda e: e.ack_overflow),
    (Family("aqtune_listener_syn_overflows_total", "counter",
            "SYNs dropped at a full queue (eBPF, where a probe can see them)."), lambda e: e.syn_overflow),
    (Family("aqtune_listener_synack_retransmits_total", "counter", "SYN-ACKs the listener resent (eBPF)."),
     lambda e: e.synack_retransmits),
    (Family("aqtune_listener_peak_queue", "gauge",
            "Longest queue an arriving connection found since the previous sweep (eBPF)."), lambda e: e.peak_queue),
    (Family("aqtune_listener_requested_backlog", "gauge", "Backlog the application passed to listen() (eBPF)."),
     lambda e: e.requested_backlog),
)
# A listener eBPF watches but has seen no connection on: its counters are 0, and written as 0 so that
# Prometheus's increase() counts the first connections too.
NO_EVENTS = ListenerEvents(enqueued=0, peak_queue=None, ack_overflow=0, syn_overflow=None, synack_retransmits=0,
                           accepts=0, queue_wait_ms=None, requested_backlog=None)
QUEUE_WAIT = Family("aqtune_listener_queue_wait_seconds", "gauge",
                    "Enqueue-to-accept time, upper bound of the log2 bucket holding the quantile (eBPF).")
QUANTILES = (("p50", "0.5"), ("p99", "0.99"))  # ListenerEvents.queue_wait_ms key -> quantile label
OLDEST_QUEUED = Family("aqtune_listener_oldest_queued_seconds", "gauge",
                       "Age of the oldest connection still waiting in the accept queue (eBPF); 0 when empty.")

# Per namespace (label: netns), one metric per sysctl and per TcpExt counter of records.SYSCTLS/COUNTERS.
SYSCTL_METRICS: dict[str, Family] = {
    "net.core.somaxconn": Family("aqtune_netns_somaxconn", "gauge",
                                 "net.core.somaxconn: the cap on listen() backlogs."),
    "net.ipv4.tcp_max_syn_backlog": Family("aqtune_netns_tcp_max_syn_backlog", "gauge",
                                           "net.ipv4.tcp_max_syn_backlog: the SYN queue's limit."),
    "net.ipv4.tcp_syncookies": Family("aqtune_netns_tcp_syncookies", "gauge",
                                      "net.ipv4.tcp_syncookies: 0 off, 1 when the SYN queue overflows, 2 always."),
    "net.ipv4.tcp_abort_on_overflow": Family("aqtune_netns_tcp_abort_on_overflow", "gauge",
                                             "net.ipv4.tcp_abort_on_overflow: 1 resets connections a full queue "
                                             "refuses."),
}
COUNTER_METRICS: dict[str, Family] = {
    "ListenOverflows": Family("aqtune_netns_listen_overflows_total", "counter",
                              "TcpExt ListenOverflows: SYNs and handshake ACKs refused at a full accept queue."),
    "ListenDrops": Family("aqtune_netns_listen_drops_total", "counter",
                          "TcpExt ListenDrops: SYNs and handshake ACKs listeners dropped, overflows included."),
    "TCPReqQFullDrop": Family("aqtune_netns_reqq_full_drop_total", "counter",
                              "TcpExt TCPReqQFullDrop: SYNs dropped at a full SYN queue, syncookies off."),
    "TCPReqQFullDoCookies": Family("aqtune_netns_reqq_full_do_cookies_total", "counter",
                                   "TcpExt TCPReqQFullDoCookies: SYNs answered with a syncookie at a full SYN queue."),
    "SyncookiesSent": Family("aqtune_netns_syncookies_sent_total", "counter", "TcpExt SyncookiesSent."),
    "SyncookiesFailed": Family("aqtune_netns_syncookies_failed_total", "counter",
                               "TcpExt SyncookiesFailed: ACKs whose syncookie did not check out."),
    "TCPSynRetrans": Family("aqtune_netns_syn_retransmits_total", "counter",
                            "TcpExt TCPSynRetrans: SYNs and SYN-ACKs retransmitted."),
}
NAMESPACE_METRICS: tuple[tuple[Family, Callable[[Namespace], Value]], ...] = (
    (Family("aqtune_netns_listeners", "gauge", "Listeners the sweep found in the namespace."), lambda n: n.listeners),
    (Family("aqtune_netns_read_error", "gauge",
            "1 when part or all of the namespace could not be read (`aqtune status` says why)."),
     lambda n: n.error is not None),
)

# aqtune's own. The last sweep's timestamp is the liveness signal: node_exporter keeps serving the
# file after aqtune stops, so a constant "up" gauge would say 1 for a dead daemon.
DAEMON_METRICS: tuple[tuple[Family, Callable[[DaemonFigures], Value]], ...] = (
    (Family("aqtune_last_sweep_timestamp_seconds", "gauge", "When the sweep these figures come from ran (Unix time)."),
     lambda f: f.last_sweep),
    (Family("aqtune_sweep_duration_seconds", "gauge", "How long that sweep took."), lambda f: f.sweep_seconds),
    (Family("aqtune_ebpf_active", "gauge", "1 when the eBPF event layer runs."), lambda f: f.ebpf_active),
    (Family("aqtune_journal_suppressed_total", "counter", "Journal entries the rate limit swallowed."),
     lambda f: f.journal_suppressed),
    (Family("aqtune_journal_refused_total", "counter", "Journal entries journald refused or that could not be sent."),
     lambda f: f.journal_refused),
)
LISTENERS = Family("aqtune_listeners", "gauge", "Listeners the sweep found.")
LISTENERS_OMITTED = Family("aqtune_listeners_omitted", "gauge",
                           "Listeners left out of this file by its cap (the least full ones).")
NAMESPACES = Family("aqtune_namespaces", "gauge", "Network namespaces the sweep found.")
NAMESPACES_OMITTED = Family("aqtune_namespaces_omitted", "gauge",
                            "Namespaces left out of this file by its cap (those with the fewest drops).")

# Listeners' families come first in the file: their block can be kept whole from one render to the next.
LISTENER_FAMILIES: tuple[Family, ...] = (
    *(family for family, _ in LISTENER_METRICS), *(family for family, _ in EVENT_METRICS), QUEUE_WAIT, OLDEST_QUEUED)
FAMILIES: tuple[Family, ...] = (
    *LISTENER_FAMILIES, *SYSCTL_METRICS.values(), *COUNTER_METRICS.values(),
    *(family for family, _ in NAMESPACE_METRICS),
    *(family for family, _ in DAEMON_METRICS), LISTENERS, LISTENERS_OMITTED, NAMESPACES, NAMESPACES_OMITTED,
)

# Control characters become C-style text, as systemd's cescape writes them: raw, they would reach a
# terminal that shows a scrape; a newline would also end the sample early.
_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROL.update({ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"})


def label_text(value: str, limit: int = MAX_LABEL) -> str:
    """What a label value shows: printable text of at most ``limit`` characters.

    Clipped values end in a hash of the whole value, so two long values that share a beginning
    still differ.
    """
    text = value.translate(_CONTROL)
    if not text.isascii():
        # Lone surrogates (undecodable file names) cannot be written as UTF-8.
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= limit:
        return text
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=_DIGEST_BYTES).hexdigest()
    return text[:limit - len(digest) - 3] + "..." + digest


def _quoted(text: str) -> str:
    # The exposition format's three escapes; label_text has already removed newlines.
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{name}="{_quoted(label_text(value))}"' for name, value in pairs) + "}"


def _number(value: int | float) -> str:
    if isinstance(value, bool | int):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class _Samples:
    """Sample lines by family, written out in the order of ``families`` with HELP and TYPE."""

    def __init__(self, families: tuple[Family, ...] = FAMILIES) -> None:
        self.families = families
        self.lines: dict[str, list[str]] = {family.name: [] for family in families}

    def add(self, family: Family, labels: str, value: Value) -> None:
        if value is not None:
            self.lines[family.name].append(f"{family.name}{labels} {_number(value)}")

    def extend(self, lines: Iterable[tuple[str, str]]) -> None:
        """Add (family name, sample line) pairs made earlier."""
        for name, line in lines:
            self.lines[name].append(line)

    def text(self) -> str:
        out = []
        for family in self.families:
            if self.lines[family.name]:
                out += [f"# HELP {family.name} {family.help}", f"# TYPE {family.name} {family.kind}",
                        *self.lines[family.name]]
        return "\n".join(out) + "\n" if out else ""


# What a listener's series are made of: the rows below decide every label and value it writes.
_LineKey = tuple[str, str, str, int, int, int, int | None, tuple[Process, ...], ListenerEvents | None]


class LineCache:
    """Each listener's sample lines from the last render, by socket cookie.

    A quiet listener writes the same lines sweep after sweep, and escaping its labels and formatting
    its values was most of what a quiet sweep cost the daemon; they are made again only when one of
    the figures or names behind them changed. Holds the listeners of the last render only.
    """

    def __init__(self) -> None:
        self.entries: dict[int, tuple[_LineKey, list[tuple[str, str]]]] = {}
        # The listeners' block of the last render, and the line lists it was made of, in order: equal
        # lists make the same block (kept lists compare by identity first, so this costs little).
        self.block: tuple[tuple[list[tuple[str, str]], ...], str] = ((), "")
        self.counted = (0, 0)  # listeners written and left out by the last render

    def lines(self, listener: Listener, events: ListenerEvents | None) -> list[tuple[str, str]]:
        key: _LineKey = (listener.netns, listener.proto, listener.address, listener.cookie, listener.queue,
                         listener.backlog, listener.drops, listener.processes, events)
        cached = self.entries.get(listener.cookie)
        if cached is not None and cached[0] == key:
            return cached[1]
        made = _listener_lines(listener, events)
        self.entries[listener.cookie] = (key, made)
        return made

    def keep_only(self, cookies: set[int]) -> None:
        if len(self.entries) > len(cookies):
            self.entries = {cookie: entry for cookie, entry in self.entries.items() if cookie in cookies}

    def listeners_block(self, listeners: list[Listener], events: Mapping[int, ListenerEvents],
                        unseen: ListenerEvents | None) -> str:
        """The listener families' part of the file for ``listeners``, in this order."""
        made = tuple(self.lines(listener, events.get(listener.inode, unseen)) for listener in listeners)
        self.keep_only({listener.cookie for listener in listeners})
        if made == self.block[0]:
            return self.block[1]
        samples = _Samples(LISTENER_FAMILIES)
        for lines in made:
            samples.extend(lines)
        self.block = (made, samples.text())
        return self.block[1]


def worst_listeners(listeners: Iterable[Listener], limit: int) -> tuple[list[Listener], int]:
    """The ``limit`` fullest listeners (then most drops), each socket once, and how many were left out."""
    unique = list({listener.cookie: listener for listener in listeners}.values())
    kept = heapq.nsmallest(max(limit, 0), unique,
                           key=lambda l: (-l.fill, -(l.drops or 0), l.netns, l.address, l.cookie))
    return kept, len(unique) - len(kept)


def worst_namespaces(namespaces: Iterable[Namespace], limit: int) -> tuple[list[Namespace], int]:
    """The host and the namespaces with the most drops, ``limit`` in all, and how many were left out."""
    unique = list({namespace.inode: namespace for namespace in namespaces}.values())
    kept = heapq.nsmallest(max(limit, 0), unique, key=lambda n: (
        n.name != "host", -n.counters.get("ListenDrops", 0), -n.counters.get("ListenOverflows", 0), n.name, n.inode))
    return kept, len(unique) - len(kept)


def _units(listener: Listener) -> str:
    return ",".join(sorted({process.unit for process in listener.processes if process.unit}))


def _listener_lines(listener: Listener, events: ListenerEvents | None) -> list[tuple[str, str]]:
    """(family name, sample line) for each of one listener's series."""
    lines: list[tuple[str, str]] = []

    def add(family: Family, labels: str, value: Value) -> None:
        if value is not None:
            lines.append((family.name, f"{family.name}{labels} {_number(value)}"))

    pairs = [("netns", listener.netns), ("proto", listener.proto), ("address", listener.address),
             ("socket", str(listener.cookie)), ("unit", _units(listener))]
    labels = _labels(pairs)
    for family, value in LISTENER_METRICS:
        add(family, labels, value(listener))
    if events is None:
        return lines
    for family, seen in EVENT_METRICS:
        add(family, labels, seen(events))
    waits = events.queue_wait_ms or {}
    for key, quantile in QUANTILES:
        if waits.get(key) is not None:
            add(QUEUE_WAIT, _labels([*pairs, ("quantile", quantile)]), waits[key] / 1000)
    if events.oldest_queued_ms is not None:
        add(OLDEST_QUEUED, labels, events.oldest_queued_ms / 1000)
    return lines


def _namespace_samples(samples: _Samples, namespace: Namespace, name: str) -> None:
    labels = _labels([("netns", name)])
    for sysctl, value in namespace.sysctls.items():
        if sysctl in SYSCTL_METRICS:
            samples.add(SYSCTL_METRICS[sysctl], labels, value)
    for counter, value in namespace.counters.items():
        if counter in COUNTER_METRICS:
            samples.add(COUNTER_METRICS[counter], labels, value)
    for family, figure in NAMESPACE_METRICS:
        samples.add(family, labels, figure(namespace))


def _netns_names(namespaces: list[Namespace]) -> list[str]:
    """Namespace label values, unique even where clipping or a root-chosen name ("host") would repeat one."""
    names, shown = [], set()
    for namespace in namespaces:
        name = namespace.name
        if label_text(name) in shown:
            name = label_text(name, MAX_LABEL - 24) + f" net:[{namespace.inode}]"
        shown.add(label_text(name))
        names.append(name)
    return names


def render(snapshot: Snapshot, events: Mapping[int, ListenerEvents], figures: DaemonFigures,
           max_listeners: int = MAX_LISTENERS, max_namespaces: int = MAX_NAMESPACES,
           cache: LineCache | None = None, listeners_unchanged: bool = False) -> str:
    """The textfile for one sweep; ``events`` maps socket inodes to what eBPF saw (empty without it).

    At most ``max_listeners`` listeners' and ``max_namespaces`` namespaces' series are written.
    ``cache`` keeps listeners' lines from one render to the next (the daemon's); with
    ``listeners_unchanged`` (the caller knows every listener's figures, owners and eBPF counts are
    those of the last render, with the same caps) its listeners' block is written as it is.
    """
    lines = cache or LineCache()
    if listeners_unchanged and cache is not None and cache.block[0]:
        block, (shown, listeners_omitted) = cache.block[1], cache.counted
    else:
        listeners, listeners_omitted = worst_listeners(snapshot.listeners, max_listeners)
        block = lines.listeners_block(listeners, events, NO_EVENTS if figures.ebpf_active else None)
        shown = len(listeners)
        lines.counted = (shown, listeners_omitted)
    samples = _Samples(FAMILIES[len(LISTENER_FAMILIES):])
    namespaces, namespaces_omitted = worst_namespaces(snapshot.namespaces, max_namespaces)
    for namespace, name in zip(namespaces, _netns_names(namespaces), strict=True):
        _namespace_samples(samples, namespace, name)
    for family, figure in DAEMON_METRICS:
        samples.add(family, "", figure(figures))
    samples.add(LISTENERS, "", shown + listeners_omitted)
    samples.add(LISTENERS_OMITTED, "", listeners_omitted)
    samples.add(NAMESPACES, "", len(namespaces) + namespaces_omitted)
    samples.add(NAMESPACES_OMITTED, "", namespaces_omitted)
    return block + samples.text()


def write(path: str, snapshot: Snapshot, events: Mapping[int, ListenerEvents], figures: DaemonFigures,
          max_listeners: int = MAX_LISTENERS, max_namespaces: int = MAX_NAMESPACES,
          cache: LineCache | None = None, listeners_unchanged: bool = False) -> None:
    """Replace the file at ``path`` atomically: node_exporter never reads half of one."""
    write_atomically(path, render(snapshot, events, figures, max_listeners, max_namespaces, cache,
                                  listeners_unchanged))
