"""Commands on a live chroot: `status CHROOT` (rendered here, registered in cli_deploy) and `watch`."""

# No `from __future__ import annotations` here: typer would eval every annotation of every command as a string
# on each start (15 ms of every command, docs/benchmarks.md).

import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Optional

import typer

from .cli import app
from .cli_common import emit_json, human_bytes, report_skipped, state

SHOW_MAX = 100  # lines per kind; --json lists everything

_TITLES = {"added": "added", "removed": "removed", "modified": "modified", "metadata": "metadata only"}
_MARKS = {"added": "+", "removed": "-", "modified": "~", "metadata": "m"}


def show_chroot_status(store: Any, profile: str | None, chroot: Path | None, json_out: bool) -> None:
    from .changes import chroot_changes, resolve_target

    name, path = resolve_target(store, profile, chroot)
    rep = chroot_changes(store, name, path)
    if json_out:
        emit_json(rep)
        return
    report_skipped(rep)
    work = (f"{rep.entries:,} entries, read {rep.hashed:,} files ({human_bytes(rep.hashed_bytes)}) "
            f"in {rep.seconds:.2f} s")
    if rep.base is None:
        print(f"{rep.chroot}: profile {rep.profile} has no generation yet; a commit would store all {work}")
        print(f"next: imgstore commit {rep.chroot} --profile {rep.profile}")
        return
    if rep.clean:
        print(f"nothing changed: {rep.chroot} matches {rep.base} ({rep.base_id and rep.base_id[:12]}); {work}")
        return
    counts = ", ".join(f"{len(rep.of(k)):,} {_TITLES[k]}" for k in _TITLES if rep.of(k))
    print(f"{rep.chroot}: changes since {rep.base} ({rep.base_id and rep.base_id[:12]}): {counts}")
    for kind in _TITLES:
        _print_kind(rep, kind)
    print(f"({work}; commit them with: imgstore commit {rep.chroot} --profile {rep.profile})")


def _print_kind(rep: Any, kind: str) -> None:
    from .changes import collapse

    items = rep.of(kind)
    if not items:
        return
    rows: list[str] = []
    dir_mtimes = 0
    if kind in ("added", "removed"):
        for c, below in collapse(items):
            rows.append(f"{c.path}/ (and {below:,} entries below)" if below else c.path)
    else:
        for c in items:
            # A directory's mtime follows its entries coming and going: listed above, not again here.
            if kind == "metadata" and c.type == "d" and c.fields == ("mtime",):
                dir_mtimes += 1
                continue
            rows.append(f"{c.path} ({', '.join(c.fields)})")
    print(f"{_TITLES[kind]}:")
    for r in rows[:SHOW_MAX]:
        print(f"  {_MARKS[kind]} {r}")
    if len(rows) > SHOW_MAX:
        print(f"  ... and {len(rows) - SHOW_MAX:,} more (--json lists all)")
    if dir_mtimes:
        print(f"  ({dir_mtimes:,} directories whose only change is their mtime)")


@app.command()
def watch(
    chroot: Annotated[Optional[Path], typer.Argument(help="The chroot (default: the profile's commit.chroot).")] = None,
    profile: Annotated[Optional[str], typer.Option("--profile", "-p", help="Profile name; needed when the "
                                                   "store has several and CHROOT is none's commit.chroot.")] = None,
    auto_commit: Annotated[bool, typer.Option("--auto-commit", help="Commit once the tree has been quiet for "
                                              "--quiet-period, then keep watching.")] = False,
    quiet_period: Annotated[str, typer.Option("--quiet-period", help="How long without changes before an "
                                              "auto-commit: 30s, 2m, 500ms.")] = "30s",
    message: Annotated[str, typer.Option("--message", "-m", help="Message of auto-commits.")] = "",
    no_kernel: Annotated[bool, typer.Option("--no-kernel", help="Auto-commit without kernel and initrd.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line and event.")] = False,
) -> None:
    """Show a chroot's changes live, one line per batch; with --auto-commit, commit after a quiet period.

    Events only trigger: each commit walks the whole tree, so dropped events lose nothing.

    Auto-commits wait while apt or dpkg holds its lock in the chroot. Ctrl-C or SIGTERM stops.

    Examples: imgstore watch /srv/chroots/web ; imgstore watch -p web --auto-commit --quiet-period 30s
    """
    from . import audit
    from .changes import resolve_target
    from .cli_common import open_store
    from .watch import Watcher, parse_duration

    quiet = parse_duration(quiet_period)
    store = open_store()
    name, path = resolve_target(store, profile, chroot)
    out = _Output(json_out)
    w = Watcher(store, name, path, auto_commit=auto_commit, quiet_period=quiet, message=message,
                no_kernel=no_kernel, on_batch=out.batch, on_commit=out.commit, on_notice=out.notice)

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        w.stop()

    previous = signal.signal(signal.SIGTERM, on_term)
    code = 0
    try:
        w.run()
    except KeyboardInterrupt:
        code = 130
        state.interrupted = False  # a way to stop, not a failure: the notice below says so
    finally:
        signal.signal(signal.SIGTERM, previous)
        made = [c.generation.ref for c in w.commits if c.created]
        if made:
            audit.note(profile=name, generation=made[-1], detail=f"auto-committed {', '.join(made)}")
    out.notice(f"stopped watching {path}: {w.batches:,} batches of changes, "
               f"{len(made)} generation(s) committed" + (f" ({', '.join(made)})" if made else ""))
    if code:
        raise typer.Exit(code)


