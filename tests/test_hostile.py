"""Hostile input: symlinks that escape, symlinks planted where imgstore writes, names that try to become paths,
broken profiles, and tree shapes at the limits (100,000 entries, 4,000-byte paths, newlines, invalid UTF-8)."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import blake3
import pytest
from conftest import Cli
from test_deploy import PROFILE, _chroot
from treeutil import diff_snapshots, snapshot

MARKER = "HOSTILE-MARKER-5d41402abc4b2a76"
IS_ROOT = os.geteuid() == 0


def _ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, (r.args, r.returncode, r.stderr)
    return r


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _env(store: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    e = dict(os.environ)
    e["IMGSTORE_ROOT"] = os.fspath(store)
    e.pop("IMGSTORE_FAULT", None)
    e.update(extra or {})
    return e


def _run(store: Path, *args: str | bytes | os.PathLike[str], timeout: float = 120, nofile: int | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """The CLI with bytes arguments (names that are not UTF-8), a short timeout, optionally a lower fd limit."""

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    argv: list[str | bytes] = [sys.executable, "-m", "imgstore"]
    argv += [a if isinstance(a, bytes) else os.fspath(a) for a in args]
    try:
        return subprocess.run(argv, env=_env(store, env), capture_output=True, timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{args} did not finish in {timeout} s (blocked on something it followed?)")


def _okb(r: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
    assert r.returncode == 0, (r.args, r.returncode, r.stderr.decode(errors="replace"))
    return r


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", path]).returncode != 0:
            subprocess.run(["umount", "-l", path], check=True)


def _paths_below(root: Path) -> list[str]:
    """Every path under root; listed once, before the test, since listing a directory changes its atime."""
    out = ["."]
    for dirpath, dirnames, filenames in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, n), root) for n in dirnames + filenames]
    return out


def _meta(root: Path, paths: list[str]) -> dict[str, tuple[int, ...]]:
    """lstat of each path, reading and listing nothing: access and change times show who touched what."""
    out: dict[str, tuple[int, ...]] = {}
    for rel in paths:
        st = os.lstat(root / rel)
        out[rel] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_atime_ns, st.st_ctime_ns, st.st_ino)
    return out


def _store(tmp_path: Path, cli: Cli, profile: str = PROFILE) -> Path:
    _ok(cli("init"))
    store = tmp_path / "store"
    (store / "profiles/web.toml").write_text(profile)
    return store


def _gen(cli: Cli, ref: str) -> dict[str, Any]:
    return json.loads(_ok(cli("show", ref, "--json")).stdout)  # type: ignore[no-any-return]


def _snap(root: Path) -> dict[bytes, dict[str, Any]]:
    """treeutil.snapshot through directory file descriptors, so paths longer than PATH_MAX are reached too."""
    out: dict[bytes, dict[str, Any]] = {}
    inodes: dict[int, bytes] = {}

    def record(dirfd: int, name: bytes, rel: bytes) -> os.stat_result:
        st = os.lstat(name, dir_fd=dirfd)
        proc = b"/proc/self/fd/%d/%s" % (dirfd, name)
        d: dict[str, Any] = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "mtime_ns": st.st_mtime_ns}
        try:
            d["xattrs"] = sorted((n, os.getxattr(proc, n, follow_symlinks=False))
                                 for n in os.listxattr(proc, follow_symlinks=False))
        except OSError:
            d["xattrs"] = []
        if stat.S_ISREG(st.st_mode):
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dirfd)
            h = blake3.blake3()
            with os.fdopen(fd, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            d.update(size=st.st_size, hash=h.hexdigest(), sparse=st.st_size > 0 and st.st_blocks * 512 < st.st_size)
            if st.st_nlink > 1:
                d["link_group"] = inodes.setdefault(st.st_ino, rel)
        elif stat.S_ISLNK(st.st_mode):
            d["target"] = os.readlink(name, dir_fd=dirfd)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            d["rdev"] = st.st_rdev
        out[rel] = d
        return st

    def walk(dirfd: int, rel: bytes) -> None:
        names = sorted(os.listdir(dirfd))
        subdirs = []
        for n in (os.fsencode(x) for x in names):
            child = n if rel == b"." else rel + b"/" + n
            if stat.S_ISDIR(record(dirfd, n, child).st_mode):
                subdirs.append((n, child))
        for n, child in subdirs:
            fd = os.open(n, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dirfd)
            try:
                walk(fd, child)
            finally:
                os.close(fd)

    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        record(top, b".", b".")
        walk(top, b".")
    finally:
        os.close(top)
    return out


def _no_links(snap: dict[bytes, dict[str, Any]]) -> dict[bytes, dict[str, Any]]:
    """A materialized tree hardlinks files of the same content and metadata: compare it without hardlink groups."""
    return {p: {k: v for k, v in d.items() if k != "link_group"} for p, d in snap.items()}


# -- symlinks that leave the chroot ------------------------------------------------------------------
@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="mounts a tmpfs with strictatime")
def test_symlinks_escaping_the_chroot_are_stored_never_followed(tmp_path: Path, cli: Cli) -> None:
    # strictatime: any read of a file, or listing of a directory, outside shows in its atime.
    with tmpfs(tmp_path / "outside", "size=16m,strictatime") as out:
        os.mkfifo(out / "fifo")  # whoever opens it to read blocks forever
        (out / "secret").write_text(MARKER)
        (out / "dir/sub").mkdir(parents=True)
        (out / "dir/file").write_text(MARKER)
        (out / "kernel").write_bytes(b"OUTSIDE KERNEL " + MARKER.encode())
        tree = _chroot(tmp_path / "chroot", "one\n")
        (tree / "var/lib/dpkg").mkdir(parents=True)
        (tree / "usr/lib").mkdir(parents=True)
        links = {
            "etc/abs-fifo": f"{out}/fifo",
            "etc/rel-fifo": "../../outside/fifo",
            "etc/abs-dir": f"{out}/dir",
            "etc/rel-dir": "../../outside/dir",
            "etc/abs-secret": f"{out}/secret",
            "etc/dotdot-past-root": "../" * 20 + f"{out}/secret".lstrip("/"),
            "vmlinuz": f"{out}/kernel",
            "initrd.img": "../outside/fifo",
            "etc/os-release": f"{out}/fifo",
            "etc/debian_version": "../../outside/fifo",
            "usr/lib/os-release": f"{out}/secret",
            "var/lib/dpkg/status": f"{out}/fifo",
        }
        for name, target in links.items():
            os.symlink(target, tree / name)
        watched = _paths_below(out)
        before = _meta(out, watched)
        store = _store(tmp_path, cli)
        _okb(_run(store, "commit", tree, "-p", "web", timeout=60))
        listed = {e["path"]: e for d in ("/", "/etc", "/usr/lib", "/var/lib/dpkg")
                  for e in json.loads(_okb(_run(store, "ls", "web@1", d, "--json")).stdout)}
        for name, target in links.items():
            assert listed[name]["type"] == "l" and listed[name]["target"] == target, listed[name]
        _okb(_run(store, "checkout", "web@1", tmp_path / "co", timeout=60))
        _okb(_run(store, "rollout", "web@1", timeout=60))
        gen = _gen(cli, "web@1")
        mat = store / f"{gen['gen_id']}-web-rootfs"
        for root in (tmp_path / "co", mat):
            for name, target in links.items():
                assert os.readlink(root / name) == target, (root, name)
        assert diff_snapshots(snapshot(tree), snapshot(tmp_path / "co")) == []
        r = _run(store, "cat", "web@1", "/etc/abs-secret")
        assert r.returncode == 2 and MARKER.encode() not in r.stdout
        # The kernel came from /boot, not from the link that leaves the chroot.
        vmlinuz = store / "tftpboot/imgstore/web" / gen["gen_id"] / "vmlinuz"
        assert vmlinuz.read_bytes() == (tree / "boot/vmlinuz-6.1.0-28-amd64").read_bytes()
        assert "packages" not in gen["meta"] and "os" not in gen["meta"]
        assert _meta(out, watched) == before, "something outside the chroot was read or changed"


def test_checkout_refuses_destinations_with_planted_symlinks(tmp_path: Path, cli: Cli) -> None:
    store = _store(tmp_path, cli)
    tree = _chroot(tmp_path / "chroot", "one\n")
    _ok(cli("commit", tree, "-p", "web"))
    outside = tmp_path / "outside"
    (outside / "empty").mkdir(parents=True)
    (outside / "etc").mkdir()
    (outside / "etc/motd").write_text("outside\n")
    watched = _paths_below(outside)
    before = _meta(outside, watched)
    os.symlink(outside / "empty", tmp_path / "dest-link")
    r = _run(store, "checkout", "web@1", tmp_path / "dest-link")
    assert r.returncode == 8, r.stderr
    planted = tmp_path / "planted"
    planted.mkdir()
    os.symlink(outside / "etc", planted / "etc")
    r = _run(store, "checkout", "web@1", planted)
    assert r.returncode == 8, r.stderr
    assert _meta(outside, watched) == before


def test_materialize_never_takes_a_planted_symlink_for_a_tree(tmp_path: Path, cli: Cli) -> None:
    store = _store(tmp_path, cli)
    tree = _chroot(tmp_path / "chroot", "one\n")
    _ok(cli("commit", tree, "-p", "web"))
    gen = _gen(cli, "web@1")
    fake = tmp_path / "outside/fake-root"
    (fake / "etc").mkdir(parents=True)
    (fake / "etc/motd").write_text("not from imgstore\n")
    watched = _paths_below(tmp_path / "outside")
    before = _meta(tmp_path / "outside", watched)
    final = store / f"{gen['gen_id']}-web-rootfs"
    os.symlink(fake, final)
    r = _run(store, "rollout", "web@1")
    assert _meta(tmp_path / "outside", watched) == before
    if r.returncode == 0:
        assert not final.is_symlink() and final.is_dir(), "the planted symlink is being served as the tree"
        assert (store / "netboot/root/etc/motd").read_text() == "one\n"
    else:
        err = _one_line(subprocess.CompletedProcess(r.args, r.returncode, "", r.stderr.decode()))
        assert os.fspath(final) in err


def test_materialize_never_follows_a_symlink_planted_at_its_staging_path(tmp_path: Path, cli: Cli) -> None:
    store = _store(tmp_path, cli)
    tree = _chroot(tmp_path / "chroot", "one\n")
    _ok(cli("commit", tree, "-p", "web"))
    gen = _gen(cli, "web@1")
    victim = tmp_path / "outside/victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub/file").write_text("keep me\n")
    os.chmod(victim, 0o755)
    os.chmod(victim / "sub", 0o755)
    watched = _paths_below(tmp_path / "outside")
    before = _meta(tmp_path / "outside", watched)
    os.symlink(victim, store / f".imgstore-tmp-{gen['gen_id'][:16]}-web-rootfs")
    r = _run(store, "rollout", "web@1")
    assert _meta(tmp_path / "outside", watched) == before, "materialize changed a directory outside the store"
    assert r.returncode == 0, r.stderr
    assert (store / "netboot/root/etc/motd").read_text() == "one\n"


def test_materialize_never_links_a_symlink_planted_in_mat(tmp_path: Path, cli: Cli) -> None:
    """mat/ holds the boot files' copies (trees no longer link from it): symlinks planted there at a tree file's
    key and at the kernel's key reach neither the tree nor the TFTP root, and what they point to is untouched."""
    from imgstore import browse, generations
    from imgstore.deploy import boot_entries
    from imgstore.materialize import mat_key, mat_path
    from imgstore.store import Store

    store = _store(tmp_path, cli)
    tree = _chroot(tmp_path / "chroot", "one\n")
    _ok(cli("commit", tree, "-p", "web"))
    secret = tmp_path / "outside/secret"
    secret.parent.mkdir()
    secret.write_text(MARKER)
    s = Store.open(store)
    try:
        with s.engine.connect() as conn:
            g = generations.resolve(conn, "web@1")
        motd = next(e for e in browse.entries(s, g) if e.path == b"etc/motd")
        kernel = dict(boot_entries(g))["vmlinuz"]
        planted = [mat_path(s, mat_key(motd)), mat_path(s, mat_key(kernel))]
    finally:
        s.close()
    for p in planted:
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(secret, p)
    _okb(_run(store, "rollout", "web@1"))  # a planted copy is replaced, never followed
    served = store / "netboot/root/etc/motd"
    assert not served.is_symlink() and stat.S_ISREG(served.lstat().st_mode), "the tree holds the planted link"
    assert served.read_text() == "one\n"
    vmlinuz = store / "tftpboot/imgstore/web" / g.gen_id / "vmlinuz"
    assert stat.S_ISREG(vmlinuz.lstat().st_mode), "the TFTP root holds the planted link"
    assert vmlinuz.read_bytes() == (tree / "boot/vmlinuz-6.1.0-28-amd64").read_bytes()
    assert secret.read_text() == MARKER


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="mounts a tmpfs with strictatime")
def test_verify_and_repair_never_follow_a_symlink_planted_in_a_materialized_tree(tmp_path: Path, cli: Cli) -> None:
    store = _store(tmp_path, cli)
    tree = _chroot(tmp_path / "chroot", "one\n")
    (tree / "etc/issue").write_text("Debian\n")
    _ok(cli("commit", tree, "-p", "web"))
    _ok(cli("rollout", "web@1"))
    mat = store / f"{_gen(cli, 'web@1')['gen_id']}-web-rootfs"
    with tmpfs(tmp_path / "outside", "size=4m,strictatime") as out:
        (out / "etc").mkdir()
        (out / "etc/motd").write_text("one\n")  # looks right: only reading it could tell
        shutil.copystat(tree / "etc/motd", out / "etc/motd")
        os.mkfifo(out / "etc/issue")
        watched = _paths_below(out)
        before = _meta(out, watched)
        shutil.rmtree(mat / "etc")
        os.symlink(out / "etc", mat / "etc")
        r = _run(store, "verify", timeout=60)
        assert r.returncode == 6, r.stderr
        assert _meta(out, watched) == before, "verify read or changed files outside the store"
        r = _run(store, "verify", "--repair", timeout=60)
        assert _meta(out, watched) == before, "verify --repair read or changed files outside the store"
        _okb(_run(store, "verify", timeout=60))
        assert not (mat / "etc").is_symlink()
        assert (mat / "etc/motd").read_text() == "one\n" and (mat / "etc/issue").read_text() == "Debian\n"


