"""The command line's side of `imgstore serve` (server.py): hand the command to a server if one listens, and
relay signals and the exit code. It runs before every command, so it imports nothing it does not need:
not even `socket` when no server's socket exists."""

from __future__ import annotations

import marshal
import os
import signal
import struct
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import socket

PROTOCOL = 1
LEN = struct.Struct("<I")
REPLY = struct.Struct("<ci")  # b"P" worker pid, b"X" exit code, b"R" refused (run it yourself)
SKIP = ("serve",)  # commands that must run in the client's own process


def socket_path() -> str | None:
    """Where `imgstore serve` listens and the CLI looks: $IMGSTORE_SOCKET (empty: never use a server), else
    /run/imgstore.sock for root, else $XDG_RUNTIME_DIR/imgstore.sock, else nowhere."""
    given = os.environ.get("IMGSTORE_SOCKET")
    if given is not None:
        return given or None
    if os.geteuid() == 0:
        return "/run/imgstore.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "imgstore.sock") if runtime else None


def forward(argv: list[str]) -> int | None:
    """Run the command in the server, if one answers; its exit code, or None to run it here."""
    path = socket_path()
    if not path or any(word in SKIP for word in argv[1:]) or not os.path.exists(path):
        return None
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        request = marshal.dumps((PROTOCOL, os.path.dirname(os.path.abspath(__file__)), argv, os.getcwd(),
                                 dict(os.environb), _umask(), _encodings()))
        sock.sendmsg([LEN.pack(len(request)), request],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("3i", 0, 1, 2))])
    except OSError:
        sock.close()
        return None  # no server, a stale socket, not ours, or a standard stream closed: run it here
    return _wait(sock)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _encodings() -> tuple[tuple[str, str], ...]:
    return tuple((f.encoding, f.errors or "strict") if f is not None else ("utf-8", "strict")
                 for f in (sys.stdin, sys.stdout, sys.stderr))


def _wait(sock: socket.socket) -> int | None:
    worker = 0

    def relay(signum: int, _frame: object) -> None:
        if worker:
            os.kill(worker, signum)

    def suspend(_signum: int, _frame: object) -> None:  # Ctrl-Z: the worker stops with its client
        if worker:
            os.kill(worker, signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)

    def resume(_signum: int, _frame: object) -> None:  # fg, bg
        if worker:
            os.kill(worker, signal.SIGCONT)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, relay)
    signal.signal(signal.SIGTSTP, suspend)
    signal.signal(signal.SIGCONT, resume)
    buf = b""
    while True:
        try:
            chunk = sock.recv(64)
        except InterruptedError:
            continue
        except OSError:
            chunk = b""
        if not chunk:
            if not worker:
                return None  # refused before starting anything (another user's server): run it here
            print("imgstore: error: the imgstore server's worker running this command was killed; check the "
                  "server's log, then `imgstore status` (run the command again without the server: "
                  "IMGSTORE_SOCKET= imgstore ...)", file=sys.stderr)
            return 1
        buf += chunk
        while len(buf) >= REPLY.size:
            kind, value = REPLY.unpack_from(buf)
            assert isinstance(value, int)
            buf = buf[REPLY.size:]
            if kind == b"R":
                return None
            if kind == b"P":
                worker = value
            elif kind == b"X":
                return value
