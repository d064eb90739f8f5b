"""Profiles: one TOML file per class of nodes (profiles/web.toml), read from the store's profiles folder.

Errors name the file, the line and the key. Relative paths in a profile are relative to the store
root, so a demo or test store can keep its TFTP root and root links inside one folder.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, NamedTuple

from .errors import ConfigError, NotFound
from .scan import DEFAULT_EXCLUDES

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")

DEFAULT_APPEND = (
    "root=/dev/nfs nfsroot={nfs_server}:{root},{nfs_options} ip=dhcp ro panic=60"
)

# key -> (type, default); the schema every profile file is checked against.
SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], Any]]] = {
    "": {"name": (str, None), "description": (str, "")},
    "commit": {
        "chroot": (str, None),
        "exclude": (list, []),
        "default_excludes": (bool, True),
        "require_kernel": (bool, True),
    },
    "boot": {
        "append": (str, DEFAULT_APPEND),
        "serial": (str, ""),
        "root_mode": (str, "nfs"),
    },
    "deploy": {
        "tftp_root": (str, "/tftpboot"),
        "root_link": (str, None),
        "serve_default": (bool, False),
        "nfs_server": (str, "10.0.0.1"),
        # actimeo=120, spelled out: the klibc nfsmount in Debian's initrd rejects "actimeo".
        "nfs_options": (str, "ro,acregmin=120,acregmax=120,acdirmin=120,acdirmax=120"),
        "bootloader_dir": (str, ""),
        "mac_files": (str, "link"),
    },
}


class Profile(NamedTuple):
    """A profile as profiles/NAME.toml sets it (docs/profiles.md)."""

    name: str
    path: Path
    description: str
    chroot: Path | None
    excludes: tuple[str, ...]
    require_kernel: bool
    append: str
    serial: str
    root_mode: str
    tftp_root: Path
    root_link: Path
    serve_default: bool
    nfs_server: str
    nfs_options: str
    bootloader_dir: Path | None
    mac_files: str  # "link": relative symlinks to the generation's config; "copy": a file per node

    def as_dict(self) -> dict[str, Any]:
        return {
            k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in self._asdict().items()
        }


def _line_of(text: str, table: str, key: str) -> int:
    """The line that sets table.key, in any spelling TOML allows: under [table], as a dotted or quoted key,
    inside an inline table, or as a [table.key] / [[table.key]] header."""
    q = r"""["']?"""
    k, t = re.escape(key), re.escape(table)
    header = re.compile(r"^\s*\[\[?\s*" + q + r"([^\]]*?)" + q + r"\s*\]\]?")
    plain = re.compile(r"^\s*" + q + k + q + r"\s*=")
    dotted = re.compile(r"^\s*" + q + t + q + r"\s*\.\s*" + q + k + q + r"\s*=")
    inline = re.compile(r"^\s*" + q + t + q + r"\s*=\s*\{.*\b" + k + r"\b\s*=")
    full = f"{table}.{key}" if table else key
    section = ""
    for n, line in enumerate(text.splitlines(), start=1):
        m = header.match(line)
        if m:
            section = re.sub(r"""["'\s]""", "", m.group(1))
            if section == full:
                return n
            continue
        if section == table and plain.match(line):
            return n
        if table and section == "" and (dotted.match(line) or inline.match(line)):
            return n
    return 1


def load(path: Path, base: Path) -> Profile:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})", "fix the file's permissions or encoding") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}", "fix the TOML syntax there") from None

    def fail(table: str, key: str, why: str) -> ConfigError:
        where = f"{table}.{key}" if table else key
        return ConfigError(f"{path}:{_line_of(text, table, key)}: key '{where}' {why}", "fix the profile file")

    values: dict[str, Any] = {}
    for table, keys in SCHEMA.items():
        section = data if table == "" else data.get(table, {})
        if not isinstance(section, dict):
            raise fail("", table, "must be a table")
        for key, val in section.items():
            if table == "" and key in SCHEMA:
                continue
            if key not in keys:
                import difflib  # only to suggest a name

                close = difflib.get_close_matches(key, list(keys), 1)
                raise fail(table, key, "is unknown" + (f"; did you mean '{close[0]}'?" if close else ""))
            typ = keys[key][0]
            if not isinstance(val, typ) or (typ is int and isinstance(val, bool)):
                tname = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
                raise fail(table, key, f"must be a {tname}, not {type(val).__name__}")
        for key, (_typ, default) in keys.items():
            values[f"{table}.{key}" if table else key] = section.get(key, default)

    name = values["name"] or path.stem
    if not NAME_RE.match(name):
        raise fail("", "name", "must be lowercase letters, digits, '-' or '_' (at most 63)")
    if name != path.stem:
        raise fail("", "name", f"is {name!r} but the file is {path.name}; they must match")
    for pat in values["commit.exclude"]:
        if not isinstance(pat, str) or not pat.startswith("/"):
            raise fail("commit", "exclude", f"entry {pat!r} must be a string starting with '/'")
    if values["deploy.mac_files"] not in ("link", "copy"):
        raise fail("deploy", "mac_files", "must be 'link' or 'copy'")
    if values["boot.root_mode"] not in ("nfs", "tmpfs"):
        raise fail("boot", "root_mode", "must be 'nfs' or 'tmpfs'")
    try:
        values["boot.append"].format(**{k: "" for k in APPEND_FIELDS})
    except (KeyError, IndexError, ValueError) as exc:
        raise fail("boot", "append", f"has an unknown placeholder {exc}; known: {', '.join(APPEND_FIELDS)}") from None

    def p(v: str | None) -> Path | None:
        return None if not v else (base / v if not v.startswith("/") else Path(v))

    excludes = tuple(DEFAULT_EXCLUDES if values["commit.default_excludes"] else ()) + tuple(values["commit.exclude"])
    return Profile(
        name=name,
        path=path,
        description=values["description"],
        chroot=p(values["commit.chroot"]),
        excludes=excludes,
        require_kernel=values["commit.require_kernel"],
        append=values["boot.append"],
        serial=values["boot.serial"],
        root_mode=values["boot.root_mode"],
        tftp_root=p(values["deploy.tftp_root"]) or Path("/tftpboot"),
        root_link=p(values["deploy.root_link"]) or Path("/netboot") / name,
        serve_default=values["deploy.serve_default"],
        nfs_server=values["deploy.nfs_server"],
        nfs_options=values["deploy.nfs_options"],
        bootloader_dir=p(values["deploy.bootloader_dir"]),
        mac_files=values["deploy.mac_files"],
    )


APPEND_FIELDS = ("nfs_server", "nfs_options", "root", "gen", "profile", "kernel", "initrd")


def names(directory: Path) -> list[str]:
    try:
        return sorted(p.stem for p in directory.glob("*.toml"))
    except OSError:
        return []


def find(directory: Path, name: str, base: Path) -> Profile:
    path = directory / f"{name}.toml"
    if not NAME_RE.match(name) or not path.is_file():
        known = names(directory)
        import difflib

        close = difflib.get_close_matches(name, known, 3, 0.5) or known[:5]
        raise NotFound(
            f"profile {name!r} does not exist in {directory}"
            + (f"; closest: {', '.join(close)}" if close else ""),
            f"create {directory}/{name}.toml (imgstore profile list shows the known ones)",
        )
    return load(path, base)


def load_all(directory: Path, base: Path) -> list[Profile]:
    return [load(directory / f"{n}.toml", base) for n in names(directory)]
