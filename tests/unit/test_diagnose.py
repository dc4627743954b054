"""Example-based checks of the findings: when a listener is saturated, what limits it, whose knob fixes it."""

from __future__ import annotations

import pytest

from aqtune.decide.diagnose import (
    STALLED_CPU_SHARE,
    Finding,
    Raised,
    app_knob,
    diagnose_listener,
    diagnose_namespace,
    owner_label,
)
from aqtune.decide.policy import Limits, Policy
from aqtune.model.history import ListenerWindow, Sample, listener_window
from aqtune.records import Listener, ListenerEvents, Process

# Built-in defaults: somaxconn min 1024, max 65535, step 4; saturation 0.9 / 10 s / clear 0.5.
POLICY = Policy()
NGINX = Process(321, "nginx", "nginx: master process /usr/sbin/nginx", "nginx.service")


def listener(queue: int = 129, backlog: int = 128, processes: tuple[Process, ...] = (NGINX,),
             drops: int | None = 0) -> Listener:
    return Listener("ns1", "tcp", "0.0.0.0:80", 80, queue, backlog, drops, 7, 77, 0, processes)


def window(saturated: bool = True, cpu_share: float | None = None, drops: int | None = 0,
           span: float = 10.0, min_fill: float = 0.0, accepts: int | None = None, peak_queue: int = 0,
           burst_drops: int | None = None, peak_accept_rate: float | None = None) -> ListenerWindow:
    """A judged window; by default a bursty one (the queue drained at some sweep in it)."""
    return ListenerWindow(fill=1.0, peak_fill=1.0, high_for=span, drops=drops, cpu_share=cpu_share,
                          saturated=saturated, span=span, min_fill=min_fill, peak_queue=peak_queue,
                          burst_drops=burst_drops, accepts=accepts, peak_accept_rate=peak_accept_rate)


def ids(findings: list[Finding]) -> list[str]:
    return [f.id for f in findings]


def by_id(findings: list[Finding], finding_id: str) -> Finding:
    return next(f for f in findings if f.id == finding_id)


# --- saturation: sustained, drops, hysteresis (listener_window) ---

def samples(fills: list[float], backlog: int = 100, drops: list[int] | None = None,
            interval: float = 1.0) -> list[Sample]:
    drops = drops or [0] * len(fills)
    return [Sample(i * interval, round(fill * backlog), backlog, d, None)
            for i, (fill, d) in enumerate(zip(fills, drops, strict=True))]


def saturated(fills: list[float], was_saturated: bool = False, sustain: float = 10.0,
              drops: list[int] | None = None) -> bool:
    return listener_window(samples(fills, drops=drops), was_saturated, 0.9, 0.5, sustain).saturated


def test_full_queue_is_saturated_only_once_it_has_stayed_full_for_sustain_seconds() -> None:
    # Ten samples 1 s apart span 9 s: a burst that long is what the queue is there to absorb.
    assert not saturated([1.0] * 10)
    assert saturated([1.0] * 11)
    assert saturated([0.9] * 11)  # the threshold itself counts as high


def test_a_dip_below_fill_ratio_restarts_the_sustain_clock() -> None:
    assert not saturated([1.0] * 6 + [0.89] + [1.0] * 6)
    assert saturated([0.0] * 5 + [1.0] * 11)


def test_drops_in_the_window_saturate_even_a_short_queue() -> None:
    # A drop is a lost connection: no need to wait for the fill to be sustained.
    assert saturated([0.1, 0.1, 0.1], drops=[0, 0, 2])


def test_drops_before_the_window_do_not_count() -> None:
    fills = [0.1] * 20
    assert not saturated(fills, drops=[0, 4] + [4] * 18, sustain=5.0)
    assert saturated(fills, drops=[0] * 16 + [4] * 4, sustain=5.0)


def test_zero_sustain_judges_the_latest_sample_alone() -> None:
    # What a one-shot `aqtune status` does: one sample, "sustained" means "now".
    assert saturated([1.0], sustain=0.0)
    assert not saturated([1.0, 0.5], sustain=0.0)


