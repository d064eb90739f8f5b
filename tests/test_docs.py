"""The documentation site: it builds with mkdocs --strict, it documents every command and profile key, every
command's --help carries an example, and shell completion works."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
OPTIONAL_CLI = ("cli_day2", "cli_watch")


def command_tree() -> Any:
    """The click command behind `imgstore`, with every module that registers commands loaded, as run() does."""
    import typer

    from imgstore.cli import app

    importlib.import_module("imgstore.cli_deploy")
    for mod in OPTIONAL_CLI:
        try:
            importlib.import_module(f"imgstore.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"imgstore.{mod}":
                raise
    return typer.main.get_command(app)


def walk(cmd: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every visible command below cmd, groups included, as (name path, command)."""
    # Typer may bring its own copy of click, so a group is recognised by having subcommands, not by class.
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        if getattr(sub, "hidden", False):
            continue
        yield (*path, name), sub
        yield from walk(sub, (*path, name))


def is_group(cmd: Any) -> bool:
    return hasattr(cmd, "commands")


def command_pages() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("commands*.md"))}


def documented(name: str, text: str) -> bool:
    """True if a heading of the page names `imgstore NAME` (not merely a longer command that starts like it)."""
    rx = re.compile(r"imgstore " + re.escape(name) + r"(?![\w-])")
    return any(line.startswith("#") and rx.search(line) for line in text.splitlines())


def test_documented_matches_headings_only() -> None:
    page = "# Commands\n\n## `imgstore node add`\n\nimgstore verify is mentioned here.\n### imgstore export-all\n"
    assert documented("node add", page)
    assert documented("node", page)
    assert not documented("verify", page)  # only in prose
    assert not documented("export", page)  # a longer name is not the command
    assert not documented("node ad", page)


def test_every_command_is_documented() -> None:
    pages = command_pages()
    assert "commands.md" in pages
    names = [" ".join(path) for path, _ in walk(command_tree())]
    for expected in ("commit", "rollout", "rollback", "node add", "profile show"):
        assert expected in names  # the walk really sees the tree, subcommands included
    missing = [n for n in names if not any(documented(n, text) for text in pages.values())]
    assert not missing, (
        f"commands without a heading naming `imgstore <command>` in docs/{', docs/'.join(pages)}: {missing}"
    )


def test_every_command_help_has_an_example() -> None:
    from typer.testing import CliRunner

    from imgstore.cli import app

    tree = command_tree()
    runner = CliRunner()
    lacking = []
    leaves = [path for path, cmd in walk(tree) if not is_group(cmd)]
    assert len(leaves) >= 20
    for path in leaves:
        r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0, (path, r.output)
        assert "Usage" in r.output, (path, r.output)
        if "Example" not in r.output:
            lacking.append(" ".join(path))
    assert not lacking, f"--help without an example: {lacking}"


def test_every_exit_code_has_a_troubleshooting_section() -> None:
    from imgstore.errors import EXIT_CODES

    text = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    headings = [line for line in text.splitlines() if line.startswith("## Exit code")]
    missing = [code for code, _name, _ in EXIT_CODES if code and not any(f"Exit code {code}:" in h for h in headings)]
    assert not missing, f"docs/troubleshooting.md has no '## Exit code N:' section for {missing}"


def test_every_profile_key_is_documented() -> None:
    from imgstore.profiles import APPEND_FIELDS, SCHEMA

    text = (DOCS / "profiles.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    missing = [f"{table}.{key}".lstrip(".") for table, keys in SCHEMA.items() for key in keys
               if not any(line.startswith(f"| `{key}` |") for line in rows)]
    missing += [f"{{{f}}}" for f in APPEND_FIELDS if not any(line.startswith(f"| `{{{f}}}` |") for line in rows)]
    assert not missing, f"docs/profiles.md has no table row for {missing}"


def need_mkdocs() -> None:
    """mkdocs (and PyYAML, which it brings) may be missing on a developer's machine; as root (CI) it must be there."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("yaml") is None:
        if os.geteuid() != 0:
            pytest.skip("mkdocs is not installed (pip install -e '.[test]')")
        pytest.fail("mkdocs is not installed: pip install -e '.[test]' (it is in the test extra)")


def nav_pages() -> list[str]:
    import yaml

    return list(_nav_pages(yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]))


def _nav_pages(nav: Any) -> Iterator[str]:
    if isinstance(nav, str):
        yield nav
    elif isinstance(nav, list):
        for item in nav:
            yield from _nav_pages(item)
    elif isinstance(nav, dict):
        for v in nav.values():
            yield from _nav_pages(v)


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    need_mkdocs()
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", os.fspath(REPO / "mkdocs.yml"),
                        "-d", os.fspath(site)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for page in nav_pages():
        built = site / ("index.html" if page == "index.md" else f"{page.removesuffix('.md')}/index.html")
        assert built.is_file(), f"{page} was not built"
    html = (site / "commands" / "index.html").read_text(encoding="utf-8")
    assert "imgstore rollout" in html and "imgstore node export-dnsmasq" in html


def test_every_docs_page_is_in_the_nav() -> None:
    """A page missing from mkdocs.yml's nav builds, but no one finds it: add new pages to the nav."""
    need_mkdocs()
    nav = set(nav_pages())
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages - nav == set(), f"docs pages not in the nav of mkdocs.yml: {sorted(pages - nav)}"


# -- shell completion ---------------------------------------------------------------------------------
def imgstore_exe(tmp_path: Path) -> Path:
    """The `imgstore` console script of this interpreter; completion is keyed on that program name."""
    exe = Path(sys.executable).with_name("imgstore")
    if exe.is_file():
        return exe
    # Not installed as a script next to this Python: the same entry point pip would generate.
    wrapper = tmp_path / "bin" / "imgstore"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!{sys.executable}\nfrom imgstore.__main__ import main\nmain()\n")
    wrapper.chmod(0o755)
    return wrapper


def completion_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("_IMGSTORE", "COMP_"))}
    env["IMGSTORE_ROOT"] = os.fspath(tmp_path / "no-store")  # completion must not need a store
    env.update(extra)
    return env


def test_show_completion_prints_a_bash_script(tmp_path: Path) -> None:
    r = subprocess.run([imgstore_exe(tmp_path), "--show-completion", "bash"], capture_output=True, text=True,
                       env=completion_env(tmp_path, _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1"), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "_IMGSTORE_COMPLETE=complete_bash" in r.stdout
    assert re.search(r"^complete .*-F _imgstore_completion imgstore$", r.stdout, re.M), r.stdout
    check = subprocess.run(["bash", "-n"], input=r.stdout, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize(("words", "cword", "want", "not_want"), [
    ("imgstore roll", "1", {"rollout", "rollback"}, {"commit", "node"}),
    ("imgstore node ex", "2", {"export-dhcpd", "export-dnsmasq"}, {"add", "import-dhcpd"}),
    ("imgstore rollout --ca", "2", {"--canary"}, {"--profile"}),
])
def test_completion_offers_matching_commands(tmp_path: Path, words: str, cword: str, want: set[str],
                                             not_want: set[str]) -> None:
    r = subprocess.run([imgstore_exe(tmp_path)], capture_output=True, text=True, timeout=60,
                       env=completion_env(tmp_path, _IMGSTORE_COMPLETE="complete_bash", COMP_WORDS=words,
                                          COMP_CWORD=cword))
    assert r.returncode == 0, r.stderr
    offered = set(r.stdout.split())
    assert want <= offered, (words, r.stdout)
    assert not offered & not_want, (words, r.stdout)
