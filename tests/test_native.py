"""The read loop in Rust (native/, imgstore/native.py): built wherever its toolchain is, the same stored bytes
as the Python loop, and every file that is not exactly what the walk saw left to Python."""

from __future__ import annotations

import glob
import mmap
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
from conftest import Cli, write_profile
from hypothesis import given, settings
from hypothesis import strategies as st
from treeutil import diff_snapshots, make_nasty_tree, snapshot

from imgstore import browse, commit, native, scan, verify
from imgstore.durable import LONG_PATH
from imgstore.errors import ChangedWhileReading
from imgstore.objects import BLOCK, LOOSE_MIN, MAX_BLOCK
from imgstore.store import Store


@pytest.fixture
def read_files(monkeypatch: pytest.MonkeyPatch) -> native.NativeRead:
    monkeypatch.delenv("IMGSTORE_NATIVE", raising=False)
    fn = native.reader()
    if fn is None:  # test_the_native_loop_is_built_where_its_toolchain_is says whether that may be
        pytest.skip("the native read loop is not built here")
    return fn


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch, read_files: native.NativeRead) -> list[int]:
    """How many files each call of the real native loop took (commit looks it up through native.reader)."""
    taken: list[int] = []

    def counting(files: list[tuple[bytes, int, int, int, int]], buf: memoryview, at: int, limit: int
                 ) -> list[bytes | None]:
        out = read_files(files, buf, at, limit)
        taken.append(sum(1 for d in out if d is not None))
        return out

    monkeypatch.setattr(native, "reader", lambda: counting)
    return taken


