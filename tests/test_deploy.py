"""Deploying: materialize, rollout, canary, rollback, pin, drift and sync, adopt, nodes; all on real files."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Cli, disk_state

PROFILE = """
[commit]
require_kernel = true
[boot]
serial = "0 115200"
append = "console=ttyS0 nfsroot={nfs_server}:{root},{nfs_options}"
[deploy]
tftp_root = "tftpboot"
root_link = "netboot/root"
serve_default = true
nfs_server = "10.0.0.1"
nfs_options = "ro,actimeo=120"
"""


def _chroot(path: Path, motd: str) -> Path:
    (path / "etc").mkdir(parents=True, exist_ok=True)
    (path / "boot").mkdir(exist_ok=True)
    (path / "usr/share").mkdir(parents=True, exist_ok=True)
    (path / "etc/motd").write_text(motd)
    (path / "usr/share/big").write_bytes(b"shared content " * 100_000)
    (path / "boot/vmlinuz-6.1.0-28-amd64").write_bytes(b"KERNEL" * 1000)
    (path / "boot/initrd.img-6.1.0-28-amd64").write_bytes(b"INITRD" * 500)
    return path


@pytest.fixture
def fleet(tmp_path: Path, cli: Cli) -> Path:
    """A store with web@1..3 committed and two nodes; nothing rolled out yet."""
    assert cli("init").returncode == 0
    store = tmp_path / "store"
    (store / "profiles/web.toml").write_text(PROFILE)
    tree = _chroot(tmp_path / "chroot", "one\n")
    for n, motd in enumerate(("one\n", "two\n", "three\n"), 1):
        (tree / "etc/motd").write_text(motd)
        r = cli("commit", tree, "-p", "web", "-m", f"gen {n}")
        assert r.returncode == 0, r.stderr
    assert cli("node", "add", "www1", "--mac", "52:54:00:AB:CD:EF", "--ip", "10.0.1.1", "-p", "web").returncode == 0
    r = cli("node", "add", "www3", "--mac", "5254.0012.3456", "--ip", "10.0.1.3", "-p", "web")
    assert r.returncode == 0, r.stderr
    return store


def _gen(cli: Cli, ref: str) -> dict[str, str]:
    return json.loads(cli("show", ref, "--json").stdout)  # type: ignore[no-any-return]


def _booted(cfg: Path) -> str:
    text = cfg.read_text()
    return text.split("imgstore.gen=")[1].split()[0]


def test_rollout_canary_rollback_story(fleet: Path, cli: Cli) -> None:
    tftp = fleet / "tftpboot/pxelinux.cfg"
    g = {n: _gen(cli, f"web@{n}") for n in (1, 2, 3)}
    r = cli("rollout", "web@2", "--json")
    assert r.returncode == 0, r.stderr
    ch = json.loads(r.stdout)
    assert ch["to_ref"] == "web@2" and sorted(ch["nodes_moved"]) == ["www1", "www3"]
    www1, www3, default = tftp / "01-52-54-00-ab-cd-ef", tftp / "01-52-54-00-12-34-56", tftp / "default"
    assert _booted(www1) == _booted(www3) == _booted(default) == g[2]["gen_id"]
    root_link = fleet / "netboot/root"
    assert os.readlink(root_link) == str(fleet / f"{g[2]['gen_id']}-web-rootfs")
    assert (root_link / "etc/motd").read_text() == "two\n"

    # Canary: only www3 moves.
    r = cli("rollout", "--canary", "www3")
    assert r.returncode == 0, r.stderr
    assert _booted(www3) == g[3]["gen_id"] and _booted(www1) == g[2]["gen_id"] == _booted(default)
    assert os.readlink(root_link).startswith(str(fleet / g[2]["gen_id"]))
    # Each node's APPEND carries its own generation's tree.
    assert f"nfsroot=10.0.0.1:{fleet}/{g[3]['gen_id']}-web-rootfs,ro,actimeo=120" in www3.read_text()
    assert f"nfsroot=10.0.0.1:{fleet}/{g[2]['gen_id']}-web-rootfs,ro,actimeo=120" in www1.read_text()
    for f in (www1, www3, default):
        text = f.read_text()
        assert "ONERROR reboot.c32" in text and "IPAPPEND 3" in text and "SERIAL 0 115200" in text
        assert stat.S_IMODE(f.stat().st_mode) == 0o644

    # Undo the canary, then roll the profile forward and back.
    assert cli("rollback", "--node", "www3").returncode == 0
    assert _booted(www3) == g[2]["gen_id"]
    assert cli("rollout", "--canary", "52-54-00-12-34-56").returncode == 0  # by MAC
    assert cli("rollout").returncode == 0  # latest = web@3; the canary pin equal to it is released
    st = json.loads(cli("status", "--json").stdout)
    assert {n["name"]: (n["pinned"], n["effective"]) for n in st["nodes"]} == {
        "www1": (None, "web@3"), "www3": (None, "web@3")}
    assert st["drift"] == []
    assert cli("rollout", "web@1").returncode == 0
    # rollback walks back through the activation history: 1 -> 3 -> 2.
    assert json.loads(cli("rollback", "--json").stdout)["to_ref"] == "web@3"
    assert json.loads(cli("rollback", "--json").stdout)["to_ref"] == "web@2"
    assert _booted(www1) == g[2]["gen_id"]
    r = cli("rollback")
    assert r.returncode == 3 and "no earlier active generation" in r.stderr
    assert json.loads(cli("rollback", "--to", "web@1", "--json").stdout)["to_ref"] == "web@1"
    hist = json.loads(cli("history", "--json").stdout)
    assert [h["kind"] for h in hist] == ["rollout", "canary", "rollback-node", "canary", "rollout", "rollout",
                                         "rollback", "rollback", "rollout"]
    assert hist[1]["node"] == "www3" and hist[1]["from"] == "web@2" and hist[1]["to"] == "web@3"
    assert cli("pin", "www1", "web@3").returncode == 0 and _booted(www1) == g[3]["gen_id"]
    assert cli("unpin", "www1").returncode == 0 and _booted(www1) == g[1]["gen_id"]
    assert cli("status").returncode == 0
    assert cli("verify").returncode == 0


def test_tftp_files_are_hardlinks_world_readable_never_symlinks(fleet: Path, cli: Cli) -> None:
    assert cli("rollout").returncode == 0
    g = _gen(cli, "web@3")
    d = fleet / "tftpboot/imgstore/web" / g["gen_id"]
    for name, digest in (("vmlinuz", g["kernel"]), ("initrd.img", g["initrd"])):
        f = d / name
        st = f.lstat()
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
        assert st.st_nlink >= 2  # a hardlink to the shared copy, not a second copy
        import blake3

        assert blake3.blake3(f.read_bytes()).hexdigest() == digest
    root = os.path.realpath(fleet / "tftpboot")
    links = 0
    for dirpath, dirnames, filenames in os.walk(fleet / "tftpboot"):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if os.path.islink(p):
                # Only relative links that stay inside the root: tftpd-hpa --secure chroots into it.
                links += 1
                assert not os.readlink(p).startswith("/"), p
                assert os.path.realpath(p).startswith(root + "/"), p
            assert os.stat(p).st_mode & 0o004, p  # readable by nobody
            assert not os.stat(p).st_mode & 0o002, p  # writable by nobody else
    assert links == 4  # the profile's link, default and two per-MAC names
    # Nothing from inside the rootfs leaks into the TFTP root.
    assert not any("motd" in fs for _, _, fs in os.walk(fleet / "tftpboot"))


def test_materialized_generations_share_storage(fleet: Path, cli: Cli) -> None:
    assert cli("materialize", "web@1").returncode == 0
    assert cli("materialize", "web@2").returncode == 0
    g1, g2 = _gen(cli, "web@1"), _gen(cli, "web@2")
    t1, t2 = fleet / f"{g1['gen_id']}-web-rootfs", fleet / f"{g2['gen_id']}-web-rootfs"
    assert (t1 / "usr/share/big").stat().st_ino == (t2 / "usr/share/big").stat().st_ino
    assert (t1 / "etc/motd").read_text() == "one\n" and (t2 / "etc/motd").read_text() == "two\n"
    du = subprocess.run(["du", "-sk", "--count-links", t1, t2], capture_output=True, text=True).stdout
    du_shared = subprocess.run(["du", "-sk", t1, t2], capture_output=True, text=True).stdout
    total_shared = sum(int(line.split()[0]) for line in du_shared.splitlines())
    total_counted = sum(int(line.split()[0]) for line in du.splitlines())
    assert total_shared < 0.6 * total_counted  # the second tree costs about its directories only
    r = cli("materialize", "web@1")
    assert "already materialized" in r.stdout


def test_dry_run_writes_nothing(fleet: Path, cli: Cli) -> None:
    assert cli("rollout", "web@1").returncode == 0
    before = disk_state(fleet)
    for args in (("rollout", "--dry-run"), ("rollout", "--canary", "www3", "--dry-run"), ("rollback", "--to", "web@2",
                 "--dry-run"), ("pin", "www1", "web@2", "--dry-run"), ("sync", "--dry-run")):
        r = cli(*args)
        assert r.returncode == 0, (args, r.stderr)
    r = cli("rollout", "--dry-run", "--json")
    assert json.loads(r.stdout)["dry_run"] is True
    assert disk_state(fleet) == before


def test_bad_input(fleet: Path, cli: Cli) -> None:
    assert cli("rollout", "web@1").returncode == 0
    before = disk_state(fleet)
    cases = [
        (("rollout", "--canary", "nosuch"), 3, "no node 'nosuch'"),
        (("rollout", "web@9"), 3, "no generation"),
        (("rollout", "-p", "nosuch"), 3, "profile 'nosuch'"),
        (("rollback",), 3, "no earlier active generation"),
        (("rollback", "--node", "www1"), 2, "not pinned"),
        (("pin", "www1", "web@77"), 3, "no generation"),
        (("node", "add", "www9", "--mac", "52:54:00:ab:cd:ef", "-p", "web"), 8, "already belongs to node 'www1'"),
        (("node", "add", "www1", "--mac", "52:54:00:00:00:01", "-p", "web"), 8, "already exists"),
        (("node", "add", "www9", "--mac", "52:54:00:zz:00:01", "-p", "web"), 2, "MAC"),
        (("node", "add", "www9", "--mac", "../../etc/passwd", "-p", "web"), 2, "MAC"),
        (("node", "add", "../evil", "--mac", "52:54:00:00:00:02", "-p", "web"), 2, "node name"),
        (("node", "add", "www9", "--mac", "52:54:00:00:00:03", "-p", "nosuch"), 3, "profile"),
        (("node", "show", "nosuch"), 3, "no node"),
        (("node", "rm", "nosuch"), 3, "no node"),
        (("node", "import-dhcpd", fleet / "missing.conf", "-p", "web"), 3, "does not exist"),
    ]
    for args, code, words in cases:
        r = cli(*args)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert words.lower() in r.stderr.lower() and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert disk_state(fleet) == before


def test_no_kernel_generation_cannot_be_rolled_out(tmp_path: Path, cli: Cli) -> None:
    assert cli("init").returncode == 0
    (tmp_path / "store/profiles/web.toml").write_text(PROFILE)
    (tmp_path / "empty/etc").mkdir(parents=True)
    assert cli("commit", tmp_path / "empty", "-p", "web", "--no-kernel").returncode == 0
    r = cli("rollout")
    assert r.returncode == 2 and "no kernel" in r.stderr


def test_drift_detected_and_repaired(fleet: Path, cli: Cli) -> None:
    assert cli("rollout", "web@2").returncode == 0
    assert cli("rollout", "--canary", "www3").returncode == 0
    tftp = fleet / "tftpboot"
    www1 = tftp / "pxelinux.cfg/01-52-54-00-ab-cd-ef"
    # A hand edit through the per-MAC link changes the generation's shared config ...
    shared_cfg = Path(os.path.realpath(www1)).name
    www1.write_text(www1.read_text().replace("TIMEOUT 0", "TIMEOUT 50"))
    default = tftp / "pxelinux.cfg/default"
    text = default.read_text()
    default.unlink()
    default.write_text(text)  # ... and a link replaced by a hand-written file
    (tftp / "pxelinux.cfg/01-52-54-00-12-34-56").unlink()
    link = fleet / "netboot/root"
    os.unlink(link)
    os.symlink("/somewhere/else", link)
    g2 = _gen(cli, "web@2")
    kernel = tftp / "imgstore/web" / g2["gen_id"] / "vmlinuz"
    with open(kernel, "r+b") as f:  # changed in place (it is a hardlink to the shared copy)
        f.write(b"X")
    (tftp / "pxelinux.cfg/01-00-11-22-33-44-55").write_text("# imgstore: node gone\n")
    r = cli("status", "--json")
    assert r.returncode == 8
    kinds = {(d["kind"], Path(d["path"]).name) for d in json.loads(r.stdout)["drift"]}
    assert kinds >= {("modified", shared_cfg), ("not-a-link", "default"), ("missing", "01-52-54-00-12-34-56"),
                     ("wrong-target", "root"), ("modified", "vmlinuz"), ("stale", "01-00-11-22-33-44-55")}, kinds
    assert all(d["fix"] == "imgstore sync" for d in json.loads(r.stdout)["drift"])
    r = cli("sync")
    assert r.returncode == 0, r.stderr
    r = cli("status")
    assert r.returncode == 0, r.stdout
    import blake3

    assert blake3.blake3(kernel.read_bytes()).hexdigest() == g2["kernel"]


def test_node_commands_and_dhcpd(fleet: Path, tmp_path: Path, cli: Cli) -> None:
    assert cli("rollout", "web@1").returncode == 0
    conf = tmp_path / "dhcpd.conf"
    conf.write_text("""
