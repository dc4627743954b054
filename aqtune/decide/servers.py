"""What aqtune knows about the servers that own listeners, in one table.

Per server: how to recognise it from its processes (the executable, or for an interpreted server the
program the interpreter runs, never a word somewhere in its arguments), the knob that sets its
listen() backlog and that knob's default, what limits how fast it accepts (workers, connections),
what lets a connection hold a worker, how a new backlog takes effect, and which of its processes are
workers. The phrase builders turn an entry into advice. Pure: records.Process values in, text out.

The defaults are the compiled-in ones (Debian's shipped configuration where it differs is said as
such); the integration tier starts each Debian-packaged server and checks its default backlog.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from aqtune.records import Process

INT_MAX = 2**31 - 1
# A listen() argument at or above this is "as much as allowed": somaxconn decides, the app needs no change.
FOLLOWS_SOMAXCONN = 65535

RESTART = "restart"
RELOAD = "reload"

# Which of a server's processes holding the listener are its workers.
CHILDREN = "children"  # the processes whose parent also holds it (a master and the workers it forked)
SINGLE = "single"  # every holder is one worker (an event loop, a single-threaded server)
UNSEEN = "unseen"  # the workers do not hold the listener (PostgreSQL backends, a socket unit's service)


@dataclass(frozen=True, slots=True)
class Knob:
    name: str  # as written in the server's configuration or on its command line
    default: str
    note: str = ""

    def text(self) -> str:
        return f"`{self.name}` (default {self.default}{'; ' + self.note if self.note else ''})"


@dataclass(frozen=True, slots=True)
class Server:
    key: str
    name: str
    exes: tuple[str, ...] = ()  # patterns fully matching the executable's basename (or comm where it is unknown)
    apps: tuple[str, ...] = ()  # interpreted servers: the script or module (records.Process.app) it must be
    threaded: bool | None = None  # tells Apache's MPMs apart: event's workers run threads, prefork's do not
    backlog_knob: str | None = None  # with {n}; None where the server has no backlog setting
    backlog_default: int | None = None  # the listen() argument by default; None where unknown
    backlog_default_text: str = "unknown"
    backlog_note: str = ""
    capacity: str = ""  # what its worker knobs multiply to
    workers: tuple[Knob, ...] = ()
    holds: tuple[Knob, ...] = ()  # what lets one connection occupy a worker, and for how long
    relisten: str = RESTART  # what makes it call listen() again with the new backlog
    relisten_command: str = ""  # how, where no system unit runs it
    relisten_note: str = ""
    worker_pids: str = SINGLE

    @property
    def follows_somaxconn(self) -> bool:
        """Whether by default it asks listen() for as much as allowed, so somaxconn alone is the limit."""
        return self.backlog_default is not None and self.backlog_default >= FOLLOWS_SOMAXCONN


NGINX = Server(
    key="nginx", name="nginx", exes=("nginx",),
    backlog_knob="add `backlog={n}` to the `listen` directive for this address (`listen ... backlog={n};`)",
    backlog_default=511, backlog_default_text="511",
    capacity="worker_processes x worker_connections connections at once (a proxied request uses two)",
    workers=(Knob("worker_processes", "1", "Debian's nginx.conf: auto, one per CPU"),
             Knob("worker_connections", "512", "Debian's nginx.conf: 768")),
    holds=(Knob("client_header_timeout", "60s"), Knob("client_body_timeout", "60s"),
           Knob("keepalive_timeout", "75s"), Knob("send_timeout", "60s")),
    relisten=RESTART, relisten_command="`nginx -s quit`, then start nginx again",
    relisten_note="`nginx -s reload` keeps an open listener's backlog unless its backlog= changed, "
                  "so a raised somaxconn alone needs a restart",
    worker_pids=CHILDREN,
)

_APACHE_BACKLOG = "set `ListenBacklog {n}` in the Apache configuration (apache2.conf or httpd.conf)"
_APACHE_HOLDS = (
    Knob("RequestReadTimeout", "header=20-40,MinRate=500 body=20,MinRate=500",
         "mod_reqtimeout, enabled by Debian: cuts clients that send a request slowly"),
    Knob("KeepAliveTimeout", "5", "seconds an idle keep-alive connection keeps its worker"),
    Knob("Timeout", "60", "Debian's apache2.conf: 300"),
)
_APACHE_STOP = "`apachectl -k stop`, then start Apache again"
_APACHE_GRACEFUL = "a graceful restart (`apachectl -k graceful`, `systemctl reload`) keeps the open listeners"
APACHE_EVENT = Server(
    key="apache-event", name="Apache (event MPM)", exes=("apache2", "httpd"), threaded=True,
    backlog_knob=_APACHE_BACKLOG, backlog_default=511, backlog_default_text="511",
    capacity="MaxRequestWorkers requests at once (ServerLimit x ThreadsPerChild threads); "
             "idle keep-alive connections wait without a thread",
    workers=(Knob("MaxRequestWorkers", "400", "ServerLimit 16 x ThreadsPerChild 25; Debian's mpm_event.conf: 150"),
             Knob("ThreadsPerChild", "25"), Knob("ServerLimit", "16")),
    holds=_APACHE_HOLDS,
    relisten=RESTART, relisten_command=_APACHE_STOP, relisten_note=_APACHE_GRACEFUL,
    worker_pids=CHILDREN,
)
APACHE_PREFORK = Server(
    key="apache-prefork", name="Apache (prefork MPM)", exes=("apache2", "httpd"), threaded=False,
    backlog_knob=_APACHE_BACKLOG, backlog_default=511, backlog_default_text="511",
    capacity="MaxRequestWorkers connections at once, one child process each, idle keep-alive ones included",
    workers=(Knob("MaxRequestWorkers", "256", "Debian's mpm_prefork.conf: 150; above ServerLimit raise that too"),
             Knob("ServerLimit", "256")),
    holds=(*_APACHE_HOLDS,
           Knob("the event MPM", "prefork here", "keeps idle keep-alive connections off the workers "
                "(`a2dismod mpm_prefork; a2enmod mpm_event`, with PHP through php-fpm)")),
    relisten=RESTART, relisten_command=_APACHE_STOP, relisten_note=_APACHE_GRACEFUL,
    worker_pids=CHILDREN,
)
PHP_FPM = Server(
    key="php-fpm", name="php-fpm", exes=(r"php-fpm[0-9.]*",),
    backlog_knob="set `listen.backlog = {n}` in the pool's configuration (pool.d/*.conf)",
    backlog_default=INT_MAX,
    backlog_default_text="as much as somaxconn allows (php-fpm 8.2 passes INT_MAX to listen())",
    capacity="pm.max_children requests at once per pool, one child process each",
    workers=(Knob("pm.max_children", "none: every pool sets it", "Debian's www.conf: 5"),
             Knob("pm", "dynamic", "Debian's www.conf")),
    holds=(Knob("request_terminate_timeout", "0 (never)", "ends a request that holds a child longer"),
           Knob("pm.max_children", "none: every pool sets it")),
    relisten=RESTART, relisten_command="stop the php-fpm master and start it again",
    worker_pids=CHILDREN,
)
HAPROXY = Server(
    key="haproxy", name="HAProxy", exes=("haproxy",),
    backlog_knob="set `backlog {n}` in the frontend (or on its `bind` line)",
    backlog_default=None, backlog_default_text="the frontend's maxconn, itself the global maxconn unless set",
    capacity="maxconn connections at once (global, and per frontend)",
    workers=(Knob("maxconn", "global: from the file descriptor limit; per frontend: the global one",
                  "connections beyond it wait in the accept queue"),
             Knob("nbthread", "one per CPU")),
    holds=(Knob("timeout client", "none (infinite; HAProxy warns)"),
           Knob("timeout http-request", "none", "cuts clients that send a request slowly"),
           Knob("timeout http-keep-alive", "timeout http-request's")),
    relisten=RESTART, relisten_command="stop the master process, then start HAProxy again",
    relisten_note="a reload (SIGUSR2, `systemctl reload`) hands the open listeners to the new workers "
                  "with their old backlog",
    worker_pids=CHILDREN,
)
REDIS = Server(
    key="redis", name="Redis", exes=("redis-server", "redis-check-rdb"),  # Debian links the one to the other
    backlog_knob="set `tcp-backlog {n}` in redis.conf",
    backlog_default=511, backlog_default_text="511",
    backlog_note="Redis warns at start when somaxconn is lower",
    capacity="one thread runs every command: one CPU core is its ceiling",
    workers=(Knob("io-threads", "1", "offloads socket I/O only"), Knob("maxclients", "10000")),
    holds=(Knob("timeout", "0 (idle clients are never closed)"), Knob("tcp-keepalive", "300")),
    relisten=RESTART, relisten_command="`redis-cli shutdown`, then start redis-server again",
    relisten_note="tcp-backlog takes effect only at start; CONFIG SET cannot change it",
    worker_pids=SINGLE,
)
GUNICORN = Server(
    key="gunicorn", name="gunicorn", apps=("gunicorn", "gunicorn3"),
    backlog_knob="start gunicorn with `--backlog {n}` (`backlog = {n}` in its configuration file)",
    backlog_default=2048, backlog_default_text="2048",
    capacity="workers x threads requests at once (a sync worker serves one)",
    workers=(Knob("--workers", "1"), Knob("--threads", "1"), Knob("--worker-class", "sync")),
    holds=(Knob("--timeout", "30", "seconds before a silent worker is killed and replaced"),
           Knob("--keep-alive", "2"),
           Knob("--worker-class", "sync", "an async class (gevent, eventlet) or a buffering proxy in front "
                "keeps slow clients off the workers")),
    relisten=RESTART, relisten_command="stop the gunicorn master (SIGTERM) and start it again",
    relisten_note="HUP replaces the workers, not the listening socket",
    worker_pids=CHILDREN,
)
UVICORN = Server(
    key="uvicorn", name="uvicorn", apps=("uvicorn",),
    backlog_knob="start uvicorn with `--backlog {n}`",
    backlog_default=2048, backlog_default_text="2048",
    capacity="one event loop per worker process",
    workers=(Knob("--workers", "1"), Knob("--limit-concurrency", "none")),
    holds=(Knob("--timeout-keep-alive", "5"),),
    relisten=RESTART, relisten_command="stop uvicorn (SIGTERM) and start it again",
    worker_pids=SINGLE,
)
UWSGI = Server(
    key="uwsgi", name="uWSGI", exes=("uwsgi", "uwsgi-core", r"uwsgi[0-9.]+"),
    backlog_knob="start uWSGI with `--listen {n}` (`listen = {n}` in its ini file)",
    backlog_default=100, backlog_default_text="100",
    backlog_note="uWSGI refuses to start when it exceeds somaxconn",
    capacity="processes x threads requests at once",
    workers=(Knob("--processes", "1"), Knob("--threads", "1")),
    holds=(Knob("--harakiri", "0 (off)", "seconds before a stuck worker is killed"),
           Knob("--socket-timeout", "4")),
    relisten=RESTART, relisten_command="stop the uWSGI master (SIGINT) and start it again",
    relisten_note="a graceful reload (SIGHUP) keeps the listening socket",
    worker_pids=CHILDREN,
)
POSTGRESQL = Server(
    key="postgresql", name="PostgreSQL", exes=("postgres", "postmaster"),
    backlog_knob=None, backlog_default=None,
    backlog_default_text="2 x MaxBackends = 2 x (max_connections + autovacuum_max_workers + 1 + "
                         "max_worker_processes + max_wal_senders), 244 with the defaults, up to PostgreSQL 16; "
                         "2 x max_connections from 17",
    capacity="max_connections sessions, one backend process each",
    workers=(Knob("max_connections", "100"),),
    holds=(Knob("idle_session_timeout", "0 (off)"), Knob("idle_in_transaction_session_timeout", "0 (off)"),
           Knob("statement_timeout", "0 (off)")),
    relisten=RESTART, relisten_command="`pg_ctl restart -D DATADIR`",
    relisten_note="max_connections, and with it the backlog, changes only at a restart",
    worker_pids=UNSEEN,
)
NODE = Server(
    key="node", name="Node.js", exes=("node", "nodejs", r"node[0-9]+"),
    backlog_knob="pass the backlog to server.listen() (`server.listen({{port, backlog: {n}}})`)",
    backlog_default=511, backlog_default_text="511",
    capacity="one event loop, one CPU core, per process",
    workers=(Knob("the cluster module", "none: one process", "or more processes sharing the port"),),
    holds=(Knob("server.headersTimeout", "60000 ms"), Knob("server.requestTimeout", "300000 ms"),
           Knob("server.keepAliveTimeout", "5000 ms")),
    relisten=RESTART, relisten_command="stop the node process and start it again",
    worker_pids=SINGLE,
)
SYSTEMD_SOCKET = Server(
    key="systemd-socket", name="a systemd .socket unit", exes=("systemd",),
    backlog_knob="set `Backlog={n}` in the [Socket] section of the .socket unit",
    backlog_default=2**32 - 1, backlog_default_text="4294967295: as much as somaxconn allows",
    capacity="the service it starts decides; with Accept=yes, MaxConnections= instances at once",
    workers=(Knob("the service's own worker settings", "per server"),
             Knob("MaxConnections=", "64", "Accept=yes sockets only")),
    holds=(Knob("the service's own timeouts", "per server"),),
    relisten=RESTART, relisten_command="",
    relisten_note="systemd creates the listener: restarting only the service keeps the old one",
    worker_pids=UNSEEN,
)
GENERIC = Server(
    key="generic", name="the program",
    backlog_knob="raise the backlog it passes to listen() to {n}",
    capacity="its own worker or thread count, and what its workers wait on",
    workers=(),
    holds=(),
    relisten=RESTART,
    worker_pids=SINGLE,
)

# Order matters only where two entries could claim one process: Apache's event entry comes first,
# as Debian's default MPM, for processes whose threads are unknown.
TABLE: tuple[Server, ...] = (
    NGINX, APACHE_EVENT, APACHE_PREFORK, PHP_FPM, HAPROXY, REDIS, GUNICORN, UVICORN, UWSGI, POSTGRESQL, NODE,
    SYSTEMD_SOCKET, GENERIC,
)
_PATTERNS = {server.key: re.compile("|".join(f"(?:{p})" for p in server.exes)) for server in TABLE if server.exes}

# Units whose listeners root must not be told to restart: the journal, the system bus, logins.
# (PID 1's own sockets are told apart from .socket units in _socket_relisten.)
_SYSTEM_COMPONENTS = re.compile(
    r"dbus(?:-broker)?\.(?:service|socket)|systemd-journald(?:@.+)?\.service|"
    r"systemd-journald(?:-dev-log|-audit)?(?:@.+)?\.socket|systemd-logind\.service")


def _is_manager(process: Process) -> bool:
    """A systemd manager (PID 1, a user's, a container's): the one that holds .socket units' listeners."""
    return process.pid == 1 or (process.exe or process.comm) == "systemd"