def test_the_native_loop_is_built_where_its_toolchain_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/setup.sh installs cargo and Debian's crates (as root, as CI runs it): the build must not have
    fallen back to Python there without anybody noticing."""
    if not (shutil.which("cargo") and glob.glob("/usr/share/cargo/registry/pyo3-0.*")):
        pytest.skip("no cargo or no librust-pyo3-dev: imgstore installs without the native loop")
    monkeypatch.delenv("IMGSTORE_NATIVE", raising=False)
    assert native.reader() is not None, "imgstore/_native is not built: run scripts/setup.sh (as root)"
    assert native.describe() == "native read and write loops"
    monkeypatch.setenv("IMGSTORE_NATIVE", "0")
    assert native.reader() is None and native.describe() == "pure Python: IMGSTORE_NATIVE=0"


def _commit(root: Path, tree: Path) -> commit.CommitResult:
    store = Store.init(root)
    write_profile(store.root, "t", "[commit]\ndefault_excludes = false\nrequire_kernel = false\n")
    try:
        return commit.commit(store, tree, "t", no_kernel=True)
    finally:
        store.close()


def test_native_and_python_loops_store_the_same_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: list[int]) -> None:
    tree = tmp_path / "tree"
    make_nasty_tree(tree)
    rnd = __import__("random").Random(7)
    small = tree / "small"
    small.mkdir()
    shared = os.urandom(3000)
    for i in range(2500):  # several blocks' worth, with duplicates (the block is compacted around them)
        size = rnd.choice((0, 1, 100, 4095, 4096, 20000, 70000))
        data = shared if i % 7 == 0 else rnd.randbytes(size) if i % 2 else b"text %d\n" % i * (size // 8)
        (small / f"f{i:04d}").write_bytes(data)
        if i == 1200:
            (small / "f1200-large").write_bytes(os.urandom(LOOSE_MIN + 5))  # a large file inside a run
    sparse = small / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(LOOSE_MIN - 1)
        f.write(b"head")
    # A path longer than LONG_PATH (Python reads it, through short_path) but below PATH_MAX (the
    # snapshot below can still reach it): 4,050 bytes.
    deep = os.fsencode(tree)
    while len(deep) < 4050 - 250 - len(b"/deep-file"):
        deep += b"/" + b"d" * 240
    deep += b"/" + b"e" * (4050 - len(b"/deep-file") - len(deep) - 1)
    os.makedirs(deep)
    with open(deep + b"/deep-file", "wb") as f:
        f.write(b"far down")
    assert len(deep + b"/deep-file") == 4050 > LONG_PATH
    os.link(small / "f0001", tree / "hardlink-to-f0001")

    monkeypatch.setenv("IMGSTORE_NATIVE", "0")
    py = _commit(tmp_path / "py", tree)
    monkeypatch.delenv("IMGSTORE_NATIVE")
    calls.clear()
    nat = _commit(tmp_path / "nat", tree)
    assert sum(calls) >= 2500, calls  # the small files went through the native loop
    assert nat.generation.gen_id == py.generation.gen_id
    # Not new_bytes: which of two batches with the same content packs it, and so what each block holds and
    # how well it compresses, depends on how the worker threads run, in either loop.
    assert (nat.new_objects, nat.read_files, nat.read_bytes) == (py.new_objects, py.read_files, py.read_bytes)
    store = Store.open(tmp_path / "nat")
    try:
        assert verify.verify(store).ok
        browse.checkout(store, nat.generation, tmp_path / "out")
    finally:
        store.close()
    problems = diff_snapshots(snapshot(tree), snapshot(tmp_path / "out"))
    assert not problems, problems[:20]


def _founds(tree: Path) -> list[scan.Found]:
    walked, _ = scan.walk(tree, [])
    root = os.fsencode(tree)
    return [f for f in (scan.describe(w, root) for w in walked) if f.entry.type == "f"]


def test_a_file_changed_after_the_walk_is_read_again_by_python(
        store: Store, tmp_path: Path, calls: list[int]) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("a", "b", "c", "d"):
        (tree / name).write_bytes(name.encode() * 1000)
    founds = _founds(tree)
    (tree / "b").write_bytes(b"B" * 1000)  # same size, new content, new mtime and ctime
    os.utime(tree / "b", ns=(5_000_000_000, 5_000_000_000))
    done, new_objects, _ = commit._Reader(store).batch(founds)
    assert [d for d, _ in done] == [blake3.blake3(c * 1000).hexdigest() for c in (b"a", b"B", b"c", b"d")]
    assert new_objects == 4
    b = founds[1].entry
    assert b.mtime_ns == 5_000_000_000 and founds[1].st.st_mtime_ns == 5_000_000_000  # what was read
    assert calls[0] == 1 and calls[-1] == 2  # a, then Python for b, then c and d natively again


def test_a_file_removed_or_replaced_after_the_walk_is_named(store: Store, tmp_path: Path,
                                                            calls: list[int]) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("gone", "fifo", "dir"):
        (tree / name).write_bytes(b"x" * 10)
    founds = {f.entry.path: f for f in _founds(tree)}
    os.unlink(tree / "gone")
    with pytest.raises(ChangedWhileReading, match="gone was removed while commit read it"):
        commit._Reader(store).batch([founds[b"gone"]])
    os.unlink(tree / "fifo")
    os.mkfifo(tree / "fifo")  # opened non-blocking by both loops: no hang
    with pytest.raises(ChangedWhileReading, match="fifo was replaced while commit read it"):
        commit._Reader(store).batch([founds[b"fifo"]])
    os.unlink(tree / "dir")
    os.mkdir(tree / "dir")
    with pytest.raises(ChangedWhileReading, match="dir was replaced while commit read it"):
        commit._Reader(store).batch([founds[b"dir"]])


def _want(paths: list[Path]) -> list[tuple[bytes, int, int, int, int]]:
    out = []
    for p in paths:
        s = os.lstat(p)
        out.append((os.fsencode(p), s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns))
    return out


@pytest.fixture
def block() -> Iterator[memoryview]:
    with mmap.mmap(-1, MAX_BLOCK) as m:
        view = memoryview(m)
        yield view
        view.release()


def test_read_files_contract(tmp_path: Path, read_files: native.NativeRead, block: memoryview) -> None:
    paths = []
    for i in range(3):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes([65 + i]) * 100)
        paths.append(p)
    want = _want(paths)
    # Reads back to back from `offset` while it is below `limit`: the third would start at 210, past 150.
    out = read_files(want, block, 10, 150)
    assert out == [blake3.blake3(b"A" * 100).digest(), blake3.blake3(b"B" * 100).digest()]
    assert bytes(block[10:210]) == b"A" * 100 + b"B" * 100 and bytes(block[210:310]) != b"C" * 100
    # A file not as the walk saw it ends the run with None; nothing after it is read.
    block[:] = b"\0" * len(block)
    for bad in ((want[1][0], want[1][1] + 1, *want[1][2:]),  # another inode
                (want[1][0], want[1][1], 99, *want[1][3:]),  # another size
                (want[1][0], *want[1][1:3], want[1][3] + 1, want[1][4]),  # another mtime
                (b"no\0such", *want[1][1:]),  # a path the system cannot take
                (os.fsencode(tmp_path / "missing"), *want[1][1:])):
        assert read_files([want[0], bad, want[2]], block, 0, BLOCK) == [blake3.blake3(b"A" * 100).digest(), None]
    # A file that does not fit in what is left of the buffer is Python's too.
    assert read_files([want[0]], block, len(block) - 50, len(block)) == [None]
    with pytest.raises(ValueError, match="offset past the end"):
        read_files(want, block, len(block) + 1, len(block) + 2)
    with pytest.raises(TypeError, match="writable"):
        read_files(want, memoryview(b"x" * 1000), 0, 100)
    with pytest.raises(ValueError, match="length 5"):
        read_files([(b"x", 1)], block, 0, 100)  # type: ignore[list-item]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.binary(max_size=9000), min_size=1, max_size=40))
def test_read_files_reads_and_hashes_like_python(contents: list[bytes]) -> None:
    fn = native.reader()
    if fn is None:
        pytest.skip("the native read loop is not built here")
    import tempfile

    with tempfile.TemporaryDirectory() as d, mmap.mmap(-1, MAX_BLOCK) as m:
        paths = []
        for i, c in enumerate(contents):
            p = Path(d) / f"{i}"
            p.write_bytes(c)
            paths.append(p)
        view = memoryview(m)
        assert fn(_want(paths), view, 0, BLOCK) == [blake3.blake3(c).digest() for c in contents]
        assert bytes(view[:sum(map(len, contents))]) == b"".join(contents)
        view.release()


def test_version_says_whether_the_native_loop_is_used(cli: Cli) -> None:
    r = cli("--version", env={"IMGSTORE_NATIVE": "0"})
    assert r.returncode == 0 and r.stdout == "imgstore 0.1.0 (pure Python: IMGSTORE_NATIVE=0)\n"
    r = cli("--version", env={"IMGSTORE_NATIVE": "1"})
    assert r.stdout == f"imgstore 0.1.0 ({native.describe()})\n"


def test_without_the_native_module_commit_reads_in_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What an install without cargo has (checked by hand from a clean clone with cargo off PATH: the build
    skips the extension, `imgstore --version` says so, commit works): imgstore._native cannot be imported."""
    import sys

    monkeypatch.delenv("IMGSTORE_NATIVE", raising=False)
    monkeypatch.setitem(sys.modules, "imgstore._native", None)  # `import` raises ImportError
    assert native.reader() is None
    assert native.describe().startswith("pure Python: the native loops are not built")
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(50):
        (tree / f"f{i}").write_bytes(b"%d" % i * 100)
    res = _commit(tmp_path / "s", tree)
    assert res.read_files == 50 and res.new_objects == 50


