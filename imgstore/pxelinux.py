"""The PXELINUX boot target: config files, the per-generation kernel/initrd folder, the bootloader files.

Another boot target (iPXE, GRUB) would be a sibling module with the same four functions; deploy.py
only calls these.

Everything here lives inside the TFTP root and is world-readable: tftpd-hpa --secure chroots into the
root and drops to nobody, so it can follow neither symlinks that leave the root nor 0600 files.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from .durable import TMP_PREFIX, fsync_dir, no_space
from .generations import Generation
from .mac import MacAddress
from .profiles import Profile

MARK = "# imgstore:"  # first line of every config imgstore writes; status uses it to spot strays
CFG_DIR = "pxelinux.cfg"
BOOTLOADER = ("pxelinux.0", "ldlinux.c32", "reboot.c32", "libcom32.c32")
MODULE_DIRS = (Path("/usr/lib/syslinux/modules/bios"), Path("/usr/lib/PXELINUX"))


def gen_dir(profile: Profile, gen: Generation) -> str:
    """The generation's folder, relative to the TFTP root (what KERNEL and INITRD name)."""
    return f"imgstore/{profile.name}/{gen.gen_id}"


def _config_name(profile: Profile, gen: Generation) -> str:
    # Short on purpose: the link target must fit in the inode (under 60 bytes, a "fast" symlink), so that
    # replacing a link frees no data block; that costs milliseconds each on a disk mounted with discard.
    import blake3

    return "imgstore/" + blake3.blake3(f"{profile.name}/{gen.gen_id}".encode()).hexdigest()[:24]


def gen_config(profile: Profile, gen: Generation) -> str:
    """The generation's own config, shared by every node that boots it (relative to the TFTP root)."""
    return f"{CFG_DIR}/{_config_name(profile, gen)}"


def link_target(profile: Profile, gen: Generation) -> str:
    """What pxelinux.cfg/<name> points at: relative, so it stays inside the root tftpd --secure chroots to."""
    return _config_name(profile, gen)


def follow_target(profile: Profile) -> str:
    """What pxelinux.cfg/<name> of a node that follows the profile points at (relative, inside the root)."""
    return f"imgstore/profile-{profile.name}"


def profile_link(profile: Profile) -> str:
    """pxelinux.cfg/imgstore/profile-<name>: points at the profile's active generation's config. The per-MAC
    names of nodes that follow the profile point here, so a rollout or rollback renames this one link
    whatever the number of nodes (relative to the TFTP root)."""
    return f"{CFG_DIR}/{follow_target(profile)}"


def profile_link_target(profile: Profile, gen: Generation) -> str:
    """What the profile's link points at: the generation's config, beside it in pxelinux.cfg/imgstore/."""
    return _config_name(profile, gen).removeprefix("imgstore/")


def mac_file(mac: MacAddress) -> str:
    return f"{CFG_DIR}/{mac.pxelinux_name}"


def default_file() -> str:
    return f"{CFG_DIR}/default"


def append_line(profile: Profile, gen: Generation, root: Path) -> str:
    d = gen_dir(profile, gen)
    text = gen.append.format(
        nfs_server=profile.nfs_server, nfs_options=profile.nfs_options, root=os.fspath(root), gen=gen.gen_id,
        profile=profile.name, kernel=f"{d}/vmlinuz", initrd=f"{d}/initrd.img",
    )
    # imgstore.root tells the node's initrd whether to copy the NFS root into a tmpfs (docs/boot-server.md).
    return f"{text} imgstore.root={profile.root_mode} imgstore.gen={gen.gen_id}".strip()


def config(profile: Profile, gen: Generation, root: Path) -> bytes:
    d = gen_dir(profile, gen)
    lines = [
        f"{MARK} {gen.ref} {gen.gen_id}. Written by imgstore; edits are reported as drift.",
    ]
    if profile.serial:
        lines.append(f"SERIAL {profile.serial}")
    lines += [
        "DEFAULT imgstore",
        "PROMPT 0",
        "TIMEOUT 0",
        # A node that cannot load its kernel reboots and tries again instead of waiting at boot:.
        "ONERROR reboot.c32",
        "LABEL imgstore",
        f"  KERNEL {d}/vmlinuz",
    ]
    append = append_line(profile, gen, root)
    if gen.initrd and "initrd=" not in append:  # the classic APPEND names it itself; never load it twice
        lines.append(f"  INITRD {d}/initrd.img")
    lines += [f"  APPEND {append}", "  IPAPPEND 3", ""]
    return "\n".join(lines).encode()


def place_file(src: Path, dest: Path) -> None:
    """Hardlink src to dest (a copy across filesystems), world-readable, atomically."""
    tmp = dest.with_name(f"{TMP_PREFIX}{dest.name}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if os.path.lexists(tmp):
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            shutil.copyfile(src, tmp)  # another filesystem: a copy
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except OSError as exc:
        if os.path.lexists(tmp):
            tmp.unlink()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space(dest.parent, exc, os.path.getsize(src)) from exc
        raise


def install_bootloader(profile: Profile) -> list[str]:
    """Copy pxelinux.0 and the modules ONERROR needs into the TFTP root if missing. Returns what it copied."""
    if profile.bootloader_dir is None:
        return []
    copied = []
    for name in BOOTLOADER:
        dest = profile.tftp_root / name
        if dest.exists():
            continue
        for d in (profile.bootloader_dir, *MODULE_DIRS):
            if (d / name).is_file():
                profile.tftp_root.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f"{TMP_PREFIX}{name}")
                shutil.copyfile(d / name, tmp)
                os.chmod(tmp, 0o644)
                os.rename(tmp, dest)
                copied.append(name)
                break
    return copied