def _matches(server: Server, process: Process) -> bool:
    if server.apps:
        # The program the interpreter runs, as procfs read it from argv; a script run directly
        # (shebang) is also named by comm, which is all there is where the exe is unknown.
        return process.app in server.apps or (not process.exe and process.comm in server.apps)
    pattern = _PATTERNS.get(server.key)
    if pattern is None:
        return False
    # The executable first: comm is 15 bytes any process can set. Where the exe is unreadable or is
    # a multi-call binary under another name (Debian's redis-server is redis-check-rdb), comm.
    return bool(pattern.fullmatch(process.exe) or pattern.fullmatch(process.comm))


def _threaded_workers(processes: tuple[Process, ...]) -> bool | None:
    """Whether the workers (children of another holder) run several threads; None when unknown."""
    counts = [p.threads for p in workers_of(processes) if p.threads]
    if not counts:
        return None
    return max(counts) > 1


def workers_of(processes: Iterable[Process]) -> tuple[Process, ...]:
    """The holders whose parent also holds the listener: a master's workers."""
    processes = tuple(processes)
    pids = {p.pid for p in processes}
    return tuple(p for p in processes if p.ppid in pids and p.ppid != p.pid)


def identify(processes: Iterable[Process]) -> Server:
    """The server that owns a listener, from the processes holding it.

    A listener systemd holds (PID 1 or a user's or container's manager) or handed over (LISTEN_FDS) is
    a .socket unit's whatever the service is: the unit's Backlog= sets its backlog. Otherwise the
    first table entry one holder matches by executable (interpreted servers by the program their
    interpreter runs), else the generic entry.
    """
    processes = tuple(processes)
    if any(_is_manager(p) or p.socket_activated for p in processes):
        return SYSTEMD_SOCKET
    threaded = _threaded_workers(processes)
    for server in TABLE:
        if server is SYSTEMD_SOCKET or server is GENERIC:
            continue
        if server.threaded is not None and threaded is not None and server.threaded != threaded:
            continue
        if any(_matches(server, p) for p in processes):
            return server
    return GENERIC