# -- the write loop of materialize ------------------------------------------------------------------------------


@pytest.fixture
def fill(monkeypatch: pytest.MonkeyPatch) -> native.NativeFill:
    monkeypatch.delenv("IMGSTORE_NATIVE", raising=False)
    fn = native.filler()
    if fn is None:
        pytest.skip("the native write loop is not built here")
    return fn


def _spec(path: bytes, content: bytes = b"", *, target: bytes | None = None, loose: bytes | None = None,
          inner: int = 0, digest: bytes | None = None, uid: int = 0, gid: int = 0, mode: int = 0o644,
          mtime_ns: int = 10**18, xattrs: tuple[tuple[bytes, bytes], ...] = (), sparse: bool = False
          ) -> native.MakeSpec:
    return (path, target, loose, inner, len(content), blake3.blake3(content).digest() if digest is None else digest,
            (uid, gid, mode, mtime_ns), list(xattrs), sparse)


def test_fill_contract(tmp_path: Path, fill: native.NativeFill) -> None:
    """Reads and decompresses each group's block once, makes each entry as checkout.make_new does (content,
    owner, xattrs, mode, times; a symlink not followed; a sparse file with its holes; a loose object streamed),
    and returns every entry it could not make exactly, leaving nothing of it."""
    import zstandard

    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    block = b"A" * 100 + b"B" * 100 + b"C" * 10 + bytes(3 * 4096) + b"tail" + bytes(4096)
    frame = zstandard.ZstdCompressor().compress(block)
    pack = tmp_path / "pack"
    pack.write_bytes(b"x" * 10 + frame + b"y" * 10)
    big = os.urandom(LOOSE_MIN) + bytes(3 << 20) + b"end"  # several chunks, holes after the first
    loose = tmp_path / "loose"
    loose.write_bytes(zstandard.ZstdCompressor().compress(big[:5000]) + zstandard.ZstdCompressor().compress(big[5000:]))
    own = os.geteuid() == 0
    xattrs = ((b"user.note", b"with \0 nul"), (b"trusted.t", b"x"))
    sparse = block[210:210 + 4 * 4096 + 4]
    specs = [
        _spec(b"a", b"A" * 100, mode=0o4755, uid=1234, gid=5678, mtime_ns=-1_500_000_001, xattrs=xattrs),
        _spec(b"sub/b", b"B" * 100, inner=100, mode=0o000, mtime_ns=1_600_000_000_123_456_789),
        _spec(b"sparse", sparse, inner=210, sparse=True),
        _spec(b"empty", b"", inner=len(block)),
    ]
    others = [
        _spec(b"sub/link", target=b"../a\xff odd", uid=42, gid=43, mtime_ns=7,
              xattrs=((b"trusted.l", b"y"),) if own else ()),
        _spec(b"big", big, loose=os.fsencode(loose), sparse=True),
        _spec(b"big-copy", big, loose=os.fsencode(loose)),
    ]
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    pfd = os.open(pack, os.O_RDONLY)
    try:
        assert fill(fd, [(pfd, 10, len(frame), specs), (-1, 0, 0, others)], own, 2) == []
        a, b, link = os.lstat(out / "a"), os.lstat(out / "sub/b"), os.lstat(out / "sub/link")
        assert (out / "a").read_bytes() == b"A" * 100 and (out / "sub/b").read_bytes() == b"B" * 100
        assert oct(a.st_mode & 0o7777) == "0o4755" and b.st_mode & 0o7777 == 0  # setuid kept: mode after owner
        assert a.st_mtime_ns == -1_500_000_001 and b.st_mtime_ns == 1_600_000_000_123_456_789
        assert os.readlink(os.fsencode(out / "sub/link")) == b"../a\xff odd" and link.st_mtime_ns == 7
        assert os.getxattr(out / "a", "user.note") == b"with \0 nul"
        assert (out / "empty").read_bytes() == b""
        assert (out / "sparse").read_bytes() == sparse and os.stat(out / "sparse").st_blocks * 512 <= 8192
        assert (out / "big").read_bytes() == big == (out / "big-copy").read_bytes()
        assert os.stat(out / "big").st_blocks * 512 < LOOSE_MIN + (1 << 20) < os.stat(out / "big-copy").st_blocks * 512
        if own:
            assert (a.st_uid, a.st_gid, link.st_uid, link.st_gid) == (1234, 5678, 42, 43)
            assert os.getxattr(out / "a", "trusted.t") == b"x"
            assert os.getxattr(out / "sub/link", "trusted.l", follow_symlinks=False) == b"y"
        # Not own: no owner, no privileged xattrs (as an unprivileged checkout).
        assert fill(fd, [(pfd, 10, len(frame), [_spec(b"c", b"C" * 10, inner=200, uid=1234, xattrs=xattrs)])],
                    False, 1) == []
        assert os.lstat(out / "c").st_uid == os.geteuid() and os.listxattr(out / "c") == ["user.note"]
        # Each of these is returned, leaves nothing of itself and does not stop the others.
        bad = [_spec(b"bad0", b"A" * 100, digest=bytes(32)),  # a content that is not what its digest says
               _spec(b"bad1", b"C" * 20, inner=200),  # past the end of the block
               _spec(b"a", b"A" * 100),  # a name that exists (never replaced, never followed)
               _spec(b"sub/link/x", b"A" * 100),  # below a symlink
               _spec(b"missing/bad2", b"A" * 100),  # in a directory that does not exist
               _spec(b"bad3", b"A" * 100, xattrs=((b"nonsense.ns", b"v"),)),  # an xattr the system refuses
               _spec(b"bad\0nul", b"A" * 100),  # a name the system cannot take
               _spec(b"bad4", target=b"t", xattrs=((b"user.x", b"v"),)),  # user xattrs on a symlink: EPERM
               _spec(b"sub/link", target=b"again"),  # a symlink that exists
               _spec(b"bad5", big, loose=os.fsencode(loose), digest=bytes(32)),  # a loose object that lies
               _spec(b"bad6", big[:10], loose=os.fsencode(loose)),  # longer than its entry says
               _spec(b"bad7", big, loose=os.fsencode(tmp_path / "gone"))]  # a missing loose object
        oks = [_spec(b"ok%d" % i, b"C" * 10, inner=200) for i in range(len(bad))]
        mixed = [x for pair in zip(bad, oks, strict=True) for x in pair]
        assert fill(fd, [(pfd, 10, len(frame), mixed)], own, 2) == [(0, i) for i in range(0, len(mixed), 2)]
        assert sorted(p.name for p in out.iterdir() if p.name.startswith("bad")) == []
        assert all((out / f"ok{i}").read_bytes() == b"C" * 10 for i in range(len(bad)))
        # A block that cannot be read or decompressed: all its entries are returned.
        for where in ((pfd, 11, len(frame)), (pfd, 10, len(frame) - 1), (pfd, 10**9, 100), (-5, 10, len(frame))):
            groups = [(-1, 0, 0, [_spec(b"fine", target=b"t")]), (*where, specs[:2])]
            assert fill(fd, groups, own, 2) == [(1, 0), (1, 1)]
            os.unlink(out / "fine")
    finally:
        os.close(fd)
        os.close(pfd)
    assert os.readlink(os.fsencode(out / "sub/link")) == b"../a\xff odd" and (out / "a").read_bytes() == b"A" * 100


