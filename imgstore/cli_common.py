"""What every command shares, without typer: the store it opened, how results are printed (JSON, tables,
file names, sizes, progress). The typer commands (cli.py) and the fast path for the hot commands
(cli_fast.py) both use it."""

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class State:
    root: Path | None = None
    store: Any = None
    interrupted = False  # by Ctrl-C or SIGTERM, and not handled by the command itself


state = State()

def open_store() -> Any:
    from .store import Store

    if state.store is None:
        state.store = Store.open(state.root)
    return state.store


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=_json_default, ensure_ascii=False)
    sys.stdout.write("\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return os.fspath(o)
    if isinstance(o, bytes):
        # JSON must be valid UTF-8: names that are not get the manifest's %XX escaping (docs/format.md).
        try:
            return o.decode("utf-8")
        except UnicodeDecodeError:
            from .manifest import escape

            return escape(o).decode("ascii")
    if hasattr(o, "as_dict"):
        return o.as_dict()
    raise TypeError(type(o).__name__)


def console() -> Any:
    from rich.console import Console

    # Piped output is for scripts and logs: do not wrap tables at 80 columns.
    # No markup or emoji: a MAC like 52:54:00:ab:cd:ef must not become an emoji, nor "[x]" vanish.
    opts: dict[str, Any] = {"emoji": False, "markup": False, "highlight": False}
    return Console(**opts) if sys.stdout.isatty() else Console(width=200, **opts)


def err_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def shown(raw: bytes) -> str:
    """A file name for a terminal: invalid UTF-8 as \\xNN, control characters (a newline that could fake
    another line) as escapes; everything else as is."""
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def report_skipped(res: Any) -> None:
    """What a walk of a chroot left out (commit, status CHROOT), on stderr."""
    for m in res.skipped_mounts:
        print(f"skipped {m}: another filesystem is mounted there", file=sys.stderr)
    for s in res.skipped_sockets:
        print(f"warning: skipped socket {s}", file=sys.stderr)


@contextmanager
def progress_bar(what: str) -> Iterator[Callable[[int, int], None] | None]:
    """A files/bytes/throughput bar on a terminal; nothing when stderr is not one."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    t0 = time.monotonic()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err_console(), transient=True) as bar:
        task = bar.add_task(what)

        def update(entries: int, nbytes: int) -> None:
            rate = nbytes / max(time.monotonic() - t0, 1e-6)
            bar.update(task, description=f"{what}: {entries:,} entries, {human_bytes(nbytes)}, {human_bytes(rate)}/s")

        yield update
