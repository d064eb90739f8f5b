"""`imgstore watch`: live changes and auto-commit on real trees, with a real inotify watch."""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, write_profile

from imgstore import browse, commit
from imgstore.changes import chroot_changes
from imgstore.commit import CommitResult
from imgstore.errors import UsageError
from imgstore.store import Store
from imgstore.watch import CHANGED, CREATED, DELETED, Batch, Watcher, package_manager_busy, parse_duration

IS_ROOT = os.geteuid() == 0


class Running:
    """A Watcher in a thread, with everything it reported."""

    def __init__(self, store: Store, tree: Path, profile: str = "t", **kw: object) -> None:
        self.batches: list[Batch] = []
        self.commits: list[CommitResult] = []
        self.notices: list[str] = []
        self.error: BaseException | None = None
        self.w = Watcher(store, profile, tree, no_kernel=True, on_batch=self.batches.append,
                         on_commit=self.commits.append, on_notice=self.notices.append, **kw)  # type: ignore[arg-type]
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        assert self.w.ready.wait(30), f"the watcher did not start: {self.error} {self.notices}"

    def _run(self) -> None:
        try:
            self.w.run()
        except BaseException as exc:  # noqa: BLE001  reported by stop()
            self.error = exc
            self.w.ready.set()

    def wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"timed out waiting for {what}; notices: {self.notices}"
            time.sleep(0.05)

    def settled(self) -> bool:
        """Committed, and nothing seen since that still waits for a commit."""
        return bool(self.commits) and not self.w.dirty

    def stop(self) -> None:
        self.w.stop()
        self.t.join(30)
        assert not self.t.is_alive(), "the watcher did not stop"
        assert self.error is None, self.error

    def settle_after(self, rel: str, timeout: float = 60) -> None:
        """Wait until the change of `rel` (made last) was seen, and a commit started after it finished.
        Without the first wait, an earlier commit could look like the last one while events still queue."""
        self.wait(lambda: rel in self.seen(), timeout, f"an event for {rel}")
        self.wait(self.settled, timeout, "the auto-commit")

    def seen(self) -> set[str]:
        return {os.fsdecode(p) for b in self.batches for p in b.paths}


def _base(store: Store, tmp_path: Path) -> Path:
    write_profile(store.root, "t")
    tree = tmp_path / "chroot"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/motd").write_text("hello\n")
    (tree / "var/lib/dpkg").mkdir(parents=True)
    (tree / "var/lib/dpkg/lock-frontend").write_bytes(b"")
    (tree / "tmp").mkdir()
    commit.commit(store, tree, "t", "base", no_kernel=True)
    return tree


def _fresh_manifest(tmp_path: Path, tree: Path, name: str) -> str:
    """The manifest digest a commit of the same tree into a brand-new store gives."""
    other = Store.init(tmp_path / name)
    try:
        write_profile(other.root, "t")
        return commit.commit(other, tree, "t", no_kernel=True).generation.manifest
    finally:
        other.close()


def test_batches_coalesce_to_net_changes() -> None:
    b = Batch(0.0)
    b.add(b"tmpdir", CREATED)
    b.add(b"tmpdir", DELETED)  # came and went
    b.add(b"etc/motd", DELETED)
    b.add(b"etc/motd", CREATED)  # replaced
    b.add(b"new", CREATED)
    b.add(b"new", CHANGED)  # still just new
    for i in range(30):
        b.add(b"usr/share/doc/pkg/f%d" % i, CREATED)
    assert b.paths[b"etc/motd"] == CHANGED and b.paths[b"new"] == CREATED and b"tmpdir" not in b.paths
    assert b.counts() == {CREATED: 31, DELETED: 0, CHANGED: 1}
    assert b.groups() == [("etc/motd", 1), ("new", 1), ("usr/share/doc/pkg/", 30)]
    assert b.groups(limit=2) == [("etc/motd", 1), ("new", 1)]  # cut to the limit at the top level


def test_durations() -> None:
    assert parse_duration("30s") == 30 and parse_duration("2m") == 120 and parse_duration("500ms") == 0.5
    assert parse_duration("1.5") == 1.5 and parse_duration("1h") == 3600
    with pytest.raises(UsageError, match="not a duration"):
        parse_duration("soon")


