"""benchmarks/bench.py's wait for a quiet disk: real file creations, timed."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import bench


def test_probe_creates_its_files_and_deletes_nothing(tmp_path: Path) -> None:
    took = bench.probe(tmp_path / "p")
    assert took > 0
    files = sorted((tmp_path / "p").iterdir())
    assert len(files) == bench.PROBE_FILES and all(f.stat().st_size == 4096 for f in files)


def test_wait_quiet_returns_at_once_on_a_quiet_disk(tmp_path: Path) -> None:
    fastest = [10.0]  # an earlier probe of the run, slower than any here
    seen = bench.wait_quiet(tmp_path, fastest, limit=600)
    assert seen["waited_s"] < 15 and seen["fastest_s"] == round(fastest[-1], 4) == seen["probe_s"]
    assert len(list(tmp_path.iterdir())) == 1


def test_the_first_probe_of_a_run_is_never_enough(tmp_path: Path) -> None:
    """It has nothing to be compared with: a slow disk at the start would pass for the run's normal."""
    probes: list[float] = []
    seen = bench.wait_quiet(tmp_path, probes, limit=600, interval=0)
    assert len(probes) >= 2 and len(list(tmp_path.iterdir())) == len(probes)
    assert seen["fastest_s"] == round(min(probes), 4) and seen["probe_s"] == round(probes[-1], 4)


def test_wait_quiet_gives_up_after_its_limit(tmp_path: Path) -> None:
    fastest = [1e-4]  # 1,000 files and a sync in 0.1 ms: every probe is "slow"
    seen = bench.wait_quiet(tmp_path, fastest, limit=0)
    assert seen["probe_s"] > bench.PROBE_SLACK * 1e-4 and seen["fastest_s"] == 1e-4
    assert len(list(tmp_path.iterdir())) == 1  # one probe, no wait


def test_every_tool_takes_each_step_in_turn_after_a_settle_where_peers_freed_inodes() -> None:
    log: list[str] = []

    def tool(name: str) -> Iterator[None]:
        for step in bench.SEQUENCE:  # as run_tool: stops before each step
            yield
            log.append(f"{name} {step}")

    tools = [tool("a"), tool("b")]
    for t in tools:
        next(t)  # to just before its first step, as run() does
    bench.take_turns(tools, lambda: log.append("settle"))
    expected: list[str] = []
    for step in bench.SEQUENCE:
        expected += ["settle"] if step in ("mat1", "mat2") else []
        expected += [f"a {step}", f"b {step}"]
    assert log == expected


@pytest.mark.root
@pytest.mark.parametrize("journal", [False, True])
def test_each_tool_gets_a_fresh_ext4_of_the_kind_asked_for(tmp_path: Path, journal: bool) -> None:
    if not Path("/dev/loop-control").exists():
        pytest.skip("no loop devices here (/dev/loop-control): bench.py runs with --on-host")
    work = tmp_path / "rep0" / "tool"
    bench.fresh_filesystem(work, journal=journal, size=256 << 20, inodes=16384)
    try:
        assert os.path.ismount(work)
        fstype = subprocess.run(["findmnt", "-no", "FSTYPE", "--mountpoint", os.fspath(work)],
                                capture_output=True, text=True, check=True).stdout.strip()
        assert fstype == "ext4"
        features = subprocess.run(["dumpe2fs", "-h", os.fspath(bench.image_path(work))], capture_output=True,
                                  text=True, check=True).stdout
        assert ("has_journal" in features) == journal
        if journal:  # what this machine's ext4 without a journal does not do: reuse inodes freed a moment ago
            first = _make_files(work / "a", 500)
            shutil.rmtree(work / "a")
            os.sync()
            time.sleep(1.5)  # ext4 counts an inode freed in the current second as not recent
            assert len(first & _make_files(work / "b", 500)) > 400
    finally:
        bench.release_filesystems(tmp_path / "rep0")
    assert not os.path.ismount(work) and not bench.image_path(work).exists()
    bench.release_filesystems(tmp_path / "rep0")  # nothing mounted: nothing to do


def _make_files(folder: Path, n: int) -> set[int]:
    folder.mkdir()
    for i in range(n):
        (folder / str(i)).write_bytes(b"x")
    return {(folder / str(i)).stat().st_ino for i in range(n)}