def test_saturated_stays_saturated_until_fill_falls_below_clear_ratio() -> None:
    assert saturated([0.6], was_saturated=True)
    assert saturated([0.5], was_saturated=True)  # clear_ratio itself still holds
    assert not saturated([0.49], was_saturated=True)
    # The same fill does not make an unsaturated listener saturated: that takes fill_ratio.
    assert not saturated([0.6], was_saturated=False)


def test_saturated_with_drops_stays_saturated_below_clear_ratio() -> None:
    assert saturated([0.0, 0.0], was_saturated=True, drops=[0, 1])


# --- the saturated finding itself ---

def test_no_findings_for_an_unsaturated_listener() -> None:
    assert diagnose_listener(listener(queue=10), window(saturated=False), 128, None, None, POLICY) == []


def test_saturated_finding_comes_first_with_its_figures() -> None:
    findings = diagnose_listener(listener(), window(drops=3), 128, None, None, POLICY)
    first = findings[0]
    assert first.id == "saturated"
    assert "129/128" in first.text and "3 dropped connection attempts (clients retry them)" in first.text
    assert "in bursts" in first.text
    assert first.evidence["queue"] == 129 and first.evidence["backlog"] == 128 and first.evidence["drops"] == 3


def test_one_shot_saturation_says_now_and_the_drops_since_listen() -> None:
    findings = diagnose_listener(listener(drops=40), window(span=0.0), 128, None, None, POLICY)
    assert "a snapshot, not a trend" in findings[0].text
    assert "40 drops since it started listening" in findings[0].text
    assert ids(findings) == ["saturated"], "no configuration advice from one sample"


# --- capped by somaxconn or by the application ---

def test_backlog_at_somaxconn_with_unknown_request_is_capped_by_somaxconn() -> None:
    findings = diagnose_listener(listener(), window(), 128, None, None, POLICY)
    assert ids(findings) == ["saturated", "capped-by-somaxconn"]
    capped = findings[1]
    assert "unknown" in capped.text
    # Measured: 129 queued x 1.25 headroom -> 256, but at least the policy's min (1024).
    assert "raise somaxconn there to 1024 (the worst burst seen: 129 queued + 0 dropped" in capped.text
    assert "netns ns1" in capped.text
    assert {k: v for k, v in capped.evidence.items() if k != "basis"} == {
        "backlog": 128, "somaxconn": 128, "requested": None, "target": 1024}


def test_request_above_somaxconn_is_capped_by_somaxconn_and_asks_for_the_request() -> None:
    findings = diagnose_listener(listener(), window(), 128, 4096, None, POLICY)
    assert ids(findings) == ["saturated", "capped-by-somaxconn"]
    capped = findings[1]
    assert "the application asked for 4096" in capped.text
    assert "raise somaxconn there to 4096" in capped.text
    assert "`systemctl restart nginx.service`" in capped.text  # it must listen() again; a reload keeps the backlog


def test_request_equal_to_somaxconn_is_the_applications_own_limit() -> None:
    # The application got all it asked for: raising somaxconn alone changes nothing.
    findings = diagnose_listener(listener(), window(), 128, 128, None, POLICY)
    assert ids(findings) == ["saturated", "capped-by-app"]
    text = findings[1].text
    assert "backlog=256" in text  # 129 queued + 25% headroom, rounded up to a power of two
    assert "raise net.core.somaxconn in netns ns1 to at least 256" in text  # the new backlog needs room too


def test_backlog_below_somaxconn_is_capped_by_app_without_a_somaxconn_change() -> None:
    findings = diagnose_listener(listener(queue=101, backlog=100), window(), 4096, None, None, POLICY)
    assert ids(findings) == ["saturated", "capped-by-app"]
    assert "raise net.core.somaxconn" not in findings[1].text
    assert findings[1].evidence["target"] == 128  # 101 queued + 25% -> 126 -> 128


