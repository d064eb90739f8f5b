"""Deploying: materialize, rollout, canary, rollback, pin, drift and sync, adopt, nodes; all on real files."""

from __future__ import annotations

import json
import os
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


def test_materialized_symlinks_are_shared_and_exact(fleet: Path, cli: Cli, tmp_path: Path) -> None:
    """Symlinks are hardlinks to one mat/ symlink per target and metadata; gc frees those no tree uses."""
    tree = tmp_path / "chroot"
    (tree / "usr/bin").mkdir(parents=True)
    os.symlink("../share/big", tree / "usr/bin/rel")
    os.symlink("/usr/bin", tree / "usr/abs-dir")  # a shared link to a host directory: never followed
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
    assert rel4.lstat().st_ino == rel5.lstat().st_ino and rel4.lstat().st_nlink == 4  # mat/ + 3 trees
    assert os.readlink(rel4) == "../share/big" and rel4.read_bytes() == (t4 / "usr/share/big").read_bytes()
    same = t4 / "usr/bin/same-target"  # same target, other mtime: its own shared symlink
    assert same.lstat().st_ino != rel4.lstat().st_ino
    assert same.lstat().st_mtime_ns == 1_000_000_000
    assert rel4.lstat().st_mtime_ns == (tree / "usr/bin/rel").lstat().st_mtime_ns
    assert os.readlink(t4 / "usr/abs-dir") == "/usr/bin" and (t4 / "usr/abs-dir").lstat().st_nlink == 3
    mat_links = {p for p in (fleet / "mat").rglob("*") if p.is_symlink()}
    assert len(mat_links) == 3
    assert cli("verify").returncode == 0
    assert cli("rollout", "web@6").returncode == 0
    assert cli("gc", "--keep", "0").returncode == 0  # only web@6 stays: the link to /usr/bin goes
    remaining = {os.readlink(p) for p in (fleet / "mat").rglob("*") if p.is_symlink()}
    assert remaining == {"../share/big"}
    assert os.path.isdir("/usr/bin") and t6.is_dir()


def test_materialize_copies_from_many_blocks_in_two_processes_exact(tmp_path: Path, cli: Cli) -> None:
    """Shared copies are made by two processes (forkjoin), block by block, each at its name in mat/ (the marker
    covers them until the syncfs): the tree equals a checkout, every copy is linked into it, and nothing
    temporary is left in mat/."""
    from treeutil import diff_snapshots, snapshot

    from imgstore import generations
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
    copies = [p for p in (root / "mat").rglob("*") if not p.is_dir()]
    assert len(copies) == 12 * 60 + 3  # the small files (the hardlink is one of them), big, empty, the symlink
    assert [p.name for p in (root / "mat").iterdir() if not p.is_dir()] == []  # no temp names left
    assert all(p.lstat().st_nlink >= 2 for p in copies)
    assert not (root / mat.MAT / mat.UNSYNCED).exists()
    assert cli("verify").returncode == 0


def _single_copies(root: Path) -> list[Path]:
    """Shared copies that no tree links (one link); not the UNSYNCED marker, which has one link too."""
    from imgstore.materialize import UNSYNCED

    return [p for p in (root / "mat").rglob("*")
            if not p.is_dir() and p.lstat().st_nlink == 1 and p.name != UNSYNCED]


