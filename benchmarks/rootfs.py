"""Real Debian root filesystems for benchmarks and slow tests, built once and cached as tarballs.

A bookworm minbase rootfs (debootstrap) is the reference tree imgstore is measured on: ~5,300 files,
device nodes, hardlinks, setuid binaries. Building one takes minutes and needs the Debian mirror, so
each tree is built once, archived as a tarball in the cache directory (``<repo>/.cache/rootfs``, or
``$IMGSTORE_ROOTFS_CACHE``) and extracted from there afterwards.

Usable as a module::

    from benchmarks.rootfs import minbase, with_package, strip_caches
    tree = minbase(cache)                       # shared extracted tree: treat it as read-only
    mine = minbase(cache, dest=tmp / "rootfs")  # a private copy to modify
    curl = with_package(cache, "curl", dest=tmp / "curl")
    strip_caches(mine)

and as a command (run as root)::

    python benchmarks/rootfs.py minbase [--dest DIR] [--strip]
    python benchmarks/rootfs.py with-package [PKG] [--dest DIR] [--strip]
    python benchmarks/rootfs.py strip TREE
    python benchmarks/rootfs.py stats TREE
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
CACHE_ENV = "IMGSTORE_ROOTFS_CACHE"
REPO_ROOT = Path(__file__).resolve().parent.parent

# tar flags that keep everything a rootfs carries: owners as numbers (the host's user names must not
# remap the chroot's), xattrs of every namespace (security.capability included), ACLs, and the pax
# format, whose nanosecond mtimes survive the round trip (the default gnu format truncates them).
_TAR_COMMON = ["--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner"]
_TAR_CREATE = [*_TAR_COMMON, "--format=posix", "--pax-option=delete=atime,delete=ctime", "--sparse"]
_TAR_EXTRACT = [*_TAR_COMMON, "--same-permissions", "--same-owner"]

_PKG_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")

# Debian's convention for "do not start services from maintainer scripts": exit status 101.
_POLICY_RC_D = "#!/bin/sh\n# benchmarks/rootfs.py: no service starts while apt runs\nexit 101\n"


class RootfsError(RuntimeError):
    """A reference rootfs could not be built: not root, no debootstrap, mirror unreachable, apt failed."""


@dataclass(frozen=True)
class TreeStats:
    """What a tree holds, counted the way BENCHMARKING.md counts it."""

    files: int
    symlinks: int
    directories: int
    device_nodes: int
    other: int  # FIFOs and sockets
    hardlinked_files: int  # regular files with a link count above one
    setuid_setgid: int
    bytes: int  # apparent size of regular files, each inode once

    @property
    def megabytes(self) -> float:
        return self.bytes / 1e6


def default_cache() -> Path:
    """The cache directory: ``$IMGSTORE_ROOTFS_CACHE`` if set, else ``<repo>/.cache/rootfs``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else REPO_ROOT / ".cache" / "rootfs"


def minbase(cache: Path | None = None, *, dest: Path | None = None) -> Path:
    """A bookworm minbase rootfs, built by debootstrap on first use and cached as a tarball.

    Without ``dest`` the tree extracted in the cache is returned; it is shared by every caller, so do not
    modify it. With ``dest`` (which must not exist yet) a private copy is extracted there and returned.
    """
    cache = _prepare_cache(cache)
    tarball = cache / f"{SUITE}-minbase.tar.zst"
    with _locked(cache):
        if not tarball.exists():
            _build_minbase(cache, tarball)
        return _extracted(tarball, dest)


def with_package(
    cache: Path | None = None, pkg: str = "curl", *, dest: Path | None = None, mount_proc: bool = False
) -> Path:
    """The minbase rootfs plus ``apt-get install --no-install-recommends PKG``, cached as a tarball.

    ``dest`` as for :func:`minbase`. Nothing is mounted in the chroot unless ``mount_proc`` is set, for a
    package whose maintainer scripts need /proc (curl's do not); it is mounted in a private namespace and
    so unmounted by the kernel when apt exits, however it exits. The flag only matters when the tarball
    is built.
    """
    if not _PKG_NAME.match(pkg):
        raise RootfsError(f"not a Debian package name: {pkg!r}")
    cache = _prepare_cache(cache)
    base = cache / f"{SUITE}-minbase.tar.zst"
    tarball = cache / f"{SUITE}-minbase+{pkg}.tar.zst"
    with _locked(cache):
        if not base.exists():
            _build_minbase(cache, base)
        if not tarball.exists():
            _build_with_package(cache, base, tarball, pkg, mount_proc)
        return _extracted(tarball, dest)


