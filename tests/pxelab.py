"""A lab for real TFTP fetches and real PXE boots in qemu.

End-to-end tests import this module to prove that a node with a given MAC boots the generation imgstore
meant it to boot: not by reading the config files back, but by booting a VM whose firmware, iPXE and
PXELINUX do exactly what a real node does, against the same TFTP server Debian deploys (tftpd-hpa
``--secure``).

The chain is SeaBIOS -> iPXE (e1000 option ROM) -> DHCP -> TFTP pxelinux.0 -> pxelinux.cfg/01-<mac> or
default -> kernel + initrd. The kernel is Debian's own; the initrd (`build_initrd`) is a busybox /init that
prints ``IMGSTORE-BOOTED gen=<imgstore.gen from the cmdline> cmdline=<...>`` on the serial console and
powers off. `booted_generation` reads the marker back.

Network safety: every server and every VM lives in a network namespace this module creates and deletes
(198.51.100.0/24, TEST-NET-2, never routed anywhere), or behind qemu's slirp with ``restrict=on`` inside
``unshare -n``. Nothing touches the host namespace. Every process is started here and stopped here by
its PID, also when the caller fails.

KVM on the lab machines is kvm-pvm, which triple-faults in iPXE, so VMs run under TCG; a reset VM exits 0
under ``-no-reboot``, which is why success is judged by the console marker, never by qemu's exit code.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import io
import json
import logging
import os
import re
import secrets
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

log = logging.getLogger("pxelab")

REPO = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = REPO / ".ci" / "install-pxe-deps.sh"

# TEST-NET-2 (RFC 5737): never routed, so even a mistake cannot reach a real host. Only ever configured
# inside namespaces created here.
SERVER_IP = "198.51.100.1"
DHCP_RANGE = ("198.51.100.50", "198.51.100.99")
# iPXE waits ~13 s for IPv6 autoconfiguration on a link without a router; dnsmasq RAs end that wait.
RA_PREFIX = "fd42:1a:b::"

MARKER = "IMGSTORE-BOOTED"
NO_GEN_MARKER = "IMGSTORE-NO-GEN"
BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"

_BOOTLOADER_SOURCES = {
    "pxelinux.0": Path("/usr/lib/PXELINUX/pxelinux.0"),
    "ldlinux.c32": Path("/usr/lib/syslinux/modules/bios/ldlinux.c32"),
    # reboot.c32 needs libcom32.c32; both are needed for `ONERROR reboot.c32`.
    "reboot.c32": Path("/usr/lib/syslinux/modules/bios/reboot.c32"),
    "libcom32.c32": Path("/usr/lib/syslinux/modules/bios/libcom32.c32"),
}
_TOOLS = (QEMU, "dnsmasq", "ip", "unshare", "timeout")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_NETNS_RE = re.compile(r"^pxelab-[a-z]+-([0-9]+)-[0-9a-f]{6}$")


class PxeLabError(RuntimeError):
    """The lab itself failed (missing dependency, a server that did not start), not the code under test."""


class TftpError(PxeLabError):
    """A TFTP transfer failed; `code`/`message` are the server's ERROR packet when there was one."""

    def __init__(self, remote_name: str, message: str, code: int | None = None) -> None:
        where = f"TFTP error {code}" if code is not None else "TFTP failure"
        super().__init__(f"{where} fetching {remote_name!r}: {message}")
        self.remote_name = remote_name
        self.message = message
        self.code = code


# ---------------------------------------------------------------------------------------------------
# Dependencies


def cache_dir() -> Path:
    """Where install-pxe-deps.sh unpacks tftpd-hpa and the guest kernel (git-ignored)."""
    return Path(os.environ.get("IMGSTORE_PXE_CACHE", REPO / ".cache" / "pxe"))


def in_tftpd() -> Path:
    return cache_dir() / "tftpd-hpa" / "usr" / "sbin" / "in.tftpd"


