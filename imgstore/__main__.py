"""Entry point. `imgstore --version` answers before anything heavy is imported."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        from . import __version__

        print(f"imgstore {__version__}")
        return
    from .cli_run import run

    run()


if __name__ == "__main__":
    main()