def strip_caches(tree: Path) -> None:
    """Remove apt's downloaded .debs, package lists and binary caches from ``tree``.

    They are regenerable, and an imgstore profile may exclude them while peers would store them, so the
    benchmark strips them from every tree to compare the same content (BENCHMARKING.md, pitfalls).
    """
    archives = tree / "var/cache/apt/archives"
    if archives.is_dir():
        for deb in archives.glob("*.deb"):
            deb.unlink()
    lists = tree / "var/lib/apt/lists"
    if lists.is_dir():
        for entry in lists.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    apt_cache = tree / "var/cache/apt"
    if apt_cache.is_dir():
        for binfile in apt_cache.glob("*.bin"):
            binfile.unlink()


def tree_stats(tree: Path) -> TreeStats:
    """Count the entries of ``tree`` by type (the root directory itself included)."""
    files = symlinks = dirs = devices = other = linked = setid = size = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(tree):
        dirs += 1
        for name in [*dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                continue  # counted when os.walk enters it
            if stat.S_ISREG(mode):
                files += 1
                if mode & (stat.S_ISUID | stat.S_ISGID):
                    setid += 1
                if st.st_nlink > 1:
                    linked += 1
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    size += st.st_size
            elif stat.S_ISLNK(mode):
                symlinks += 1
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                devices += 1
            else:
                other += 1
    return TreeStats(files, symlinks, dirs, devices, other, linked, setid, size)


def extract(tarball: Path, dest: Path) -> Path:
    """Extract a cached rootfs tarball into ``dest`` (created; must not exist yet)."""
    dest.mkdir(parents=True)
    _run(["tar", "-C", os.fspath(dest), "--zstd", "-xf", os.fspath(tarball), *_TAR_EXTRACT],
         what=f"extracting {tarball}")
    return dest


def remove_tree(path: Path) -> None:
    """``rm -rf`` a build tree, refusing while anything is still mounted below it.

    A chroot with /proc or a /dev bind mount left behind would otherwise have the host's entries removed.
    """
    if not path.exists():
        return
    mounted = _mounts_under(path)
    if mounted:
        raise RootfsError(f"refusing to delete {path}: still mounted below it: {', '.join(mounted)}")
    # --one-file-system as a second guard against a mount that appeared since the check.
    _run(["rm", "-rf", "--one-file-system", os.fspath(path)], what=f"removing {path}")


# --- building ---------------------------------------------------------------------------------------


def _build_minbase(cache: Path, tarball: Path) -> None:
    _require_root()
    debootstrap = _ensure_debootstrap()
    _check_mirror()
    build = Path(tempfile.mkdtemp(prefix="build-minbase-", dir=cache))
    log = cache / "debootstrap.log"
    try:
        # A private mount namespace: the /proc and /sys debootstrap mounts inside the target vanish with
        # the process even if it is killed, so no mount can outlive the build and be deleted through.
        cmd = ["unshare", "--mount", "--propagation", "private", "--",
               debootstrap, "--variant=minbase", SUITE, os.fspath(build / "root"), MIRROR]
        with log.open("w") as out:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
        if rc != 0:
            raise RootfsError(f"debootstrap failed (exit {rc}); last lines of {log}:\n{_tail(log)}")
        _archive(build / "root", tarball)
    finally:
        remove_tree(build)


def _build_with_package(cache: Path, base: Path, tarball: Path, pkg: str, mount_proc: bool) -> None:
    _require_root()
    _check_mirror()
    build = Path(tempfile.mkdtemp(prefix=f"build-{pkg}-", dir=cache))
    log = cache / f"apt-{pkg}.log"
    try:
        root = extract(base, build / "root")
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text(_POLICY_RC_D)
        policy.chmod(0o755)
        try:
            with _host_resolv_conf(root):
                _apt_install(root, pkg, log, mount_proc)
        finally:
            policy.unlink()
        _archive(root, tarball)
    finally:
        remove_tree(build)


def _apt_install(root: Path, pkg: str, log: Path, mount_proc: bool) -> None:
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C.UTF-8",
        "HOME": "/root",
    }
    # The cached lists may be older than the mirror (files 404), so refresh them first.
    script = f"apt-get update -q && apt-get install -y -q --no-install-recommends {pkg}"
    cmd = ["chroot", os.fspath(root), "/bin/sh", "-c", script]
    if mount_proc:
        # A private mount and PID namespace: the kernel unmounts /proc when apt exits, however it
        # exits, so no mount outlives the build; and it shows only the chroot's own processes.
        cmd = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
               f"--mount-proc={os.fspath(root / 'proc')}", "--", *cmd]
    with log.open("w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if rc != 0:
        raise RootfsError(f"apt-get install {pkg} in the chroot failed (exit {rc}); last lines of {log}:\n"
                          f"{_tail(log)}")


@contextlib.contextmanager
def _host_resolv_conf(root: Path) -> Iterator[None]:
    """Let apt in the chroot resolve the mirror, then put the tree's own resolv.conf back."""
    target = root / "etc/resolv.conf"
    host = Path("/etc/resolv.conf")
    if not host.is_file() or target.is_symlink():
        yield
        return
    saved = target.read_bytes() if target.exists() else None
    shutil.copyfile(host, target)
    try:
        yield
    finally:
        if saved is None:
            target.unlink(missing_ok=True)
        else:
            target.write_bytes(saved)


def _archive(root: Path, tarball: Path) -> None:
    # Written beside the final name and renamed, so a reader never sees half a tarball.
    partial = tarball.with_name(tarball.name + ".partial")
    _run(["tar", "-C", os.fspath(root), "--zstd", "-cf", os.fspath(partial), *_TAR_CREATE, "."],
         what=f"archiving {root}")
    os.replace(partial, tarball)


def _extracted(tarball: Path, dest: Path | None) -> Path:
    """``dest`` extracted fresh, or the shared tree beside the tarball (redone when the tarball changes)."""
    if dest is not None:
        return extract(tarball, dest)
    tree = tarball.with_name(tarball.name.removesuffix(".tar.zst"))
    stamp = tarball.with_name(tarball.name + ".extracted")
    st = tarball.stat()
    want = f"{st.st_size} {st.st_mtime_ns}\n"
    if tree.is_dir() and stamp.exists() and stamp.read_text() == want:
        return tree
    stamp.unlink(missing_ok=True)
    remove_tree(tree)
    # Extract aside and rename: an interrupted extraction never looks complete.
    tmp = Path(tempfile.mkdtemp(prefix="extract-", dir=tarball.parent))
    try:
        extract(tarball, tmp / "root")
        os.rename(tmp / "root", tree)
    finally:
        remove_tree(tmp)
    stamp.write_text(want)
    return tree


# --- environment --------------------------------------------------------------------------------------


def _prepare_cache(cache: Path | None) -> Path:
    cache = (cache or default_cache()).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    return cache


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    # Parallel test workers share the cache: one builds, the others wait and then reuse its tarball.
    with (cache / ".lock").open("w") as fd:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise RootfsError("building a Debian rootfs needs root (debootstrap, chroot, device nodes)")


def _ensure_debootstrap() -> str:
    found = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "debootstrap"]
    # The package lists may be missing on a fresh machine: update once and retry.
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RootfsError(f"debootstrap is missing and apt-get cannot install it:\n{proc.stderr[-2000:]}")
    found = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
    if not found:
        raise RootfsError("debootstrap was installed but is not on PATH or in /usr/sbin")
    return found