def guest_kernel() -> Path:
    """The real Debian vmlinuz (the one linux-image-amd64 depends on), unpacked, not installed."""
    found = sorted((cache_dir() / "kernel").glob("vmlinuz-*"))
    if not found:
        raise PxeLabError(f"no guest kernel under {cache_dir() / 'kernel'}; run {INSTALL_SCRIPT}")
    return found[-1]


def bootloader_files() -> dict[str, Path]:
    """TFTP-root name -> Debian file, for the four PXELINUX files every TFTP root needs."""
    return dict(_BOOTLOADER_SOURCES)


def _missing_deps() -> list[str]:
    missing = [os.fspath(p) for p in _BOOTLOADER_SOURCES.values() if not p.is_file()]
    missing += [t for t in _TOOLS if _which(t) is None]
    if not os.access(in_tftpd(), os.X_OK):
        missing.append(os.fspath(in_tftpd()))
    if not list((cache_dir() / "kernel").glob("vmlinuz-*")):
        missing.append(os.fspath(cache_dir() / "kernel" / "vmlinuz-*"))
    if not BUSYBOX.is_file():
        missing.append(os.fspath(BUSYBOX))
    return missing


def _which(tool: str) -> str | None:
    # /usr/sbin is not on every PATH (e.g. for non-login shells), but dnsmasq and ip live there.
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/sbin"]:
        p = Path(d or ".") / tool
        if p.is_file() and os.access(p, os.X_OK):
            return os.fspath(p)
    return None


