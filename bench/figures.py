"""The benchmarks' figures: each with the rounds it was measured over, its spread, the reference it is compared
with, its target and verdict; printed as a table and written as one JSON file per run (bench/README.md)."""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import comb
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
FORMAT_VERSION = 1

# How a value in each unit is printed.
UNIT_FORMATS = {
    "ms": "{:.1f} ms",
    "us": "{:.1f} us",
    "ns": "{:.0f} ns",
    "s": "{:.2f} s",
    "%": "{:.2f}%",
    "/s": "{:,.0f}/s",
    "MiB": "{:.1f} MiB",
    "": "{:.3f}",
}
OPERATORS = {
    "<=": lambda x, bound: x <= bound,
    "<": lambda x, bound: x < bound,
    ">=": lambda x, bound: x >= bound,
    ">": lambda x, bound: x > bound,
}


def show(value: float, unit: str) -> str:
    return UNIT_FORMATS[unit].format(value)


@dataclass(frozen=True, slots=True)
class Spread:
    """How far the rounds lie apart. ``relative`` is the interquartile range over the median: the middle half
    of the rounds lies within it, and one round that a burst of other load hit does not swing it the way it
    swings the whole range, ``full`` = (highest - lowest) / median."""

    low: float
    q1: float
    q3: float
    high: float
    relative: float | None  # None with fewer than two rounds, or a median of 0
    full: float | None

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread:
        middle = statistics.median(samples)
        if len(samples) < 2 or not middle:
            return cls(min(samples), middle, middle, max(samples), None, None)
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(min(samples), q1, q3, max(samples), (q3 - q1) / abs(middle),
                   (max(samples) - min(samples)) / abs(middle))

    def text(self) -> str:
        return "n/a" if self.relative is None else f"{self.relative:.0%}"

    def to_json(self) -> dict[str, float | None]:
        return {"low": self.low, "q1": self.q1, "q3": self.q3, "high": self.high, "relative": self.relative,
                "full": self.full}


@dataclass(frozen=True, slots=True)
class Target:
    """``value OP bound``, or ``ratio OP bound`` when ``on_ratio``; ``source`` says who set it."""

    op: str
    bound: float
    on_ratio: bool = False
    source: str = ""

    def met(self, value: float) -> bool:
        return bool(OPERATORS[self.op](value, self.bound))

    def text(self, unit: str) -> str:
        return f"ratio {self.op} {self.bound:g}" if self.on_ratio else f"{self.op} {show(self.bound, unit)}"


