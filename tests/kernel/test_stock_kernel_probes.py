"""kprobes and fentry on tcp_conn_request load, attach and read a listener's accept queue correctly.

The proof that the stock-kernel tier works end to end: where the host kernel has neither (this
project's VMs), these tests skip, and tests/qemu/run-kernel-tier.sh runs them on Debian's stock
kernels, 6.1 (Debian 12, bcc 0.26) and 6.12 (Debian 13, bcc 0.31). One BPF program carries both
probes and is compiled once for the module, because under qemu's TCG a bcc compile against the
kernel headers takes about 45 s.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.helpers.namespace import TestNamespace, wait_until
from tests.kernel import capabilities

pytestmark = pytest.mark.kernel

BACKLOG = 4
CONNECTS = 12
FULL = BACKLOG + 1  # sk_acceptq_is_full() is ack_backlog > max, so the queue holds backlog + 1
PROBE_IDS = {"kprobe": 1, "fentry": 2}

PROGRAM = r"""
#include <net/sock.h>

/* The listener under test: its network namespace's inode and its port. Set from user space. */
struct target_t {
    u32 netns;
    u32 port;
};
/* One count per probe and accept-queue state seen as a SYN reaches the listener. */
struct seen_t {
    u32 probe;
    u32 ack_backlog;
    u32 max_ack_backlog;
};

BPF_ARRAY(target, struct target_t, 1);
BPF_HASH(seen, struct seen_t, u64, 256);

static __always_inline int record(u32 probe, u32 netns, u32 port, u32 ack_backlog, u32 max_ack_backlog)
{
    u32 zero = 0;
    struct target_t *want = target.lookup(&zero);
    if (!want || want->netns != netns || want->port != port)
        return 0;
    struct seen_t key = {};
    key.probe = probe;
    key.ack_backlog = ack_backlog;
    key.max_ack_backlog = max_ack_backlog;
    seen.increment(key);
    return 0;
}

/* kprobe: bcc rewrites these dereferences into bpf_probe_read_kernel() calls. */
int conn_request_kprobe(struct pt_regs *ctx, void *rsk_ops, void *af_ops, struct sock *sk)
{
    return record(PROBE_KPROBE, sk->__sk_common.skc_net.net->ns.inum, sk->__sk_common.skc_num,
                  sk->sk_ack_backlog, sk->sk_max_ack_backlog);
}

/* fentry: BTF-typed arguments, plain loads that the verifier checks. */
KFUNC_PROBE(tcp_conn_request, void *rsk_ops, void *af_ops, struct sock *sk)
{
    return record(PROBE_FENTRY, sk->__sk_common.skc_net.net->ns.inum, sk->__sk_common.skc_num,
                  sk->sk_ack_backlog, sk->sk_max_ack_backlog);
}
"""


@dataclass
class Probes:
    bpf: Any  # bcc.BPF
    attach_errors: dict[str, str] = field(default_factory=dict)

    def watch(self, netns_inode: int, port: int) -> None:
        """Count only this listener's SYNs, from now on."""
        self.bpf[b"seen"].clear()
        target = self.bpf[b"target"]
        target[target.Key(0)] = target.Leaf(netns_inode, port)

    def seen(self, probe: str) -> dict[tuple[int, int], int]:
        """(ack_backlog, max_ack_backlog) -> how many SYNs ``probe`` saw with the queue so."""
        return {(key.ack_backlog, key.max_ack_backlog): count.value
                for key, count in self.bpf[b"seen"].items() if key.probe == PROBE_IDS[probe]}


def kfunc_program(bpf: Any, function: str) -> bytes:
    """The name bcc gave ``KFUNC_PROBE(function)``: ``kfunc__<function>`` in bcc 0.26 (Debian 12),
    ``kfunc__vmlinux__<function>`` in 0.31 (Debian 13), which names the BTF module too. attach_kfunc
    only prefixes ``kfunc__``, so it is given the full name."""
    from bcc import libbcc

    names = [libbcc.lib.bpf_function_name(bpf.module, i) for i in range(libbcc.lib.bpf_num_functions(bpf.module))]
    wanted = {f"kfunc__{function}".encode(), f"kfunc__vmlinux__{function}".encode()}
    found = [name for name in names if name in wanted]
    assert len(found) == 1, f"no single fentry program for {function} among {names}"
    return bytes(found[0])


def _attach(probes: Probes, probe: str, attach: Callable[[], object]) -> None:
    try:
        attach()
    except Exception as exc:  # bcc raises bare Exception; the errno is in ctypes' copy
        code = ctypes.get_errno()
        probes.attach_errors[probe] = f"{exc} (errno {code}: {os.strerror(code)})" if code else str(exc)