def ensure_deps() -> None:
    """Run .ci/install-pxe-deps.sh if anything is missing; raise PxeLabError if it still is."""
    missing = _missing_deps()
    if not missing:
        return
    if os.geteuid() != 0:
        raise PxeLabError(
            f"PXE lab dependencies missing ({', '.join(missing)}); run {INSTALL_SCRIPT} as root"
        )
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    # Two test processes must not run apt/dpkg-deb into the same cache at once.
    with open(cache / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _missing_deps():
            proc = subprocess.run(
                ["bash", os.fspath(INSTALL_SCRIPT), os.fspath(cache)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise PxeLabError(
                    f"{INSTALL_SCRIPT} failed (exit {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
                )
    still = _missing_deps()
    if still:
        raise PxeLabError(f"PXE lab dependencies still missing after {INSTALL_SCRIPT}: {', '.join(still)}")


# ---------------------------------------------------------------------------------------------------
# The guest initrd

_INIT = """#!/bin/sh
# Written by imgstore's tests/pxelab.py. Reports which generation the bootloader chose, then powers off.
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t devtmpfs devtmpfs /dev
# Late kernel messages share the serial console; keep them from splitting the marker line.
echo 1 > /proc/sys/kernel/printk
set -f
cmdline=$($bb cat /proc/cmdline)
gen=
for arg in $cmdline; do
  case "$arg" in imgstore.gen=*) gen=${arg#imgstore.gen=} ;; esac
done
# The space after the id is the delimiter that keeps gen=1 from matching gen=10.
if [ -n "$gen" ]; then
  echo "IMGSTORE-BOOTED gen=$gen cmdline=$cmdline"
else
  echo "IMGSTORE-NO-GEN cmdline=$cmdline"
fi
$bb poweroff -f
"""


def _is_static_elf(path: Path) -> bool:
    """True if the ELF has no PT_INTERP, i.e. needs no dynamic loader (there is none in the initrd)."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if ident[:4] != b"\x7fELF" or ident[4] != 2:  # 64-bit only; the guest is x86_64
            return False
        end = "<" if ident[5] == 1 else ">"
        phoff, = struct.unpack_from(end + "Q", ident, 32)
        phentsize, phnum = struct.unpack_from(end + "HH", ident, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from(end + "I", table, i * phentsize)[0] != 3 for i in range(phnum))


def _cpio_newc(entries: Sequence[tuple[str, int, bytes, int]]) -> bytes:
    """A newc archive from (name, mode, data, rdev) with every varying field pinned.

    Written by hand instead of with cpio(1) so the bytes depend only on the inputs: no mtimes, no host
    inode or device numbers, root ownership without needing root, and device nodes without mknod.
    """
    out = io.BytesIO()

    def put(name: str, mode: int, data: bytes, rdev: int, ino: int) -> None:
        raw = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev), len(raw), 0)
        out.write(b"070701" + b"".join(b"%08X" % v for v in fields) + raw)
        out.write(b"\0" * (-out.tell() % 4))
        out.write(data)
        out.write(b"\0" * (-out.tell() % 4))

    for ino, (name, mode, data, rdev) in enumerate(sorted(entries), start=1):
        put(name, mode, data, rdev, ino)
    put("TRAILER!!!", 0, b"", 0, 0)
    return out.getvalue()


def build_initrd(out: Path) -> None:
    """Write a byte-reproducible gzip'd initramfs whose /init prints the generation marker.

    One initrd serves every generation: the id comes from ``imgstore.gen=`` on the kernel command line,
    so a test proves which PXELINUX config was used, not which file was copied where.
    """
    if not BUSYBOX.is_file() or not _is_static_elf(BUSYBOX):
        raise PxeLabError(f"{BUSYBOX} is missing or not static; apt-get install busybox-static")
    d = stat.S_IFDIR | 0o755
    entries = [
        ("bin", d, b"", 0),
        ("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes(), 0),
        ("bin/sh", stat.S_IFLNK | 0o777, b"busybox", 0),
        ("dev", d, b"", 0),
        # The kernel opens /dev/console for init before /init can mount devtmpfs.
        ("dev/console", stat.S_IFCHR | 0o600, b"", os.makedev(5, 1)),
        ("init", stat.S_IFREG | 0o755, _INIT.encode(), 0),
        ("proc", d, b"", 0),
        ("sys", d, b"", 0),
    ]
    buf = io.BytesIO()
    # mtime=0 and no file name in the gzip header: same input, same bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(_cpio_newc(entries))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.chmod(0o644)
    os.replace(tmp, out)


# ---------------------------------------------------------------------------------------------------
# PXELINUX naming and config


def normalize_mac(mac: str) -> str:
    """Lowercase colon form; refuses anything a NIC could not have (qemu would reject multicast)."""
    m = mac.strip().lower().replace("-", ":")
    if not _MAC_RE.match(m):
        raise ValueError(f"not a MAC address: {mac!r}")
    if int(m[:2], 16) & 1:
        raise ValueError(f"multicast MAC cannot be a NIC address: {mac!r}")
    return m


def mac_config_name(mac: str) -> str:
    """The per-MAC file PXELINUX asks for: ``01-`` (ARP type Ethernet) + lowercase, dash-joined.

    Case matters: TFTP servers on Linux are case-sensitive and pxelinux asks in lowercase only.
    """
    return "01-" + normalize_mac(mac).replace(":", "-")


def pxelinux_config(gen: str, kernel: str, initrd: str, extra_append: str = "") -> str:
    """A reference config of the shape imgstore writes; kernel/initrd are paths relative to the TFTP root.

    `ONERROR reboot.c32` makes a missing kernel end the VM at once instead of idling at `boot:` until
    the timeout; `IPAPPEND 3` gives the node its ip= and BOOTIF= (its own MAC) on the cmdline.
    """
    append = f"console=ttyS0 panic=-1 imgstore.gen={gen}" + (f" {extra_append}" if extra_append else "")
    return (
        "SERIAL 0 115200\n"
        f"DEFAULT gen-{gen}\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        "ONERROR reboot.c32\n"
        f"LABEL gen-{gen}\n"
        f"  KERNEL {kernel}\n"
        f"  INITRD {initrd}\n"
        f"  APPEND {append}\n"
        "  IPAPPEND 3\n"
    )


def install_bootloader(tftp_root: Path) -> None:
    """Copy the PXELINUX files into `tftp_root`, world-readable (tftpd-hpa serves as `nobody`)."""
    tftp_root.mkdir(parents=True, exist_ok=True)
    for name, src in bootloader_files().items():
        dst = tftp_root / name
        dst.write_bytes(src.read_bytes())
        dst.chmod(0o644)


def audit_tftp_root(tftp_root: Path) -> list[str]:
    """What tftpd-hpa --secure (chroot, user nobody) could not serve from this tree.

    slirp's and dnsmasq's TFTP follow any symlink and run as root or read 0600 files, so a boot through
    them proves nothing about these; this check covers them without a VM.
    """
    root = tftp_root.resolve()
    problems: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root)
            if p.is_symlink():
                target = os.readlink(p)
                resolved = p.resolve()
                if os.path.isabs(target):
                    problems.append(f"{rel}: absolute symlink ({target}) does not resolve inside the chroot")
                elif resolved != root and root not in resolved.parents:
                    problems.append(f"{rel}: symlink escapes the TFTP root ({target})")
                elif not resolved.exists():
                    problems.append(f"{rel}: dangling symlink ({target})")
                continue
            st = p.stat()
            if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o005 != 0o005:
                problems.append(f"{rel}/: directory not world-readable and searchable")
            elif stat.S_ISREG(st.st_mode) and not st.st_mode & 0o004:
                problems.append(f"{rel}: not world-readable (mode {stat.S_IMODE(st.st_mode):04o})")
    return problems


# ---------------------------------------------------------------------------------------------------
# Processes and namespaces


def _proc_starttime(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses; fields after the last ')' are fixed.
    return int(raw.rsplit(")", 1)[1].split()[19])


def _descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, starttime) of every live descendant; starttime guards against PID reuse when killing later."""
    found: list[tuple[int, int]] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for t in tasks:
            with contextlib.suppress(OSError):
                for child in (t / "children").read_text().split():
                    st = _proc_starttime(int(child))
                    if st is not None:
                        found.append((int(child), st))
                        todo.append(int(child))
    return found


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Stop a process we started, and whatever it forked, by PID: TERM, then KILL after `grace`."""
    kids = _descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        proc.terminate()
    for pid, st in kids:
        if _proc_starttime(pid) == st:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + grace
    for pid, st in kids:
        while _proc_starttime(pid) == st and time.monotonic() < deadline:
            time.sleep(0.05)
        if _proc_starttime(pid) == st:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _run(argv: Sequence[str], what: str) -> None:
    proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PxeLabError(f"{what} failed: {' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")


class Netns:
    """A named network namespace owned by this process; only `lo` until links are added inside it.

    Named (``ip netns add``) rather than ``unshare -n`` so several processes (server, client, qemu) can be
    started in it independently, each with its own PID to stop. Links are always created with
    ``ip -n NAME``, i.e. inside the namespace, so the host namespace never gains an interface.
    """

    def __init__(self, prefix: str = "pxelab") -> None:
        # pid + random: parallel boots in one process, and parallel test processes, never collide.
        self.name = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self._created = False

    @staticmethod
    def delete_stale() -> None:
        """Delete namespaces this module created in runs that died without cleaning up (SIGKILL).

        Only names of our own pattern whose creating process is gone; deleting a name kills nothing.
        """
        with contextlib.suppress(OSError):
            for name in os.listdir("/run/netns"):
                m = _NETNS_RE.match(name)
                if m and not Path(f"/proc/{m.group(1)}").exists():
                    subprocess.run(["ip", "netns", "delete", name], stdin=subprocess.DEVNULL,
                                   capture_output=True)

    def __enter__(self) -> Netns:
        self.delete_stale()
        _run(["ip", "netns", "add", self.name], "creating network namespace")
        self._created = True
        try:
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def ip(self, *args: str) -> None:
        _run(["ip", "-n", self.name, *args], f"ip in netns {self.name}")

    def add_veth_with_address(self, address: str = SERVER_IP) -> None:
        """Give the namespace a non-loopback IPv4 address.

        glibc's getaddrinfo(AI_ADDRCONFIG) ignores loopback, so in a namespace with only `lo` in.tftpd
        cannot resolve its own bind address and exits 66, logging only to syslog (absent here). Both ends
        of the pair stay inside the namespace.
        """
        self.ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
        self.ip("addr", "add", f"{address}/24", "dev", "v0")
        self.ip("link", "set", "v0", "up")
        self.ip("link", "set", "v1", "up")

    def argv(self, argv: Sequence[str]) -> list[str]:
        # `ip netns exec` execs the command without forking, so Popen.pid is the command's own PID.
        return ["ip", "netns", "exec", self.name, *argv]

    def delete(self) -> None:
        if self._created:
            self._created = False
            subprocess.run(["ip", "netns", "delete", self.name], stdin=subprocess.DEVNULL,
                           capture_output=True)


def _udp_listening(pid: int, port: int) -> bool:
    """Whether the network namespace of `pid` has a UDP socket bound to `port` (any address)."""
    try:
        lines = Path(f"/proc/{pid}/net/udp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(int(line.split()[1].split(":")[1], 16) == port for line in lines)


def _wait_listening(proc: subprocess.Popen[bytes], port: int, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise PxeLabError(f"{what} exited with status {proc.returncode} before listening: {err.strip()}")
        if _udp_listening(proc.pid, port):
            return
        time.sleep(0.02)
    raise PxeLabError(f"{what} did not bind UDP port {port} within {timeout:.0f}s")


def _start_in_tftpd(ns: Netns, root: Path, address: str, port: int) -> subprocess.Popen[bytes]:
    if not root.is_dir():
        raise PxeLabError(f"TFTP root {root} is not a directory")
    # --secure: chroot into the root (as Debian's default /etc/default/tftpd-hpa does), so symlinks leaving
    # it fail exactly as in production. -u nobody: the file-permission behaviour of production, too.
    argv = [os.fspath(in_tftpd()), "--listen", "--foreground", "--address", f"{address}:{port}",
            "--secure", "--user", "nobody", os.fspath(root.resolve())]
    proc = subprocess.Popen(ns.argv(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        _wait_listening(proc, port, "in.tftpd")
    except BaseException:
        _stop(proc)
        raise
    return proc


# ---------------------------------------------------------------------------------------------------
# TFTP client (RFC 1350). Runs inside the namespace as `python pxelab.py tftp-get HOST PORT NAME`.

_RRQ, _DATA, _ACK, _ERROR = 1, 3, 4, 5


def tftp_get(host: str, port: int, remote_name: str, timeout: float = 30.0, retry: float = 1.0) -> bytes:
    """Download one file in octet mode with 512-byte blocks, as the simplest client would.

    Deliberately plain RFC 1350 (no blksize/tsize options): that is the lowest common denominator every
    server must serve. Raises TftpError with the server's ERROR code and text.
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        last = struct.pack("!H", _RRQ) + remote_name.encode() + b"\0octet\0"
        last_to: tuple[str, int] = (host, port)
        tid: int | None = None  # the server answers from a fresh port (its transfer ID)
        expect = 1
        data = bytearray()
        s.sendto(last, last_to)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TftpError(remote_name, f"timed out after {timeout:.0f}s ({len(data)} bytes received)")
            s.settimeout(min(retry, remaining))
            try:
                pkt, (src, sport) = s.recvfrom(65536)
            except TimeoutError:
                s.sendto(last, last_to)
                continue
            if src != host:
                continue
            if tid is None:
                tid = sport
            elif sport != tid:
                s.sendto(struct.pack("!HH", _ERROR, 5) + b"Unknown transfer ID\0", (src, sport))
                continue
            if len(pkt) < 4:
                continue
            op, arg = struct.unpack_from("!HH", pkt)
            if op == _ERROR:
                raise TftpError(remote_name, pkt[4:].split(b"\0", 1)[0].decode(errors="replace"), arg)
            if op != _DATA:
                continue
            if arg == expect:
                data += pkt[4:]
                last, last_to = struct.pack("!HH", _ACK, arg), (src, sport)
                s.sendto(last, last_to)
                if len(pkt) - 4 < 512:
                    return bytes(data)
                expect = (expect + 1) & 0xFFFF  # block numbers roll over past 65535 files of 32 MiB
            elif arg == (expect - 1) & 0xFFFF:
                s.sendto(last, last_to)  # our ACK was lost; the server resent the block


def _main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[1] == "tftp-get":
        try:
            sys.stdout.buffer.write(tftp_get(argv[2], int(argv[3]), argv[4]))
        except TftpError as e:
            json.dump({"code": e.code, "message": e.message}, sys.stderr)
            return 3
        return 0
    print("usage: pxelab.py tftp-get HOST PORT REMOTE_NAME > FILE", file=sys.stderr)
    return 2


class TftpServer:
    """tftpd-hpa ``--secure`` serving `root` inside a private network namespace, plus a real client.

    >>> with TftpServer(tftp_root) as srv:
    ...     data = srv.fetch("pxelinux.cfg/default")
    """

    def __init__(self, root: Path, port: int = 69) -> None:
        self.root = Path(root)
        self.port = port
        self.address = SERVER_IP
        self._ns: Netns | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def netns(self) -> str:
        if self._ns is None:
            raise PxeLabError("TftpServer is not running")
        return self._ns.name

    def __enter__(self) -> TftpServer:
        ensure_deps()
        self._ns = Netns("pxelab-tftp").__enter__()
        try:
            self._ns.add_veth_with_address(self.address)
            self._proc = _start_in_tftpd(self._ns, self.root, self.address, self.port)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self._proc is not None:
                _stop(self._proc)
                self._proc = None
        finally:
            if self._ns is not None:
                self._ns.delete()
                self._ns = None

    def fetch(self, remote_name: str, timeout: float = 60.0) -> bytes:
        """Download `remote_name` over real TFTP from inside the namespace; TftpError on failure."""
        if self._proc is None or self._proc.poll() is not None:
            raise PxeLabError("in.tftpd is not running")
        argv = [sys.executable, "-I", os.fspath(Path(__file__).resolve()), "tftp-get", self.address,
                str(self.port), remote_name]
        try:
            proc = subprocess.run(self.netns_argv(argv), stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout + 10)
        except subprocess.TimeoutExpired as e:  # run() has already killed the client by its PID
            raise TftpError(remote_name, f"client did not finish in {timeout + 10:.0f}s") from e
        if proc.returncode == 0:
            return proc.stdout
        err = proc.stderr.decode(errors="replace").strip()
        if proc.returncode == 3:
            info = json.loads(err)
            raise TftpError(remote_name, info["message"], info["code"])
        raise TftpError(remote_name, f"client exited with status {proc.returncode}: {err}")

    def netns_argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` prefixed to run inside the server's namespace (e.g. to try another TFTP client)."""
        if self._ns is None:
            raise PxeLabError("TftpServer is not running")
        return self._ns.argv(argv)


# ---------------------------------------------------------------------------------------------------
# VM boots


def _qemu_argv(mac: str, timeout: int, netdev: str, accel: str, pcap: Path | None) -> list[str]:
    argv = [
        # --kill-after: a qemu that ignores TERM (stuck in TCG) still dies.
        "timeout", "--kill-after=5", str(timeout),
        QEMU, "-accel", accel, "-m", "512", "-smp", "1",
        # -nographic: SeaBIOS mirrors its VGA text to the serial port, so firmware, iPXE and pxelinux
        # messages land in the same log as the kernel and /init. -no-reboot turns the guest's poweroff,
        # a panic (panic=-1) or ONERROR reboot.c32 into qemu exiting.
        "-nographic", "-no-reboot", "-boot", "n",
        "-netdev", netdev,
        "-device", f"e1000,netdev=n0,mac={mac}",
        "-serial", "mon:stdio",
    ]
    if pcap is not None:
        argv += ["-object", f"filter-dump,id=f0,netdev=n0,file={os.fspath(pcap.resolve())}"]
    return argv


def _run_vm(argv: list[str], log_path: Path, timeout: int) -> str:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout + 15)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _stop(proc)
    text = console_text(log_path)
    log.info("VM %s exited rc=%s after %.1fs; marker: %s", log_path.name, rc, time.monotonic() - t0,
             booted_generation(text))
    return text


def console_text(log_path: Path) -> str:
    """The serial log as text. Firmware writes CR LF and stray bytes; neither matters to the markers."""
    return log_path.read_bytes().decode("utf-8", errors="replace").replace("\r", "")


def pxe_boot(tftp_root: Path, mac: str, log: Path, timeout: int = 180, *, accel: str = "tcg",
             pcap: Path | None = None) -> str:
    """PXE-boot a VM with NIC `mac` from `tftp_root` as a real node would; return its serial console.

    DHCP is dnsmasq, TFTP is tftpd-hpa ``--secure`` (the production server), both on a tap device in a
    namespace of its own, so boots may run in parallel. Files beside `log`: ``<log>.dnsmasq.log`` (DHCP
    transcript), ``.dnsmasq.pid`` and ``.dnsmasq.leases``; `pcap` records all guest traffic (see
    `tftp_requests`). Raises PxeLabError only for lab failures; whether the guest booted is for the caller
    to judge from the returned text (`booted_generation`).
    """
    ensure_deps()
    mac = normalize_mac(mac)
    log = log.resolve()  # dnsmasq chdir()s to /, so every path it gets must be absolute
    side = {k: log.with_name(f"{log.name}.dnsmasq.{k}") for k in ("log", "pid", "leases")}
    for p in side.values():
        p.unlink(missing_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    with Netns("pxelab-vm") as ns:
        try:
            ns.ip("tuntap", "add", "dev", "tap0", "mode", "tap")
            ns.ip("addr", "add", f"{SERVER_IP}/24", "dev", "tap0")
            ns.ip("-6", "addr", "add", f"{RA_PREFIX}1/64", "dev", "tap0", "nodad")
            ns.ip("link", "set", "tap0", "up")
            procs.append(_start_in_tftpd(ns, tftp_root, SERVER_IP, 69))
            dnsmasq = [
                _which("dnsmasq") or "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
                "--user=nobody", "--group=nogroup",
                # Real files: dnsmasq unlinks and recreates its pid file, which once replaced /dev/null.
                f"--pid-file={side['pid']}", f"--dhcp-leasefile={side['leases']}",
                f"--log-facility={side['log']}", "--log-dhcp",
                "--interface=tap0", "--bind-interfaces", "--except-interface=lo",
                f"--dhcp-range={DHCP_RANGE[0]},{DHCP_RANGE[1]},255.255.255.0,1h",
                f"--dhcp-boot=pxelinux.0,,{SERVER_IP}",
                # dnsmasq pings an address before offering it and drops the DISCOVER meanwhile; iPXE's
                # retransmit comes ~3 s later. Nothing else can hold an address on this private link.
                "--no-ping",
                "--enable-ra", f"--dhcp-range={RA_PREFIX},ra-only",
            ]
            dproc = subprocess.Popen(ns.argv(dnsmasq), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
            procs.append(dproc)
            _wait_listening(dproc, 67, "dnsmasq")
            netdev = "tap,id=n0,ifname=tap0,script=no,downscript=no"
            return _run_vm(ns.argv(_qemu_argv(mac, timeout, netdev, accel, pcap)), log, timeout)
        finally:
            for proc in reversed(procs):
                _stop(proc)


def pxe_boot_slirp(tftp_root: Path, mac: str, log: Path, timeout: int = 180, *, accel: str = "tcg",
                   pcap: Path | None = None) -> str:
    """Like `pxe_boot`, but DHCP and TFTP come from qemu's built-in slirp: cheaper, no servers.

    slirp's TFTP runs as root and follows any symlink, so it proves less than `pxe_boot` about what a
    production tftpd-hpa would serve (pair it with `audit_tftp_root`). `restrict=on` keeps the guest
    from reaching anything but slirp, and `unshare -n` gives slirp's own sockets an empty namespace.
    """
    ensure_deps()
    mac = normalize_mac(mac)
    root = tftp_root.resolve()
    if "," in os.fspath(root):
        raise PxeLabError(f"qemu -netdev cannot take a path with a comma: {root}")
    netdev = f"user,id=n0,tftp={root},bootfile=pxelinux.0,restrict=on"
    argv = ["unshare", "--net", *_qemu_argv(mac, timeout, netdev, accel, pcap)]
    return _run_vm(argv, log.resolve(), timeout)


_MARKER_RE = re.compile(rf"{MARKER} gen=(\S+) cmdline=([^\n]*)")


def booted_generation(console: str) -> str | None:
    """The generation id the guest's /init reported, or None if it never got that far.

    Requires the delimiter after the id, so ``gen=1`` never matches a console saying ``gen=10``. A lab VM
    boots once (-no-reboot), so there is at most one marker.
    """
    m = _MARKER_RE.search(console)
    return m.group(1) if m else None


def booted_cmdline(console: str) -> str | None:
    """The full kernel command line the guest reported (BOOT_IMAGE=, ip=, BOOTIF=, ...)."""
    m = _MARKER_RE.search(console)
    if m:
        return m.group(2).rstrip()
    m = re.search(rf"{NO_GEN_MARKER} cmdline=([^\n]*)", console)
    return m.group(1).rstrip() if m else None


# ---------------------------------------------------------------------------------------------------
# What the guest asked for, read from a qemu filter-dump pcap


@dataclass(frozen=True)
class TftpRequest:
    name: str
    error: str | None  # the server's ERROR text, None if it sent data


def tftp_requests(pcap: Path) -> list[TftpRequest]:
    """The TFTP read requests in `pcap`, in order, each with the server's error if it refused.

    pxelinux 6.04 no longer prints which config names it tries; the wire is the only place to see that
    pxelinux.cfg/01-<mac> was asked for and served.
    """
    raw = pcap.read_bytes()
    end = "<" if raw[:4] == b"\xd4\xc3\xb2\xa1" else ">"
    off = 24
    requests: list[list[str | None]] = []
    by_client_port: dict[int, int] = {}
    while off + 16 <= len(raw):
        incl, = struct.unpack_from(end + "I", raw, off + 8)
        frame = raw[off + 16: off + 16 + incl]
        off += 16 + incl
        if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:  # IPv4, UDP
            continue
        ihl = (frame[14] & 0x0F) * 4
        udp = frame[14 + ihl:]
        if len(udp) < 12:
            continue
        sport, dport = struct.unpack_from("!HH", udp)
        payload = udp[8:]
        op, = struct.unpack_from("!H", payload)
        if op == _RRQ and dport == 69:
            by_client_port[sport] = len(requests)
            requests.append([payload[2:].split(b"\0", 1)[0].decode(errors="replace"), None])
        elif op == _ERROR and dport in by_client_port:
            requests[by_client_port[dport]][1] = payload[4:].split(b"\0", 1)[0].decode(errors="replace")
    return [TftpRequest(str(n), e) for n, e in requests]


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
