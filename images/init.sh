#!/bin/sh
# holecheck's /init (busybox sh, PID 1 of the L1 VM): load the virtio/fuse modules, mount the host's root
# read-only over virtio-fs, give it a writable /tmp, /run and artifacts dir, then run the agent chrooted into it.
# PID 1 stays this shell so that the agent's exit, whatever its cause, ends the VM at once.
#
# Parameters come from the kernel command line, which the kernel hands to init as environment variables:
#   HC_ROOT_TAG   virtio-fs tag of the host's root (mounted read-only)
#   HC_RW_TAG     virtio-fs tag of the writable share (optional), mounted at HC_RW_PATH inside the root
#   HC_PROJECT    the checkout the agent runs from; HC_PYTHON its venv's python
#   HC_PORT       virtio-serial port name of the agent's channel
#   HC_CACHE      holecheck's cache dir on the host (HOLECHECK_CACHE: the prebuilt uffd helper lives there)
#   HC_KEEP0..3   host paths under /tmp, /run or /dev/shm the agent needs (the checkout, its venv, the cache):
#                 the guest's own tmpfs mounts would hide them, so they are bound back on top
# The agent gets HOLECHECK_L1=1: what may only ever change inside a VM (swap: ``pageout-swap``) checks it.
# Values may contain spaces (the kernel strips the quotes of NAME="a b"); the host refuses quotes and newlines.
export PATH=/bin
/bin/busybox --install -s /bin

say() { echo "holecheck-init: [$(cut -d" " -f1 /proc/uptime)] $*"; }
# QEMU runs with -no-reboot: a reset ends it, with or without ACPI (power-off needs ACPI, a reset does not).
off() {
    sync
    reboot -f
    sleep 10
}
die() {
    say "FAILED: $*"
    off
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

for m in $(cat /etc/modules.order); do
    insmod "/lib/modules/$m" || die "insmod $m"
done

say "modules loaded"
R=/newroot
mount -t virtiofs -o ro "$HC_ROOT_TAG" "$R" || die "mount -t virtiofs $HC_ROOT_TAG $R"
# Hold on to the kept paths before /tmp, /run and /dev/shm are covered by the guest's own tmpfs mounts.
mkdir -p /keep
for i in 0 1 2 3; do
    eval "p=\${HC_KEEP$i}"
    [ -n "$p" ] || continue
    mkdir -p "/keep/$i"
    mount --bind "$R$p" "/keep/$i" || die "bind $p (HC_KEEP$i): no such path under the host's root?"
done
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp" || die "tmpfs on /tmp"
mount -t tmpfs -o mode=755 tmpfs "$R/run" || die "tmpfs on /run"
mount -t proc proc "$R/proc" || die "proc"
mount -t sysfs sysfs "$R/sys" || die "sysfs"
mount -t devtmpfs devtmpfs "$R/dev" || die "devtmpfs"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup" || die "cgroup2 on /sys/fs/cgroup"
mkdir -p "$R/dev/shm" "$R/dev/pts" "$R/dev/virtio-ports"
mount -t tmpfs -o mode=1777 tmpfs "$R/dev/shm"
for i in 0 1 2 3; do
    eval "p=\${HC_KEEP$i}"
    [ -n "$p" ] || continue
    mkdir -p "$R$p" && mount --bind "/keep/$i" "$R$p" || die "bind $p (HC_KEEP$i) back over the guest's tmpfs"
done
if [ -n "$HC_RW_TAG" ]; then
    mkdir -p "$R$HC_RW_PATH" 2>/dev/null  # under /tmp (a tmpfs here) it must be made; elsewhere it exists
    mount -t virtiofs "$HC_RW_TAG" "$R$HC_RW_PATH" || die "mount -t virtiofs $HC_RW_TAG $HC_RW_PATH"
fi

say "root mounted"
# No udev: name the virtio-serial ports ourselves, as udev's rule would.
for port in /sys/class/virtio-ports/*; do
    [ -e "$port/name" ] || continue
    ln -sf "../$(basename "$port")" "$R/dev/virtio-ports/$(cat "$port/name")"
done
[ -e "$R/dev/virtio-ports/$HC_PORT" ] || die "no virtio-serial port named $HC_PORT"

say "starting the agent"
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp \
    HOLECHECK_CACHE="$HC_CACHE" HOLECHECK_L1=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    chroot "$R" /bin/sh -c 'cd "$0" && exec "$1" -S -m suite.targets.agent "$2"' \
    "$HC_PROJECT" "$HC_PYTHON" "/dev/virtio-ports/$HC_PORT"
say "agent exited with status $?"
off
