"""Packs hold small objects in blocks (docs/format.md, "Objects"); packs of format 1 are still read, and a
format 1 store becomes format 2 when a pack of blocks is first written into it."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import blake3
import pytest
import zstandard
from conftest import Cli, write_profile

from imgstore import browse, commit, gc, verify
from imgstore.errors import IntegrityError
from imgstore.objects import BLOCK, MAX_BLOCK, ObjectStore, pack_records
from imgstore.store import FORMAT, Store

PROFILE = "[commit]\ndefault_excludes = false\nrequire_kernel = false\n"
WORDS = [b"alpha", b"beta", b"gamma", b"delta", b"node", b"kernel", b"initrd", b"root", b"\x00\x01", b"pxelinux"]


def _small_files(tree: Path, n: int, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {}
    for i in range(n):
        data = b" ".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 600)))
        files[f"d{i % 17}/f{i}"] = data
    files["dup-a"] = files["dup-b"] = b"the same content twice"
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    return files


def _records(store: Store) -> list[tuple[str, bytes, int, int, int, int]]:
    return [(name, *r) for name in store.objects.pack_names()
            for r in pack_records(store.objects.pack_path(name), name)]


def test_small_files_share_blocks_and_every_one_reads_back(store: Store, tmp_path: Path) -> None:
    write_profile(store.root, "t", PROFILE)
    tree = tmp_path / "tree"
    files = _small_files(tree, 3000, seed=1)
    gen = commit.commit(store, tree, "t", no_kernel=True).generation
    records = _records(store)
    blocks = {(name, offset): clen for name, _d, offset, clen, _i, _s in records}
    assert len(records) == len(set(files.values())) + 2  # and the manifest and the generation record
    assert len(blocks) * 20 < len(records), (len(blocks), len(records))  # neighbours compressed together
    for name, _d, offset, clen, inner, size in records:
        with open(store.objects.pack_path(name), "rb") as f:
            f.seek(offset)
            frame = f.read(clen)
        assert 0 < zstandard.frame_content_size(frame) <= MAX_BLOCK and inner + size <= MAX_BLOCK
    assert max(zstandard.frame_content_size(b) for b in _frames(store, blocks)) >= BLOCK // 2
    # In any order, from a reader with nothing cached: each object alone, hash checked.
    fresh = ObjectStore(store.root)
    shuffled = [d for _n, d, *_ in records]
    random.Random(2).shuffle(shuffled)
    for digest in shuffled:
        assert blake3.blake3(fresh.read(digest.hex())).digest() == digest
    fresh.close()
    out = tmp_path / "out"
    browse.checkout(store, gen, out)
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data, rel


def _frames(store: Store, blocks: dict[tuple[str, int], int]) -> list[bytes]:
    frames = []
    for (name, offset), clen in blocks.items():
        with open(store.objects.pack_path(name), "rb") as f:
            f.seek(offset)
            frames.append(f.read(clen))
    return frames


def test_gc_rewrites_blocks_with_only_the_live_objects(store: Store, tmp_path: Path) -> None:
    write_profile(store.root, "t", PROFILE)
    tree = tmp_path / "tree"
    first = _small_files(tree, 800, seed=3)
    commit.commit(store, tree, "t", no_kernel=True)
    for i, rel in enumerate(sorted(first)):
        if i % 2:
            (tree / rel).write_bytes(first[rel] + b" changed")
    g2 = commit.commit(store, tree, "t", no_kernel=True).generation
    # An empty object sits where the next one starts: the size orders such a tie as the pack has them.
    before_at = {d: (n, offset, inner, size) for n, d, offset, _clen, inner, size in _records(store)}
    before = set(before_at)
    res = gc.gc(store, keep=1)
    assert res.packs_rewritten >= 1
    after_at = {d: (n, offset, inner, size) for n, d, offset, _clen, inner, size in _records(store)}
    after = set(after_at)
    assert after < before
    # The objects a rewritten pack kept are copied in the order they had (block by block): read back in
    # that order, each block is decompressed once.
    moved = [d for d in after if after_at[d][0] != before_at[d][0]]
    assert len(moved) > 100
    assert sorted(moved, key=before_at.__getitem__) == sorted(moved, key=after_at.__getitem__)
    live = {blake3.blake3((tree / rel).read_bytes()).digest() for rel in first}
    dead = {blake3.blake3(data).digest() for data in first.values()} - live
    assert dead and not dead & after and live <= after
    assert verify.verify(store).ok
    out = tmp_path / "out"
    browse.checkout(store, g2, out)
    for rel in first:
        assert (out / rel).read_bytes() == (tree / rel).read_bytes()


def _write_format1_pack(pack_dir: Path, contents: list[bytes]) -> str:
    """A pack exactly as imgstore wrote them before blocks (format 1): a frame per object."""
    body = bytearray(b"IMGPACK1")
    recs = []
    for data in contents:
        frame = zstandard.ZstdCompressor(level=3).compress(data)
        recs.append((blake3.blake3(data).digest(), len(body), len(frame), len(data)))
        body += frame
    index = zstandard.ZstdCompressor().compress(b"".join(struct.pack("<32sQIQ", *r) for r in sorted(recs)))
    index_offset = len(body)
    body += index + struct.pack("<QI8s", index_offset, len(index), b"IMGPKIDX")
    name = blake3.blake3(bytes(body)).hexdigest()
    (pack_dir / f"{name}.pack").write_bytes(bytes(body))
    return name


def test_a_format_1_store_is_read_and_upgraded_by_its_first_pack(tmp_path: Path, cli: Cli) -> None:
    root = tmp_path / "store"
    Store.init(root).close()
    cfg = root / "imgstore.toml"
    cfg.write_text(cfg.read_text().replace(f"format = {FORMAT}", "format = 1"))
    old = [b"from before blocks %d\n" % i * (i + 1) for i in range(5)]
    _write_format1_pack(root / "packs", old)

    s = Store.open(root)
    assert [s.objects.read(blake3.blake3(d).hexdigest()) for d in old] == old
    s.close()
    assert "format = 1" in cfg.read_text()  # reading writes nothing

    write_profile(root, "t", PROFILE)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "kept").write_bytes(old[2])  # stored already, in the format 1 pack
    (tree / "new").write_bytes(b"written after the upgrade\n")
    r = cli("commit", tree, "-p", "t", "--no-kernel", root=root)
    assert r.returncode == 0, r.stderr
    assert "format = 2" in cfg.read_text()
    s = Store.open(root)
    packs = {name: s.objects.pack_path(name).read_bytes()[:8] for name in s.objects.pack_names()}
    assert sorted(set(packs.values())) == [b"IMGPACK1", b"IMGPACK2"] and list(packs.values()).count(b"IMGPACK1") == 1
    new_digests = {r[0] for n, magic in packs.items() if magic == b"IMGPACK2"
                   for r in pack_records(s.objects.pack_path(n), n)}
    assert blake3.blake3(old[2]).digest() not in new_digests  # not stored twice
    assert blake3.blake3(b"written after the upgrade\n").digest() in new_digests
    s.close()
    assert cli("verify", root=root).returncode == 0
    out = tmp_path / "out"
    assert cli("checkout", "t@1", out, root=root).returncode == 0
    assert (out / "kept").read_bytes() == old[2]


@pytest.mark.parametrize("claim", ["too large", "beyond the block"])
def test_a_hostile_block_is_damage_not_an_allocation(store: Store, tmp_path: Path, claim: str) -> None:
    """A block whose frame claims more than any block holds, or a record that points past its block's end,
    is reported as damage, never decompressed into memory nor sliced short."""
    data = b"x" * (MAX_BLOCK + 1) if claim == "too large" else b"y" * 100
    frame = zstandard.ZstdCompressor().compress(data)
    digest = blake3.blake3(b"whatever").digest()
    inner, size = (0, 8) if claim == "too large" else (96, 8)
    body = bytearray(b"IMGPACK2") + frame
    index = zstandard.ZstdCompressor().compress(struct.pack("<32sQIIQ", digest, 8, len(frame), inner, size))
    index_offset = len(body)
    body += index + struct.pack("<QI8s", index_offset, len(index), b"IMGPKIX2")
    name = blake3.blake3(bytes(body)).hexdigest()
    (store.root / "packs" / f"{name}.pack").write_bytes(bytes(body))
    fresh = ObjectStore(store.root)
    with pytest.raises(IntegrityError) as err:
        fresh.read(digest.hex())
    assert "larger than any block" in err.value.message or "wrong size" in err.value.message
    fresh.close()
    os.unlink(store.root / "packs" / f"{name}.pack")


def test_big_packs_and_loose_objects_start_writeback_as_they_grow(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real sync_file_range(2) is called (spied on, not replaced) over each written range in turn, so that
    the closing fsync waits for the last few MB only; the pack and the loose object read back whole."""
    from imgstore import durable

    calls: dict[int, list[tuple[int, int]]] = {}  # by file descriptor: the pack's and the loose object's
    real = durable.start_writeback

    def spy(fd: int, offset: int, length: int) -> None:
        calls.setdefault(fd, []).append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(durable, "start_writeback", spy)
    write_profile(store.root, "t", PROFILE)
    tree = tmp_path / "tree"
    rng = random.Random(3)
    files = {f"d/f{i}": rng.randbytes(200_000) for i in range(120)}  # 24 MB that does not compress: a pack
    files["big"] = rng.randbytes(20 << 20)  # a loose object
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    gen = commit.commit(store, tree, "t", no_kernel=True).generation
    assert hasattr(durable._libc(), "sync_file_range"), "sync_file_range not found in libc"
    assert len(calls) == 2 and all(len(r) >= 2 for r in calls.values()), calls
    for r in calls.values():
        assert r[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(r, r[1:], strict=False)), r  # in turn
        assert all(n >= durable.WRITEBACK for _, n in r), r
    out = tmp_path / "out"
    browse.checkout(store, gen, out)
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data, rel
