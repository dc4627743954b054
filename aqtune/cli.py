"""Command line entry point. Each subcommand imports only what it uses, so `aqtune status` in a
loop does not pay for bcc or structlog."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from aqtune import __version__
from aqtune.text import cescape, printable

if TYPE_CHECKING:
    from aqtune.act.ledger import Ledger
    from aqtune.collect.fdwalk import BackgroundScan
    from aqtune.decide.policy import Policy, Problem
    from aqtune.surfaces.status import OneShot


DEFAULT_CONFIG = "/etc/aqtune/policy.toml"


class CommandError(Exception):
    """A failure the operator can act on: printed as one line, exit status 1."""


class ConfigError(Exception):
    """An invalid policy: one line per problem, exit status 2."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(problems)
        self.problems = problems


DEFAULT_STATE_DIR = "/var/lib/aqtune"


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise CommandError(f"needs root: {what}; run it with sudo")


def _policy(path: str, required: bool) -> Policy:
    """The policy at ``path``; when not ``required`` a missing default file means the built-in one."""
    from aqtune.decide import policy

    if not required and not os.path.exists(path):
        return policy.Policy()
    try:
        return policy.load(path)
    except policy.PolicyError as exc:
        raise ConfigError(exc.problems) from None


def _ledger(state_dir: str) -> Ledger:
    from aqtune.act.ledger import Ledger, LedgerError

    try:
        return Ledger(state_dir)
    except LedgerError as exc:
        raise CommandError(str(exc)) from None


def _status_document(args: argparse.Namespace, policy: Policy, ledger: Ledger,
                     said: set[str], walk: BackgroundScan | None = None) -> dict[str, Any] | OneShot:
    """The running daemon's state when there is one (it has history and events), else a sweep now."""
    from aqtune.act.state import live_state
    from aqtune.collect.sweep import sweep
    from aqtune.surfaces import status

    try:
        live, distrusted = (None, None) if args.sweep else live_state(args.state_dir)
        if distrusted and distrusted not in said:
            said.add(distrusted)
            print(f"aqtune status: {distrusted}; sweeping instead", file=sys.stderr)
        if live is not None:
            return status.only_namespace(live, _live_selection(live, args.netns))
        snapshot = sweep(args.netns, background=walk)
    except LookupError as exc:
        raise CommandError(str(exc.args[0])) from None
    except PermissionError as exc:
        raise CommandError(f"{exc}; run it as root") from None
    ledger.drop_stale(snapshot.namespaces, save=False)
    return status.OneShot(snapshot, status.one_shot_advice(snapshot, policy, ledger))


def _live_selection(live: dict[str, Any], wanted: str) -> str:
    """`--netns` as the daemon's state names it: by inode, so ``pid:N`` of any process in a namespace
    selects it whatever name the daemon gave it; a name the daemon keeps for a namespace whose
    naming process exited selects it too."""
    from aqtune.collect import netns

    if wanted == "all" or any(ns.get("name") == wanted for ns in live.get("namespaces", [])):
        return wanted
    (ref,) = netns.select_namespaces(netns.list_namespaces(), wanted)
    return str(ref.inode)


def _refresh(ledger: Ledger) -> None:
    """Pick up changes another process made to the ledger (status --watch while the daemon tunes)."""
    from aqtune.act.ledger import LedgerError

    # Said when it was first read; a ledger that turns bad meanwhile only loses the advice.
    with contextlib.suppress(LedgerError):
        ledger.refresh()


def _policy_to_read(args: argparse.Namespace) -> Policy:
    """The policy for a command that only reads (status, connections). The installed policy being
    mid-edit must not blind them (the daemon keeps its last good policy too): they follow the built-in
    defaults then, and say so; a --config given explicitly must be valid."""
    try:
        return _policy(args.config, required=args.config != DEFAULT_CONFIG)
    except ConfigError as exc:
        if args.config != DEFAULT_CONFIG:
            raise
        from aqtune.decide.policy import Policy

        print(f"aqtune {args.command}: {printable(str(exc.problems[0]))}; advice uses the built-in defaults "
              f"(`aqtune check` lists every problem)", file=sys.stderr)
        return Policy()


def _owner_walk(args: argparse.Namespace) -> BackgroundScan | None:
    """The owners' /proc walk, started before anything else is imported when status will sweep (no
    running daemon's state to read), so that it runs on another CPU while the rest loads and the
    namespaces are dumped: on a host with many sockets it is most of what `aqtune status` waits for.

    Whether a daemon runs is guessed from when its state was written, not from the file being there:
    a daemon that stopped leaves its state behind, and status then sweeps after all."""
    from aqtune.act.state import may_be_live

    if args.watch or (not args.sweep and may_be_live(args.state_dir)):
        return None
    from aqtune.collect.fdwalk import BackgroundScan

    try:
        return BackgroundScan()
    except OSError:  # no fork here (limits, a sandbox): the sweep walks /proc itself
        return None


