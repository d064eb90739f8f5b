"""Permissions: whatever the operator's umask, the store is writable by its owner only, materialized trees carry
exactly the modes their manifests record, TFTP files are world-readable and nobody else's to write, and nothing
from inside a rootfs reaches the TFTP root except the kernel and initrd."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Cli
from test_deploy import PROFILE, _chroot

MARKER = b"SHADOW-MARKER-9f86d081884c7d65"
BOOTLOADER = ("pxelinux.0", "ldlinux.c32", "reboot.c32", "libcom32.c32")


def _runner(store: Path, umask: int) -> Cli:
    def run(*args: str | os.PathLike[str], **_: object) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env["IMGSTORE_ROOT"] = os.fspath(store)
        env.pop("IMGSTORE_FAULT", None)
        argv = [sys.executable, "-m", "imgstore", *(os.fspath(a) for a in args)]
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600,
                           preexec_fn=lambda: os.umask(umask))
        assert r.returncode == 0, (args, r.returncode, r.stderr)
        return r

    return run


def _tree(path: Path) -> Path:
    tree = _chroot(path, "one\n")
    (tree / "etc/shadow").write_bytes(b"root:" + MARKER + b":19000:0:99999:7:::\n")
    os.chmod(tree / "etc/shadow", 0o600)
    (tree / "etc/world-writable").write_text("as the image says\n")
    os.chmod(tree / "etc/world-writable", 0o666)
    (tree / "tmp").mkdir()
    os.chmod(tree / "tmp", 0o1777)
    (tree / "root").mkdir()
    os.chmod(tree / "root", 0o700)
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/passwd").write_bytes(b"\x7fELF passwd")
    os.chmod(tree / "usr/bin/passwd", 0o4755)
    (tree / "srv/shared").mkdir(parents=True)
    os.chmod(tree / "srv/shared", 0o2775)
    return tree


def _deploy_everything(tmp_path: Path, umask: int) -> tuple[Path, Path, Path]:
    """Every command that writes to the store or the TFTP root, run under `umask`. Returns (store, tftp, tree)."""
    store = tmp_path / "store"
    run = _runner(store, umask)
    loader = tmp_path / "syslinux"
    loader.mkdir()
    for name in BOOTLOADER:
        (loader / name).write_bytes(b"bootloader " + name.encode())
        os.chmod(loader / name, 0o600)
    run("init")
    (store / "profiles/web.toml").write_text(PROFILE + f'bootloader_dir = "{loader}"\n')
    tree = _tree(tmp_path / "chroot")
    for i in range(1, 5):
        (tree / "etc/motd").write_text(f"gen {i}\n")
        for old in (tree / "etc").glob("only-*"):
            old.unlink()
        (tree / f"etc/only-{i}").write_text(f"small, only in generation {i}\n")
        run("commit", tree, "-p", "web", "-m", f"gen {i}")
    run("node", "add", "www1", "--mac", "52:54:00:00:00:01", "--ip", "10.0.1.1", "-p", "web")
    run("node", "add", "www2", "--mac", "52:54:00:00:00:02", "-p", "web")
    run("rollout", "web@3")
    run("rollout", "web@4")
    run("pin", "www1", "web@1")
    run("rollout", "--canary", "www2")
    run("materialize", "web@2")
    run("gc", "--keep", "1")  # removes web@2: its tree, and a pack rewritten without its objects
    run("sync")
    run("verify", "--repair")
    run("status")
    return store, store / "tftpboot", tree


def _mode(p: str | Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o000], ids=["umask022", "umask002", "umask000"])
def test_store_objects_and_trees_are_writable_by_their_owner_only(tmp_path: Path, umask: int) -> None:
    store, _tftp, tree = _deploy_everything(tmp_path, umask)
    file_modes = {_mode(p) for p in tree.rglob("*") if p.is_file() and not p.is_symlink()} | {0o644}
    trees = {p.name for p in store.iterdir() if p.name.endswith("-rootfs")}
    assert len(trees) == 3  # web@1, web@3, web@4; web@2's went with gc
    bad = []
    for dirpath, dirnames, filenames in os.walk(store):
        for n in [""] + dirnames + filenames if dirpath == os.fspath(store) else dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, store)
            top = rel.split("/")[0]
            if os.path.islink(p):
                continue
            if top in trees:  # a tree entry: exactly what the manifest says (the chroot as committed)
                inside = rel.split("/", 1)[1] if "/" in rel else "."
                orig = tree / inside
                if os.path.lexists(orig) and _mode(p) != _mode(orig):
                    bad.append(f"{rel}: {_mode(p):04o}, the manifest says {_mode(orig):04o}")
            elif top == "mat" and os.path.isfile(p):  # a shared copy carries its entry's mode
                if _mode(p) not in file_modes:
                    bad.append(f"{rel}: {_mode(p):04o} is no file's mode in the manifest")
            elif _mode(p) & 0o022:
                bad.append(f"{rel}: {_mode(p):04o} is writable by group or others")
    assert not bad, f"umask {umask:03o}:\n" + "\n".join(bad)


@pytest.mark.parametrize("umask", [0o022, 0o000, 0o077], ids=["umask022", "umask000", "umask077"])
def test_tftp_files_are_world_readable_and_nobody_elses_to_write(tmp_path: Path, umask: int) -> None:
    _store, tftp, _tree = _deploy_everything(tmp_path, umask)
    for name in BOOTLOADER:
        assert (tftp / name).is_file()
    assert {p.name for p in (tftp / "pxelinux.cfg").iterdir() if not p.is_dir()} == {
        "default", "01-52-54-00-00-00-01", "01-52-54-00-00-00-02"}
    bad = []
    real_root = os.path.realpath(tftp)
    for dirpath, dirnames, filenames in os.walk(tftp):
        for n in [""] + dirnames + filenames if dirpath == os.fspath(tftp) else dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, tftp)
            m = _mode(p)
            if os.path.islink(p):
                # tftpd --secure chroots into the TFTP root: only a relative link that stays inside works.
                target = os.readlink(p)
                resolved = os.path.realpath(p)
                if target.startswith("/") or os.path.commonpath([resolved, real_root]) != real_root:
                    bad.append(f"{rel}: a symlink to {target}, which tftpd --secure cannot follow")
                elif not os.path.isfile(p) or not os.stat(p).st_mode & 0o004:
                    bad.append(f"{rel}: a symlink to {target}, which nobody can read")
                continue
            if os.path.isdir(p) and m & 0o005 != 0o005:
                bad.append(f"{rel}/: {m:04o}, tftpd (nobody) cannot enter it")
            elif os.path.isfile(p) and not m & 0o004:
                bad.append(f"{rel}: {m:04o}, tftpd (nobody) cannot read it")
            if m & 0o022:
                bad.append(f"{rel}: {m:04o} is writable by group or others")
    assert not bad, f"umask {umask:03o}:\n" + "\n".join(bad)


def _grep(root: Path, needle: bytes) -> list[str]:
    hits = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if needle in os.fsencode(n):
                hits.append(f"name {p}")
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    if needle in f.read():
                        hits.append(f"content {p}")
    return hits


def test_nothing_from_inside_the_rootfs_reaches_the_tftp_root(tmp_path: Path, cli: Cli) -> None:
    store, tftp, tree = _deploy_everything(tmp_path, 0o022)
    # More places the marker could leak from: boot-adjacent files, metadata, names.
    (tree / "boot/config-6.1.0-28-amd64").write_bytes(b"CONFIG_X=" + MARKER + b"\n")
    (tree / "boot/System.map-6.1.0-28-amd64").write_bytes(MARKER)
    (tree / "boot/grub").mkdir()
    (tree / "boot/grub/grub.cfg").write_bytes(b"# " + MARKER)
    (tree / "etc/os-release").write_bytes(b'PRETTY_NAME="' + MARKER + b'"\n')
    (tree / "etc/hostname").write_bytes(MARKER + b"\n")
    (tree / ("etc/" + MARKER.decode())).write_text("a name\n")
    run = _runner(store, 0o022)
    run("commit", tree, "-p", "web", "-m", "with markers")
    run("rollout")
    run("pin", "www1", "web@5")
    run("rollback")
    run("sync")
    assert (tftp / "pxelinux.cfg/default").is_file()
    assert _grep(tftp, MARKER) == []
    _ = cli


def test_a_kernel_link_to_a_secret_never_publishes_it(tmp_path: Path, cli: Cli) -> None:
    """/vmlinuz and /initrd.img are links the rootfs controls; pointed at /etc/shadow they must not copy it
    world-readable into the TFTP root."""
    assert cli("init").returncode == 0
    store = tmp_path / "store"
    (store / "profiles/web.toml").write_text(PROFILE)
    tree = _tree(tmp_path / "chroot")
    os.symlink("etc/shadow", tree / "vmlinuz")
    os.symlink("/etc/shadow", tree / "initrd.img")
    r = cli("commit", tree, "-p", "web")
    if r.returncode != 0:  # refusing is fine, if it says why in one line
        err = r.stderr.strip()
        assert len(err.splitlines()) == 1 and "vmlinuz" in err and "Traceback" not in err, err
        return
    r = cli("rollout")
    assert r.returncode == 0, r.stderr
    assert _grep(store / "tftpboot", MARKER) == []
