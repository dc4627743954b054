# Shared by build-guest.sh and run-kernel-tier.sh: sourced, never run on its own.
# The caller sets PROG (its name, for messages) and QEMU_HERE (this directory) before sourcing.
# shellcheck disable=SC2034  # the variables below are the callers'
#
# Environment (all optional):
#   AQ_QEMU_DIR      work directory; default /var/tmp/aqtune-qemu (one subdirectory per suite)
#   AQ_QEMU_SUITES   Debian suites whose guests run, in order; default "bookworm trixie"
#   AQ_QEMU_SUITE    the one suite this script works on (run-kernel-tier.sh sets it per guest)
#   KV_<suite>, KV   guest kernel ABI, e.g. KV_bookworm=6.1.0-53-cloud-amd64,
#                    KV_trixie=6.12.118+deb13-cloud-amd64 (KV= alone when one suite runs); default:
#                    what the suite's linux-image-cloud-amd64 depends on right now. Each guest runs
#                    its own release's bcc, which compiles its own release's kernel headers (Debian
#                    12's bcc 0.26 cannot compile 6.12's; Debian 13's bcc 0.31 can).
#   AQ_QEMU_MIRROR, AQ_QEMU_SECURITY_MIRROR   Debian mirrors; default deb.debian.org

# A pyenv or venv python first on PATH cannot see Debian's python3 packages, and CI's PATH is not ours.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive

AQ_QEMU_DIR=${AQ_QEMU_DIR:-/var/tmp/aqtune-qemu}
AQ_QEMU_SUITES=${AQ_QEMU_SUITES:-bookworm trixie}
AQ_QEMU_SUITE=${AQ_QEMU_SUITE:-}
AQ_QEMU_MIRROR=${AQ_QEMU_MIRROR:-http://deb.debian.org/debian}
AQ_QEMU_SECURITY_MIRROR=${AQ_QEMU_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
REPO=$(cd "$QEMU_HERE/../.." && pwd -P)
# Where the guest finds the checkout and its init; init.sh has the same paths.
GUEST_CHECKOUT=/opt/aqtune
GUEST_INIT=/usr/local/sbin/aqtune-guest-init

# What the guest's pytest run needs: bcc for the probes, and every third-party module that
# collecting tests/ imports (pytest imports every test module before it filters on -m kernel).
# iproute2 (ip, ss, nstat) for the namespace helpers, kmod so inet_diag and friends load on demand,
# procps for sysctl. The names are the same in Debian 12 and 13.
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

check_suite() {  # SUITE: a plain Debian suite name (it becomes a directory and a variable name)
    case "$1" in
        ''|*[!a-z]*) die "'$1' is not a Debian suite name (AQ_QEMU_SUITES: e.g. 'bookworm trixie')" ;;
    esac
}

# Sets the per-suite paths: SUITE_DIR (image, kernel, manifest, logs, last-run) and SUITE_APT
# (apt options for a private copy of the suite's package lists: the host's lists know only the
# host's own release, and a Debian 12 host must find Debian 13's kernel as well).
use_suite() {
    AQ_QEMU_SUITE=$1
    check_suite "$AQ_QEMU_SUITE"
    SUITE_DIR=$AQ_QEMU_DIR/$AQ_QEMU_SUITE
    local a=$SUITE_DIR/apt
    SUITE_APT=(-o "Dir::State::Lists=$a/lists" -o "Dir::State::status=$a/status" -o "Dir::Cache=$a/cache"
               -o "Dir::Etc::SourceList=$a/sources.list" -o "Dir::Etc::SourceParts=$a/none"
               -o "Dir::Etc::Preferences=$a/none" -o "Dir::Etc::PreferencesParts=$a/none"
               -o Acquire::Languages=none -o APT::Sandbox::User=root)
}

# The suite's package lists: main, updates and security, as a current machine of that release sees them.
suite_apt_update() {
    local a=$SUITE_DIR/apt s=$AQ_QEMU_SUITE
    mkdir -p "$a/lists/partial" "$a/cache/archives/partial" "$a/none"
    : >"$a/status"
    printf 'deb [signed-by=%s] %s %s main\n' "$KEYRING" "$AQ_QEMU_MIRROR" "$s" "$KEYRING" "$AQ_QEMU_MIRROR" "$s-updates" \
        "$KEYRING" "$AQ_QEMU_SECURITY_MIRROR" "$s-security" >"$a/sources.list"
    apt-get -q "${SUITE_APT[@]}" update >"$a/update.log" 2>&1 ||
        { tail -n 20 "$a/update.log" >&2; die "apt-get update of $s's lists failed (see $a/update.log)"; }
}

suite_apt_cache() { apt-cache "${SUITE_APT[@]}" "$@"; }

# One tier at a time per work directory. run-kernel-tier.sh takes the lock and exports
# AQ_QEMU_LOCKED so the scripts it starts do not wait for it.
lock_workdir() {
    [ -z "${AQ_QEMU_LOCKED:-}" ] || return 0
    exec 9>"$AQ_QEMU_DIR/.lock"
    flock -w 3600 9 || die "another kernel tier has held $AQ_QEMU_DIR/.lock for an hour"
    export AQ_QEMU_LOCKED=1
}

# Sets KV (kernel ABI) and KERNEL_VERSION (its Debian package version) from the suite's lists
# (suite_apt_update first). Fails saying why, and which kernels the suite has, when it cannot.
resolve_kernel() {
    local override="KV_$AQ_QEMU_SUITE" from
    KV=${!override:-${KV:-}}
    if [ -n "${!override:-}" ]; then
        from="$override=$KV"
    elif [ -n "$KV" ]; then
        from="KV=$KV"
    else
        from="$AQ_QEMU_SUITE's linux-image-cloud-amd64"
        KV=$(suite_apt_cache depends linux-image-cloud-amd64 2>/dev/null |
             sed -n 's/^ *Depends: linux-image-\([0-9].*-cloud-amd64\)$/\1/p' | head -n1 || true)
        [ -n "$KV" ] || die "$AQ_QEMU_SUITE's lists ($SUITE_DIR/apt) know no linux-image-cloud-amd64:" \
                            "is '$AQ_QEMU_SUITE' a Debian suite, and did apt-get update reach $AQ_QEMU_MIRROR?"
    fi
    KERNEL_VERSION=$(suite_apt_cache show --no-all-versions "linux-image-$KV" 2>/dev/null |
                     sed -n 's/^Version: //p' | head -n1 || true)
    if [ -z "$KERNEL_VERSION" ]; then
        local known
        known=$(suite_apt_cache pkgnames linux-image- 2>/dev/null | grep -E '^linux-image-[0-9].*-cloud-amd64$' |
                sed 's/^linux-image-//' | sort -V | tail -n 5 | tr '\n' ' ' || true)
        die "$AQ_QEMU_SUITE has no linux-image-$KV (asked for by $from); its newest cloud kernels: ${known:-none}"
    fi
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
