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
 *   OFF_SYSCALL_ARG0, 1  where a syscall's saved registers hold its first two arguments; without
 *                      them the syscalls' entry tracepoints keep the arguments (on_syscall_enter).
 *   EMIT_FLAGS         which events go out through the perf buffer (EMIT_* below; 0: none).
 *   ONLY_NETNS         the network namespace inode whose events go out (0: every namespace).
 *   Both are fixed for the programs' life, so they are constants rather than a map read on every
 *   connection, and the compiler drops the event code altogether where nothing is emitted.
 *
 * Everything is keyed by the listener's socket inode: sock_diag reports it, and unlike the socket
 * cookie (assigned lazily, by the first sock_diag dump) it exists from socket() on.
 */
#include <uapi/linux/ptrace.h>

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

/* EMIT_FLAGS bits: which events go out through the perf buffer. */
#define EMIT_ALL 1    /* aqtune trace: every event */
#define EMIT_DROPS 2  /* the daemon: drops and stalls, which name the peer that was hurt */
#ifndef EMIT_FLAGS
#define EMIT_FLAGS 0
#endif
#ifndef ONLY_NETNS
#define ONLY_NETNS 0
#endif

struct listener_stats {
	u64 enqueued;
	u64 ack_overflow;
	u64 syn_overflow;
	u64 synack_retrans;
	u32 requested_backlog;           /* the last listen() argument; 0 if not seen */
	u32 netns;
	u32 seq_base;                    /* numbers this entry's connections apart from an evicted one's */
};

/* What accept() saw, apart from `stats`: the accepting CPU writes only here, so the cache lines the
 * enqueueing CPU writes do not move between the two on every connection. */