def workers(server: Server, processes: Iterable[Process]) -> tuple[Process, ...]:
    """The processes that count as ``server``'s workers among those holding its listener."""
    processes = tuple(processes)
    if server.worker_pids == CHILDREN:
        return workers_of(processes) or processes  # a master alone serves by itself
    if server.worker_pids == SINGLE:
        return processes
    return ()


def backlog_knob_text(server: Server, n: int) -> str:
    """How to make ``server`` ask listen() for ``n``, with the knob's default."""
    if server.backlog_knob is None:
        return (f"{server.name} has no backlog setting: it asks listen() for {server.backlog_default_text}; "
                f"raise {server.workers[0].name} or put a connection pooler in front")
    text = server.backlog_knob.format(n=n) + f" (default {server.backlog_default_text}"
    if server.follows_somaxconn:
        text += ", so with the default only somaxconn needs raising"
    return text + (f"; {server.backlog_note})" if server.backlog_note else ")")


def worker_knob_text(server: Server) -> str:
    """What limits how many connections ``server`` serves at once, with each knob's default."""
    knobs = ", ".join(knob.text() for knob in server.workers)
    return f"{server.name}: {server.capacity}" + (f": {knobs}" if knobs else "")


def hold_knob_text(server: Server) -> str:
    """What bounds how long one connection can occupy one of ``server``'s workers."""
    knobs = ", ".join(knob.text() for knob in server.holds)
    return f"{server.name}: " + (knobs or "its own client and request timeouts")


