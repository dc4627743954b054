"""Prometheus metrics in node_exporter's textfile-collector format, written from the status document.

node_exporter (with --collector.textfile.directory) serves the file with the host's other metrics,
so fleets scrape aqtune where they already scrape the host; no port of aqtune's own to secure.
"""

from __future__ import annotations

from typing import Any

from aqtune.act.state import write_atomically

HELP = {
    "aqtune_listener_queue": ("gauge", "Connections waiting in the accept queue."),
    "aqtune_listener_backlog": ("gauge", "Effective backlog: min(listen() backlog, somaxconn at that call)."),
    "aqtune_listener_fill_ratio": ("gauge", "Accept queue length / effective backlog."),
    "aqtune_listener_drops_total": ("counter", "Socket drop counter (SK_MEMINFO_DROPS): 2 per ACK-stage overflow."),
    "aqtune_listener_enqueued_total": ("counter", "Connections queued since aqtune watched (eBPF)."),
    "aqtune_listener_ack_overflow_total": ("counter", "Handshake ACKs dropped at a full queue (eBPF)."),
    "aqtune_listener_syn_overflow_total": ("counter", "SYNs dropped at a full queue (eBPF, where observable)."),
    "aqtune_listener_synack_retransmits_total": ("counter", "SYN-ACKs resent by the listener (eBPF)."),
    "aqtune_listener_requested_backlog": ("gauge", "Backlog the application passed to listen() (eBPF)."),
    "aqtune_netns_sysctl": ("gauge", "A namespace's accept-queue sysctls."),
    "aqtune_netns_tcpext_total": ("counter", "A namespace's TcpExt listen counters."),
    "aqtune_up": ("gauge", "1 while the daemon writes this file."),
    "aqtune_sweep_duration_seconds": ("gauge", "How long the last sweep took."),
    "aqtune_last_sweep_timestamp_seconds": ("gauge", "When the last sweep ran."),
    "aqtune_ebpf_active": ("gauge", "1 when the eBPF event layer runs."),
    "aqtune_journal_suppressed_total": ("counter", "Drop entries the journal rate limit swallowed."),
}
EVENT_METRICS = {
    "enqueued": "aqtune_listener_enqueued_total",
    "ack_overflow": "aqtune_listener_ack_overflow_total",
    "syn_overflow": "aqtune_listener_syn_overflow_total",
    "synack_retransmits": "aqtune_listener_synack_retransmits_total",
    "requested_backlog": "aqtune_listener_requested_backlog",
}


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: object) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


def render(document: dict[str, Any], suppressed: int) -> str:
    samples: dict[str, list[str]] = {name: [] for name in HELP}

    def add(name: str, labels: str, value: object) -> None:
        samples[name].append(f"{name}{labels} {value}")

    for listener in document["listeners"]:
        units = sorted({p["unit"] for p in listener["processes"] if p["unit"]})
        labels = _labels(netns=listener["netns"], proto=listener["proto"], address=listener["address"],
                         unit=",".join(units))
        add("aqtune_listener_queue", labels, listener["queue"])
        add("aqtune_listener_backlog", labels, listener["backlog"])
        add("aqtune_listener_fill_ratio", labels, listener["fill"])
        if listener["drops"] is not None:
            add("aqtune_listener_drops_total", labels, listener["drops"])
        for key, name in EVENT_METRICS.items():
            value = (listener["events"] or {}).get(key)
            if value is not None:
                add(name, labels, value)
    for ns in document["namespaces"]:
        for sysctl, value in ns["sysctls"].items():
            add("aqtune_netns_sysctl", _labels(netns=ns["name"], sysctl=sysctl), value)
        for counter, value in ns["counters"].items():
            add("aqtune_netns_tcpext_total", _labels(netns=ns["name"], counter=counter), value)
    add("aqtune_up", "", 1)
    add("aqtune_sweep_duration_seconds", "", document["duration_ms"] / 1000)
    add("aqtune_last_sweep_timestamp_seconds", "", document["taken_at"])
    add("aqtune_ebpf_active", "", int(bool(document["ebpf"]["active"])))
    add("aqtune_journal_suppressed_total", "", suppressed)
    lines = []
    for name, (kind, text) in HELP.items():
        if samples[name]:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples[name]]
    return "\n".join(lines) + "\n"


def write(path: str, document: dict[str, Any], suppressed: int) -> None:
    write_atomically(path, render(document, suppressed))