def test_large_change_is_committed_whole(store: Store, tmp_path: Path) -> None:
    tree = _base(store, tmp_path)
    r = Running(store, tree, auto_commit=True, quiet_period=1.0)
    try:
        # 5,000 files in nested directories that do not exist yet when the burst starts, plus directories
        # created, filled and removed again, a directory renamed while full, and an edit.
        for a in range(50):
            for b in range(10):
                d = tree / f"opt/pkg{a}/lib{b}"
                d.mkdir(parents=True)
                for c in range(10):
                    (d / f"m{c}.so").write_bytes(b"%d-%d-%d\n" % (a, b, c))
            if a % 10 == 0:
                gone = tree / f"var/tmpbuild{a}/x/y"
                gone.mkdir(parents=True)
                (gone / "obj").write_bytes(b"o")
                shutil.rmtree(tree / f"var/tmpbuild{a}")
        os.rename(tree / "opt/pkg7", tree / "opt/pkg7-renamed")
        (tree / "etc/motd").write_text("hello again\n")
        r.settle_after("etc/motd")
    finally:
        r.stop()
    made = [c for c in r.commits if c.created]
    assert made, r.notices
    last = made[-1].generation
    assert last.files == 5000 + 2  # every file, none missed: motd and the lock file besides the burst
    assert last.manifest == _fresh_manifest(tmp_path, tree, "fresh")
    assert chroot_changes(store, "t", tree).clean
    seen = r.seen()
    assert "etc/motd" in seen and any(p.startswith("opt/pkg") for p in seen), sorted(seen)[:20]


def test_commit_takes_what_no_event_showed(store: Store, tmp_path: Path) -> None:
    """inotify does not see a write through a hardlink outside the watched tree; the commit still does,
    because events only trigger it. A queue overflow (reported by watchdog only in its log) forces one."""
    write_profile(store.root, "t")
    tree = tmp_path / "chroot"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/motd").write_text("one\n")
    outside = tmp_path / "motd-elsewhere"
    os.link(tree / "etc/motd", outside)
    commit.commit(store, tree, "t", "base", no_kernel=True)

    def motd_in_latest() -> str:
        g = [c for c in r.commits if c.created][-1].generation
        return b"".join(browse.read_file(store, g, "/etc/motd")).decode()

    r = Running(store, tree, auto_commit=True, quiet_period=0.3)
    try:
        outside.write_text("two\n")
        time.sleep(1.0)
        assert not r.batches and not r.w.dirty and not r.commits  # invisible to the watch
        (tree / "etc/issue").write_text("Debian\n")  # any visible change triggers a full commit
        r.settle_after("etc/issue")
        assert motd_in_latest() == "two\n" and r.seen() == {"etc/issue"}

        outside.write_text("three\n")
        logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed; filesystem events "
                                                                   "were lost")
        r.wait(lambda: r.settled() and len([c for c in r.commits if c.created]) == 2, 30, "the forced commit")
        assert motd_in_latest() == "three\n" and any("overflowed" in n for n in r.notices)
        assert any("watching" in n and "again" in n for n in r.notices)  # a fresh watch after the overflow
    finally:
        r.stop()


def test_excluded_paths_are_not_reported_and_do_not_commit(store: Store, tmp_path: Path) -> None:
    tree = _base(store, tmp_path)
    r = Running(store, tree, auto_commit=True, quiet_period=0.3)
    try:
        (tree / "tmp/scratch").write_text("default excludes cover /tmp/*\n")
        (tree / "tmp/sub").mkdir()
        (tree / "tmp/sub/deeper").write_text("below an excluded directory\n")
        time.sleep(1.2)
        assert not r.batches and not r.commits and not r.w.dirty
        (tree / "etc/issue").write_text("Debian\n")
        r.settle_after("etc/issue")
    finally:
        r.stop()
    assert r.seen() == {"etc/issue"}
    assert [c.generation.ref for c in r.commits if c.created] == ["t@2"]


def test_waits_while_apt_holds_its_lock(store: Store, tmp_path: Path) -> None:
    tree = _base(store, tmp_path)
    lock = tree / "var/lib/dpkg/lock-frontend"
    # Another process holds the lock as apt does (a POSIX fcntl lock); it lets go when stdin closes.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'r+'); fcntl.lockf(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); sys.stdin.read()", os.fspath(lock)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert package_manager_busy(tree)
        r = Running(store, tree, auto_commit=True, quiet_period=0.3)
        try:
            (tree / "etc/motd").write_text("half-way through an upgrade\n")
            r.wait(lambda: any("apt or dpkg" in n for n in r.notices), 30, "the watcher to wait for apt")
            time.sleep(0.5)
            assert not r.commits
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(10)
            r.wait(r.settled, 30, "the commit after apt let go")
        finally:
            r.stop()
    finally:
        holder.kill()
        holder.wait()
    assert not package_manager_busy(tree)
    assert [c.generation.ref for c in r.commits if c.created] == ["t@2"]