@pytest.fixture
def fill_calls(monkeypatch: pytest.MonkeyPatch, fill: native.NativeFill) -> list[int]:
    """How many entries each call of the real write loop was given, and made."""
    made: list[int] = []

    def counting(root_fd: int, groups: list[native.MakeGroup], own: bool, threads: int) -> list[tuple[int, int]]:
        left = fill(root_fd, groups, own, threads)
        made.append(sum(len(g[3]) for g in groups) - len(left))
        return left

    monkeypatch.setattr(native, "filler", lambda: None if os.environ.get("IMGSTORE_NATIVE") == "0" else counting)
    return made


def _rich_tree(tmp_path: Path) -> Path:
    """make_nasty_tree, with a smaller sparse file and 600 small files in several blocks."""
    tree = tmp_path / "tree"
    make_nasty_tree(tree)
    os.truncate(tree / "var-sparse.img", 8 << 20)  # still sparse (a hole, then "middle"), not 1 GiB to hash
    with open(tree / "var-sparse.img", "r+b") as f:
        f.seek(6 << 20)
        f.write(b"middle")
    for i in range(600):  # several blocks
        p = tree / "many" / f"f{i}"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(os.urandom(3000 + i) if i % 3 else b"same %d\n" % (i % 5) * 100)
        os.utime(p, ns=(i, i))
        if i % 50 == 0:
            os.symlink(f"f{i}", tree / "many" / f"l{i}")
            if os.geteuid() == 0:
                os.setxattr(tree / "many" / f"l{i}", b"trusted.note", b"%d" % i, follow_symlinks=False)
    return tree