# -- names that would become paths -------------------------------------------------------------------
HOSTILE_MACS = [
    "../../../etc/passwd", "52:54:00:00:00:01/../../x", "52:54:00:00:00:01\x7f",
    "52-54-00-00-00-01/..", "52:54:00:00:00:0\uff11", "52:54:00:00:00:01;touch /tmp/x", "01-52-54-00-00-00-01",
    "..", "/", "52:54:00:00:00:01 ../x", "52:54:00:00:00:01\r\n../x",
]
HOSTILE_NAMES = [
    "../evil", "a/b", ".hidden", "..", ".", "x\ny", "x y", "-rf", "a" * 64, "www1/../../etc", "\uff57ww", "x\x7f",
    "", "/etc", "x\t", "www\u2028",
]


def _paths(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs
            if not n.startswith("imgstore.db")}


@pytest.mark.slow
def test_macs_and_node_names_that_would_inject_path_components_are_refused(tmp_path: Path, cli: Cli) -> None:
    store = _store(tmp_path, cli)
    tree = _chroot(tmp_path / "chroot", "one\n")
    _ok(cli("commit", tree, "-p", "web"))
    _ok(cli("node", "add", "www1", "--mac", "52:54:00:00:00:01", "-p", "web"))
    _ok(cli("rollout"))
    before = _paths(tmp_path)
    failures = []
    attempts: list[tuple[str, ...]] = []
    attempts += [("node", "add", "www9", "--mac", m, "-p", "web") for m in HOSTILE_MACS]
    # "--" first: a name like "-rf" must reach imgstore's own validation, not the option parser.
    attempts += [("node", "add", "--mac", "52:54:00:00:00:09", "-p", "web", "--", n) for n in HOSTILE_NAMES]
    attempts += [("node", "edit", "www1", "--mac", m) for m in HOSTILE_MACS]
    attempts += [("pin", "--", n, "web@1") for n in HOSTILE_NAMES + HOSTILE_MACS]
    attempts += [("rollout", "--canary", n) for n in HOSTILE_NAMES[:4] + HOSTILE_MACS[:4]]
    conf = tmp_path / "dhcpd.conf"
    before.add(os.path.relpath(conf, tmp_path))
    confs = [("evil", "../../x"), ('"../evil"', "52:54:00:00:00:0a"),
             ("ok", "52:54:00:00:00:0b; } host x { hardware ethernet ../..")]
    for name, mac in confs:
        conf.write_text(f"host {name} {{ hardware ethernet {mac}; }}\n")
        r = _run(store, "node", "import-dhcpd", conf, "-p", "web", timeout=60)
        err = r.stderr.decode(errors="replace").strip()
        skipped = r.returncode == 0 and "skipped" in err and b"imported 0 node(s)" in r.stdout
        if not skipped and (r.returncode not in (2, 3) or len(err.splitlines()) != 1 or "Traceback" in err):
            failures.append(f"import-dhcpd of host {name} / {mac}: exit {r.returncode}: {err}")
    for args in attempts:
        r = _run(store, *args, timeout=60)
        err = r.stderr.decode(errors="replace").strip()
        if r.returncode not in (2, 3) or len(err.splitlines()) != 1 or "Traceback" in err:
            failures.append(f"{args!r}: exit {r.returncode}: {err}")
    assert not failures, "\n".join(failures)
    assert _paths(tmp_path) == before
    cfg = sorted(p.name for p in (store / "tftpboot/pxelinux.cfg").iterdir() if not p.is_dir())
    assert cfg == ["01-52-54-00-00-00-01", "default"]