class _Output:
    """Lines for people on stdout (notices on stderr), or JSON lines for scripts."""

    def __init__(self, json_out: bool) -> None:
        self.json = json_out

    def _emit(self, obj: dict[str, Any]) -> None:
        print(json.dumps(obj, ensure_ascii=False), flush=True)

    def batch(self, b: Any) -> None:
        if self.json:
            self._emit({"event": "changes", **b.as_dict()})
            return
        counts = b.counts()
        signs = " ".join(f"{s}{counts[k]:,}" for k, s in (("created", "+"), ("changed", "~"), ("deleted", "-"))
                         if counts[k])
        shown = ", ".join(f"{p} ({n:,})" if p.endswith("/") else p for p, n in b.groups())
        more = len(b.paths) - sum(n for _p, n in b.groups())
        tail = f", and {more:,} more" if more > 0 else ""
        print(f"{time.strftime('%H:%M:%S', time.localtime(b.started))} {signs}  {shown}{tail}", flush=True)

    def commit(self, res: Any) -> None:
        g = res.generation
        if self.json:
            self._emit({"event": "commit", **res.as_dict()})
            return
        stamp = time.strftime("%H:%M:%S")
        if not res.created:
            print(f"{stamp} nothing new to commit: the tree is identical to {g.ref}", flush=True)
            return
        print(f"{stamp} committed {g.ref} {g.short}: {res.entries:,} entries, read {res.read_files:,} files, "
              f"stored {human_bytes(g.new_bytes)} new, in {res.seconds:.2f} s", flush=True)

    def notice(self, text: str) -> None:
        if self.json:
            self._emit({"event": "notice", "time": time.time(), "text": text})
        else:
            print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)



@app.command()
def serve(
    socket_path: Annotated[Optional[str], typer.Option(
        "--socket", help="Where to listen [default: $IMGSTORE_SOCKET, else /run/imgstore.sock for root, else "
        "$XDG_RUNTIME_DIR/imgstore.sock].")] = None,
) -> None:
    """Keep imgstore loaded so that every command starts in milliseconds; runs until SIGTERM or Ctrl-C.

    Commands find the server by the same socket path and run in a fresh worker forked from it, with the
    caller's terminal, directory, environment and user; without a server they run as before. Only the
    server's own user may use it. After an upgrade it stops (run it under systemd with Restart=always).

    Example: imgstore serve ; IMGSTORE_SOCKET=/tmp/imgstore.sock imgstore serve
    """
    from .cli_run import run
    from .client import socket_path as default_path
    from .errors import UsageError
    from .server import serve as serve_forever

    path = socket_path or default_path()
    if not path:
        raise UsageError("no socket path: not root and XDG_RUNTIME_DIR is not set",
                         "give --socket PATH (and the same IMGSTORE_SOCKET=PATH to the commands)")
    _warm_up()
    command = typer.main.get_command(app)
    serve_forever(path, lambda: run(command), lambda text: print(f"{time.strftime('%H:%M:%S')} {text}",
                                                                file=sys.stderr, flush=True))


def _warm_up() -> None:
    """Import what commands use, once, in the server: its workers start with all of it loaded."""
    import importlib

    for mod in ("audit", "checkout", "commit", "db", "deploy", "diff", "gc", "generations", "materialize",
                "nodes", "objects", "profiles", "status", "store", "verify"):
        importlib.import_module(f".{mod}", __package__)
    for mod in ("sqlite3", "rich.console", "rich.table", "concurrent.futures"):
        importlib.import_module(mod)