def _status(args: argparse.Namespace) -> int:
    _require_root("it enters every network namespace and reads other processes' file descriptors")
    walk = _owner_walk(args)
    try:
        return _status_of(args, walk)
    finally:
        if walk is not None:
            walk.cancel()


def _status_of(args: argparse.Namespace, walk: BackgroundScan | None) -> int:
    from aqtune.surfaces import status

    policy = _policy_to_read(args)
    try:
        ledger = _ledger(args.state_dir)
    except CommandError as exc:
        # Status only reads: what it cannot trust it leaves out, and says so (rollback refuses).
        from aqtune.act.ledger import Ledger

        print(f"aqtune status: {exc}; advice goes without aqtune's change record", file=sys.stderr)
        ledger = Ledger(args.state_dir, load=False)
    said: set[str] = set()
    if args.watch and not args.json:
        from aqtune.surfaces import watch

        painted = [0]

        def next_document() -> dict[str, Any]:
            if painted[0]:
                _refresh(ledger)
            painted[0] += 1
            return _whole(_status_document(args, policy, ledger, said))

        return watch.loop(next_document, policy, args.interval, lambda: _accept_times(args.state_dir))
    document = _status_document(args, policy, ledger, said, walk)
    if not args.json:
        print(status.render(_whole(document)), flush=True)
        return 0
    while True:
        # With --watch, one compact document per line unless -p asks otherwise.
        pretty = False if args.watch else args.pretty
        if isinstance(document, status.OneShot) and not _pretty(pretty):
            print(document.text(), flush=True)
        else:
            print(_json(_whole(document), pretty), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.interval)
        _refresh(ledger)
        document = _status_document(args, policy, ledger, said)


def _accept_times(state_dir: str) -> tuple[Any, str | None]:
    """The running daemon's eBPF accept times (a callable, to close()), or None and why not."""
    from aqtune.act.state import read_live_state
    from aqtune.collect import bpfmap

    live = read_live_state(state_dir)
    if live is None:
        return None, f"no aqtune daemon runs with state in {state_dir}"
    if not live.get("ebpf", {}).get("active"):
        return None, "the daemon runs without eBPF"
    try:
        return bpfmap.daemon_accept_times(int(live["daemon"]["pid"])), None
    except bpfmap.Unreadable as exc:
        return None, str(exc)


def _connections(args: argparse.Namespace) -> int:
    from aqtune.collect import connections, netns, procfs
    from aqtune.collect.sweep import sweep
    from aqtune.surfaces import connections as surface

    _require_root("it enters network namespaces and reads other processes' file descriptors")
    policy = _policy_to_read(args)
    try:
        refs = netns.select_namespaces(netns.list_namespaces(), args.netns)
        snapshot = sweep(args.netns, owners=False)
    except LookupError as exc:
        raise CommandError(str(exc.args[0])) from None
    except PermissionError as exc:
        raise CommandError(f"{exc}; run it as root") from None
    wanted = snapshot.listeners
    if args.port is not None:
        wanted = [l for l in wanted if l.port == args.port]
    elif args.listener is not None:
        wanted = [l for l in wanted if l.address == args.listener]
    if not wanted and (args.port is not None or args.listener is not None):
        what = f"port {args.port}" if args.port is not None else repr(args.listener)
        raise CommandError(f"no listener on {what} in netns {args.netns} (`aqtune status --netns {args.netns}` "
                           "lists them)")
    wanted = connections.with_group_members(wanted, snapshot.listeners)
    collected = connections.collect(refs, wanted, owners=False)
    inodes = connections.connection_inodes(collected)
    # One /proc scan names the listeners' owners and the workers holding their connections.
    owners = procfs.find_owners(inodes | {l.inode for l in wanted})
    for listener in wanted:
        listener.processes = owners.get(listener.inode, ())
    times, why_not = _accept_times(args.state_dir)
    try:
        accepted = times(inodes) if times is not None and inodes else {}
    finally:
        if times is not None:
            times.close()
    if times is not None:
        collected.ages = connections.AGES_EBPF
    connections.complete(collected, owners, accepted)
    now = time.time()
    keep = -1 if args.all else connections.TOP
    summaries = connections.summaries(collected, wanted, now, policy.connections.long_after,
                                      policy.connections.idle_after, keep)
    document = surface.document(wanted, summaries, policy, collected.ages,
                                surface.ages_note(collected.ages, why_not), collected.errors, args.all, now,
                                selected=args.port is not None or args.listener is not None)
    if args.json:
        print(_json(document, pretty=args.pretty))
    else:
        print(surface.render(document, args.all))
    return 0