# the original diskless web cluster
subnet 10.0.1.0 netmask 255.255.255.0 {
  group {
    next-server 10.0.0.1;
    filename "pxelinux.0";
    host www5 { hardware ethernet 00:E0:81:2F:64:70; fixed-address 10.0.1.5; }
    host www6 { hardware ethernet 00:e0:81:2f:64:71; fixed-address 10.0.1.6; option host-name "www6"; }
  }
}
""")
    r = cli("node", "import-dhcpd", conf, "-p", "web")
    assert r.returncode == 0, r.stderr
    assert (fleet / "tftpboot/pxelinux.cfg/01-00-e0-81-2f-64-70").exists()
    names = [n["name"] for n in json.loads(cli("node", "list", "--json").stdout)]
    assert names == ["www1", "www3", "www5", "www6"]
    out = cli("node", "export-dhcpd", "--next-server", "10.0.0.1").stdout
    assert 'filename "pxelinux.0"' in out and "hardware ethernet 00:e0:81:2f:64:70" in out
    assert "dhcp-host=00:e0:81:2f:64:71,10.0.1.6,www6" in cli("node", "export-dnsmasq").stdout
    # Re-importing the same file is refused as a whole: nothing half-imported.
    r = cli("node", "import-dhcpd", conf, "-p", "web")
    assert r.returncode == 8
    assert cli("node", "edit", "www5", "--mac", "00:e0:81:2f:64:7f").returncode == 0
    assert not (fleet / "tftpboot/pxelinux.cfg/01-00-e0-81-2f-64-70").exists()
    assert (fleet / "tftpboot/pxelinux.cfg/01-00-e0-81-2f-64-7f").exists()
    assert cli("node", "rm", "www5").returncode == 0
    assert not (fleet / "tftpboot/pxelinux.cfg/01-00-e0-81-2f-64-7f").exists()
    shown = json.loads(cli("node", "show", "00-E0-81-2F-64-71", "--json").stdout)
    assert shown["name"] == "www6" and shown["effective"] == "web@1"
    assert cli("status").returncode == 0


def test_adopt_existing_root(tmp_path: Path, cli: Cli) -> None:
    assert cli("init").returncode == 0
    store = tmp_path / "store"
    legacy = store / "netboot/root"
    _chroot(legacy, "hand-made\n")
    (store / "profiles/web.toml").write_text(PROFILE)
    r = cli("adopt", legacy, "-p", "web", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert legacy.is_symlink() and (legacy / "etc/motd").read_text() == "hand-made\n"
    kept = Path(res["kept"])
    assert kept.is_dir() and not kept.is_symlink() and (kept / "etc/motd").read_text() == "hand-made\n"
    assert json.loads(cli("status", "--json").stdout)["profiles"][-1]["active"] == "web@1"
    r = cli("adopt", legacy, "-p", "web")
    assert r.returncode == 2 and "already a symlink" in r.stderr


READER = r"""
import os, sys, time
paths = sys.argv[1:-1]
deadline = time.time() + float(sys.argv[-1])
bad = reads = 0
while time.time() < deadline and not os.path.exists(paths[0] + ".stop"):
    for p in paths[1:]:
        try:
            data = open(p, "rb").read()
        except FileNotFoundError:
            bad += 1; print("missing", p, flush=True); continue
        reads += 1
        if not data.endswith(b"IPAPPEND 3\n") or b"imgstore.gen=" not in data:
            bad += 1; print("partial", p, data[-40:], flush=True)
    try:
        os.stat(paths[0])  # the root link always resolves
        reads += 1
    except FileNotFoundError:
        bad += 1; print("link missing", flush=True)