def test_native_and_python_loops_check_out_the_same_tree(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fill_calls: list[int]) -> None:
    """checkout lays the tree out with the same loops as materialize, hardlinks and devices included, and
    reports its progress between runs of the write loop."""
    from imgstore import browse, fill, generations

    tree = _rich_tree(tmp_path)
    res = _commit(tmp_path / "store", tree)
    monkeypatch.setattr(fill, "PROGRESS_EVERY", 1 << 20)
    trees = {}
    for how in ("0", "1"):
        monkeypatch.setenv("IMGSTORE_NATIVE", how)
        store = Store.open(tmp_path / "store")
        reports: list[tuple[int, int]] = []
        try:
            with store.engine.connect() as conn:
                gen = generations.resolve(conn, res.generation.gen_id)
            done = browse.checkout(store, gen, tmp_path / f"out-{how}", lambda n, b, r=reports: r.append((n, b)))
        finally:
            store.close()
        trees[how] = snap = snapshot(tmp_path / f"out-{how}")
        assert not diff_snapshots(snapshot(tree), snap)
        assert reports == sorted(reports) and reports[-1] == (done.entries, done.bytes)
        assert len(reports) > 2  # runs of about 1 MiB, each followed by a report, in both loops
    assert len(fill_calls) > 2, fill_calls  # runs of about 1 MiB, each followed by a report
    assert trees["0"] == trees["1"]


def test_native_and_python_loops_materialize_the_same_tree(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fill_calls: list[int]) -> None:
    """Both loops lay out the committed tree exactly (owners, modes, xattrs on files and symlinks, times, odd
    names, sparse and loose files, a path past LONG_PATH); the native one makes all but what the system cannot
    take from it (a path past PATH_MAX, made by Python through its parent)."""
    from imgstore import generations
    from imgstore import materialize as mat
    from imgstore.locking import store_lock

    tree = _rich_tree(tmp_path)
    res = _commit(tmp_path / "store", tree)
    trees = {}
    for how in ("0", "1"):
        monkeypatch.setenv("IMGSTORE_NATIVE", how)
        store = Store.open(tmp_path / "store")
        try:
            with store.engine.connect() as conn:
                gen = generations.resolve(conn, res.generation.gen_id)
            with store_lock(store.root, "materialize"):
                trees[how] = snap = snapshot(mat.materialize(store, gen)[0])
                gc_tree = mat.tree_path(store, gen)
                os.rename(gc_tree, tmp_path / f"tree-{how}")  # the next materialize makes it anew
                os.unlink(mat.keys_path(gc_tree))
        finally:
            store.close()
        assert not diff_snapshots(_unlinked(snapshot(tree)), _unlinked(snap))
    assert len(fill_calls) == 1 and fill_calls[0] >= 600, fill_calls  # one call; all but what Python makes
    assert trees["0"] == trees["1"]


