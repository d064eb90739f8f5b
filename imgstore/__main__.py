"""Entry point. `imgstore --version` answers before anything heavy is imported; with `imgstore serve`
running, the command runs in the server (imgstore/server.py) and nothing heavy is imported here at all;
a plain `commit` or `materialize` runs without importing typer (cli_fast.py)."""

from __future__ import annotations

import os
import sys


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        from . import __version__

        print(f"imgstore {__version__}")
        return
    from .server import forward

    code = forward(sys.argv)
    if code is not None:
        os._exit(code)  # the worker did the work: nothing to finalize here (interpreter teardown costs ~10 ms)
    from .cli_fast import run as run_fast

    run_fast(sys.argv[1:])  # commit and materialize without typer, when the line is a plain one
    from .cli_run import run

    run()


if __name__ == "__main__":
    main()