# -- profiles ------------------------------------------------------------------------------------------
PROFILE_ERRORS = [
    # (case, profile text, lines the error may name, key it must name or None)
    ("syntax", '[commit]\nrequire_kernel = false\n[deploy]\ntftp_root = "tftp\n', [4], None),
    ("duplicate", '[deploy]\ntftp_root = "a"\nserve_default = true\ntftp_root = "b"\n', [4], None),
    ("type", '[commit]\nrequire_kernel = false\n\n[deploy]\ntftp_root = "tftp"\nserve_default = "yes"\n', [6],
     "serve_default"),
    ("list-entry", '[commit]\nrequire_kernel = false\nexclude = [\n  "/var/log/*",\n  3,\n]\n', [3, 5], "exclude"),
    ("unknown", '[commit]\nrequire_kernel = false\n[deploy]\ntftp-root = "tftp"\n', [4], "tftp-root"),
    ("value", '[boot]\nappend = "root=/dev/nfs"\nroot_mode = "disk"\n', [3], "root_mode"),
    ("placeholder", '[commit]\nrequire_kernel = false\n[boot]\nappend = "nfsroot={nfs_srv}:{root}"\n', [4], "append"),
    ("not-a-table", 'description = "web"\nboot = "fast"\n', [2], "boot"),
    ("dotted", '# web nodes\ndescription = "web"\ndeploy.tftp_root = "tftp"\ndeploy.serve_default = 1\n', [4],
     "serve_default"),
    ("quoted", '[commit]\nrequire_kernel = false\n[deploy]\n"serve_default" = "no"\n', [4], "serve_default"),
    ("inline", 'description = "web"\ncommit = { require_kernel = false }\n'
               'deploy = { tftp_root = "tftp", serve_default = 1 }\n', [3], "serve_default"),
    ("sub-table", '[commit]\nrequire_kernel = false\n[deploy]\ntftp_root = "tftp"\n[deploy.extra]\nx = 1\n', [5],
     "extra"),
    ("array-of-tables", '[commit]\nrequire_kernel = false\n[[deploy]]\ntftp_root = "tftp"\n', [3], "deploy"),
]