print("reads", reads, "bad", bad, flush=True)
sys.exit(1 if bad else 0)
"""


@pytest.mark.slow
def test_reader_never_sees_missing_or_partial_files(fleet: Path, cli: Cli) -> None:
    """1,000 rollouts and rollbacks while another process reads the root link and per-MAC files."""
    from imgstore import deploy
    from imgstore.store import Store

    assert cli("rollout", "web@1").returncode == 0
    assert cli("rollout", "--canary", "www3", "web@2").returncode == 0
    link = fleet / "netboot/root"
    cfgs = [fleet / "tftpboot/pxelinux.cfg" / n for n in ("01-52-54-00-ab-cd-ef", "01-52-54-00-12-34-56", "default")]
    reader = subprocess.Popen([sys.executable, "-c", READER, str(link), *map(str, cfgs), "600"],
                              stdout=subprocess.PIPE, text=True)
    store = Store.open(fleet)
    flips = 0
    try:
        t0 = time.monotonic()
        for i in range(500):
            deploy.rollout(store, "web", "web@3" if i % 2 == 0 else "web@2")
            deploy.rollback(store, "web")
            flips += 2
        elapsed = time.monotonic() - t0
    finally:
        Path(str(link) + ".stop").touch()
        out, _ = reader.communicate(timeout=60)
        store.close()
    assert reader.returncode == 0, out
    assert flips == 1000
    reads = int(out.split()[-3])
    assert reads > 1000, out
    print(f"{flips} flips in {elapsed:.1f} s; reader: {out.strip()}")


def test_classic_append_with_initrd_names_it_once(fleet: Path, tmp_path: Path, cli: Cli) -> None:
    # Boot parameters belong to the generation: a new APPEND makes the same tree a new generation.
    classic = PROFILE.replace('append = "', 'append = "initrd={initrd} ramdisk_size=1048576 ')
    (fleet / "profiles/web.toml").write_text(classic)
    r = cli("commit", tmp_path / "chroot", "-p", "web", "--json")
    assert json.loads(r.stdout)["created"]
    assert cli("rollout", "web@4").returncode == 0
    g = _gen(cli, "web@4")
    text = (fleet / "tftpboot/pxelinux.cfg/default").read_text()
    assert f"initrd=imgstore/web/{g['gen_id']}/initrd.img ramdisk_size=1048576" in text
    assert "INITRD" not in text


def test_mac_files_as_copies(fleet: Path, cli: Cli) -> None:
    """For TFTP servers that do not follow symlinks: one regular file per node, same content."""
    (fleet / "profiles/web.toml").write_text(PROFILE + 'mac_files = "copy"\n')
    assert cli("rollout", "web@1").returncode == 0
    cfg = fleet / "tftpboot/pxelinux.cfg"
    g = _gen(cli, "web@1")
    shared = next(f.read_bytes() for f in (cfg / "imgstore").iterdir() if g["gen_id"].encode() in f.read_bytes())
    for name in ("default", "01-52-54-00-ab-cd-ef", "01-52-54-00-12-34-56"):
        assert not (cfg / name).is_symlink() and (cfg / name).read_bytes() == shared
    assert cli("rollout", "--canary", "www3", "web@2").returncode == 0
    assert _booted(cfg / "01-52-54-00-12-34-56") == _gen(cli, "web@2")["gen_id"]
    assert cli("status").returncode == 0


def test_rerun_after_a_crash_between_row_and_switch_completes_not_repeats(fleet: Path, cli: Cli) -> None:
    """A rollback killed after its database row: running it again finishes that rollback, it does not go
    back one more step; the same for rollback --node (whose re-run would otherwise find no pin)."""
    for ref in ("web@1", "web@2", "web@3"):
        assert cli("rollout", ref).returncode == 0
    www1 = fleet / "tftpboot/pxelinux.cfg/01-52-54-00-ab-cd-ef"
    g = {n: _gen(cli, f"web@{n}")["gen_id"] for n in (1, 2, 3)}
    r = cli("rollback", env={"IMGSTORE_FAULT": "deploy.before-switch:kill"})
    assert r.returncode == -9
    assert _booted(www1) == g[3]  # the switch never happened
    assert cli("status").returncode == 8  # drift: the database says web@2
    r = cli("rollback", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["to_ref"] == "web@2" and "completed" in json.loads(r.stdout)["action"]
    assert _booted(www1) == g[2] and cli("status").returncode == 0
    # The next rollback is a new one.
    assert json.loads(cli("rollback", "--json").stdout)["to_ref"] == "web@1"

    assert cli("pin", "www3", "web@3").returncode == 0
    r = cli("rollback", "--node", "www3", env={"IMGSTORE_FAULT": "deploy.before-switch:kill"})
    assert r.returncode == -9
    r = cli("rollback", "--node", "www3")
    assert r.returncode == 0, r.stderr
    assert _booted(fleet / "tftpboot/pxelinux.cfg/01-52-54-00-12-34-56") == g[1]
    # Killed before its row, nothing was decided: the re-run does the whole rollback.
    assert cli("rollout", "web@3").returncode == 0
    r = cli("rollback", env={"IMGSTORE_FAULT": "rollback.before-row:kill"})
    assert r.returncode == -9 and _booted(www1) == g[3]
    assert json.loads(cli("rollback", "--json").stdout)["to_ref"] == "web@1"
    assert cli("status").returncode == 0


def test_profile_rollout_renames_one_link_whatever_the_node_count(fleet: Path, cli: Cli) -> None:
    """Following nodes resolve through pxelinux.cfg/imgstore/profile-web; a rollout flips only that link."""
    cfg = fleet / "tftpboot/pxelinux.cfg"
    www1, www3 = cfg / "01-52-54-00-ab-cd-ef", cfg / "01-52-54-00-12-34-56"
    assert cli("rollout", "web@2").returncode == 0
    assert os.readlink(www1) == os.readlink(www3) == os.readlink(cfg / "default") == "imgstore/profile-web"
    key2 = os.readlink(cfg / "imgstore/profile-web")
    assert f"web@2 {_gen(cli, 'web@2')['gen_id']}" in (cfg / "imgstore" / key2).read_text()
    inodes = {p: p.lstat().st_ino for p in (www1, www3, cfg / "default")}
    r = cli("rollout", "web@3", "--json")
    assert r.returncode == 0, r.stderr
    change = json.loads(r.stdout)
    assert sorted(change["nodes_moved"]) == ["www1", "www3"]
    key3 = os.readlink(cfg / "imgstore/profile-web")
    # web@3's shared config (new), the profile's link and the root link: nothing per node.
    assert {Path(w).name for w in change["written"]} == {key3, "profile-web", "root"}
    assert {p: p.lstat().st_ino for p in inodes} == inodes  # the per-node names were not touched
    assert f"web@3 {_gen(cli, 'web@3')['gen_id']}" in www1.read_text()
    # A canary is pinned to its generation's config directly; released, it follows the profile again.
    assert cli("rollout", "--canary", "www3", "web@2").returncode == 0
    assert os.readlink(www3) == f"imgstore/{key2}" and www3.read_text() != www1.read_text()
    assert os.readlink(www1) == "imgstore/profile-web"
    assert cli("rollback", "--node", "www3").returncode == 0
    assert os.readlink(www3) == "imgstore/profile-web" and www3.read_text() == www1.read_text()
    assert cli("status").returncode == 0


def test_materialized_trees_share_files_and_symlinks_and_stay_exact(fleet: Path, cli: Cli, tmp_path: Path) -> None:
    """A tree links each file or symlink that an earlier tree has with the same content (target) and metadata,
    found through that tree's index; other mtimes or contents are its own. gc frees what no tree links."""
    tree = tmp_path / "chroot"
    (tree / "usr/bin").mkdir(parents=True)
    os.symlink("../share/big", tree / "usr/bin/rel")
    os.symlink("/usr/bin", tree / "usr/abs-dir")  # a link to a host directory: never followed
    os.symlink("../share/big", tree / "usr/bin/same-target")
    os.utime(tree / "usr/bin/same-target", ns=(1_000_000_000, 1_000_000_000), follow_symlinks=False)
    for motd in ("four\n", "five\n"):
        (tree / "etc/motd").write_text(motd)
        assert cli("commit", tree, "-p", "web").returncode == 0
    os.unlink(tree / "usr/abs-dir")
    (tree / "etc/motd").write_text("six\n")
    assert cli("commit", tree, "-p", "web").returncode == 0
    for ref in ("web@4", "web@5", "web@6"):
        assert cli("materialize", ref).returncode == 0
    t4, t5, t6 = (fleet / f"{_gen(cli, ref)['gen_id']}-web-rootfs" for ref in ("web@4", "web@5", "web@6"))
    rel4, rel5 = (t / "usr/bin/rel" for t in (t4, t5))
    assert rel4.lstat().st_ino == rel5.lstat().st_ino and rel4.lstat().st_nlink == 3  # 3 trees, nothing else
    assert os.readlink(rel4) == "../share/big" and rel4.read_bytes() == (t4 / "usr/share/big").read_bytes()
    big = [(t / "usr/share/big").stat() for t in (t4, t5, t6)]
    assert len({st.st_ino for st in big}) == 1 and big[0].st_nlink == 3
    motds = [(t / "etc/motd") for t in (t4, t5, t6)]
    assert [m.read_text() for m in motds] == ["four\n", "five\n", "six\n"]
    assert len({m.stat().st_ino for m in motds}) == 3
    same = t4 / "usr/bin/same-target"  # same target, other mtime: its own symlink
    assert same.lstat().st_ino != rel4.lstat().st_ino
    assert same.lstat().st_mtime_ns == 1_000_000_000
    assert rel4.lstat().st_mtime_ns == (tree / "usr/bin/rel").lstat().st_mtime_ns
    assert os.readlink(t4 / "usr/abs-dir") == "/usr/bin" and (t4 / "usr/abs-dir").lstat().st_nlink == 2
    assert sorted(p.name for p in fleet.glob("*.keys")) == sorted(f"{t.name}.keys" for t in (t4, t5, t6))
    assert not (fleet / "mat").exists()  # nothing in mat/ but boot files and repaired files
    assert cli("verify").returncode == 0
    assert cli("rollout", "web@6").returncode == 0
    r = cli("gc", "--keep", "0", "--json")  # only web@6 stays
    assert r.returncode == 0, r.stderr
    assert not t4.exists() and not t5.exists() and sorted(p.name for p in fleet.glob("*.keys")) == [f"{t6.name}.keys"]
    assert (t6 / "usr/bin/rel").lstat().st_nlink == 1 and (t6 / "usr/share/big").stat().st_nlink == 1
    # What gc reports freed counts each file once, when its last link goes: web@4's and web@5's own motd and
    # the symlinks only they had, not the big file web@6 still links.
    assert json.loads(r.stdout)["bytes_freed"] < (t6 / "usr/share/big").stat().st_size
    assert os.path.isdir("/usr/bin") and t6.is_dir()
    assert cli("verify").returncode == 0


