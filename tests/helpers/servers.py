"""Real, Debian-packaged servers started inside a test network namespace, each with a private
configuration in its own temporary directory: a given (or the default) backlog, few workers, no
files outside that directory, stopped cleanly (and killed if they do not go) when the test ends.

    with start(ns, "nginx", backlog=64) as server:
        server.address  # "127.0.0.1:8080", as aqtune and ss show the listener
        server.pids()   # the processes holding it

The packages are installed by the Makefile's TEST_DEBS; a server whose package is missing is a
skip that names the package. The servers listen on loopback only, in the namespace.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.namespace import TestNamespace, wait_until

PORT = 8080  # each namespace has its own loopback, so one port serves every server
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
WEB_USER = "www-data"  # Apache and php-fpm refuse to serve as root

WSGI_APP = '''\
import time


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/slow":
        time.sleep(float(environ.get("QUERY_STRING") or 1))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\\n"]
'''

NODE_SERVER = '''\
const http = require("http");
const [port, backlog] = process.argv.slice(2).map(Number);
const server = http.createServer((req, res) => res.end("ok\\n"));
const options = {host: "127.0.0.1", port};
if (backlog) options.backlog = backlog;
server.listen(options);
process.on("SIGTERM", () => process.exit(0));
'''

SLOW_PHP = '''<?php
usleep((int)(($_GET["s"] ?? 1) * 1000000));
echo "ok\\n";
'''


@dataclass
class Launch:
    """How to start one server: its argv, the listener it opens, the user it runs as."""

    argv: list[str]
    address: str  # as aqtune and ss name the listener
    holders: int  # processes holding the listener once it is up (master + workers)
    user: str | None = None  # run as this user (setpriv) instead of root
    stop_signal: int = signal.SIGTERM
    unix: bool = False


@dataclass
class RealServer:
    kind: str
    ns: TestNamespace
    workdir: Path
    launch: Launch
    popen: subprocess.Popen[bytes]
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.launch.address

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        for name in ("error.log", "php-fpm.log", "redis.log", "postgres.log"):
            path = self.workdir / name
            if path.exists():
                text += f"\n--- {name}\n" + path.read_text(errors="replace")[-4000:]
        return text[-8000:]

    def pids(self) -> frozenset[int]:
        rows = self.ns.ss_unix(owners=True) if self.launch.unix else self.ns.ss_tcp(owners=True)
        row = rows.get(self.address)
        return row.pids if row is not None else frozenset()

    def wait_up(self) -> None:
        def up() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.kind} exited {self.popen.returncode} while starting:\n{self.output()}")
            return len(self.pids()) >= self.launch.holders

        try:
            wait_until(up, f"{self.kind} listening on {self.address} with {self.launch.holders} holders",
                       timeout=START_TIMEOUT, interval=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.output()}") from None

    def signal_all(self, signum: int) -> None:
        """Send ``signum`` to every process holding the listener (SIGSTOP/SIGCONT to stall the server)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def stop(self) -> None:
        """The server's own shutdown signal, then SIGKILL for whatever of it is left in the namespace."""
        self.signal_all(signal.SIGCONT)
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, self.launch.stop_signal)
            try:
                self.popen.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=STOP_TIMEOUT)
        # Workers that outlive their master (and the namespace's other helpers are the test's own:
        # only what this server started is in its process group).
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            left = _group_members(self.popen.pid)
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _need(path_glob: str, package: str) -> str:
    found = sorted(glob.glob(path_glob))
    if not found:
        pytest.skip(f"{path_glob} not found: install Debian's {package} (make test-deps does)")
    return found[-1]


def _user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        pytest.skip(f"user {name} does not exist (Debian's packages create it)")


