#!/bin/bash
# Install the test suite's Debian packages. The real servers among them (nginx, Apache, PostgreSQL,
# Redis...) are only ever started by the tests, inside their own network namespaces: a temporary
# policy-rc.d keeps their packages from starting them on the host (and taking its ports) at install.
set -euo pipefail
apt=(apt-get -o DPkg::Lock::Timeout=600 -y -q --no-install-recommends)
dpkg -s "$@" >/dev/null 2>&1 && exit 0
guard=/usr/sbin/policy-rc.d
if [ ! -e "$guard" ]; then
    printf '#!/bin/sh\n# temporary, from aqtune scripts/install-test-debs.sh\nexit 101\n' >"$guard"
    chmod 755 "$guard"
    trap 'rm -f "$guard"' EXIT
fi
"${apt[@]}" update -qq
"${apt[@]}" install "$@"
