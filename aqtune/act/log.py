"""Structured log events through structlog: native journald entries under systemd, readable lines
on a terminal. Every kind of event an operator may want to find or alert on has a MESSAGE_ID,
described in the journal catalog (packaging/aqtune.catalog)."""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

import structlog

from aqtune.act.journal import Journal, JournalRenderer

MESSAGE_IDS = {
    "drops": "d146ae63c10b45aab745fa44f5ab820e",
    "recommendation": "2a3a9ee93ea94e0690551308cc44d593",
    "sysctl-change": "3e20d95d691c4f76bc246238768a260c",
    "rollback": "93e848e2522947daa9a8f03fa3390b61",
    "degraded": "2e83ae8f7ce24a85b9ace2fd5f3a16fb",
    "finding": "1d5f56aead9445859e419cd4e873a9da",
    "lifecycle": "2128cf4097d44eeb821982ac5ff362bb",
}


def to_journal(stream: TextIO) -> bool:
    """journald when it is there and nobody watches a terminal; AQTUNE_LOG=console|journal forces."""
    forced = os.environ.get("AQTUNE_LOG")
    if forced in ("console", "journal"):
        return forced == "journal"
    return not stream.isatty() and Journal().available()


def configure(stream: TextIO = sys.stderr) -> Any:
    processors: list[Any] = [structlog.processors.add_log_level]
    if to_journal(stream):
        processors.append(JournalRenderer(Journal()))
        factory: Any = structlog.ReturnLoggerFactory()
    else:
        processors += [structlog.processors.TimeStamper(fmt="iso", utc=False),
                       structlog.dev.ConsoleRenderer(colors=stream.isatty(), sort_keys=False)]
        factory = structlog.PrintLoggerFactory(stream)
    structlog.configure(processors=processors, logger_factory=factory, cache_logger_on_first_use=False)
    return structlog.get_logger("aqtune")
