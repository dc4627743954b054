"""Structured log events through structlog: native journald entries under systemd, readable lines
on a terminal. Every warning and error carries a MESSAGE_ID (the type of EventLog's methods makes
mypy check it), described in the journal catalog (packaging/aqtune.catalog)."""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

import structlog

from aqtune.act.journal import Journal, JournalLoggerFactory, JournalRenderer
from aqtune.messages import MESSAGE_IDS, MessageId
from aqtune.text import cescape

__all__ = ["MESSAGE_IDS", "EventLog", "Field", "MessageId", "configure", "to_journal"]

Field = str | int | float | bool | None


def to_journal(stream: TextIO) -> bool:
    """journald when it is there and nobody watches a terminal; AQTUNE_LOG=console|journal forces."""
    forced = os.environ.get("AQTUNE_LOG")
    if forced in ("console", "journal"):
        return forced == "journal"
    return not stream.isatty() and Journal().available()


def _escape_for_console(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    # A terminal interprets escape sequences: names chosen by local users are shown escaped.
    return {k: cescape(v) if isinstance(v, str) else v for k, v in event.items()}


class EventLog:
    """The daemon's logger: one method per level, the text first, fields as keywords."""

    def __init__(self, bound: Any, journal: Journal | None = None) -> None:
        self._log = bound
        self.journal = journal

    @property
    def refused(self) -> int:
        """Journal entries journald did not take."""
        return self.journal.refused if self.journal is not None else 0

    def info(self, text: str, message_id: MessageId | None = None, **fields: Field) -> None:
        self._log.info(text, message_id=message_id, **fields)

    def warning(self, text: str, message_id: MessageId, **fields: Field) -> None:
        self._log.warning(text, message_id=message_id, **fields)

    def error(self, text: str, message_id: MessageId, **fields: Field) -> None:
        self._log.error(text, message_id=message_id, **fields)


def _drop_none(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if v is not None}


def configure(stream: TextIO = sys.stderr) -> EventLog:
    processors: list[Any] = [structlog.processors.add_log_level, _drop_none]
    journal = None
    if to_journal(stream):
        journal = Journal()
        processors.append(JournalRenderer())
        factory: Any = JournalLoggerFactory(journal)
    else:
        processors += [_escape_for_console, structlog.processors.TimeStamper(fmt="iso", utc=False),
                       structlog.dev.ConsoleRenderer(colors=stream.isatty(), sort_keys=False)]
        factory = structlog.PrintLoggerFactory(stream)
    structlog.configure(processors=processors, logger_factory=factory, cache_logger_on_first_use=False)
    return EventLog(structlog.get_logger("aqtune"), journal)
