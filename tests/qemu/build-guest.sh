#!/bin/bash
# Builds the guest of the kernel test tier for one Debian suite (AQ_QEMU_SUITE; default the first
# of AQ_QEMU_SUITES), from scratch, on a Debian 12 or 13 machine (as root):
#
#   $AQ_QEMU_DIR/SUITE/vmlinuz     the suite's stock cloud kernel (extracted, never installed on the host)
#   $AQ_QEMU_DIR/SUITE/rootfs.img  a disk with one GPT partition holding the ext4 root: the suite's
#                                  minbase with its bcc and pytest, that kernel's modules and
#                                  headers, this checkout in /opt/aqtune, and the guest's init
#   $AQ_QEMU_DIR/SUITE/manifest    kernel, partition UUID and stamp of the image (run-kernel-tier.sh
#                                  reuses a matching one)
#
# The kernel is looked up in a private copy of the suite's package lists ($AQ_QEMU_DIR/SUITE/apt):
# the host's own lists know only the host's release. Needs about 1.2 GB in $AQ_QEMU_DIR while it
# runs (1.8 GB when it replaces an earlier image) and leaves about 0.6 GB per suite. Prints
# "STEP name seconds" per step. Environment: see common.sh (AQ_QEMU_DIR, AQ_QEMU_SUITE, KV_<suite>,
# the mirrors), and
#   AQ_QEMU_APT_UPDATE  0 skips the host's 'apt-get update' (to install qemu and the tools it needs)
set -euo pipefail
PROG=build-guest
QEMU_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=common.sh
. "$QEMU_HERE/common.sh"

MIN_FREE_MB=2000
# GPT partition type of a Linux filesystem.
LINUX_FS_TYPE=0FC63DAF-8483-4772-8E79-3D69D8477DE4

case "${1:-}" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) die "no arguments expected (see --help)" ;;
esac
[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap, apt-get)"

check_workdir
lock_workdir
use_suite "${AQ_QEMU_SUITE:-${AQ_QEMU_SUITES%% *}}"
W=$SUITE_DIR
B=$W/build          # scratch: debs, the rootfs tree; deleted on every exit
ROOT=$B/rootfs
LOGS=$W/logs
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
    local missing=() tool
    for tool in qemu-system-x86_64:qemu-system-x86 mmdebstrap:mmdebstrap mkfs.ext4:e2fsprogs sfdisk:fdisk; do
        command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        if [ "${AQ_QEMU_APT_UPDATE:-1}" != 0 ]; then
            "${APT[@]}" update -qq >"$LOGS/apt-update.log" 2>&1 ||
                { tail -n 20 "$LOGS/apt-update.log" >&2; return 1; }
        fi
        note "installing ${missing[*]}"
        "${APT[@]}" install -y --no-install-recommends "${missing[@]}" >"$LOGS/apt-install.log" 2>&1 ||
            { tail -n 20 "$LOGS/apt-install.log" >&2; return 1; }
    fi
}

step_download() {
    suite_apt_update
    resolve_kernel
    # The headers package names its siblings: linux-headers-ABI-common and the kbuild tools
    # (linux-kbuild-6.1 on Debian 12, linux-kbuild-6.12.118+deb13 on Debian 13, whose headers also
    # depend on the image, downloaded here anyway).
    local extra
    mapfile -t extra < <(suite_apt_cache depends "linux-headers-$KV" |
        sed -n 's/^ *|\{0,1\}Depends: \(linux-headers-[^ ]*-common\|linux-kbuild-[^ ]*\)$/\1/p' | sort -u)
    [ "${#extra[@]}" = 2 ] || die "linux-headers-$KV: expected a -common and a linux-kbuild dependency, got '${extra[*]}'"
    HEADERS_COMMON=${extra[0]} KBUILD=${extra[1]}
    case "$HEADERS_COMMON" in linux-headers-*) ;; *) HEADERS_COMMON=${extra[1]} KBUILD=${extra[0]} ;; esac
    note "$AQ_QEMU_SUITE: kernel $KV ($KERNEL_VERSION)"
    mkdir -p "$B/debs"
    (cd "$B/debs" && apt-get -q "${SUITE_APT[@]}" download \
        "linux-image-$KV=$KERNEL_VERSION" "linux-headers-$KV=$KERNEL_VERSION" \
        "$HEADERS_COMMON=$KERNEL_VERSION" "$KBUILD=$KERNEL_VERSION") >"$LOGS/download.log" 2>&1 ||
        { tail -n 20 "$LOGS/download.log" >&2; return 1; }
}

