#!/bin/bash
# install-pxe-deps.sh [CACHE_DIR]
#
# Everything the PXE lab (tests/pxelab.py) needs, from Debian 12 packages only.
# Idempotent, and fast when everything is already there (no apt call at all).
#
# Tools are apt-installed with --no-install-recommends: with recommends,
# qemu-system-x86 drags in a whole GUI stack.
# Two packages are *unpacked* into CACHE_DIR instead of installed:
#   - tftpd-hpa: its postinst would start a system TFTP service on
#     0.0.0.0:69 (PID 1 is not systemd here, the init script runs). The lab
#     starts in.tftpd itself, inside network namespaces it creates.
#   - the guest kernel (whatever linux-image-amd64 depends on): installing it
#     would run initramfs-tools and touch /boot. Only boot/vmlinuz-* is kept;
#     the .deb unpacks to ~390 MB of modules that the lab's initrd never loads.
#
# CACHE_DIR defaults to <repo>/.cache/pxe (git-ignored). Layout afterwards:
#   CACHE_DIR/tftpd-hpa/usr/sbin/in.tftpd
#   CACHE_DIR/kernel/vmlinuz-<version>      (+ kernel/PACKAGE: the package it came from)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${1:-$HERE/../.cache/pxe}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)

PKGS=(qemu-system-x86 qemu-system-data ipxe-qemu seabios
      pxelinux syslinux-common
      busybox-static cpio gzip kmod iproute2 util-linux coreutils
      dnsmasq-base tftp-hpa
      libwrap0)   # libwrap0: the only library in.tftpd needs beyond libc

export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_update_once() {
    if [ "$apt_updated" = 0 ]; then
        apt-get update -q
        apt_updated=1
    fi
}

missing=()
for p in "${PKGS[@]}"; do
    if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" != installed ]; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "install-pxe-deps.sh: must run as root to install: ${missing[*]}" >&2
        exit 1
    fi
    apt_update_once
    apt-get install -y -q --no-install-recommends "${PKGS[@]}"
fi

# apt-get download drops privileges to _apt, which cannot write into a
# root-owned cache; downloading as root into our own temp dir is fine.
download() {  # download DIR PACKAGE
    (cd "$1" && apt-get download -q -o APT::Sandbox::User=root "$2")
}

tmp=$(mktemp -d "$CACHE/.download.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

if [ ! -x "$CACHE/tftpd-hpa/usr/sbin/in.tftpd" ]; then
    download "$tmp" tftpd-hpa || { apt_update_once; download "$tmp" tftpd-hpa; }
    rm -rf "$CACHE/tftpd-hpa.new"
    dpkg-deb -x "$tmp"/tftpd-hpa_*.deb "$CACHE/tftpd-hpa.new"
    rm -rf "$CACHE/tftpd-hpa"
    mv "$CACHE/tftpd-hpa.new" "$CACHE/tftpd-hpa"
fi

if ! ls "$CACHE"/kernel/vmlinuz-* >/dev/null 2>&1; then
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
           | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [ -z "$kpkg" ]; then
        apt_update_once
        kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    fi
    [ -n "$kpkg" ] || { echo "install-pxe-deps.sh: cannot resolve the kernel package of linux-image-amd64" >&2; exit 1; }
    download "$tmp" "$kpkg" || { apt_update_once; download "$tmp" "$kpkg"; }
    rm -rf "$CACHE/kernel.new" && mkdir -p "$CACHE/kernel.new"
    # Stream only the kernel image out of the 70 MB .deb.
    dpkg-deb --fsys-tarfile "$tmp/${kpkg}"_*.deb \
        | tar -x -C "$CACHE/kernel.new" --wildcards './boot/vmlinuz-*'
    mv "$CACHE"/kernel.new/boot/vmlinuz-* "$CACHE/kernel.new/"
    rmdir "$CACHE/kernel.new/boot"
    echo "$kpkg" > "$CACHE/kernel.new/PACKAGE"
    rm -rf "$CACHE/kernel"
    mv "$CACHE/kernel.new" "$CACHE/kernel"
fi

# The unpacked in.tftpd must run with the installed libraries.
if ldd "$CACHE/tftpd-hpa/usr/sbin/in.tftpd" | grep -q 'not found'; then
    echo "install-pxe-deps.sh: in.tftpd has unresolved libraries:" >&2
    ldd "$CACHE/tftpd-hpa/usr/sbin/in.tftpd" >&2
    exit 1
fi
echo "pxe deps ready in $CACHE: kernel $(cat "$CACHE/kernel/PACKAGE") ($(basename "$CACHE"/kernel/vmlinuz-*))"