@pytest.mark.parametrize("case,text,lines,key", PROFILE_ERRORS, ids=[c[0] for c in PROFILE_ERRORS])
def test_profile_errors_name_file_line_and_key(tmp_path: Path, cli: Cli, case: str, text: str, lines: list[int],
                                               key: str | None) -> None:
    store = _store(tmp_path, cli, text)
    path = store / "profiles/web.toml"
    (tmp_path / "empty").mkdir()
    for args in (("profile", "show", "web"), ("commit", tmp_path / "empty", "-p", "web"), ("status",)):
        r = cli(*args)
        assert r.returncode == 4, (case, args, r.returncode, r.stderr)
        err = _one_line(r)
        assert os.fspath(path) in err, (case, err)
        named = [int(a or b) for a, b in re.findall(rf"{re.escape(os.fspath(path))}:(\d+)|line (\d+)", err)]
        assert named and named[0] in lines, f"{case}: names line {named}, want {lines}: {err}"
        if key:
            assert key in err, (case, err)


# -- tree shapes at the limits ---------------------------------------------------------------------------
ODD_NAMES = [
    b"new\nline", b"tab\there", b"\xff\xfe-latin1-\xe9", b"%41%zz,=", b" leading space", b"trailing space ",
    b"-rf", b".imgstore-tmp-looks-like-a-temp", b"back\\slash", "\u00fcn\u00efc\u00f8d\u00e9-\u65e5\u672c".encode(),
    b"L" * 255, b"\x01\x1b[31mred", b"imgstore-manifest 1", b"a\tf\t644\t0\t0\t0\t0\t-\t-",
]


