"""The command line end to end, and bad input for every command: one line, documented code, nothing changed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import Cli, disk_state, write_profile

from imgstore import generations
from imgstore.errors import EXIT_CODES, NotFound
from imgstore.store import FORMAT, Store


def _sample(tmp_path: Path) -> Path:
    tree = tmp_path / "chroot"
    (tree / "etc").mkdir(parents=True)
    (tree / "boot").mkdir()
    (tree / "etc/fstab").write_text("proc /proc proc defaults 0 0\n")
    (tree / "boot/vmlinuz-6.1.0-28-amd64").write_bytes(b"K" * 5000)
    (tree / "boot/initrd.img-6.1.0-28-amd64").write_bytes(b"I" * 3000)
    return tree


@pytest.fixture
def ready(tmp_path: Path, cli: Cli) -> Path:
    assert cli("init").returncode == 0
    tree = _sample(tmp_path)
    r = cli("commit", tree, "--profile", "web", "-m", "first")
    assert r.returncode == 0, r.stderr
    return tree


def test_everyday_commands(ready: Path, tmp_path: Path, cli: Cli) -> None:
    tree = ready
    r = cli("commit", tree, "-p", "web", "-m", "again")
    assert r.returncode == 0 and "nothing changed" in r.stdout
    (tree / "etc/motd").write_text("hello\n")
    r = cli("commit", tree, "-p", "web", "-m", "motd", "--json")
    assert r.returncode == 0
    res = json.loads(r.stdout)
    assert res["created"] and res["generation"]["ref"] == "web@2"
    gens = json.loads(cli("generations", "--json").stdout)
    assert [g["ref"] for g in gens] == ["web@1", "web@2"]
    assert gens[1]["kernel_name"] == "vmlinuz-6.1.0-28-amd64" and gens[1]["meta"]["kernel_version"] == "6.1.0-28-amd64"
    out = cli("generations", "-p", "web").stdout
    assert "web@2" in out and "motd" in out
    for ref in ("2", "web@2", "web@latest", gens[1]["gen_id"][:10]):
        shown = json.loads(cli("show", ref, "--json").stdout)
        assert shown["number"] == 2, ref
    assert json.loads(cli("show", "web@-1", "--json").stdout)["number"] == 1
    assert cli("cat", "web@2", "/etc/motd").stdout == "hello\n"
    assert "motd" not in cli("ls", "web@1", "/etc").stdout
    assert "motd" in cli("ls", "web@2", "/etc").stdout
    listing = json.loads(cli("ls", "web@2", "/etc", "--json").stdout)
    assert {x["path"] for x in listing} == {"etc/fstab", "etc/motd"}
    r = cli("checkout", "web@1", tmp_path / "co")
    assert r.returncode == 0 and (tmp_path / "co/etc/fstab").exists() and not (tmp_path / "co/etc/motd").exists()
    assert cli("verify").returncode == 0
    assert "web" in cli("profile", "list").stdout
    assert json.loads(cli("profile", "show", "web", "--json").stdout)["name"] == "web"


def test_help_shows_default_excludes_and_examples(cli: Cli) -> None:
    r = cli("commit", "--help")
    assert "/var/cache/apt/archives/*.deb" in r.stdout and "Example:" in r.stdout


def test_version_fast_path(cli: Cli) -> None:
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("imgstore ")


def _assert_clean_failure(r: object, code: int, *words: str) -> None:
    rc, err = r.returncode, r.stderr  # type: ignore[attr-defined]
    assert rc == code, (rc, err)
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    for w in words:
        assert w in err, (w, err)


def test_no_store(tmp_path: Path, cli: Cli) -> None:
    _assert_clean_failure(cli("generations"), 5, "no imgstore store", "imgstore --root")
    _assert_clean_failure(cli("commit", tmp_path, "-p", "web"), 5, "init")
    assert not (tmp_path / "store").exists()


def test_bad_input_changes_nothing(ready: Path, tmp_path: Path, cli: Cli) -> None:
    store = tmp_path / "store"
    before = disk_state(store)
    afile = tmp_path / "a-file"
    afile.write_text("x")
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "x").write_text("x")
    cases = [
        (("commit", tmp_path / "missing", "-p", "web"), 3, ["does not exist"]),
        (("commit", afile, "-p", "web"), 2, ["not a directory"]),
        (("commit", ready, "-p", "nosuch"), 3, ["profile 'nosuch'"]),
        (("commit", ready, "-p", "web", "--kernel", tmp_path / "nokernel"), 3, ["--kernel"]),
        (("show", "web@99"), 3, ["no generation 'web@99'", "closest"]),
        (("show", "nosuch@1"), 3, ["no generation"]),
        (("show", "ffffffffff"), 3, ["no generation"]),
        (("cat", "web@1", "/etc/nope"), 3, ["not in web@1"]),
        (("cat", "web@1", "/etc"), 2, ["not a regular file"]),
        (("ls", "web@1", "/../etc"), 2, [".."]),
        (("checkout", "web@1", nonempty), 8, ["not empty"]),
        (("checkout", "web@1", afile), 8, ["not a directory"]),
        (("checkout", "web@7", tmp_path / "new"), 3, ["no generation"]),
        (("generations", "-p", "nosuch"), 3, ["profile"]),
        (("profile", "show", "nosuch"), 3, ["profile"]),
        (("init",), 5, ["already exists"]),
    ]
    for args, code, words in cases:
        _assert_clean_failure(cli(*args), code, *words)
    assert not (tmp_path / "new").exists()
    assert disk_state(store) == before


def test_kernel_required_unless_no_kernel(tmp_path: Path, cli: Cli) -> None:
    assert cli("init").returncode == 0
    tree = tmp_path / "nokernel"
    (tree / "etc").mkdir(parents=True)
    before = disk_state(tmp_path / "store")
    _assert_clean_failure(cli("commit", tree, "-p", "web"), 3, "no kernel", "--no-kernel")
    assert disk_state(tmp_path / "store") == before
    assert cli("commit", tree, "-p", "web", "--no-kernel").returncode == 0
    k = tmp_path / "vmlinuz"
    k.write_bytes(b"kernel")
    r = cli("commit", tree, "-p", "web", "--kernel", k, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["generation"]["kernel_name"] == "vmlinuz"


@pytest.mark.parametrize(
    "body, words",
    [
        ("[boot\nappend = 1", ["web.toml", "line"]),
        ("[boot]\nappend = 3\n", ["web.toml:2", "boot.append", "must be a str"]),
        ("[deploy]\nserve_defualt = true\n", ["web.toml:2", "deploy.serve_defualt", "serve_default"]),
        ("[commit]\nexclude = ['relative/path']\n", ["commit.exclude", "/"]),
        ("[boot]\nappend = 'root={nope}'\n", ["boot.append", "nope"]),
        ("[boot]\nroot_mode = 'ramdisk'\n", ["boot.root_mode"]),
    ],
)
def test_broken_profile(ready: Path, tmp_path: Path, cli: Cli, body: str, words: list[str]) -> None:
    write_profile(tmp_path / "store", "web", body)
    before = disk_state(tmp_path / "store")
    _assert_clean_failure(cli("commit", ready, "-p", "web"), 4, *words)
    assert disk_state(tmp_path / "store") == before


def test_newer_store_format_and_newer_database_refused(ready: Path, tmp_path: Path, cli: Cli) -> None:
    cfg = tmp_path / "store/imgstore.toml"
    text = cfg.read_text()
    cfg.write_text(text.replace(f"format = {FORMAT}", "format = 99"))
    _assert_clean_failure(cli("generations"), 5, "format 99", "upgrade imgstore")
    cfg.write_text(text)
    import sqlite3

    conn = sqlite3.connect(tmp_path / "store/imgstore.db")
    conn.execute("UPDATE alembic_version SET version_num = '9999'")
    conn.commit()
    conn.close()
    _assert_clean_failure(cli("generations"), 5, "newer imgstore", "9999")


def test_corrupt_or_deleted_database(ready: Path, tmp_path: Path, cli: Cli) -> None:
    db = tmp_path / "store/imgstore.db"
    for p in db.parent.glob("imgstore.db-*"):
        p.unlink()
    saved = db.read_bytes()
    db.write_bytes(b"\x00garbage" * 1000)
    _assert_clean_failure(cli("generations"), 5, "database")
    db.unlink()
    _assert_clean_failure(cli("generations"), 5, "missing")
    db.write_bytes(saved)
    assert cli("generations").returncode == 0


def test_exit_codes_documented() -> None:
    doc = (Path(__file__).parent.parent / "docs/exit-codes.md").read_text()
    for code, name, _ in EXIT_CODES:
        assert f"| {code} |" in doc and name in doc, code


def test_ambiguous_number_without_profile(ready: Path, tmp_path: Path, cli: Cli) -> None:
    write_profile(tmp_path / "store", "other", "[commit]\nrequire_kernel = false\n")
    assert cli("commit", ready, "-p", "other", "--no-kernel").returncode == 0
    _assert_clean_failure(cli("show", "1"), 2, "needs a profile")
    assert json.loads(cli("show", "1", "-p", "other", "--json").stdout)["profile"] == "other"
    _ = os


def test_an_id_prefix_of_digits_only_is_a_number_first_then_an_id(store: Store) -> None:
    """Ten characters of an id can all be digits (about 1 in 110 ids): `show 3141592653` must still find it."""
    def add(gen_id: str) -> generations.Generation:
        with store.engine.begin() as conn:
            return generations.add(
                conn, profile="web", gen_id=gen_id, manifest="0" * 64, kernel=None, kernel_name=None, initrd=None,
                initrd_name=None, append="", created=0.0, message="", user="u", host="h", source="s", files=0,
                size=0, new_bytes=0, meta={})

    first = add("3141592653" + "a" * 54)
    second = add("2" * 64)
    with store.engine.connect() as conn:
        assert generations.resolve(conn, "3141592653") == first  # there is no web@3141592653
        assert generations.resolve(conn, "2") == second and generations.resolve(conn, "1") == first  # numbers
        assert generations.resolve(conn, "2222") == second  # no web@2222: an id prefix
        with pytest.raises(NotFound):
            generations.resolve(conn, "web@2222")  # with a profile it is a number only
        with pytest.raises(NotFound):
            generations.resolve(conn, "9999")


USAGE_ERRORS: list[tuple[tuple[str, ...], list[str]]] = [
    # unknown option: of the program, of a command, of a subcommand
    (("--bogus",), ["No such option: --bogus", "see 'imgstore --help'"]),
    (("commit", "--bogus"), ["No such option: --bogus", "see 'imgstore commit --help'"]),
    (("node", "add", "www9", "--colour"), ["No such option: --colour", "see 'imgstore node add --help'"]),
    (("generations", "--json=yes"), ["'--json' does not take a value", "see 'imgstore generations --help'"]),
    # missing argument, and an option without its value (click gives no context for that one)
    (("show",), ["Missing argument 'ref'", "see 'imgstore show --help'"]),
    (("profile", "show"), ["Missing argument 'name'", "see 'imgstore profile show --help'"]),
    (("-R", "somewhere", "commit", "-p"), ["'-p' requires an argument", "see 'imgstore commit --help'"]),
    (("--root",), ["'--root' requires an argument", "see 'imgstore --help'"]),
    (("profile", "show", "web", "extra"), ["unexpected extra argument", "see 'imgstore profile show --help'"]),
    # bad option value
    (("gc", "--keep", "many"), ["Invalid value for '--keep'", "see 'imgstore gc --help'"]),
    (("log", "--limit", "x"), ["Invalid value for '--limit'", "see 'imgstore log --help'"]),
    # unknown command, and unknown subcommand
    (("comit",), ["No such command 'comit'", "see 'imgstore --help'"]),
    (("node", "ad"), ["No such command 'ad'", "see 'imgstore node --help'"]),
    # what was typed cannot add a line
    (("--bo\ngus",), ["No such option: --bo\\x0agus", "see 'imgstore --help'"]),
]


def test_usage_errors_are_one_line_and_change_nothing(ready: Path, tmp_path: Path, cli: Cli) -> None:
    """click's own errors (unknown option or command, missing argument, bad value): one line naming the
    help of the command as typed, exit code 2, no usage box, nothing written."""
    store = tmp_path / "store"
    before = disk_state(store)
    for args, words in USAGE_ERRORS:
        r = cli(*args)
        _assert_clean_failure(r, 2, "imgstore: error: ", *words)
        assert r.stderr.startswith("imgstore: error: ") and r.stderr.endswith(" --help'\n"), (args, r.stderr)
        assert "Usage:" not in r.stderr and r.stdout == "", (args, r.stderr)
    assert disk_state(store) == before


def test_help_without_a_command(cli: Cli) -> None:
    r = cli("--help")
    assert r.returncode == 0 and "Commands" in r.stdout and r.stderr == ""
    for args in ((), ("node",), ("profile",)):
        r = cli(*args)
        assert r.returncode == 2 and "Commands" in r.stderr and "imgstore: error" not in r.stderr, args
    r = cli("commit", "--help")
    assert r.returncode == 0 and "Usage:" in r.stdout
