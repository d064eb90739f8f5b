"""The hot commands without typer: `commit` and `materialize`, the two an operator runs after every change
and that the speed targets time as whole processes.

Importing typer and building its click command costs a command about 0.04 s of its 0.15 s (docs/benchmarks.md).
So `parse` reads a plain command line of these two commands itself, and the body runs as it does under typer:
the typer commands in cli.py and cli_deploy.py call the same functions here. Anything `parse` is not sure
about (--help, an unknown or abbreviated option, a value that starts with "-", an empty value, a missing or
extra argument, "--") gives None, and typer parses the line instead, with its usual help and errors.
tests/test_cli_fast.py checks that whatever `parse` accepts, click parses to the same values.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from .cli_common import emit_json, human_bytes, open_store, progress_bar, report_skipped, state


def commit(chroot: Path | None = None, profile: str = "web", message: str = "", kernel: Path | None = None,
           initrd: Path | None = None, no_kernel: bool = False, no_wait: bool = False,
           json_out: bool = False) -> None:
    from . import commit as commit_mod
    from .errors import UsageError

    store = open_store()
    if chroot is None:
        chroot = store.profile(profile).chroot
        if chroot is None:
            raise UsageError(f"profile {profile} sets no commit.chroot", "give the chroot path as an argument")
    with progress_bar("commit") as bar:
        res = commit_mod.commit(store, chroot, profile, message, kernel, initrd, no_kernel, bar, wait=not no_wait)
    from . import audit

    g = res.generation
    audit.note(profile=g.profile, generation=g.ref,
               detail=f"{'created' if res.created else 'unchanged'} {g.ref} {g.gen_id[:12]} from {chroot}")
    if json_out:
        emit_json(res)
        return
    report_skipped(res)
    if not res.created:
        print(f"nothing changed: {chroot} is identical to {g.ref} ({g.short}); no generation created")
        return
    print(
        f"committed {g.ref} {g.short}: {res.entries:,} entries, {res.files:,} files, {human_bytes(res.bytes)}; "
        f"read {res.read_files:,} files, stored {human_bytes(g.new_bytes)} new, in {res.seconds:.2f} s"
    )
    if g.kernel is None:
        print("note: this generation has no kernel (committed with --no-kernel)")


def materialize(gen: str, no_wait: bool = False, json_out: bool = False) -> None:
    import time

    from . import audit, generations
    from .locking import store_lock
    from .materialize import discard_stale
    from .materialize import materialize as mat

    store = open_store()
    t0 = time.monotonic()
    with store_lock(store.root, "materialize", not no_wait):
        with store.engine.connect() as conn:
            g = generations.resolve(conn, gen)
        discard_stale(store)
        path, created = mat(store, g)
    audit.note(profile=g.profile, generation=g.ref, detail=os.fspath(path))
    if json_out:
        emit_json({"generation": g.ref, "path": path, "created": created, "seconds": time.monotonic() - t0})
    else:
        print(f"{g.ref} {'materialized at' if created else 'already materialized at'} {path}")


class Command(NamedTuple):
    run: Callable[..., None]
    options: dict[str, tuple[str, type]]  # "--message" and "-m" -> ("message", str); bool: a flag
    arguments: tuple[tuple[str, type], ...]  # positional parameters, in order
    required: int  # how many of them must be given


_WAIT_JSON = {"--no-wait": ("no_wait", bool), "--json": ("json_out", bool)}
COMMANDS = {
    "commit": Command(commit, {
        "--profile": ("profile", str), "-p": ("profile", str), "--message": ("message", str),
        "-m": ("message", str), "--kernel": ("kernel", Path), "--initrd": ("initrd", Path),
        "--no-kernel": ("no_kernel", bool), **_WAIT_JSON}, (("chroot", Path),), 0),
    "materialize": Command(materialize, dict(_WAIT_JSON), (("gen", str),), 1),
}
ROOT_OPTIONS = ("--root", "-R")


class Parsed(NamedTuple):
    command: Command
    root: Path | None
    kwargs: dict[str, Any]


def parse(args: list[str]) -> Parsed | None:
    """`[--root DIR] commit|materialize [options and arguments]`, or None for typer to parse."""
    root = os.environ.get("IMGSTORE_ROOT") or None  # click ignores an empty variable too
    words = iter(args)
    word = next(words, None)
    while word in ROOT_OPTIONS or (word or "").startswith("--root="):
        root = word.partition("=")[2] if word and "=" in word else next(words, None)
        if not _plain(root):
            return None
        word = next(words, None)
    command = COMMANDS.get(word or "")
    if command is None:
        return None
    kwargs: dict[str, Any] = {}
    given: list[str] = []
    for word in words:
        if not word.startswith("-"):
            if not _plain(word):
                return None
            given.append(word)
            continue
        name, eq, value = word.partition("=")
        if name not in command.options or (eq and not name.startswith("--")):
            return None  # --help, --, -, unknown, -mVALUE, -m=VALUE: typer's to parse
        dest, kind = command.options[name]
        if kind is bool:
            if eq:
                return None
            kwargs[dest] = True
            continue
        found = value if eq else next(words, None)
        if not _plain(found):
            return None
        kwargs[dest] = kind(found)
    if not command.required <= len(given) <= len(command.arguments):
        return None
    for (dest, kind), value in zip(command.arguments, given, strict=False):
        kwargs[dest] = kind(value)
    return Parsed(command, Path(root) if root else None, kwargs)


def _plain(value: str | None) -> bool:
    """A value click reads the same way: there, not empty, not option-like, valid UTF-8 (no surrogates)."""
    if not value or value.startswith("-"):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def run(args: list[str]) -> None:
    """Run a command line `parse` accepts (never returns), or return for typer to run it."""
    parsed = parse(args)
    if parsed is None:
        return
    from .cli_run import execute

    state.root = parsed.root
    execute(lambda: parsed.command.run(**parsed.kwargs))
