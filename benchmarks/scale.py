"""How imgstore's commit scales: a tree of 1,000,000 small files, and a tree with one 4 GiB file.

    python benchmarks/scale.py [--files N] [--big-gib G] [--json OUT] [--skip-big] [--skip-many]

Targets (issue 4): peak RSS <= 300 MB committing 1,000,000 small files, at a commit rate per file within
2x of the Debian rootfs's (measured in the same run, same command line); peak RSS <= 100 MB committing
one 4 GiB file. Every commit is a whole `imgstore commit` process into a fresh store, timed with wait4;
the trees are built once and cached under .cache/scale (they take minutes to build and longer to
delete). A second, no-op commit of the big tree of small files shows what the stat cache costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(REPO))
CACHE = REPO / ".cache" / "scale"
PROFILE = "[commit]\ndefault_excludes = false\nrequire_kernel = false\n"


def build_many(root: Path, files: int) -> Path:
    """files small files (60-400 bytes, each different), 1,000 to a directory; built once."""
    done = root / ".complete"
    if done.exists() and done.read_text() == str(files):
        return root / "tree"
    if root.exists():
        shutil.rmtree(root)
    tree = root / "tree"
    per_dir = 1000
    t0 = time.monotonic()
    for d in range((files + per_dir - 1) // per_dir):
        sub = tree / f"d{d // 100:02d}" / f"d{d:04d}"
        sub.mkdir(parents=True)
        for i in range(min(per_dir, files - d * per_dir)):
            n = d * per_dir + i
            body = (f"file {n}\n" + f"config_value = {n * 7919 % 100003}\n" * (1 + n % 20)).encode()
            fd = os.open(sub / f"f{i:04d}.conf", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, body)
            os.close(fd)
        if d % 100 == 99:
            print(f"  built {(d + 1) * per_dir} files, {time.monotonic() - t0:.0f} s", file=sys.stderr)
    done.write_text(str(files))
    return tree


def build_big(root: Path, gib: int) -> Path:
    """One file of gib GiB: distinct 1 MiB blocks, half random and half text, like a disk image."""
    done = root / ".complete"
    if done.exists() and done.read_text() == f"{gib} v2":
        return root / "tree"
    if root.exists():
        shutil.rmtree(root)
    (root / "tree").mkdir(parents=True)
    import blake3

    text = b"".join(b"block %d line %d: the quick brown fox\n" % (i % 97, i) for i in range(14000))[: 1 << 19]
    with open(root / "tree" / "data.img", "wb") as f:
        for i in range(gib << 10):
            f.write(blake3.blake3(b"%d" % i).digest(length=1 << 19))  # 512 KiB that do not compress
            f.write(text)  # and 512 KiB that do
    done.write_text(f"{gib} v2")
    return root / "tree"


def timed(args: list[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    out = proc.stdout.read().decode() if proc.stdout else ""
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"{' '.join(args)} failed ({rc}): {err.strip()[-500:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
            "out": out}


def commit(work: Path, name: str, tree: Path, again: bool = False) -> dict[str, Any]:
    store = work / f"store-{name}"
    if store.exists():
        shutil.rmtree(store)
    imgstore = [sys.executable, "-m", "imgstore", "--root", os.fspath(store)]
    subprocess.run([*imgstore, "init"], check=True, capture_output=True)
    (store / "profiles" / "scale.toml").write_text(PROFILE)
    subprocess.run(["sync"], check=True)
    argv = [*imgstore, "commit", os.fspath(tree), "-p", "scale", "--no-kernel", "--json", "-m", name]
    first = timed(argv)
    res = json.loads(first.pop("out"))
    first.update(files=res["files"], entries=res["entries"], bytes=res["bytes"])
    if again:
        noop = timed(argv)
        noop.pop("out")
        first["noop"] = noop
    shutil.rmtree(store)
    return first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--big-gib", type=int, default=4)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--skip-many", action="store_true")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "scale.json")
    args = ap.parse_args()
    from benchmarks import rootfs
    from benchmarks.bench import compile_checkout

    compile_checkout()
    work = CACHE / "work"
    work.mkdir(parents=True, exist_ok=True)
    base = rootfs.minbase(dest=work / "minbase") if not (work / "minbase").exists() else work / "minbase"
    results: dict[str, Any] = {"rootfs": commit(work, "rootfs", base)}
    r = results["rootfs"]
    empty = work / "empty"
    empty.mkdir(exist_ok=True)
    startup = commit(work, "empty", empty)["wall_s"]  # start-up, database and fixed costs of a commit
    results["startup_s"] = startup
    rate_root = r["entries"] / max(r["wall_s"] - startup, 1e-3)
    rows = [("Debian minbase rootfs", r, rate_root, "")]
    if not args.skip_many:
        tree = build_many(CACHE / f"many-{args.files}", args.files)
        m = results["many"] = commit(work, "many", tree, again=True)
        rate = m["entries"] / max(m["wall_s"] - startup, 1e-3)
        ok_rss, ok_rate = m["rss_mb"] <= 300, rate >= rate_root / 2
        rows.append((f"{args.files:,} small files", m, rate,
                     f"RSS <= 300 MB {'PASS' if ok_rss else 'MISS'}; rate >= 0.5 x rootfs "
                     f"{'PASS' if ok_rate else 'MISS'} ({rate / rate_root:.2f} x)"))
        rows.append(("  same, no-op re-commit", m["noop"], m["entries"] / max(m["noop"]["wall_s"] - startup, 1e-3),
                     ""))
    if not args.skip_big:
        tree = build_big(CACHE / f"big-{args.big_gib}", args.big_gib)
        b = results["big"] = commit(work, "big", tree)
        rows.append((f"one {args.big_gib} GiB file", b, 0.0,
                     f"RSS <= 100 MB {'PASS' if b['rss_mb'] <= 100 else 'MISS'}; "
                     f"{b['bytes'] / max(b['wall_s'], 1e-3) / 1e6:.0f} MB/s"))
    print(f"fixed cost of a commit (an empty tree): {startup:.3f} s; rates exclude it\n")
    print("| tree | entries | wall s | CPU s | peak RSS MB | entries/s | target |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for label, x, rate, verdict in rows:
        ent = x.get("entries", "")
        print(f"| {label} | {ent:,} | {x['wall_s']:.2f} | {x['cpu_s']:.2f} | {x['rss_mb']:.0f} | "
              f"{rate:,.0f} | {verdict} |" if ent != "" else
              f"| {label} | | {x['wall_s']:.2f} | {x['cpu_s']:.2f} | {x['rss_mb']:.0f} | {rate:,.0f} | {verdict} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