step_bootstrap() {
    local include
    include=$(IFS=,; echo "${GUEST_PACKAGES[*]}")
    mmdebstrap --variant=minbase --include="$include" "$AQ_QEMU_SUITE" "$ROOT" \
        "deb $AQ_QEMU_MIRROR $AQ_QEMU_SUITE main" "deb $AQ_QEMU_MIRROR $AQ_QEMU_SUITE-updates main" \
        "deb $AQ_QEMU_SECURITY_MIRROR $AQ_QEMU_SUITE-security main" \
        >"$LOGS/mmdebstrap.log" 2>&1 || { tail -n 30 "$LOGS/mmdebstrap.log" >&2; return 1; }
    [ -L "$ROOT/lib" ] || die "mmdebstrap made no usr-merged tree (/lib is not a symlink)"
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
    # .../source (the common headers). Make both links; check they lead somewhere.
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

# The root filesystem sits in a GPT partition that the kernel finds by its UUID (root=PARTUUID=
# with rootwait): without an initramfs the kernel resolves no filesystem UUID or label, and 6.12
# numbers the two NVMe disks in either order, so /dev/nvme0n1 may be the results disk.
step_image() {
    rm -rf "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* \
           "$ROOT"/usr/share/locale/* "$ROOT"/var/cache/apt/* "$ROOT"/var/lib/apt/lists/* \
           "$ROOT"/var/log/*.log "$ROOT"/var/log/apt/*
    local used_mb fs_mb partuuid disk=$W/rootfs.img.new
    used_mb=$(du -sm "$ROOT" | cut -f1)
    # Room for the guest's writes (they go to a qemu snapshot overlay anyway) and ext4's overhead.
    fs_mb=$((used_mb * 13 / 10 + 256))
    partuuid=$(cat /proc/sys/kernel/random/uuid)
    # 1 MiB before the partition (the GPT, alignment) and 1 MiB after it (the backup GPT).
    truncate -s $((fs_mb + 2))M "$disk"
    printf 'label: gpt\nstart=2048, size=%d, type=%s, uuid=%s, name=aqtune-root\n' \
        $((fs_mb * 2048)) "$LINUX_FS_TYPE" "$partuuid" | sfdisk -q "$disk" >"$LOGS/sfdisk.log" 2>&1 ||
        { cat "$LOGS/sfdisk.log" >&2; return 1; }
    mkfs.ext4 -q -F -L aqtune-root -m 0 -E offset=1048576 -d "$ROOT" "$disk" "${fs_mb}M"
    mv -f "$disk" "$W/rootfs.img"
    mv -f "$B/vmlinuz" "$W/vmlinuz"
    printf 'kv=%s\nkernel_version=%s\nsuite=%s\npartuuid=%s\nstamp=%s\nbuilt=%s\n' "$KV" "$KERNEL_VERSION" \
        "$AQ_QEMU_SUITE" "$partuuid" "$STAMP" "$(date -u +%FT%TZ)" >"$W/manifest"
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
step bootstrap step_bootstrap
step kernel_modules_headers step_kernel
step checkout step_checkout
step image step_image
echo "STEP build_total $(since "$start")"
note "$AQ_QEMU_SUITE guest ready: $W/rootfs.img, kernel $KV"