@dataclass(frozen=True, slots=True)
class Reference:
    """What a figure is compared with, named as a person would run it (``ss -ltnm``, ``no probes``)."""

    name: str
    samples: tuple[float, ...]

    @property
    def value(self) -> float:
        return statistics.median(self.samples)


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured figure. ``value`` is the median of ``samples`` (one per round) unless given (a maximum,
    an average over the whole window); ``ratio`` is value / reference value."""

    key: str  # stable, for comparing runs: sweep_ms_10000
    what: str  # for a person: "in-process sweep, 10,000 listeners"
    unit: str
    samples: tuple[float, ...]
    reference: Reference | None = None
    target: Target | None = None
    given: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError(f"{self.key}: a figure needs at least one sample")
        if self.target is not None and self.target.on_ratio and self.reference is None:
            raise ValueError(f"{self.key}: a target on the ratio needs a reference")

    @property
    def value(self) -> float:
        return self.given if self.given is not None else statistics.median(self.samples)

    @property
    def ratio(self) -> float | None:
        if self.reference is None or not self.reference.value:
            return None
        return self.value / self.reference.value

    @property
    def passed(self) -> bool | None:
        """None for a figure given for information."""
        if self.target is None:
            return None
        judged = self.ratio if self.target.on_ratio else self.value
        return None if judged is None else self.target.met(judged)

    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: ""}[self.passed]

    def to_json(self) -> dict[str, Any]:
        reference = None
        if self.reference is not None:
            reference = {"name": self.reference.name, "value": self.reference.value,
                         "rounds": len(self.reference.samples), "samples": list(self.reference.samples),
                         "spread": Spread.of(self.reference.samples).to_json()}
        target = None
        if self.target is not None:
            target = {"of": "ratio" if self.target.on_ratio else "value", "op": self.target.op,
                      "bound": self.target.bound, "source": self.target.source, "text": self.target.text(self.unit)}
        return {"key": self.key, "what": self.what, "unit": self.unit, "value": self.value,
                "rounds": len(self.samples), "samples": list(self.samples),
                "spread": Spread.of(self.samples).to_json(),
                "reference": reference, "ratio": self.ratio, "target": target, "pass": self.passed,
                "note": self.note, **({"extra": self.extra} if self.extra else {})}


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float] | None:
    """Distribution-free confidence interval for the median of ``values``: (low, high, coverage).

    The order statistics of ranks k and n+1-k, with k the largest rank for which P(Binomial(n, 1/2) < k)
    stays within (1 - confidence) / 2. No assumption about the noise's distribution, which on a shared
    machine is anything but normal. None when there are too few values for that confidence."""
    n = len(values)
    ordered = sorted(values)
    below = 0.0  # P(Binomial(n, 1/2) < k)
    k = 0
    while k < n and below + comb(n, k) / 2**n <= (1 - confidence) / 2:
        below += comb(n, k) / 2**n
        k += 1
    if k == 0:
        return None
    return ordered[k - 1], ordered[n - k], 1 - 2 * below


def refused_without_root(script: str, why: str) -> bool:
    """True, having said so, when this process is not root, which every benchmark needs (``why``)."""
    if os.geteuid() == 0:
        return False
    print(f"{script}: needs root ({why})", file=sys.stderr)
    return True


def host() -> dict[str, Any]:
    load1, load5, load15 = os.getloadavg()
    return {"kernel": platform.release(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "loadavg": [load1, load5, load15]}


class Results:
    """The figures of one run of one benchmark."""

    def __init__(self, bench: str, options: dict[str, Any]) -> None:
        self.bench = bench
        self.options = options
        self.started = time.time()
        self.host = host()
        self.figures: list[Figure] = []

    def add(self, figure: Figure) -> Figure:
        if any(known.key == figure.key for known in self.figures):
            raise ValueError(f"{self.bench}: figure {figure.key} measured twice")
        self.figures.append(figure)
        return figure

    def table(self) -> str:
        """The figures as a person reads them: one row each, spread over the rounds next to the value."""
        rows = [("figure", "value", "rounds", "spread", "reference", "ratio", "target", "verdict")]
        for f in self.figures:
            reference = ""
            if f.reference is not None:
                reference = (f"{f.reference.name} {show(f.reference.value, f.unit)} "
                             f"(spread {Spread.of(f.reference.samples).text()})")
            rows.append((f.what, show(f.value, f.unit), str(len(f.samples)), Spread.of(f.samples).text(), reference,
                         "" if f.ratio is None else f"{f.ratio:.3f}",
                         "" if f.target is None else f.target.text(f.unit), f.verdict()))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                 for row in rows]
        return "\n".join(lines)

    def document(self, error: str | None = None) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "bench": self.bench,
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
                "started": self.started, "finished": time.time(),
                "host": self.host, "options": self.options, "error": error,
                "figures": [figure.to_json() for figure in self.figures]}

    def write(self, error: str | None = None, directory: Path = RESULTS) -> Path:
        """bench/results/<bench>-<local time>.json; never overwrites an earlier run's file."""
        directory.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started))
        path = directory / f"{self.bench}-{stamp}.json"
        text = json.dumps(self.document(error), indent=1) + "\n"
        try:
            with open(path, "x", encoding="utf-8") as f:
                f.write(text)
        except FileExistsError:
            path = directory / f"{self.bench}-{stamp}-{os.getpid()}.json"
            path.write_text(text, encoding="utf-8")
        return path

    def report(self, error: str | None = None) -> None:
        """The table on stdout and the JSON file beside it, whose path is printed last."""
        if self.figures:
            print(f"\n== {self.bench}: figures (value: the median of the rounds unless the row says otherwise; "
                  "spread: the rounds' interquartile range / median) ==")
            print(self.table())
        path = self.write(error)
        print(f"# results: {path}", flush=True)
        sys.stdout.flush()

    def run(self, body: Callable[[], str | None], removed: str) -> int:
        """Run the benchmark's ``body`` (which returns why its figures are void, or None) and report: the exit
        status. A helper or the daemon that failed (the harness says which and how with an AssertionError),
        Ctrl-C and SIGTERM still give the figures measured so far; the with and finally blocks in ``body``
        remove what it started (``removed`` says what, to the person who pressed Ctrl-C)."""
        signal.signal(signal.SIGTERM, _terminate)
        try:
            error = body()
        except KeyboardInterrupt:
            print(f"interrupted; {removed} removed", file=sys.stderr)
            self.report("interrupted")
            return 130
        except (AssertionError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
            print(f"{self.bench}: {exc}", file=sys.stderr)
            self.report(str(exc))
            return 1
        if error is not None:
            print(f"{self.bench}: {error}", file=sys.stderr)
        self.report(error)
        return 0 if error is None else 1


def _terminate(signum: int, _frame: object) -> None:
    # SIGTERM as an exception, so that the with and finally blocks remove namespaces, helpers and daemons.
    raise KeyboardInterrupt(f"signal {signum}")
