"""imgstore end to end against the PXE lab: what each node really fetches and really boots.

One store for the module: two generations of a profile `web` that differ in one file, both with the
real Debian guest kernel and the lab's marker initrd, committed with the real CLI. Node www3 is the
canary (pinned to web@2 with ``rollout --canary``), www1 follows the profile (web@1), and
``pxelinux.cfg/default`` serves web@1 to any other MAC.

The proof is never reading imgstore's files back from disk: the configs, kernels and initrds come over
real TFTP from tftpd-hpa ``--secure`` (chroot, user nobody), and the boots are qemu VMs whose firmware,
iPXE and PXELINUX pick the config by MAC exactly as a node does, then report ``imgstore.gen=`` from the
kernel command line they were given.

Tests that change the deployment (``rollback --node``) first put it back into the state the fixture set
up, so each one also passes when run on its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import pxelab
import pytest

IS_ROOT = os.geteuid() == 0

pytestmark = [
    pytest.mark.skipif(not IS_ROOT, reason="the PXE lab needs root (network namespaces, tap, chroot)"),
    pytest.mark.root,
    pytest.mark.netns,
]

PROFILE = "web"
CANARY, CANARY_MAC = "www3", "52:54:00:12:34:56"
OTHER, OTHER_MAC = "www1", "52:54:00:ab:cd:ef"
UNKNOWN_MAC = "52:54:00:00:00:99"  # no node: PXELINUX falls back to pxelinux.cfg/default

PROFILE_TOML = """\
description = "PXE end-to-end test profile"

[boot]
serial = "0 115200"
append = "console=ttyS0 panic=-1 nfsroot={nfs_server}:{root},{nfs_options}"

[deploy]
tftp_root = "tftpboot"
root_link = "netboot/root"
serve_default = true
bootloader_dir = "/usr/lib/PXELINUX"
"""


@dataclass(frozen=True)
class Gen:
    """One generation as `imgstore show --json` describes it."""

    ref: str
    gen_id: str
    kernel: str  # BLAKE3 of the kernel image
    initrd: str  # BLAKE3 of the initrd


@dataclass(frozen=True)
class Lab:
    store: Path
    work: Path
    gens: dict[int, Gen]  # 1 -> web@1, 2 -> web@2

    @property
    def tftp_root(self) -> Path:
        return self.store / "tftpboot"

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The real command line, as a separate process, against this store."""
        env = dict(os.environ)
        env["IMGSTORE_ROOT"] = os.fspath(self.store)
        env.pop("IMGSTORE_FAULT", None)
        return subprocess.run([sys.executable, "-m", "imgstore", *args], capture_output=True, text=True,
                              env=env, stdin=subprocess.DEVNULL, timeout=600)

    def ok(self, *args: str) -> str:
        r = self.run(*args)
        assert r.returncode == 0, f"imgstore {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        return r.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))


