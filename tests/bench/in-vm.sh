#!/usr/bin/env bash
# Runs tests/bench/peers.py inside a throwaway virtual machine with a kernel of its own, for the
# cells this machine's limits forbid: 10,000 idle tunnels need 20,000 file descriptors in the
# gateway alone, and this box's hard RLIMIT_NOFILE is 20,000 with no CAP_SYS_RESOURCE to raise
# it. Inside the VM, root raises it at will.
#
#   tests/bench/in-vm.sh [--mem MiB] [--cpus N] -- <peers.py arguments>
#   tests/bench/in-vm.sh -- --no-build --peers proxygate,haproxy --scenarios idle \
#       --idle-tunnels 10000 --passes 1 --seconds 20 --json-out /vmout/idle10k.json
#
# The VM sees this machine's whole file system read-only (9p), with a RAM overlay for writes,
# and /vmout, shared read-write with the host's directory printed at the end ($PG_VM_OUT, or a
# new one under /tmp): peers.py's log goes there, and so do `--json-out /vmout/NAME` and, with
# --keep-work, the run's directory. It has no network but loopback. It runs under QEMU's TCG
# emulation (KVM on this box hangs the guest: nested virtualisation is not offered), several
# times slower than the host: compare gateways within one VM run, and read its memory figures
# (RSS per tunnel, RSS after), not its rates. Build first (peers.py without --no-build, or
# cargo build --release -p proxygate -p proxygate-loadgen): the VM cannot fetch crates. Needs
# root for apt-get and Debian's packages qemu-system-x86, busybox-static, kmod and cpio
# (installed if missing), and Debian's kernel image, fetched once into $PG_VM_CACHE
# (/var/cache/proxygate-vm). PG_VM_ACCEL=kvm where KVM works.
set -euo pipefail

MEM=6144
CPUS=2
while [[ $# -gt 0 ]]; do
    case "$1" in
        --mem) MEM=$2; shift 2 ;;
        --cpus) CPUS=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "in-vm.sh: unknown option $1 (peers.py's own arguments go after --)" >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${PG_VM_CACHE:-/var/cache/proxygate-vm}
OUT=${PG_VM_OUT:-$(mktemp -d /tmp/pg-vm-out.XXXXXX)}
mkdir -p "$CACHE" "$OUT"

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
{ command -v busybox >/dev/null && { ldd "$(command -v busybox)" 2>&1 || true; } | grep -q "not a dynamic"; } ||
    need+=(busybox-static)
command -v depmod >/dev/null || need+=(kmod)
command -v cpio >/dev/null || need+=(cpio)
if [[ ${#need[@]} -gt 0 ]]; then
    echo "in-vm.sh: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
BUSYBOX=$(command -v busybox)

# The kernel: Debian's generic one (it has the 9p and virtio modules as modules).
kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'
}
KPKG=$(kernel_package)
if [[ -z $KPKG ]]; then
    apt-get update -qq
    KPKG=$(kernel_package)
fi
[[ -n $KPKG ]] || { echo "in-vm.sh: no Debian kernel package (linux-image-amd64) found" >&2; exit 1; }
KPKG=${KPKG%-unsigned}
KDIR=$CACHE/$KPKG
if [[ ! -d $KDIR/boot ]]; then
    echo "in-vm.sh: fetching $KPKG" >&2
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download "$KPKG-unsigned" >/dev/null 2>&1 || apt-get download "$KPKG" >/dev/null)
    rm -rf "$KDIR.part" && dpkg-deb -x "$tmp"/*.deb "$KDIR.part"
    depmod -b "$KDIR.part" "$(ls "$KDIR.part/lib/modules")"
    mv "$KDIR.part" "$KDIR" && rm -rf "$tmp"
fi
KVER=$(ls "$KDIR/lib/modules")
VMLINUZ=$(ls "$KDIR"/boot/vmlinuz-*)

# The initramfs: busybox, the modules to mount the host's file system, and an init that
# chroots into it (read-only, under a RAM overlay) and runs peers.py.
IR=$(mktemp -d)
trap 'rm -rf "$IR"' EXIT
mkdir -p "$IR"/{bin,proc,sys,dev,host,ov,root2,lib/modules}
cp "$BUSYBOX" "$IR/bin/busybox"
# The modules to mount the host's file system, each after what it needs (modules.dep).
DEP=$KDIR/lib/modules/$KVER/modules.dep
ORDER=()
add_module() {
    local path=$1 d
    for d in $(grep -E "^$path:" "$DEP" | cut -d: -f2); do add_module "$d"; done
    [[ " ${ORDER[*]} " == *" $path "* ]] || ORDER+=("$path")
}
for m in virtio_pci 9pnet_virtio 9p overlay; do
    f=$(grep -oE "^([^:]*/)?$m\.ko(\.[a-z]+)?:" "$DEP" | tr -d :)
    [[ -n $f ]] || { echo "in-vm.sh: module $m not in $KPKG" >&2; exit 1; }
    add_module "$f"