def test_materialize_makes_files_from_many_blocks_in_two_processes_exact(tmp_path: Path, cli: Cli) -> None:
    """The files are made in the tree by two processes (forkjoin), block by block: the tree equals a checkout,
    its index names one path per key, and nothing temporary is left in the store."""
    from treeutil import diff_snapshots, snapshot

    from imgstore import browse, generations
    from imgstore import materialize as mat
    from imgstore.locking import store_lock
    from imgstore.store import Store

    tree = tmp_path / "chroot"
    for d in range(12):
        (tree / f"usr/lib/d{d}").mkdir(parents=True)
        for f in range(60):  # about 3 MB of small files: several blocks, several packs' worth of reads
            p = tree / f"usr/lib/d{d}/f{f}"
            p.write_bytes(os.urandom(1000 + 97 * f) + b"%d %d" % (d, f))
            os.chmod(p, 0o4755 if f == 7 else 0o640 if f % 3 else 0o644)
            os.utime(p, ns=(f * 10**9 + 5, f * 10**9 + 5))
            if f % 11 == 0:
                os.setxattr(p, "user.note", b"%d" % f)
    (tree / "usr/lib/big").write_bytes(os.urandom(3 << 20))  # a loose object
    os.link(tree / "usr/lib/d0/f1", tree / "usr/lib/hardlink")
    os.symlink("d1/f2", tree / "usr/lib/link")
    (tree / "empty").write_bytes(b"")
    (tree / "empty2").write_bytes(b"")  # same content and metadata: one file, two links
    st = (tree / "empty").stat()
    os.utime(tree / "empty2", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cli("init").returncode == 0
    (tmp_path / "store/profiles/web.toml").write_text(PROFILE)
    r = cli("commit", tree, "-p", "web", "--no-kernel", "-m", "many")
    assert r.returncode == 0, r.stderr

    root = tmp_path / "store"
    store = Store.open(root)
    with store.engine.connect() as conn:
        gen = generations.resolve(conn, "web@latest")
    with store_lock(root, "materialize"):
        path, created = mat.materialize(store, gen)
    assert created
    assert cli("checkout", "web@latest", tmp_path / "co").returncode == 0
    strip = lambda s: {k: {a: b for a, b in v.items() if a != "link_group"} for k, v in s.items()}  # noqa: E731
    assert diff_snapshots(strip(snapshot(tmp_path / "co")), strip(snapshot(path))) == []
    assert (path / "empty").stat().st_ino == (path / "empty2").stat().st_ino
    assert (path / "usr/lib/hardlink").stat().st_ino == (path / "usr/lib/d0/f1").stat().st_ino
    import zstandard

    records = zstandard.ZstdDecompressor().decompress(mat.keys_path(path).read_bytes()).split(b"\0")[:-1]
    index = dict(r.split(b" ", 1) for r in records)
    es = [e for e in browse.entries(store, gen) if e.type in ("f", "l")]
    assert len(index) == len(records) == len({mat.mat_key(e) for e in es}) == 12 * 60 + 3  # big, link, empty (twice)
    assert all(index[mat.mat_key(e).encode()] in (e.path, b"empty") for e in es)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []  # no temp names left
    assert not (root / "mat").exists()
    assert cli("verify").returncode == 0


def test_a_materialize_cut_short_by_a_kill_or_an_error_leaves_nothing(fleet: Path, cli: Cli) -> None:
    """A kill before the syncfs leaves a staging tree and index under temp names, which the next command removes
    (never reused: their data may not have reached the disk); an error half-way (damaged data) removes them at
    once. Either way the tree finally made is exact, and an earlier tree is never touched."""
    from imgstore import browse, generations
    from imgstore.store import Store

    assert cli("materialize", "web@1").returncode == 0
    t1 = fleet / f"{_gen(cli, 'web@1')['gen_id']}-web-rootfs"
    before = sorted(p.name for p in fleet.iterdir())
    inode = (t1 / "usr/share/big").stat().st_ino
    r = cli("materialize", "web@2", env={"IMGSTORE_FAULT": "materialize.before-sync:kill"})
    assert r.returncode == -9, r.stderr
    temps = sorted(p.name for p in fleet.iterdir() if p.name.startswith("."))
    assert len(temps) == 2 and any(t.endswith("-rootfs.keys") for t in temps), temps
    r = cli("materialize", "web@2")
    assert r.returncode == 0, r.stderr
    assert not any(p.name.startswith(".") for p in fleet.iterdir())
    t2 = fleet / f"{_gen(cli, 'web@2')['gen_id']}-web-rootfs"
    assert (t2 / "etc/motd").read_text() == "two\n" and (t2 / "usr/share/big").stat().st_ino == inode
    assert cli("verify").returncode == 0

    # An error while writing a file: a loose object's data damaged (its size kept).
    tree = fleet.parent / "chroot"
    (tree / "etc/big").write_bytes(bytes(range(256)) * 8192)  # 2 MB: a loose object
    assert cli("commit", tree, "-p", "web", "-m", "four").returncode == 0
    store = Store.open(fleet)
    with store.engine.connect() as conn:
        gen = generations.resolve(conn, "web@4")
    big = next(e for e in browse.entries(store, gen) if e.path == b"etc/big")
    loose = store.objects.loose_path(big.digest)
    data = bytearray(loose.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(loose, 0o644)
    loose.write_bytes(bytes(data))
    r = cli("materialize", "web@4")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert sorted(p.name for p in fleet.iterdir()) == sorted(before + [t2.name, f"{t2.name}.keys"])
    assert (t1 / "usr/share/big").stat().st_ino == inode


def test_an_index_that_lies_or_a_tree_changed_by_hand_costs_a_copy_never_a_wrong_file(fleet: Path, cli: Cli,
                                                                                      tmp_path: Path) -> None:
    """A new tree links from an earlier one only what is there as its index says (type, owner, mode, size,
    mtime), through no symlink and no '..': otherwise it makes its own copy. A stale index (its tree gone)
    is removed by the next command; a legacy mat/ marker still sweeps the copies no tree links."""
    from imgstore import materialize as mat

    assert cli("materialize", "web@1").returncode == 0
    t1 = fleet / f"{_gen(cli, 'web@1')['gen_id']}-web-rootfs"
    secret = tmp_path / "outside/secret"
    secret.parent.mkdir()
    secret.write_bytes((t1 / "usr/share/big").read_bytes())
    shutil.copystat(t1 / "usr/share/big", secret)  # looks right: only its path could tell
    os.rename(t1 / "usr/share", t1 / "usr/share-real")
    os.symlink(secret.parent, t1 / "usr/share")  # the tree's usr/share now leads outside
    kernel, initrd = "boot/vmlinuz-6.1.0-28-amd64", "boot/initrd.img-6.1.0-28-amd64"
    os.chmod(t1 / kernel, 0o600)  # changed by hand: no longer what the index says
    keys = mat.keys_path(t1)
    import zstandard

    data = zstandard.ZstdDecompressor().decompress(keys.read_bytes())
    lie = f" ../{t1.name}/{initrd}\0".encode()
    assert f" {initrd}\0".encode() in data
    data = data.replace(f" {initrd}\0".encode(), lie)  # an index that lies (about the right file, by '..')
    keys.write_bytes(zstandard.ZstdCompressor().compress(data))
    legacy = fleet / "mat/ab/abcd"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"a copy an earlier imgstore made, linked by no tree")
    (fleet / mat.MAT / mat.UNSYNCED).write_bytes(b"")
    stale = fleet / ("0" * 64 + "-web-rootfs.keys")
    stale.write_bytes(keys.read_bytes())

    r = cli("materialize", "web@2")
    assert r.returncode == 0, r.stderr
    t2 = fleet / f"{_gen(cli, 'web@2')['gen_id']}-web-rootfs"
    assert (t2 / "usr/share/big").stat().st_ino != secret.stat().st_ino and secret.stat().st_nlink == 1
    assert (t2 / kernel).stat().st_ino != (t1 / kernel).stat().st_ino
    assert stat.S_IMODE((t2 / kernel).stat().st_mode) == 0o644
    assert (t2 / initrd).stat().st_ino != (t1 / initrd).stat().st_ino  # never reached through '..'
    assert (t2 / initrd).read_bytes() == (t1 / initrd).read_bytes()
    assert not stale.exists() and not legacy.exists() and not (fleet / mat.MAT / mat.UNSYNCED).exists()
    r = cli("verify", "--json")  # web@1's tree was changed by hand above; web@2's is exact
    assert r.returncode == 6 and {g for p in json.loads(r.stdout)["problems"] for g in p["generations"]} == {"web@1"}


def test_a_source_is_linked_only_if_it_is_what_its_entry_says(tmp_path: Path) -> None:
    """checkout._link checks type, mode, size, mtime, and the owner where the tree's files get their owners
    (as root): a materialize by another user makes its files its own, and still shares them."""
    from imgstore import checkout
    from imgstore.manifest import FILE, SYMLINK, Entry

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d/f").write_bytes(b"12345")
    os.chmod(src / "d/f", 0o640)
    os.utime(src / "d/f", ns=(10**9, 10**9))
    os.symlink("f", src / "d/l")
    os.utime(src / "d/l", ns=(10**9, 10**9), follow_symlinks=False)
    os.symlink("d", src / "via")  # a path through it must not be followed
    f = Entry(path=b"x", type=FILE, mode=0o640, uid=os.getuid(), gid=os.getgid(), mtime_ns=10**9, size=5,
              digest="0" * 64)
    other = Entry(path=b"x", type=FILE, mode=0o640, uid=os.getuid() + 1, gid=os.getgid(), mtime_ns=10**9,
                  size=5, digest="0" * 64)
    wrong_mode = Entry(path=b"x", type=FILE, mode=0o644, uid=os.getuid(), gid=os.getgid(), mtime_ns=10**9,
                       size=5, digest="0" * 64)
    link = Entry(path=b"x", type=SYMLINK, mode=0o777, uid=os.getuid(), gid=os.getgid(), mtime_ns=10**9,
                 target=b"f")
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    dest = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    cache = checkout._SourceDir()
    try:
        cases = [
            ((fd, b"d/f"), f, True, True),
            ((fd, b"d/f"), other, True, False),  # another owner, as root: not the same file
            ((fd, b"d/f"), other, False, True),  # not root: files are the user's own whatever the entry says
            ((fd, b"d/f"), wrong_mode, True, False),
            ((fd, b"d/f"), link, True, False),  # a file where a symlink is meant
            ((fd, b"d/l"), link, True, True),
            ((fd, b"via/f"), f, True, False),  # through a symlink
            ((fd, b"d/../d/f"), f, True, False),  # through '..'
            ((fd, b"d/missing"), f, True, False),
            (None, f, True, False),
        ]
        for n, (source, e, own, linked) in enumerate(cases):
            assert checkout._link(source, cache, e, dest, b"n%d" % n, own) is linked, (n, source)
            assert os.path.lexists(out / f"n{n}") is linked, n
    finally:
        cache.close()
        os.close(fd)
        os.close(dest)
    assert (out / "n0").stat().st_ino == (src / "d/f").stat().st_ino
    assert os.readlink(out / "n5") == "f"
    # A file that may not be linked (immutable here; another user's under protected_hardlinks): a new copy.
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", src / "d/f"]).returncode == 0:
        fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
        dest = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert checkout._link((fd, b"d/f"), checkout._SourceDir(), f, dest, b"immutable", True) is False
        finally:
            os.close(fd)
            os.close(dest)
            subprocess.run(["chattr", "-i", src / "d/f"], check=True)
        assert not os.path.lexists(out / "immutable")


def test_a_tree_made_without_an_index_is_indexed_once_and_shared_from(fleet: Path, cli: Cli) -> None:
    """Trees an earlier imgstore made have no index: the next materialize writes theirs from the manifest,
    so a store upgraded in place does not copy a whole tree again for its next generation."""
    from imgstore import materialize as mat

    assert cli("materialize", "web@1").returncode == 0
    t1 = fleet / f"{_gen(cli, 'web@1')['gen_id']}-web-rootfs"
    index = mat.keys_path(t1).read_bytes()
    mat.keys_path(t1).unlink()
    r = cli("materialize", "web@2")
    assert r.returncode == 0, r.stderr
    t2 = fleet / f"{_gen(cli, 'web@2')['gen_id']}-web-rootfs"
    assert mat.keys_path(t1).read_bytes() == index  # the same index materialize wrote, from the manifest
    assert (t2 / "usr/share/big").stat().st_ino == (t1 / "usr/share/big").stat().st_ino
    assert not any(p.name.startswith(".") for p in fleet.iterdir())


def test_a_file_with_as_many_links_as_the_filesystem_allows_gets_a_new_copy(tmp_path: Path) -> None:
    """ext4 allows 65,000 links to one file: past that, restore makes a new file instead of failing."""
    from imgstore import checkout
    from imgstore.manifest import FILE, Entry

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"")
    os.chmod(src / "f", 0o644)
    os.utime(src / "f", ns=(10**9, 10**9))
    many = tmp_path / "many"
    many.mkdir()
    try:
        for i in range(70_000):
            os.link(src / "f", many / str(i))
    except OSError as exc:
        if exc.errno != errno.EMLINK:
            raise
    else:
        pytest.skip("this filesystem has no link limit below 70,000")
    e = Entry(path=b"g", type=FILE, mode=0o644, uid=os.getuid(), gid=os.getgid(), mtime_ns=10**9, size=0,
              digest="0" * 64)
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    dest = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert checkout._link((fd, b"f"), checkout._SourceDir(), e, dest, b"g", True) is False
        os.unlink(many / "0")
        cache = checkout._SourceDir()
        assert checkout._link((fd, b"f"), cache, e, dest, b"g", True) is True
        cache.close()
    finally:
        os.close(fd)
        os.close(dest)
    assert (tmp_path / "g").stat().st_ino == (src / "f").stat().st_ino


