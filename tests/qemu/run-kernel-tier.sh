#!/bin/bash
# The stock-kernel test tier: runs every test marked "kernel" (kprobes, fentry) inside qemu on
# Debian's stock cloud kernels, for hosts whose own kernel lacks them. One guest per Debian release,
# each with that release's own userland and bcc: Debian 12 (bookworm) on 6.1, Debian 13 (trixie)
# on 6.12.
#
#   bash tests/qemu/run-kernel-tier.sh [SUITE...]   (as root, on Debian 12 or 13; default: $AQ_QEMU_SUITES)
#
# Per suite, one after the other: builds the guest with build-guest.sh, unless
# $AQ_QEMU_DIR/SUITE already holds an image of this very checkout, kernel and package set; boots
# it once under TCG (2-3 min, most of it bcc compiling under emulation); prints the guest's pytest
# summary and "kernel-tier: SUITE KV: N passed, N failed, N skipped". Then one such line per suite,
# and "kernel-tier: N passed, N failed, N skipped" over all guests as the last line. Exits 0 when
# every guest passed, else the first failing guest's code: 1 failed, 2 interrupted, 5 no test
# collected (a failure here too), 124 guest test timeout, 3 the guest never reported (boot failure,
# panic, qemu timeout), 6 the guest could not be built. Each guest's serial log and results stay
# in $AQ_QEMU_DIR/SUITE/last-run.
#
# Environment (see also common.sh and build-guest.sh):
#   AQ_QEMU_DIR      work directory; default /var/tmp/aqtune-qemu (a subdirectory per suite)
#   AQ_QEMU_SUITES   suites to run when none is given; default "bookworm trixie"
#   KV_<suite>       a guest's kernel ABI, e.g. KV_bookworm=6.1.0-53-cloud-amd64 (KV= with one suite)
#   AQ_QEMU_REBUILD  1 builds new images even if the existing ones match
#   AQ_QEMU_CLEAN    1 deletes each image and kernel after its run (about 0.6 GB each)
#   AQ_QEMU_TIMEOUT  seconds for each qemu run; default 1500 (the guest's tests get 120 s less)
#   AQ_QEMU_ACCEL    tcg (default: works everywhere) or kvm (much faster where nested
#                    virtualisation works; on our VMs /dev/kvm exists but qemu aborts on it)
#   AQ_QEMU_SMP, AQ_QEMU_MEM  guest CPUs and memory; default 2 and 4G
set -euo pipefail
PROG=kernel-tier
QEMU_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=common.sh
. "$QEMU_HERE/common.sh"

# --- all guests: run each suite's guest in a child of this script, then sum up ----------------------
if [ -z "${AQ_QEMU_GUEST_RUN:-}" ]; then
    case "${1:-}" in
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
    esac
    [ "$(id -u)" = 0 ] || die "must run as root (it installs qemu and bootstraps the guests)"
    # shellcheck disable=SC2206  # a space-separated list
    suites=(${@:-$AQ_QEMU_SUITES})
    [ "${#suites[@]}" -gt 0 ] || die "no suite to run (AQ_QEMU_SUITES is empty)"
    for suite in "${suites[@]}"; do check_suite "$suite"; done
    if [ -n "${KV:-}" ] && [ "${#suites[@]}" -gt 1 ]; then
        die "KV=$KV names one kernel but ${#suites[@]} guests run (${suites[*]}): set KV_<suite>, e.g. KV_${suites[0]}=$KV"
    fi
    check_workdir
    lock_workdir
    overall=0 total_passed=0 total_failed=0 total_skipped=0 lines=()
    for suite in "${suites[@]}"; do
        t0=$EPOCHREALTIME
        out=$AQ_QEMU_DIR/$suite.out
        mkdir -p "$AQ_QEMU_DIR"
        rc=0
        AQ_QEMU_GUEST_RUN=1 AQ_QEMU_SUITE=$suite bash "$0" 2>&1 | tee "$out" || rc=${PIPESTATUS[0]}
        last=$(sed -n 's/^kernel-tier: \([0-9]* passed, [0-9]* failed, [0-9]* skipped\)$/\1/p' "$out" | tail -n1)
        kv=$(sed -n 's/^kernel-tier: kernel \([^ ,]*\).*/\1/p' "$out" | tail -n1)
        read -r p _ f _ s _ <<<"${last:-0 passed, 0 failed, 0 skipped}"
        total_passed=$((total_passed + p)) total_failed=$((total_failed + f)) total_skipped=$((total_skipped + s))
        lines+=("kernel-tier: $suite ${kv:-?}: ${last:-no result} in $(since "$t0") s (exit $rc)")
        if [ "$rc" != 0 ] && [ "$overall" = 0 ]; then overall=$rc; fi
        rm -f "$out"
    done
    echo
    printf '%s\n' "${lines[@]}"
    echo "kernel-tier: $total_passed passed, $total_failed failed, $total_skipped skipped"
    exit "$overall"
