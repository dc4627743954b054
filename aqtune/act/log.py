"""Structured log events through structlog; rendered as key=value lines on stderr for now."""

from __future__ import annotations

import sys
from typing import Any, TextIO

import structlog


def configure(stream: TextIO = sys.stderr) -> Any:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=False),
            structlog.dev.ConsoleRenderer(colors=False, sort_keys=False),
        ],
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger("aqtune")