def system_component(processes: Iterable[Process]) -> str | None:
    """The system unit (or PID 1) among the holders that no advice may tell root to restart."""
    for process in processes:
        if process.container is None and process.unit and _SYSTEM_COMPONENTS.fullmatch(process.unit):
            return process.unit
    return None


def _system_services(processes: Iterable[Process]) -> list[str]:
    return sorted({p.unit for p in processes
                   if p.unit and p.unit.endswith(".service") and p.container is None and not _is_manager(p)})


def _socket_unit_of(service: str) -> str:
    # foo.service and the instances foo@N.service of an Accept=yes socket are started by foo.socket.
    return service.removesuffix(".service").split("@", 1)[0] + ".socket"


def _socket_relisten(processes: tuple[Process, ...]) -> str:
    services = _system_services(processes)
    note = SYSTEMD_SOCKET.relisten_note
    if services:
        sockets = sorted({_socket_unit_of(s) for s in services})
        return (f"`systemctl stop {' '.join(services + sockets)} && systemctl start {' '.join(sockets)}` "
                f"({note}; `systemctl list-sockets` names the .socket unit if it is named otherwise)")
    others = [p for p in processes if not _is_manager(p)]
    user_units = sorted({p.user_unit for p in processes if p.user_unit and p.user_unit.endswith(".service")})
    if user_units or any(p.user_unit for p in processes if _is_manager(p)):
        sockets = sorted({_socket_unit_of(u) for u in user_units}) or ["its .socket unit"]
        return (f"a user's .socket unit ({', '.join(sockets)}) under that user's manager: that user restarts it "
                f"with `systemctl --user` ({note})")
    containers = sorted({p.container for p in processes if p.container})
    if containers:
        return f"restart the .socket unit inside container {', '.join(containers)} ({note})"
    if not others and any(p.pid == 1 for p in processes):
        return ("held only by systemd (PID 1): if `systemctl list-sockets` lists this address, restart that "
                ".socket unit (its service stopped first); if not, it is systemd's own socket and takes a new "
                "backlog only after a reboot")
    return f"restart the .socket unit that listens here (`systemctl list-sockets` names it; {note})"


