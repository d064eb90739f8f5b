"""`imgstore serve`: commands run in a worker forked from the server, with the caller's streams, directory,
environment and signals, and give the same result as without it; without a usable server they run as before."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, write_profile

from imgstore.store import Store


class Server:
    def __init__(self, sock: Path, pythonpath: Path | None = None) -> None:
        self.sock = sock
        self.env = dict(os.environ, IMGSTORE_SOCKET=os.fspath(sock))
        self.env.pop("IMGSTORE_FAULT", None)
        if pythonpath is not None:
            self.env["PYTHONPATH"] = os.fspath(pythonpath)
        sock.parent.mkdir(parents=True, exist_ok=True)
        self.log = sock.parent / "serve.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "imgstore", "serve"], env=self.env, cwd=sock.parent,
                                     stdout=subprocess.DEVNULL, stderr=self.log.open("w"))
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def run(self, *args: str | os.PathLike[str], env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "imgstore", *map(os.fspath, args)], capture_output=True,
                              text=True, env={**self.env, **(env or {})}, cwd=cwd or self.sock.parent, timeout=120)

    def workers(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()]

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        return self.log.read_text()

    def served(self) -> int:
        last = self.stop().strip().splitlines()[-1]
        assert "command(s) served" in last, last
        return int(last.split(": ")[-1].split()[0].replace(",", ""))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "run" / "imgstore.sock")
    yield s
    s.stop()


def _web_store(tmp_path: Path) -> tuple[Path, Path]:
    """A store with a profile `web`, and a chroot."""
    store = tmp_path / "store"
    Store.init(store).close()
    write_profile(store, "web")
    return store, _tree(tmp_path / "chroot")


def _commit(server: Server, store: Path, tree: Path, fault: str, **kw: object) -> subprocess.Popen[str]:
    """A served commit of `tree` that meets IMGSTORE_FAULT=`fault`."""
    env = {**server.env, "IMGSTORE_ROOT": os.fspath(store), "IMGSTORE_FAULT": fault}
    return subprocess.Popen([sys.executable, "-m", "imgstore", "commit", os.fspath(tree), "--profile", "web"],
                            env=env, text=True, **kw)  # type: ignore[call-overload]


def _tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("web\n")
    for i in range(50):
        (root / "etc" / f"f{i}").write_text(f"file {i}\n" * (i + 1))
    return root


def test_served_commands_match_unserved_ones(tmp_path: Path, server: Server) -> None:
    store, tree = _web_store(tmp_path)
    env = {"IMGSTORE_ROOT": os.fspath(store)}
    direct = {**env, "IMGSTORE_SOCKET": ""}
    # The chroot is given relative to the caller's directory, the store by the caller's environment.
    first = server.run("commit", "chroot", "--profile", "web", "-m", "one", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("committed web@1 ")
    (tree / "etc" / "motd").write_text("hello\n")
    second = server.run("commit", "chroot", "--profile", "web", "-m", "two", env=direct, cwd=tmp_path)
    assert second.stdout.startswith("committed web@2 ")
    cases = [
        ("generations",), ("show", "web@1"), ("cat", "web@2", "/etc/motd"), ("diff", "web@1", "web@2"),
        ("verify",), ("--json", "generations"),
        ("show", "web@9"),  # not found: 3
        ("nosuch",),  # usage: 2
        ("commit", "--profile"),  # usage: 2
        ("cat", "web@2", "/etc/none"),
    ]
    for args in cases:
        served = server.run(*args, env=env, cwd=tmp_path)
        alone = server.run(*args, env=direct, cwd=tmp_path)
        assert _same(served) == _same(alone), args
    assert server.run("show", "web@9", env=env).returncode == 3
    assert server.served() == 1 + len(cases) + 1


def test_a_signal_to_the_client_stops_the_command_in_the_worker(tmp_path: Path, server: Server) -> None:
    store, tree = _web_store(tmp_path)
    client = _commit(server, store, tree, "commit.before-flush:stop", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    worker = _wait_for_stopped_worker(server)
    client.send_signal(signal.SIGTERM)  # relayed to the worker, which is paused at the fault point
    time.sleep(0.2)
    os.kill(worker, signal.SIGCONT)
    _out, err = client.communicate(timeout=60)
    assert client.returncode == 130, err
    assert "interrupted" in err
    assert "web@1" not in server.run("generations", env={"IMGSTORE_ROOT": os.fspath(store)}).stdout
    assert not [p for p in (store / "objects").rglob("*") if ".tmp" in p.name]


def test_killing_the_client_stops_the_worker(tmp_path: Path, server: Server) -> None:
    store, tree = _web_store(tmp_path)
    client = _commit(server, store, tree, "commit.before-flush:stop", stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    worker = _wait_for_stopped_worker(server)
    client.kill()
    client.wait()
    os.kill(worker, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while worker in server.workers():
        assert time.monotonic() < deadline, "the worker outlived its client"
        time.sleep(0.05)
    ok = server.run("generations", env={"IMGSTORE_ROOT": os.fspath(store)})
    assert ok.returncode == 0 and "web@1" not in ok.stdout


def test_a_killed_worker_is_one_line_and_exit_1(tmp_path: Path, server: Server) -> None:
    store, tree = _web_store(tmp_path)
    client = _commit(server, store, tree, "commit.after-manifest:kill", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _out, err = client.communicate(timeout=60)
    assert client.returncode == 1
    assert err.count("\n") == 1 and "worker running this command was killed" in err


def test_without_a_server_commands_run_in_their_own_process(tmp_path: Path) -> None:
    sock = tmp_path / "stale.sock"
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(os.fspath(sock))
    s.close()  # a socket file nobody listens on, as a crashed server leaves it
    env = dict(os.environ, IMGSTORE_SOCKET=os.fspath(sock), IMGSTORE_ROOT=os.fspath(tmp_path / "store"))
    res = subprocess.run([sys.executable, "-m", "imgstore", "init"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "store" / "imgstore.db").exists()


def test_a_second_server_on_the_same_socket_is_refused(server: Server) -> None:
    res = server.run("serve")
    assert res.returncode == 8
    assert res.stderr.startswith("imgstore: error: an imgstore server already listens on ")
    assert server.run("--root", "/nonexistent", "generations").returncode == 5  # the first still serves


def test_after_an_upgrade_the_server_stops_and_commands_run_without_it(tmp_path: Path) -> None:
    copy = tmp_path / "install"
    shutil.copytree(REPO / "imgstore", copy / "imgstore", ignore=shutil.ignore_patterns("__pycache__"))
    server = Server(tmp_path / "imgstore.sock", pythonpath=copy)
    try:
        env = {"IMGSTORE_ROOT": os.fspath(tmp_path / "store")}
        assert server.run("init", env=env).returncode == 0
        module = copy / "imgstore" / "status.py"
        module.write_text(module.read_text() + "\n")  # what `pip install -U` does to the files
        res = server.run("generations", env=env)
        assert res.returncode == 0, res.stderr
        server.proc.wait(timeout=30)
        log = server.stop()
        assert "code changed on disk" in log and "1 command(s) served" in log
        assert not server.sock.exists()
    finally:
        server.stop()


@pytest.mark.root
def test_another_users_client_runs_its_command_itself(server: Server) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    with tempfile.TemporaryDirectory() as tmp:  # under /tmp: readable by nobody, unlike pytest's folders
        os.chmod(tmp, 0o755)
        shutil.copytree(REPO / "imgstore", Path(tmp) / "imgstore", ignore=shutil.ignore_patterns("__pycache__"))
        server.sock.chmod(0o666)  # let the connection through, to prove the server checks who connects
        for folder in (server.sock.parent, *server.sock.parent.parents):
            folder.chmod(folder.stat().st_mode | 0o005)
        # The client side alone (nobody cannot read this machine's site-packages to run a whole command).
        res = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
                              "-c", "import sys; from imgstore.client import forward; print(forward(sys.argv))",
                              "generations"], env={**server.env, "PYTHONPATH": tmp},
                             capture_output=True, text=True, cwd=tmp, timeout=60)
    assert (res.returncode, res.stdout) == (0, "None\n"), res.stderr  # None: run it in your own process
    assert server.served() == 0


def _same(res: subprocess.CompletedProcess[str]) -> tuple[int, str, str]:
    """What must not differ between runs: all of it, but how long the work took."""
    return res.returncode, *(re.sub(r"in \d+\.\d+ s", "in N s", t) for t in (res.stdout, res.stderr))


def _wait_for_stopped_worker(server: Server) -> int:
    deadline = time.monotonic() + 60
    while True:
        for pid in server.workers():
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
                return pid
        assert time.monotonic() < deadline, "no worker reached the fault point"
        time.sleep(0.05)


def test_job_control_stops_and_continues_the_worker_with_its_client(tmp_path: Path, server: Server) -> None:
    store, tree = _web_store(tmp_path)
    env = {**server.env, "IMGSTORE_ROOT": os.fspath(store)}
    client = subprocess.Popen([sys.executable, "-m", "imgstore", "watch", os.fspath(tree), "-p", "web"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stderr is not None
        while "Ctrl-C to stop" not in client.stderr.readline():
            assert client.poll() is None, "watch ended early"
        (worker,) = server.workers()
        client.send_signal(signal.SIGTSTP)  # Ctrl-Z
        _wait_state(worker, "T")
        _wait_state(client.pid, "T")
        client.send_signal(signal.SIGCONT)  # fg
        _wait_state(worker, "S")
        client.send_signal(signal.SIGTERM)
        assert client.wait(timeout=60) == 0  # watch stops on SIGTERM with 0: the worker got it
        assert "stopped watching" in client.stderr.read()
    finally:
        if client.poll() is None:
            client.kill()


def _wait_state(pid: int, state: str) -> None:
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != state:
        assert time.monotonic() < deadline, f"process {pid} never reached state {state}"
        time.sleep(0.02)


def test_a_reader_that_goes_away_ends_the_command_the_same_served_or_not(tmp_path: Path, server: Server) -> None:
    """`imgstore cat ... | head`: click exits 1 without a word when stdout's reader is gone; served, the same."""
    store, tree = _web_store(tmp_path)
    (tree / "etc" / "big").write_bytes(os.urandom(4 << 20))  # far more than a pipe holds
    env = {**server.env, "IMGSTORE_ROOT": os.fspath(store)}
    assert subprocess.run([sys.executable, "-m", "imgstore", "commit", os.fspath(tree), "-p", "web"], env=env,
                          capture_output=True).returncode == 0
    for sock in (server.env["IMGSTORE_SOCKET"], ""):
        res = subprocess.run(f"{sys.executable} -m imgstore cat web@1 /etc/big | head -c 10 >/dev/null; "
                             "echo ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True,
                             text=True, env={**env, "IMGSTORE_SOCKET": sock}, timeout=60)
        assert (res.stdout, res.stderr) == ("1\n", ""), (sock, res.stderr)
    assert server.served() == 2