@pytest.fixture(scope="module")
def probes() -> Iterator[Probes]:
    """The program compiled and loaded once; each probe attached on its own, so that one failing
    to attach is reported by its own test."""
    from bcc import BPF

    class ExplicitBPF(BPF):  # type: ignore[misc]
        def _trace_autoload(self) -> None:
            """bcc would attach kfunc__ functions itself and raise at the first failure."""

    text = PROGRAM.replace("PROBE_KPROBE", str(PROBE_IDS["kprobe"])).replace("PROBE_FENTRY", str(PROBE_IDS["fentry"]))
    bpf = ExplicitBPF(text=text.encode())  # bcc 0.26 warns about str arguments
    loaded = Probes(bpf)
    _attach(loaded, "kprobe", lambda: bpf.attach_kprobe(event=b"tcp_conn_request", fn_name=b"conn_request_kprobe"))
    _attach(loaded, "fentry", lambda: bpf.attach_kfunc(fn_name=kfunc_program(bpf, "tcp_conn_request")))
    try:
        yield loaded
    finally:
        bpf.cleanup()


def test_kprobe_events_interface() -> None:
    """kprobes are there the two ways tools use them: tracefs's kprobe_events and perf's kprobe PMU."""
    events = capabilities.kprobe_events_file()
    if events is None and not any(d.is_dir() and any(d.iterdir()) for d in capabilities.TRACEFS_DIRS):
        capabilities.unavailable("tracefs is not mounted at /sys/kernel/tracing, so kprobe_events cannot be seen")
    assert events is not None, f"tracefs has no kprobe_events in {[str(d) for d in capabilities.TRACEFS_DIRS]}"
    events.read_text()  # readable: lists the kprobes defined through tracefs (none, normally)
    assert capabilities.KPROBE_PMU.exists(), f"no kprobe PMU at {capabilities.KPROBE_PMU}"
    assert int(capabilities.KPROBE_PMU.read_text()) > 0


@pytest.mark.parametrize("probe", ["kprobe", "fentry"])
def test_probe_on_tcp_conn_request_sees_the_queue_fill(
        probe: str, probes: Probes, netns: Callable[[], TestNamespace]) -> None:
    """A never-accepting listen(4) gets 12 non-blocking connects in a fresh namespace: the probe sees
    every SYN with the listener's limit, sees the queue full (backlog + 1), and the kernel agrees."""
    if probe in probes.attach_errors:
        error = probes.attach_errors[probe]
        message = f"{probe} on tcp_conn_request did not attach: {error}"
        if capabilities.is_refusal(error):
            capabilities.unavailable(message)
        pytest.fail(message, pytrace=False)

    ns = netns()
    listener = ns.listen(f"tcp4:{BACKLOG}")
    port = listener.ready()["listeners"][0]["port"]
    probes.watch(ns.inode, port)
    before = ns.nstat()
    flood = ns.flood([(f"tcp:127.0.0.1:{port}", CONNECTS)])
    outcome = flood.ready()["targets"][0]
    assert outcome.get("in_progress", 0) + outcome.get("connected", 0) == CONNECTS, outcome

    # The first SYNs complete their handshakes and fill the queue; the ones after (and the 1 s
    # retransmits) find it full. Polling, because loopback handshakes finish in softirq context.
    wait_until(lambda: probes.seen(probe).get((FULL, BACKLOG)), f"{probe} to see a full queue ({FULL}/{BACKLOG})",
               timeout=10)
    queue = wait_until(lambda: ns.ss_tcp().get(f"127.0.0.1:{port}"), "ss to list the listener")
    flood.stop()
    listener.stop()  # no more SYNs: the counts below are final
    seen = probes.seen(probe)
    after = ns.nstat()

    assert seen, f"{probe} saw no SYN for 127.0.0.1:{port}"
    assert {limit for _, limit in seen} == {BACKLOG}, f"{probe} read max_ack_backlog {seen} for listen({BACKLOG})"
    lengths = {ack for ack, _ in seen}
    assert min(lengths) == 0 and max(lengths) == FULL, \
        f"{probe} should read the queue from empty (first SYN) to full ({FULL}): {seen}"
    assert sum(seen.values()) >= CONNECTS, f"{probe} saw {sum(seen.values())} SYNs for {CONNECTS} connects"
    assert (queue.queue, queue.backlog) == (FULL, BACKLOG), f"ss shows {queue}"
    overflows = after.get("TcpExtListenOverflows", 0) - before.get("TcpExtListenOverflows", 0)
    full_seen = seen[(FULL, BACKLOG)]
    print(f"{probe} on {os.uname().release}: (ack_backlog, max) -> SYNs {dict(sorted(seen.items()))}; "
          f"ss Recv-Q/Send-Q {queue.queue}/{queue.backlog}; ListenOverflows {overflows}")
    # Each SYN that finds the queue full is one overflow; the kernel also counts the handshakes
    # that complete while it is full, which tcp_conn_request never sees.
    assert 0 < full_seen <= overflows, f"{probe} saw {full_seen} SYNs on a full queue; the kernel counted {overflows}"
