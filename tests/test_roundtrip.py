"""commit -> checkout reproduces a tree exactly, entry by entry."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import write_profile
from treeutil import IS_ROOT, diff_snapshots, make_nasty_tree, snapshot

from imgstore import browse, commit, generations
from imgstore.store import Store


def do_commit(store: Store, tree: Path, profile: str = "t", **kw: object) -> commit.CommitResult:
    if not (store.profiles_dir / f"{profile}.toml").exists():
        write_profile(store.root, profile, "[commit]\ndefault_excludes = false\nrequire_kernel = false\n")
    return commit.commit(store, tree, profile, no_kernel=True, **kw)  # type: ignore[arg-type]


def roundtrip(store: Store, tree: Path, dest: Path) -> commit.CommitResult:
    res = do_commit(store, tree)
    browse.checkout(store, res.generation, dest)
    problems = diff_snapshots(snapshot(tree), snapshot(dest))
    assert not problems, "\n".join(problems[:20])
    return res


@pytest.mark.root
def test_nasty_tree_roundtrip(store: Store, tmp_path: Path) -> None:
    if not IS_ROOT:
        pytest.skip("needs root: owners, devices, security xattrs")
    tree = tmp_path / "tree"
    make_nasty_tree(tree)
    sock = tmp_path / "tree" / "run.sock"
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(os.fspath(sock))
    fixed = 1_700_000_000_987_654_321  # binding and removing the socket change the root's mtime
    os.utime(tree, ns=(fixed, fixed))
    try:
        res = do_commit(store, tree)
    finally:
        s.close()
        sock.unlink()
        os.utime(tree, ns=(fixed, fixed))
    assert res.skipped_sockets == ["/run.sock"]
    dest = tmp_path / "out"
    browse.checkout(store, res.generation, dest)
    problems = diff_snapshots(snapshot(tree), snapshot(dest))
    assert not problems, "\n".join(problems[:20])
    # The checks diff_snapshots makes, spelled out for the cases that matter most.
    assert os.getxattr(dest / "bin/ping", "security.capability") == bytes.fromhex(
        "0000000200200000000000000000000000000000")
    assert os.stat(dest / "usr/bin/perl").st_ino == os.stat(dest / "usr/sbin/perl-again").st_ino
    assert os.stat(dest / "var-sparse.img").st_blocks * 512 < 1 << 20
    assert os.readlink(dest / "escaping") == "../../../../../../etc/passwd"
    assert (dest / os.fsdecode(b"names/\xff\xfe-latin1-\xe9")).read_bytes() == b"bytes"
    acl = subprocess.run(["getfacl", "-c", "-n", dest / "acl-file"], capture_output=True, text=True).stdout
    assert "user:1000:rw-" in acl


def test_roundtrip_unprivileged_parts(store: Store, tmp_path: Path) -> None:
    """What works without root too: contents, modes, names, symlinks, hardlinks, sparse files, user xattrs."""
    tree = tmp_path / "tree"
    make_nasty_tree(tree)
    roundtrip(store, tree, tmp_path / "out")


def test_mounts_inside_chroot_are_skipped_and_reported(store: Store, tmp_path: Path) -> None:
    if not IS_ROOT:
        pytest.skip("needs root to mount")
    tree = tmp_path / "tree"
    (tree / "proc").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "etc/x").write_text("x")
    subprocess.run(["mount", "-t", "tmpfs", "none", tree / "proc"], check=True)
    try:
        (tree / "proc/should-not-be-stored").write_text("mounted")
        res = do_commit(store, tree)
    finally:
        subprocess.run(["umount", tree / "proc"], check=True)
    assert res.skipped_mounts == ["/proc"]
    paths = [e.path for e in browse.entries(store, res.generation)]
    assert b"proc" not in paths and b"etc/x" in paths


def test_unchanged_tree_creates_nothing_and_stat_cache_skips_reads(store: Store, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_nasty_tree(tree)
    first = do_commit(store, tree)
    assert first.created
    # Let the stat cache trust these files: they must be older than the scan that read them.
    old = 1_600_000_000_000_000_000
    for dirpath, _dirs, files in os.walk(tree):
        for f in files:
            os.utime(os.path.join(dirpath, f), ns=(old, old), follow_symlinks=False)
    import time

    time.sleep(1.1)  # ctimes just changed; the cache trusts only files changed before its scan began
    base = do_commit(store, tree)
    again = do_commit(store, tree)
    assert not again.created and again.generation.gen_id == base.generation.gen_id
    assert again.read_files == 0  # nothing read again
    (tree / "etc/hostname").write_text("www4\n")
    changed = do_commit(store, tree)
    assert changed.created and changed.read_files == 1
    assert changed.generation.number == base.generation.number + 1


def test_same_inputs_same_id_across_stores(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/motd").write_text("hi")
    os.utime(tree / "etc/motd", ns=(1, 1))
    os.utime(tree / "etc", ns=(2, 2))
    os.utime(tree, ns=(3, 3))
    ids = []
    for n in range(2):
        s = Store.init(tmp_path / f"s{n}")
        ids.append(do_commit(s, tree).generation.gen_id)
        s.close()
    assert ids[0] == ids[1]


def test_dedup_across_generations_and_profiles(store: Store, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(2 << 20))
    (tree / "small").write_bytes(os.urandom(1000))
    a = do_commit(store, tree, "p1")
    b = do_commit(store, tree, "p2")
    assert a.new_bytes > 2 << 20 and b.new_bytes == 0  # second profile stores no content again


def test_file_changing_while_read_is_detected(store: Store, tmp_path: Path) -> None:
    """A writer that never stops: commit must fail naming the file, not store a torn copy."""
    import subprocess
    import sys

    tree = tmp_path / "tree"
    tree.mkdir()
    victim = tree / "growing.log"
    victim.write_bytes(b"x" * (4 << 20))
    # A separate process, so that it keeps writing whatever the commit's threads do with the GIL.
    # Bounded: a few MB per second, at most 256 MB, however long the commit keeps retrying.
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nf = open(sys.argv[1], 'ab', buffering=0)\n"
        "for _ in range(65536):\n    f.write(b'y' * 4096)\n    time.sleep(0.0005)\n"
    ), str(victim)])
    try:
        import time

        time.sleep(0.3)
        from imgstore.errors import ChangedWhileReading

        with pytest.raises(ChangedWhileReading, match="growing.log"):
            do_commit(store, tree)
    finally:
        writer.kill()
        writer.wait()
    with store.engine.connect() as conn:
        assert generations.list_(conn) == []


def test_kernel_and_initrd_found_in_boot(store: Store, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "boot").mkdir(parents=True)
    for v in ("6.1.0-9-amd64", "6.1.0-10-amd64"):
        (tree / f"boot/vmlinuz-{v}").write_text(f"kernel {v}")
        (tree / f"boot/initrd.img-{v}").write_text(f"initrd {v}")
    write_profile(store.root, "k", "[commit]\ndefault_excludes = false\n")
    g = commit.commit(store, tree, "k").generation
    assert g.kernel_name == "vmlinuz-6.1.0-10-amd64" and g.initrd_name == "initrd.img-6.1.0-10-amd64"
    assert store.objects.read(g.kernel or "") == b"kernel 6.1.0-10-amd64"
    # Debian's /vmlinuz link wins over version order.
    os.symlink("boot/vmlinuz-6.1.0-9-amd64", tree / "vmlinuz")
    os.symlink("/boot/initrd.img-6.1.0-9-amd64", tree / "initrd.img")
    g2 = commit.commit(store, tree, "k").generation
    assert g2.kernel_name == "vmlinuz-6.1.0-9-amd64" and g2.initrd_name == "initrd.img-6.1.0-9-amd64"
    # An escaping link finds nothing and falls back to /boot.
    os.unlink(tree / "vmlinuz")
    os.symlink("../../../../boot/vmlinuz-6.1.0-9-amd64", tree / "vmlinuz")
    g3 = commit.commit(store, tree, "k").generation
    assert g3.kernel_name == "vmlinuz-6.1.0-10-amd64"


def test_excludes(store: Store, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for p in ("var/cache/apt/archives/curl.deb", "var/cache/apt/archives/keep.txt", "var/lib/apt/lists/x_Packages",
              "tmp/junk", "etc/keep", "var/cache/apt/pkgcache.bin"):
        (tree / p).parent.mkdir(parents=True, exist_ok=True)
        (tree / p).write_text("x")
    write_profile(store.root, "ex", '[commit]\nrequire_kernel = false\nexclude = ["/etc/keep"]\n')
    res = commit.commit(store, tree, "ex", no_kernel=True)
    paths = {e.path for e in browse.entries(store, res.generation)}
    assert b"var/cache/apt/archives/keep.txt" in paths and b"tmp" in paths and b"var/lib/apt/lists" in paths
    for gone in (b"var/cache/apt/archives/curl.deb", b"var/lib/apt/lists/x_Packages", b"tmp/junk", b"etc/keep",
                 b"var/cache/apt/pkgcache.bin"):
        assert gone not in paths
    assert res.excluded == 5


def test_large_manifest_streams_into_a_loose_object(store: Store, tmp_path: Path) -> None:
    """A manifest over 1 MiB is written in pieces as a loose object, and reads back exactly."""
    from imgstore import manifest
    from imgstore.objects import LOOSE_MIN

    tree = tmp_path / "tree"
    for d in range(12):
        sub = tree / f"dir{d:02d}"
        sub.mkdir(parents=True)
        for i in range(1000):
            (sub / f"a-rather-long-file-name-{i:05d}.conf").write_bytes(b"%d %d\n" % (d, i))
    (tree / "boot").mkdir()
    (tree / "boot/vmlinuz-6.1.0-9-amd64").write_bytes(b"old kernel")
    (tree / "boot/vmlinuz-6.1.0-28-amd64").write_bytes(b"new kernel")
    (tree / "boot/initrd.img-6.1.0-28-amd64").write_bytes(b"initrd")
    res = roundtrip(store, tree, tmp_path / "out")
    g = res.generation
    assert store.objects.loose_path(g.manifest).exists()  # not in a pack: it is over LOOSE_MIN
    text = store.objects.read(g.manifest)
    assert len(text) >= LOOSE_MIN
    assert [e.path for e in manifest.decode(text)][:2] == [b".", b"boot"]
    # The kernel lookup (a binary search of the walk's output) picked the newest version.
    write_profile(store.root, "k", "[commit]\ndefault_excludes = false\n")
    k = commit.commit(store, tree, "k").generation
    assert (k.kernel_name, k.initrd_name) == ("vmlinuz-6.1.0-28-amd64", "initrd.img-6.1.0-28-amd64")


def test_put_chunks_matches_put_bytes(store: Store) -> None:
    import blake3

    from imgstore.objects import LOOSE_MIN

    for size in (0, 100, LOOSE_MIN - 1, LOOSE_MIN, 3 * LOOSE_MIN + 17):
        data = bytes(i * 7 % 251 for i in range(size))
        pieces = [data[i:i + 1000] for i in range(0, len(data), 1000)]
        digest, _ = store.objects.put_chunks(pieces)
        store.objects.flush()
        assert digest == blake3.blake3(data).hexdigest()
        assert store.objects.read(digest) == data


@pytest.mark.parametrize("native_loops", [True, False], ids=["native", "python"])
def test_times_past_2262_and_before_1970_round_trip(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     native_loops: bool) -> None:
    """ext4 keeps times to 2446, past what nanoseconds in 64 bits hold (2262): such a file is committed (never
    trusted from the stat cache), checked out, materialized and shared between trees like any other."""
    from imgstore import materialize

    if not native_loops:
        monkeypatch.setenv("IMGSTORE_NATIVE", "0")
    tree = tmp_path / "tree"
    tree.mkdir()
    times = {"future": 13_569_465_600_123_456_789, "past": -1_000_000_000_123, "now": None}
    for name, ns in times.items():
        (tree / name).write_text(name)
        if ns is not None:
            os.utime(tree / name, ns=(ns, ns))
    import time

    time.sleep(1.1)  # the cache trusts only files changed before its scan began
    first = do_commit(store, tree)
    again = do_commit(store, tree)
    assert not again.created and again.read_files == 1  # only the file past 2262 is read again
    (tree / "now").write_text("changed")
    second = do_commit(store, tree)
    for res, dest in ((first, tmp_path / "out1"), (second, tmp_path / "out2")):
        browse.checkout(store, res.generation, dest)
    trees = [materialize.materialize(store, res.generation)[0] for res in (first, second)]
    problems = diff_snapshots(snapshot(tree), snapshot(tmp_path / "out2"))
    assert not problems, problems
    for dest in (tmp_path / "out2", trees[1]):  # the trees share their files: hardlinks, which snapshot() notes
        assert (dest / "now").read_text() == "changed"
        assert os.stat(dest / "future").st_mtime_ns == times["future"]
        assert os.stat(dest / "past").st_mtime_ns == times["past"]
    assert os.stat(trees[1] / "future").st_ino == os.stat(trees[0] / "future").st_ino  # shared, not copied
