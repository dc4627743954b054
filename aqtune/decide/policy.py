"""The TOML policy: strict parsing into typed settings, with problems an operator can act on.

Every problem names the file, the line where it can be found and the dotted key, so `aqtune check`
prints lines like ``/etc/aqtune/policy.toml:14: somaxconn.max: must be an integer, got "lots"``.
Unknown keys are errors: a misspelt safety setting must not be silently ignored.
"""

from __future__ import annotations

import os
import re
import reprlib
import stat
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from aqtune.trust import untrusted_dir, untrusted_file

if TYPE_CHECKING:
    from aqtune.records import Listener, ListenerEvents, Managed, Snapshot

DEFAULT_PATH = "/etc/aqtune/policy.toml"
SYSCTL_CEILING = 2**31 - 1  # the kernel stores both sysctls as int
MAX_SIZE = 1 << 20  # a policy is a few KiB; anything this large is the wrong file
# tomllib parses nested arrays and inline tables recursively: about 1,000 levels (a 4 KB file)
# raise RecursionError. A policy nests two levels; this many is already the wrong file.
MAX_NESTING = 32
MAX_PROBLEMS = 100  # problems listed; the rest are counted in one more line
LOGIN_DEFS = "/etc/login.defs"
SYSTEM_UID_MAX = 999  # login.defs' SYS_UID_MAX when it does not say (Debian's default)
# Words [apply] owners takes besides uids and unit names.
SYSTEM_USERS, SYSTEM_UNITS, ANYONE = "system-users", "system-units", "*"
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\@-]{1,250}\.(?:service|scope|socket|slice|mount|swap|target)")


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class PolicyError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Saturation:
    fill_ratio: float = 0.9
    sustain: float = 10.0
    clear_ratio: float = 0.5
    max_queue_wait_ms: float = 1000.0  # connections queued longer than this: the workers are the limit


@dataclass(frozen=True, slots=True)
class Limits:
    """How one sysctl may be raised."""

    max: int = 65535
    min: int = 1024
    step: float = 2.0
    cooldown: float = 300.0


@dataclass(frozen=True, slots=True)
class Apply:
    namespaces: tuple[str, ...] = ("*",)
    persist: bool = False
    rollback_on_exit: bool = False
    # Whose listeners apply mode acts for: uids, system units by name, SYSTEM_USERS (uids up to
    # system_uid_max), SYSTEM_UNITS (any unit of the system manager), ANYONE.
    owners: tuple[int | str, ...] = (SYSTEM_USERS, SYSTEM_UNITS)
    # Network namespaces owned by a user namespace (rootless containers) are their creator's.
    user_namespaces: bool = False
    # From /etc/login.defs when the policy file is loaded (not a policy key).
    system_uid_max: int = field(default=SYSTEM_UID_MAX, compare=False)


@dataclass(frozen=True, slots=True)
class JournalPolicy:
    window: float = 5.0  # seconds of drops gathered into one entry per listener
    max_per_minute: int = 30  # entries a minute at most; the rest are counted as suppressed


@dataclass(frozen=True, slots=True)
class MetricsPolicy:
    # node_exporter's textfile collector reads *.prom here; "" turns the file off.
    textfile: str = "/var/lib/prometheus/node-exporter/aqtune.prom"


@dataclass(frozen=True, slots=True)
class ConnectionsPolicy:
    long_after: float = 30.0  # seconds open after which a connection counts as long-held
    idle_after: float = 10.0  # seconds without data from the client after which it counts as idle


@dataclass(frozen=True, slots=True)
class WorkLimits:
    """What the daemon does per sweep at most, whatever local users create (namespaces, listeners)."""

    sweep_seconds: float = 2.0  # time budget of one sweep, checked between namespaces
    namespaces: int = 500  # namespaces read per sweep; the rest are read first in the next one
    listeners: int = 20_000  # listeners tracked at once; the excess is sampled round-robin
    published_listeners: int = 2_000  # listed in the state file, worst first; the rest are counted
    # The daemon's own CPU, in % of one core: a sweep that cost c CPU seconds is followed by the next
    # no sooner than c * 100 / max_cpu_percent seconds after it began, whatever the interval asks.
    # 5: on a 2-CPU host saturated by connections and listener churn, a budget of 10 let the daemon
    # take 7-8% of a core, and with its probes (4.8% of a core at 37k connections/s) the workload kept
    # 0.916 of its rate; with 5 it kept 0.93-0.97 (bench/daemon_load.py, README "Footprint").
    max_cpu_percent: float = 5.0


