"""Time `imgstore rollback` (and rollout) as whole processes: 10 vs 1,000 nodes, 100 MB vs 1 GB trees.

The flip writes one per-MAC file per node that follows the profile and renames the root link; the
trees are materialized before (by the rollout that made them active), so the cost must not depend on
the image size. Each is timed twice: as its own process, and with `imgstore serve` running (the command
runs in a worker forked from the server). Run as: python benchmarks/rollback.py [--runs N] [--json OUT]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(os.fspath(REPO))  # after site-packages: an installed imgstore comes first

PROFILE = """
[commit]
require_kernel = true
[deploy]
tftp_root = "tftpboot"
root_link = "netboot/root"
serve_default = true
"""


def make_tree(path: Path, megabytes: int) -> None:
    (path / "boot").mkdir(parents=True)
    (path / "etc").mkdir()
    (path / "boot/vmlinuz-6.1.0-28-amd64").write_bytes(os.urandom(8 << 20))
    (path / "boot/initrd.img-6.1.0-28-amd64").write_bytes(os.urandom(2 << 20))
    block = os.urandom(1 << 20)
    data = path / "srv/data"
    data.mkdir(parents=True)
    for i in range(megabytes // 64):
        with open(data / f"blob{i:03d}", "wb") as f:
            for j in range(64):
                f.write(block[j:] + block[:j])  # distinct megabytes, cheap to compress


IMGSTORE: list[str] = []  # how to run imgstore: benchmarks.bench.imgstore_argv()


def imgstore(root: Path, *args: str, socket: str = "") -> float:
    """One command as its own process, or through the `imgstore serve` listening on `socket`."""
    env = dict(os.environ, IMGSTORE_ROOT=os.fspath(root), IMGSTORE_SOCKET=socket)
    t0 = time.perf_counter()
    subprocess.run([*IMGSTORE, *args], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def scenario(work: Path, nodes: int, megabytes: int, runs: int, socket: str) -> dict[str, object]:
    from imgstore import nodes as nodes_mod
    from imgstore.store import Store

    root = work / f"store-{nodes}-{megabytes}"
    Store.init(root).close()
    (root / "profiles/web.toml").write_text(PROFILE)
    tree = work / f"tree-{megabytes}"
    if not tree.exists():
        make_tree(tree, megabytes)
    imgstore(root, "commit", os.fspath(tree), "-p", "web", "-m", "one")
    (tree / "etc/motd").write_text("two")
    imgstore(root, "commit", os.fspath(tree), "-p", "web", "-m", "two")
    (tree / "etc/motd").unlink()
    store = Store.open(root)
    with store.engine.begin() as conn:
        for i in range(nodes):
            mac = f"52:54:{(i >> 24) & 255:02x}:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"
            nodes_mod.add(conn, f"n{i:05d}", mac, None, "web")
    store.close()
    imgstore(root, "rollout", "web@1")
    imgstore(root, "rollout", "web@2")  # both trees materialized now
    rollbacks, rollouts, served = [], [], []
    for _ in range(runs):
        rollbacks.append(imgstore(root, "rollback"))
        rollouts.append(imgstore(root, "rollout", "web@2"))
        served.append(imgstore(root, "rollback", socket=socket))
        imgstore(root, "rollout", "web@2", socket=socket)
    shutil.rmtree(root)
    return {"nodes": nodes, "tree_mb": megabytes, "rollback_median_s": statistics.median(rollbacks),
            "rollout_median_s": statistics.median(rollouts), "rollback_samples": rollbacks,
            "rollback_served_median_s": statistics.median(served), "rollback_served_samples": served}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks/results/rollback.json")
    ap.add_argument("--from-checkout", action="store_true", help="run `python -m imgstore` from this checkout")
    args = ap.parse_args()
    from benchmarks.bench import INSTALL_VENV, imgstore_argv, start_server

    try:
        importlib.import_module("imgstore.store")  # the stores are set up in process
    except ModuleNotFoundError:  # an interpreter without imgstore's dependencies: go on in the bench venv's
        imgstore_argv()  # installs this checkout there
        venv_python = os.fspath(INSTALL_VENV / "bin" / "python")
        os.execv(venv_python, [venv_python, os.fspath(Path(__file__).resolve()), *sys.argv[1:]])

    IMGSTORE[:] = imgstore_argv(args.from_checkout)
    work = Path(tempfile.mkdtemp(prefix="imgstore-rollback-bench-"))
    sock = work / "imgstore.sock"
    server = start_server([*IMGSTORE, "serve", "--socket", os.fspath(sock)], sock,
                          dict(os.environ), work / "serve.log")
    try:
        t0 = time.perf_counter()
        imgstore(work / "unused", "--version")
        version_s = statistics.median(
            [imgstore(work / "unused", "--version") for _ in range(args.runs)])
        results = [scenario(work, n, mb, args.runs, os.fspath(sock))
                   for n, mb in ((10, 100), (1000, 100), (1000, 1000))]
        print(f"{'nodes':>6} {'tree':>8} {'rollback (median)':>18} {'rollout (median)':>17} {'rollback served':>16}"
              "  target")
        for r in results:
            target = "< 0.3 s " + ("PASS" if r["nodes"] == 1000 and float(r["rollback_median_s"]) < 0.3  # type: ignore[arg-type]
                                   else "MISS" if r["nodes"] == 1000 else "")
            print(f"{r['nodes']:>6} {r['tree_mb']:>5} MB {r['rollback_median_s']:>16.3f} s "
                  f"{r['rollout_median_s']:>15.3f} s {r['rollback_served_median_s']:>14.3f} s  "
                  f"{target if r['nodes'] == 1000 else ''}")
        print(f"imgstore --version: {version_s:.3f} s (target < 0.15 s: {'PASS' if version_s < 0.15 else 'MISS'})")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "version_s": version_s,
                                         "seconds": time.perf_counter() - t0}, indent=2))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