def _odd_tree(root: Path) -> Path:
    tree = _chroot(root, "odd\n")
    names = os.fsencode(tree / "names")
    os.mkdir(names)
    for i, n in enumerate(ODD_NAMES):
        with open(os.path.join(names, n), "wb") as f:
            f.write(b"content %d of %s\n" % (i, n))
        os.mkdir(os.path.join(names, n[:250] + b".d"))
    os.symlink(b"\xff\n odd target", os.path.join(names, b"odd-link"))
    # A 4,000-byte path below the chroot.
    deep = os.path.join(os.fsencode(tree), *([b"d" * 62] * 63))
    os.makedirs(deep)
    with open(os.path.join(deep, b"leaf-" + b"x" * 40), "wb") as f:
        f.write(b"deep\n")
    assert len(os.path.relpath(deep, os.fsencode(tree))) + 46 >= 4000
    return tree


def test_odd_names_and_4000_byte_paths_through_commit_checkout_materialize_rollout(tmp_path: Path,
                                                                                  cli: Cli) -> None:
    store = _store(tmp_path, cli)
    tree = _odd_tree(tmp_path / "chroot")
    _okb(_run(store, "commit", tree, "-p", "web"))
    _okb(_run(store, "checkout", "web@1", tmp_path / "co"))
    want = _snap(tree)
    assert want == snapshot(tree)  # the fd-based walker sees what the shared one sees
    assert diff_snapshots(want, _snap(tmp_path / "co")) == []
    _okb(_run(store, "rollout", "web@1"))
    gen = _gen(cli, "web@1")
    mat = store / f"{gen['gen_id']}-web-rootfs"
    assert diff_snapshots(_no_links(want), _no_links(_snap(mat))) == []
    for i, n in enumerate(ODD_NAMES):
        r = _okb(_run(store, "cat", "web@1", b"/names/" + n))
        assert r.stdout == b"content %d of %s\n" % (i, n)
    _ok(cli("verify"))
    _ok(cli("status"))


