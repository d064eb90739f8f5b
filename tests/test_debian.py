"""A real Debian minbase chroot (debootstrap, cached between runs) round-trips exactly, and a package
install on top stores only what changed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_profile
from treeutil import IS_ROOT, diff_snapshots, snapshot

from imgstore import browse, commit
from imgstore.store import Store

sys.path.insert(0, os.fspath(REPO))

pytestmark = [pytest.mark.slow, pytest.mark.root]


@pytest.fixture(scope="module")
def rootfs_module() -> object:
    if not IS_ROOT:
        pytest.skip("debootstrap needs root")
    from benchmarks import rootfs

    return rootfs


def test_debian_minbase_roundtrip_and_incremental(rootfs_module: object, store: Store, tmp_path: Path) -> None:
    rootfs = rootfs_module
    tree = rootfs.minbase(dest=tmp_path / "rootfs")  # type: ignore[attr-defined]
    rootfs.strip_caches(tree)  # type: ignore[attr-defined]  # apt's downloads are not part of the image
    write_profile(store.root, "deb", "[commit]\ndefault_excludes = false\nrequire_kernel = false\n")
    first = commit.commit(store, tree, "deb", no_kernel=True)
    assert first.files > 4000 and first.generation.meta["packages"] > 80
    assert first.generation.meta["debian_version"].startswith("12")
    dest = tmp_path / "out"
    browse.checkout(store, first.generation, dest)
    problems = diff_snapshots(snapshot(tree), snapshot(dest))
    assert not problems, "\n".join(problems[:20])
    # Debian's ping carries a capability when iputils-ping is installed; minbase has device nodes.
    assert any(e.type == "c" for e in browse.entries(store, first.generation))

    curl = rootfs.with_package(pkg="curl", dest=tmp_path / "curl")  # type: ignore[attr-defined]
    rootfs.strip_caches(curl)  # type: ignore[attr-defined]
    second = commit.commit(store, curl, "deb", no_kernel=True)
    assert second.created and second.generation.meta["packages"] > first.generation.meta["packages"]
    # Only the new and changed files are stored again (curl and its libraries: ~12 MB raw).
    assert second.new_bytes < 0.25 * first.new_bytes, (second.new_bytes, first.new_bytes)
    dest2 = tmp_path / "out2"
    browse.checkout(store, second.generation, dest2)
    problems = diff_snapshots(snapshot(curl), snapshot(dest2))
    assert not problems, "\n".join(problems[:20])
