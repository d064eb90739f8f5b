"""The typer-free path for `commit` and `materialize` (imgstore/cli_fast.py): whatever it accepts, click parses to
the same values; what it does not accept goes to typer; both ways print and exit alike."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
import typer
from conftest import Cli
from hypothesis import given, settings
from hypothesis import strategies as st

from imgstore import cli_fast
from imgstore.cli import app
from imgstore.cli_run import load_commands


def _click() -> Any:
    load_commands()
    return typer.main.get_command(app)


def _click_parse(args: list[str]) -> tuple[Path | None, str, dict[str, Any]]:
    """The root, command name and parameters click gets from a command line (defaults included)."""
    group = _click()
    ctx = group.make_context("imgstore", list(args))
    protected = getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])  # typer's click, click
    name, sub, rest = group.resolve_command(ctx, [*protected, *ctx.args])
    params = sub.make_context(name, rest, parent=ctx).params
    root = ctx.params["root"]
    return (Path(root) if root is not None else None), name, params


def _same(fast: cli_fast.Parsed, click: tuple[Path | None, str, dict[str, Any]]) -> None:
    root, name, params = click
    assert cli_fast.COMMANDS[name] is fast.command
    assert fast.root == root
    defaults = {p.name: p.default for p in inspect.signature(fast.command.run).parameters.values()
                if p.default is not inspect.Parameter.empty}
    values = {**defaults, **fast.kwargs}
    assert set(values) == set(params)
    for key, value in params.items():
        expected = Path(value) if isinstance(values[key], Path) else value
        assert values[key] == expected, (key, values[key], value)


def test_the_fast_commands_have_the_options_and_defaults_of_the_typer_ones() -> None:
    group = _click()
    root_opts = next(p for p in group.params if p.name == "root")
    assert set(root_opts.opts) == set(cli_fast.ROOT_OPTIONS) and root_opts.envvar == "IMGSTORE_ROOT"
    for name, command in cli_fast.COMMANDS.items():
        sub = group.commands[name]
        signature = inspect.signature(command.run).parameters
        options = {o: p for p in sub.params if p.param_type_name == "option" for o in p.opts}
        arguments = [p for p in sub.params if p.param_type_name == "argument"]
        assert set(command.options) <= set(options), name  # anything else goes to typer
        for opt, (dest, kind) in command.options.items():
            assert options[opt].name == dest and options[opt].is_flag == (kind is bool), (name, opt)
        assert [a.name for a in arguments] == [dest for dest, _ in command.arguments], name
        assert sum(a.required for a in arguments) == command.required, name
        assert [p.name for p in sub.params if p.name != "help"] == list(signature), name
        for p in sub.params:
            if p.name in signature and signature[p.name].default is not inspect.Parameter.empty:
                assert signature[p.name].default == p.default, (name, p.name)


PLAIN_LINES = [
    ["commit"],
    ["commit", "/srv/chroots/web"],
    ["--root", "/var/lib/x", "commit", "/srv/web", "--profile", "web", "-m", "php update"],
    ["-R", "store", "--root=other", "commit", "-p", "hadoop", "--message=a=b", "/c", "--no-kernel", "--json"],
    ["commit", "--kernel", "/boot/vmlinuz", "--initrd", "/boot/initrd.img", "--no-wait", "chroot dir"],
    ["commit", "-m", "first", "-m", "second", "-p", "a", "--profile", "b"],
    ["materialize", "web@42"],
    ["--root", "s", "materialize", "--json", "bench@latest", "--no-wait"],
]

TYPERS_LINES = [
    [], ["--version"], ["commit", "--help"], ["--help"], ["commit", "-m"], ["commit", "-m", "-x"],
    ["commit", "-mfoo"], ["commit", "-m=x"], ["commit", "a", "b"], ["commit", "--", "a"], ["commit", "-"],
    ["commit", "--jsn"], ["commit", "--json=1"], ["commit", "--prof", "web"], ["materialize"],
    ["materialize", "a", "b"], ["--root"], ["--root", "", "commit"], ["-Rstore", "commit"], ["commit", ""],
    ["commit", "caf\udce9"], ["rollout"], ["status", "commit"], ["node", "add", "commit"],
]


@pytest.mark.parametrize("args", PLAIN_LINES, ids=" ".join)
def test_a_plain_line_parses_as_click_parses_it(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMGSTORE_ROOT", raising=False)
    fast = cli_fast.parse(args)
    assert fast is not None
    _same(fast, _click_parse(args))


@pytest.mark.parametrize("args", TYPERS_LINES, ids=" ".join)
def test_anything_else_is_left_to_typer(args: list[str]) -> None:
    assert cli_fast.parse(args) is None


@pytest.mark.parametrize("env", ["", "/from/env"])
def test_the_root_comes_from_the_environment_as_with_click(env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGSTORE_ROOT", env)
    for args in (["commit", "x"], ["--root", "given", "materialize", "web@1"]):
        fast = cli_fast.parse(args)
        assert fast is not None
        _same(fast, _click_parse(args))


WORDS = ["commit", "materialize", "--root", "-R", "--root=r", "-p", "--profile", "-m", "--message", "--message=x",
         "--kernel", "--initrd", "--no-kernel", "--no-wait", "--json", "--json=1", "--help", "--", "-", "", "-x",
         "web", "web@1", "a b", "/srv/chroot", "x=y", "-mfoo", "--kern", "-m=x", "-p=web"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(WORDS), max_size=8))
def test_whatever_the_fast_parser_accepts_click_parses_the_same(args: list[str]) -> None:
    with patch.dict(os.environ):
        os.environ.pop("IMGSTORE_ROOT", None)
        fast = cli_fast.parse(args)
        if fast is not None:
            _same(fast, _click_parse(args))


def _typer_way(cli: Cli, *args: str | os.PathLike[str], root: Path) -> subprocess.CompletedProcess[str]:
    """The same command line, parsed and run by typer (what `imgstore serve` and every other command do)."""
    code = "import sys; from imgstore.cli_run import run; sys.argv[0] = 'imgstore'; run()"
    return cli("-c", code, *args, root=root, python_args=True)


def test_both_ways_print_the_same_and_exit_with_the_same_code(tmp_path: Path, cli: Cli) -> None:
    tree = tmp_path / "chroot"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("web\n")
    stores = {"fast": tmp_path / "a", "typer": tmp_path / "b"}
    for root in stores.values():
        assert cli("init", root=root).returncode == 0
    lines: list[list[str | os.PathLike[str]]] = [
        ["commit", tree, "-p", "nosuch"], ["commit", tmp_path / "missing", "--no-kernel"],
        ["commit", tree, "--no-kernel", "-m", "first"], ["commit", tree, "--no-kernel"],
        ["materialize", "web@9"], ["materialize", "web@1"], ["materialize", "web@1", "--json"], ["commit"],
        ["commit", tree, "--json"], ["commit", tree, "--no-kernel", "--json", "-p", "hadoop"],
    ]
    for args in lines:
        assert cli_fast.parse([os.fspath(a) for a in args]) is not None, args
        out = {}
        for way, root in stores.items():
            r = (cli(*args, root=root) if way == "fast" else _typer_way(cli, *args, root=root))
            text = re.sub(r"\d+\.\d+ s\b", "T s", (r.stdout + r.stderr).replace(os.fspath(root), "STORE"))
            if "--json" in args and r.returncode == 0:
                text = str(sorted(json.loads(r.stdout)))
            out[way] = (r.returncode, text)
        assert out["fast"] == out["typer"], args
        assert out["fast"][0] in (0, 2, 3, 4), (args, out)


def test_a_plain_commit_or_materialize_imports_only_what_it_needs(tmp_path: Path, cli: Cli) -> None:
    tree = tmp_path / "chroot"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("web\n")
    assert cli("init").returncode == 0
    lines = (["commit", tree, "--no-kernel"], ["materialize", "web@1"], ["commit", tree, "--no-kernel", "-m", "-x"],
             ["commit", tree, "--no-kernel"])
    imported = []
    for n, args in enumerate(lines):
        if n == 2:
            time.sleep(1.1)  # the file is no longer racily new (statcache.MARGIN_NS): the no-op trusts its cache
        r = cli("-X", "importtime", "-m", "imgstore", *args, python_args=True)
        assert r.returncode == 0, r.stderr
        lines_ = r.stderr.splitlines()
        imported.append({line.split("|")[-1].strip() for line in lines_ if line.startswith("import time")})
    assert ["typer" in m for m in imported] == [False, False, True, False]  # "-x" as a value: typer's to parse
    # Only a commit that reads files starts the reading threads; an unchanged tree's does not even import them.
    assert ["concurrent.futures" in m for m in imported[:2] + imported[3:]] == [True, False, False]
    # Nor dataclasses (with inspect): its import and generated methods cost every command 0.01 s.
    assert not any("dataclasses" in m or "inspect" in m for m in imported[:2] + imported[3:])
