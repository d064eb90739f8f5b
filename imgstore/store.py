"""The store: the folder imgstore owns. Layout and invariants: docs/format.md.

    <root>/imgstore.toml     format version and database URL
    <root>/imgstore.db       SQLite generations database (default)
    <root>/objects/ packs/   content-addressed objects (objects.py)
    <root>/profiles/*.toml   profiles
    <root>/cache/            stat caches (safe to delete)
    <root>/lock              the store lock (locking.py)
"""

from __future__ import annotations

import os
import re
import tomllib
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from .durable import write_atomic
from .errors import ConfigError, StoreError
from .objects import ObjectStore

if TYPE_CHECKING:
    from .db import Database
    from .profiles import Profile

FORMAT = 2  # 2: packs hold blocks of several objects (docs/format.md); format 1 stores are read, and upgraded
CONFIG = "imgstore.toml"
DEFAULT_ROOT = "/var/lib/imgstore"


def default_root() -> Path:
    return Path(os.environ.get("IMGSTORE_ROOT") or DEFAULT_ROOT)


class Store:
    def __init__(self, root: Path, config: dict[str, object]) -> None:
        self.root = root
        self.config = config
        # A format 1 store becomes format 2 before its first pack of blocks is written (an older imgstore would
        # misread one), by whoever holds the store lock then: a reader never writes the store.
        fmt = config.get("format", FORMAT)
        self.objects = ObjectStore(root, before_first_pack=self._upgrade if isinstance(fmt, int) and fmt < FORMAT
                                   else None)

    # -- creation and opening -----------------------------------------------------------------
    @classmethod
    def init(cls, root: Path, database: str | None = None, profiles: bool = True) -> Store:
        root = root.absolute()
        if (root / CONFIG).exists():
            raise StoreError(f"a store already exists at {root}", "use it, or choose another --root")
        if root.exists() and any(root.iterdir()):
            raise StoreError(f"{root} exists and is not empty", "choose an empty or new folder for --root")
        root.mkdir(parents=True, exist_ok=True, mode=0o755)
        os.chmod(root, 0o755)
        for sub in ("objects", "packs", "profiles", "cache"):
            (root / sub).mkdir(mode=0o755, exist_ok=True)
        if profiles:
            import shutil

            import imgstore._profiles as bundled

            for src in sorted(Path(os.path.dirname(bundled.__file__ or "")).glob("*.toml")):
                shutil.copyfile(src, root / "profiles" / src.name)
        make_reserve(root)
        db_line = f'database = "{database}"\n' if database else ""
        write_atomic(
            root / CONFIG,
            (
                "# imgstore store configuration; docs/format.md describes every key.\n"
                f"format = {FORMAT}\n"
                f"{db_line}"
                'profiles = "profiles"\n'
            ).encode(),
        )
        store = cls.open(root)
        from . import db

        engine = db.make_engine(store.database_url)
        db.check(engine, allow_upgrade=True)
        store.__dict__["engine"] = engine
        return store

    @classmethod
    def open(cls, root: Path | None = None) -> Store:
        root = (root or default_root()).absolute()
        cfg_path = root / CONFIG
        try:
            text = cfg_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise StoreError(
                f"no imgstore store at {root}", f"run: imgstore --root {root} init (or set IMGSTORE_ROOT)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"{cfg_path} cannot be read ({exc})", "check its permissions") from None
        try:
            config = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{cfg_path}: {exc}", "fix the TOML syntax there") from None
        fmt = config.get("format")
        if not isinstance(fmt, int):
            raise ConfigError(f"{cfg_path}: key 'format' is missing or not an integer", "restore imgstore.toml")
        if fmt > FORMAT:
            raise StoreError(
                f"the store at {root} has format {fmt}, newer than this imgstore understands ({FORMAT})",
                "upgrade imgstore on this machine",
            )
        return cls(root, config)

    def _upgrade(self) -> None:
        path = self.root / CONFIG
        text, n = re.subn(r"(?m)^(\s*format\s*=\s*)\d+", rf"\g<1>{FORMAT}", path.read_text(encoding="utf-8"), count=1)
        if n != 1:
            raise ConfigError(f"{path}: cannot find the line 'format = ...' to upgrade", "restore imgstore.toml")
        write_atomic(path, text.encode())
        self.config["format"] = FORMAT

    # -- parts ----------------------------------------------------------------------------------
    @property
    def database_url(self) -> str:
        url = os.environ.get("IMGSTORE_DATABASE") or self.config.get("database")
        if isinstance(url, str) and url:
            return url
        return f"sqlite:///{self.root / 'imgstore.db'}"

    @cached_property
    def engine(self) -> Database:
        from . import db

        engine = db.make_engine(self.database_url)
        if self.database_url.startswith("sqlite:///") and not (self.root / "imgstore.db").exists():
            raise StoreError(
                f"the database {self.root / 'imgstore.db'} is missing",
                "restore it from a backup; the objects are intact (imgstore verify checks them)",
            )
        db.check(engine, allow_upgrade=True)
        return engine

    @property
    def profiles_dir(self) -> Path:
        p = self.config.get("profiles", "profiles")
        return self.root / str(p)

    def profile(self, name: str) -> Profile:
        from . import profiles

        return profiles.find(self.profiles_dir, name, self.root)

    def profiles(self) -> list[Profile]:
        from . import profiles

        return profiles.load_all(self.profiles_dir, self.root)

    def close(self) -> None:
        self.objects.close()
        if "engine" in self.__dict__:
            self.engine.dispose()


RESERVE = "reserve"
RESERVE_SIZE = 256 << 10  # room for gc's database update on a full disk (tests/test_diskfull.py)


def make_reserve(root: Path) -> bool:
    """Keep a few MB of real blocks in the store that gc gives back first: on a filesystem that is 100%
    full, gc still needs room for its database update. Returns whether the reserve exists now."""
    path = root / RESERVE
    if path.exists():
        return True
    tmp = root / f".imgstore-tmp-{RESERVE}"
    try:
        with open(tmp, "wb") as f:
            f.write(b"imgstore: space kept for gc on a full disk; safe to delete in an emergency\n".ljust(
                RESERVE_SIZE, b"\0"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        return False