def _digest(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def _make_chroot(root: Path, kernel: Path, initrd: Path, motd: str) -> None:
    """A tiny Debian-shaped root: /boot/vmlinuz-<ver> and /boot/initrd.img-<ver>, and one differing file."""
    version = kernel.name.removeprefix("vmlinuz-")
    (root / "boot").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copyfile(kernel, root / "boot" / f"vmlinuz-{version}")
    shutil.copyfile(initrd, root / "boot" / f"initrd.img-{version}")
    (root / "etc" / "hostname").write_text("web\n")
    (root / "etc" / "motd").write_text(motd)


def _node(lab: Lab, name: str) -> dict[str, Any]:
    node: dict[str, Any] = lab.json("node", "show", name)
    return node


def _ensure_canary_on_latest(lab: Lab) -> None:
    """The state the fixture set up: www3 pinned to web@2, everything else on the active web@1."""
    if _node(lab, CANARY)["pinned"] != lab.gens[2].ref:
        change = lab.json("rollout", "--canary", CANARY)
        assert change["to_ref"] == lab.gens[2].ref and change["nodes_moved"] == [CANARY], change
    assert _node(lab, CANARY)["effective"] == lab.gens[2].ref
    assert _node(lab, OTHER)["effective"] == lab.gens[1].ref


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    if not IS_ROOT:
        pytest.skip("the PXE lab needs root (network namespaces, tap, chroot)")
    pxelab.ensure_deps()
    work = tmp_path_factory.mktemp("pxe-e2e")
    store = work / "store"
    lab = Lab(store, work, {})
    lab.ok("init")
    (store / "profiles" / f"{PROFILE}.toml").write_text(PROFILE_TOML)

    initrd = work / "initrd.gz"
    pxelab.build_initrd(initrd)
    kernel = pxelab.guest_kernel()
    for n in (1, 2):
        chroot = work / f"chroot{n}"
        _make_chroot(chroot, kernel, initrd, f"generation {n} of the PXE end-to-end test\n")
        res = lab.json("commit", os.fspath(chroot), "--profile", PROFILE, "-m", f"e2e {n}")
        assert res["created"] and res["generation"]["ref"] == f"{PROFILE}@{n}", res
    for n in (1, 2):
        g = lab.json("show", f"{PROFILE}@{n}")
        lab.gens[n] = Gen(g["ref"], g["gen_id"], g["kernel"], g["initrd"])
    assert lab.gens[1].gen_id != lab.gens[2].gen_id

    lab.ok("node", "add", CANARY, "--mac", CANARY_MAC, "--profile", PROFILE)
    lab.ok("node", "add", OTHER, "--mac", OTHER_MAC, "--profile", PROFILE)
    change = lab.json("rollout", lab.gens[1].ref)
    assert change["to_ref"] == lab.gens[1].ref and sorted(change["nodes_moved"]) == sorted([CANARY, OTHER]), change
    change = lab.json("rollout", "--canary", CANARY)  # no GEN: the profile's latest, web@2
    assert change["to_ref"] == lab.gens[2].ref and change["nodes_moved"] == [CANARY], change
    return lab


# --------------------------------------------------------------------------------------------------
# PXELINUX config parsing


@dataclass(frozen=True)
class BootEntry:
    kernel: str
    initrd: str
    append: str


def _parse_pxelinux(text: str) -> BootEntry:
    """The entry PXELINUX boots with PROMPT 0: the LABEL named by DEFAULT (keywords are case-insensitive)."""
    top: dict[str, str] = {}
    labels: dict[str, dict[str, str]] = {}
    current = top
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        key, value = key.upper(), value.strip()
        if key == "LABEL":
            current = labels.setdefault(value, {})
        else:
            current[key] = value
    assert top.get("PROMPT") == "0", f"a node would stop at boot: ({text!r})"
    assert top.get("DEFAULT") in labels, f"DEFAULT names no LABEL in:\n{text}"
    entry = labels[top["DEFAULT"]]
    assert {"KERNEL", "INITRD", "APPEND"} <= entry.keys(), f"incomplete boot entry in:\n{text}"
    return BootEntry(entry["KERNEL"], entry["INITRD"], entry["APPEND"])


def _append_gens(append: str) -> list[str]:
    return re.findall(r"(?:^|\s)imgstore\.gen=(\S+)", append)


def _check_served(srv: pxelab.TftpServer, config: str, gen: Gen) -> BootEntry:
    """Fetch `config` and what it names over TFTP; all of it must be `gen`'s."""
    text = srv.fetch(f"pxelinux.cfg/{config}").decode()
    entry = _parse_pxelinux(text)
    where = f"pxelinux.cfg/{config} (want {gen.ref}):\n{text}"
    assert _append_gens(entry.append) == [gen.gen_id], where
    assert entry.kernel == f"imgstore/{PROFILE}/{gen.gen_id}/vmlinuz", where
    assert entry.initrd == f"imgstore/{PROFILE}/{gen.gen_id}/initrd.img", where
    assert _digest(srv.fetch(entry.kernel)) == gen.kernel, where
    assert _digest(srv.fetch(entry.initrd)) == gen.initrd, where
    return entry


# --------------------------------------------------------------------------------------------------
# Tests


def test_rollout_lays_out_a_tftp_root_tftpd_hpa_can_serve(lab: Lab) -> None:
    _ensure_canary_on_latest(lab)
    root = lab.tftp_root
    # The commits recorded the files of the chroots, i.e. the lab's real kernel and initrd.
    kernel_digest = _digest(pxelab.guest_kernel().read_bytes())
    initrd_digest = _digest((lab.work / "initrd.gz").read_bytes())
    for g in lab.gens.values():
        assert (g.kernel, g.initrd) == (kernel_digest, initrd_digest), g
    # imgstore copied the bootloader itself (pxelinux.0 from bootloader_dir, the modules from syslinux).
    for name, src in pxelab.bootloader_files().items():
        assert (root / name).read_bytes() == src.read_bytes(), name
        assert (root / name).stat().st_mode & 0o777 == 0o644, name
    for g in lab.gens.values():
        d = root / "imgstore" / PROFILE / g.gen_id
        assert _digest((d / "vmlinuz").read_bytes()) == g.kernel
        assert _digest((d / "initrd.img").read_bytes()) == g.initrd
    assert pxelab.audit_tftp_root(root) == []
    assert os.readlink(lab.store / "netboot" / "root") == os.fspath(
        lab.store / f"{lab.gens[1].gen_id}-{PROFILE}-rootfs")


def test_tftp_serves_each_node_its_generation_and_rollback_moves_the_canary(lab: Lab) -> None:
    _ensure_canary_on_latest(lab)
    g1, g2 = lab.gens[1], lab.gens[2]
    canary_cfg, other_cfg = pxelab.mac_config_name(CANARY_MAC), pxelab.mac_config_name(OTHER_MAC)
    assert pxelab.audit_tftp_root(lab.tftp_root) == []

    with pxelab.TftpServer(lab.tftp_root) as srv:
        assert srv.fetch("pxelinux.0") == pxelab.bootloader_files()["pxelinux.0"].read_bytes()
        entry = _check_served(srv, canary_cfg, g2)
        # {root} in the profile's append is the generation's own tree, what NFS would export.
        assert f"nfsroot=10.0.0.1:{lab.store / f'{g2.gen_id}-{PROFILE}-rootfs'},ro," in entry.append
        _check_served(srv, other_cfg, g1)
        _check_served(srv, "default", g1)
        with pytest.raises(pxelab.TftpError, match="File not found"):
            srv.fetch(f"pxelinux.cfg/{pxelab.mac_config_name(UNKNOWN_MAC)}")

        change = lab.json("rollback", "--node", CANARY)
        assert (change["from_ref"], change["to_ref"], change["nodes_moved"]) == (g2.ref, g1.ref, [CANARY])

        _check_served(srv, canary_cfg, g1)
        _check_served(srv, other_cfg, g1)
        default = srv.fetch("pxelinux.cfg/default").decode()
        assert _parse_pxelinux(default).kernel == f"imgstore/{PROFILE}/{g1.gen_id}/vmlinuz"
        assert f": {g1.ref} {g1.gen_id}." in default.splitlines()[0], default
        _check_served(srv, "default", g1)
    assert pxelab.audit_tftp_root(lab.tftp_root) == []
    assert _node(lab, CANARY)["pinned"] is None and _node(lab, CANARY)["effective"] == g1.ref


# --------------------------------------------------------------------------------------------------
# Real PXE boots

Boot = tuple[str, str]  # (MAC, label for the log files)


@dataclass(frozen=True)
class BootRun:
    mac: str
    console: str
    seconds: float
    log: Path

    @property
    def gen(self) -> str | None:
        return pxelab.booted_generation(self.console)

    def served(self) -> list[str]:
        """TFTP names the guest asked for and got, in order (a resent request counts once)."""
        return list(dict.fromkeys(r.name for r in pxelab.tftp_requests(self.log.with_suffix(".pcap"))
                                  if r.error is None))

    def refused(self) -> list[tuple[str, str | None]]:
        return [(r.name, r.error) for r in pxelab.tftp_requests(self.log.with_suffix(".pcap"))
                if r.error is not None]

    def explain(self) -> str:
        tail = "\n".join(self.console.splitlines()[-25:])
        return f"{self.mac} after {self.seconds:.1f}s, log {self.log}; console tail:\n{tail}"


def _boot_pair(lab: Lab, boots: list[Boot], boot: Callable[..., str] = pxelab.pxe_boot) -> list[BootRun]:
    """PXE-boot up to two VMs at once (the machine has 2 cores; TCG uses one each)."""
    logs = lab.work / "boots"
    logs.mkdir(exist_ok=True)

    def one(job: Boot) -> BootRun:
        mac, label = job
        log = logs / f"{label}.log"
        t0 = time.monotonic()
        console = boot(lab.tftp_root, mac, log, pcap=log.with_suffix(".pcap"))
        return BootRun(mac, console, time.monotonic() - t0, log)

    with ThreadPoolExecutor(max_workers=2) as ex:
        return list(ex.map(one, boots))


def _assert_booted(run: BootRun, gen: Gen, config: str) -> None:
    assert run.gen == gen.gen_id, run.explain()
    cmdline = pxelab.booted_cmdline(run.console) or ""
    # IPAPPEND 3 from imgstore's config: the node's own MAC, so the boot is tied to this NIC.
    assert f"BOOTIF={pxelab.mac_config_name(run.mac)}" in cmdline.split(), run.explain()
    served = run.served()
    assert f"pxelinux.cfg/{config}" in served, (served, run.explain())
    assert served[-2:] == [f"imgstore/{PROFILE}/{gen.gen_id}/vmlinuz",
                           f"imgstore/{PROFILE}/{gen.gen_id}/initrd.img"], (served, run.explain())


@pytest.mark.vm
def test_pxe_boots_follow_canary_rollback_and_default(lab: Lab) -> None:
    _ensure_canary_on_latest(lab)
    g1, g2 = lab.gens[1], lab.gens[2]
    assert pxelab.audit_tftp_root(lab.tftp_root) == []
    canary_cfg, other_cfg = pxelab.mac_config_name(CANARY_MAC), pxelab.mac_config_name(OTHER_MAC)

    canary, other = _boot_pair(lab, [(CANARY_MAC, "canary-pinned"), (OTHER_MAC, "other")])
    _assert_booted(canary, g2, canary_cfg)
    _assert_booted(other, g1, other_cfg)

    change = lab.json("rollback", "--node", CANARY)
    assert (change["from_ref"], change["to_ref"]) == (g2.ref, g1.ref), change

    canary, unknown = _boot_pair(lab, [(CANARY_MAC, "canary-rolled-back"), (UNKNOWN_MAC, "unknown")])
    _assert_booted(canary, g1, canary_cfg)
    assert f"IMGSTORE-BOOTED gen={g2.gen_id} " not in canary.console, canary.explain()
    _assert_booted(unknown, g1, "default")
    # The unknown MAC asked for its own file first, was refused, and fell back to default.
    assert (f"pxelinux.cfg/{pxelab.mac_config_name(UNKNOWN_MAC)}", "File not found") in unknown.refused()


def test_status_and_verify_are_clean_after_everything(lab: Lab) -> None:
    """Runs last: whatever the tests above did, the files on disk match the database and the store is whole."""
    r = lab.run("status")
    assert r.returncode == 0, f"imgstore status exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert "no drift" in r.stdout, r.stdout
    st = lab.json("status")
    assert st["drift"] == [], st["drift"]
    web = [p for p in st["profiles"] if p["profile"] == PROFILE]
    assert [(p["active"], p["active_id"]) for p in web] == [(lab.gens[1].ref, lab.gens[1].gen_id)], st
    nodes = {n["name"]: n for n in st["nodes"]}
    assert {nodes[CANARY]["mac"], nodes[OTHER]["mac"]} == {CANARY_MAC, OTHER_MAC}
    assert nodes[OTHER]["effective"] == lab.gens[1].ref
    r = lab.run("verify")
    assert r.returncode == 0, f"imgstore verify exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert pxelab.audit_tftp_root(lab.tftp_root) == []