done
MODS=""
for f in "${ORDER[@]}"; do
    m=$(basename "$f"); m=${m%%.ko*}
    case $f in
        *.xz) xz -dc "$KDIR/lib/modules/$KVER/$f" ;;
        *.zst) zstd -dc "$KDIR/lib/modules/$KVER/$f" ;;
        *) cat "$KDIR/lib/modules/$KVER/$f" ;;
    esac > "$IR/lib/modules/$m.ko"
    MODS+="$m "
done
printf '%q ' "$@" > "$IR/peers-args"
cat > "$IR/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
date -u -s "@\$(sed 's/.*pgdate=\([0-9]*\).*/\1/' /proc/cmdline)" >/dev/null
for m in $MODS; do insmod /lib/modules/\$m.ko || echo "insmod \$m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576,cache=loose,ro host /host
mount -t tmpfs -o size=90% ov /ov && mkdir -p /ov/up /ov/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/ov/up,workdir=/ov/work /root2
mkdir -p /root2/vmout && mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576 vmout /root2/vmout
mount -t proc proc /root2/proc; mount -t sysfs sys /root2/sys; mount -t devtmpfs dev /root2/dev
# /tmp stays the overlay's (its writes in RAM too): the checkout may live under it.
ip link set lo up
echo "in-vm: \$(nproc) CPUs, \$(awk '/MemTotal/{print \$2}' /proc/meminfo) kB, kernel \$(uname -r)"
chroot /root2 /usr/bin/env -i HOME=/root PATH=$PATH TERM=dumb /bin/bash -c \
  "ulimit -Hn 400000 && ulimit -Sn 400000 && cd $REPO && python3 tests/bench/peers.py \$(cat /peers-args)" \
  > /root2/vmout/peers.log 2>&1
echo "in-vm: peers.py exit \$?" | tee -a /root2/vmout/peers.log
# --keep-work: the run's directory (configs, logs) comes out too.
for d in \$(sed -n 's/^work directory (kept): //p' /root2/vmout/peers.log); do
    [ -d "/root2\$d" ] && cp -r "/root2\$d" /root2/vmout/
done
sync; poweroff -f
EOF
chmod +x "$IR/init"
(cd "$IR" && find . | cpio -o -H newc --quiet | gzip -1) > "$IR.cpio.gz"
cp "$IR/peers-args" "$OUT/peers-args"

# KVM, where it works, is much faster; here it hangs the guest, so TCG unless told.
ACCEL=${PG_VM_ACCEL:-tcg,thread=multi}
echo "in-vm.sh: booting ($CPUS CPUs, $MEM MiB, $ACCEL); results in $OUT" >&2
qemu-system-x86_64 -accel "$ACCEL" -cpu max -smp "$CPUS" -m "$MEM" -nographic -no-reboot \
    -kernel "$VMLINUZ" -initrd "$IR.cpio.gz" -append "console=ttyS0 quiet panic=-1 pgdate=$(date -u +%s)" \
    -virtfs local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap \
    -virtfs local,path="$OUT",mount_tag=vmout,security_model=none \
    | tr -d "\r" | grep --line-buffered -a -v -e "^$" -e SeaBIOS -e iPXE -e "Press Ctrl-B" -e "Booting from" || true
rm -f "$IR.cpio.gz"
cat "$OUT/peers.log"
echo "in-vm.sh: results in $OUT" >&2
grep -q "peers.py exit 0" "$OUT/peers.log"