fi

# --- one guest: AQ_QEMU_SUITE ----------------------------------------------------------------------
use_suite "$AQ_QEMU_SUITE"
TIMEOUT=${AQ_QEMU_TIMEOUT:-1500}
SMP=${AQ_QEMU_SMP:-2}
MEM=${AQ_QEMU_MEM:-4G}
ACCEL=${AQ_QEMU_ACCEL:-tcg}
W=$SUITE_DIR
RUN=$W/last-run
EXIT_NO_REPORT=3
EXIT_BUILD_FAILED=6

case "$TIMEOUT" in ''|*[!0-9]*) die "AQ_QEMU_TIMEOUT must be whole seconds, not '$TIMEOUT'" ;; esac
[ "$TIMEOUT" -ge 300 ] || die "AQ_QEMU_TIMEOUT=$TIMEOUT is too short: one bcc compile alone takes about 45 s under TCG"

check_workdir
lock_workdir
mkdir -p "$W"

qemu_pid='' tail_pid=''
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
    local rc=$?
    # timeout(1) passes the TERM on to qemu, and kills it 10 s later if it is still there.
    [ -z "$qemu_pid" ] || kill "$qemu_pid" 2>/dev/null || true
    [ -z "$tail_pid" ] || kill "$tail_pid" 2>/dev/null || true
    [ -z "$qemu_pid" ] || wait "$qemu_pid" 2>/dev/null || true
    rm -f "$RUN/results.img"
    if [ "${AQ_QEMU_CLEAN:-0}" = 1 ]; then
        rm -f "$W/rootfs.img" "$W/vmlinuz" "$W/manifest"
    fi
    return "$rc"
}
trap cleanup EXIT
trap 'note "interrupted (SIGINT), cleaning up"; exit 130' INT
trap 'note "terminated (SIGTERM), cleaning up"; exit 143' TERM

manifest() { sed -n "s/^$1=//p" "$W/manifest" 2>/dev/null; }

# --- the image: reuse it if it holds this checkout, kernel and package set --------------------------
t0=$EPOCHREALTIME
build_note="reused image"
reuse=0
if [ "${AQ_QEMU_REBUILD:-0}" != 1 ] && [ -f "$W/rootfs.img" ] && [ -f "$W/vmlinuz" ] && [ -f "$W/manifest" ]; then
    # The suite's newest kernel, from fresh lists; offline, the lists of the last build decide.
    # Not resolve_kernel's die: where it fails, build-guest.sh fails saying why.
    (suite_apt_update) 2>/dev/null || note "could not update $AQ_QEMU_SUITE's package lists; using the last ones"
    if (resolve_kernel >/dev/null 2>&1); then
        resolve_kernel
        if [ "$(image_stamp)" = "$(manifest stamp)" ]; then reuse=1; fi
    fi
