"""forkjoin: work shared with a forked child comes back whole: every item once, errors with their hints,
a killed child noticed, a kill fault in the child killing the command, and no child outliving the command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from imgstore import forkjoin
from imgstore.errors import ImgstoreError, NoSpace

REPO = Path(__file__).resolve().parent.parent


def _log(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


def test_halves_balance_by_weight_and_keep_order() -> None:
    a, b = forkjoin.halves([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], weight=lambda x: x)
    assert a == [10] and b == [1] * 10
    a, b = forkjoin.halves(list(range(100)), weight=lambda x: 1)
    assert a == sorted(a) and b == sorted(b) and sorted(a + b) == list(range(100)) and len(a) == len(b)


def test_every_item_runs_once_in_two_processes(tmp_path: Path) -> None:
    assert threading.active_count() == 1, "another thread runs in the test process: run_split would not fork"
    log = tmp_path / "log"
    forkjoin.run_split(lambda i: _log(log, f"{os.getpid()} {i}"), list(range(50)), weight=lambda i: 1)
    lines = [line.split() for line in log.read_text().splitlines()]
    assert sorted(int(i) for _, i in lines) == list(range(50))
    pids = {pid for pid, _ in lines}
    assert len(pids) == 2 and str(os.getpid()) in pids


def test_with_other_threads_everything_runs_here(tmp_path: Path) -> None:
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        seen: list[int] = []
        forkjoin.run_split(lambda i: seen.append(os.getpid()), list(range(10)), weight=lambda i: 1)
        assert seen == [os.getpid()] * 10
    finally:
        stop.set()
        t.join()


def test_a_quiet_thread_does_not_stop_the_fork(tmp_path: Path) -> None:
    """`imgstore serve`'s workers watch their client in a QuietThread: their materialize still forks."""
    stop = threading.Event()
    t = forkjoin.QuietThread(target=stop.wait)
    t.start()
    try:
        log = tmp_path / "log"
        forkjoin.run_split(lambda i: _log(log, f"{os.getpid()} {i}"), list(range(10)), weight=lambda i: 1)
        assert len({line.split()[0] for line in log.read_text().splitlines()}) == 2
    finally:
        stop.set()
        t.join()


def test_an_error_in_the_child_is_raised_here_with_its_hint() -> None:
    parent = os.getpid()

    def fn(i: int) -> None:
        if os.getpid() != parent and i == 3:
            raise NoSpace("no space left on /srv/imgstore", "free 12 MB there")

    with pytest.raises(NoSpace) as info:
        forkjoin.run_split(fn, list(range(8)), weight=lambda i: 1)
    assert info.value.message == "no space left on /srv/imgstore" and info.value.hint == "free 12 MB there"


class _TwoArgs(Exception):
    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what}: {why}")  # args hold one string: pickle cannot rebuild it


def test_an_error_in_the_child_that_pickle_cannot_rebuild_still_says_what_it_was() -> None:
    parent = os.getpid()

    def fn(i: int) -> None:
        if os.getpid() != parent:
            raise _TwoArgs("pack 3", "unreadable")

    with pytest.raises(ImgstoreError, match="_TwoArgs: pack 3: unreadable"):
        forkjoin.run_split(fn, list(range(4)), weight=lambda i: 1)


def test_an_error_here_kills_the_child(tmp_path: Path) -> None:
    parent = os.getpid()
    log = tmp_path / "log"

    def fn(i: int) -> None:
        if os.getpid() == parent:
            raise ValueError("broken here")
        _log(log, f"child started {i}")
        time.sleep(0.5)
        _log(log, f"child done {i}")

    t0 = time.monotonic()
    with pytest.raises(ValueError, match="broken here"):
        forkjoin.run_split(fn, list(range(20)), weight=lambda i: 1)
    assert time.monotonic() - t0 < 5  # not the 5 s the child's ten items would take
    assert "child done" not in (log.read_text() if log.exists() else "")


def test_a_child_killed_by_a_signal_is_an_error() -> None:
    parent = os.getpid()

    def fn(i: int) -> None:
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(ImgstoreError, match="killed by signal 9"):
        forkjoin.run_split(fn, list(range(4)), weight=lambda i: 1)


def _script(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


def test_a_kill_fault_in_the_child_kills_the_command(tmp_path: Path) -> None:
    """IMGSTORE_FAULT=<point>:kill is a power cut: the whole command dies, whichever process reached it."""
    log = tmp_path / "log"
    r = subprocess.run(_script(f"""
        import os, time
        from imgstore import faults, forkjoin
        parent = os.getpid()
        def fn(i):
            if os.getpid() != parent:
                faults.point("test.in-child")
            else:
                time.sleep(0.2)
        forkjoin.run_split(fn, list(range(10)), weight=lambda i: 1)
        open({str(log)!r}, "w").write("returned")
        """), cwd=REPO, env={**os.environ, "IMGSTORE_FAULT": "test.in-child:kill"}, capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not log.exists()


def test_the_child_dies_with_the_command(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    proc = subprocess.Popen(_script(f"""
        import os, time
        from imgstore import forkjoin
        def fn(i):
            fd = os.open({str(pids)!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, b"%d\\n" % os.getpid())
            os.close(fd)
            time.sleep(60)
        forkjoin.run_split(fn, [1, 2], weight=lambda i: 1)
        """), cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(pids.read_text().split() if pids.exists() else []) < 2:
            time.sleep(0.05)
        child = {int(p) for p in pids.read_text().split()} - {proc.pid}
        assert len(child) == 1
    finally:
        proc.kill()
        proc.wait()
    (pid,) = child
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)  # our own child's child: it exists until it has died and been reaped by init
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"the forked child {pid} outlived the command")


def _delalloc(path: Path) -> bool:
    """Whether any of the file's extents is still only in the page cache (ext4's delayed allocation: FIEMAP)."""
    import fcntl
    import struct

    count = 64
    head = struct.pack("=QQIIII", 0, 2**64 - 1, 0, 0, count, 0)
    buf = bytearray(head + bytes(56 * count))
    with open(path, "rb") as f:
        fcntl.ioctl(f.fileno(), 0xC020660B, buf)  # FS_IOC_FIEMAP
    mapped = struct.unpack_from("=I", buf, 20)[0]
    return any(struct.unpack_from("=I", buf, 32 + 56 * i + 40)[0] & 0x4 for i in range(mapped))  # DELALLOC


def test_writing_back_starts_the_writeback_while_the_body_runs_and_the_body_still_forks(tmp_path: Path) -> None:
    """materialize's fill runs inside durable.writing_back: its files go to disk while they are made (the
    kernel alone would wait 30 s), and its two processes still fork beside the thread that does it."""
    from imgstore.durable import writing_back

    probe = tmp_path / "probe"
    probe.write_bytes(os.urandom(1 << 20))
    try:
        if not _delalloc(probe):
            pytest.skip("no delayed allocation on this filesystem: nothing to observe")
    except OSError:
        pytest.skip("no FIEMAP on this filesystem")
    log = tmp_path / "log"
    before = threading.active_count()
    with writing_back(tmp_path, every=0.05):
        forkjoin.run_split(lambda i: _log(log, f"{os.getpid()} {i}"), list(range(10)), weight=lambda i: 1)
        data = tmp_path / "data"
        data.write_bytes(os.urandom(8 << 20))  # unlike the probe, written before and still in the page cache
        deadline = time.monotonic() + 10
        while _delalloc(data) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _delalloc(data), "the data written in the body was not written back while it ran"
    assert threading.active_count() == before
    assert len({line.split()[0] for line in log.read_text().splitlines()}) == 2