def test_boot_file_copies_are_durable_before_they_are_named(tmp_path: Path, cli: Cli) -> None:
    """A kernel given with --kernel is not in the tree, so rollout makes its shared copy alone, with no syncfs
    after it: the copy's data is fsynced before it is linked under its name (strace shows the order)."""
    import re
    import shutil

    if shutil.which("strace") is None:
        pytest.fail("strace is not installed: scripts/setup.sh installs it (apt-get install strace)")
    assert cli("init").returncode == 0
    (tmp_path / "store/profiles/web.toml").write_text(PROFILE)
    tree = _chroot(tmp_path / "chroot", "one\n")
    for p in (tree / "boot").iterdir():
        p.unlink()
    kernel = tmp_path / "vmlinuz-outside"
    kernel.write_bytes(b"A KERNEL FROM ELSEWHERE" * 4000)
    assert cli("commit", tree, "-p", "web", "--kernel", kernel).returncode == 0
    assert cli("materialize", "web@1").returncode == 0  # the tree's copies: synced by its syncfs
    log = tmp_path / "strace.log"
    env = {**os.environ, "IMGSTORE_ROOT": os.fspath(tmp_path / "store")}
    r = subprocess.run(["strace", "-f", "-e", "trace=openat,fsync,linkat", "-o", log, sys.executable, "-m", "imgstore",
                        "rollout"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    made = synced = named = 0
    pending: dict[str, str] = {}  # fd -> "open" or "synced", per unnamed copy
    for line in log.read_text().splitlines():
        if m := re.search(r"openat\(.*O_TMPFILE.*\) = (\d+)", line):
            pending[m.group(1)] = "open"
            made += 1
        elif (m := re.search(r"fsync\((\d+)\)", line)) and m.group(1) in pending:
            pending[m.group(1)] = "synced"
            synced += 1
        elif (m := re.search(r'linkat\(AT_FDCWD, "/proc/self/fd/(\d+)"', line)) and m.group(1) in pending:
            assert pending.pop(m.group(1)) == "synced", line
            named += 1
    assert made == synced == named == 1  # the kernel's copy
