#!/usr/bin/env bash
# The README's first command: imgstore end to end on a demo store in ./demo (SQLite, no root paths).
# Builds a chroot (a real Debian one with debootstrap when run as root with debootstrap available and
# IMGSTORE_DEMO_SAMPLE unset, else a small sample tree), commits it, changes it, commits again, then
# shows generations, a checkout, verify, and the deploy story: nodes, canary, rollout, rollback, status.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
DEMO="$PWD/demo"
export IMGSTORE_ROOT="$DEMO/store"
rm -rf "$DEMO" && mkdir -p "$DEMO"
run() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

chroot="$DEMO/chroot"
if [ "$(id -u)" = 0 ] && command -v debootstrap >/dev/null && [ -z "${IMGSTORE_DEMO_SAMPLE:-}" ]; then
    echo "building a Debian bookworm minbase chroot with debootstrap (cached in .cache/rootfs) ..."
    tree=$(.venv/bin/python benchmarks/rootfs.py minbase)
    cp -a "$tree" "$chroot"
else
    echo "building a small sample chroot (set up debootstrap and run as root for a real Debian one) ..."
    mkdir -p "$chroot"/{etc,usr/bin,usr/share/doc/demo,var/log,tmp}
    echo "demo" > "$chroot/etc/hostname"
    printf 'proc /proc proc defaults 0 0\ntmpfs /tmp tmpfs defaults 0 0\n' > "$chroot/etc/fstab"
    for i in $(seq 1 200); do echo "document $i" > "$chroot/usr/share/doc/demo/doc$i.txt"; done
    printf '#!/bin/sh\necho hello\n' > "$chroot/usr/bin/hello" && chmod 755 "$chroot/usr/bin/hello"
    ln -s ../share/doc "$chroot/usr/bin/docs-link"
fi
# A stand-in kernel and initrd, as `apt-get install linux-image-amd64` would leave in /boot.
mkdir -p "$chroot/boot"
head -c 300000 /dev/urandom > "$chroot/boot/vmlinuz-6.1.0-28-amd64"
head -c 100000 /dev/urandom > "$chroot/boot/initrd.img-6.1.0-28-amd64"

run imgstore init
# The demo profile keeps the TFTP root and the root link inside the demo folder.
cat > "$IMGSTORE_ROOT/profiles/web.toml" <<'TOML'
description = "demo web profile (paths relative to the store)"
[commit]
require_kernel = true
[boot]
root_mode = "tmpfs"
append = "root=/dev/nfs nfsroot={nfs_server}:{root},{nfs_options} ip=dhcp ro ramdisk_size=1048576 panic=60"
[deploy]
tftp_root = "tftpboot"
root_link = "netboot/root"
serve_default = true
nfs_server = "10.0.0.1"
# actimeo=120, spelled out: the klibc nfsmount in Debian's initrd rejects "actimeo".
nfs_options = "ro,nolock,tcp,acregmin=120,acregmax=120,acdirmin=120,acdirmax=120"
bootloader_dir = "/usr/lib/PXELINUX"
TOML
run imgstore commit "$chroot" --profile web -m "first image"
run imgstore commit "$chroot" --profile web -m "nothing changed"
echo "Welcome to the web cluster" > "$chroot/etc/motd"
run imgstore commit "$chroot" --profile web -m "add motd"
run imgstore generations
run imgstore show web@latest
run imgstore ls web@2 /etc
run imgstore cat web@2 /etc/motd
run imgstore checkout web@1 "$DEMO/checkout-web-1"
run imgstore verify
run imgstore node add www1 --mac 00:E0:81:2F:64:6B --ip 10.0.1.1 --profile web
run imgstore node add www3 --mac 00:E0:81:2F:64:6C --ip 10.0.1.3 --profile web
run imgstore rollout web@1
run imgstore rollout --canary www3
run imgstore status
run imgstore rollout
run imgstore rollback
run imgstore history
run imgstore status
printf '\n\033[1mThe TFTP tree it produced (%s):\033[0m\n' "$IMGSTORE_ROOT/tftpboot"
(cd "$IMGSTORE_ROOT/tftpboot" && find . -printf '%M %4n %8s  %p\n' | sort -k4 | sed 's/[0-9a-f]\{64\}/<gen-id>/g')
printf '\n\033[1m$ cat %s\033[0m\n' "tftpboot/pxelinux.cfg/01-00-e0-81-2f-64-6c"
cat "$IMGSTORE_ROOT/tftpboot/pxelinux.cfg/01-00-e0-81-2f-64-6c"
printf '\ndemo store: %s (remove it with rm -rf demo)\n' "$IMGSTORE_ROOT"