def _unlinked(snap: dict[bytes, dict[str, object]]) -> dict[bytes, dict[str, object]]:
    """Without hardlink groups: a materialized tree links files with the same content and metadata."""
    return {p: {k: v for k, v in d.items() if k != "link_group"} for p, d in snap.items()}


def test_make_dirs_contract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes directories (mode 0700) in order and stops at the first it cannot make: the caller makes the rest
    and names the error. (Like os.mkdir it follows a symlink on the way: materialize passes paths whose
    parents are directories it made.)"""
    monkeypatch.delenv("IMGSTORE_NATIVE", raising=False)
    make_dirs = native.dir_maker()
    if make_dirs is None:
        pytest.skip("the native module is not built here")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert make_dirs(fd, [b"a", b"a/b", b"a/b/c\xff", b"d"]) == 4
        assert os.lstat(os.fsencode(tmp_path / "a/b") + b"/c\xff").st_mode & 0o7777 == 0o700 & ~_umask()
        deep = b"/".join([b"x" * 200] * 21)  # past PATH_MAX: the caller goes there a parent at a time
        for bad in (b"a", b"missing/e", b"nul\0", deep):
            assert make_dirs(fd, [b"f", bad, b"g"]) == 1
            os.rmdir(tmp_path / "f")
            assert not (tmp_path / "g").exists()
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_link_loop_shares_what_is_the_same_and_copies_what_is_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second generation's tree hardlinks the first tree's files and symlinks through the Rust link loop,
    except a source changed by hand (it gets a new file) and what changed; the tree is exact either way."""
    from imgstore import materialize as mat
    from imgstore.locking import store_lock

    monkeypatch.delenv("IMGSTORE_NATIVE", raising=False)
    link = native.linker()
    if link is None:
        pytest.skip("the native link loop is not built here")
    given: list[int] = []
    left: list[int] = []

    def counting(root_fd: int, entries: list[Any], sources: list[tuple[int, bytes]], own: bool,
                 threads: int) -> list[int]:
        out = link(root_fd, entries, sources, own, threads)
        given.append(len(entries))
        left.extend(out)
        return out

    monkeypatch.setattr(native, "linker", lambda: counting)
    tree = tmp_path / "tree"
    for i in range(300):
        p = tree / f"d{i % 7}" / f"f{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"%d\n" % i * 50)
        os.utime(p, ns=(i, i))
    os.symlink("d0/f0", tree / "link")
    os.symlink("d0/f0", tree / "link2")  # the same key: linked from "link" within the tree
    first = _commit(tmp_path / "store", tree).generation
    (tree / "d1" / "f1").write_bytes(b"changed")
    os.chmod(tree / "d2" / "f2", 0o600)
    store = Store.open(tmp_path / "store")
    try:
        write_profile(store.root, "t", "[commit]\ndefault_excludes = false\nrequire_kernel = false\n")
        second = commit.commit(store, tree, "t", no_kernel=True).generation
        with store_lock(store.root, "materialize"):
            one = mat.materialize(store, first)[0]
            given.clear()
            os.chmod(one / "d3" / "f3", 0o640)  # changed by hand: its entry says 0o644
            two = mat.materialize(store, second)[0]
    finally:
        store.close()
    assert not diff_snapshots(_unlinked(snapshot(tree)), _unlinked(snapshot(two)))
    assert given == [300 - 2 + 1, 1]  # all but the two files that changed: beside the write loop, then link2
    assert len(left) == 1  # d3/f3: made anew by restore

    def same(rel: str) -> bool:
        return os.lstat(one / rel).st_ino == os.lstat(two / rel).st_ino

    assert same("d0/f0") and same("d4/f4") and same("link") and not same("d3/f3") and not same("d1/f1")
    assert os.lstat(two / "link2").st_ino == os.lstat(two / "link").st_ino


# -- the manifest decoder -----------------------------------------------------------------------------------------


