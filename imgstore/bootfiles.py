"""Find a chroot's kernel and initrd the way Debian lays them out.

/vmlinuz and /initrd.img are symlinks Debian maintains to the default kernel; failing those, the newest
/boot/vmlinuz-<version> and its matching /boot/initrd.img-<version>. Links are resolved inside the
manifest, never on the host, so a link escaping the chroot finds nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .manifest import FILE, HARDLINK, SYMLINK, Entry


def resolve(entries: Mapping[bytes, Entry], path: bytes, hops: int = 16) -> Entry | None:
    """Follow symlinks inside the tree; return the regular file entry or None."""
    for _ in range(hops):
        parts: list[bytes] = []
        e = entries.get(path)
        if e is None:
            return None
        if e.type == HARDLINK:
            e = entries.get(e.target)
        if e is None or e.type == FILE:
            return e
        if e.type != SYMLINK:
            return None
        base = [] if e.target.startswith(b"/") else path.split(b"/")[:-1]
        for part in base + e.target.split(b"/"):
            if part in (b"", b"."):
                continue
            if part == b"..":
                if not parts:
                    return None
                parts.pop()
            else:
                parts.append(part)
        path = b"/".join(parts)
    return None


def _version_key(name: bytes) -> list[tuple[int, int | bytes]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(rb"(\d+)", name) if p]


def _boot_file(entries: Mapping[bytes, Entry], link: bytes) -> Entry | None:
    """Follow Debian's top-level link, accepting only a file in /boot: a /vmlinuz pointing at
    /etc/shadow must never publish it world-readable in the TFTP root."""
    e = resolve(entries, link)
    if e is None:
        return None
    return e if e.path.startswith(b"boot/") or e.path == link else None


def find(entries: Mapping[bytes, Entry]) -> tuple[Entry | None, Entry | None]:
    kernel = _boot_file(entries, b"vmlinuz")
    initrd = _boot_file(entries, b"initrd.img")
    if kernel is None:
        kernels = sorted(
            (p for p in entries if p.startswith(b"boot/vmlinuz-") and entries[p].type in (FILE, HARDLINK)),
            key=_version_key,
        )
        if kernels:
            kernel = _boot_file(entries, kernels[-1])
            if initrd is None:
                version = kernels[-1][len(b"boot/vmlinuz-"):]
                initrd = _boot_file(entries, b"boot/initrd.img-" + version)
    if initrd is None:
        initrds = sorted((p for p in entries if p.startswith(b"boot/initrd.img-")), key=_version_key)
        if initrds:
            initrd = _boot_file(entries, initrds[-1])
    return kernel, initrd
