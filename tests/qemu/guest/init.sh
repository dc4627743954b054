#!/bin/bash
# PID 1 of the kernel-tier guest; build-guest.sh installs it as /usr/local/sbin/aqtune-guest-init.
#
# Mounts the pseudo filesystems, brings lo up, runs every test marked "kernel" in /opt/aqtune
# (live on the console), writes junit.xml, pytest.log, dmesg.txt, guest.txt and exit-code as a tar
# onto the disk whose NVMe serial is aqtune-results, prints "QEMU-CI-EXIT=<rc>" and powers off.
#
# rc is pytest's (0 passed, 1 tests failed, 2 interrupted, e.g. a collection error, 5 no test
# collected: a failure too, since the tier exists to run them), or 124 if the kernel command
# line's aqtune.timeout=SECONDS ran out.
#
# PID 1 must never exit early (the kernel would panic before the results are out), so there is no
# set -e: each step reports its own failure and the run goes on to the report.
set -u
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 TERM=dumb COLUMNS=120 \
       PYTHONDONTWRITEBYTECODE=1 AQTUNE_KERNEL_TIER=1
CHECKOUT=/opt/aqtune
RESULTS=/results
RESULTS_SERIAL=aqtune-results
TEST_TIMEOUT=1200

say() { echo "aqtune-guest: $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

mnt() {  # TYPE TARGET
    if mountpoint -q "$2" 2>/dev/null; then return 0; fi
    if ! { mkdir -p "$2" && mount -t "$1" "$1" "$2"; }; then say "cannot mount $1 on $2"; fi
}

mount_all() {
    mnt proc /proc
    mnt sysfs /sys
    mnt devtmpfs /dev
    mnt devpts /dev/pts
    mnt tmpfs /dev/shm
    mnt tmpfs /run
    mnt tmpfs /tmp
    mnt debugfs /sys/kernel/debug
    mnt tracefs /sys/kernel/tracing
    mnt bpf /sys/fs/bpf
    mnt cgroup2 /sys/fs/cgroup
}

read_cmdline() {
    local arg args
    read -r -a args </proc/cmdline
    for arg in "${args[@]}"; do
        case "$arg" in
            aqtune.timeout=[0-9]*) TEST_TIMEOUT=${arg#aqtune.timeout=} ;;
        esac
    done
}

# The block device of the results disk: found by its NVMe serial, as the controllers'
# numbering is not promised.
results_disk() {
    local dev serial
    for dev in /sys/block/nvme*; do
        serial=$(tr -d ' \n' <"$dev/device/serial" 2>/dev/null) || continue
        if [ "$serial" = "$RESULTS_SERIAL" ]; then
            echo "/dev/${dev##*/}"
            return 0
        fi
    done
    return 1
}

run_tests() {
    cd "$CHECKOUT" || { say "no checkout at $CHECKOUT"; return 2; }
    # SIGINT first: pytest then stops like on ^C, printing its summary and writing junit.xml.
    timeout -s INT -k 30 "$TEST_TIMEOUT" /usr/bin/python3 -m pytest -p no:cacheprovider -m kernel tests -rA \
        --junitxml="$RESULTS/junit.xml" 2>&1 | tee "$RESULTS/pytest.log"
    return "${PIPESTATUS[0]}"
}

describe_guest() {
    echo "kernel: $(uname -r) ($(uname -v))"
    echo "cmdline: $(cat /proc/cmdline)"
    echo "python: $(/usr/bin/python3 --version 2>&1)"
    echo "bcc: $(/usr/bin/python3 -c 'import bcc; print(bcc.__version__)' 2>&1)"
    echo "cpus: $(nproc), memory: $(awk '/MemTotal/ { print $2 " kB" }' /proc/meminfo)"
}

mount_all
read_cmdline
hostname aqtune-guest 2>/dev/null
ip link set lo up || say "cannot bring lo up"
mkdir -p "$RESULTS"
say "up after $(uptime_s) s, kernel $(uname -r)"

start=$(uptime_s)
run_tests
rc=$?
end=$(uptime_s)
echo    # an interrupted pytest leaves its progress line open
say "tests took $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }') s"
case "$rc" in
    0) ;;
    5) say "no test marked kernel was collected: the tier ran nothing, which fails it" ;;
    124|137) say "the tests did not finish within aqtune.timeout=$TEST_TIMEOUT s" ;;
    *) say "pytest exited $rc" ;;
esac

describe_guest >"$RESULTS/guest.txt" 2>&1
dmesg >"$RESULTS/dmesg.txt" 2>&1
echo "$rc" >"$RESULTS/exit-code"
if disk=$(results_disk); then
    tar -C "$RESULTS" -cf "$disk" . && sync && say "results written to $disk"
else
    say "no disk with serial $RESULTS_SERIAL: results only on this console"
fi
echo "QEMU-CI-EXIT=$rc"
sync
echo o >/proc/sysrq-trigger
sleep 30
say "power off did not happen; exiting PID 1 (the kernel panics, and panic=-1 with -no-reboot ends qemu)"
exit "$rc"