def _nginx(workdir: Path, backlog: int | None, options: dict[str, str]) -> Launch:
    nginx = _need("/usr/sbin/nginx", "nginx")
    workers = int(options.get("workers", "2"))
    backlog_arg = f" backlog={backlog}" if backlog is not None else ""
    reuseport = " reuseport" if options.get("reuseport") else ""
    (workdir / "nginx.conf").write_text(f"""\
daemon off;
master_process on;
worker_processes {workers};
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    server {{
        listen 127.0.0.1:{PORT}{backlog_arg}{reuseport};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
""")
    holders = 1 + workers
    return Launch([nginx, "-p", str(workdir), "-e", f"{workdir}/error.log", "-c", f"{workdir}/nginx.conf"],
                  f"127.0.0.1:{PORT}", holders)


def _php_fpm_conf(workdir: Path, backlog: int | None, children: int, socket_path: Path | str) -> Path:
    backlog_line = f"listen.backlog = {backlog}\n" if backlog is not None else ""
    conf = workdir / "php-fpm.conf"
    conf.write_text(f"""\
[global]
pid = {workdir}/php-fpm.pid
error_log = {workdir}/php-fpm.log
daemonize = no

[www]
user = {WEB_USER}
group = {WEB_USER}
listen = {socket_path}
listen.owner = {WEB_USER}
listen.group = {WEB_USER}
listen.mode = 0660
{backlog_line}pm = static
pm.max_children = {children}
request_terminate_timeout = 0
""")
    return conf


def _php_fpm(workdir: Path, backlog: int | None, options: dict[str, str]) -> Launch:
    php_fpm = _need("/usr/sbin/php-fpm*", "php-fpm")
    _user(WEB_USER)
    children = int(options.get("children", "2"))
    tcp = options.get("tcp") == "yes"  # listen on 127.0.0.1:PORT instead of a Unix socket
    socket_path = workdir / "php.sock"
    address = f"127.0.0.1:{PORT}" if tcp else str(socket_path)
    conf = _php_fpm_conf(workdir, backlog, children, address)
    (workdir / "www").mkdir(exist_ok=True)
    (workdir / "www" / "slow.php").write_text(SLOW_PHP)
    return Launch([php_fpm, "--nodaemonize", "--fpm-config", str(conf), "-n"], address, 1 + children,
                  stop_signal=signal.SIGQUIT, unix=not tcp)


def _apache(workdir: Path, backlog: int | None, options: dict[str, str]) -> Launch:
    apache = _need("/usr/sbin/apache2", "apache2")
    _user(WEB_USER)
    modules = "/usr/lib/apache2/modules"
    mpm = options.get("mpm", "prefork")
    children = int(options.get("children", "2"))
    backlog_line = f"ListenBacklog {backlog}\n" if backlog is not None else ""
    if mpm == "prefork":
        limits = (f"StartServers {children}\nMinSpareServers {children}\nMaxSpareServers {children}\n"
                  f"ServerLimit {children}\nMaxRequestWorkers {children}\n")
    else:
        limits = (f"StartServers {children}\nServerLimit {children}\nThreadsPerChild 4\n"
                  f"MaxRequestWorkers {children * 4}\nMinSpareThreads 4\nMaxSpareThreads {children * 4}\n")
    # Apache's default AcceptFilter sets TCP_DEFER_ACCEPT: a connection that sends nothing never
    # reaches the accept queue (its bare ACK is dropped and counted). Tests that queue silent
    # connects need it off; accept_filter="data" keeps Apache's default.
    accept_filter = options.get("accept_filter", "none")
    php = ""
    if options.get("php_socket"):
        php = (f"LoadModule proxy_module {modules}/mod_proxy.so\n"
               f"LoadModule proxy_fcgi_module {modules}/mod_proxy_fcgi.so\n"
               f'<FilesMatch "\\.php$">\n    SetHandler "proxy:unix:{options["php_socket"]}|fcgi://localhost"\n'
               "</FilesMatch>\n")
    (workdir / "www").mkdir(exist_ok=True)
    (workdir / "www" / "index.html").write_text("ok\n")
    (workdir / "www" / "slow.php").write_text(SLOW_PHP)  # read by php-fpm, under Apache's document root
    (workdir / "apache2.conf").write_text(f"""\
ServerRoot {workdir}
ServerName localhost
PidFile {workdir}/apache2.pid
ErrorLog {workdir}/error.log
DefaultRuntimeDir {workdir}
Mutex file:{workdir} default
LoadModule mpm_{mpm}_module {modules}/mod_mpm_{mpm}.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule reqtimeout_module {modules}/mod_reqtimeout.so
User {WEB_USER}
Group {WEB_USER}
Listen 127.0.0.1:{PORT}
AcceptFilter http {accept_filter}
{backlog_line}{limits}DocumentRoot {workdir}/www
{php}""")
    return Launch([apache, "-f", f"{workdir}/apache2.conf", "-DFOREGROUND"], f"127.0.0.1:{PORT}", 1 + children,
                  stop_signal=signal.SIGTERM)


