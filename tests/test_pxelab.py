"""Tests of the PXE lab itself, on a hand-made TFTP tree (no imgstore code).

They establish that the lab can tell generations apart before any imgstore test leans on it: the
per-MAC config wins over `default`, an atomically flipped config is what the next boot sees, and
tftpd-hpa --secure refuses what production would refuse.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pxelab
import pytest

MAC_A = "52:54:00:12:34:56"  # has its own pxelinux.cfg/01-... file
MAC_B = "52:54:00:ab:cd:ef"  # has none: falls back to `default`

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="the PXE lab needs root (network namespaces, tap, apt)")

Boot = Callable[..., str]


@dataclass(frozen=True)
class BootRun:
    console: str
    seconds: float
    log: Path


def _boot_all(jobs: list[tuple[Boot, Path, str, Path]]) -> list[BootRun]:
    """Run boots two at a time (the machine has 2 cores; TCG uses one each)."""

    def one(job: tuple[Boot, Path, str, Path]) -> BootRun:
        boot, root, mac, log = job
        t0 = time.monotonic()
        console = boot(root, mac, log, pcap=log.with_suffix(".pcap"))
        return BootRun(console, time.monotonic() - t0, log)

    with ThreadPoolExecutor(max_workers=2) as ex:
        return list(ex.map(one, jobs))


def _explain(run: BootRun) -> str:
    tail = "\n".join(run.console.splitlines()[-25:])
    return f"after {run.seconds:.1f}s, log {run.log}; console tail:\n{tail}"


def _atomic_write(path: Path, text: str) -> None:
    """What imgstore's flip must do: readers (the TFTP server) see the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    # mkstemp-style temp files can be 0600; tftpd-hpa serves as nobody and would answer "Permission
    # denied", so pxelinux would silently fall back to `default`.
    tmp.chmod(0o644)
    os.rename(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _add_generation(root: Path, gen: str, initrd: Path) -> None:
    d = root / "gen" / gen
    d.mkdir(parents=True)
    shutil.copyfile(pxelab.guest_kernel(), d / "vmlinuz")
    shutil.copyfile(initrd, d / "initrd.gz")
    for f in (d / "vmlinuz", d / "initrd.gz"):
        f.chmod(0o644)


def _config(gen: str) -> str:
    return pxelab.pxelinux_config(gen, f"gen/{gen}/vmlinuz", f"gen/{gen}/initrd.gz")


@pytest.fixture(scope="session")
def lab_initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not IS_ROOT:
        pytest.skip("the PXE lab needs root (network namespaces, tap, apt)")
    pxelab.ensure_deps()
    out = tmp_path_factory.mktemp("initrd") / "initrd.gz"
    pxelab.build_initrd(out)
    return out


@pytest.fixture
def tftp_tree(tmp_path: Path, lab_initrd: Path) -> Iterator[Path]:
    """/tftpboot-like: gens aaa/bbb/ccc; default -> bbb; 01-<MAC_A> -> aaa. Plain world-readable copies."""
    root = tmp_path / "tftp"
    pxelab.install_bootloader(root)
    for gen in ("aaa", "bbb", "ccc"):
        _add_generation(root, gen, lab_initrd)
    cfg = root / "pxelinux.cfg"
    cfg.mkdir()
    _atomic_write(cfg / "default", _config("bbb"))
    _atomic_write(cfg / pxelab.mac_config_name(MAC_A), _config("aaa"))
    assert pxelab.audit_tftp_root(root) == []
    yield root


# --------------------------------------------------------------------------------------------------
# Pure helpers (no root needed)


def test_booted_generation_needs_the_delimiter() -> None:
    console = "noise\nIMGSTORE-BOOTED gen=10 cmdline=BOOT_IMAGE=x imgstore.gen=10\n[ 1.0] reboot: Power off\n"
    assert pxelab.booted_generation(console) == "10"
    assert pxelab.booted_generation(console.replace("gen=10 ", "gen=1 ")) == "1"
    assert pxelab.booted_cmdline(console) == "BOOT_IMAGE=x imgstore.gen=10"
    assert pxelab.booted_generation("IMGSTORE-NO-GEN cmdline=BOOT_IMAGE=x") is None
    assert pxelab.booted_cmdline("IMGSTORE-NO-GEN cmdline=BOOT_IMAGE=x\n") == "BOOT_IMAGE=x"
    assert pxelab.booted_generation("PXELINUX 6.04 ... boot:") is None


def test_mac_config_name_is_lowercase_dashed() -> None:
    assert pxelab.mac_config_name("52:54:00:AB:CD:EF") == "01-52-54-00-ab-cd-ef"
    assert pxelab.mac_config_name("52-54-00-ab-cd-ef") == "01-52-54-00-ab-cd-ef"
    for bad in ("52:54:00:ab:cd", "01:00:5e:00:00:01", "zz:54:00:ab:cd:ef"):
        with pytest.raises(ValueError):
            pxelab.mac_config_name(bad)


def test_audit_flags_what_tftpd_hpa_secure_cannot_serve(tmp_path: Path) -> None:
    root, store = tmp_path / "root", tmp_path / "store"
    (root / "sub").mkdir(parents=True)
    store.mkdir()
    (store / "obj").write_text("x")
    (root / "ok").write_text("x")
    (root / "ok").chmod(0o644)
    (root / "private").write_text("x")
    (root / "private").chmod(0o600)
    (root / "rel-inside").symlink_to("ok")
    (root / "rel-escape").symlink_to("../store/obj")
    (root / "abs").symlink_to(root / "ok")
    problems = "\n".join(pxelab.audit_tftp_root(root))
    assert "private: not world-readable" in problems
    assert "rel-escape: symlink escapes" in problems
    assert "abs: absolute symlink" in problems
    assert "rel-inside" not in problems and "ok:" not in problems


@needs_root
@pytest.mark.root
def test_initrd_is_byte_reproducible(tmp_path: Path, lab_initrd: Path) -> None:
    again = tmp_path / "again.gz"
    pxelab.build_initrd(again)
    assert again.read_bytes() == lab_initrd.read_bytes()
    assert again.stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------------------------------
# Real TFTP server


@needs_root
@pytest.mark.root
@pytest.mark.netns
def test_tftp_server_serves_and_refuses_like_production(tftp_tree: Path, tmp_path: Path) -> None:
    root = tftp_tree
    store = tmp_path / "store"
    store.mkdir()
    (store / "kernel").write_bytes(b"outside the root")
    (store / "kernel").chmod(0o644)
    (root / "escape").symlink_to("../store/kernel")  # relative, leaves the root
    (root / "abs-escape").symlink_to(store / "kernel")
    (root / "inside").symlink_to("gen/aaa/initrd.gz")  # relative, stays inside: fine
    (root / "private").write_bytes(b"0600")
    (root / "private").chmod(0o600)

    with pxelab.TftpServer(root) as srv:
        assert srv.fetch("pxelinux.cfg/default") == _config("bbb").encode()
        # A multi-block file (16k blocks of 512 bytes) survives the trip intact.
        assert srv.fetch("gen/aaa/vmlinuz") == pxelab.guest_kernel().read_bytes()
        assert srv.fetch("inside") == (root / "gen/aaa/initrd.gz").read_bytes()

        for name in ("escape", "abs-escape", "../store/kernel", "gen/zzz/vmlinuz"):
            with pytest.raises(pxelab.TftpError, match="File not found") as err:
                srv.fetch(name)
            assert err.value.code == 1 and err.value.remote_name == name
        with pytest.raises(pxelab.TftpError, match="Permission denied"):
            srv.fetch("private")
        netns = srv.netns
    assert netns not in os.listdir("/run/netns"), "netns left behind"


# --------------------------------------------------------------------------------------------------
# Real PXE boots


@needs_root
@pytest.mark.root
@pytest.mark.netns
@pytest.mark.vm
def test_per_mac_config_wins_and_other_mac_falls_back_to_default(tftp_tree: Path, tmp_path: Path) -> None:
    a, b = _boot_all([
        (pxelab.pxe_boot, tftp_tree, MAC_A, tmp_path / "a.log"),
        (pxelab.pxe_boot, tftp_tree, MAC_B, tmp_path / "b.log"),
    ])
    assert pxelab.booted_generation(a.console) == "aaa", _explain(a)
    assert pxelab.booted_generation(b.console) == "bbb", _explain(b)
    # The node knows its own MAC (IPAPPEND 3), so generation and node can be tied together in logs.
    assert f"BOOTIF={pxelab.mac_config_name(MAC_B)}" in (pxelab.booted_cmdline(b.console) or "")

    # dict.fromkeys: a slow answer can make the firmware resend a request; order is what matters.
    names_a = list(dict.fromkeys(
        r.name for r in pxelab.tftp_requests(a.log.with_suffix(".pcap")) if r.error is None
    ))
    assert names_a == ["pxelinux.0", "ldlinux.c32", f"pxelinux.cfg/{pxelab.mac_config_name(MAC_A)}",
                       "gen/aaa/vmlinuz", "gen/aaa/initrd.gz"]
    requests_b = pxelab.tftp_requests(b.log.with_suffix(".pcap"))
    assert (f"pxelinux.cfg/{pxelab.mac_config_name(MAC_B)}", "File not found") in [
        (r.name, r.error) for r in requests_b
    ]
    assert ("pxelinux.cfg/default", None) in [(r.name, r.error) for r in requests_b]


@needs_root
@pytest.mark.root
@pytest.mark.netns
@pytest.mark.vm
def test_atomic_flip_is_seen_by_the_next_boot(tftp_tree: Path, tmp_path: Path) -> None:
    cfg = tftp_tree / "pxelinux.cfg" / pxelab.mac_config_name(MAC_A)
    before = cfg.stat().st_ino
    # ccc, not bbb: a flip that broke the file (unreadable, torn) would fall back to default = bbb.
    _atomic_write(cfg, _config("ccc"))
    assert cfg.stat().st_ino != before and cfg.stat().st_mode & 0o777 == 0o644
    assert pxelab.audit_tftp_root(tftp_tree) == []

    # The same tree through slirp's built-in TFTP, for comparison with the production server.
    hpa, slirp = _boot_all([
        (pxelab.pxe_boot, tftp_tree, MAC_A, tmp_path / "hpa.log"),
        (pxelab.pxe_boot_slirp, tftp_tree, MAC_A, tmp_path / "slirp.log"),
    ])
    assert pxelab.booted_generation(hpa.console) == "ccc", _explain(hpa)
    assert pxelab.booted_generation(slirp.console) == "ccc", _explain(slirp)
    assert "IMGSTORE-BOOTED gen=aaa " not in hpa.console + slirp.console


@needs_root
@pytest.mark.root
@pytest.mark.netns
@pytest.mark.vm
def test_kernel_symlink_out_of_the_root_fails_only_under_tftpd_hpa(tftp_tree: Path, tmp_path: Path) -> None:
    """The trap slirp hides: a generation linked from a store outside the TFTP root."""
    store = tmp_path / "store"
    store.mkdir()
    shutil.copyfile(pxelab.guest_kernel(), store / "vmlinuz")
    (store / "vmlinuz").chmod(0o644)
    kernel = tftp_tree / "gen" / "ccc" / "vmlinuz"
    kernel.unlink()
    kernel.symlink_to("../../../store/vmlinuz")
    _atomic_write(tftp_tree / "pxelinux.cfg" / pxelab.mac_config_name(MAC_A), _config("ccc"))
    assert any("escapes" in p for p in pxelab.audit_tftp_root(tftp_tree))

    hpa, slirp = _boot_all([
        (pxelab.pxe_boot, tftp_tree, MAC_A, tmp_path / "hpa.log"),
        (pxelab.pxe_boot_slirp, tftp_tree, MAC_A, tmp_path / "slirp.log"),
    ])
    assert pxelab.booted_generation(hpa.console) is None, _explain(hpa)
    assert "Loading gen/ccc/vmlinuz" in hpa.console and "failed" in hpa.console, _explain(hpa)
    # ONERROR reboot.c32 + -no-reboot: the VM ends at once instead of idling at `boot:` until timeout.
    assert hpa.seconds < 60, _explain(hpa)
    assert pxelab.booted_generation(slirp.console) == "ccc", _explain(slirp)
