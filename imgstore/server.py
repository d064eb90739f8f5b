"""The command server: `imgstore serve` keeps Python and imgstore's modules loaded, so a command starts in
milliseconds instead of a tenth of a second (docs/commands-watch.md).

The client side (`forward`) is client.py: it runs before every command and imports nothing heavy.

The client connects to a Unix socket and sends its argv, working directory, environment and umask, with its
stdin, stdout and stderr as file descriptors (SCM_RIGHTS). The server forks a worker per command; the
worker takes those descriptors, directory and environment as its own and runs the command exactly as the
client process would have, writing straight to the client's terminal or pipes. The client forwards the
signals it gets (Ctrl-C, SIGTERM, SIGHUP, SIGQUIT; Ctrl-Z and fg/bg stop and continue both) to the worker
and exits with the worker's exit code; if the client dies, the worker gets SIGTERM. A worker never outlives
its command, the server itself never runs one: every command starts from the same freshly imported state.

The client falls back to running the command itself whenever no server answers, the server belongs to
another user, or the server runs other code than the client (an upgrade since it started: it then exits,
so that its supervisor restarts it with the new code). Running served or not gives the same result.
"""

from __future__ import annotations

import marshal
import os
import signal
import socket
import struct
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

from .client import LEN, PROTOCOL, REPLY

_MAX_REQUEST = 1 << 24
RECEIVE_TIMEOUT = 30  # seconds a worker waits for its client's request


def _identity() -> tuple[Any, ...]:
    """What must be equal for a server to run a client's command: the interpreter, the package's place and
    its modules' sizes and times (an upgrade in place changes them)."""
    here = os.path.dirname(os.path.abspath(__file__))
    files = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(here)
                   if e.name.endswith(".py"))
    return (PROTOCOL, sys.executable, sys.version, here, tuple(files))


# The server side ---------------------------------------------------------------------------------------


def serve(path: str, run: Callable[[], None], on_notice: Callable[[str], None]) -> None:
    """Listen on `path` until SIGTERM or Ctrl-C; `run` runs one command (sys.argv) in a worker and exits."""
    from .errors import Conflict

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        pass
    else:
        raise Conflict(f"an imgstore server already listens on {path}",
                       "stop it first (systemctl stop imgstore, or kill its PID), or give another --socket")
    finally:
        probe.close()
    identity = _identity()
    listener = _listen(path)
    mine = os.lstat(path).st_ino
    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True
        listener.shutdown(socket.SHUT_RDWR)

    previous = signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
    served = 0
    on_notice(f"serving imgstore commands on {path} (pid {os.getpid()})")
    try:
        while not stop:
            try:
                conn, _ = listener.accept()
            except OSError:
                if stop:
                    break
                raise
            try:
                if not _same_user(conn):
                    continue  # close without a word: the client runs the command itself
                if _identity() != identity:
                    conn.sendall(REPLY.pack(b"R", 0))
                    on_notice("imgstore's code changed on disk since this server started: stopping (restart it "
                              "to serve the new code; commands meanwhile run without the server)")
                    break
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    _worker(conn, run)  # never returns
                served += 1
            finally:
                conn.close()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _unlisten(listener, path, mine)
    on_notice(f"stopped serving on {path}: {served:,} command(s) served")


def _listen(path: str) -> socket.socket:
    """Bind under a temporary name, then rename over `path`: a stale socket is replaced in one step."""
    from .durable import fsync_dir, tmp_name

    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, tmp_name(os.path.basename(path)))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is the owner's only: 0600 from the start
    try:
        listener.bind(tmp)
    finally:
        os.umask(old)
    try:
        listener.listen(64)
        os.rename(tmp, path)
        fsync_dir(folder)
    except BaseException:
        listener.close()
        os.unlink(tmp)
        raise
    return listener


def _unlisten(listener: socket.socket, path: str, mine: int) -> None:
    """Remove the socket file if it is still this server's (another server may have taken the name)."""
    try:
        if os.lstat(path).st_ino == mine:
            os.unlink(path)
    except OSError:
        pass
    listener.close()


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.geteuid())


def _worker(conn: socket.socket, run: Callable[[], None]) -> None:
    """In the forked worker: become the client (streams, directory, environment, umask), run, report."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        conn.settimeout(RECEIVE_TIMEOUT)  # a client that connects and says nothing does not keep a worker
        request, fds = _receive(conn)
        conn.settimeout(None)
        protocol, package, argv, cwd, env, umask, encodings = marshal.loads(request)
        if protocol != PROTOCOL or len(fds) != 3 or package != os.path.dirname(os.path.abspath(__file__)):
            conn.sendall(REPLY.pack(b"R", 0))  # another installation's client: it runs the command itself
            os._exit(0)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        _reopen_streams(encodings)
        os.chdir(cwd)
        os.environ.clear()
        os.environb.update(env)
        os.umask(umask)
        sys.argv = argv
        conn.sendall(REPLY.pack(b"P", os.getpid()))
        _watch_client(conn)
        try:
            run()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except KeyboardInterrupt:
            code = 130
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the client may go as soon as it has the code
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):  # a reader gone, a stream closed
                pass
        conn.sendall(REPLY.pack(b"X", code))
    except BaseException:  # noqa: BLE001  nothing may escape into the copy of the server's loop
        pass
    os._exit(code)


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    fds: list[int] = []
    data = b""
    while len(data) < LEN.size or len(data) < LEN.size + LEN.unpack_from(data)[0]:
        chunk, ancdata, _flags, _addr = conn.recvmsg(1 << 16, socket.CMSG_SPACE(3 * 4))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]))
        if not chunk or len(data) > _MAX_REQUEST:
            os._exit(1)  # the client went away (or a probe connected to see whether we run)
        data += chunk
    return data[LEN.size:], fds


def _reopen_streams(encodings: tuple[tuple[str, str], ...]) -> None:
    import io

    (in_enc, in_err), (out_enc, out_err), (err_enc, _) = encodings
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding=in_enc,
                                 errors=in_err)
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding=out_enc,
                                  errors=out_err, line_buffering=os.isatty(1))
    sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)), encoding=err_enc,
                                  errors="backslashreplace", line_buffering=True)


def _watch_client(conn: socket.socket) -> None:
    """If the client goes away (killed, its terminal closed), the command stops as on SIGTERM."""
    from .forkjoin import QuietThread

    def wait() -> None:
        try:
            while conn.recv(64):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    QuietThread(target=wait, daemon=True).start()  # a materialize may fork beside it (forkjoin)