def test_listing_odd_names_is_one_line_per_entry_and_valid_json(tmp_path: Path, cli: Cli) -> None:
    """An operator's UTF-8 terminal (strict stdout) and scripts reading --json must both survive the names."""
    store = _store(tmp_path, cli)
    tree = _odd_tree(tmp_path / "chroot")
    _okb(_run(store, "commit", tree, "-p", "web"))
    count = len(ODD_NAMES) * 2 + 1
    r = _okb(_run(store, "ls", "web@1", "/names", env={"PYTHONIOENCODING": "utf-8"}))
    assert len(r.stdout.decode("utf-8").splitlines()) == count, r.stdout
    r = _okb(_run(store, "ls", "web@1", "/names", "--json"))
    listed = json.loads(r.stdout.decode("utf-8"))
    assert len(listed) == count and len({e["path"] for e in listed}) == count


def _deep_tree_via_fds(root: Path, levels: int, name: bytes) -> None:
    """Build a path longer than PATH_MAX below root (only *at() calls can reach its bottom)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        leaf = os.open(b"leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"at the bottom\n")
        os.close(leaf)
    finally:
        os.close(fd)


def _read_deep(root: Path, levels: int, name: bytes) -> bytes:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        leaf = os.open(b"leaf", os.O_RDONLY, dir_fd=fd)
        try:
            return os.read(leaf, 100)
        finally:
            os.close(leaf)
    finally:
        os.close(fd)


def test_4000_byte_path_in_a_chroot_whose_own_path_is_long(tmp_path: Path, cli: Cli) -> None:
    """4,000 bytes below a chroot that itself sits 200 bytes deep: absolute paths exceed PATH_MAX (4096)."""
    store = _store(tmp_path, cli)
    parent = tmp_path / ("c" * 100) / ("h" * 60)
    tree = _chroot(parent / "chroot", "one\n")
    levels, name = 63, b"d" * 62
    _deep_tree_via_fds(tree, levels, name)
    assert len(os.fsencode(tree)) + levels * 63 + 5 > 4096
    r = _run(store, "commit", tree, "-p", "web")
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    _okb(_run(store, "checkout", "web@1", tmp_path / "co"))
    want = _snap(tree)
    assert diff_snapshots(want, _snap(tmp_path / "co")) == []
    _okb(_run(store, "rollout", "web@1"))
    assert _read_deep(store / "netboot/root", levels, name) == b"at the bottom\n"
    assert diff_snapshots(_no_links(want), _no_links(_snap(store / "netboot/root"))) == []


def test_many_directories_with_the_default_open_file_limit(tmp_path: Path, cli: Cli) -> None:
    """A Debian rootfs has thousands of directories; operators' shells have `ulimit -n` 1024."""
    store = _store(tmp_path, cli)
    tree = _chroot(tmp_path / "chroot", "one\n")
    for i in range(3000):
        d = tree / f"usr/share/d{i // 100}/d{i}"
        d.mkdir(parents=True)
        (d / "f").write_text(f"{i}\n")
    _okb(_run(store, "commit", tree, "-p", "web", nofile=1024))
    _okb(_run(store, "checkout", "web@1", tmp_path / "co", nofile=1024))
    assert diff_snapshots(snapshot(tree), snapshot(tmp_path / "co")) == []
    _okb(_run(store, "rollout", "web@1", nofile=1024))
    assert (store / "netboot/root/usr/share/d29/d2999/f").read_text() == "2999\n"


