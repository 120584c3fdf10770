#!/bin/busybox sh
# /init of the kernel matrix's initramfs (scripts/kernel-matrix.sh builds it): loads the
# 9p and overlay modules of this kernel, puts a tmpfs overlay on the host's root (shared
# read-only over virtio-9p as "hostroot"), mounts the writable "results" share at
# /kmatrix-out in it, and hands over to the `start` script the host wrote there.
bb=/bin/busybox
fail() {
  echo "kernel-matrix init: $*" >&2
  echo o >/proc/sysrq-trigger
  $bb sleep 60
}
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
for m in virtio_pci 9pnet_virtio 9p overlay; do
  # A module the kernel has built in is not in modules.dep: nothing to load.
  if $bb grep -q "/$m.ko:" "/lib/modules/$($bb uname -r)/modules.dep"; then
    $bb modprobe "$m" || fail "modprobe $m failed"
  fi
done
$bb mkdir -p /lower /rw /newroot
$bb mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /lower ||
  fail "cannot mount the host's root over 9p"
$bb mount -t tmpfs -o size=2g tmpfs /rw
$bb mkdir -p /rw/upper /rw/work
$bb mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot ||
  fail "cannot mount the overlay"
$bb mkdir -p /newroot/kmatrix-out
$bb mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /newroot/kmatrix-out ||
  fail "cannot mount the results share"
$bb umount /proc /sys
$bb mount --move /dev /newroot/dev
exec $bb switch_root /newroot /bin/sh /kmatrix-out/start