def test_capped_by_app_names_the_owner_pid_and_unit() -> None:
    findings = diagnose_listener(listener(queue=101, backlog=100), window(), 4096, None, None, POLICY)
    assert "nginx (pid 321, nginx.service)'s own" in findings[1].text


def test_capped_advice_never_exceeds_the_policy_max() -> None:
    policy = Policy(somaxconn=Limits(max=2000, min=1024, step=4.0))
    findings = diagnose_listener(listener(queue=1001, backlog=1000), window(), 1000, None, None, policy)
    assert by_id(findings, "capped-by-somaxconn").evidence["target"] == 2000


SERVICE = "app.service"


def proc(comm: str, cmdline: str | None = None, pid: int = 500, unit: str | None = SERVICE) -> Process:
    return Process(pid, comm, cmdline if cmdline is not None else comm, unit)


@pytest.mark.parametrize("processes,expected", [
    ((proc("nginx"),), "add `backlog=1024` to the `listen` directive"),
    ((proc("apache2"),), "`ListenBacklog 1024`"),
    ((proc("httpd"),), "`ListenBacklog 1024`"),
    ((proc("haproxy"),), "backlog 1024"),
    ((proc("php-fpm8.2", "php-fpm: pool www"),), "`listen.backlog = 1024`"),
    ((proc("gunicorn"),), "--backlog 1024"),
    # gunicorn without setproctitle keeps the interpreter's comm: the app it runs gives it away.
    ((Process(500, "python3", "/usr/bin/python3 -m gunicorn app:app", SERVICE, exe="python3.11", app="gunicorn"),),
     "--backlog 1024"),
    ((proc("node", "node server.js"),), "backlog: 1024"),
    ((proc("redis-server", "/usr/bin/redis-server 127.0.0.1:6379"),), "`tcp-backlog 1024`"),
    ((proc("postgres", "/usr/lib/postgresql/15/bin/postgres"),), "2 x MaxBackends"),
    # Socket activation: systemd called listen(), so its Backlog= is what counts, whoever accepts.
    ((proc("systemd", "/sbin/init", pid=1, unit="init.scope"), proc("nginx", unit="web.service")),
     "set `Backlog=1024` in the [Socket] section of the .socket unit"),
    ((proc("myserver"),), "raise the backlog it passes to listen() to 1024"),
    ((), "raise the backlog it passes to listen() to 1024"),
])
def test_capped_by_app_advice_names_the_owners_own_knob(processes: tuple[Process, ...], expected: str) -> None:
    assert expected in app_knob(processes, 1024)
    findings = diagnose_listener(listener(queue=1001, backlog=1000, processes=processes), window(), 4096, None,
                                 None, POLICY)
    assert expected.replace("1024", "2048") in by_id(findings, "capped-by-app").text


def test_owner_label_counts_the_other_holders_and_lists_their_units() -> None:
    holders = (proc("nginx", pid=10, unit="b.service"), proc("nginx", pid=11, unit="a.service"),
               proc("nginx", pid=12, unit=None))
    assert owner_label(holders) == "nginx (pid 10 and 2 more, a.service, b.service)"
    assert owner_label((proc("nginx", pid=10, unit=None),)) == "nginx (pid 10)"
    assert owner_label(()) == "its owner (no process found holding the socket)"


# --- relisten-needed ---

def test_relisten_needed_when_somaxconn_was_raised_but_the_listener_kept_the_old_backlog() -> None:
    findings = diagnose_listener(listener(), window(), 4096, None, Raised(original=128, applied=4096), POLICY)
    assert ids(findings) == ["saturated", "relisten-needed"]
    text = findings[1].text
    assert "raised from 128 to 4096" in text and "still has backlog 128" in text
    assert "`systemctl restart nginx.service`" in text  # nginx -s reload keeps the old backlog


def test_relisten_advice_without_a_service_unit_names_the_program_and_pid() -> None:
    owner = (proc("myserver", unit="session-2.scope"),)
    findings = diagnose_listener(listener(processes=owner), window(), 4096, None, Raised(128, 4096), POLICY)
    assert by_id(findings, "relisten-needed").text.endswith("restart myserver (pid 500)")


