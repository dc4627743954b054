"""Drop episodes: drops of one listener gathered into one journal entry per window, and a rate limit.

A flood drops thousands of SYNs a second; the journal gets one entry per listener per window with
the count, and at most ``per_minute`` entries a minute overall, the rest counted as suppressed and
reported with the next entry that gets through. Pure: the caller supplies time and figures.
"""

from __future__ import annotations

from collections import Counter, deque
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
    suppressed: int  # entries the rate limit swallowed since the last one that got through


@dataclass(slots=True)
class EpisodeTracker:
    window: float = 5.0
    per_minute: int = 30
    open: dict[tuple[str, int], Episode] = field(default_factory=dict)
    # (windows, closed at) of each listener's last episode: drops resuming within a window continue it.
    streak: dict[tuple[str, int], tuple[int, float]] = field(default_factory=dict)
    sent: deque[float] = field(default_factory=deque)
    suppressed: int = 0  # since the last entry that got through
    suppressed_total: int = 0

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
        """Episodes whose window has ended (or whose listener is gone), rate limited."""
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
        return [entry for entry in (self._limit(e, now) for e in closed) if entry is not None]

    def _limit(self, episode: Episode, now: float) -> ClosedEpisode | None:
        while self.sent and now - self.sent[0] >= 60.0:
            self.sent.popleft()
        if len(self.sent) >= self.per_minute:
            self.suppressed += 1
            self.suppressed_total += 1
            return None
        self.sent.append(now)
        suppressed, self.suppressed = self.suppressed, 0
        return ClosedEpisode(
            episode.key, episode.started, max(episode.last_drop, now) - episode.started, episode.drops,
            episode.peak_queue, episode.backlog, episode.peers.most_common(3),
            episode.windows >= SUSTAINED_WINDOWS, suppressed,
        )
