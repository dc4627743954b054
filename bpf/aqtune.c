// SPDX-License-Identifier: GPL-2.0
/*
 * aqtune's eBPF programs: what happens to listeners between two sock_diag sweeps.
 *
 * Compiled once by bcc (aqtune/collect/ebpf.py) with constants on the command line:
 *   OFF_*              member offsets resolved from the running kernel's BTF. Kernel structs are
 *                      never dereferenced through header types: the installed headers need not
 *                      match the running kernel, and where they do not, header offsets read garbage.
 *   REASON_LISTEN_OVERFLOW  SKB_DROP_REASON_TCP_LISTEN_OVERFLOW from BTF (kfree_skb path only).
 *   FENTRY_*           which functions get an fentry variant; each also has a kprobe variant that
 *                      userspace attaches when fentry is refused or absent.
 *
 * Everything is keyed by the listener's socket inode: sock_diag reports it, and unlike the socket
 * cookie (assigned lazily, by the first sock_diag dump) it exists from socket() on.
 */
#include <uapi/linux/ptrace.h>

#define TCP_ESTABLISHED 1
#define TCP_SYN_RECV 3
#define TCP_CLOSE 7
#define TCP_LISTEN 10
#define AF_UNIX 1
#define AF_INET 2
#define AF_INET6 10
#define WAIT_BUCKETS 32

#define KREAD(T, base, off) ({ T _v = 0; bpf_probe_read_kernel(&_v, sizeof(_v), (const char *)(base) + (off)); _v; })

enum event_kind {
	EV_ENQUEUE = 1,
	EV_ACK_OVERFLOW = 2,
	EV_SYN_OVERFLOW = 3,
	EV_SYNACK_RETRANS = 4,
	EV_ACCEPT = 5,
	EV_LISTEN = 6,
};

/* Flags userspace sets in `config`: which events go out through the perf buffer. */
#define EMIT_ALL 1    /* aqtune trace: every event */
#define EMIT_DROPS 2  /* the daemon: drops and stalls, which name the peer that was hurt */

struct listener_stats {
	u64 enqueued;
	u64 ack_overflow;
	u64 syn_overflow;
	u64 synack_retrans;
	u64 accepts;
	u32 wait_log2_us[WAIT_BUCKETS];  /* accept() waits, bucket i holds [2^i, 2^(i+1)) us */
	u32 requested_backlog;           /* the last listen() argument; 0 if not seen */
	u32 netns;
};

struct event {
	u64 ts;
	u64 inode;
	u64 value;      /* accept wait in ns, listen() backlog */
	u32 kind;
	u32 netns;
	u32 queue;
	u32 backlog;
	u32 pid;
	u16 port;
	u16 peer_port;
	u16 family;
	u16 pad;
	u8 local[16];
	u8 peer[16];
	char comm[16];
};

struct syscall_enter {  /* the syscalls:sys_enter_* tracepoint record */
	u64 common;
	s64 nr;
	u64 args[6];
};

struct syscall_exit {
	u64 common;
	s64 nr;
	s64 ret;
};

struct listen_call {
	s32 fd;
	u32 backlog;
};

/* LRU where keys come from the network or from other processes: a flood evicts, it never grows. */
BPF_TABLE("lru_hash", u64, struct listener_stats, stats, 16384);
BPF_TABLE("lru_hash", u64, u32, peaks, 16384);           /* inode -> peak queue since userspace drained it */
BPF_TABLE("lru_hash", u64, u64, queued_at, 65536);       /* child sock -> when it entered the queue */
BPF_TABLE("lru_hash", u64, s32, accepting, 4096);        /* thread -> listener fd inside accept() */
BPF_TABLE("lru_hash", u64, struct listen_call, listening, 4096);  /* thread -> listen() arguments */
BPF_ARRAY(config, u32, 2);
BPF_PERF_OUTPUT(events);

