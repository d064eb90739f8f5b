from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from imgstore.store import Store  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.init(tmp_path / "store")
    yield s
    s.close()


def write_profile(store_root: Path, name: str, body: str = "") -> Path:
    p = store_root / "profiles" / f"{name}.toml"
    p.write_text(body or "[commit]\nrequire_kernel = false\n[deploy]\ntftp_root = \"tftp\"\n")
    return p


Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """Run the real command line as a separate process against the test's store."""

    def run(*args: str | os.PathLike[str], root: Path | None = None, input: str | None = None,
            env: dict[str, str] | None = None, python_args: bool = False) -> subprocess.CompletedProcess[str]:
        """`python -m imgstore ARGS`; with python_args, `python ARGS`."""
        e = dict(os.environ)
        e["IMGSTORE_ROOT"] = os.fspath(root or tmp_path / "store")
        e.pop("IMGSTORE_FAULT", None)
        e.update(env or {})
        return subprocess.run(
            [sys.executable, *([] if python_args else ["-m", "imgstore"]), *[os.fspath(a) for a in args]],
            capture_output=True, text=True,
            env=e, input=input, errors="surrogateescape", timeout=600,
        )

    return run


def disk_state(root: Path) -> dict[str, object]:
    """Names, sizes and mtimes under root, and the database's rows: to prove a failed command changed nothing.

    SQLite's own files are compared by content (a reader may checkpoint the WAL), the lock files not at all.
    """
    import sqlite3

    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if n in ("lock", "lock.info") or n.startswith("imgstore.db"):
                continue
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size if not os.path.isdir(p) else 0, st.st_mtime_ns)
    db = root / "imgstore.db"
    if db.exists():
        conn = sqlite3.connect(db)
        out["<database>"] = list(conn.iterdump())
        conn.close()
    return out