fi
if [ "$reuse" = 1 ]; then
    note "reusing $W/rootfs.img: same checkout, $AQ_QEMU_SUITE, kernel $(manifest kv) and packages"
else
    note "building the $AQ_QEMU_SUITE guest (build-guest.sh)"
    if ! bash "$QEMU_HERE/build-guest.sh"; then
        echo "kernel-tier: the $AQ_QEMU_SUITE guest could not be built (see the messages above and $W/logs)"
        echo "kernel-tier: 0 passed, 0 failed, 0 skipped"
        exit "$EXIT_BUILD_FAILED"
    fi
    build_note="built image"
fi
build_s=$(since "$t0")
KV=$(manifest kv)
PARTUUID=$(manifest partuuid)
[ -n "$KV" ] || die "$W/manifest names no kernel"
[ -n "$PARTUUID" ] || die "$W/manifest names no root partition (an image of an older build-guest.sh: AQ_QEMU_REBUILD=1)"

# --- boot ------------------------------------------------------------------------------------------
# shellcheck disable=SC2054  # tcg,thread=multi is one qemu argument
case "$ACCEL" in
    tcg) accel=(-accel tcg,thread=multi -cpu max) ;;
    kvm) accel=(-accel kvm -cpu host) ;;
    *) die "AQ_QEMU_ACCEL must be tcg or kvm, not '$ACCEL'" ;;
esac

# One boot of the guest; its console in $RUN/serial.log, its results under $RUN/results.
boot_once() {
    rm -rf "$RUN"
    mkdir -p "$RUN/results"
    truncate -s 64M "$RUN/results.img"     # the guest writes a tar onto it
    # The root by its partition's UUID, waited for: 6.12 numbers the two NVMe disks in either order.
    append="console=ttyS0 root=PARTUUID=$PARTUUID rootwait rootfstype=ext4 rw init=$GUEST_INIT panic=-1 mitigations=off"
    append+=" aqtune.timeout=$((TIMEOUT - 120))"

    note "booting $AQ_QEMU_SUITE's $KV under qemu ($ACCEL, $SMP CPUs, $MEM), at most $TIMEOUT s"
    t0=$EPOCHREALTIME
    # NVMe is built into Debian's cloud kernel (virtio-blk is a module), so no initramfs is needed.
    # snapshot=on sends the guest's writes to a throw-away overlay: the image stays reusable.
    # -no-reboot with panic=-1 turns a guest panic into qemu's exit; -nic none: no network at all.
    timeout --kill-after=10 "$TIMEOUT" qemu-system-x86_64 -name "aqtune-kernel-tier-$AQ_QEMU_SUITE" \
        "${accel[@]}" -smp "$SMP" -m "$MEM" \
        -display none -monitor none -serial stdio -no-reboot -nic none \
        -kernel "$W/vmlinuz" -append "$append" \
        -drive file="$W/rootfs.img",format=raw,if=none,id=root,snapshot=on \
        -device nvme,drive=root,serial=aqtune-root \
        -drive file="$RUN/results.img",format=raw,if=none,id=results \
        -device nvme,drive=results,serial=aqtune-results \
        </dev/null >"$RUN/serial.log" 2>&1 &
    qemu_pid=$!
    # Live progress: the console without the kernel's own messages (all of them are in serial.log).
    tail -n +1 -f --pid="$qemu_pid" "$RUN/serial.log" 2>/dev/null |
        sed -u -e 's/\r$//' -e '/^\[ *[0-9]*\.[0-9]*\] /d' -e 's/^/guest| /' &
    tail_pid=$!
    qemu_rc=0
    wait "$qemu_pid" || qemu_rc=$?
    qemu_pid=''
    wait "$tail_pid" 2>/dev/null || true
    tail_pid=''
    qemu_s=$(since "$t0")
    case "$qemu_rc" in
        0) ;;
        124|137) note "qemu was stopped after $TIMEOUT s (AQ_QEMU_TIMEOUT)" ;;
        *) note "qemu exited $qemu_rc" ;;
    esac

    # --- results ---------------------------------------------------------------------------------------
    if ! tar -C "$RUN/results" -xf "$RUN/results.img" 2>/dev/null || [ ! -e "$RUN/results/exit-code" ]; then
        note "the guest wrote no results to its results disk"
    fi
    rm -f "$RUN/results.img"
}

