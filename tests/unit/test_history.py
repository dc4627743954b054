"""The model's bookkeeping: which histories exist, how long they are, and the figures windows compute."""

from __future__ import annotations

import pytest

from aqtune.model.history import (
    MAX_SAMPLES,
    CounterSample,
    Model,
    Sample,
    counter_deltas,
    listener_window,
)
from aqtune.records import COUNTERS, Listener, Namespace, Process, Snapshot

NGINX = Process(100, "nginx", "nginx: master process", "nginx.service")
WORKER = Process(101, "nginx", "nginx: worker process", "nginx.service")


def listener(cookie: int, netns: str = "host", queue: int = 0, backlog: int = 128, drops: int | None = 0,
             processes: tuple[Process, ...] = (NGINX,)) -> Listener:
    return Listener(netns, "tcp", f"127.0.0.1:{8000 + cookie}", 8000 + cookie, queue, backlog, drops, cookie,
                    1000 + cookie, 0, processes)


def snapshot(at: float, listeners: list[Listener], namespaces: list[Namespace] | None = None) -> Snapshot:
    return Snapshot(at, 0.01, namespaces if namespaces is not None else [], listeners)


def sample(at: float, cpu: float | None = None, queue: int = 0, drops: int | None = 0) -> Sample:
    return Sample(at, queue, 128, drops, cpu)


# --- Model.update ---

def test_update_keys_listeners_by_namespace_and_cookie() -> None:
    # The key carries the namespace, so histories of different namespaces can never be mixed up.
    model = Model()
    model.update(snapshot(1.0, [listener(1, "host"), listener(1, "ns1"), listener(2, "host")]), {})
    assert set(model.listeners) == {("host", 1), ("ns1", 1), ("host", 2)}
    assert all(len(h.samples) == 1 for h in model.listeners.values())


def test_update_appends_to_an_existing_history() -> None:
    model = Model()
    for at, queue in ((1.0, 3), (2.0, 7)):
        model.update(snapshot(at, [listener(1, queue=queue)]), {})
    samples = list(model.listeners[("host", 1)].samples)
    assert [(s.at, s.queue) for s in samples] == [(1.0, 3), (2.0, 7)]


def test_update_forgets_a_listener_that_disappeared() -> None:
    # A closed socket's history (and its hysteresis state) must not leak into a later one.
    model = Model()
    model.update(snapshot(1.0, [listener(1), listener(2)]), {})
    model.listeners[("host", 2)].saturated = True
    model.update(snapshot(2.0, [listener(1)]), {})
    assert set(model.listeners) == {("host", 1)}
    model.update(snapshot(3.0, [listener(1), listener(2)]), {})
    assert len(model.listeners[("host", 2)].samples) == 1
    assert model.listeners[("host", 2)].saturated is False


def test_update_tracks_namespace_counters_and_forgets_vanished_namespaces() -> None:
    model = Model()
    first = [Namespace("host", 1, counters={"ListenDrops": 1}), Namespace("ns1", 2, counters={"ListenDrops": 5})]
    model.update(snapshot(1.0, [], first), {})
    model.update(snapshot(2.0, [], [Namespace("host", 1, counters={"ListenDrops": 4})]), {})
    assert set(model.namespaces) == {"host"}
    assert [s.counters["ListenDrops"] for s in model.namespaces["host"]] == [1, 4]


def test_update_skips_an_unreadable_namespace_without_counters() -> None:
    # A namespace that failed to read has no figures; a sample of zeros would look like a counter reset.
    model = Model()
    model.update(snapshot(1.0, [], [Namespace("host", 1, counters={"ListenDrops": 1})]), {})
    model.update(snapshot(2.0, [], [Namespace("host", 1, error="setns: EPERM")]), {})
    assert "host" not in model.namespaces
    # An error with counters read before it struck still counts as a sample.
    model.update(snapshot(3.0, [], [Namespace("host", 1, counters={"ListenDrops": 2}, error="partial")]), {})
    assert len(model.namespaces["host"]) == 1


