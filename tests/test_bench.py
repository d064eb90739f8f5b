"""benchmarks/bench.py's wait for a quiet disk: real file creations, timed."""

from __future__ import annotations

from pathlib import Path

from benchmarks import bench


def test_probe_creates_its_files_and_deletes_nothing(tmp_path: Path) -> None:
    took = bench.probe(tmp_path / "p")
    assert took > 0
    files = sorted((tmp_path / "p").iterdir())
    assert len(files) == bench.PROBE_FILES and all(f.stat().st_size == 4096 for f in files)


def test_wait_quiet_returns_at_once_on_a_quiet_disk(tmp_path: Path) -> None:
    fastest: list[float] = []
    seen = bench.wait_quiet(tmp_path, fastest, limit=600)
    assert seen["waited_s"] < 15 and seen["fastest_s"] == round(fastest[-1], 4) == seen["probe_s"]


def test_wait_quiet_gives_up_after_its_limit(tmp_path: Path) -> None:
    fastest = [1e-4]  # 1,000 files and a sync in 0.1 ms: every probe is "slow"
    seen = bench.wait_quiet(tmp_path, fastest, limit=0)
    assert seen["probe_s"] > bench.PROBE_SLACK * 1e-4 and seen["fastest_s"] == 1e-4
    assert len(list(tmp_path.iterdir())) == 1  # one probe, no wait
