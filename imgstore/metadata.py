"""Facts about a generation captured at commit: Debian version, kernel version, package count."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .manifest import FILE, Entry


def _read(chroot: Path, entries: Mapping[bytes, Entry], rel: bytes, limit: int = 64 << 20) -> bytes | None:
    e = entries.get(rel)
    if e is None or e.type != FILE or e.size > limit:
        return None
    try:
        fd = os.open(os.fsencode(chroot) + b"/" + rel, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(limit)


def count_packages(status: bytes) -> int:
    return sum(1 for para in status.split(b"\n\n") if re.search(rb"^Status: install ok installed$", para, re.M))


def collect(chroot: Path, entries: Mapping[bytes, Entry], kernel_name: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    v = _read(chroot, entries, b"etc/debian_version")
    if v:
        meta["debian_version"] = v.decode("utf-8", "replace").strip()
    osr = _read(chroot, entries, b"etc/os-release") or _read(chroot, entries, b"usr/lib/os-release")
    if osr:
        m = re.search(rb'^PRETTY_NAME="?([^"\n]*)', osr, re.M)
        if m:
            meta["os"] = m.group(1).decode("utf-8", "replace")
    status = _read(chroot, entries, b"var/lib/dpkg/status")
    if status is not None:
        meta["packages"] = count_packages(status)
    if kernel_name and kernel_name.startswith("vmlinuz-"):
        meta["kernel_version"] = kernel_name[len("vmlinuz-"):]
    return meta
