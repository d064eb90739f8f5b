"""Shared test helpers: the deliberately nasty tree, and an exact snapshot of a tree for comparison."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import blake3

# cap_net_raw+ep, as Debian's ping carries it (VFS_CAP_REVISION_2).
PING_CAP = bytes.fromhex("0000000200200000000000000000000000000000")

IS_ROOT = os.geteuid() == 0


def snapshot(root: Path | str) -> dict[bytes, dict[str, Any]]:
    """Everything imgstore promises to keep, per path; hardlinks as groups of paths."""
    root_b = os.fsencode(root)
    out: dict[bytes, dict[str, Any]] = {}
    inodes: dict[int, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root_b):
        dirnames.sort()
        for name in [b""] + sorted(dirnames + filenames) if dirpath == root_b else sorted(dirnames + filenames):
            p = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(p, root_b)
            st = os.lstat(p)
            d: dict[str, Any] = {
                "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "mtime_ns": st.st_mtime_ns,
            }
            try:
                d["xattrs"] = sorted(
                    (n, os.getxattr(p, n, follow_symlinks=False)) for n in os.listxattr(p, follow_symlinks=False)
                )
            except OSError:
                d["xattrs"] = []
            if stat.S_ISREG(st.st_mode):
                d["size"] = st.st_size
                h = blake3.blake3()
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                d["hash"] = h.hexdigest()
                d["sparse"] = st.st_size > 0 and st.st_blocks * 512 < st.st_size
                if st.st_nlink > 1:
                    d["link_group"] = inodes.setdefault(st.st_ino, rel)
            elif stat.S_ISLNK(st.st_mode):
                d["target"] = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                d["rdev"] = st.st_rdev
            out[rel] = d
    return out


def diff_snapshots(a: dict[bytes, dict[str, Any]], b: dict[bytes, dict[str, Any]]) -> list[str]:
    problems = []
    for p in sorted(set(a) | set(b)):
        if p not in a:
            problems.append(f"extra {p!r}")
        elif p not in b:
            problems.append(f"missing {p!r}")
        elif a[p] != b[p]:
            keys = {k for k in set(a[p]) | set(b[p]) if a[p].get(k) != b[p].get(k)}
            problems.append(f"{p!r}: " + ", ".join(f"{k}: {a[p].get(k)!r} != {b[p].get(k)!r}" for k in sorted(keys)))
    return problems


def make_nasty_tree(root: Path) -> None:
    """Every kind of entry commit must keep. Needs root for owners, devices and security xattrs."""
    r = os.fsencode(root)
    os.makedirs(r, exist_ok=True)

    def j(*parts: bytes) -> bytes:
        return os.path.join(r, *parts)

    def write(rel: bytes, data: bytes, mode: int = 0o644) -> bytes:
        p = j(rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, mode)
        return p

    write(b"empty", b"")
    write(b"etc/hostname", b"www3\n")
    write(b"etc/fstab", b"proc /proc proc defaults 0 0\n")
    write(b"big.bin", os.urandom(3 << 20))  # a loose object, several chunks
    write(b"compressible.txt", b"hello world\n" * 200_000)
    write(b"zeros-not-sparse", bytes(64 << 10))
    write(b"setuid", b"#!/bin/sh\n", 0o4755)
    write(b"setgid-file", b"x", 0o2711)
    write(b"no-perms", b"secret", 0o000)
    os.makedirs(j(b"tmp"), exist_ok=True)
    os.chmod(j(b"tmp"), 0o1777)
    os.makedirs(j(b"shared"), exist_ok=True)
    os.chmod(j(b"shared"), 0o2775)
    # Odd names: invalid UTF-8, newline, tab, the manifest's own escape characters, long names.
    write(b"names/\xff\xfe-latin1-\xe9", b"bytes")
    write(b"names/new\nline", b"nl")
    write(b"names/tab\there", b"tab")
    write(b"names/per%cent,comma=eq sp", b"esc")
    write("names/ünïcødé-日本".encode(), b"utf8")
    write(b"names/" + b"L" * 255, b"long")
    write(b"names/-leading-dash", b"dash")
    # Symlinks: never followed, stored verbatim.
    os.symlink(b"does/not/exist", j(b"dangling"))
    os.symlink(b"/etc/shadow", j(b"absolute"))
    os.symlink(b"../../../../../../etc/passwd", j(b"escaping"))
    os.symlink(b"etc", j(b"dirlink"))
    os.symlink(b"loop-b", j(b"loop-a"))
    os.symlink(b"loop-a", j(b"loop-b"))
    os.symlink(b"\xff\n odd", j(b"names/odd-target"))
    # Hardlinks, across directories.
    first = write(b"usr/bin/perl", b"#!perl\n" * 100, 0o755)
    os.makedirs(j(b"usr/sbin"), exist_ok=True)
    os.link(first, j(b"usr/bin/perl5.36"))
    os.link(first, j(b"usr/sbin/perl-again"))
    # Sparse: 1 GiB apparent, a few KB real.
    with open(j(b"var-sparse.img"), "wb") as f:
        f.seek(512 << 20)
        f.write(b"middle")
        f.truncate(1 << 30)
    write(b"user-xattr", b"x")
    os.setxattr(j(b"user-xattr"), b"user.comment", b"kept \x00 with nul")
    os.setxattr(j(b"user-xattr"), b"user.empty", b"")
    # Deep path, about 4,000 bytes.
    deep = j(*([b"d" * 60] * 64))
    os.makedirs(deep)
    write(os.path.relpath(os.path.join(deep, b"leaf"), r), b"deep")
    # Nanosecond mtimes.
    os.utime(j(b"etc/hostname"), ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    os.utime(j(b"dangling"), ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_001), follow_symlinks=False)
    if IS_ROOT:
        write(b"bin/ping", b"\x7fELF-ping", 0o755)
        os.setxattr(j(b"bin/ping"), b"security.capability", PING_CAP)
        os.chown(j(b"etc/hostname"), 1234, 5678)
        os.chown(j(b"nobody-file") if os.path.exists(j(b"nobody-file")) else write(b"nobody-file", b"n"), 65534, 65534)
        os.lchown(j(b"absolute"), 42, 43)
        os.makedirs(j(b"dev"), exist_ok=True)
        os.mknod(j(b"dev/null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(j(b"dev/sda"), stat.S_IFBLK | 0o660, os.makedev(8, 0))
        os.chown(j(b"dev/sda"), 0, 6)
        os.mkfifo(j(b"dev/initctl"), 0o600)
        os.setxattr(j(b"dev/null"), b"trusted.note", b"device xattr")
        os.setxattr(j(b"dangling"), b"trusted.link", b"symlink xattr", follow_symlinks=False)
        write(b"acl-file", b"acl", 0o640)
        subprocess.run(["setfacl", "-m", "u:1000:rw,g:100:r", os.fsdecode(j(b"acl-file"))], check=True)
        os.makedirs(j(b"acl-dir"), exist_ok=True)
        subprocess.run(["setfacl", "-d", "-m", "u:1000:rwx", os.fsdecode(j(b"acl-dir"))], check=True)
        # setuid after chown: chown clears it.
        os.chown(j(b"setuid"), 0, 0)
        os.chmod(j(b"setuid"), 0o4755)
        # setgid with a group of its own, as crontab's; and a mode the umask (022) would not give at creation.
        os.chown(write(b"setgid-group", b"#!/bin/sh\n"), 0, 102)
        os.chmod(j(b"setgid-group"), 0o2755)
        write(b"group-writable", b"g", 0o664)
    # Directories' mtimes last: creating children changed them.
    os.utime(j(b"names"), ns=(1_400_000_000_000_000_007, 1_400_000_000_000_000_007))
