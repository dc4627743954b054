#!/bin/bash
# Builds the guest of the kernel test tier, from scratch, on a Debian 12 machine (as root):
#
#   $AQ_QEMU_DIR/vmlinuz     Debian's stock cloud kernel (extracted, never installed on the host)
#   $AQ_QEMU_DIR/rootfs.img  ext4 root: bookworm minbase with bcc and pytest, that kernel's modules
#                            and headers, this checkout in /opt/aqtune, and the guest's init
#   $AQ_QEMU_DIR/manifest    kernel and stamp of the image (run-kernel-tier.sh reuses a matching one)
#
# Needs about 1.2 GB in $AQ_QEMU_DIR while it runs (1.8 GB when it replaces an earlier image) and
# leaves about 0.6 GB. Prints
# "STEP name seconds" per step. Environment: see common.sh (AQ_QEMU_DIR, KV, AQ_QEMU_SUITE), and
#   AQ_QEMU_MIRROR      Debian mirror for debootstrap; default http://deb.debian.org/debian
#   AQ_QEMU_APT_UPDATE  0 skips 'apt-get update' (the lists must then be current)
set -euo pipefail
PROG=build-guest
QEMU_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=common.sh
. "$QEMU_HERE/common.sh"

AQ_QEMU_MIRROR=${AQ_QEMU_MIRROR:-http://deb.debian.org/debian}
W=$AQ_QEMU_DIR
B=$W/build          # scratch: debs, the rootfs tree; deleted on every exit
ROOT=$B/rootfs
LOGS=$W/logs
MIN_FREE_MB=2000

case "${1:-}" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) die "no arguments expected (see --help)" ;;
esac
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, apt-get)"

check_workdir
lock_workdir
mkdir -p "$LOGS"

cleanup() {
    local rc=$?
    remove_tree "$B"
    rm -f "$W/rootfs.img.new"
    [ "$rc" = 0 ] || echo "$PROG: failed (exit $rc); logs in $LOGS" >&2
}
trap cleanup EXIT
trap 'note "interrupted (SIGINT), cleaning up"; exit 130' INT
trap 'note "terminated (SIGTERM), cleaning up"; exit 143' TERM

step() {
    local name=$1 start=$EPOCHREALTIME
    shift
    "$@"
    echo "STEP $name $(since "$start")"
}

step_host_tools() {
    if [ "${AQ_QEMU_APT_UPDATE:-1}" != 0 ]; then
        "${APT[@]}" update -qq >"$LOGS/apt-update.log" 2>&1 || { tail -n 20 "$LOGS/apt-update.log" >&2; return 1; }
    fi
    local missing=() tool
    for tool in qemu-system-x86_64:qemu-system-x86 debootstrap:debootstrap mkfs.ext4:e2fsprogs; do
        command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        note "installing ${missing[*]}"
        "${APT[@]}" install -y --no-install-recommends "${missing[@]}" >"$LOGS/apt-install.log" 2>&1 ||
            { tail -n 20 "$LOGS/apt-install.log" >&2; return 1; }
    fi
}

step_download() {
    resolve_kernel
    # The headers package names its siblings (linux-headers-ABI-common, linux-kbuild-X.Y).
    local extra
    mapfile -t extra < <(apt-cache depends "linux-headers-$KV" |
                         sed -n 's/^ *Depends: \(linux-headers-.*-common\|linux-kbuild-[0-9.]*\)$/\1/p')
    [ "${#extra[@]}" = 2 ] || die "linux-headers-$KV: expected a -common and a linux-kbuild dependency, got '${extra[*]}'"
    HEADERS_COMMON=${extra[0]} KBUILD=${extra[1]}
    case "$HEADERS_COMMON" in linux-headers-*) ;; *) HEADERS_COMMON=${extra[1]} KBUILD=${extra[0]} ;; esac
    note "kernel $KV ($KERNEL_VERSION)"
    mkdir -p "$B/debs"
    (cd "$B/debs" && "${APT[@]}" download \
        "linux-image-$KV=$KERNEL_VERSION" "linux-headers-$KV=$KERNEL_VERSION" \
        "$HEADERS_COMMON=$KERNEL_VERSION" "$KBUILD=$KERNEL_VERSION") >"$LOGS/download.log" 2>&1 ||
        { tail -n 20 "$LOGS/download.log" >&2; return 1; }
}

