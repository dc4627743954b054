"""Command line entry point. Each subcommand imports only what it uses, so `aqtune status` in a
loop does not pay for bcc, pyroute2 or structlog."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from aqtune import __version__


class CommandError(Exception):
    """A failure the operator can act on: printed as one line, exit status 1."""


def _status(args: argparse.Namespace) -> int:
    from aqtune.collect.sweep import sweep
    from aqtune.surfaces import status

    if os.geteuid() != 0:
        raise CommandError("needs root: it enters every network namespace and reads other "
                           "processes' file descriptors; run it with sudo")
    previous: dict[int, int] | None = None
    while True:
        try:
            snapshot = sweep(args.netns)
        except LookupError as exc:
            raise CommandError(str(exc.args[0])) from None
        except PermissionError as exc:
            raise CommandError(f"{exc}; run it as root") from None
        if args.json:
            print(json.dumps(status.snapshot_json(snapshot), separators=(",", ":") if args.watch else None,
                             indent=None if args.watch else 2), flush=True)
        else:
            text = status.render(snapshot, previous)
            # Home + clear-to-end repaints in place without the flicker of a full clear.
            print(("\x1b[H\x1b[J" if args.watch else "") + text, flush=True)
        if not args.watch:
            return 0
        previous = {l.cookie: l.drops for l in snapshot.listeners if l.drops is not None}
        time.sleep(args.interval)


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aqtune", description="Watch accept queues and listen drops.")
    parser.add_argument("--version", action="version", version=f"aqtune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = commands.add_parser("status", help="show every listener's accept queue, worst first")
    status.add_argument("--json", action="store_true", help="print one JSON document (one per line with --watch)")
    status.add_argument("--netns", default="all", metavar="NAME",
                        help="a name under /run/netns, 'host', 'pid:N' or 'all' (default)")
    status.add_argument("--watch", action="store_true", help="refresh until interrupted")
    status.add_argument("--interval", type=_positive_float, default=2.0, metavar="SECONDS",
                        help="refresh period for --watch (default 2)")
    status.set_defaults(handler=_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except CommandError as exc:
        print(f"aqtune {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # `aqtune status | head` closes the pipe early; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