static __always_inline u64 sock_inode(const void *sk)
{
	const void *socket = KREAD(const void *, sk, OFF_SK_SOCKET);
	return socket ? KREAD(u64, socket, OFF_SOCKET_INODE) : 0;
}

static __always_inline u32 sock_netns(const void *sk)
{
	const void *net = KREAD(const void *, sk, OFF_SKC_NET);
	return KREAD(u32, net, OFF_NET_INUM);
}

/* Looked up before a zeroed entry is built: that is 176 bytes of stack to clear on every
 * connection, for a listener whose entry exists from its first one on. */
static __always_inline struct listener_stats *stats_of(u64 inode, const void *sk)
{
	struct listener_stats *found = stats.lookup(&inode);
	if (found)
		return found;
	struct listener_stats zero = {};
	zero.netns = sock_netns(sk);
	return stats.lookup_or_try_init(&inode, &zero);
}

/* Whether an event of this kind on this listener goes out: config[0] holds the EMIT_* flags,
 * config[1] a network namespace inode to keep (0: all), so a trace of one namespace is not drowned
 * by a busy neighbour's events in the perf buffer. */
static __always_inline int wanted(u32 kind, const void *sk)
{
	int key = 0;
	u32 *flags = config.lookup(&key);
	if (!flags || !*flags)
		return 0;
	if (!(*flags & EMIT_ALL) && !(kind == EV_ACK_OVERFLOW || kind == EV_SYN_OVERFLOW))
		return 0;
	key = 1;
	u32 *only = config.lookup(&key);
	return !only || !*only || *only == sock_netns(sk);
}

static __always_inline void fill_listener(struct event *e, const void *sk)
{
	e->ts = bpf_ktime_get_ns();
	e->pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(&e->comm, sizeof(e->comm));
	e->family = KREAD(u16, sk, OFF_SKC_FAMILY);
	e->port = KREAD(u16, sk, OFF_SKC_NUM);
	if (e->family == AF_INET6)
		bpf_probe_read_kernel(e->local, 16, (const char *)sk + OFF_SKC_V6_RCV_SADDR);
	else
		bpf_probe_read_kernel(e->local, 4, (const char *)sk + OFF_SKC_RCV_SADDR);
	e->netns = sock_netns(sk);
	e->inode = sock_inode(sk);
	e->queue = KREAD(u32, sk, OFF_ACK_BACKLOG);
	e->backlog = KREAD(u32, sk, OFF_MAX_ACK_BACKLOG);
}

/* The sender of a packet a listener received: IP source address and TCP source port. */
static __always_inline void peer_from_skb(struct event *e, const void *skb)
{
	const char *head = KREAD(const char *, skb, OFF_SKB_HEAD);
	u16 network = KREAD(u16, skb, OFF_SKB_NETWORK_HEADER);
	u16 transport = KREAD(u16, skb, OFF_SKB_TRANSPORT_HEADER);
	u8 version = KREAD(u8, head + network, 0) >> 4;
	if (version == 4)
		bpf_probe_read_kernel(e->peer, 4, head + network + 12);
	else if (version == 6)
		bpf_probe_read_kernel(e->peer, 16, head + network + 8);
	e->peer_port = __builtin_bswap16(KREAD(u16, head + transport, 0));
}

/* A request sock starts with sock_common, which holds the peer as the remote end. */
static __always_inline void peer_from_request(struct event *e, const void *req)
{
	if (e->family == AF_INET6)
		bpf_probe_read_kernel(e->peer, 16, (const char *)req + OFF_SKC_V6_DADDR);
	else
		bpf_probe_read_kernel(e->peer, 4, (const char *)req + OFF_SKC_DADDR);
	e->peer_port = __builtin_bswap16(KREAD(u16, req, OFF_SKC_DPORT));
}