step_debootstrap() {
    local include
    include=$(IFS=,; echo "${GUEST_PACKAGES[*]}")
    debootstrap --variant=minbase --include="$include" "$AQ_QEMU_SUITE" "$ROOT" "$AQ_QEMU_MIRROR" \
        >"$LOGS/debootstrap.log" 2>&1 || { tail -n 30 "$LOGS/debootstrap.log" >&2; return 1; }
    [ -L "$ROOT/lib" ] || die "debootstrap made no usr-merged tree (/lib is not a symlink)"
}

# dpkg-deb -x would replace the usr-merge symlink /lib with a directory, and the guest could then
# not find its ELF interpreter ("Requested init ... failed (error -2)"). tar keeps the symlink.
unpack_deb() { dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" --keep-directory-symlink; }

step_kernel() {
    local deb link want
    for deb in "$B"/debs/*.deb; do unpack_deb "$deb" "$ROOT"; done
    [ -L "$ROOT/lib" ] || die "unpacking the kernel debs replaced the /lib symlink"
    mv "$ROOT/boot/vmlinuz-$KV" "$B/vmlinuz"        # qemu boots it with -kernel; /boot keeps the config
    chroot "$ROOT" depmod "$KV"                    # the guest's kmod: the host may have none
    # bcc compiles against /lib/modules/$KV/build (this flavour's generated headers) and
    # .../source (the common headers). The debs make both links; check they lead somewhere.
    for link in "build:/usr/src/linux-headers-$KV" "source:/usr/src/$HEADERS_COMMON"; do
        want=${link#*:}
        [ -d "$ROOT$want" ] || die "no $want in the guest"
        ln -sfn "$want" "$ROOT/usr/lib/modules/$KV/${link%%:*}"
    done
    [ -f "$ROOT/usr/src/linux-headers-$KV/include/generated/autoconf.h" ] || die "headers of $KV lack autoconf.h"
    [ -d "$ROOT/usr/lib/modules/$KV/kernel/net" ] || die "no modules of $KV in the guest"
}

step_checkout() {
    STAMP=$(image_stamp)    # before the copy: an edit made during the build forces the next one
    mkdir -p "$ROOT$GUEST_CHECKOUT"
    (cd "$REPO" && checkout_files | tar -c --null -T - -f -) | tar -x -C "$ROOT$GUEST_CHECKOUT"
    [ -f "$ROOT$GUEST_CHECKOUT/pyproject.toml" ] || die "the checkout did not reach the guest"
    install -D -m 0755 "$QEMU_HERE/guest/init.sh" "$ROOT$GUEST_INIT"
    echo aqtune-guest >"$ROOT/etc/hostname"
}

step_image() {
    rm -rf "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* \
           "$ROOT"/usr/share/locale/* "$ROOT"/var/cache/apt/* "$ROOT"/var/lib/apt/lists/* \
           "$ROOT"/var/log/*.log "$ROOT"/var/log/apt/*
    local used_mb
    used_mb=$(du -sm "$ROOT" | cut -f1)
    # Room for the guest's writes (they go to a qemu snapshot overlay anyway) and ext4's overhead.
    truncate -s $((used_mb * 13 / 10 + 256))M "$W/rootfs.img.new"
    mkfs.ext4 -q -F -L aqtune-root -m 0 -d "$ROOT" "$W/rootfs.img.new"
    mv -f "$W/rootfs.img.new" "$W/rootfs.img"
    mv -f "$B/vmlinuz" "$W/vmlinuz"
    printf 'kv=%s\nkernel_version=%s\nsuite=%s\nstamp=%s\nbuilt=%s\n' "$KV" "$KERNEL_VERSION" \
        "$AQ_QEMU_SUITE" "$STAMP" "$(date -u +%FT%TZ)" >"$W/manifest"
    echo "SIZE tree ${used_mb}M image $(du -h --apparent-size "$W/rootfs.img" | cut -f1) apparent, $(du -h "$W/rootfs.img" | cut -f1) on disk"
}

start=$EPOCHREALTIME
# An interrupted or failed build must not leave an image that looks current.
rm -f "$W/manifest"
remove_tree "$B"
mkdir -p "$B"
free_mb=$(df -Pm "$W" | awk 'NR == 2 { print $4 }')
[ "$free_mb" -ge "$MIN_FREE_MB" ] || die "only ${free_mb} MB free in $W; the build needs ${MIN_FREE_MB} MB"

step host_tools step_host_tools
step download step_download
step debootstrap step_debootstrap
step kernel_modules_headers step_kernel
step checkout step_checkout
step image step_image
echo "STEP build_total $(since "$start")"
note "guest ready: $W/rootfs.img, kernel $KV"