struct accept_stats {
	u64 accepts;
	u32 next_seq;                    /* the connection the next accept() takes, if it saw every one */
	u32 wait_log2_us[WAIT_BUCKETS];  /* accept() waits, bucket i holds [2^i, 2^(i+1)) us */
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

struct syscall_exit {
	u64 common;
	s64 nr;
	s64 ret;
};

/* When a connection was queued, for its accept() to time its wait (and for userspace to tell the
 * age of the oldest one still queued). The accept queue is first in, first out, so connection
 * number n (counting enqueues) is the one accept() takes when n - 1 have been taken: a listener's
 * stamps go to consecutive slots of one array from a place its inode chooses. Consecutive slots
 * keep the cache warm, and an array slot costs no lock, allocation or hash bucket: measured, an LRU
 * hash keyed by connection made the enqueue probe cost 940 ns instead of 110. Two listeners whose
 * runs meet overwrite each other's stamps; the tag tells, and those waits go untimed rather than
 * wrong.
 *
 * The enqueue writes the time, then the tag; an accept() on another CPU reads the tag, then the
 * time. On x86 stores and loads keep their order; on weakly ordered CPUs (arm64, POWER) they do not,
 * and a reader could see the new tag with the previous occupant's time. So the tag is written with
 * an exchange and read with a compare-and-exchange: BPF's value-returning atomics (BPF_XCHG,
 * BPF_CMPXCHG, BPF_FETCH) are fully ordered, as the kernel's atomic_xchg()/cmpxchg() are (arm64's
 * JIT emits SWPAL/CASAL, or LDAXR/STLXR and DMB ISH), so the time is visible before the tag that
 * vouches for it, and read after it. A plain store and load with a compiler barrier would be right
 * on x86 alone. What is left: a slot overwritten, while its connection is still queued, between
 * the reader's tag and time reads (a few ns) gives that one wait the newer time. */
#define STAMP_SLOTS (1 << 17)
#define STAMP_MULTIPLIER 2654435761u  /* spreads listeners' runs over the array (Knuth's) */

struct stamp {
	u64 tag;  /* listener inode << 32 | connection number; written last, read first */
	u64 ts;   /* bpf_ktime_get_ns() at the enqueue */
};

/* LRU where keys come from the network or from other processes: a flood evicts, it never grows. */
BPF_TABLE("lru_hash", u64, struct listener_stats, stats, 16384);
BPF_TABLE("lru_hash", u64, struct accept_stats, accepted, 16384);
BPF_TABLE("lru_hash", u64, u32, peaks, 16384);           /* inode -> peak queue since userspace drained it */
BPF_ARRAY(stamps, struct stamp, STAMP_SLOTS);
/* When each accepted connection was accepted, for its age: slot `inode & ACCEPT_SLOT_MASK` of an
 * array, keyed by the accepted socket's inode. Not by socket cookie: the kernel assigns a cookie
 * only when something asks for one (sock_diag, SO_COOKIE), so at accept() it is still 0, and
 * sock_diag reports the inode of established sockets too.
 *
 * One u64 per slot: the inode's bits above the slot number (the tag) in the top ACCEPT_TAG_BITS,
 * bpf_ktime_get_ns() >> ACCEPT_TIME_SHIFT (1.024 us units, 36 years in 50 bits) below, 0 for
 * never written. One aligned 64-bit store, so a reader (userspace) sees a stamp whole, old or new,
 * with no ordering to get right. Measured, an LRU hash keyed by inode made the accept probe cost
 * 940 ns more; an array slot costs a store. Nothing here sees a connection close (that takes a
 * probe on every socket's state changes), and nothing needs to: the kernel hands out socket (and
 * pipe) inode numbers from one increasing counter, so a slot is taken over once 2^ACCEPT_SLOT_BITS
 * more inodes were made on the host, and the older socket's age then reads as unknown (the tag
 * differs), never wrong. */
#define ACCEPT_SLOT_BITS 19  /* 4 MiB; at 7,500 accepts a second a stamp lasts over a minute */
#define ACCEPT_SLOT_MASK ((1 << ACCEPT_SLOT_BITS) - 1)
#define ACCEPT_TAG_BITS 14  /* inode numbers are 32-bit (get_next_ino): 32 - ACCEPT_SLOT_BITS bits, and more */
#define ACCEPT_TIME_SHIFT 10
BPF_ARRAY(accept_times, u64, 1 << ACCEPT_SLOT_BITS);
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

/* Looked up before a zeroed entry is built: that, and reading the namespace, would otherwise be
 * done on every connection, for a listener whose entry exists from its first one on. */
static __always_inline struct listener_stats *stats_of(u64 inode, const void *sk)
{
	struct listener_stats *found = stats.lookup(&inode);
	if (found)
		return found;
	struct listener_stats zero = {};
	zero.netns = sock_netns(sk);
	zero.seq_base = bpf_ktime_get_ns();
	return stats.lookup_or_try_init(&inode, &zero);
}

/* Whether an event of this kind on this listener goes out; ONLY_NETNS keeps a trace of one
 * namespace from being drowned by a busy neighbour's events in the perf buffer. Constants: with
 * EMIT_FLAGS 0 this is 0, and the callers' event code compiles to nothing. */
static __always_inline int wanted(u32 kind, const void *sk)
{
	int drop = kind == EV_ACK_OVERFLOW || kind == EV_SYN_OVERFLOW;
	if (!((EMIT_FLAGS & EMIT_ALL) || ((EMIT_FLAGS & EMIT_DROPS) && drop)))
		return 0;
	return !ONLY_NETNS || sock_netns(sk) == ONLY_NETNS;
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

static __always_inline struct stamp *stamp_slot(u64 inode, u32 seq)
{
	int index = ((u32)inode * STAMP_MULTIPLIER + seq) & (STAMP_SLOTS - 1);
	return stamps.lookup(&index);
}

/* Connection `seq`'s stamp, or NULL when its slot holds another's. The compare-and-exchange writes
 * back what is there (nothing changes) and orders the caller's read of slot->ts after the tag's. */
static __always_inline struct stamp *stamp_of(u64 inode, u32 seq)
{
	struct stamp *slot = stamp_slot(inode, seq);
	u64 tag = inode << 32 | seq;
	return slot && __sync_val_compare_and_swap(&slot->tag, tag, tag) == tag ? slot : 0;
}

static __always_inline void note_enqueue(void *ctx, const void *sk, u32 queue)
{
	u64 inode = sock_inode(sk);
	if (!inode)
		return;
	struct listener_stats *s = stats_of(inode, sk);
	if (s) {
		u32 seq = s->seq_base + __sync_fetch_and_add(&s->enqueued, 1) + 1;
		struct stamp *slot = stamp_slot(inode, seq);
		if (slot) {
			/* The time before the tag: an accept() on another CPU may already be reading. The
			 * exchange orders the two stores (see struct stamp); the compiler barrier keeps
			 * clang from sinking the time's store below it (__sync_lock_test_and_set is only an
			 * acquire barrier to the compiler, though BPF_XCHG is fully ordered). */
			slot->ts = bpf_ktime_get_ns();
			asm volatile("" ::: "memory");
			__sync_lock_test_and_set(&slot->tag, inode << 32 | seq);
		}
	}
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

/* A syscall's first `count` arguments (one or two), at its exit tracepoint, on success (ret >= 0).
 *
 * Where userspace defines OFF_SYSCALL_ARG0 and 1 (an architecture it knows, a kernel with
 * bpf_task_pt_regs), they are read from the registers the syscall saved on entry: an entry probe
 * costs a map update per call, and every process's syscalls pay for the sys_enter hook. Elsewhere
 * on_syscall_enter keeps them per thread from the sys_enter_* tracepoints. */
#ifdef OFF_SYSCALL_ARG0
static __always_inline int syscall_args(s64 ret, u64 *args, int count)
{
	if (ret < 0)
		return 0;
	const void *regs = (const void *)bpf_task_pt_regs(bpf_get_current_task_btf());
	args[0] = KREAD(u64, regs, OFF_SYSCALL_ARG0);
	if (count > 1)
		args[1] = KREAD(u64, regs, OFF_SYSCALL_ARG1);
	return 1;
}
#else
struct syscall_enter {  /* the syscalls:sys_enter_* tracepoint record */
	u64 common;
	s64 nr;
	u64 args[6];
};

struct saved_args {
	u64 args[2];
};

BPF_TABLE("lru_hash", u64, struct saved_args, entered, 4096);  /* thread -> arguments */

int on_syscall_enter(struct syscall_enter *ctx)
{
	u64 thread = bpf_get_current_pid_tgid();
	struct saved_args saved = {.args = {ctx->args[0], ctx->args[1]}};
	entered.update(&thread, &saved);
	return 0;
}

static __always_inline int syscall_args(s64 ret, u64 *args, int count)
{
	u64 thread = bpf_get_current_pid_tgid();
	struct saved_args *saved = entered.lookup(&thread);
	if (!saved)
		return 0;
	args[0] = saved->args[0];
	if (count > 1)
		args[1] = saved->args[1];
	entered.delete(&thread);
	return ret >= 0;
}
#endif

/* The current task's descriptor table: current->files->fdt->fd. */
static __always_inline const void **fd_table(void)
{
	const void *task = (const void *)bpf_get_current_task();
	const void *files = KREAD(const void *, task, OFF_TASK_FILES);
	const void *fdt = KREAD(const void *, files, OFF_FILES_FDT);
	return KREAD(const void **, fdt, OFF_FDTABLE_FD);
}

/* The struct socket behind descriptor `fd` of that table (file->private_data), or NULL. */
static __always_inline const void *fd_socket_in(const void **fds, s64 fd)
{
	const void *file = KREAD(const void *, fds, fd * sizeof(void *));
	return file ? KREAD(const void *, file, OFF_FILE_PRIVATE_DATA) : 0;
}

static __always_inline const void *fd_socket(s64 fd)
{
	return fd_socket_in(fd_table(), fd);
}

/* Bucket i of the wait histogram holds [2^i, 2^(i+1)) us. */
static __always_inline u32 log2_bucket(u64 us)
{
	u32 bucket = 0;
#pragma unroll
	for (int shift = 16; shift; shift >>= 1)
		if (us >> shift) {
			us >>= shift;
			bucket += shift;
		}
	return bucket < WAIT_BUCKETS ? bucket : WAIT_BUCKETS - 1;
}

int on_accept_exit(struct syscall_exit *ctx)
{
	u64 args[1];
	if (!syscall_args(ctx->ret, args, 1))
		return 0;
	const void **fds = fd_table();
	const void *listener_socket = fd_socket_in(fds, args[0]);
	u64 inode = KREAD(u64, listener_socket, OFF_SOCKET_INODE);
	if (!inode)
		return 0;
	u64 now = bpf_ktime_get_ns();
	const void *child_socket = fd_socket_in(fds, ctx->ret);
	u64 child = KREAD(u64, child_socket, OFF_SOCKET_INODE);
	int index = child & ACCEPT_SLOT_MASK;
	u64 *accepted_at = accept_times.lookup(&index);
	if (child && accepted_at)
		*(volatile u64 *)accepted_at = (child >> ACCEPT_SLOT_BITS) << (64 - ACCEPT_TAG_BITS)
					       | (now >> ACCEPT_TIME_SHIFT) & ((1ull << (64 - ACCEPT_TAG_BITS)) - 1);
	struct accept_stats zero = {}, *a = accepted.lookup(&inode);
	if (!a)
		a = accepted.lookup_or_try_init(&inode, &zero);
	if (!a)
		return 0;
	__sync_fetch_and_add(&a->accepts, 1);
	const void *listener = KREAD(const void *, listener_socket, OFF_SOCKET_SK);
	u32 queue = KREAD(u16, listener, OFF_SKC_FAMILY) == AF_UNIX ? KREAD(u32, listener, OFF_SK_RECEIVE_QUEUE_QLEN)
								    : KREAD(u32, listener, OFF_ACK_BACKLOG);
	/* Which connection was taken: the one after the last one taken, as long as its stamp is there
	 * and, with nothing left queued, no newer one is. Otherwise (the first accept aqtune sees, or
	 * one it missed, as through io_uring) count back from the enqueue side: what is still queued
	 * came after the one taken, so it is number enqueued - queue. That reads `stats`, a cache line
	 * the enqueueing CPU writes, so it is kept for when the short way fails. Accepts racing on
	 * several threads, or an enqueue half done, can make either way one off: the neighbour's
	 * time is used. */
	u32 seq = a->next_seq;
	struct stamp *slot = stamp_of(inode, seq);
	if (!slot || (!queue && stamp_of(inode, seq + 1))) {
		struct listener_stats *s = stats.lookup(&inode);
		if (!s)
			return 0;  /* nothing was seen entering this listener's queue */
		seq = s->seq_base + s->enqueued - queue;
		slot = stamp_of(inode, seq);
	}
	a->next_seq = seq + 1;
	if (!slot)
		return 0;  /* queued before aqtune started, or its stamp was overwritten */
	/* stamp_of() read the tag with a fully ordered atomic: this read of the time comes after it. */
	u64 wait = now - slot->ts;
	__sync_fetch_and_add(&a->wait_log2_us[log2_bucket(wait / 1000)], 1);
	if (wanted(EV_ACCEPT, listener)) {
		struct event e = {};
		fill_listener(&e, listener);
		e.kind = EV_ACCEPT;
		e.value = wait;
		peer_from_request(&e, KREAD(const void *, child_socket, OFF_SOCKET_SK));
		events.perf_submit(ctx, &e, sizeof(e));
	}
	return 0;
}

int on_listen_exit(struct syscall_exit *ctx)
{
	u64 args[2];
	if (!syscall_args(ctx->ret, args, 2))
		return 0;
	const void *socket = fd_socket(args[0]);
	u32 backlog = args[1];
	u64 inode = KREAD(u64, socket, OFF_SOCKET_INODE);
	const void *sk = KREAD(const void *, socket, OFF_SOCKET_SK);
	struct listener_stats *s = inode ? stats_of(inode, sk) : 0;
	if (s)
		s->requested_backlog = backlog;
	if (wanted(EV_LISTEN, sk)) {
		struct event e = {};
		fill_listener(&e, sk);
		e.kind = EV_LISTEN;
		e.value = backlog;
		events.perf_submit(ctx, &e, sizeof(e));
	}
	return 0;
}