def test_a_listener_that_relistened_is_judged_afresh() -> None:
    # It now has the raised backlog, which is somaxconn's limit again: ask for more, not for a relisten.
    findings = diagnose_listener(listener(queue=4097, backlog=4096), window(), 4096, None, Raised(128, 4096), POLICY)
    assert ids(findings) == ["saturated", "capped-by-somaxconn"]


def test_no_relisten_when_the_record_did_not_raise_anything() -> None:
    findings = diagnose_listener(listener(), window(), 128, None, Raised(original=128, applied=128), POLICY)
    assert "relisten-needed" not in ids(findings)


def test_no_relisten_when_the_application_asked_for_no_more_than_it_has() -> None:
    # eBPF saw listen(fd, 128); somaxconn was 128 and is now 4096: listen() again still gives 128.
    findings = diagnose_listener(listener(), window(), 4096, 128, Raised(original=128, applied=4096), POLICY)
    assert ids(findings) == ["saturated", "capped-by-app"]


def test_relisten_needed_after_a_second_raise_for_a_listener_at_the_first_raised_value() -> None:
    # Default policy from somaxconn 128: first raise 128 -> 512 (step 4), nginx reloads and gets 512,
    # still full: 512 -> 2048. nginx has not reloaded again, so it must, not change its config.
    findings = diagnose_listener(listener(queue=513, backlog=512), window(), 2048, None,
                                 Raised(original=128, applied=2048, earlier=(512,)), POLICY)
    assert "relisten-needed" in ids(findings)


# --- stalled workers ---

def test_stalled_workers_get_no_advice_to_lengthen_the_queue() -> None:
    # Full all window while the owners idle: one limiting factor, the workers; never also the backlog.
    findings = diagnose_listener(listener(), window(cpu_share=0.0, min_fill=1.0), 128, None, None, POLICY)
    assert ids(findings) == ["saturated", "stalled-workers"]
    assert "worker_connections" in findings[1].text  # nginx's own worker knob
    findings = diagnose_listener(listener(queue=101, backlog=100), window(cpu_share=0.0, min_fill=1.0), 4096, None,
                                 None, POLICY)
    assert ids(findings) == ["saturated", "stalled-workers"]


def test_accepts_stopped_is_stalled_whatever_the_cpu() -> None:
    findings = diagnose_listener(listener(), window(cpu_share=0.9, min_fill=1.0, accepts=0), 128, None, None, POLICY)
    assert ids(findings) == ["saturated", "stalled-workers"]
    assert "accepted nothing for 10 s" in findings[1].text


def test_a_queue_that_never_drains_while_workers_accept_is_workers_saturated() -> None:
    findings = diagnose_listener(listener(), window(cpu_share=0.98, min_fill=1.0, accepts=5000), 128, None, None,
                                 POLICY)
    assert ids(findings) == ["saturated", "workers-saturated"]
    assert "accepts 500/s" in findings[1].text and "98% of a CPU" in findings[1].text
    assert "persistently" in findings[0].text


def test_long_queue_waits_name_the_workers_even_at_a_low_fill() -> None:
    events = ListenerEvents(enqueued=60, peak_queue=48, ack_overflow=0, syn_overflow=None, synack_retransmits=0,
                            accepts=12, queue_wait_ms={"p50": 2.0, "p99": 40.0}, requested_backlog=None,
                            oldest_queued_ms=17_000.0)
    php = (Process(900, "php-fpm8.2", "php-fpm: master process", "php8.2-fpm.service"),)
    findings = diagnose_listener(listener(queue=48, backlog=4096, processes=php), window(saturated=False), 4096,
                                 None, None, POLICY, events)
    assert ids(findings) == ["queue-wait"]
    assert "17.0 s" in findings[0].text and "pm.max_children" in findings[0].text


