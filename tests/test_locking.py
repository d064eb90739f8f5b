"""The store lock under real concurrency: parallel writers serialise, a killed holder frees the lock, a waiter
names whom it waits for, `--no-wait` exits 7, and read-only commands never wait."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import Cli, disk_state
from test_deploy import PROFILE, _chroot

# A second profile sharing the TFTP root with web: it must neither serve the default nor share web's root link.
DB_PROFILE = PROFILE.replace('root_link = "netboot/root"', 'root_link = "netboot/db"').replace(
    "serve_default = true", "serve_default = false")

# Holds the real store lock (imgstore.locking) until killed; prints "locked" once it has it.
HOLD = """
import sys, time
from pathlib import Path
from imgstore.locking import store_lock
with store_lock(Path(sys.argv[1]), sys.argv[2]):
    print("locked", flush=True)
    time.sleep(3600)
"""

SINCE = re.compile(r"since \d{4}-\d\d-\d\d \d\d:\d\d")


def _env(store: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    e = dict(os.environ)
    e["IMGSTORE_ROOT"] = os.fspath(store)
    for k in ("IMGSTORE_FAULT", "IMGSTORE_LOCK_VERBOSE", "IMGSTORE_DEBUG"):
        e.pop(k, None)
    e.update(extra or {})
    return e


def _argv(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "imgstore", *(os.fspath(a) for a in args)]


def _spawn(store: Path, *args: str | os.PathLike[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(_argv(*args), env=_env(store, env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _read_until(fd: int, pattern: bytes, timeout: float) -> bytes:
    """Read from a pipe or pty until `pattern` (a regex) shows up; fail the test if it does not in time."""
    buf = b""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, buf):
        left = deadline - time.monotonic()
        assert left > 0, f"{pattern!r} did not appear within {timeout} s; got {buf!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # a pty whose other side closed
                chunk = b""
            assert chunk, f"stream ended before {pattern!r}; got {buf!r}"
            buf += chunk
    return buf


@contextmanager
def held_lock(store: Path, command: str = "holder test") -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen([sys.executable, "-c", HOLD, os.fspath(store), command], stdout=subprocess.PIPE,
                         env=_env(store))
    try:
        assert p.stdout is not None
        _read_until(p.stdout.fileno(), b"locked", 60)
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def _state(store: Path) -> dict[str, object]:
    """disk_state without the audit log: a refused command is rightly recorded there."""
    st = disk_state(store)
    dump = st.get("<database>")
    if isinstance(dump, list):
        st["<database>"] = [line for line in dump if not line.startswith('INSERT INTO "events"')]
    return st


def _ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, (r.args, r.returncode, r.stderr)
    return r


def _fleet(tmp_path: Path, cli: Cli, n: int = 3) -> Path:
    """web@1..n committed, nodes www1 and www3, web@1 rolled out."""
    _ok(cli("init"))
    store = tmp_path / "store"
    (store / "profiles/web.toml").write_text(PROFILE)
    tree = _chroot(tmp_path / "chroot", "")
    for i in range(1, n + 1):
        (tree / "etc/motd").write_text(f"gen {i}\n")
        _ok(cli("commit", tree, "-p", "web", "-m", f"gen {i}"))
    _ok(cli("node", "add", "www1", "--mac", "52:54:00:00:00:01", "--ip", "10.0.1.1", "-p", "web"))
    _ok(cli("node", "add", "www3", "--mac", "52:54:00:00:00:03", "--ip", "10.0.1.3", "-p", "web"))
    _ok(cli("rollout", "web@1"))
    return store


def _wait_all(procs: list[subprocess.Popen[bytes]], timeout: float = 600) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        o, e = p.communicate(timeout=timeout)
        out.append((p.returncode, o.decode(errors="replace"), e.decode(errors="replace")))
    return out


def _gens(cli: Cli, profile: str) -> list[dict[str, object]]:
    return json.loads(_ok(cli("generations", "-p", profile, "--json")).stdout)  # type: ignore[no-any-return]


def _booted(cfg: Path) -> str:
    return cfg.read_text().split("imgstore.gen=")[1].split()[0]


def _temps(root: Path) -> list[str]:
    return sorted(os.path.join(d, n) for d, ds, fs in os.walk(root) for n in ds + fs if n.startswith(".imgstore-tmp-"))


# -- parallel writers ---------------------------------------------------------------------------------
def test_parallel_commits_of_overlapping_trees(tmp_path: Path, cli: Cli) -> None:
    """4 processes, 2 profiles, 3 commits each, trees sharing most of their content."""
    _ok(cli("init"))
    store = tmp_path / "store"
    (store / "profiles/web.toml").write_text(PROFILE)
    (store / "profiles/db.toml").write_text(DB_PROFILE)
    shared_big = os.urandom(3 << 20)
    rounds = 3
    workers = []
    for i in range(4):
        tree = _chroot(tmp_path / f"chroot{i}", "")
        (tree / "usr/share/shared.bin").write_bytes(shared_big)
        doc = tree / "usr/share/doc"
        doc.mkdir()
        for k in range(300):  # small files: the pack path, the same in every tree
            (doc / f"f{k}").write_text(f"shared small file {k}\n" * (k % 7 + 1))
        (tree / "etc/unique").write_bytes(os.urandom(50_000))
        profile = ("web", "db")[i % 2]
        steps = " && ".join(
            f"echo {shlex.quote(f'tree {i} round {r}')} > {shlex.quote(os.fspath(tree / 'etc/motd'))} && "
            f"{shlex.join(_argv('commit', tree, '-p', profile, '-m', f'tree {i} round {r}'))}"
            for r in range(1, rounds + 1))
        workers.append(subprocess.Popen(["bash", "-c", steps], env=_env(store), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE))
    t0 = time.monotonic()
    results = _wait_all(workers)
    print(f"4 x {rounds} parallel commits: {time.monotonic() - t0:.1f} s")
    assert [r[0] for r in results] == [0, 0, 0, 0], results

    for profile in ("web", "db"):
        gens = _gens(cli, profile)
        assert [g["number"] for g in gens] == list(range(1, 2 * rounds + 1)), gens  # no gap, no duplicate
        assert len({g["gen_id"] for g in gens}) == len(gens)
        messages = sorted(str(g["message"]) for g in gens)
        trees = range(0, 4, 2) if profile == "web" else range(1, 4, 2)
        assert messages == sorted(f"tree {i} round {r}" for i in trees for r in range(1, rounds + 1))
        for g in gens:  # each generation holds exactly the tree its commit saw
            assert _ok(cli("cat", g["ref"], "/etc/motd")).stdout == f"{g['message']}\n"
    assert _ok(cli("verify")).returncode == 0
    # Deduplicated across the racing writers: the two big shared contents are stored once each.
    loose = [p for p in (store / "objects").rglob("*") if p.is_file()]
    assert len(loose) == 2, loose
    assert _temps(store) == []


@pytest.mark.slow
def test_gc_racing_commit_and_rollout(tmp_path: Path, cli: Cli) -> None:
    _ok(cli("init"))
    store = tmp_path / "store"
    (store / "profiles/web.toml").write_text(PROFILE)
    tree = _chroot(tmp_path / "chroot", "")
    blobs = {}
    for i in range(1, 5):
        (tree / "etc/motd").write_text(f"gen {i}\n")
        blobs[i] = os.urandom(2 << 20)  # a loose object only this generation has
        (tree / "etc/unique").write_bytes(blobs[i])
        (tree / "etc/small-unique").write_text(f"small {i}\n")  # and a packed one
        _ok(cli("commit", tree, "-p", "web", "-m", f"gen {i}"))
    _ok(cli("node", "add", "www1", "--mac", "52:54:00:00:00:01", "-p", "web"))
    _ok(cli("node", "add", "www2", "--mac", "52:54:00:00:00:02", "-p", "web"))
    _ok(cli("rollout", "web@2"))
    _ok(cli("pin", "www2", "web@1"))
    removed: list[str] = []
    for rnd in range(1, 4):
        latest = _gens(cli, "web")[-1]["number"]
        # The new commit brings back content of a generation gc is about to remove.
        (tree / "etc/motd").write_text(f"round {rnd}\n")
        (tree / "etc/unique").write_bytes(blobs[rnd + 1])
        (tree / "etc/small-unique").write_text(f"small {rnd + 1}\n")
        procs = [
            _spawn(store, "commit", tree, "-p", "web", "-m", f"round {rnd}"),
            _spawn(store, "rollout", f"web@{latest}"),
            _spawn(store, "gc", "--keep", "2", "--json"),
        ]
        results = _wait_all(procs)
        assert [r[0] for r in results] == [0, 0, 0], (rnd, results)
        removed += json.loads(results[2][1])["removed"]
        _ok(cli("verify"))
        _ok(cli("status"))
        new = _gens(cli, "web")[-1]
        assert new["message"] == f"round {rnd}"
        co = tmp_path / f"co{rnd}"
        _ok(cli("checkout", new["ref"], co))
        assert (co / "etc/unique").read_bytes() == blobs[rnd + 1]
        assert (co / "etc/small-unique").read_text() == f"small {rnd + 1}\n"
        assert (co / "etc/motd").read_text() == f"round {rnd}\n"
        # What the rollout made active is whole and booted.
        root = store / "netboot/root"
        assert (root / "etc/motd").read_text() == _ok(cli("cat", f"web@{latest}", "/etc/motd")).stdout
        pinned = store / "tftpboot/pxelinux.cfg/01-52-54-00-00-00-02"
        assert _booted(pinned) == json.loads(_ok(cli("show", "web@1", "--json")).stdout)["gen_id"]
        assert _temps(store) == []
    assert removed, "gc never had anything to remove: the race was not exercised"


def test_parallel_rollouts_and_pins_to_one_node(tmp_path: Path, cli: Cli) -> None:
    store = _fleet(tmp_path, cli, n=4)
    n = 2 * (os.cpu_count() or 2)
    procs = []
    for i in range(n):
        ops = []
        for k in range(3):
            g = (i + k) % 4 + 1
            ops.append(_argv("pin", "www1", f"web@{g}") if (i + k) % 2 else _argv("rollout", f"web@{g}"))
        procs.append(subprocess.Popen(["bash", "-c", " && ".join(shlex.join(o) for o in ops)], env=_env(store),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    t0 = time.monotonic()
    results = _wait_all(procs)
    print(f"{n} x 3 parallel rollouts/pins: {time.monotonic() - t0:.1f} s")
    assert all(r[0] == 0 for r in results), results
    st = json.loads(cli("status", "--json").stdout)
    assert st["drift"] == []
    assert _ok(cli("status")).returncode == 0
    node = json.loads(_ok(cli("node", "show", "www1", "--json")).stdout)
    cfg = store / "tftpboot/pxelinux.cfg/01-52-54-00-00-00-01"
    text = cfg.read_text()
    assert text.endswith("  IPAPPEND 3\n")  # complete, not cut
    assert _booted(cfg) == json.loads(_ok(cli("show", node["effective"], "--json")).stdout)["gen_id"]
    active = st["profiles"][[p["profile"] for p in st["profiles"]].index("web")]["active_id"]
    assert _booted(store / "tftpboot/pxelinux.cfg/default") == active
    assert _temps(store) == []
    _ok(cli("verify"))


# -- a holder that dies, a waiter that explains -----------------------------------------------------
def test_sigkilled_holder_releases_the_lock_and_the_waiter_names_it(tmp_path: Path, cli: Cli) -> None:
    store = _fleet(tmp_path, cli)
    tree = tmp_path / "chroot"
    (tree / "etc/motd").write_text("after the holder\n")
    with held_lock(store, "holder test") as holder:
        w = _spawn(store, "commit", tree, "-p", "web", env={"IMGSTORE_LOCK_VERBOSE": "1"})
        assert w.stderr is not None
        said = _read_until(w.stderr.fileno(), rb"\n", 60).decode()
        assert f"pid {holder.pid}" in said and "holder test" in said and SINCE.search(said), said
        time.sleep(2)
        assert w.poll() is None, "the commit did not wait for the lock"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        out, err = w.communicate(timeout=120)
    assert w.returncode == 0, err
    assert _gens(cli, "web")[-1]["message"] == ""
    assert _ok(cli("cat", "web@4", "/etc/motd")).stdout == "after the holder\n"
    _ok(cli("verify"))


def test_a_killed_imgstore_command_leaves_no_stale_lock(tmp_path: Path, cli: Cli) -> None:
    store = _fleet(tmp_path, cli)
    tree = tmp_path / "chroot"
    (tree / "etc/motd").write_text("killed\n")
    r = cli("commit", tree, "-p", "web", env={"IMGSTORE_FAULT": "commit.before-row:kill"})
    assert r.returncode == -signal.SIGKILL
    for args in (("commit", tree, "-p", "web"), ("rollout",), ("gc",)):
        r = cli(*args, "--no-wait")
        assert r.returncode == 0, (args, r.stderr)
    _ok(cli("verify"))
    _ok(cli("status"))
    assert _temps(store) == []


def test_waiting_message_on_a_terminal(tmp_path: Path, cli: Cli) -> None:
    """Without IMGSTORE_LOCK_VERBOSE, a waiter on a terminal still says whom it waits for."""
    store = _fleet(tmp_path, cli)
    with held_lock(store, "holder on tty") as holder:
        master, slave = pty.openpty()
        try:
            w = subprocess.Popen(_argv("rollout", "web@2"), env=_env(store), stdout=subprocess.PIPE, stderr=slave)
            os.close(slave)
            said = _read_until(master, rb"since [^\r\n]*\d\d:\d\d", 60).decode(errors="replace")
            assert f"pid {holder.pid}" in said and "holder on tty" in said, said
            assert w.poll() is None
            holder.kill()
            holder.wait()
            w.communicate(timeout=120)
            assert w.returncode == 0
        finally:
            os.close(master)


MUTATING = [
    ("commit", "{chroot}", "-p", "web"),
    ("rollout", "web@2"),
    ("rollout", "--canary", "www1"),
    ("rollback", "--to", "web@2"),
    ("rollback", "--node", "www1"),
    ("gc",),
    ("pin", "www1", "web@2"),
    ("unpin", "www1"),
    ("sync",),
    ("materialize", "web@3"),
    ("node", "add", "www9", "--mac", "52:54:00:00:00:09", "-p", "web"),
    ("node", "edit", "www3", "--ip", "10.0.1.33"),
    ("node", "rm", "www3"),
    ("node", "import-dhcpd", "{dhcpd}", "-p", "web"),
    ("verify", "--repair"),
]


def test_no_wait_exits_7_naming_the_holder_for_every_command_that_changes_the_store(tmp_path: Path,
                                                                                   cli: Cli) -> None:
    store = _fleet(tmp_path, cli)
    dhcpd = tmp_path / "dhcpd.conf"
    dhcpd.write_text("host www8 { hardware ethernet 52:54:00:00:00:08; fixed-address 10.0.1.8; }\n")
    subs = {"{chroot}": os.fspath(tmp_path / "chroot"), "{dhcpd}": os.fspath(dhcpd)}
    (tmp_path / "chroot/etc/motd").write_text("changed\n")
    failures = []
    with held_lock(store, "holder test") as holder:
        before = _state(store)
        for args in MUTATING:
            argv = [subs.get(a, a) for a in args] + ["--no-wait"]
            try:
                r = subprocess.run(_argv(*argv), env=_env(store), capture_output=True, text=True, timeout=60)
            except subprocess.TimeoutExpired:
                failures.append(f"{' '.join(args)} --no-wait: still waiting after 60 s")
                continue
            err = r.stderr.strip()
            if r.returncode != 7:
                failures.append(f"{' '.join(args)} --no-wait: exit {r.returncode}, want 7: {err}")
            elif not (f"pid {holder.pid}" in err and "holder test" in err and SINCE.search(err)):
                failures.append(f"{' '.join(args)} --no-wait: does not name the holder: {err}")
            elif len(err.splitlines()) != 1 or "Traceback" in err:
                failures.append(f"{' '.join(args)} --no-wait: not one line: {err}")
        after = _state(store)
    assert not failures, "\n".join(failures)
    assert after == before


def test_commands_that_change_the_store_wait_for_the_lock(tmp_path: Path, cli: Cli) -> None:
    """Every writer waits while another process holds the lock, says whom for, and proceeds once it is freed."""
    store = _fleet(tmp_path, cli)
    dhcpd = tmp_path / "dhcpd.conf"
    dhcpd.write_text("host www8 { hardware ethernet 52:54:00:00:00:08; fixed-address 10.0.1.8; }\n")
    (tmp_path / "chroot/etc/motd").write_text("while locked\n")
    # Commands that do not contradict each other in any order.
    cmds = [
        ("commit", tmp_path / "chroot", "-p", "web", "-m", "while locked"),
        ("rollout", "web@2"),
        ("pin", "www1", "web@3"),
        ("sync",),
        ("gc", "--keep", "10"),
        ("materialize", "web@3"),
        ("node", "add", "www9", "--mac", "52:54:00:00:00:09", "-p", "web"),
        ("node", "edit", "www3", "--ip", "10.0.1.33"),
        ("node", "import-dhcpd", dhcpd, "-p", "web"),
        ("verify", "--repair"),
    ]
    with held_lock(store, "holder test") as holder:
        before = _state(store)
        procs = [_spawn(store, *c, env={"IMGSTORE_LOCK_VERBOSE": "1"}) for c in cmds]
        said = []
        for c, p in zip(cmds, procs, strict=True):
            assert p.stderr is not None
            try:
                said.append(_read_until(p.stderr.fileno(), rb"\n", 120).decode())
            except AssertionError:
                said.append(f"{' '.join(os.fspath(a) for a in c)}: said nothing, exit {p.poll()}")
        time.sleep(1)
        done_early = [(" ".join(os.fspath(a) for a in c), p.returncode) for c, p in zip(cmds, procs, strict=True)
                      if p.poll() is not None]
        changed = _state(store) != before
        holder.kill()
        holder.wait()
        results = _wait_all(procs)
    assert not done_early, f"finished while another process held the lock: {done_early}"
    assert not changed
    for c, line, (rc, _out, err) in zip(cmds, said, results, strict=True):
        assert f"pid {holder.pid}" in line and "holder test" in line and SINCE.search(line), (c, line)
        assert rc == 0, (c, err)
    _ok(cli("status"))
    _ok(cli("verify"))


def test_read_only_commands_never_wait_for_the_lock(tmp_path: Path, cli: Cli) -> None:
    store = _fleet(tmp_path, cli)
    _ok(cli("pin", "www3", "web@2"))
    reads = [
        ("generations",), ("generations", "--json"), ("show", "web@2"), ("ls", "web@2", "/etc"),
        ("cat", "web@2", "/etc/motd"), ("status",), ("status", "--json"), ("verify",), ("history",),
        ("history", "--json"), ("node", "list"), ("node", "show", "www1"), ("profile", "list"),
        ("profile", "show", "web"), ("checkout", "web@3", tmp_path / "co"),
        ("node", "export-dhcpd", "--next-server", "10.0.0.1"),
    ]
    with held_lock(store, "holder test"):
        for args in reads:
            t0 = time.monotonic()
            try:
                r = subprocess.run(_argv(*args), env=_env(store), capture_output=True, text=True, timeout=60)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{args} blocked on the store lock") from None
            assert r.returncode == 0, (args, r.stderr)
            assert time.monotonic() - t0 < 30, args
        assert (tmp_path / "co/etc/motd").read_text() == "gen 3\n"