@dataclass(frozen=True, slots=True)
class ListenerRule:
    port: int | None = None
    address: str | None = None
    process: str | None = None
    unit: str | None = None
    netns: str | None = None
    ignore: bool = False
    fill_ratio: float | None = None
    sustain: float | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    mode: str = "recommend"
    interval: float = 1.0
    saturation: Saturation = field(default_factory=Saturation)
    somaxconn: Limits = field(default_factory=lambda: Limits(step=4.0))
    syn_backlog: Limits = field(default_factory=Limits)
    apply: Apply = field(default_factory=Apply)
    journal: JournalPolicy = field(default_factory=JournalPolicy)
    metrics: MetricsPolicy = field(default_factory=MetricsPolicy)
    connections: ConnectionsPolicy = field(default_factory=ConnectionsPolicy)
    limits: WorkLimits = field(default_factory=WorkLimits)
    listeners: tuple[ListenerRule, ...] = ()
    source: str = "built-in defaults"
    apply_refused: str | None = None  # why apply mode was downgraded to recommend, if it was

    @property
    def applies(self) -> bool:
        return self.mode == "apply" and self.apply_refused is None

    @property
    def lowest_fill_ratio(self) -> float:
        """The lowest fill at which any listener counts as full: [saturation]'s or a rule's."""
        return min([self.saturation.fill_ratio, *(r.fill_ratio for r in self.listeners if r.fill_ratio is not None)])


def may_be_judged(snapshot: Snapshot, policy: Policy, managed: Mapping[int, Mapping[str, Managed]],
                  events: Mapping[int, ListenerEvents] | None = None) -> list[Listener]:
    """The listeners a single sample can give a finding: filled to the lowest threshold any rule sets,
    in a namespace where aqtune changed a sysctl, or seen by eBPF. assess passes over every other
    one (one sample shows no drops), so `aqtune status` builds no history for them (on a host with
    10,000 quiet listeners that was most of its time), and with none left it loads no decision code."""
    lowest = policy.lowest_fill_ratio
    changed = {ns.name for ns in snapshot.namespaces if managed.get(ns.inode)}
    seen = events or {}
    return [listener for listener in snapshot.listeners
            if listener.fill >= lowest or listener.netns in changed or listener.inode in seen]


# --- value checks: each returns the converted value or raises ValueError with the reason ---

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 60, 60, 6, 6


def shown(value: Any) -> str:
    """A value as a problem quotes it: short, whatever its size or depth."""
    return _REPR.repr(value)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, got {shown(value)}")
    return float(value)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, got {shown(value)}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {shown(value)}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {shown(value)}")
    return value


def _within(check: Callable[[Any], Any], low: float, high: float, low_open: bool = False) -> Callable[[Any], Any]:
    def bounded(value: Any) -> Any:
        converted = check(value)
        # Written so that NaN (which TOML allows) fails: every comparison with NaN is false.
        if not (low <= converted <= high) or (low_open and converted == low):
            left = "(" if low_open else "["
            raise ValueError(f"must be in {left}{low:g}, {high:g}], got {shown(value)}")
        return converted
    return bounded


def _choice(*allowed: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(repr(a) for a in allowed)}, got {shown(value)}")
        return str(value)
    return check


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"must be a list of namespace names, got {shown(value)}")
    return tuple(value)


