"""Entry point. `imgstore --version` answers before anything heavy is imported; with `imgstore serve`
running, the command runs in the server (imgstore/client.py, server.py) and nothing heavy is imported here at all;
a plain `commit` or `materialize` runs without importing typer (cli_fast.py)."""

from __future__ import annotations

import os
import sys


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        from . import __version__
        from .native import describe

        print(f"imgstore {__version__} ({describe()})")
        return
    from .client import forward

    code = forward(sys.argv)
    if code is not None:
        os._exit(code)  # the worker did the work: nothing to finalize here (interpreter teardown costs ~10 ms)
    try:
        from .cli_fast import run as run_fast

        run_fast(sys.argv[1:])  # commit and materialize without typer, when the line is a plain one
        from .cli_run import run

        run()
    except SystemExit as exc:
        leave(exc.code)


def leave(code: object) -> None:
    """Exit without the interpreter's teardown, which frees every module and object one by one (0.01 s of a
    0.12 s no-op commit). Nothing is lost: what a command writes is durable before it returns (files and
    directories fsynced, SQLite with synchronous=FULL), and nothing imgstore runs needs an exit handler. The
    standard streams are flushed here; a PostgreSQL connection is closed so the server logs no lost client."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    from .cli_common import state

    if state.store is not None and not state.store.database_url.startswith("sqlite"):
        state.store.close()  # SQLite needs nothing: closing would only checkpoint its WAL
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone, a stream closed: what is left cannot be shown anyway
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    main()
