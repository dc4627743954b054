"""The service loop around Runner.tick: when to sweep, systemd notifications, reload and stop.

Cost follows trouble: every short tick reads only each namespace's listen-drop counters (a file read
per namespace); the full sweep runs when they move, or once per policy interval, or while everything
is quiet (no finding, every queue short) once per QUIET_PERIOD: a queue filling up without drops then
shows within a few seconds, well inside the policy's sustain window.
"""

from __future__ import annotations

import signal
import threading
import time

from aqtune.act.notify import Notifier
from aqtune.collect import netns, procfs
from aqtune.decide import policy as policies
from aqtune.messages import MessageId
from aqtune.surfaces.run import Runner

SHORT_TICK = 0.25  # seconds between cheap checks
QUIET_PERIOD = 5.0  # at most; never more than half the sustain window
CHEAP_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPReqQFullDrop")


def listen_counters(refs: list[netns.NamespaceRef]) -> dict[int, tuple[int, ...]]:
    """Each namespace's listen-drop counters: the cheap check that decides on a full sweep."""
    values = {}
    for ref in refs:
        try:
            with netns.entered(ref):
                counters = procfs.read_counters()
        except (OSError, netns.NamespaceGone):
            continue
        values[ref.inode] = tuple(counters.get(name, 0) for name in CHEAP_COUNTERS)
    return values


def serve(runner: Runner, config_path: str, ebpf: bool = True) -> int:
    """Run until SIGTERM or SIGINT. SIGHUP reloads the policy; a bad one keeps the last good one."""
    stop, reload = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    notifier = Notifier()
    log = runner.log
    if ebpf:
        runner.start_events()
    mode = runner.mode
    log.info(f"aqtune running: mode {mode}, policy {runner.policy.source}, netns {runner.observer.select}, "
             f"state {runner.publisher.state_dir}", MessageId.LIFECYCLE, mode=mode)
    if runner.policy.apply_refused:
        log.warning(runner.policy.apply_refused, MessageId.LIFECYCLE)
    last_sweep = float("-inf")
    sweep_took = 0.0
    counters: dict[int, tuple[int, ...]] = {}
    refs: list[netns.NamespaceRef] = []
    ready = False
    while not stop.is_set():
        now = time.monotonic()
        if reload.is_set():
            reload.clear()
            _reload(runner, config_path)
        moved = False
        # Counters moving bring the next sweep forward, but no closer than twice the last sweep's
        # time: under a flood they move every tick, and back-to-back sweeps would starve the loop.
        period = runner.policy.interval
        if runner.quiet():
            period = max(period, min(QUIET_PERIOD, runner.policy.saturation.sustain / 2))
        if now - last_sweep < period and now - last_sweep >= 2 * sweep_took:
            latest = listen_counters(refs)
            moved = latest != counters
            counters = latest
        if moved or now - last_sweep >= period:
            last_sweep = now
            try:
                snapshot = runner.tick()[0]
                refs = [netns.NamespaceRef(ns.name, ns.inode, ns.path) for ns in snapshot.namespaces
                        if ns.path and not ns.error]
            except (OSError, LookupError) as exc:
                log.error(f"sweep failed: {exc}; retrying next interval", MessageId.DEGRADED, component="sweep")
                refs = []
            sweep_took = time.monotonic() - now
            counters = listen_counters(refs)
            if not ready:
                notifier.send("READY=1")
                ready = True
            notifier.send(f"STATUS={runner.summary()}")
        # After the sweep, not before: a slow sweep must not stretch the gap between pings.
        notifier.watchdog(time.monotonic())
        stop.wait(min(SHORT_TICK, notifier.until_due(time.monotonic())))
    notifier.send("STOPPING=1")
    if runner.policy.apply.rollback_on_exit:
        runner.rollback()
    runner.close()
    log.info("aqtune stopped", MessageId.LIFECYCLE)
    return 0


def _reload(runner: Runner, config_path: str) -> None:
    try:
        new = policies.load(config_path)
    except policies.PolicyError as exc:
        problems = "; ".join(str(p) for p in exc.problems)
        runner.log.error(f"policy reload refused, keeping the previous policy: {problems}",
                         MessageId.LIFECYCLE, path=config_path)
        return
    runner.policy = new
    runner.log.info(f"policy reloaded from {config_path}: mode {new.mode}, interval {new.interval:g} s",
                    MessageId.LIFECYCLE, path=config_path)
    if new.apply_refused:
        runner.log.warning(new.apply_refused, MessageId.LIFECYCLE)