@pytest.mark.slow
def test_directory_with_100000_entries(tmp_path: Path, cli: Cli) -> None:
    store = _store(tmp_path, cli)
    tree = _chroot(tmp_path / "chroot", "one\n")
    big = os.fsencode(tree / "var/spool/big")
    os.makedirs(big)
    for i in range(100_000):
        fd = os.open(os.path.join(big, b"entry-%06d" % i), os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"%d\n" % i)
        os.close(fd)
    times = {}
    t0 = time.monotonic()
    _okb(_run(store, "commit", tree, "-p", "web", timeout=900))
    times["commit"] = time.monotonic() - t0
    t0 = time.monotonic()
    _okb(_run(store, "checkout", "web@1", tmp_path / "co", timeout=900))
    times["checkout"] = time.monotonic() - t0
    t0 = time.monotonic()
    _okb(_run(store, "rollout", "web@1", timeout=900))
    times["rollout"] = time.monotonic() - t0
    print("100,000 entries: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    want = snapshot(tree)
    assert diff_snapshots(want, snapshot(tmp_path / "co")) == []
    gen = _gen(cli, "web@1")
    assert diff_snapshots(_no_links(want), _no_links(snapshot(store / f"{gen['gen_id']}-web-rootfs"))) == []
    listed = json.loads(_okb(_run(store, "ls", "web@1", "/var/spool/big", "--json")).stdout)
    assert len(listed) == 100_000
    h = blake3.blake3(_okb(_run(store, "cat", "web@1", "/var/spool/big/entry-099999")).stdout).hexdigest()
    assert h == blake3.blake3(b"99999\n").hexdigest()