# Multi-threaded TCG now and then trips over the kernel patching its own text at boot (an int3 oops
# in early init, before any of our code runs): such a boot is retried once, and said.
for attempt in 1 2; do
    boot_once
    if [ -e "$RUN/results/exit-code" ] || ! grep -q "Kernel panic" "$RUN/serial.log" ||
        grep -q "aqtune-guest: up after" "$RUN/serial.log" || [ "$attempt" = 2 ]; then
        break
    fi
    cp "$RUN/serial.log" "$W/serial-boot-$attempt.log"
    note "the $AQ_QEMU_SUITE guest's kernel panicked while booting, before aqtune's tests ran (console: $W/serial-boot-$attempt.log): booting it again"
done
console() { tr -d '\r' <"$RUN/serial.log"; }
guest_rc=$(console | sed -n 's/^QEMU-CI-EXIT=\([0-9][0-9]*\)$/\1/p' | tail -n1)
boot_s=$(console | sed -n 's/^aqtune-guest: up after \([0-9.]*\) s.*/\1/p' | tail -n1)
tests_s=$(console | sed -n 's/^aqtune-guest: tests took \([0-9.]*\) s$/\1/p' | tail -n1)

# The guest's pytest summary: from "short test summary info" to pytest's closing line.
log=$RUN/results/pytest.log
[ -s "$log" ] || log=$RUN/serial.log
echo
echo "===== guest pytest summary ($AQ_QEMU_SUITE, $KV) ====="
summary=$(tr -d '\r' <"$log" | grep -v '^\[ *[0-9]*\.[0-9]*\] ' |
          sed -n '/short test summary info/,/^=\{3,\} .* in [0-9.]*s/p' || true)
if [ -n "$summary" ]; then
    echo "$summary"
else    # no summary section (nothing collected, or the guest died): pytest's or the console's last words
    tr -d '\r' <"$log" | grep -v '^\[ *[0-9]*\.[0-9]*\] ' | tail -n 15 || true
fi
echo "======================================"

counts=$(/usr/bin/python3 - "$RUN/results/junit.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET

try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("0 0 0 0")
    sys.exit()
suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
tests = failures = errors = skipped = 0
for suite in suites:
    tests += int(suite.get("tests", 0))
    failures += int(suite.get("failures", 0))
    errors += int(suite.get("errors", 0))
    skipped += int(suite.get("skipped", 0))
print(tests - failures - errors - skipped, failures + errors, skipped, tests)
EOF
)
read -r passed failed skipped collected <<<"$counts"

rc=${guest_rc:-$EXIT_NO_REPORT}
if [ -z "$guest_rc" ]; then
    echo "kernel-tier: the guest never reported (boot failure, panic or timeout); console: $RUN/serial.log"
elif [ "$rc" = 5 ]; then
    echo "kernel-tier: no test marked kernel was collected; the tier exists to run them"
elif [ "$rc" = 0 ] && [ "$passed" = 0 ]; then
    echo "kernel-tier: $collected kernel tests collected but none passed"
    rc=5
fi
echo "kernel-tier: kernel $KV, $ACCEL; $build_note ${build_s} s, boot ${boot_s:-?} s, tests ${tests_s:-?} s, qemu ${qemu_s} s; guest exit ${guest_rc:-none}; logs in $RUN"
echo "kernel-tier: $passed passed, $failed failed, $skipped skipped"
exit "$rc"
