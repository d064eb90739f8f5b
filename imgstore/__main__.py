"""Entry point. `imgstore --version` answers before anything heavy is imported; with `imgstore serve`
running, the command runs in the server (imgstore/server.py) and nothing heavy is imported here at all."""

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
    from .cli_run import run

    run()


if __name__ == "__main__":
    main()
