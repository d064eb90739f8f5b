"""verify --repair: materialized trees and TFTP files changed in place are detected and restored; a damaged
object is stored again from a materialized tree that still holds the content."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import Cli
from test_deploy import PROFILE, _chroot
from treeutil import diff_snapshots, snapshot


def _deployed(tmp_path: Path, cli: Cli) -> tuple[Path, dict[str, str]]:
    assert cli("init").returncode == 0
    store = tmp_path / "store"
    (store / "profiles/web.toml").write_text(PROFILE)
    tree = _chroot(tmp_path / "chroot", "motd\n")
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho tool\n" * 50)
    os.chmod(tree / "usr/bin/tool", 0o755)
    os.symlink("tool", tree / "usr/bin/tool-link")
    assert cli("commit", tree, "-p", "web").returncode == 0
    assert cli("rollout").returncode == 0
    g = json.loads(cli("show", "web@1", "--json").stdout)
    return store, g


def test_tree_changed_in_place_is_detected_and_restored(tmp_path: Path, cli: Cli) -> None:
    store, g = _deployed(tmp_path, cli)
    tree = store / f"{g['gen_id']}-web-rootfs"
    assert cli("checkout", "web@1", tmp_path / "reference").returncode == 0
    os.chmod(tree / "usr/bin/tool", 0o777)
    with open(tree / "etc/motd", "r+b") as f:
        f.write(b"X")
    os.unlink(tree / "usr/share/big")
    (tree / "etc/planted").write_text("not in the manifest")
    os.unlink(tree / "usr/bin/tool-link")
    os.symlink("/bin/sh", tree / "usr/bin/tool-link")
    r = cli("verify", "--json")
    assert r.returncode == 6
    found = {(p["what"].split(":/", 1)[1], p["detail"].rsplit(": ", 1)[1].split()[0])
             for p in json.loads(r.stdout)["problems"] if p["kind"] == "tree"}
    assert found >= {("usr/bin/tool", "metadata"), ("etc/motd", "content"), ("usr/share/big", "missing"),
                     ("etc/planted", "added"), ("usr/bin/tool-link", "metadata")}, found
    r = cli("verify", "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "restored" in r.stdout
    def unlinked(snap: dict[bytes, dict[str, object]]) -> dict[bytes, dict[str, object]]:
        # A materialized tree's files are hardlinks to shared copies: link groups differ by design.
        return {k: {f: v for f, v in d.items() if f != "link_group"} for k, d in snap.items()}

    problems = diff_snapshots(unlinked(snapshot(tmp_path / "reference")), unlinked(snapshot(tree)))
    assert problems == [], problems[:10]
    assert cli("status").returncode == 0


def test_tftp_kernel_changed_in_place_is_restored(tmp_path: Path, cli: Cli) -> None:
    store, g = _deployed(tmp_path, cli)
    k = store / "tftpboot/imgstore/web" / g["gen_id"] / "vmlinuz"
    with open(k, "r+b") as f:
        f.write(b"EVIL")
    assert cli("status").returncode == 8
    r = cli("verify", "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    import blake3

    assert blake3.blake3(k.read_bytes()).hexdigest() == g["kernel"]
    assert cli("status").returncode == 0


def test_damaged_object_recovered_from_materialized_tree(tmp_path: Path, cli: Cli) -> None:
    store, g = _deployed(tmp_path, cli)
    loose = [p for p in (store / "objects").rglob("*") if p.is_file()]
    assert loose
    victim = loose[0]
    os.chmod(victim, 0o644)
    with open(victim, "r+b") as f:
        f.seek(20)
        b = f.read(1)
        f.seek(20)
        f.write(bytes([b[0] ^ 0x5A]))
    r = cli("verify")
    assert r.returncode == 6 and "needed by web@1" in r.stdout
    r = cli("verify", "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stored again from web@1:/" in r.stdout
    assert cli("checkout", "web@1", tmp_path / "co").returncode == 0
    assert (tmp_path / "co/usr/share/big").read_bytes() == (tmp_path / "chroot/usr/share/big").read_bytes()
