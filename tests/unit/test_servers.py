"""The server knowledge table: each entry recognised from the processes a real server shows in /proc
(values as aqtune read them from Debian's packages), its knobs and defaults, and how it listens again."""

from __future__ import annotations

import pytest

from aqtune.decide import servers
from aqtune.decide.servers import (
    TABLE,
    Server,
    backlog_knob_text,
    hold_knob_text,
    identify,
    relisten_text,
    worker_knob_text,
    workers,
)
from aqtune.records import Process


def proc(pid: int, comm: str, cmdline: str, exe: str, *, ppid: int = 1000, threads: int = 1, app: str = "",
         unit: str | None = None, **fields: object) -> Process:
    return Process(pid, comm, cmdline, unit, exe=exe, app=app, ppid=ppid, threads=threads, starttime=pid,
                   **fields)  # type: ignore[arg-type]


def master_and_workers(comm: str, exe: str, master_cmdline: str, worker_cmdline: str, workers: int = 2,
                       threads: int = 1, app: str = "", unit: str | None = None) -> tuple[Process, ...]:
    master = proc(100, comm, master_cmdline, exe, app=app, unit=unit)
    return (master, *(proc(101 + i, comm, worker_cmdline, exe, ppid=100, threads=threads, app=app, unit=unit)
                      for i in range(workers)))


NGINX = master_and_workers("nginx", "nginx", "nginx: master process /usr/sbin/nginx -c /etc/nginx/nginx.conf",
                           "nginx: worker process", unit="nginx.service")
APACHE_CMD = "/usr/sbin/apache2 -k start"
APACHE_PREFORK = master_and_workers("apache2", "apache2", APACHE_CMD, APACHE_CMD, unit="apache2.service")
APACHE_EVENT = master_and_workers("apache2", "apache2", APACHE_CMD, APACHE_CMD, threads=27, unit="apache2.service")
PHP_FPM = master_and_workers("php-fpm8.2", "php-fpm8.2", "php-fpm: master process (/etc/php/8.2/fpm/php-fpm.conf)",
                             "php-fpm: pool www", unit="php8.2-fpm.service")
HAPROXY = (proc(101, "haproxy", "/usr/sbin/haproxy -Ws -f /etc/haproxy/haproxy.cfg", "haproxy", ppid=100,
                unit="haproxy.service"),)
REDIS = (proc(100, "redis-server", "/usr/bin/redis-server 127.0.0.1:6379", "redis-check-rdb", threads=5,
              unit="redis-server.service"),)
GUNICORN_CMD = "/usr/bin/python3 /usr/bin/gunicorn --bind 127.0.0.1:8000 --workers 2 app:app"
GUNICORN = master_and_workers("gunicorn", "python3.11", GUNICORN_CMD, GUNICORN_CMD, app="gunicorn")
UVICORN = (proc(100, "python3", "/usr/bin/python3 -m uvicorn app:app --port 8000", "python3.11", app="uvicorn"),)
# issue 14: a uWSGI whose command line mentions gunicorn was told to "start gunicorn with --backlog".
UWSGI_CMD = "/usr/bin/uwsgi-core --http-socket :8000 --module gunicorn_compat:app --env MIGRATED_FROM=gunicorn"
UWSGI = master_and_workers("uwsgi-core", "uwsgi-core", UWSGI_CMD, UWSGI_CMD)
POSTGRES = (proc(100, "postgres", "/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main", "postgres",
                 unit="postgresql@15-main.service"),)
NODE = (proc(100, "node", "/usr/bin/node /srv/app/server.js", "node", threads=7, app="server.js"),)
SOCKET_ACTIVATED = (
    proc(1, "systemd", "/sbin/init", "systemd", ppid=0, unit="init.scope"),
    proc(200, "python3", "/usr/bin/python3 /srv/echo.py", "python3.11", app="echo.py", unit="echo.service",
         socket_activated=True),
)