def test_listener_samples_are_bounded_by_count() -> None:
    # Memory must stay bounded even if forget_before is never called (e.g. a huge sustain).
    model = Model()
    for i in range(MAX_SAMPLES + 10):
        model.update(snapshot(float(i), [listener(1, queue=i)], [Namespace("host", 1, counters={"ListenDrops": i})]),
                     {})
    samples = model.listeners[("host", 1)].samples
    assert len(samples) == MAX_SAMPLES
    assert samples[0].queue == 10 and samples[-1].queue == MAX_SAMPLES + 9
    assert len(model.namespaces["host"]) == MAX_SAMPLES


def test_a_quiet_namespace_costs_two_counter_samples() -> None:
    # A namespace whose counters do not move (or one a sweep did not reach, standing in with its last
    # figures) keeps the first and the latest sample of the run; the deltas are the same.
    model = Model()
    for i in range(100):
        model.update(snapshot(float(i), [], [Namespace("host", 1, counters={"ListenDrops": 5 if i < 90 else 9})]), {})
    assert [(s.at, s.counters["ListenDrops"]) for s in model.namespaces["host"]] == [
        (0.0, 5), (89.0, 5), (90.0, 9), (99.0, 9)]
    assert counter_deltas(model.namespaces["host"], 30.0)["ListenDrops"] == 4


# --- Model.forget_before ---

def _model_with_samples(times: list[float]) -> Model:
    model = Model()
    for at in times:
        # A different queue each time: identical samples would be collapsed (see below).
        model.update(snapshot(at, [listener(1, queue=int(at))],
                              [Namespace("host", 1, counters={"ListenDrops": int(at)})]), {})
    return model