static __always_inline void note_enqueue(void *ctx, const void *sk, u32 queue)
{
	u64 inode = sock_inode(sk);
	if (!inode)
		return;
	struct listener_stats *s = stats_of(inode, sk);
	if (s)
		__sync_fetch_and_add(&s->enqueued, 1);
	u32 *peak = peaks.lookup(&inode);
	if (!peak)
		peaks.update(&inode, &queue);
	else if (queue > *peak)
		*peak = queue;
	if (wanted(EV_ENQUEUE, sk)) {
		struct event e = {};
		fill_listener(&e, sk);
		e.kind = EV_ENQUEUE;
		e.queue = queue;
		events.perf_submit(ctx, &e, sizeof(e));
	}
}

/* An overflow: the listener's queue holds backlog+1 (sk_acceptq_is_full is ack_backlog > max). */
static __always_inline void note_overflow(void *ctx, const void *sk, const void *skb, u32 kind)
{
	u64 inode = sock_inode(sk);
	struct listener_stats *s = inode ? stats_of(inode, sk) : 0;
	if (s) {
		if (kind == EV_ACK_OVERFLOW)
			__sync_fetch_and_add(&s->ack_overflow, 1);
		else
			__sync_fetch_and_add(&s->syn_overflow, 1);
	}
	if (wanted(kind, sk)) {
		struct event e = {};
		fill_listener(&e, sk);
		e.kind = kind;
		peer_from_skb(&e, skb);
		events.perf_submit(ctx, &e, sizeof(e));
	}
}

static __always_inline int acceptq_full(const void *sk)
{
	return KREAD(u32, sk, OFF_ACK_BACKLOG) > KREAD(u32, sk, OFF_MAX_ACK_BACKLOG);
}

/* --- enqueue --- */

/* sock:sk_data_ready(sk): on a listener, right after a connection was queued (6.6+). */
int on_sk_data_ready(struct bpf_raw_tracepoint_args *ctx)
{
	const void *sk = (const void *)ctx->args[0];
	if (KREAD(u8, sk, OFF_SKC_STATE) != TCP_LISTEN)
		return 0;
	u16 family = KREAD(u16, sk, OFF_SKC_FAMILY);
	u32 queue;
	if (family == AF_UNIX)
		queue = KREAD(u32, sk, OFF_SK_RECEIVE_QUEUE_QLEN);
	else if (family == AF_INET || family == AF_INET6)
		queue = KREAD(u32, sk, OFF_ACK_BACKLOG);
	else
		return 0;
	note_enqueue(ctx, sk, queue);
	return 0;
}

/* inet_csk_complete_hashdance(sk, child, req, own_req): where sk_data_ready has no tracepoint
 * (before 6.6). It queues the child when own_req; at entry the child is not counted yet. (Not
 * inet_csk_reqsk_queue_add: measured on Debian's 6.1, it is inlined into this caller and a probe
 * on its out-of-line copy never fires.) */
int on_complete_hashdance(struct pt_regs *ctx)
{
	const void *sk = (const void *)PT_REGS_PARM1(ctx);
	if ((u8)PT_REGS_PARM4(ctx))
		note_enqueue(ctx, sk, KREAD(u32, sk, OFF_ACK_BACKLOG) + 1);
	return 0;
}

#ifdef FENTRY_COMPLETE_HASHDANCE
KFUNC_PROBE(inet_csk_complete_hashdance, void *sk, void *child, void *req, bool own_req)
{
	if (own_req)
		note_enqueue(ctx, sk, KREAD(u32, sk, OFF_ACK_BACKLOG) + 1);
	return 0;
}
#endif

/* sock:inet_sock_set_state(sk, old, new): a child becomes ESTABLISHED as it enters the queue; a
 * listener that closes takes its entries with it (its socket is still attached at this point), so
 * listener churn cannot fill the maps with the dead. */