def _decode_both(data: bytes) -> tuple[list[object] | None, list[object] | BaseException]:
    """(what the native decoder gives, what manifest.decode in Python gives or raises)."""
    from imgstore import manifest

    fast = native.decoder()
    if fast is None:
        pytest.skip("the native manifest decoder is not built here")
    got = fast(data[len(manifest.HEADER):], manifest.Entry)
    saved = os.environ.get("IMGSTORE_NATIVE")
    os.environ["IMGSTORE_NATIVE"] = "0"
    try:
        want: list[object] | BaseException = list(manifest.decode(data))
    except Exception as exc:  # noqa: BLE001  # what Python refuses, the native decoder must refuse too
        want = exc
    finally:
        if saved is None:
            del os.environ["IMGSTORE_NATIVE"]
        else:
            os.environ["IMGSTORE_NATIVE"] = saved
    return got, want


def test_decode_manifest_of_a_real_tree_is_pythons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMGSTORE_NATIVE", raising=False)
    tree = tmp_path / "tree"
    make_nasty_tree(tree)
    os.mknod(tree / "fifo", 0o600 | 0o010000)
    res = _commit(tmp_path / "store", tree)
    store = Store.open(tmp_path / "store")
    try:
        data = store.objects.read(res.generation.manifest)
    finally:
        store.close()
    got, want = _decode_both(data)
    assert got is not None and got == want and len(got) > 30


_names = st.binary(min_size=1, max_size=12).filter(lambda n: b"/" not in n and b"\0" not in n
                                                   and n not in (b".", b".."))


@st.composite
def _manifests(draw: st.DrawFn) -> bytes:
    from imgstore import manifest
    from imgstore.manifest import Entry

    es = [Entry(b".", "d", 0o755, 0, 0, 0)]
    dirs = [b"."]
    files: list[bytes] = []
    for name in draw(st.lists(_names, max_size=25, unique=True)):
        parent = draw(st.sampled_from(dirs))
        path = name if parent == b"." else parent + b"/" + name
        kind = draw(st.sampled_from("fdlhcbp" if files else "fdlcbp"))
        mode, uid, gid = draw(st.integers(0, 0o7777)), draw(st.integers(0, 2**32)), draw(st.integers(0, 70000))
        # Past 2262 a time does not fit 64 bits (ext4 keeps them to 2446): the native loops take i128.
        mtime = draw(st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(-2**80, 2**80)))
        xattrs = tuple(draw(st.lists(st.tuples(st.binary(min_size=1, max_size=8), st.binary(max_size=8)), max_size=2)))
        size, digest, target, rdev, sparse = 0, "", b"", (0, 0), False
        if kind == "f":
            size, digest = draw(st.integers(0, 2**40)), draw(st.binary(min_size=32, max_size=32)).hex()
            sparse = draw(st.booleans())
        elif kind == "l":
            target = draw(st.binary(max_size=20))
        elif kind == "h":
            target = draw(st.sampled_from(files))
        elif kind in "cb":
            rdev = (draw(st.integers(0, 4095)), draw(st.integers(0, 2**20)))
        es.append(Entry(path, kind, mode, uid, gid, mtime, size, digest, target, rdev, xattrs, sparse))
        if kind == "d":
            dirs.append(path)
        elif kind == "f":
            files.append(path)
    es.sort(key=lambda e: manifest.sort_key(e.path))
    return b"".join(manifest.encode(es))


@settings(max_examples=300, deadline=None)
@given(_manifests(), st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(
    [b"", b"\t", b"\n", b"-", b"+", b" ", b"_", b"%", b"%4", b"0", b"9", b"f", b"F", b"/", b".", b",", b"=", b"x",
     b"\0", b"0o", b"..", b"sparse"])), max_size=3))
def test_decode_manifest_is_pythons_or_leaves_it_to_python(data: bytes, edits: list[tuple[int, bytes]]) -> None:
    """On any input, canonical or damaged: the same entries as Python's decode, or None (never entries Python
    would refuse, never different ones)."""
    from imgstore import manifest

    for at, text in edits:  # damage it in the header-less part
        i = len(manifest.HEADER) + at % max(1, len(data) - len(manifest.HEADER))
        data = data[:i] + text + data[i + 1:]
    got, want = _decode_both(data)
    if isinstance(want, BaseException):
        assert got is None, want
    else:
        assert got == want or (edits and got is None)  # an undamaged manifest Python takes: decoded natively


