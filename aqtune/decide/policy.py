"""The TOML policy: strict parsing into typed settings, with problems an operator can act on.

Every problem names the file, the line where it can be found and the dotted key, so `aqtune check`
prints lines like ``/etc/aqtune/policy.toml:14: somaxconn.max: must be an integer, got "lots"``.
Unknown keys are errors: a misspelt safety setting must not be silently ignored.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

DEFAULT_PATH = "/etc/aqtune/policy.toml"
SYSCTL_CEILING = 2**31 - 1  # the kernel stores both sysctls as int
MAX_SIZE = 1 << 20  # a policy is a few KiB; anything this large is the wrong file


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


@dataclass(frozen=True, slots=True)
class JournalPolicy:
    window: float = 5.0  # seconds of drops gathered into one entry per listener
    max_per_minute: int = 30  # entries a minute at most; the rest are counted as suppressed


@dataclass(frozen=True, slots=True)
class MetricsPolicy:
    # node_exporter's textfile collector reads *.prom here; "" turns the file off.
    textfile: str = "/var/lib/prometheus/node-exporter/aqtune.prom"


@dataclass(frozen=True, slots=True)
class WorkLimits:
    """What the daemon does per sweep at most, whatever local users create (namespaces, listeners)."""

    sweep_seconds: float = 2.0  # time budget of one sweep, checked between namespaces
    namespaces: int = 500  # namespaces read per sweep; the rest are read first in the next one
    listeners: int = 20_000  # listeners tracked at once; the excess is sampled round-robin
    published_listeners: int = 2_000  # listed in the state file, worst first; the rest are counted


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
    limits: WorkLimits = field(default_factory=WorkLimits)
    listeners: tuple[ListenerRule, ...] = ()
    source: str = "built-in defaults"
    apply_refused: str | None = None  # why apply mode was downgraded to recommend, if it was

    @property
    def applies(self) -> bool:
        return self.mode == "apply" and self.apply_refused is None


# --- value checks: each returns the converted value or raises ValueError with the reason ---

def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, got {value!r}")
    return float(value)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, got {value!r}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _within(check: Callable[[Any], Any], low: float, high: float, low_open: bool = False) -> Callable[[Any], Any]:
    def bounded(value: Any) -> Any:
        converted = check(value)
        # Written so that NaN (which TOML allows) fails: every comparison with NaN is false.
        if not (low <= converted <= high) or (low_open and converted == low):
            left = "(" if low_open else "["
            raise ValueError(f"must be in {left}{low:g}, {high:g}], got {value!r}")
        return converted
    return bounded


def _choice(*allowed: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
        return str(value)
    return check


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"must be a list of namespace names, got {value!r}")
    return tuple(value)


def _path(value: Any) -> str:
    if not isinstance(value, str) or (value and not value.startswith("/")):
        raise ValueError(f"must be an absolute path or \"\" (off), got {value!r}")
    return value


_RATIO = _within(_number, 0, 1, low_open=True)
_SECONDS = _within(_number, 0, 86400 * 7)
_SYSCTL_VALUE = _within(_integer, 1, SYSCTL_CEILING)

_LIMITS = {"max": _SYSCTL_VALUE, "min": _SYSCTL_VALUE, "step": _within(_number, 1, 64, low_open=True),
           "cooldown": _SECONDS}
SCHEMA: dict[str, Any] = {
    "mode": _choice("recommend", "apply"),
    "interval": _within(_number, 0, 3600, low_open=True),
    "saturation": {"fill_ratio": _RATIO, "sustain": _SECONDS, "clear_ratio": _RATIO},
    "somaxconn": _LIMITS,
    "syn_backlog": _LIMITS,
    "apply": {"namespaces": _names, "persist": _boolean, "rollback_on_exit": _boolean},
    "journal": {"window": _within(_number, 0, 3600, low_open=True), "max_per_minute": _within(_integer, 1, 100000)},
    "metrics": {"textfile": _path},
    "limits": {"sweep_seconds": _within(_number, 0, 3600, low_open=True),
               "namespaces": _within(_integer, 1, 1_000_000), "listeners": _within(_integer, 1, 10_000_000),
               "published_listeners": _within(_integer, 1, 10_000_000)},
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


class _Locator:
    """Finds the line of a key in the source text, since tomllib reports no positions."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers = [(i, m.group(1).strip()) for i, line in enumerate(self.lines)
                        if (m := re.match(r"^\s*\[\[?([^\[\]]+)\]\]?\s*(#.*)?$", line))]

    def table(self, name: str, index: int = 0) -> int | None:
        """Line of the ``index``-th ``[name]`` or ``[[name]]`` header."""
        found = [i for i, header in self.headers if header == name]
        return found[index] + 1 if len(found) > index else None

    def key(self, table: str | None, key: str, index: int = 0) -> int | None:
        """Line of ``key = ...`` inside its table's section; failing that, anywhere it is assigned
        (dotted keys and inline tables)."""
        if table is None:
            start, end = 0, self.headers[0][0] if self.headers else len(self.lines)
        else:
            header = self.table(table, index)
            if header is None:
                start = end = 0
            else:
                start = header
                end = next((i for i, _ in self.headers if i >= header), len(self.lines))
        assignment = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        found = next((i + 1 for i in range(start, end) if assignment.match(self.lines[i])), None)
        if found is None:
            anywhere = re.compile(rf"(^|[\s.{{,]){re.escape(key)}\s*=")
            found = next((i + 1 for i, line in enumerate(self.lines) if anywhere.search(line)), None)
        return found

    def either(self, table: str | None, key: str, index: int = 0) -> int | None:
        """A key that may have been written as a table header of its own."""
        dotted = f"{table}.{key}" if table else key
        return self.key(table, key, index) or self.table(dotted)


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
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = int(match.group(1)) if match else None
        if "(at end of document)" in str(exc):
            line = max(len(text.splitlines()), 1)
        message = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", str(exc))
        raise PolicyError([Problem(path, line, "", f"TOML syntax error: {message}")]) from None
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


def read_text(path: str) -> str:
    """The file's text, or PolicyError saying what is wrong with the file itself."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIZE + 1)
    except FileNotFoundError:
        raise PolicyError([Problem(path, None, "", "no such file; copy etc/aqtune/policy.toml there")]) from None
    except IsADirectoryError:
        raise PolicyError([Problem(path, None, "", "is a directory, not a policy file")]) from None
    except OSError as exc:
        raise PolicyError([Problem(path, None, "", f"cannot read: {exc.strerror}")]) from None
    if len(data) > MAX_SIZE:
        raise PolicyError([Problem(path, None, "", f"is larger than {MAX_SIZE // 1024} KiB: not a policy file")])
    if b"\0" in data:
        raise PolicyError([Problem(path, None, "", "is binary, not TOML text")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise PolicyError([Problem(path, line, "", "is not UTF-8 text")]) from None


def unsafe_for_apply(path: str) -> str | None:
    """Why the file may not drive apply mode: anyone but root could then change sysctls through it."""
    st = os.stat(path)
    if st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def load(path: str) -> Policy:
    """Read, parse and vet a policy file; apply mode from an unsafe file is downgraded, not refused."""
    policy = parse(read_text(path), path)
    if policy.mode == "apply":
        reason = unsafe_for_apply(path)
        if reason:
            return replace(policy, apply_refused=f"{reason}: apply mode refused, recommending only "
                                            f"(fix with: chown root:root {path}; chmod 644 {path})")
    return policy


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