int on_inet_sock_set_state(struct bpf_raw_tracepoint_args *ctx)
{
	if ((int)ctx->args[1] == TCP_LISTEN && (int)ctx->args[2] == TCP_CLOSE) {
		u64 inode = sock_inode((const void *)ctx->args[0]);
		if (inode) {
			stats.delete(&inode);
			peaks.delete(&inode);
		}
		return 0;
	}
	if ((int)ctx->args[1] != TCP_SYN_RECV || (int)ctx->args[2] != TCP_ESTABLISHED)
		return 0;
	u64 child = ctx->args[0], now = bpf_ktime_get_ns();
	queued_at.update(&child, &now);
	return 0;
}

/* --- overflows --- */

/* skb:kfree_skb(skb, location, reason, rx_sk): the handshake's final ACK dropped at a full queue. */
int on_kfree_skb(struct bpf_raw_tracepoint_args *ctx)
{
#ifdef REASON_LISTEN_OVERFLOW
	if ((u32)ctx->args[2] != REASON_LISTEN_OVERFLOW)
		return 0;
	const void *sk = (const void *)ctx->args[3];
	if (!sk || KREAD(u8, sk, OFF_SKC_STATE) != TCP_LISTEN)
		return 0;
	note_overflow(ctx, sk, (const void *)ctx->args[0], EV_ACK_OVERFLOW);
#endif
	return 0;
}

/* tcp_v4_syn_recv_sock / tcp_v6_syn_recv_sock(sk, skb, ...): the ACK-stage check, where kfree_skb
 * has no listener or reason (before 6.x). */
int on_syn_recv_sock(struct pt_regs *ctx)
{
	const void *sk = (const void *)PT_REGS_PARM1(ctx);
	if (acceptq_full(sk))
		note_overflow(ctx, sk, (const void *)PT_REGS_PARM2(ctx), EV_ACK_OVERFLOW);
	return 0;
}

#ifdef FENTRY_SYN_RECV_SOCK
KFUNC_PROBE(tcp_v4_syn_recv_sock, void *sk, void *skb)
{
	if (acceptq_full(sk))
		note_overflow(ctx, sk, skb, EV_ACK_OVERFLOW);
	return 0;
}

KFUNC_PROBE(tcp_v6_syn_recv_sock, void *sk, void *skb)
{
	if (acceptq_full(sk))
		note_overflow(ctx, sk, skb, EV_ACK_OVERFLOW);
	return 0;
}
#endif

/* tcp_conn_request(rsk_ops, af_ops, sk, skb): a SYN to a full queue is dropped here, freed with
 * consume_skb and seen by no tracepoint. */
int on_conn_request(struct pt_regs *ctx)
{
	const void *sk = (const void *)PT_REGS_PARM3(ctx);
	if (acceptq_full(sk))
		note_overflow(ctx, sk, (const void *)PT_REGS_PARM4(ctx), EV_SYN_OVERFLOW);
	return 0;
}

#ifdef FENTRY_CONN_REQUEST
KFUNC_PROBE(tcp_conn_request, void *rsk_ops, void *af_ops, void *sk, void *skb)
{
	if (acceptq_full(sk))
		note_overflow(ctx, sk, skb, EV_SYN_OVERFLOW);
	return 0;
}
#endif

/* --- handshake stalls --- */

/* tcp:tcp_retransmit_synack(sk, req): the listener resends a SYN-ACK nobody answered in time. */
int on_retransmit_synack(struct bpf_raw_tracepoint_args *ctx)
{
	const void *sk = (const void *)ctx->args[0];
	u64 inode = sock_inode(sk);
	struct listener_stats *s = inode ? stats_of(inode, sk) : 0;
	if (s)
		__sync_fetch_and_add(&s->synack_retrans, 1);
	if (wanted(EV_SYNACK_RETRANS, sk)) {
		struct event e = {};
		fill_listener(&e, sk);
		e.kind = EV_SYNACK_RETRANS;
		peer_from_request(&e, (const void *)ctx->args[1]);
		events.perf_submit(ctx, &e, sizeof(e));
	}
	return 0;
}