def test_bursts_get_one_measured_number_with_its_basis() -> None:
    findings = diagnose_listener(listener(queue=3), window(min_fill=0.0, peak_queue=129, burst_drops=300,
                                                           accepts=20000), 128, None, None, POLICY)
    capped = by_id(findings, "capped-by-somaxconn")
    # (129 + 300) x 1.25 = 536 -> 1024: the number, its basis, and the same number as the target.
    assert capped.evidence["target"] == 1024
    assert "raise somaxconn there to 1024 (the worst burst seen: 129 queued + 300 dropped in one sweep = 429" \
        in capped.text
    assert "stalled-workers" not in ids(findings) and "workers-saturated" not in ids(findings)


def test_the_number_is_bounded_by_what_the_accept_rate_drains_in_max_queue_wait() -> None:
    # At their fastest the workers drain 100 connections/s, so 100 within the default 1,000 ms.
    findings = diagnose_listener(listener(queue=3, backlog=64), window(min_fill=0.0, peak_queue=65, burst_drops=500,
                                                                      accepts=300, peak_accept_rate=100.0),
                                 4096, None, None, POLICY)
    capped = by_id(findings, "capped-by-app")
    assert capped.evidence["target"] == 65  # the power of two below 100, but more than the backlog now
    assert "bounded by what the workers drain at their fastest (100 accepts/s)" in capped.text


def test_workers_that_cannot_drain_their_queue_in_time_are_the_limit_not_the_queue() -> None:
    # 13 connections/s at best against a backlog of 64: a longer queue would only make them wait longer.
    findings = diagnose_listener(listener(queue=3, backlog=64), window(min_fill=0.0, peak_queue=65, burst_drops=20,
                                                                      accepts=40, peak_accept_rate=13.0),
                                 64, 2147483647, None, POLICY)
    assert ids(findings) == ["saturated", "workers-saturated"]
    assert "drains at most 13 connections/s" in findings[1].text


@pytest.mark.parametrize("cpu_share", [STALLED_CPU_SHARE, 0.5, 3.0, None])
def test_busy_or_unmeasured_workers_are_not_stalled(cpu_share: float | None) -> None:
    findings = diagnose_listener(listener(), window(cpu_share=cpu_share), 128, None, None, POLICY)
    assert "stalled-workers" not in ids(findings)


def test_idle_owners_of_an_unsaturated_queue_are_not_stalled() -> None:
    assert diagnose_listener(listener(queue=0), window(saturated=False, cpu_share=0.0), 128, None, None,
                             POLICY) == []


# --- namespace (SYN queue) findings ---

def ns(syncookies: int | None, **deltas: int) -> list[str]:
    sysctls = {"net.ipv4.tcp_max_syn_backlog": 512}
    if syncookies is not None:
        sysctls["net.ipv4.tcp_syncookies"] = syncookies
    return ids(diagnose_namespace("ns1", sysctls, deltas))


def test_syn_queue_full_needs_syncookies_off_and_reqq_drops() -> None:
    assert ns(0, TCPReqQFullDrop=5, ListenDrops=5) == ["syn-queue-full"]
    assert ns(1, TCPReqQFullDrop=5, ListenDrops=5) == []
    assert ns(0, ListenDrops=0) == []


def test_syn_backlog_limit_counts_drops_no_other_counter_explains() -> None:
    # ListenDrops also counts accept-queue overflows and full-SYN-queue drops; only the rest is the
    # tcp_max_syn_backlog rule (or rarer causes), and raising it only helps with syncookies off.
    assert ns(0, ListenDrops=10, ListenOverflows=3, TCPReqQFullDrop=2) == ["syn-queue-full", "syn-backlog-limit"]
    assert ns(0, ListenDrops=10, ListenOverflows=10) == []
    assert ns(0, ListenDrops=10, ListenOverflows=4, TCPReqQFullDrop=6) == ["syn-queue-full"]
    assert ns(1, ListenDrops=10) == []


