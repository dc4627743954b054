# Everything runs on Debian's /usr/bin/python3 with Debian's packages; the pyenv python3 on PATH
# cannot see python3-bpfcc and friends.
PYTHON := /usr/bin/python3
VENV := .venv
APT := apt-get -o DPkg::Lock::Timeout=600 -y -q --no-install-recommends

RUNTIME_DEBS := python3-structlog python3-bpfcc python3-venv iproute2 procps
DEB_DEBS := build-essential debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools lintian
TEST_DEBS := python3-pyroute2 python3-pytest python3-hypothesis nftables python3-seccomp prometheus-node-exporter \
	python3-prometheus-client systemd-container mmdebstrap $(DEB_DEBS) \
	nginx apache2 php-fpm haproxy redis-server gunicorn uwsgi-core uwsgi-plugin-python3 postgresql nodejs tmux

.PHONY: deps test-deps run test lint pytest unit kernel-tier bench deb

deps:
	@dpkg -s $(RUNTIME_DEBS) >/dev/null 2>&1 || { $(APT) update -qq && $(APT) install $(RUNTIME_DEBS); }
	@bash scripts/kernel-headers.sh

test-deps: deps
	@bash scripts/install-test-debs.sh $(TEST_DEBS)
	@test -x $(VENV)/bin/ruff -a -x $(VENV)/bin/mypy || { \
		$(PYTHON) -m venv --system-site-packages $(VENV) && \
		$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt; }

# The main job: the daemon in the foreground, dry-run (never writes), with the shipped policy.
run: deps
	$(PYTHON) -m aqtune run --dry-run --config etc/aqtune/policy.toml

# The whole suite, on Debian 12 or 13: linters, unit + integration + system (.deb in bookworm and
# trixie nspawn containers) tests on this kernel, then the kprobe/fentry tests under qemu on
# Debian 12's stock 6.1 and Debian 13's stock 6.12 kernels.
test: lint pytest kernel-tier

lint: test-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy aqtune

pytest: test-deps
	$(PYTHON) -m pytest tests

unit: test-deps
	$(PYTHON) -m pytest -q tests/unit

kernel-tier: test-deps
	bash tests/qemu/run-kernel-tier.sh

bench: test-deps
	$(PYTHON) bench/sweep_bench.py
	$(PYTHON) bench/probe_overhead.py
	$(PYTHON) bench/daemon_load.py
	$(PYTHON) bench/attack_scale.py
	$(PYTHON) bench/compile_child.py

# dist/aqtune_<version>_all.deb, built from a staged copy and checked by lintian.
deb:
	@dpkg -s $(DEB_DEBS) >/dev/null 2>&1 || { $(APT) update -qq && $(APT) install $(DEB_DEBS); }
	bash scripts/build-deb.sh
