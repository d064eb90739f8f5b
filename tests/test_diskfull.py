"""A filesystem that fills up: commit, rollout, checkout and the TFTP root on small tmpfs mounts.

Every failure must be exit code 9 on one line naming the full filesystem and the space needed; the store
stays valid, gc still runs, and the same command succeeds once space is freed. The sweeps try every
amount of free space around the point where a command starts to fit, so each write a command makes (objects,
packs, the database, the stat cache, the TFTP files) meets ENOSPC at least once.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
from conftest import Cli
from test_deploy import PROFILE, _chroot
from treeutil import diff_snapshots, snapshot

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts tmpfs filesystems"),
]

SIZE = re.compile(r"\d+(?:[.,]\d+)?\s*(?:B|kB|KB|KiB|MB|MiB|GB|GiB)\b")
PAGE = 4096


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", path]).returncode != 0:
            subprocess.run(["umount", "-l", path], check=True)


class Ballast:
    """Files that fill a filesystem to the last page, and give back exactly as much as asked."""

    def __init__(self, fs: Path) -> None:
        self.dir = fs / "ballast"
        self.dir.mkdir(exist_ok=True)
        self.files: list[Path] = []  # 1 MiB files first, then single pages

    def _write(self, size: int) -> bool:
        p = self.dir / f"b{len(self.files)}"
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            os.write(fd, b"\xa5" * size)
            os.fsync(fd)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            os.close(fd)
            os.unlink(p)
            return False
        os.close(fd)
        if os.stat(p).st_size != size:  # a short write: the filesystem is full
            os.unlink(p)
            return False
        self.files.append(p)
        return True

    def fill(self) -> None:
        while self._write(1 << 20):
            pass
        while self._write(PAGE):
            pass

    def free(self, nbytes: int) -> None:
        while nbytes > 0 and self.files:
            p = self.files.pop()
            nbytes -= p.stat().st_size
            p.unlink()

    def clear(self) -> None:
        self.free(1 << 62)


def free_bytes(fs: Path) -> int:
    st = os.statvfs(fs)
    return st.f_bavail * st.f_frsize


def temps(root: Path) -> list[str]:
    return sorted(os.path.join(d, n) for d, ds, fs in os.walk(root) for n in ds + fs if n.startswith(".imgstore-tmp-"))


def assert_no_space(r: subprocess.CompletedProcess[str], fs: Path) -> str:
    """Exit 9, one line, no traceback, naming a path on the full filesystem. Returns the line."""
    err = r.stderr.strip()
    assert r.returncode == 9, (r.args, r.returncode, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert os.fspath(fs) in err, f"the message does not name the full filesystem {fs}: {err}"
    return err


def assert_says_how_much(messages: list[str]) -> None:
    missing = [m for m in messages if not SIZE.search(m)]
    assert not missing, "no amount of space needed in: " + " | ".join(missing)


def _ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, (r.args, r.returncode, r.stderr)
    return r


def _gens(run: partial[subprocess.CompletedProcess[str]]) -> list[str]:
    return [g["ref"] for g in json.loads(_ok(run("generations", "--json")).stdout)]


def _active(run: partial[subprocess.CompletedProcess[str]]) -> str | None:
    st = json.loads(run("status", "--json").stdout)
    return next(p["active"] for p in st["profiles"] if p["profile"] == "web")  # type: ignore[no-any-return]


def _store(cli: Cli, root: Path, profile: str = PROFILE) -> partial[subprocess.CompletedProcess[str]]:
    run = partial(cli, root=root)
    _ok(run("init"))
    (root / "profiles/web.toml").write_text(profile)
    return run


def _configs(tftp: Path) -> dict[str, bytes]:
    """Every config a node could be served (read through links), by its path under pxelinux.cfg."""
    cfg = tftp / "pxelinux.cfg"
    return {os.fspath(p.relative_to(cfg)): p.read_bytes() for p in sorted(cfg.rglob("*")) if not p.is_dir()}


# -- commit ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", ["loose", "packed"])
def test_commit_fails_cleanly_when_the_store_fills_up(tmp_path: Path, cli: Cli, payload: str) -> None:
    with tmpfs(tmp_path / "fs", "24m") as fs:
        store = fs / "store"
        run = _store(cli, store)
        tree = _chroot(tmp_path / "chroot", "one\n")
        _ok(run("commit", tree, "-p", "web"))
        _ok(run("rollout"))
        if payload == "loose":
            for i in range(4):
                (tree / f"usr/share/blob{i}").write_bytes(os.urandom(4 << 20))
        else:
            (tree / "usr/lib").mkdir(parents=True)
            for i in range(5000):
                (tree / f"usr/lib/f{i}").write_bytes(os.urandom(3000))
        ballast = Ballast(fs)
        ballast.fill()
        ballast.free(8 << 20)
        gens = _gens(run)
        r = run("commit", tree, "-p", "web")
        msg = assert_no_space(r, fs)
        assert _gens(run) == gens
        assert temps(store) == [], "a failed commit left temp files eating the space"
        _ok(run("verify"))
        _ok(run("status"))
        _ok(run("gc", "--keep", "1"))  # on the full filesystem
        ballast.clear()
        _ok(run("verify"))
        _ok(run("commit", tree, "-p", "web"))
        _ok(run("checkout", "web@2", tmp_path / "co"))
        assert diff_snapshots(snapshot(tree), snapshot(tmp_path / "co")) == []
        _ok(run("verify"))
    assert_says_how_much([msg])


@pytest.mark.slow
def test_commit_with_every_amount_of_free_space(tmp_path: Path, cli: Cli) -> None:
    """Free 0, 1, 2, ... pages and commit a small change: it works, or fails cleanly and creates nothing."""
    problems: list[str] = []
    messages: list[str] = []
    with tmpfs(tmp_path / "fs", "8m") as fs:
        store = fs / "store"
        run = _store(cli, store)
        tree = _chroot(tmp_path / "chroot", "one\n")
        _ok(run("commit", tree, "-p", "web"))
        ballast = Ballast(fs)
        last_rc = None
        for pages in range(16):
            (tree / "etc/motd").write_text(f"free {pages} pages\n")
            gens = _gens(run)
            ballast.fill()
            ballast.free(pages * PAGE)
            r = run("commit", tree, "-p", "web", "-m", f"{pages} pages")
            last_rc = r.returncode
            ballast.clear()
            err = r.stderr.strip()
            after = _gens(run)
            if r.returncode == 0:
                if len(after) != len(gens) + 1:
                    problems.append(f"{pages} pages: exit 0 but generations {gens} -> {after}")
            elif r.returncode == 9:
                messages.append(err)
                if after != gens:
                    problems.append(f"{pages} pages: exit 9 ({err}) but it created {after[-1]}")
                if len(err.splitlines()) != 1 or os.fspath(fs) not in err:
                    problems.append(f"{pages} pages: not one line naming {fs}: {err}")
            else:
                problems.append(f"{pages} pages: exit {r.returncode}: {err}")
            if temps(store):
                problems.append(f"{pages} pages: left {temps(store)}")
                _ok(run("verify", "--repair"))
            v = run("verify")
            if v.returncode != 0:
                problems.append(f"{pages} pages: verify exit {v.returncode}: {v.stdout[-300:]}")
        assert last_rc == 0, "the sweep never reached enough space for the commit: widen it"
    assert not problems, "\n".join(problems)
    assert_says_how_much(messages)


@pytest.mark.slow
def test_read_only_commands_with_every_amount_of_free_space(tmp_path: Path, cli: Cli) -> None:
    """In a disk-full incident the operator first looks: reads must work, or at least say the disk is full."""
    problems: list[str] = []
    with tmpfs(tmp_path / "fs", "8m") as fs:
        store = fs / "store"
        run = _store(cli, store)
        tree = _chroot(tmp_path / "chroot", "one\n")
        _ok(run("commit", tree, "-p", "web"))
        _ok(run("rollout"))
        ballast = Ballast(fs)
        for pages in range(12):
            ballast.fill()
            ballast.free(pages * PAGE)
            for args in (("generations",), ("status",), ("verify",), ("history",)):
                r = run(*args)
                err = r.stderr.strip()
                if r.returncode == 9 and len(err.splitlines()) == 1 and os.fspath(fs) in err:
                    continue
                if r.returncode != 0:
                    problems.append(f"{pages} pages: {' '.join(args)}: exit {r.returncode}: {err}")
            ballast.clear()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("free_mb", [0, 1])
def test_gc_frees_space_on_a_full_filesystem(tmp_path: Path, cli: Cli, free_mb: int) -> None:
    """The way out of a full disk: gc must work with no space (or almost none) left."""
    with tmpfs(tmp_path / "fs", "24m") as fs:
        store = fs / "store"
        run = _store(cli, store)
        tree = _chroot(tmp_path / "chroot", "")
        for i in range(1, 5):
            (tree / "etc/motd").write_text(f"gen {i}\n")
            for old in (tree / "etc").glob("unique-*"):
                old.unlink()
            (tree / f"etc/unique-{i}").write_bytes(os.urandom(3 << 20))
            _ok(run("commit", tree, "-p", "web"))
        _ok(run("rollout"))
        ballast = Ballast(fs)
        ballast.fill()
        ballast.free(free_mb << 20)
        before = free_bytes(fs)
        r = run("gc", "--keep", "1", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["removed"] == ["web@1", "web@2", "web@3"]
        assert free_bytes(fs) - before > 8 << 20
        _ok(run("verify"))
        _ok(run("status"))
        (tree / "etc/motd").write_text("after gc\n")
        _ok(run("commit", tree, "-p", "web"))  # the ballast is still there: gc alone made the room


# -- rollout -----------------------------------------------------------------------------------------
def test_rollout_fails_cleanly_when_the_store_fills_up(tmp_path: Path, cli: Cli) -> None:
    with tmpfs(tmp_path / "fs", "32m") as fs:
        store = fs / "store"
        run = _store(cli, store)
        tree = _chroot(tmp_path / "chroot", "one\n")
        _ok(run("commit", tree, "-p", "web"))
        _ok(run("node", "add", "www1", "--mac", "52:54:00:00:00:01", "-p", "web"))
        _ok(run("rollout"))
        (tree / "etc/motd").write_text("two\n")
        (tree / "usr/lib").mkdir(parents=True)
        for i in range(3):
            (tree / f"usr/lib/blob{i}").write_bytes(os.urandom(3 << 20))
        for i in range(500):
            (tree / f"usr/lib/f{i}").write_bytes(os.urandom(2000))
        _ok(run("commit", tree, "-p", "web"))
        tftp = store / "tftpboot"
        configs = _configs(tftp)
        link = os.readlink(store / "netboot/root")
        ballast = Ballast(fs)
        ballast.fill()
        ballast.free(4 << 20)  # the objects are stored; the materialized tree needs about 10 MB more
        r = run("rollout", "web@2")
        msg = assert_no_space(r, fs)
        assert _active(run) == "web@1"
        assert _configs(tftp) == configs and os.readlink(store / "netboot/root") == link
        assert temps(store) == [], "a failed rollout left temp files (staging, partial copies) eating the space"
        _ok(run("status"))
        _ok(run("verify"))
        _ok(run("gc", "--keep", "1"))
        ballast.clear()
        _ok(run("rollout", "web@2"))
        assert (store / "netboot/root/etc/motd").read_text() == "two\n"
        _ok(run("status"))
        _ok(run("verify"))
    assert_says_how_much([msg])


@pytest.mark.slow
def test_switching_generations_with_every_amount_of_free_space(tmp_path: Path, cli: Cli) -> None:
    """Both trees exist: a rollout only writes the database, TFTP configs and the link. Each config stays whole."""
    problems: list[str] = []
    messages: list[str] = []
    with tmpfs(tmp_path / "fs", "8m") as fs:
        store = fs / "store"
        run = _store(cli, store)
        tree = _chroot(tmp_path / "chroot", "one\n")
        _ok(run("commit", tree, "-p", "web"))
        (tree / "etc/motd").write_text("two\n")
        _ok(run("commit", tree, "-p", "web"))
        _ok(run("node", "add", "www1", "--mac", "52:54:00:00:00:01", "-p", "web"))
        _ok(run("node", "add", "www2", "--mac", "52:54:00:00:00:02", "-p", "web"))
        tftp = store / "tftpboot"
        whole = {}
        for g in ("web@1", "web@2"):
            _ok(run("rollout", g))
            whole[g] = _configs(tftp)
        ballast = Ballast(fs)
        for pages in range(16):
            target = ("web@1", "web@2")[pages % 2]
            ballast.fill()
            ballast.free(pages * PAGE)
            r = run("rollout", target)
            err = r.stderr.strip()
            seen = _configs(tftp)
            ballast.clear()
            for name, content in seen.items():
                if content not in (whole["web@1"].get(name), whole["web@2"].get(name)):
                    problems.append(f"{pages} pages: {name} is neither web@1's nor web@2's: {content!r}")
            if r.returncode == 9:
                messages.append(err)
                if len(err.splitlines()) != 1 or os.fspath(fs) not in err:
                    problems.append(f"{pages} pages: not one line naming {fs}: {err}")
            elif r.returncode != 0:
                problems.append(f"{pages} pages: exit {r.returncode}: {err}")
            again = run("rollout", target)  # the documented repair: run it again once there is space
            if again.returncode != 0 or run("status").returncode != 0:
                problems.append(f"{pages} pages: re-running did not repair: {again.stderr.strip()}")
            if temps(store):
                problems.append(f"{pages} pages: left {temps(store)}")
                _ok(run("verify", "--repair"))
    assert not problems, "\n".join(problems)
    assert_says_how_much(messages)


def test_tftp_root_on_a_full_filesystem(tmp_path: Path, cli: Cli) -> None:
    with tmpfs(tmp_path / "tftp", "6m") as tftp:  # web@2 alone needs 4 MiB: kernel 3, initrd 1
        store = tmp_path / "store"
        run = _store(cli, store, PROFILE.replace('tftp_root = "tftpboot"', f'tftp_root = "{tftp}"'))
        tree = _chroot(tmp_path / "chroot", "one\n")
        _ok(run("commit", tree, "-p", "web"))
        _ok(run("node", "add", "www1", "--mac", "52:54:00:00:00:01", "-p", "web"))
        _ok(run("rollout"))
        kernel = os.urandom(3 << 20)
        (tree / "boot/vmlinuz-6.1.0-28-amd64").write_bytes(kernel)
        (tree / "boot/initrd.img-6.1.0-28-amd64").write_bytes(os.urandom(1 << 20))
        _ok(run("commit", tree, "-p", "web"))
        configs = _configs(tftp)
        ballast = Ballast(tftp)
        ballast.fill()
        ballast.free(1 << 20)  # room for the initrd or part of the kernel, not both
        r = run("rollout", "web@2")
        msg = assert_no_space(r, tftp)
        assert _active(run) == "web@1"
        assert _configs(tftp) == configs
        assert temps(tftp) == [], "a partial kernel was left in the TFTP root"
        _ok(run("status"))
        ballast.clear()
        _ok(run("rollout", "web@2"))
        gen = json.loads(_ok(run("show", "web@2", "--json")).stdout)
        assert (tftp / "imgstore/web" / gen["gen_id"] / "vmlinuz").read_bytes() == kernel
        _ok(run("status"))
    assert_says_how_much([msg])


# -- checkout ----------------------------------------------------------------------------------------
def test_checkout_into_a_full_filesystem(tmp_path: Path, cli: Cli) -> None:
    run = _store(cli, tmp_path / "store")
    tree = _chroot(tmp_path / "chroot", "one\n")
    (tree / "usr/share/blob").write_bytes(os.urandom(4 << 20))
    _ok(run("commit", tree, "-p", "web"))
    with tmpfs(tmp_path / "small", "2m") as small:
        r = run("checkout", "web@1", small / "co")
        msg = assert_no_space(r, small)
    _ok(run("verify"))
    assert_says_how_much([msg])
