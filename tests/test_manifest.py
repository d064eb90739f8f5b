"""Manifests: encoding round trip, hostile entries refused, random trees round trip (hypothesis)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import write_profile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treeutil import diff_snapshots, snapshot

from imgstore import browse, commit, manifest
from imgstore.checkout import restore
from imgstore.errors import IntegrityError
from imgstore.manifest import Entry, escape, unescape
from imgstore.objects import ObjectStore
from imgstore.store import Store


@given(st.binary(max_size=300))
def test_escape_roundtrip(raw: bytes) -> None:
    e = escape(raw)
    assert unescape(e) == raw
    assert not set(e) & set(b"\t\n ,=")


def _root() -> Entry:
    return Entry(path=b".", type="d", mode=0o755, uid=0, gid=0, mtime_ns=0)


@pytest.mark.parametrize(
    "bad",
    [
        [Entry(path=b"../evil", type="f", mode=0o644, uid=0, gid=0, mtime_ns=0, digest="0" * 64)],
        [Entry(path=b"/etc/passwd", type="f", mode=0o644, uid=0, gid=0, mtime_ns=0, digest="0" * 64)],
        [Entry(path=b"a/../../x", type="d", mode=0o755, uid=0, gid=0, mtime_ns=0)],
        [Entry(path=b"a//b", type="d", mode=0o755, uid=0, gid=0, mtime_ns=0)],
        # a child under a symlink: restoring it would write through the link
        [Entry(path=b"lnk", type="l", mode=0o777, uid=0, gid=0, mtime_ns=0, target=b"/etc"),
         Entry(path=b"lnk/passwd", type="f", mode=0o644, uid=0, gid=0, mtime_ns=0, digest="0" * 64)],
        [Entry(path=b"h", type="h", mode=0o644, uid=0, gid=0, mtime_ns=0, target=b"../../etc/shadow")],
        [Entry(path=b"x", type="f", mode=0o644, uid=0, gid=0, mtime_ns=0, digest="0" * 64)] * 2,
    ],
)
def test_hostile_manifest_refused(bad: list[Entry]) -> None:
    data = b"".join(manifest.encode([_root(), *bad]))
    with pytest.raises(IntegrityError):
        manifest.decode(data)


def test_slash_inside_a_name_is_refused() -> None:
    # A name with '/' cannot come from a real directory; in a manifest it means "a/b" without "a".
    line = b"imgstore-manifest 1\n.\td\t755\t0\t0\t0\t0\t-\t-\nsub%2Fdir\td\t755\t0\t0\t0\t0\t-\t-\n"
    with pytest.raises(IntegrityError):
        manifest.decode(line)
    with pytest.raises(IntegrityError):
        manifest.decode(b"imgstore-manifest 1\n.\td\t755\t0\t0\t0\t0\t-\t-\na/b\td\t755\t0\t0\t0\t0\t-\t-\n")


def test_malformed_and_unknown_version() -> None:
    with pytest.raises(IntegrityError, match="known version"):
        manifest.decode(b"imgstore-manifest 2\n")
    with pytest.raises(IntegrityError, match="line 3"):
        manifest.decode(b"imgstore-manifest 1\n.\td\t755\t0\t0\t0\t0\t-\t-\nbroken\n")


def test_checkout_never_follows_planted_symlink(tmp_path: Path) -> None:
    """Even if a hostile manifest got past decode, restore works relative to O_NOFOLLOW directory fds."""
    objects = ObjectStore(tmp_path / "s")
    (tmp_path / "s").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    entries = [_root(), Entry(path=b"etc", type="d", mode=0o755, uid=0, gid=0, mtime_ns=0)]
    # Plant a symlink where restore will create a directory: it must fail, not write through it.
    os.symlink(outside, dest / "etc")
    with pytest.raises(FileExistsError):
        restore(objects, entries, dest)
    assert list(outside.iterdir()) == []


names = st.binary(min_size=1, max_size=20).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
files = st.tuples(st.binary(max_size=3000), st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o000, 0o1777]))
trees = st.recursive(
    st.one_of(files, st.tuples(st.just("link"), st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b))),
    lambda children: st.dictionaries(names, children, max_size=6),
    max_leaves=25,
)


def _build(path: bytes, node: object) -> None:
    if isinstance(node, dict):
        os.mkdir(path)
        for name, child in node.items():
            _build(os.path.join(path, name), child)
    elif node[0] == "link":  # type: ignore[index]
        os.symlink(node[1], path)  # type: ignore[index]
    else:
        with open(path, "wb") as f:
            f.write(node[0])  # type: ignore[index]
        os.chmod(path, node[1])  # type: ignore[index]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(names, trees, max_size=8))
def test_random_trees_roundtrip(tree: dict[bytes, object]) -> None:
    tmp = Path(tempfile.mkdtemp())
    try:
        s = Store.init(tmp / "store")
        write_profile(s.root, "r", "[commit]\ndefault_excludes = false\nrequire_kernel = false\n")
        src = os.fsencode(tmp / "src")
        _build(src, tree)
        res = commit.commit(s, Path(os.fsdecode(src)), "r", no_kernel=True)
        browse.checkout(s, res.generation, tmp / "out")
        problems = diff_snapshots(snapshot(os.fsdecode(src)), snapshot(tmp / "out"))
        assert not problems, problems[:5]
        s.close()
    finally:
        shutil.rmtree(tmp)