@pytest.mark.parametrize("line", [
    b"a\tf\t0o644\t0\t0\t0\t0\t" + b"a" * 64 + b"\t-",  # int(..., 8) takes a prefix
    b"a\tf\t644\t 0\t0\t0\t0\t" + b"a" * 64 + b"\t-",  # and spaces
    b"a\tf\t644\t0\t1_0\t0\t0\t" + b"a" * 64 + b"\t-",  # and underscores
    b"a\tf\t644\t0\t0\t+5\t0\t" + b"a" * 64 + b"\t-",  # and signs
    b"a\td\t755\t0\t0\t0\t0\t-\tuser.x=aa bb",  # fromhex takes spaces
    b"a\td\t755\t0\t0\t0\t0\t-\tuser.x=+f",  # from_str_radix would take a sign: Python refuses it
    b"a\td\t755\t0\t0\t" + b"9" * 40 + b"\t0\t-\t-",  # more digits than 128 bits hold
    b"a\td\t755\t-1\t0\t0\t0\t-\t-",  # a negative owner: refused
])
def test_decode_manifest_leaves_what_is_not_canonical_to_python(line: bytes) -> None:
    from imgstore import manifest

    got, want = _decode_both(manifest.HEADER + b".\td\t755\t0\t0\t0\t0\t-\t-\n" + line + b"\n")
    assert got is None, (got, want)


# -- the pack index reader ----------------------------------------------------------------------------------------


def test_add_index_records_reads_packs_as_python_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same PackIndex (slots and their values) from packs of both formats, one object in two packs (the
    first pack read keeps it); a pack whose records lie adds nothing and is damaged, as in Python."""
    import struct

    from test_packs import _write_format1_pack

    from imgstore.objects import _REC, PackIndex, _read_index

    monkeypatch.delenv("IMGSTORE_NATIVE", raising=False)
    if native.indexer() is None:
        pytest.skip("the native index reader is not built here")
    tree = tmp_path / "tree"
    for i in range(3000):
        (tree / f"d{i % 9}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 9}" / f"f{i}").write_bytes(b"%d" % i * (1 + i % 700))
    _commit(tmp_path / "store", tree)
    packs = tmp_path / "store" / "packs"
    old = _write_format1_pack(packs, [b"old %d" % i for i in range(50)] + [b"1" * 2])  # "1"*2 is f1's content too
    names = sorted(p.stem for p in packs.glob("*.pack"))
    indexes = []
    for how in ("1", "0"):
        monkeypatch.setenv("IMGSTORE_NATIVE", how)
        idx = PackIndex()
        for name in names:
            _read_index(idx, idx.new_pack(name), packs / f"{name}.pack", name)
        indexes.append(idx)
    assert indexes[0].packs == indexes[1].packs and len(indexes[0].slots) >= 3000
    assert indexes[0].slots == indexes[1].slots
    assert any(s is not None and s.pack == old for s in map(indexes[0].get, indexes[0].slots))

    monkeypatch.setenv("IMGSTORE_NATIVE", "1")
    add = native.indexer()
    assert add is not None
    rec = _REC.pack(b"d" * 32, 100, 50, 10, 20)
    slots: dict[bytes, int] = {}
    assert add(rec * 2, True, 1000, 7, slots) and slots == {b"d" * 32: PackIndex.pack_value(7, 100, 50, 10, 20)}
    far = _REC.pack(b"h" * 32, 2**40 - 100, 60, 2**20, 2**20)  # every field at its widest
    assert add(far, True, 2**40, 2**40 - 1, slots)
    assert slots[b"h" * 32] == PackIndex.pack_value(2**40 - 1, 2**40 - 100, 60, 2**20, 2**20)
    for bad in (_REC.pack(b"e" * 32, 990, 20, 0, 1),  # its block runs into the index
                _REC.pack(b"e" * 32, 0, 1, 2**21, 2**20),  # past the end of any block
                _REC.pack(b"e" * 32, 0, 1, 0, 2**60),  # a size out of range
                rec[:-1]):  # not whole records
        slots = {}
        assert not add(_REC.pack(b"f" * 32, 0, 1, 0, 1) + bad, True, 1000, 0, slots) and slots == {}
    assert add(struct.pack("<32sQIQ", b"g" * 32, 5, 6, 7), False, 1000, 2**40, slots)  # format 1, a large pack number
    assert slots == {b"g" * 32: PackIndex.pack_value(2**40, 5, 6, 0, 7)}


@settings(max_examples=100, deadline=None)
@given(_manifests())
def test_mat_keys_are_materializes(data: bytes) -> None:
    from imgstore import manifest
    from imgstore.materialize import _key_or_none

    keyer = native.keyer()
    if keyer is None:
        pytest.skip("the native keys are not built here")
    es = manifest.decode(data) if native.decoder() is None else _decode_both(data)[0]
    if es is None:  # a manifest Python refuses too (a hardlink sorted before its file)
        return
    assert keyer(es) == [_key_or_none(e) for e in es]  # type: ignore[arg-type]