@pytest.mark.parametrize(("processes", "key"), [
    pytest.param(NGINX, "nginx", id="nginx"),
    pytest.param(APACHE_PREFORK, "apache-prefork", id="apache-prefork"),
    pytest.param(APACHE_EVENT, "apache-event", id="apache-event"),
    pytest.param(PHP_FPM, "php-fpm", id="php-fpm"),
    pytest.param(HAPROXY, "haproxy", id="haproxy"),
    pytest.param(REDIS, "redis", id="redis"),
    pytest.param(GUNICORN, "gunicorn", id="gunicorn"),
    pytest.param(UVICORN, "uvicorn", id="uvicorn"),
    pytest.param(UWSGI, "uwsgi", id="uwsgi-mentioning-gunicorn"),
    pytest.param(POSTGRES, "postgresql", id="postgresql"),
    pytest.param(NODE, "node", id="node"),
    pytest.param(SOCKET_ACTIVATED, "systemd-socket", id="socket-activated"),
    pytest.param((proc(100, "myapp", "/opt/myapp --serve", "myapp"),), "generic", id="generic"),
    pytest.param((), "generic", id="no-owner"),
])
def test_identify(processes: tuple[Process, ...], key: str) -> None:
    assert identify(processes).key == key


def test_every_entry_but_the_fallbacks_is_identified_by_some_test() -> None:
    covered = {identify(p).key for p in (NGINX, APACHE_PREFORK, APACHE_EVENT, PHP_FPM, HAPROXY, REDIS, GUNICORN,
                                         UVICORN, UWSGI, POSTGRES, NODE, SOCKET_ACTIVATED)}
    assert covered | {"generic"} == {server.key for server in TABLE}


def test_arguments_never_identify_a_server() -> None:
    # Words in arguments are the program's data: a Python tool that names gunicorn, nginx or redis
    # in its arguments is none of them.
    tool = proc(100, "python3", "/usr/bin/python3 /srv/deploy.py --restart gunicorn nginx redis-server",
                "python3.11", app="deploy.py")
    assert identify((tool,)).key == "generic"


def test_a_script_run_by_its_shebang_is_named_by_comm_where_the_exe_is_unknown() -> None:
    # Records from before procfs read the exe (or without the right to read it) have only comm.
    assert identify((Process(100, "gunicorn", "/usr/bin/python3 /usr/bin/gunicorn app:app", None),)).key == "gunicorn"
    assert identify((Process(100, "nginx", "nginx: master process", None),)).key == "nginx"


def test_an_interpreter_is_not_its_scripts_server_by_comm_when_the_exe_is_known() -> None:
    # comm is settable by any process (prctl): with the exe known, only the program it runs counts.
    spoof = proc(100, "gunicorn", "/usr/bin/python3 /tmp/x.py", "python3.11", app="x.py")
    assert identify((spoof,)).key == "generic"


def test_apache_without_thread_counts_is_debians_default_mpm() -> None:
    unknown = tuple(Process(p.pid, p.comm, p.cmdline, p.unit, exe="apache2", ppid=p.ppid) for p in APACHE_PREFORK)
    assert identify(unknown).key == "apache-event"


def test_a_user_manager_socket_is_a_socket_unit() -> None:
    manager = proc(900, "systemd", "/lib/systemd/systemd --user", "systemd", user_unit="init.scope")
    assert identify((manager,)).key == "systemd-socket"