def _check(args: argparse.Namespace) -> int:
    policy = _policy(args.config, required=True)
    scope = ""
    if policy.mode == "apply":
        # What apply mode may touch, said where the operator looks before a reload.
        apply = policy.apply
        scope = (f"; applies in namespaces {', '.join(apply.namespaces) or 'none'} for owners "
                 f"{', '.join(map(str, apply.owners)) or 'none'}"
                 f"{', user namespaces too' if apply.user_namespaces else ''}")
    print(f"{cescape(args.config)}: OK (mode {policy.mode}, interval {policy.interval:g} s, "
          f"{len(policy.listeners)} listener rules{printable(scope)})")
    if policy.apply_refused:
        print(f"warning: {printable(policy.apply_refused)}", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    from aqtune.act import log
    from aqtune.collect import netns
    from aqtune.surfaces.daemon import serve
    from aqtune.surfaces.run import Runner

    _require_root("it enters network namespaces and writes sysctls there")
    policy = _policy(args.config, required=True)
    try:
        netns.select_namespaces(netns.list_namespaces(), args.netns)
    except LookupError as exc:
        raise CommandError(str(exc.args[0])) from None
    runner = Runner(policy, args.netns, _ledger(args.state_dir), args.dry_run, log.configure(),
                    state_dir=args.state_dir)
    return serve(runner, args.config, ebpf=not args.no_ebpf)


def _trace(args: argparse.Namespace) -> int:
    from aqtune.collect import netns
    from aqtune.collect.ebpf import EventLayer, Unavailable
    from aqtune.surfaces.trace import emit_for, parse_kinds, trace

    try:
        kinds = parse_kinds(args.kind)
    except ValueError as exc:
        raise CommandError(f"--kind: {exc}") from None
    _require_root("it loads eBPF programs")
    try:
        selected = netns.select_namespaces(netns.list_namespaces(), args.netns)
        layer = EventLayer.start(emit=emit_for(kinds), netns_inode=selected[0].inode if args.netns != "all" else 0)
    except LookupError as exc:
        raise CommandError(str(exc.args[0])) from None
    except Unavailable as exc:
        raise CommandError(f"eBPF unavailable: {exc}") from None
    with layer:
        return trace(layer, args.netns, args.port, kinds=kinds, summary=args.summary)


def _rollback(args: argparse.Namespace) -> int:
    from aqtune.act import persist
    from aqtune.act.ledger import LedgerError
    from aqtune.act.sysctl import rollback

    _require_root("it writes sysctls inside network namespaces")
    # Refused outright (no partial work) when the state dir or ledger cannot be trusted or any
    # record in it is malformed: _ledger checks everything before anything is written.
    ledger = _ledger(args.state_dir)
    if not ledger.entries:
        print(f"nothing to roll back: {ledger.path} lists no changes")
        return 0
    failed = 0
    try:
        results = rollback(ledger)
    except LedgerError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot update {ledger.path}: {exc}; nothing more was rolled back") from None
    for result in results:
        print(f"{result.outcome:10} netns {result.netns} {result.sysctl}: {result.detail}")
        failed += result.outcome == "failed"
    if os.path.exists(persist.SYSCTL_D_FILE):
        persist.sync_host_file(ledger.entries)
    if failed:
        raise CommandError(f"{failed} change(s) could not be rolled back; they stay in {ledger.path}: "
                           "run `aqtune rollback` again once the cause is fixed")
    return 0


def _whole(document: dict[str, Any] | OneShot) -> dict[str, Any]:
    return document.document() if not isinstance(document, dict) else document


def _pretty(asked: bool | None) -> bool:
    """Indented JSON when asked for, or by default when a person reads it at a terminal."""
    return sys.stdout.isatty() if asked is None else asked


def _json(document: dict[str, Any], pretty: bool | None) -> str:
    """Compact JSON, as `ip -j` prints it (the C encoder: 10,000 listeners in a fraction of the time
    indented output takes), unless asked for pretty output or a person reads it at a terminal."""
    # check_circular off: the document is a tree built fresh from records (a sixth of the encoding time).
    if _pretty(pretty):
        return json.dumps(document, indent=2, check_circular=False)
    return json.dumps(document, separators=(",", ":"), check_circular=False)


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


# One table of examples, shown under each subcommand's --help and together under aqtune --help.
EXAMPLES = {
    "status": ["aqtune status                      every listener, worst first, with advice",
               "aqtune status --netns web --watch  one namespace, repainted every 2 s",
               "aqtune status --json | jq '.listeners[] | select(.fill > 0.9)'"],
    "connections": ["aqtune connections --port 80       who holds nginx's workers, longest first",
                    "aqtune connections --netns pid:4242 --listener /run/php/php8.2-fpm.sock"],
    "check": ["aqtune check --config /etc/aqtune/policy.toml && systemctl reload aqtune"],
    "run": ["aqtune run --dry-run --config etc/aqtune/policy.toml   the service's loop in the foreground",
            "aqtune run --netns web --no-ebpf                        sweeps alone, one namespace"],
    "trace": ["aqtune trace --port 443 --kind syn-overflow,ack-overflow   drops as they happen",
              "aqtune trace --summary                                     one line per listener per second"],
    "rollback": ["aqtune rollback                    restore every value aqtune changed, in every namespace"],
}


def _examples(*commands: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for command in commands for line in EXAMPLES[command])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aqtune", description="Watch accept queues and listen drops.",
                                     epilog=_examples(*EXAMPLES), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"aqtune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                                   epilog=_examples(name), formatter_class=argparse.RawDescriptionHelpFormatter)

    status = add("status", "show every listener's accept queue, worst first")
    status.add_argument("--json", action="store_true", help="print one JSON document (one per line with --watch)")
    status.add_argument("-p", "--pretty", action="store_const", const=True, default=None,
                        help="indent the JSON (the default on a terminal; compact otherwise, as `ip -j`)")
    status.add_argument("--netns", default="all", metavar="NAME",
                        help="a name under /run/netns, 'host', 'pid:N' or 'all' (default)")
    status.add_argument("--watch", action="store_true", help="refresh until interrupted")
    status.add_argument("--sweep", action="store_true",
                        help="sweep now even when a daemon runs (its state has history and eBPF events)")
    status.add_argument("--interval", type=_positive_float, default=2.0, metavar="SECONDS",
                        help="refresh period for --watch (default 2)")
    status.set_defaults(handler=_status)

    connections = add("connections", "a listener's long-running and idle connections and the workers holding them")
    connections.add_argument("--netns", default="all", metavar="NAME",
                             help="a name under /run/netns, 'host', 'pid:N' or 'all' (default)")
    which = connections.add_mutually_exclusive_group()
    which.add_argument("--port", type=int, metavar="N", help="the TCP listeners on this port")
    which.add_argument("--listener", metavar="ADDR",
                       help="the listener at this address, as status shows it (127.0.0.1:8080, [::1]:443, a path)")
    connections.add_argument("--json", action="store_true", help="print one JSON document")
    connections.add_argument("-p", "--pretty", action="store_const", const=True, default=None,
                             help="indent the JSON (the default on a terminal)")
    connections.add_argument("--all", action="store_true",
                             help="every connection (not only long-held and idle ones) of every listener")
    connections.set_defaults(handler=_connections)

    check = add("check", "validate a policy file (exit 0 valid, 2 not)")
    check.set_defaults(handler=_check)

    run = add("run", "sweep, diagnose and recommend or apply, in the foreground")
    run.add_argument("--dry-run", action="store_true", help="compute every change but write none")
    run.add_argument("--netns", default="all", metavar="NAME", help="limit to one namespace (default all)")
    run.add_argument("--no-ebpf", action="store_true", help="run on sock_diag sweeps alone, load no eBPF")
    run.set_defaults(handler=_run)

    trace = add("trace", "print accept-queue events live (eBPF)")
    trace.add_argument("--netns", default="all", metavar="NAME", help="only this namespace (default all)")
    trace.add_argument("--port", type=int, metavar="PORT", help="only listeners on this port")
    trace.add_argument("--kind", action="append", metavar="KIND",
                       help="only these event kinds (repeat or comma-separate): enqueue, ack-overflow, "
                            "syn-overflow, synack-retrans, accept, listen")
    trace.add_argument("--summary", action="store_true",
                       help="one line per listener per second: counts per kind, drops, peak queue, wait p99")
    trace.set_defaults(handler=_trace)

    rollback = add("rollback", "restore every sysctl aqtune changed")
    rollback.set_defaults(handler=_rollback)

    for command in (status, connections, check, run):
        command.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE",
                             help=f"policy file (default {DEFAULT_CONFIG})")
    for command in (status, connections, run, rollback):
        command.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                             help=f"where aqtune records its changes (default {DEFAULT_STATE_DIR})")
    return parser


def _tolerant_output() -> None:
    """Output that cannot fail on a character the terminal's encoding lacks (LANG=C with an ASCII
    stdout, PYTHONIOENCODING=latin-1): it is written as a backslash escape instead of raising
    UnicodeEncodeError halfway through a table. Names are escaped before this; what is left is
    printable text in a script the encoding cannot write."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    _tolerant_output()
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except CommandError as exc:
        # printable, not cescape: the message may hold a name from the command line or the
        # kernel, and is a composed line (it may already quote with repr()).
        print(f"aqtune {args.command}: {printable(str(exc))}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        # Problem lines carry the policy's own key names and repr()s of its values: a key may hold
        # any character TOML can quote, ESC and newline included.
        for problem in exc.problems:
            print(printable(str(problem)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # `aqtune status | head` closes the pipe early; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
