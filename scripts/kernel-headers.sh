#!/bin/bash
# bcc compiles aqtune's eBPF programs against /lib/modules/$(uname -r)/build. Install the matching
# headers where Debian has them; on a kernel Debian does not ship (a VM's own build), link Debian's
# newest cloud 6.1 headers instead: aqtune reads struct fields at offsets from the running kernel's
# BTF, so the headers only need to compile, not to match.
set -euo pipefail
release=$(uname -r)
modules=/lib/modules/$release
[ -e "$modules/build" ] && exit 0
apt=(apt-get -o DPkg::Lock::Timeout=600 -y -q --no-install-recommends)
"${apt[@]}" update -qq
if apt-cache show "linux-headers-$release" >/dev/null 2>&1; then
    "${apt[@]}" install "linux-headers-$release"
    exit 0
fi
"${apt[@]}" install linux-headers-cloud-amd64
headers=$(ls -d /usr/src/linux-headers-*-cloud-amd64 | sort -V | tail -1)
mkdir -p "$modules"
ln -sfn "$headers" "$modules/build"
ln -sfn "${headers%-cloud-amd64}-common" "$modules/source"
echo "linked $headers as $modules/build (no linux-headers-$release in Debian)"