def test_syn_backlog_limit_text_gives_the_unexplained_drops_and_the_sysctl() -> None:
    findings = diagnose_namespace("ns1", {"net.ipv4.tcp_syncookies": 0, "net.ipv4.tcp_max_syn_backlog": 512},
                                  {"ListenDrops": 9, "ListenOverflows": 2})
    assert findings[0].id == "syn-backlog-limit"
    assert "7 SYNs dropped" in findings[0].text and "(512)" in findings[0].text
    assert findings[0].evidence["tcp_syncookies"] == 0


@pytest.mark.parametrize("syncookies", [1, 2])
@pytest.mark.parametrize("counter", ["TCPReqQFullDoCookies", "SyncookiesSent"])
def test_syncookies_active_when_cookies_are_on_and_being_sent(syncookies: int, counter: str) -> None:
    assert ns(syncookies, **{counter: 3}) == ["syncookies-active"]


def test_cookie_counters_without_syncookies_on_are_not_syncookies_active() -> None:
    assert ns(0, SyncookiesSent=3) == []


@pytest.mark.parametrize("syncookies", [0, 1, 2, None])
def test_flat_counters_give_no_namespace_findings(syncookies: int | None) -> None:
    assert ns(syncookies, ListenOverflows=0, ListenDrops=0, TCPReqQFullDrop=0, TCPReqQFullDoCookies=0,
              SyncookiesSent=0, SyncookiesFailed=0, TCPSynRetrans=0) == []
    assert ns(syncookies) == []


@pytest.mark.parametrize("requested", [2147483647, 65535])
def test_listen_int_max_follows_somaxconn_and_needs_no_application_change(requested: int) -> None:
    # systemd's Backlog= default and php-fpm's listen.backlog default pass INT_MAX to listen().
    findings = diagnose_listener(listener(), window(), 128, requested, None, POLICY)
    capped = by_id(findings, "capped-by-somaxconn")
    assert "needs no change of its own" in capped.text
    assert f"raise somaxconn there to {capped.evidence['target']}" in capped.text
    assert capped.evidence["target"] == 1024 and str(requested) not in capped.text.split("raise")[1]


def test_a_backlog_above_somaxconn_was_granted_earlier_and_is_not_capped_by_it() -> None:
    # After a rollback lowered somaxconn to 64, a listener still holding 1024 is not "at somaxconn's limit".
    findings = diagnose_listener(listener(queue=1025, backlog=1024), window(), 64, 1024, None, POLICY)
    assert "capped-by-somaxconn" not in ids(findings)
    text = by_id(findings, "capped-by-app").text
    assert "granted when somaxconn was higher (it is 64 now" in text


def test_cpu_share_is_measured_over_the_time_the_queue_has_been_full() -> None:
    # Idle for 20 s, then a full queue while the owner uses 93% of a core: not stalled at the onset.
    history = [Sample(float(t), 0, 100, 0, 0.0) for t in range(20)]
    history += [Sample(float(t), 101, 100, 0, 0.93 * (t - 19)) for t in range(20, 31)]
    judged = listener_window(history, False, 0.9, 0.5, 10.0)
    assert judged.saturated and judged.cpu_share is not None and judged.cpu_share > 0.9


def test_short_measured_waits_mean_the_accept_rate_seen_is_no_bound() -> None:
    # 100 accepts/s were all the bursts brought; connections waited 4 ms at most: the workers keep up.
    events = ListenerEvents(enqueued=300, peak_queue=65, ack_overflow=0, syn_overflow=None, synack_retransmits=0,
                            accepts=300, queue_wait_ms={"p50": 1.0, "p99": 4.0}, requested_backlog=None,
                            oldest_queued_ms=0.0)
    findings = diagnose_listener(listener(queue=3, backlog=64), window(min_fill=0.0, peak_queue=65, burst_drops=500,
                                                                      accepts=300, peak_accept_rate=100.0),
                                 4096, None, None, POLICY, events)
    capped = by_id(findings, "capped-by-app")
    assert capped.evidence["target"] == 1024 and "bounded" not in capped.text  # (65 + 500) x 1.25 -> 1024
