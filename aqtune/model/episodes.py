"""Drop episodes: drops of one listener gathered into one journal entry per window.

A flood drops thousands of SYNs a second; the journal gets one entry per listener per window with
the count (the rate limit on entries is the journal's, in act/report.py). Pure: the caller supplies
time and figures.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

SUSTAINED_WINDOWS = 3  # consecutive windows with drops before an episode is logged as an error


@dataclass(slots=True)
class Episode:
    key: tuple[str, int]  # (netns, socket cookie)
    started: float
    drops: int = 0
    peak_queue: int = 0
    backlog: int = 0
    last_drop: float = 0.0
    peers: Counter[str] = field(default_factory=Counter)
    windows: int = 1  # consecutive windows this trouble has lasted, this one included


@dataclass(frozen=True, slots=True)
class ClosedEpisode:
    key: tuple[str, int]
    started: float
    seconds: float
    drops: int
    peak_queue: int
    backlog: int
    top_peers: list[tuple[str, int]]
    sustained: bool
    clients: int = 0  # distinct client addresses among the drops, where eBPF saw them


@dataclass(slots=True)
class EpisodeTracker:
    window: float = 5.0
    open: dict[tuple[str, int], Episode] = field(default_factory=dict)
    # (windows, closed at) of each listener's last episode: drops resuming within a window continue it.
    streak: dict[tuple[str, int], tuple[int, float]] = field(default_factory=dict)

    def observe(self, key: tuple[str, int], now: float, drops: int, queue: int, backlog: int,
                peers: list[str] | None = None) -> None:
        """Fold in one sweep's figures for a listener; ``drops`` is the increase since the last sweep."""
        episode = self.open.get(key)
        if drops <= 0:
            if episode is not None:
                episode.peak_queue = max(episode.peak_queue, queue)
            return
        if episode is None:
            windows, closed_at = self.streak.pop(key, (0, 0.0))
            continued = windows and now - closed_at <= self.window
            episode = self.open[key] = Episode(key, now, windows=windows + 1 if continued else 1)
        episode.drops += drops
        episode.peak_queue = max(episode.peak_queue, queue)
        episode.backlog = backlog
        episode.last_drop = now
        episode.peers.update(peers or [])

    def close_due(self, now: float, present: set[tuple[str, int]] | None = None) -> list[ClosedEpisode]:
        """Episodes whose window has ended (or whose listener is gone)."""
        closed = []
        for key, episode in list(self.open.items()):
            gone = present is not None and key not in present
            if now - episode.started < self.window and not gone:
                continue
            del self.open[key]
            if not gone:
                self.streak[key] = (episode.windows, now)
            closed.append(episode)
        for key, (_, closed_at) in list(self.streak.items()):
            if now - closed_at > self.window:
                del self.streak[key]
        return [
            ClosedEpisode(e.key, e.started, max(e.last_drop, now) - e.started, e.drops, e.peak_queue, e.backlog,
                          e.peers.most_common(3), e.windows >= SUSTAINED_WINDOWS, len(e.peers))
            for e in closed
        ]
