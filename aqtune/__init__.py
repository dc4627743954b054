"""aqtune: keeps accept queues from silently dropping connections."""

__version__ = "0.1.0"