def _haproxy(workdir: Path, backlog: int | None, options: dict[str, str]) -> Launch:
    haproxy = _need("/usr/sbin/haproxy", "haproxy")
    backlog_arg = f" backlog {backlog}" if backlog is not None else ""
    maxconn = options.get("maxconn", "50")
    maxconn_line = f"    maxconn {maxconn}\n" if maxconn else ""
    global_maxconn = options.get("global_maxconn", "200")
    (workdir / "haproxy.cfg").write_text(f"""\
global
    maxconn {global_maxconn}
    nbthread 1
defaults
    mode http
    timeout client 5s
    timeout connect 5s
    timeout server 5s
frontend web
    bind 127.0.0.1:{PORT}{backlog_arg}
{maxconn_line}    http-request return status 200 content-type text/plain string ok
""")
    # -W master-worker (as Debian's unit runs it), -db in the foreground.
    return Launch([haproxy, "-W", "-db", "-f", f"{workdir}/haproxy.cfg"], f"127.0.0.1:{PORT}", 1,
                  stop_signal=signal.SIGTERM)


def _redis(workdir: Path, backlog: int | None, options: dict[str, str]) -> Launch:
    redis = _need("/usr/bin/redis-server", "redis-server")
    backlog_line = f"tcp-backlog {backlog}\n" if backlog is not None else ""
    (workdir / "redis.conf").write_text(f"""\
bind 127.0.0.1
port {PORT}
daemonize no
dir {workdir}
logfile {workdir}/redis.log
save ""
appendonly no
{backlog_line}""")
    return Launch([redis, f"{workdir}/redis.conf"], f"127.0.0.1:{PORT}", 1)


def _gunicorn(workdir: Path, backlog: int | None, options: dict[str, str]) -> Launch:
    gunicorn = _need("/usr/bin/gunicorn", "gunicorn")
    workers = int(options.get("workers", "2"))
    (workdir / "app.py").write_text(WSGI_APP)
    argv = [gunicorn, "--chdir", str(workdir), "--bind", f"127.0.0.1:{PORT}", "--workers", str(workers),
            "--worker-tmp-dir", str(workdir), "--error-logfile", f"{workdir}/error.log"]
    if backlog is not None:
        argv += ["--backlog", str(backlog)]
    return Launch([*argv, "app:app"], f"127.0.0.1:{PORT}", 1 + workers)