def relisten_text(server: Server, processes: Iterable[Process]) -> str:
    """How to make the holders of a listener call listen() again, so a new backlog or somaxconn applies.

    Names the system unit where there is one, a user's or a container's unit as such, else the
    program and its pid; never tells root to restart PID 1, the journal or the system bus.
    """
    processes = tuple(processes)
    component = system_component(processes)
    if component is not None:
        return (f"{component} is a system component: its listener takes a new backlog only after a reboot, "
                "and aqtune gives no restart command for it")
    if server is SYSTEMD_SOCKET:
        return _socket_relisten(processes)
    note = f" ({server.relisten_note})" if server.relisten_note else ""
    services = _system_services(processes)
    if services:
        verb = "reload-or-restart" if server.relisten == RELOAD else "restart"
        return f"`systemctl {verb} {' '.join(services)}`{note}"
    containers = sorted({(p.container, p.unit or "") for p in processes if p.container})
    if containers:
        where = ", ".join(f"{unit} in container {container}" if unit.endswith(".service") else
                          f"{server.name} in container {container}" for container, unit in containers)
        return f"restart {where}, from inside the container{note}"
    user_units = sorted({p.user_unit for p in processes if p.user_unit})
    if user_units:
        return (f"it runs as a user's unit ({', '.join(user_units)}), not a system service: its user restarts "
                f"it with `systemctl --user restart {' '.join(user_units)}`{note}")
    masters = [p for p in processes if p not in workers_of(processes)] or list(processes)
    name = server.name if server is not GENERIC or not masters else masters[0].exe or masters[0].comm
    who = f"{name} (pid {masters[0].pid})" if masters else name
    how = f": {server.relisten_command}" if server.relisten_command else ""
    return f"{'reload' if server.relisten == RELOAD else 'restart'} {who}{how}{note}"


def app_knob(processes: Iterable[Process], backlog: int) -> str:
    """Drop-in for diagnose.app_knob: the owner's backlog knob set to ``backlog``."""
    return backlog_knob_text(identify(processes), backlog)


def relisten_action(processes: Iterable[Process]) -> str:
    """Drop-in for diagnose._relisten_action: how the owner listens again."""
    processes = tuple(processes)
    return relisten_text(identify(processes), processes)