def test_a_copy_cut_short_by_a_kill_or_an_error_is_never_used(tmp_path: Path, cli: Cli) -> None:
    """materialize makes each copy at its name: a kill half-way leaves it there, with the marker, and the next
    command sweeps it; an error half-way (damaged data) removes it at once. Either way the tree that is
    finally made is exact and nothing is left that no tree links."""
    from imgstore import browse, generations
    from imgstore import materialize as mat
    from imgstore.store import Store

    tree = tmp_path / "chroot"
    (tree / "etc").mkdir(parents=True)
    for i in range(40):
        (tree / f"etc/f{i}").write_bytes(b"%d " % i * (50 + i))
    (tree / "etc/big").write_bytes(bytes(range(256)) * 8192)  # 2 MB: a loose object
    assert cli("init").returncode == 0
    (tmp_path / "store/profiles/web.toml").write_text(PROFILE)
    assert cli("commit", tree, "-p", "web", "--no-kernel", "-m", "one").returncode == 0
    root = tmp_path / "store"

    r = cli("materialize", "web@1", env={"IMGSTORE_FAULT": "materialize.before-mat-link:kill"})
    assert r.returncode == -9, r.stderr
    assert (root / mat.MAT / mat.UNSYNCED).exists() and _single_copies(root)  # named, half-made, unlinked
    r = cli("materialize", "web@1")
    assert r.returncode == 0, r.stderr
    assert _single_copies(root) == [] and not (root / mat.MAT / mat.UNSYNCED).exists()
    assert cli("verify").returncode == 0

    # An error while writing a copy: the loose object's data damaged (its size kept).
    store = Store.open(root)
    with store.engine.connect() as conn:
        gen = generations.resolve(conn, "web@1")
    big = next(e for e in browse.entries(store, gen) if e.path == b"etc/big")
    tree_path = mat.tree_path(store, gen)
    mat.remove_tree(tree_path)
    assert cli("gc", "--keep", "1").returncode == 0  # its copies go with the tree
    assert _single_copies(root) == [] and not mat.mat_path(store, mat.mat_key(big)).exists()
    loose = store.objects.loose_path(big.digest)
    data = bytearray(loose.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(loose, 0o644)
    loose.write_bytes(bytes(data))
    r = cli("materialize", "web@1")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert not os.path.lexists(mat.mat_path(store, mat.mat_key(big)))  # the half-made copy was removed
    # And every copy the failed run made: had the other process been killed by the error, its copy in the
    # making would be half-made at its name.
    assert _single_copies(root) == []
    assert not tree_path.exists() and not (root / mat.MAT / mat.UNSYNCED).exists()


@pytest.mark.parametrize("unnamed", [True, False], ids=["o_tmpfile", "named-temp"])
def test_a_single_copy_is_complete_before_it_has_its_name(tmp_path: Path, cli: Cli, unnamed: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy made alone (boot files, repair: no marker, no syncfs after it) is an unnamed file linked in once
    complete, or, where a filesystem has no O_TMPFILE, a temp file renamed into place; a symlink planted at its
    key is replaced, not followed. Nothing temporary is left either way."""
    from imgstore import browse, generations
    from imgstore import materialize as mat
    from imgstore.locking import store_lock
    from imgstore.store import Store

    tree = tmp_path / "chroot"
    (tree / "boot").mkdir(parents=True)
    (tree / "boot/vmlinuz").write_bytes(os.urandom(5000))
    os.chmod(tree / "boot/vmlinuz", 0o600)
    os.symlink("vmlinuz", tree / "boot/link")
    assert cli("init").returncode == 0
    (tmp_path / "store/profiles/web.toml").write_text(PROFILE)
    assert cli("commit", tree, "-p", "web", "--no-kernel", "-m", "one").returncode == 0
    root = tmp_path / "store"
    monkeypatch.setattr(mat, "_tmpfile", [unnamed])
    store = Store.open(root)
    with store.engine.connect() as conn:
        gen = generations.resolve(conn, "web@1")
    es = {e.path: e for e in browse.entries(store, gen)}
    victim = tmp_path / "victim"
    victim.write_bytes(b"not ours")
    planted = mat.mat_path(store, mat.mat_key(es[b"boot/vmlinuz"]))
    planted.parent.mkdir(parents=True)
    os.symlink(victim, planted)
    dirty: set[Path] = set()
    with store_lock(root, "test"):
        copy = mat.ensure_mat(store, es[b"boot/vmlinuz"], dirty)
        link = mat.ensure_mat(store, es[b"boot/link"], dirty)
    assert copy == planted and not copy.is_symlink() and copy.read_bytes() == (tree / "boot/vmlinuz").read_bytes()
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600 and victim.read_bytes() == b"not ours"
    assert os.readlink(link) == "vmlinuz"
    assert mat._tmpfile == [unnamed] and dirty == {copy.parent, link.parent}
    assert [p.name for p in (root / "mat").iterdir() if not p.is_dir()] == []


def test_copies_of_a_materialize_cut_before_its_sync_are_not_trusted(fleet: Path, cli: Cli) -> None:
    """A power cut during materialize can keep a copy's name in mat/ and lose its data (copies are named before
    the syncfs that makes them durable). The marker written before the first copy makes the next command
    sweep every copy no tree links; copies of finished trees stay."""
    from imgstore import browse, generations
    from imgstore import materialize as mat
    from imgstore.store import Store

    assert cli("materialize", "web@1").returncode == 0
    store = Store.open(fleet)
    with store.engine.connect() as conn:
        gen = generations.resolve(conn, "web@2")
    motd = next(e for e in browse.entries(store, gen) if e.path == b"etc/motd")
    copy = mat.mat_path(store, mat.mat_key(motd))
    assert not copy.exists()
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_bytes(b"")  # the name survived, the data did not
    (fleet / mat.MAT / mat.UNSYNCED).write_bytes(b"")
    big = fleet / f"{_gen(cli, 'web@1')['gen_id']}-web-rootfs" / "usr/share/big"
    inode = big.stat().st_ino

    r = cli("materialize", "web@2")
    assert r.returncode == 0, r.stderr
    tree = fleet / f"{_gen(cli, 'web@2')['gen_id']}-web-rootfs"
    assert (tree / "etc/motd").read_text() == "two\n"
    assert (tree / "usr/share/big").stat().st_ino == inode  # web@1's tree and its copies were kept
    assert not (fleet / mat.MAT / mat.UNSYNCED).exists()
    assert cli("verify").returncode == 0


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