def test_forget_before_keeps_the_newest_sample_older_than_the_cutoff_as_baseline() -> None:
    # Without that baseline, a window starting at the cutoff would lose the counter increase into it.
    model = _model_with_samples([float(t) for t in range(11)])
    model.forget_before(5.5)
    assert [s.at for s in model.listeners[("host", 1)].samples] == [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    assert [s.at for s in model.namespaces["host"]] == [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]


def test_forget_before_a_sample_exactly_at_the_cutoff_keeps_the_one_before_it() -> None:
    model = _model_with_samples([float(t) for t in range(11)])
    model.forget_before(5.0)
    assert [s.at for s in model.listeners[("host", 1)].samples][:2] == [4.0, 5.0]


def test_forget_before_always_keeps_two_samples() -> None:
    # Two samples are the least a delta can be computed from, however stale they are.
    model = _model_with_samples([1.0, 2.0, 3.0])
    model.forget_before(100.0)
    assert [s.at for s in model.listeners[("host", 1)].samples] == [2.0, 3.0]
    assert [s.at for s in model.namespaces["host"]] == [2.0, 3.0]


def test_forget_before_the_oldest_sample_keeps_everything() -> None:
    model = _model_with_samples([1.0, 2.0, 3.0])
    model.forget_before(0.5)
    assert len(model.listeners[("host", 1)].samples) == 3


def test_a_run_of_identical_samples_keeps_its_first_and_its_latest() -> None:
    model = Model()
    for at in (1.0, 2.0, 3.0, 4.0):
        model.update(snapshot(at, [listener(1)]), {})
    model.update(snapshot(5.0, [listener(1, queue=3)]), {})
    assert [(s.at, s.queue) for s in model.listeners[("host", 1)].samples] == [(1.0, 0), (4.0, 0), (5.0, 3)]


# --- counter_deltas ---

def counters(**values: int) -> dict[str, int]:
    return dict(values)


def test_counter_deltas_use_the_last_sample_before_the_window_as_baseline() -> None:
    samples = [CounterSample(float(t), counters(ListenDrops=t * 10)) for t in range(11)]
    # Window of 3 s from t=10: base is the last sample before t=7, i.e. t=6.
    assert counter_deltas(samples, 3.0)["ListenDrops"] == 40


def test_counter_deltas_of_a_window_shorter_than_one_interval_span_the_last_interval() -> None:
    samples = [CounterSample(0.0, counters(ListenDrops=1)), CounterSample(1.0, counters(ListenDrops=4))]
    assert counter_deltas(samples, 0.0)["ListenDrops"] == 3


def test_counter_deltas_of_a_window_longer_than_the_history_start_at_the_first_sample() -> None:
    samples = [CounterSample(5.0, counters(ListenDrops=2)), CounterSample(6.0, counters(ListenDrops=9))]
    assert counter_deltas(samples, 100.0)["ListenDrops"] == 7


def test_counter_deltas_report_every_counter_and_never_go_negative() -> None:
    # A counter that went down (namespace recreated under the same name) is not a negative increase.
    samples = [CounterSample(0.0, counters(ListenOverflows=50, SyncookiesSent=1)),
               CounterSample(1.0, counters(ListenOverflows=3, TCPReqQFullDrop=2))]
    deltas = counter_deltas(samples, 1.0)
    assert set(deltas) == set(COUNTERS)
    assert deltas["ListenOverflows"] == 0
    assert deltas["TCPReqQFullDrop"] == 2  # missing before: counted from 0
    assert deltas["SyncookiesSent"] == 0  # missing now: counted as 0, not as -1


def test_counter_deltas_of_a_single_sample_are_zero() -> None:
    assert set(counter_deltas([CounterSample(0.0, counters(ListenDrops=9))], 10.0).values()) == {0}


# --- CPU share ---

def test_cpu_sample_sums_every_owner() -> None:
    # A listening socket shared by master and workers: the queue drains as fast as all of them work.
    model = Model()
    model.update(snapshot(1.0, [listener(1, processes=(NGINX, WORKER))]), {100: 1.5, 101: 2.25})
    assert model.listeners[("host", 1)].samples[0].cpu == 3.75


@pytest.mark.parametrize("processes,cpu_seconds", [
    ((NGINX, WORKER), {100: 1.5}),  # one owner's time unknown: a partial sum would understate the share
    ((), {}),  # no owner found
])
def test_cpu_sample_is_unknown_unless_every_owner_is_known(processes: tuple[Process, ...],
                                                           cpu_seconds: dict[int, float]) -> None:
    model = Model()
    model.update(snapshot(1.0, [listener(1, processes=processes)]), cpu_seconds)
    assert model.listeners[("host", 1)].samples[0].cpu is None


def test_cpu_share_is_cpu_seconds_over_elapsed_seconds_since_the_baseline() -> None:
    samples = [sample(0.0, cpu=1.0), sample(10.0, cpu=2.0), sample(20.0, cpu=4.0), sample(30.0, cpu=9.0)]
    # sustain 10 s from t=30: window starts at t=20, baseline is t=10: (9 - 2) / 20 s.
    window = listener_window(samples, False, 0.9, 0.5, 10.0)
    assert window.cpu_share == pytest.approx(0.35)
    assert window.span == 20.0


def test_cpu_share_of_two_busy_cores_exceeds_one() -> None:
    window = listener_window([sample(0.0, cpu=0.0), sample(1.0, cpu=2.0)], False, 0.9, 0.5, 0.0)
    assert window.cpu_share == pytest.approx(2.0)


@pytest.mark.parametrize("samples", [
    [sample(0.0, cpu=None), sample(1.0, cpu=2.0)],
    [sample(0.0, cpu=1.0), sample(1.0, cpu=None)],
    [sample(1.0, cpu=1.0)],  # one sample: no elapsed time to divide by
])
def test_cpu_share_is_unknown_without_two_timed_samples(samples: list[Sample]) -> None:
    assert listener_window(samples, False, 0.9, 0.5, 10.0).cpu_share is None


def test_cpu_share_is_not_negative_when_an_owner_restarted() -> None:
    # A restarted worker starts its CPU time at zero again.
    window = listener_window([sample(0.0, cpu=50.0), sample(1.0, cpu=0.5)], False, 0.9, 0.5, 0.0)
    assert window.cpu_share == 0.0


def test_window_drops_count_since_the_baseline() -> None:
    samples = [sample(0.0, drops=5), sample(1.0, drops=5), sample(2.0, drops=9)]
    assert listener_window(samples, False, 0.9, 0.5, 1.0).drops == 4
    assert listener_window([sample(0.0, drops=None), sample(1.0, drops=3)], False, 0.9, 0.5, 1.0).drops is None