def test_survives_the_chroot_being_removed_and_recreated(store: Store, tmp_path: Path) -> None:
    tree = _base(store, tmp_path)
    r = Running(store, tree, auto_commit=True, quiet_period=0.5)
    try:
        shutil.rmtree(tree)
        r.wait(lambda: any("lost the watch" in n for n in r.notices), 30, "the watch to notice")
        (tree / "etc").mkdir(parents=True)
        (tree / "etc/motd").write_text("rebuilt from scratch\n")
        r.wait(lambda: any("again" in n for n in r.notices), 30, "the watch to come back")
        r.wait(lambda: r.settled() and any(c.created for c in r.commits), 30, "the auto-commit")
        (tree / "etc/issue").write_text("seen by the new watch\n")
        r.settle_after("etc/issue")
    finally:
        r.stop()
    assert chroot_changes(store, "t", tree).clean


def _read_until(stream: object, want: str, timeout: float) -> str:
    """Lines from a pipe until one contains `want`."""
    fd = stream.fileno()  # type: ignore[attr-defined]
    buf = ""
    deadline = time.monotonic() + timeout
    while want not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting for {want!r}; got {buf!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536).decode(errors="replace")
            assert chunk, f"the stream ended before {want!r}; got {buf!r}"
            buf += chunk
    return buf


@pytest.mark.parametrize("sig, code, json_out", [(signal.SIGINT, 130, False), (signal.SIGTERM, 0, True)],
                         ids=["SIGINT", "SIGTERM-json"])
def test_cli_watch_shows_changes_and_stops_cleanly(tmp_path: Path, sig: int, code: int, json_out: bool) -> None:
    store = Store.init(tmp_path / "store")
    tree = _base(store, tmp_path)
    store.close()
    env = {**os.environ, "IMGSTORE_ROOT": os.fspath(tmp_path / "store")}
    env.pop("IMGSTORE_FAULT", None)
    args = [sys.executable, "-m", "imgstore", "watch", os.fspath(tree), "-p", "t"] + (["--json"] if json_out else [])
    p = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stderr is not None and p.stdout is not None
        _read_until(p.stdout if json_out else p.stderr, "Ctrl-C to stop", 30)
        (tree / "etc/new.conf").write_text("x\n")
        text = _read_until(p.stdout, "etc/new.conf", 30)
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == code, err
    assert b"Traceback" not in err
    if json_out:
        lines = (text + out.decode()).splitlines()
        try:
            events = [json.loads(line) for line in lines if line]
        except ValueError:
            pytest.fail(f"not JSON lines: {lines!r}")
        changes = [e for e in events if e["event"] == "changes"]
        assert changes[0]["paths"] == {"etc/new.conf": "created"} and changes[0]["counts"]["created"] == 1
        assert "stopped watching" in events[-1]["text"]
    else:
        assert "+1" in text and "etc/new.conf" in text and b"stopped watching" in err


def _mirror_reachable() -> bool:
    try:
        with urllib.request.urlopen("http://deb.debian.org/debian/dists/bookworm/InRelease", timeout=15) as r:
            r.read(1)
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.root
def test_apt_get_install_in_a_debootstrap_chroot_is_captured(store: Store, tmp_path: Path) -> None:
    if not IS_ROOT or shutil.which("chroot") is None:
        pytest.skip("needs root and chroot(8)")
    if not _mirror_reachable():
        pytest.skip("the Debian mirror deb.debian.org is unreachable: apt-get cannot install anything")
    sys.path.insert(0, os.fspath(REPO))
    from benchmarks import rootfs

    try:
        tree = rootfs.minbase(dest=tmp_path / "deb")
    except rootfs.RootfsError as exc:
        pytest.skip(f"no minbase rootfs: {exc}")
    shutil.copyfile("/etc/resolv.conf", tree / "etc/resolv.conf")
    policy = tree / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    write_profile(store.root, "deb")
    base = commit.commit(store, tree, "deb", "minbase", no_kernel=True).generation
    assert "Package: file\n" not in b"".join(browse.read_file(store, base, "/var/lib/dpkg/status")).decode()

    r = Running(store, tree, profile="deb", auto_commit=True, quiet_period=2.0)
    try:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8",
               "HOME": "/root"}
        apt = subprocess.run(
            ["chroot", os.fspath(tree), "/bin/sh", "-c",
             "apt-get update -q && apt-get install -y -q --no-install-recommends file"],
            env=env, capture_output=True, text=True, timeout=300)
        assert apt.returncode == 0, apt.stdout[-3000:] + apt.stderr[-3000:]
        (tree / "root/apt-done").write_text("written after apt-get returned\n")
        r.settle_after("root/apt-done", 90)
    finally:
        r.stop()
    made = [c.generation for c in r.commits if c.created]
    assert made, r.notices
    status = b"".join(browse.read_file(store, made[-1], "/var/lib/dpkg/status")).decode()
    assert "Package: file\nStatus: install ok installed" in status
    assert any(os.fsdecode(e.path) == "usr/bin/file" for e in browse.entries(store, made[-1]))
    assert chroot_changes(store, "deb", tree).clean
    assert any(p.startswith("usr/") for p in r.seen())