# --- knob texts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("server", "knob", "default"), [
    (servers.NGINX, "backlog=1024", "511"),
    (servers.APACHE_PREFORK, "ListenBacklog 1024", "511"),
    (servers.APACHE_EVENT, "ListenBacklog 1024", "511"),
    (servers.PHP_FPM, "listen.backlog = 1024", "as much as somaxconn allows"),
    (servers.HAPROXY, "backlog 1024", "the frontend's maxconn"),
    (servers.REDIS, "tcp-backlog 1024", "511"),
    (servers.GUNICORN, "--backlog 1024", "2048"),
    (servers.UVICORN, "--backlog 1024", "2048"),
    (servers.UWSGI, "--listen 1024", "100"),
    (servers.NODE, "backlog: 1024", "511"),
    (servers.SYSTEMD_SOCKET, "Backlog=1024", "4294967295"),
    (servers.GENERIC, "listen() to 1024", ""),
])
def test_backlog_knob_text_names_the_knob_and_its_default(server: Server, knob: str, default: str) -> None:
    text = backlog_knob_text(server, 1024)
    assert knob in text
    assert f"default {default}" in text


def test_postgresql_has_no_backlog_knob_and_says_what_it_asks_for() -> None:
    text = backlog_knob_text(servers.POSTGRESQL, 1024)
    assert "no backlog setting" in text
    assert "2 x MaxBackends" in text and "max_connections + autovacuum_max_workers + 1" in text
    assert "1024" not in text
    assert "max_connections" in worker_knob_text(servers.POSTGRESQL)


@pytest.mark.parametrize("server", [servers.PHP_FPM, servers.SYSTEMD_SOCKET])
def test_as_much_as_allowed_means_only_somaxconn_needs_raising(server: Server) -> None:
    # issue 14: INT_MAX taken literally ("raise somaxconn to 2147483647").
    assert server.follows_somaxconn
    assert "only somaxconn needs raising" in backlog_knob_text(server, 4096)
    assert "2147483647" not in backlog_knob_text(server, 4096)


def test_servers_with_a_number_for_a_default_do_not_follow_somaxconn() -> None:
    followers = {server.key for server in TABLE if server.follows_somaxconn}
    assert followers == {"php-fpm", "systemd-socket"}


@pytest.mark.parametrize(("server", "knobs"), [
    (servers.NGINX, ("worker_processes", "worker_connections", "default 512")),
    (servers.APACHE_PREFORK, ("MaxRequestWorkers", "default 256")),
    (servers.APACHE_EVENT, ("MaxRequestWorkers", "ThreadsPerChild", "default 400")),
    (servers.PHP_FPM, ("pm.max_children",)),
    (servers.HAPROXY, ("maxconn",)),
    (servers.REDIS, ("one CPU core",)),
    (servers.GUNICORN, ("--workers", "--threads", "default 1")),
    (servers.UWSGI, ("--processes",)),
    (servers.POSTGRESQL, ("max_connections", "default 100")),
    (servers.NODE, ("cluster",)),
    (servers.SYSTEMD_SOCKET, ("MaxConnections=",)),
])
def test_worker_knob_text(server: Server, knobs: tuple[str, ...]) -> None:
    text = worker_knob_text(server)
    for knob in knobs:
        assert knob in text


@pytest.mark.parametrize(("server", "knobs"), [
    (servers.APACHE_PREFORK, ("RequestReadTimeout", "mod_reqtimeout", "KeepAliveTimeout", "event MPM")),
    (servers.APACHE_EVENT, ("RequestReadTimeout", "KeepAliveTimeout")),
    (servers.PHP_FPM, ("request_terminate_timeout", "default 0 (never)", "pm.max_children")),
    (servers.GUNICORN, ("--timeout", "default 30", "gevent")),
    (servers.NGINX, ("client_header_timeout", "client_body_timeout", "keepalive_timeout")),
    (servers.HAPROXY, ("timeout client", "timeout http-request")),
    (servers.UWSGI, ("--harakiri",)),
])
def test_hold_knob_text(server: Server, knobs: tuple[str, ...]) -> None:
    text = hold_knob_text(server)
    for knob in knobs:
        assert knob in text


# --- workers -------------------------------------------------------------------------------------------


def test_workers_are_the_masters_children() -> None:
    assert [p.pid for p in workers(servers.NGINX, NGINX)] == [101, 102]
    assert [p.pid for p in workers(servers.PHP_FPM, PHP_FPM)] == [101, 102]


