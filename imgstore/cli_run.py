"""Running the command line: library errors become one line on stderr and their exit code (docs/exit-codes.md),
click's usage errors one line and exit 2, and every command that changes something leaves an audit event.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from .cli_common import shown, state
from .errors import ConfigError, Conflict, ImgstoreError, NotFound, UsageError


def load_commands() -> None:
    """Each module registers its commands on `app`; optional ones may be missing in a partial checkout."""
    import importlib

    for mod in ("cli_deploy", "cli_day2", "cli_watch"):
        try:
            importlib.import_module(f".{mod}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{mod}":
                raise


def run(command: Any = None) -> None:
    """Run the app (or `command`, the app's click command built beforehand by `imgstore serve`)."""
    load_commands()
    if command is None:
        from .cli import app

        command = app
    execute(lambda: command(standalone_mode=False))


def execute(call: Callable[[], Any]) -> None:
    """Run a command (typer's app, or cli_fast's), turning library errors into one line and an exit code;
    audit what changed things. Never returns."""
    import signal

    # What imgstore creates must not depend on the operator's umask: the store is writable by its owner
    # only, the TFTP root readable by everyone (tftpd drops privileges). Explicit modes do the rest.
    os.umask(0o022)

    def _interrupted(_signum: int, _frame: object) -> None:
        state.interrupted = True  # typer turns the KeyboardInterrupt into a silent exit code 130
        raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: temp files removed, exit code 130

    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    code, message = 0, ""
    try:
        rc = call()
        code = rc if isinstance(rc, int) else 0
    except ImgstoreError as exc:
        code, message = exc.exit_code, str(exc)
    except KeyboardInterrupt:
        code, message = 130, "interrupted; nothing half-written is visible (the next command cleans up temp files)"
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(0)
    except PermissionError as exc:
        code, message = 1, f"permission denied: {exc.filename} (run as root, or use a store you own with --root)"
    except OSError as exc:
        import errno

        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            from .durable import no_space

            err = no_space(exc.filename or state.root or ".", exc)
            code, message = err.exit_code, str(err)
        elif os.environ.get("IMGSTORE_DEBUG"):
            raise
        else:
            where = f": {os.fsdecode(exc.filename)}" if exc.filename else ""
            code, message = 1, f"{exc.strerror or exc}{where} (re-run with IMGSTORE_DEBUG=1 for a traceback)"
    except Exception as exc:  # noqa: BLE001
        # Typer may bundle its own copy of click, so match click's exceptions by shape, not by class.
        if type(exc).__name__ == "Exit" and isinstance(getattr(exc, "exit_code", None), int):
            code = getattr(exc, "exit_code")  # noqa: B009  typer.Exit(n) from a command
        elif (full := _database_full(exc)) is not None:
            code, message = full.exit_code, str(full)
        elif type(exc).__name__ == "Abort":
            code, message = 130, "aborted"
        elif type(exc).__name__ == "NoArgsIsHelpError":
            getattr(exc, "show")()  # noqa: B009  `imgstore` or `imgstore node` alone: the help on stderr, exit 2
            sys.exit(2)
        elif hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int):
            code, message = getattr(exc, "exit_code"), _click_message(exc)  # noqa: B009
        elif os.environ.get("IMGSTORE_DEBUG"):
            raise
        else:
            code, message = 1, (f"unexpected {type(exc).__name__}: {exc} (re-run with IMGSTORE_DEBUG=1 for a "
                                "traceback and report it)")
    if code == 130 and not message and state.interrupted:
        code, message = 130, "interrupted; nothing half-written is visible (the next command cleans up temp files)"
    _audit(code, message)
    if message:
        _fail(message, code)
    sys.exit(code)


def _click_message(exc: Exception) -> str:
    """click's own error (unknown option or command, missing argument, bad value) as one line; for a usage
    error, naming the help of the command the user typed."""
    text = shown(os.fsencode(str(getattr(exc, "format_message")())))  # noqa: B009  one line, whatever was typed
    if not any(c.__name__ == "UsageError" for c in type(exc).__mro__):
        return text
    ctx, names = getattr(exc, "ctx", None), []
    if ctx is None:  # some parse errors (an option's missing value) come without the command's context
        names = _typed_command(sys.argv[1:])
    while ctx is not None and ctx.parent is not None:
        names.insert(0, ctx.info_name)
        ctx = ctx.parent
    return f"{text.removesuffix('.')}; see '{' '.join(['imgstore', *names])} --help'"


def _typed_command(args: list[str]) -> list[str]:
    """The command and subcommand names at the start of a command line (`node add`), skipping options and
    their values."""
    import typer

    from .cli import app

    cmd: Any = typer.main.get_command(app)
    names: list[str] = []
    words = iter(args)
    for word in words:
        if word == "--":
            break
        if word.startswith("-"):
            opt = next((p for p in cmd.params if word in (*p.opts, *getattr(p, "secondary_opts", ()))), None)
            if opt is not None and not getattr(opt, "is_flag", False) and not getattr(opt, "count", False):
                next(words, None)  # its value
            continue
        sub = getattr(cmd, "commands", {}).get(word)
        if sub is None:
            break
        names.append(word)
        cmd = sub
    return names


def _database_full(exc: Exception) -> ImgstoreError | None:
    """A database write that failed for lack of space, wherever it happened."""
    if state.store is None or type(exc).__module__.split(".")[0] not in ("sqlite3", "sqlalchemy"):
        return None
    from . import db

    try:
        return db.is_disk_full(state.store.engine, str(getattr(exc, "orig", exc)))
    except Exception:  # noqa: BLE001
        return None


def _audit(code: int, message: str) -> None:
    """One event per command that changes something, whether it worked or not."""
    from . import audit

    name = audit.command_name(sys.argv[1:])
    if state.store is None or name not in audit.MUTATING or "--dry-run" in sys.argv:
        return
    if code in (UsageError.exit_code, NotFound.exit_code, ConfigError.exit_code, Conflict.exit_code):
        return  # bad input changes nothing on disk, not even the log; failures of the work itself are kept
    try:
        with state.store.engine.begin() as conn:
            audit.record(conn, name, "ok" if code == 0 else f"error {code}", message)
    except Exception:  # noqa: BLE001  the audit trail must never turn a result into a failure
        pass


def _fail(message: str, code: int) -> None:
    print(f"imgstore: error: {message}", file=sys.stderr)
    sys.exit(code)