def _uwsgi(workdir: Path, backlog: int | None, options: dict[str, str]) -> Launch:
    uwsgi = _need("/usr/bin/uwsgi-core", "uwsgi-core")
    _need("/usr/lib/uwsgi/plugins/python3_plugin.so", "uwsgi-plugin-python3")
    processes = int(options.get("processes", "2"))
    (workdir / "app.py").write_text(WSGI_APP)
    argv = [uwsgi, "--plugin", "python3", "--master", "--http-socket", f"127.0.0.1:{PORT}",
            "--processes", str(processes), "--wsgi-file", f"{workdir}/app.py", "--callable", "app",
            "--die-on-term", "--logto", f"{workdir}/error.log",
            # The trap of issue 14: a uWSGI whose command line names gunicorn is still uWSGI.
            "--env", "MIGRATED_FROM=gunicorn",
            # uWSGI sets TCP_DEFER_ACCEPT by default, like Apache: silent connects would never queue.
            *(["--no-defer-accept"] if options.get("defer_accept", "no") == "no" else [])]
    if backlog is not None:
        argv += ["--listen", str(backlog)]
    return Launch(argv, f"127.0.0.1:{PORT}", 1 + processes)


def _postgres(workdir: Path, backlog: int | None, options: dict[str, str]) -> Launch:
    if backlog is not None:
        raise ValueError("PostgreSQL has no backlog setting: pass max_connections")
    bindir = Path(_need("/usr/lib/postgresql/*/bin/postgres", "postgresql")).parent
    _user("postgres")
    owner = pwd.getpwnam("postgres")
    data = workdir / "data"
    data.mkdir(mode=0o700)
    os.chown(data, owner.pw_uid, owner.pw_gid)
    os.chown(workdir, owner.pw_uid, owner.pw_gid)
    as_postgres = ["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--clear-groups"]
    done = subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-N",
                           "-U", "postgres", "--no-instructions"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise AssertionError(f"initdb exited {done.returncode}: {done.stderr.strip()}")
    return Launch([str(bindir / "postgres"), "-D", str(data), "-c", "listen_addresses=127.0.0.1",
                   "-c", f"port={PORT}", "-c", f"max_connections={options.get('max_connections', '5')}",
                   "-c", f"unix_socket_directories={workdir}", "-c", "shared_buffers=16MB",
                   "-c", "logging_collector=off"],
                  f"127.0.0.1:{PORT}", 1, user="postgres", stop_signal=signal.SIGINT)


def _node(workdir: Path, backlog: int | None, options: dict[str, str]) -> Launch:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node not found: install Debian's nodejs (make test-deps does)")
    (workdir / "server.js").write_text(NODE_SERVER)
    return Launch([node, f"{workdir}/server.js", str(PORT), str(backlog or 0)], f"127.0.0.1:{PORT}", 1)


LAUNCHERS: dict[str, Callable[[Path, int | None, dict[str, str]], Launch]] = {
    "nginx": _nginx,
    "apache": _apache,
    "php-fpm": _php_fpm,
    "haproxy": _haproxy,
    "redis": _redis,
    "gunicorn": _gunicorn,
    "uwsgi": _uwsgi,
    "postgresql": _postgres,
    "node": _node,
}


@contextlib.contextmanager
def start(ns: TestNamespace, kind: str, backlog: int | None = None, **options: str) -> Iterator[RealServer]:
    """Start ``kind`` in ``ns`` with ``backlog`` (None: the server's default), wait until it listens
    with all its workers, and stop it and remove its directory on exit, whatever happened."""
    workdir = Path(tempfile.mkdtemp(prefix=f"aqt-{kind}-"))
    workdir.chmod(0o755)  # the workers run as www-data or postgres
    server: RealServer | None = None
    try:
        launch = LAUNCHERS[kind](workdir, backlog, options)
        argv = launch.argv
        if launch.user is not None:
            owner = pwd.getpwnam(launch.user)
            argv = ["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--clear-groups", *argv]
        log = workdir / "output.log"
        with open(log, "wb") as out:
            # A process group of its own, so stop() finds every process it started and nothing else;
            # `ip netns exec` and setpriv exec the server, so popen.pid is the server's master.
            popen = subprocess.Popen(ns.exec_args(*argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                     cwd=workdir, start_new_session=True)
        server = RealServer(kind, ns, workdir, launch, popen, log, dict(options))
        server.wait_up()
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
