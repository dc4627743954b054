# Shared by build-guest.sh and run-kernel-tier.sh: sourced, never run on its own.
# The caller sets PROG (its name, for messages) and QEMU_HERE (this directory) before sourcing.
# shellcheck disable=SC2034  # the variables below are the callers'
#
# Environment (all optional):
#   AQ_QEMU_DIR    work directory; default /var/tmp/aqtune-qemu
#   KV             guest kernel ABI, e.g. 6.1.0-56-cloud-amd64; default: what linux-image-cloud-amd64
#                  depends on right now. Keep to 6.1: bookworm's bcc 0.26 cannot compile against 6.12.
#   AQ_QEMU_SUITE  Debian suite of the guest; default bookworm (its bcc matches the 6.1 kernel)

# A pyenv or venv python first on PATH cannot see Debian's python3 packages, and CI's PATH is not ours.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive

AQ_QEMU_DIR=${AQ_QEMU_DIR:-/var/tmp/aqtune-qemu}
AQ_QEMU_SUITE=${AQ_QEMU_SUITE:-bookworm}
REPO=$(cd "$QEMU_HERE/../.." && pwd -P)
# Where the guest finds the checkout and its init; init.sh has the same paths.
GUEST_CHECKOUT=/opt/aqtune
GUEST_INIT=/usr/local/sbin/aqtune-guest-init

# What the guest's pytest run needs: bcc for the probes, and every third-party module that
# collecting tests/ imports (pytest imports every test module before it filters on -m kernel).
# iproute2 (ip, ss, nstat) for the namespace helpers, kmod so inet_diag and friends load on demand,
# procps for sysctl.
GUEST_PACKAGES=(
    python3-bpfcc
    python3-pytest python3-hypothesis
    python3-pyroute2 python3-structlog python3-sdnotify python3-seccomp python3-prometheus-client
    iproute2 kmod procps
)

APT=(apt-get -q -o DPkg::Lock::Timeout=600 -o APT::Sandbox::User=root)

note() { echo "$PROG: $*"; }
die() { echo "$PROG: error: $*" >&2; exit 1; }

# Seconds since $1 (an $EPOCHREALTIME value), one decimal.
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

check_workdir() {
    case "$AQ_QEMU_DIR" in
        /?*) ;;
        *) die "AQ_QEMU_DIR must be an absolute path, not '$AQ_QEMU_DIR'" ;;
    esac
    [ "$(realpath -m "$AQ_QEMU_DIR")" != / ] || die "AQ_QEMU_DIR must not be /"
    mkdir -p "$AQ_QEMU_DIR"
}

# One tier at a time per work directory. run-kernel-tier.sh takes the lock and exports
# AQ_QEMU_LOCKED so the build-guest.sh it starts does not wait for itself.
lock_workdir() {
    [ -z "${AQ_QEMU_LOCKED:-}" ] || return 0
    exec 9>"$AQ_QEMU_DIR/.lock"
    flock -w 3600 9 || die "another kernel tier has held $AQ_QEMU_DIR/.lock for an hour"
    export AQ_QEMU_LOCKED=1
}

# Sets KV (kernel ABI) and KERNEL_VERSION (its Debian package version) from the apt lists.
resolve_kernel() {
    if [ -z "${KV:-}" ]; then
        KV=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
             sed -n 's/^ *Depends: linux-image-\([0-9].*-cloud-amd64\)$/\1/p' | head -n1)
        [ -n "$KV" ] || die "apt-cache knows no linux-image-cloud-amd64 (run apt-get update, or set KV=)"
    fi
    KERNEL_VERSION=$(apt-cache show --no-all-versions "linux-image-$KV" 2>/dev/null |
                     sed -n 's/^Version: //p' | head -n1)
    [ -n "$KERNEL_VERSION" ] || die "apt-cache knows no linux-image-$KV (run apt-get update, or pick another KV=)"
}

# The checkout as the guest gets it: tracked and untracked files, NUL-separated, relative to
# REPO, without .git, virtualenvs and caches. Uses .gitignore in a git checkout.
checkout_files() {
    local excluded='(^|/)(\.git|\.venv|venv|__pycache__|\.pytest_cache|\.mypy_cache|\.ruff_cache|\.hypothesis|[^/]*\.egg-info)(/|$)'
    if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git -C "$REPO" -c safe.directory="$REPO" ls-files -z --cached --others --exclude-standard |
            sort -zu | grep -zvE "$excluded" |
            while IFS= read -r -d '' f; do
                # --cached still lists files deleted from the work tree
                if [ -e "$REPO/$f" ] || [ -L "$REPO/$f" ]; then printf '%s\0' "$f"; fi
            done
    else
        (cd "$REPO" && find . \( -type f -o -type l \) -printf '%P\0') | sort -z | grep -zvE "$excluded"
    fi
}

# Identifies what an image holds: kernel, guest packages and the checkout's content.
# Needs resolve_kernel first.
image_stamp() {
    local files
    files=$(cd "$REPO" && checkout_files | xargs -0 -r sha256sum -- | sha256sum | cut -d' ' -f1)
    printf 'suite=%s\nkernel=%s %s\npackages=%s\ncheckout=%s\n' \
        "$AQ_QEMU_SUITE" "$KV" "$KERNEL_VERSION" "${GUEST_PACKAGES[*]}" "$files" | sha256sum | cut -d' ' -f1
}

# Unmounts whatever is still mounted below $1 (debootstrap mounts /proc and /sys in its target
# and can leave them behind when it fails), then deletes $1 without crossing into other filesystems.
remove_tree() {
    local dir=$1 mnt
    [ -e "$dir" ] || return 0
    dir=$(realpath "$dir")
    awk -v d="$dir/" 'index($5 "/", d) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
        while read -r mnt; do umount -l "$mnt" || true; done
    rm -rf --one-file-system "$dir"
}