def test_a_lone_holder_is_its_own_worker_and_postgres_backends_are_unseen() -> None:
    assert workers(servers.HAPROXY, HAPROXY) == HAPROXY
    assert workers(servers.REDIS, REDIS) == REDIS
    assert workers(servers.POSTGRESQL, POSTGRES) == ()


# --- relisten -----------------------------------------------------------------------------------------


def test_nginx_needs_a_restart_not_a_reload() -> None:
    text = relisten_text(servers.NGINX, NGINX)
    assert text.startswith("`systemctl restart nginx.service`")
    assert "`nginx -s reload` keeps" in text


def test_redis_and_haproxy_are_restarted() -> None:
    assert relisten_text(servers.REDIS, REDIS).startswith("`systemctl restart redis-server.service`")
    assert relisten_text(servers.HAPROXY, HAPROXY).startswith("`systemctl restart haproxy.service`")


def test_without_a_unit_the_server_and_its_master_pid_are_named() -> None:
    text = relisten_text(servers.GUNICORN, GUNICORN)
    assert text.startswith("restart gunicorn (pid 100)")
    assert "python3" not in text


def test_a_socket_activated_service_restarts_its_socket_unit() -> None:
    text = relisten_text(servers.SYSTEMD_SOCKET, SOCKET_ACTIVATED)
    assert "`systemctl stop echo.service echo.socket && systemctl start echo.socket`" in text
    assert "init.scope" not in text


def test_an_accept_yes_instance_maps_to_its_socket_unit() -> None:
    instance = proc(300, "sshd", "sshd: [accepted]", "sshd", unit="ssh@0-127.0.0.1:22-127.0.0.1:5000.service",
                    socket_activated=True)
    assert "ssh.socket" in relisten_text(servers.SYSTEMD_SOCKET, (SOCKET_ACTIVATED[0], instance))


def test_pid1_alone_gets_no_command_on_pid1() -> None:
    text = relisten_text(servers.SYSTEMD_SOCKET, SOCKET_ACTIVATED[:1])
    assert "PID 1" in text and "reboot" in text
    assert "systemctl restart" not in text and "daemon-reexec" not in text


@pytest.mark.parametrize("unit", ["systemd-journald.service", "dbus.service", "dbus-broker.service",
                                  "systemd-logind.service"])
def test_system_components_are_never_restarted(unit: str) -> None:
    # issue 12: the advice told root to reload-or-restart dbus, journald and PID 1.
    holders = (SOCKET_ACTIVATED[0], proc(400, "x", "x", "x", unit=unit))
    text = relisten_text(identify(holders), holders)
    assert "system component" in text
    assert "systemctl" not in text


def test_a_user_unit_named_nginx_is_a_users_unit_not_nginx_service() -> None:
    # issue 12: `systemd-run --user --unit=nginx` showed as nginx.service and got its restart advice.
    spoof = (proc(500, "nginx", "nginx: master process", "nginx", user_unit="nginx.service"),)
    text = relisten_text(identify(spoof), spoof)
    assert "systemctl --user restart nginx.service" in text
    assert "`systemctl restart" not in text and "reload-or-restart" not in text


def test_a_containers_unit_is_restarted_inside_the_container() -> None:
    inner = (proc(600, "nginx", "nginx: master process", "nginx", unit="nginx.service",
                  container="machine-web.scope"),)
    text = relisten_text(identify(inner), inner)
    assert "nginx.service in container machine-web.scope" in text
    assert "`systemctl restart nginx.service`" not in text


def test_the_drop_in_replacements_agree_with_the_table() -> None:
    assert servers.app_knob(UWSGI, 512) == backlog_knob_text(servers.UWSGI, 512)
    assert "gunicorn" not in servers.app_knob(UWSGI, 512)
    assert servers.relisten_action(NGINX) == relisten_text(servers.NGINX, NGINX)
