"""Saying things at a human pace: "again only after N seconds", and per-minute budgets.

A condition that lasts (a saturated listener, a read-only state directory, a recommendation nobody
applies) is seen every sweep; the journal should hear of it once, then now and then, and again at
once when what it says changes. One type does that for every kind of message, and one budget type
keeps any single source (a listener, a local user) from taking the journal for itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
PRUNE_AT = 4096  # keys a Throttle holds before it forgets the ones whose time has passed


@dataclass(slots=True)
class Throttle(Generic[K]):
    """Remembers when each key was last said, and with which value."""

    every: float  # seconds before the same thing is said again
    said: dict[K, tuple[float, object]] = field(default_factory=dict)

    def due(self, key: K, now: float, value: object = None) -> bool:
        """True (and remembered as said) when ``key`` was never said, its value changed, or ``every``
        has passed since."""
        last = self.said.get(key)
        if last is not None and last[1] == value and now - last[0] < self.every:
            return False
        if last is None and len(self.said) >= PRUNE_AT:
            self.prune(now)
        self.said[key] = (now, value)
        return True

    def prune(self, now: float) -> None:
        """Forget keys said ``every`` ago or longer: ``due`` and ``holds`` treat them as never said, and
        keys come from what users create (namespace names), so they must not pile up."""
        for key in [key for key, (at, _) in self.said.items() if now - at >= self.every]:
            del self.said[key]

    def due_if_grown(self, key: K, now: float, value: int) -> bool:
        """As ``due``, but a smaller value than the one last said is not news: a recommendation that
        asked for more a moment ago still stands."""
        last = self.said.get(key)
        if last is not None and isinstance(last[1], int) and value < last[1] and now - last[0] < self.every:
            return False
        return self.due(key, now, value)

    def holds(self, key: K, now: float) -> bool:
        """True while ``key`` was said less than ``every`` ago (without saying it)."""
        last = self.said.get(key)
        return last is not None and now - last[0] < self.every

    def forget(self, key: K) -> None:
        self.said.pop(key, None)

    def keys(self) -> set[K]:
        return set(self.said)

    def __bool__(self) -> bool:
        return bool(self.said)


@dataclass(slots=True)
class Budget(Generic[K]):
    """At most ``per_minute`` entries a minute overall, ``per_source`` for any one source (a local
    user, a listener): a flood from one cannot starve the entries of another."""

    per_minute: int
    per_source: int
    sent: deque[float] = field(default_factory=deque)
    by_source: dict[K, deque[float]] = field(default_factory=dict)
    refused: int = 0  # cumulative

    def allow(self, sources: Iterable[K], now: float) -> bool:
        """Take one entry for ``sources`` (every one of them must have budget left), or refuse it."""
        _expire(self.sent, now)
        keys = list(sources)
        queues = []
        for key in keys:
            queue = self.by_source.get(key)
            if queue is not None:
                _expire(queue, now)
                if not queue:
                    del self.by_source[key]
                    queue = None
            queues.append(queue)
        if len(self.sent) >= self.per_minute or any(q is not None and len(q) >= self.per_source for q in queues):
            self.refused += 1
            return False
        self.sent.append(now)
        for key, queue in zip(keys, queues, strict=True):
            (queue if queue is not None else self.by_source.setdefault(key, deque())).append(now)
        if len(self.by_source) > self.per_minute:
            # At most per_minute sources can have an entry in the last minute; the rest are spent
            # (listeners long gone), and would otherwise stay forever.
            for key in [key for key, queue in self.by_source.items() if not queue or now - queue[-1] >= 60.0]:
                del self.by_source[key]
        return True


def _expire(times: deque[float], now: float) -> None:
    while times and now - times[0] >= 60.0:
        times.popleft()
