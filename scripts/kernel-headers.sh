#!/bin/bash
# bcc compiles aqtune's eBPF programs against /lib/modules/$(uname -r)/build. This makes that link
# lead to kernel headers, and installs headers only, never a kernel image: on Debian 13 the headers
# package depends on its kernel image, so letting apt resolve it would install a kernel and an
# initramfs, and on a machine with a boot loader add a boot entry.
#
# - A kernel Debian ships (apt knows linux-headers-RELEASE): that package, through apt when apt
#   would install no kernel image with it (Debian 12's headers do not depend on the image; Debian
#   13's do, which apt satisfies without a new image when that kernel is the installed one).
#   Otherwise the headers, -common and kbuild packages are downloaded and unpacked.
# - Any other kernel (a VM or cloud image's own build): the headers of this Debian release's own
#   cloud kernel (what linux-headers-cloud-ARCH depends on), installed the same way and linked as
#   /lib/modules/RELEASE/build and source. aqtune reads struct offsets from the running kernel's
#   BTF, so the headers only have to compile with this release's bcc, and each release's bcc
#   compiles its own kernel's: Debian 12's bcc 0.26 compiles 6.1's headers but not 6.12's
#   (their bpf.h needs a newer uapi than bcc 0.26 bundles); Debian 13's bcc 0.31 compiles 6.12's.
#
# Unpacked headers go to /usr/src and /usr/lib/linux-kbuild-* without a dpkg record; installing the
# same package with apt later simply takes the files over.
#
#   scripts/kernel-headers.sh     (as root; KERNEL_RELEASE=... stands in for uname -r, to try another kernel)
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8

release=${KERNEL_RELEASE:-$(uname -r)}
modules=/lib/modules/$release
# -e follows the link: a link to headers since removed is made again.
[ -e "$modules/build" ] && exit 0

apt=(apt-get -o DPkg::Lock::Timeout=600 -o APT::Sandbox::User=root -y -q --no-install-recommends)
say() { echo "kernel-headers: $*"; }
die() { echo "kernel-headers: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "no $modules/build, and installing headers needs root: run 'sudo $0'"

# What a headers package needs besides itself: its ABI's -common headers and the kbuild tools it
# names (linux-kbuild-6.1 on Debian 12, linux-kbuild-6.12.118+deb13 on Debian 13).
siblings() {
    apt-cache depends "$1" 2>/dev/null |
        sed -n 's/^ *|\{0,1\}Depends: \(linux-headers-[^ ]*-common\|linux-kbuild-[^ ]*\)$/\1/p' | sort -u
}

unpack() {  # PACKAGE: it and its siblings downloaded and their headers and kbuild tools unpacked
    local pkg=$1 scratch deb
    scratch=$(mktemp -d /var/tmp/aqtune-headers.XXXXXX)
    # shellcheck disable=SC2064  # expand now: the trap must remove this very directory
    trap "rm -rf '$scratch'" EXIT
    mapfile -t packages < <(echo "$pkg"; siblings "$pkg")
    (cd "$scratch" && "${apt[@]}" download "${packages[@]}") >"$scratch/download.log" 2>&1 ||
        { cat "$scratch/download.log" >&2; die "could not download ${packages[*]}"; }
    mkdir "$scratch/tree"
    for deb in "$scratch"/*.deb; do
        dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$scratch/tree"
    done
    [ -d "$scratch/tree/usr/src" ] || die "${packages[*]} hold no /usr/src"
    cp -a "$scratch/tree/usr/src/." /usr/src/
    if compgen -G "$scratch/tree/usr/lib/linux-kbuild-*" >/dev/null; then
        cp -a "$scratch"/tree/usr/lib/linux-kbuild-* /usr/lib/
    fi
    say "unpacked ${packages[*]} into /usr/src (downloaded, not installed: apt would have installed a kernel image with them)"
    rm -rf "$scratch"
    trap - EXIT
}

install_headers() {  # PACKAGE: through apt if that installs no kernel image, else unpacked
    local pkg=$1 plan
    if plan=$("${apt[@]}" -s install "$pkg" 2>&1) && ! grep -q '^Inst linux-image-' <<<"$plan"; then
        "${apt[@]}" install "$pkg"
    else
        unpack "$pkg"
    fi
}

link() {  # ABI: /lib/modules/RELEASE/{build,source} -> that ABI's headers
    local abi=$1 common
    common=$(siblings "linux-headers-$abi" | grep -- '-common$' | head -n1)
    [ -n "$common" ] || die "linux-headers-$abi names no -common headers package"
    mkdir -p "$modules"
    ln -sfn "/usr/src/linux-headers-$abi" "$modules/build"
    ln -sfn "/usr/src/$common" "$modules/source"
}

"${apt[@]}" update -qq
if apt-cache show --no-all-versions "linux-headers-$release" >/dev/null 2>&1; then
    install_headers "linux-headers-$release"
    # apt's package makes the links itself; unpacked headers need them made.
    [ -e "$modules/build" ] || link "$release"
else
    meta=linux-headers-cloud-$(dpkg --print-architecture)
    abi=$(apt-cache depends "$meta" 2>/dev/null | sed -n 's/^ *Depends: linux-headers-\(.*\)$/\1/p' | head -n1)
    [ -n "$abi" ] || die "Debian has no linux-headers-$release, and apt knows no $meta to fall back on" \
                         "(check /etc/apt/sources.list*)"
    install_headers "linux-headers-$abi"
    link "$abi"
    say "linked Debian's $abi headers as $modules/build (Debian has no linux-headers-$release;" \
        "the headers only need to compile: aqtune takes struct offsets from the kernel's BTF)"
fi
[ -f "$modules/build/include/generated/autoconf.h" ] ||
    die "$modules/build -> $(readlink -f "$modules/build") has no include/generated/autoconf.h"