/* --- accept() and listen(): from a descriptor to its socket --- */

static __always_inline const void *fd_socket(s64 fd)
{
	const void *task = (const void *)bpf_get_current_task();
	const void *files = KREAD(const void *, task, OFF_TASK_FILES);
	const void *fdt = KREAD(const void *, files, OFF_FILES_FDT);
	const void **fds = KREAD(const void **, fdt, OFF_FDTABLE_FD);
	const void *file = KREAD(const void *, fds, fd * sizeof(void *));
	return file ? KREAD(const void *, file, OFF_FILE_PRIVATE_DATA) : 0;
}

int on_accept_enter(struct syscall_enter *ctx)
{
	u64 thread = bpf_get_current_pid_tgid();
	s32 fd = ctx->args[0];
	accepting.update(&thread, &fd);
	return 0;
}

int on_accept_exit(struct syscall_exit *ctx)
{
	u64 thread = bpf_get_current_pid_tgid();
	s32 *listener_fd = accepting.lookup(&thread);
	if (!listener_fd)
		return 0;
	s32 lfd = *listener_fd;
	accepting.delete(&thread);
	if (ctx->ret < 0)
		return 0;
	const void *child_socket = fd_socket(ctx->ret);
	u64 child = (u64)KREAD(const void *, child_socket, OFF_SOCKET_SK);
	u64 *queued = queued_at.lookup(&child);
	if (!queued)
		return 0;  /* not a TCP child seen entering the queue (Unix, or queued before aqtune) */
	u64 wait = bpf_ktime_get_ns() - *queued;
	queued_at.delete(&child);
	const void *listener_socket = fd_socket(lfd);
	u64 inode = KREAD(u64, listener_socket, OFF_SOCKET_INODE);
	const void *listener = KREAD(const void *, listener_socket, OFF_SOCKET_SK);
	struct listener_stats *s = inode ? stats_of(inode, listener) : 0;
	if (s) {
		__sync_fetch_and_add(&s->accepts, 1);
		u32 bucket = 0;
		u64 us = wait / 1000;
#pragma unroll
		for (int i = 0; i < WAIT_BUCKETS - 1; i++)
			if (us >> (i + 1))
				bucket = i + 1;
		__sync_fetch_and_add(&s->wait_log2_us[bucket & (WAIT_BUCKETS - 1)], 1);
	}
	if (wanted(EV_ACCEPT, listener)) {
		struct event e = {};
		fill_listener(&e, listener);
		e.kind = EV_ACCEPT;
		e.value = wait;
		peer_from_request(&e, (const void *)child);
		events.perf_submit(ctx, &e, sizeof(e));
	}
	return 0;
}

int on_listen_enter(struct syscall_enter *ctx)
{
	u64 thread = bpf_get_current_pid_tgid();
	struct listen_call call = {.fd = ctx->args[0], .backlog = ctx->args[1]};
	listening.update(&thread, &call);
	return 0;
}

int on_listen_exit(struct syscall_exit *ctx)
{
	u64 thread = bpf_get_current_pid_tgid();
	struct listen_call *call = listening.lookup(&thread);
	if (!call)
		return 0;
	struct listen_call made = *call;
	listening.delete(&thread);
	if (ctx->ret != 0)
		return 0;
	const void *socket = fd_socket(made.fd);
	u64 inode = KREAD(u64, socket, OFF_SOCKET_INODE);
	const void *sk = KREAD(const void *, socket, OFF_SOCKET_SK);
	struct listener_stats *s = inode ? stats_of(inode, sk) : 0;
	if (s)
		s->requested_backlog = made.backlog;
	if (wanted(EV_LISTEN, sk)) {
		struct event e = {};
		fill_listener(&e, sk);
		e.kind = EV_LISTEN;
		e.value = made.backlog;
		events.perf_submit(ctx, &e, sizeof(e));
	}
	return 0;
}
