"""Per-listener and per-namespace history across sweeps: what the policy's windows are judged on.

``Model.update`` folds one snapshot in; ``listener_window`` and ``namespace_window`` are pure
functions of a history, so the decisions built on them can be tested with hand-made samples.
Histories are bounded by time and count, and a listener that disappears is forgotten.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from aqtune.records import COUNTERS, Listener, ListenerEvents, Snapshot

MAX_SAMPLES = 4096  # per listener; at 1 s intervals more than an hour of history
ListenerKey = tuple[str, int]  # (netns, socket cookie): cookies are unique per boot


class Sample(NamedTuple):
    """One sweep's figures for one listener. A tuple: a daemon makes one per listener per sweep, and a
    frozen dataclass takes three times as long to make."""

    at: float
    queue: int
    backlog: int
    drops: int | None
    cpu: float | None  # CPU seconds used so far by the owning processes together
    accepts: int | None = None  # accept() calls eBPF counted so far; None without eBPF
    peak: int | None = None  # the longest queue an arrival saw since the previous sweep (eBPF)

    @property
    def fill(self) -> float:
        return self.queue / max(self.backlog, 1)


@dataclass(slots=True)
class ListenerHistory:
    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    saturated: bool = False  # hysteresis state, see listener_window
    since: float | None = None  # when the current saturation began (kept past the history's horizon)
    worst_burst: int = 0  # the largest burst (queued + dropped in one sweep) of the current saturation
    repeated: bool = False  # the last two samples show the same figures (a run: the next equal one replaces the last)


@dataclass(frozen=True, slots=True)
class ListenerWindow:
    """What the last ``sustain`` seconds of one listener show."""

    fill: float
    peak_fill: float
    high_for: float  # seconds the fill has stayed at or above the threshold (0 if below now)
    drops: int | None  # drops during the window; None when the socket reports none
    cpu_share: float | None  # owners' CPU use over the window, in cores; None if unknown
    saturated: bool
    span: float  # seconds of history the window actually covers
    min_fill: float = 0.0  # the lowest fill a sweep saw since trouble began in the window: did it drain?
    peak_queue: int = 0  # the longest queue seen in the window, by sweeps or (where eBPF runs) arrivals
    burst_drops: int | None = None  # the most drops between two sweeps in the window
    accepts: int | None = None  # accept() calls in the window (eBPF)
    since: float | None = None  # when this saturation began
    worst_burst: int = 0  # the largest burst (queued + dropped in one sweep) since the saturation began

    peak_accept_rate: float | None = None  # accepts/s of the busiest sweep interval in the window (eBPF)

    @property
    def accept_rate(self) -> float | None:
        return self.accepts / self.span if self.accepts is not None and self.span > 0 else None

    @property
    def onset(self) -> float | None:
        """When the saturation judged here began, for the model to keep."""
        return self.since


def listener_window(samples: deque[Sample] | list[Sample], was_saturated: bool, fill_ratio: float,
                    clear_ratio: float, sustain: float, since: float | None = None,
                    worst_burst: int = 0) -> ListenerWindow:
    """Judge a listener's recent samples (oldest first, at least one).

    Saturated once the fill has stayed >= fill_ratio for ``sustain`` seconds or drops occurred in
    the window; it stays saturated until the fill falls below ``clear_ratio`` with no drops, so a
    queue hovering around the threshold does not flap.
    """
    last = samples[-1]
    start = last.at - sustain
    window = [s for s in samples if s.at >= start] or [last]
    # The sample just before the window is the baseline for counters, so a window of one sample
    # still sees what happened since the previous sweep.
    before = [s for s in samples if s.at < start]
    base = before[-1] if before else window[0]
    high_since = None
    for sample in reversed(samples):
        if sample.fill < fill_ratio:
            break
        high_since = sample.at
    high_for = 0.0 if high_since is None else last.at - high_since
    drops = None
    if last.drops is not None and base.drops is not None:
        drops = max(last.drops - base.drops, 0)
    # CPU over the time the queue has been high, not the whole window: a window that began before the
    # load would average an idle start into a busy server and call it stalled.
    cpu_base = next((s for s in samples if s.at >= high_since), base) if high_since is not None else base
    if cpu_base is last or cpu_base.cpu is None:
        cpu_base = base
    cpu_share = None
    elapsed = last.at - cpu_base.at
    if last.cpu is not None and cpu_base.cpu is not None and elapsed > 0:
        cpu_share = max(last.cpu - cpu_base.cpu, 0.0) / elapsed
    sustained = high_since is not None and high_for >= sustain
    still_high = last.fill >= clear_ratio if was_saturated else sustained
    saturated = still_high or bool(drops)
    burst_drops = None
    if drops is not None:
        steps = [b.drops - a.drops for a, b in zip([base, *window], window, strict=False)
                 if a.drops is not None and b.drops is not None]
        burst_drops = max([0, *steps])
    accepts = None
    if last.accepts is not None and base.accepts is not None:
        accepts = max(last.accepts - base.accepts, 0)
    # How fast the workers can drain: the busiest interval, not the average (bursty arrivals leave
    # them idle between bursts, which says nothing of what they can do).
    rates = [(b.accepts - a.accepts) / (b.at - a.at) for a, b in zip([base, *window], window, strict=False)
             if a.accepts is not None and b.accepts is not None and b.at > a.at and b.accepts >= a.accepts]
    peak_accept_rate = max(rates) if rates else None
    onset = None
    if saturated:
        first_drop = next((b.at for a, b in zip([base, *window], window, strict=False)
                           if a.drops is not None and b.drops is not None and b.drops > a.drops), None)
        starts = [t for t in (high_since, first_drop) if t is not None]
        onset = since if was_saturated and since is not None else (min(starts) if starts else last.at)
    # Did the queue drain? Only what follows the first sign of trouble in the window counts: a queue
    # that rose from empty and stayed full has not drained.
    trouble = next((i for i, (a, b) in enumerate(zip([base, *window], window, strict=False))
                    if b.fill >= fill_ratio or (a.drops is not None and b.drops is not None and b.drops > a.drops)),
                   len(window) - 1)
    peak_queue = max(max(s.queue for s in window), max((s.peak or 0) for s in window))
    # The number recommended is sized for the worst burst of the whole saturation, not of this window
    # alone, so it does not wobble from sweep to sweep.
    burst = peak_queue + (burst_drops or 0)
    return ListenerWindow(
        fill=last.fill, peak_fill=max(s.fill for s in window), high_for=high_for, drops=drops,
        cpu_share=cpu_share, saturated=saturated, span=last.at - base.at,
        min_fill=min(s.fill for s in window[trouble:]), peak_queue=peak_queue,
        burst_drops=burst_drops, accepts=accepts, since=onset, peak_accept_rate=peak_accept_rate,
        worst_burst=max(burst, worst_burst if was_saturated else 0) if saturated else 0,
    )


@dataclass(frozen=True, slots=True)
class CounterSample:
    at: float
    counters: dict[str, int]


def counter_deltas(samples: deque[CounterSample] | list[CounterSample], window: float) -> dict[str, int]:
    """Increase of each namespace counter over the last ``window`` seconds (since the previous
    sample when the window is shorter than one interval)."""
    last = samples[-1]
    before = [s for s in samples if s.at < last.at - window]
    base = before[-1] if before else samples[0]
    return {name: max(last.counters.get(name, 0) - base.counters.get(name, 0), 0) for name in COUNTERS}


@dataclass(slots=True)
class Model:
    listeners: dict[ListenerKey, ListenerHistory] = field(default_factory=dict)
    namespaces: dict[str, deque[CounterSample]] = field(default_factory=dict)

    def update(self, snapshot: Snapshot, cpu_seconds: dict[int, float],
               events: Mapping[int, ListenerEvents] | None = None) -> None:
        """Fold in one sweep; ``cpu_seconds`` maps owner pids to their CPU time so far, ``events``
        socket inodes to what eBPF saw."""
        seen: set[ListenerKey] = set()
        found = events or {}
        at = snapshot.taken_at
        histories = self.listeners
        for listener in snapshot.listeners:
            key = (listener.netns, listener.cookie)
            seen.add(key)
            history = histories.get(key)
            samples = history.samples if history is not None else None
            # A new backlog means the listener called listen() again: what it suffered before
            # (drops, a full queue) says nothing about the new queue, so its history restarts.
            if history is None or samples is None or (samples and samples[-1].backlog != listener.backlog):
                history = histories[key] = ListenerHistory()
                samples = history.samples
            watched = found.get(listener.inode)
            accepts, peak = (watched.accepts, watched.peak_queue) if watched is not None else (None, None)
            sample = Sample(at, listener.queue, listener.backlog, listener.drops,
                            _owners_cpu(listener, cpu_seconds), accepts, peak)
            # A run of identical samples keeps its first and its latest: the windows see the same
            # thing, and a quiet listener costs two samples, not one per sweep.
            if history.repeated and _same(samples[-1], sample):
                samples[-1] = sample
            else:
                history.repeated = len(samples) >= 1 and _same(samples[-1], sample)
                samples.append(sample)
        for key in self.listeners.keys() - seen:
            del self.listeners[key]
        present = set()
        for namespace in snapshot.namespaces:
            if namespace.error and not namespace.counters:
                continue
            present.add(namespace.name)
            counters = self.namespaces.setdefault(namespace.name, deque(maxlen=MAX_SAMPLES))
            counted = CounterSample(snapshot.taken_at, dict(namespace.counters))
            # As for listeners: a quiet namespace (or one a sweep did not reach, standing in with its
            # last figures) costs two samples, not one per sweep.
            if len(counters) >= 2 and counters[-1].counters == counted.counters == counters[-2].counters:
                counters[-1] = counted
            else:
                counters.append(counted)
        for name in self.namespaces.keys() - present:
            del self.namespaces[name]

    def observe(self, snapshot: Snapshot, cpu_seconds: dict[int, float], keep: float,
                events: Mapping[int, ListenerEvents] | None = None) -> None:
        """Fold in one sweep and forget what is older than ``keep`` seconds before it."""
        self.update(snapshot, cpu_seconds, events)
        self.forget_before(snapshot.taken_at - keep)

    def settle(self, judged: Mapping[ListenerKey, ListenerWindow]) -> None:
        """Keep each listener's judgement (saturated or not, since when, its worst burst) as the state
        its next window starts from."""
        for key, window in judged.items():
            history = self.listeners.get(key)
            if history is not None:
                history.saturated = window.saturated
                history.since = window.since if window.saturated else None
                history.worst_burst = window.worst_burst

    def forget_before(self, cutoff: float) -> None:
        """Drop samples older than ``cutoff`` (keeping the newest), bounding memory by time."""
        for history in self.listeners.values():
            samples = history.samples
            if len(samples) > 2 and samples[1].at < cutoff:  # most have nothing to drop: no call for them
                _trim(samples, cutoff)
        for counted in self.namespaces.values():
            _trim(counted, cutoff)


def _trim(samples: deque[Sample] | deque[CounterSample], cutoff: float) -> None:
    # Keep one sample older than the cutoff: it is the baseline for the oldest window.
    while len(samples) > 2 and samples[1].at < cutoff:
        samples.popleft()


def _same(a: Sample, b: Sample) -> bool:
    return (a.queue == b.queue and a.backlog == b.backlog and a.drops == b.drops and a.accepts == b.accepts
            and a.peak == b.peak)


def _owners_cpu(listener: Listener, cpu_seconds: dict[int, float]) -> float | None:
    """The CPU seconds of all the listener's owners together; None when any is unknown."""
    if not listener.processes or not cpu_seconds:
        return None
    total = 0.0
    for process in listener.processes:
        used = cpu_seconds.get(process.pid)
        if used is None:
            return None
        total += used
    return total