def _owners(value: Any) -> tuple[int | str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list of uids and unit names, got {shown(value)}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise ValueError(f"must list uids and unit names, got {shown(item)}")
        if isinstance(item, int) and not 0 <= item < 2**32 - 1:
            raise ValueError(f"must list uids in [0, {2**32 - 2}], got {item}")
        if isinstance(item, str) and item not in (SYSTEM_USERS, SYSTEM_UNITS, ANYONE) \
                and not _UNIT_NAME.fullmatch(item):
            raise ValueError(f"must list uids, unit names (\"nginx.service\"), \"{SYSTEM_USERS}\", "
                             f"\"{SYSTEM_UNITS}\" or \"{ANYONE}\", got {shown(item)}")
    return tuple(value)


def _path(value: Any) -> str:
    if not isinstance(value, str) or (value and not value.startswith("/")):
        raise ValueError(f"must be an absolute path or \"\" (off), got {shown(value)}")
    return value


_RATIO = _within(_number, 0, 1, low_open=True)
_SECONDS = _within(_number, 0, 86400 * 7)
_SYSCTL_VALUE = _within(_integer, 1, SYSCTL_CEILING)

_LIMITS = {"max": _SYSCTL_VALUE, "min": _SYSCTL_VALUE, "step": _within(_number, 1, 64, low_open=True),
           "cooldown": _SECONDS}
SCHEMA: dict[str, Any] = {
    "mode": _choice("recommend", "apply"),
    "interval": _within(_number, 0, 3600, low_open=True),
    "saturation": {"fill_ratio": _RATIO, "sustain": _SECONDS, "clear_ratio": _RATIO,
                   "max_queue_wait_ms": _within(_number, 0, 3_600_000, low_open=True)},
    "somaxconn": _LIMITS,
    "syn_backlog": _LIMITS,
    "apply": {"namespaces": _names, "persist": _boolean, "rollback_on_exit": _boolean, "owners": _owners,
              "user_namespaces": _boolean},
    "journal": {"window": _within(_number, 0, 3600, low_open=True), "max_per_minute": _within(_integer, 1, 100000)},
    "metrics": {"textfile": _path},
    "connections": {"long_after": _within(_number, 0, 86400 * 7, low_open=True),
                    "idle_after": _within(_number, 0, 86400 * 7, low_open=True)},
    "limits": {"sweep_seconds": _within(_number, 0, 3600, low_open=True),
               "namespaces": _within(_integer, 1, 1_000_000), "listeners": _within(_integer, 1, 10_000_000),
               "published_listeners": _within(_integer, 1, 10_000_000),
               "max_cpu_percent": _within(_number, 1, 100)},
}
LISTENER_SCHEMA: dict[str, Callable[[Any], Any]] = {
    "port": _within(_integer, 0, 65535),
    "address": _text,
    "process": _text,
    "unit": _text,
    "netns": _text,
    "ignore": _boolean,
    "fill_ratio": _RATIO,
    "sustain": _SECONDS,
}
MATCH_KEYS = ("port", "address", "process", "unit", "netns")


_HEADER = re.compile(r"^\s*\[\[?([^\[\]]+)\]\]?\s*(#.*)?$")
_ASSIGNED = re.compile(r"""^\s*(?:"([^"]*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*=""")
_ASSIGNED_ANYWHERE = re.compile(r"(?:^|(?<=[\s.{,]))([A-Za-z0-9_-]+)\s*=")


class _Locator:
    """Finds the line of a key in the source text, since tomllib reports no positions.

    Indexed in one pass over the text, so that each lookup is a dictionary access: a file of
    thousands of unknown keys is checked in linear time.
    """

    def __init__(self, text: str) -> None:
        self.headers: list[int] = []  # 0-based line of each [table] or [[table]] header, in order
        self.by_name: dict[str, list[int]] = {}  # header name -> ordinals in self.headers
        self.in_section: dict[tuple[int, str], int] = {}  # (header ordinal or -1, key) -> first line
        self.anywhere: dict[str, int] = {}  # bare key -> first line assigning it (dotted, inline)
        section = -1
        for number, line in enumerate(text.splitlines(), 1):
            header = _HEADER.match(line)
            if header:
                section = len(self.headers)
                self.headers.append(number - 1)
                self.by_name.setdefault(header.group(1).strip(), []).append(section)
            elif assigned := _ASSIGNED.match(line):
                key = next(group for group in assigned.groups() if group is not None)
                self.in_section.setdefault((section, key), number)
            for key in _ASSIGNED_ANYWHERE.findall(line):
                self.anywhere.setdefault(key, number)

    def _ordinal(self, name: str, index: int) -> int | None:
        ordinals = self.by_name.get(name, [])
        return ordinals[index] if len(ordinals) > index else None

    def table(self, name: str, index: int = 0) -> int | None:
        """Line of the ``index``-th ``[name]`` or ``[[name]]`` header."""
        ordinal = self._ordinal(name, index)
        return self.headers[ordinal] + 1 if ordinal is not None else None

    def key(self, table: str | None, key: str, index: int = 0) -> int | None:
        """Line of ``key = ...`` inside its table's section; failing that, anywhere it is assigned
        (dotted keys and inline tables)."""
        section: int | None = -1 if table is None else self._ordinal(table, index)
        found = self.in_section.get((section, key)) if section is not None else None
        return found if found is not None else self.anywhere.get(key)

    def either(self, table: str | None, key: str, index: int = 0) -> int | None:
        """A key that may have been written as a table header of its own."""
        dotted = f"{table}.{key}" if table else key
        return self.key(table, key, index) or self.table(dotted)


def _nesting(text: str) -> tuple[int, int]:
    """(deepest nesting of arrays and inline tables, its line), outside strings and comments.

    Linear; a rough TOML lexer that need not be exact, only never fooled into counting low: a
    document it misreads still fails in tomllib, which is guarded as well.
    """
    depth = deepest = 0
    line = deepest_line = 1
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif c in "\"'":
            quote = c * 3 if text.startswith(c * 3, i) else c
            j = i + len(quote)
            while j < n and not text.startswith(quote, j):
                if text[j] == "\\" and c == '"':
                    j += 1
                elif text[j] == "\n":
                    if len(quote) == 1:
                        break  # an unterminated string: let tomllib say so
                    line += 1
                j += 1
            i = j + len(quote)
            continue
        elif c in "[{":
            depth += 1
            if depth > deepest:
                deepest, deepest_line = depth, line
        elif c in "]}":
            depth = max(depth - 1, 0)
        i += 1
    return deepest, deepest_line


def _depth(document: Any) -> int:
    """How deep tables and arrays nest in a parsed document (dotted keys nest without brackets)."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(document, 0)]
    while pending:
        value, depth = pending.pop()
        deepest = max(deepest, depth)
        if depth > MAX_NESTING:
            break
        if isinstance(value, dict):
            pending += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            pending += [(v, depth + 1) for v in value]
    return deepest


def _check_table(values: dict[str, Any], schema: dict[str, Callable[[Any], Any]], table: str | None,
                 locate: _Locator, path: str, problems: list[Problem], index: int = 0) -> dict[str, Any]:
    checked = {}
    label = "listener" if table == "listener" else table
    for key, value in values.items():
        dotted = f"{label}[{index}].{key}" if table == "listener" else (f"{label}.{key}" if label else key)
        check = schema.get(key)
        if check is None:
            known = ", ".join(sorted(schema))
            problems.append(Problem(path, locate.either(table, key, index), dotted,
                                    f"unknown key (known here: {known})"))
            continue
        try:
            checked[key] = check(value)
        except ValueError as exc:
            problems.append(Problem(path, locate.key(table, key, index), dotted, str(exc)))
    return checked


def parse(text: str, path: str = "<policy>") -> Policy:
    """Policy from TOML text; raises PolicyError listing every problem found."""
    if text.startswith("\ufeff"):
        raise PolicyError([Problem(path, 1, "", "starts with a byte-order mark: save it as UTF-8 without BOM")])
    if len(text) > MAX_SIZE:
        raise PolicyError([Problem(path, None, "", f"is larger than {MAX_SIZE // 1024} KiB: not a policy file")])
    deepest, deepest_line = _nesting(text)
    if deepest > MAX_NESTING:
        raise PolicyError([Problem(path, deepest_line, "", f"arrays or tables nested {deepest} levels deep "
                                                    f"(at most {MAX_NESTING}): not a policy file")])
    try:
        document = tomllib.loads(text)
    except RecursionError:
        raise PolicyError([Problem(path, None, "", f"nested too deeply to parse (at most {MAX_NESTING} "
                                                    "levels): not a policy file")]) from None
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = int(match.group(1)) if match else None
        if "(at end of document)" in str(exc):
            line = max(len(text.splitlines()), 1)
        message = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", str(exc))
        raise PolicyError([Problem(path, line, "", f"TOML syntax error: {message}")]) from None
    if _depth(document) > MAX_NESTING:
        raise PolicyError([Problem(path, None, "", f"keys nested more than {MAX_NESTING} levels deep "
                                                    "(dotted keys or tables): not a policy file")])
    locate = _Locator(text)
    problems: list[Problem] = []
    settings: dict[str, Any] = {}
    for key, value in document.items():
        if key == "listener":
            continue
        check = SCHEMA.get(key)
        if check is None:
            known = ", ".join(sorted([*SCHEMA, "listener"]))
            problems.append(Problem(path, locate.either(None, key), key, f"unknown key (known: {known})"))
        elif isinstance(check, dict):
            if not isinstance(value, dict):
                problems.append(Problem(path, locate.either(None, key), key, f"must be a table [{key}]"))
                continue
            settings[key] = _check_table(value, check, key, locate, path, problems)
        else:
            settings.update(_check_table({key: value}, SCHEMA, None, locate, path, problems))
    rules = []
    raw_rules = document.get("listener", [])
    if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
        problems.append(Problem(path, locate.either(None, "listener"), "listener",
                                "must be an array of tables: [[listener]]"))
        raw_rules = []
    for index, raw in enumerate(raw_rules):
        rule = _check_table(raw, LISTENER_SCHEMA, "listener", locate, path, problems, index)
        if not any(key in rule for key in MATCH_KEYS) and not any(key in raw for key in MATCH_KEYS):
            problems.append(Problem(path, locate.table("listener", index), f"listener[{index}]",
                                    f"matches every listener: give at least one of {', '.join(MATCH_KEYS)}"))
        if rule.get("ignore") and ("fill_ratio" in rule or "sustain" in rule):
            problems.append(Problem(path, locate.key("listener", "ignore", index), f"listener[{index}].ignore",
                                    "an ignored listener takes no fill_ratio or sustain"))
        rules.append(ListenerRule(**rule))
    policy = _build(settings, tuple(rules), path)
    if not problems:
        problems += _cross_checks(policy, settings, locate, path)
    if len(problems) > MAX_PROBLEMS:
        more = len(problems) - MAX_PROBLEMS
        problems = [*problems[:MAX_PROBLEMS], Problem(path, None, "", f"... and {more} more problems")]
    if problems:
        raise PolicyError(problems)
    return policy


def _build(settings: dict[str, Any], rules: tuple[ListenerRule, ...], path: str) -> Policy:
    defaults = Policy()
    apply = settings.get("apply", {})
    return Policy(
        mode=settings.get("mode", defaults.mode),
        interval=settings.get("interval", defaults.interval),
        saturation=Saturation(**settings.get("saturation", {})),
        somaxconn=replace(defaults.somaxconn, **settings.get("somaxconn", {})),
        syn_backlog=replace(defaults.syn_backlog, **settings.get("syn_backlog", {})),
        apply=Apply(**apply),
        journal=JournalPolicy(**settings.get("journal", {})),
        metrics=MetricsPolicy(**settings.get("metrics", {})),
        connections=ConnectionsPolicy(**settings.get("connections", {})),
        limits=WorkLimits(**settings.get("limits", {})),
        listeners=rules,
        source=path,
    )


def _cross_checks(policy: Policy, written: dict[str, Any], locate: _Locator, path: str) -> list[Problem]:
    """Checks between two settings; the one the file sets is blamed, so the line points at it."""
    problems = []

    def conflict(table: str, low: str, high: str, low_value: float, high_value: float) -> None:
        keys = written.get(table, {})
        if low in keys or high not in keys:
            problems.append(Problem(path, locate.key(table, low), f"{table}.{low}",
                                    f"must not exceed {table}.{high} ({high_value:g})"))
        else:
            problems.append(Problem(path, locate.key(table, high), f"{table}.{high}",
                                    f"must be at least {table}.{low} ({low_value:g}, its default)"))

    saturation = policy.saturation
    if saturation.clear_ratio > saturation.fill_ratio:
        conflict("saturation", "clear_ratio", "fill_ratio", saturation.clear_ratio, saturation.fill_ratio)
    for name, limits in (("somaxconn", policy.somaxconn), ("syn_backlog", policy.syn_backlog)):
        if limits.min > limits.max:
            conflict(name, "min", "max", limits.min, limits.max)
    return problems


def _read(path: str) -> tuple[str, os.stat_result]:
    """The file's text and the fstat of the very descriptor it was read from, or PolicyError saying
    what is wrong with the file itself."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise PolicyError([Problem(path, None, "", "no such file; copy etc/aqtune/policy.toml there")]) from None
    except IsADirectoryError:
        raise PolicyError([Problem(path, None, "", "is a directory, not a policy file")]) from None
    except OSError as exc:
        raise PolicyError([Problem(path, None, "", f"cannot read: {exc.strerror}")]) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        what = "is a directory, not a policy file" if stat.S_ISDIR(st.st_mode) else "is not a regular file"
        raise PolicyError([Problem(path, None, "", what)])
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(MAX_SIZE + 1)
        except OSError as exc:
            raise PolicyError([Problem(path, None, "", f"cannot read: {exc.strerror}")]) from None
    if len(data) > MAX_SIZE:
        raise PolicyError([Problem(path, None, "", f"is larger than {MAX_SIZE // 1024} KiB: not a policy file")])
    if b"\0" in data:
        raise PolicyError([Problem(path, None, "", "is binary, not TOML text")])
    try:
        return data.decode("utf-8"), st
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise PolicyError([Problem(path, line, "", "is not UTF-8 text")]) from None


def read_text(path: str) -> str:
    """The file's text, or PolicyError saying what is wrong with the file itself."""
    return _read(path)[0]


def unsafe_for_apply(path: str, st: os.stat_result | None = None) -> str | None:
    """Why the file may not drive apply mode: anyone but root could then change sysctls through it.

    ``st``: the fstat of the descriptor the policy was read from (else the path is stat'ed). The
    directories above the file (and above its symlink's target) must be root's alone as well:
    whoever can write one can replace the file.
    """
    st = os.stat(path) if st is None else st
    reason = untrusted_file(st, path, owners=(0,))
    if reason:
        return reason
    for directory in dict.fromkeys([os.path.dirname(os.path.abspath(path)), os.path.dirname(os.path.realpath(path))]):
        reason = untrusted_dir(directory, owners=(0,), sticky_ok=True)
        if reason:
            return reason
    return None


def load(path: str) -> Policy:
    """Read, parse and vet a policy file; apply mode from an unsafe file is downgraded, not refused."""
    text, st = _read(path)
    policy = parse(text, path)
    policy = replace(policy, apply=replace(policy.apply, system_uid_max=read_system_uid_max()))
    if policy.mode == "apply":
        reason = unsafe_for_apply(path, st)
        if reason:
            return replace(policy, apply_refused=f"{reason}: apply mode refused, recommending only "
                                            f"(fix with: chown root:root {path}; chmod 644 {path}, "
                                            "and the same for any directory named)")
    return policy


def read_system_uid_max(path: str = LOGIN_DEFS) -> int:
    """SYS_UID_MAX from login.defs: the highest uid of a system user (useradd --system)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError:
        return SYSTEM_UID_MAX
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0] == "SYS_UID_MAX" and words[1].isdigit():
            return min(int(words[1]), 2**32 - 2)
    return SYSTEM_UID_MAX


def rule_for(policy: Policy, netns: str, address: str, port: int | None,
             comms: tuple[str, ...], units: tuple[str, ...]) -> ListenerRule | None:
    """The first [[listener]] rule matching a listener; every match key the rule gives must match."""
    for rule in policy.listeners:
        if rule.port is not None and rule.port != port:
            continue
        if rule.address is not None and rule.address != address:
            continue
        if rule.process is not None and rule.process not in comms:
            continue
        if rule.unit is not None and rule.unit not in units:
            continue
        if rule.netns is not None and rule.netns != netns:
            continue
        return rule
    return None


def namespace_allowed(policy: Policy, netns: str) -> bool:
    return "*" in policy.apply.namespaces or netns in policy.apply.namespaces


def owner_allowed(policy: Policy, uid: int | None, units: Iterable[str], user_owned_netns: bool) -> str | None:
    """None when apply mode may tune for a listener; else why not (for the log and status).

    ``uid``: the socket's owner as the host sees it; ``units``: the units its processes run in, as
    the host's system manager names them (a user manager's units, or units inside a container,
    must not be passed: their names are chosen by whoever runs them); ``user_owned_netns``: its
    namespace is owned by a user namespace other than the host's.
    """
    owners = policy.apply.owners
    if user_owned_netns and not policy.apply.user_namespaces:
        return ("its network namespace belongs to a user namespace (a rootless container or `unshare -r`), "
                "whose creator controls it: [apply] user_namespaces = true lets apply mode tune those")
    if ANYONE in owners:
        return None
    if uid is not None and (uid in owners or (SYSTEM_USERS in owners and uid <= policy.apply.system_uid_max)):
        return None
    units = tuple(units)
    if any(unit in owners for unit in units) or (SYSTEM_UNITS in owners and units):
        return None
    who = f"uid {uid}" if uid is not None else "an unknown uid"
    where = f" in {', '.join(units)}" if units else " outside any system unit"
    return (f"owned by {who}{where}, which [apply] owners does not trust "
            f"({', '.join(map(str, owners)) or 'nobody'}; system users are uids up to "
            f"{policy.apply.system_uid_max})")