def _check_mirror() -> None:
    """Fail in seconds with a clear message rather than after a debootstrap timeout."""
    url = f"{MIRROR}/dists/{SUITE}/InRelease"
    try:
        with urllib.request.urlopen(url, timeout=20) as resp:
            resp.read(1)
    except (urllib.error.URLError, OSError) as exc:
        raise RootfsError(f"the Debian mirror is unreachable ({url}: {exc})") from exc


def _mounts_under(path: Path) -> list[str]:
    prefix = os.fspath(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            # Field 5 is the mount point, with spaces etc. octal-escaped.
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def _run(cmd: list[str], *, what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RootfsError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- command line ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rootfs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=None,
                        help=f"cache directory (default ${CACHE_ENV} or <repo>/.cache/rootfs)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_min = sub.add_parser("minbase", help="build or reuse the minbase rootfs; print its path")
    p_pkg = sub.add_parser("with-package", help="minbase plus one package; print its path")
    p_pkg.add_argument("pkg", nargs="?", default="curl")
    p_pkg.add_argument("--mount-proc", action="store_true", help="mount /proc in the chroot while apt runs")
    for p in (p_min, p_pkg):
        p.add_argument("--dest", type=Path, default=None, help="extract a private copy here")
        p.add_argument("--strip", action="store_true", help="strip apt caches from the copy (needs --dest)")
    sub.add_parser("strip", help="strip apt caches from a tree").add_argument("tree", type=Path)
    sub.add_parser("stats", help="count a tree's entries").add_argument("tree", type=Path)
    args = parser.parse_args(argv)

    try:
        if args.command in ("minbase", "with-package"):
            if args.strip and args.dest is None:
                parser.error("--strip modifies the tree: it needs --dest (the cached tree is shared)")
            if args.command == "minbase":
                tree = minbase(args.cache, dest=args.dest)
            else:
                tree = with_package(args.cache, args.pkg, dest=args.dest, mount_proc=args.mount_proc)
            if args.strip:
                strip_caches(tree)
            print(tree)
        elif args.command == "strip":
            strip_caches(args.tree)
        else:
            stats = tree_stats(args.tree)
            for key, value in asdict(stats).items():
                print(f"{key:17} {value}")
            print(f"{'megabytes':17} {stats.megabytes:.1f}")
    except RootfsError as exc:
        print(f"rootfs: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
