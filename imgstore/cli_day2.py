"""Day-two commands: diff two generations, export a generation, import an archive as a generation."""

# No `from __future__ import annotations` here: typer would eval every annotation of every command as a string
# on each start (15 ms of every command, docs/benchmarks.md).

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .cli import JsonOpt, NoWait, app
from .cli_common import emit_json, human_bytes, open_store, progress_bar

_MARK = {"added": "A", "removed": "D", "modified": "M", "symlink": "L", "metadata": "m", "mtime": "t"}


def _signed(n: int) -> str:
    return ("+" if n >= 0 else "-") + human_bytes(abs(n))


def _render_diff(d: Any, files: bool) -> None:
    from .diff import ADDED, METADATA, MODIFIED, MTIME, REMOVED, SYMLINK_CHANGED, show_path

    s = d.summary()
    print(f"{d.a} ({d.a_id[:12]}) -> {d.b} ({d.b_id[:12]})")
    if d.identical:
        print("identical: same files, metadata, kernel, initrd and boot parameters")
        return
    print(f"files     {s['added']:,} added ({_signed(s['bytes_added'])}), {s['removed']:,} removed "
          f"({_signed(-s['bytes_removed'])}), {s['modified']:,} modified ({_signed(s['bytes_modified'])}), "
          f"{s['symlinks']:,} symlinks retargeted")
    print(f"metadata  {s['metadata']:,} changed (mode, owner, xattrs, hardlinks), {s['mtime_only']:,} mtime only")
    print(f"size      {human_bytes(s['size_a'])} -> {human_bytes(s['size_b'])} ({_signed(s['delta'])})")
    for c in d.boot:
        if c.what == "append":
            print(f"append    {c.old!r} -> {c.new!r}")
        else:
            same = c.old == c.new
            old = f"{c.old} {c.old_digest[:12]}" if same and c.old_digest else (c.old or "(none)")
            new = f"{c.new} {c.new_digest[:12]}" if same and c.new_digest else (c.new or "(none)")
            print(f"{c.what:<9} {old} -> {new}")
    if d.packages_known:
        print(f"packages  {d.packages_a:,} -> {d.packages_b:,}: {s['packages_installed']} installed, "
              f"{s['packages_removed']} removed, {s['packages_upgraded']} upgraded"
              + (f", {s['packages_downgraded']} downgraded" if s["packages_downgraded"] else ""))
        for p in d.packages:
            if p.change == "installed":
                print(f"  + {p.package} {p.new}")
            elif p.change == "removed":
                print(f"  - {p.package} {p.old}")
            else:
                print(f"  {'^' if p.change == 'upgraded' else 'v'} {p.package} {p.old} -> {p.new}")
    changes = d.files if files else [f for f in d.files if f.change == SYMLINK_CHANGED][:20]
    if changes and not files:
        print("symlinks")
    for f in changes:
        path = show_path(f.path)
        if f.change == ADDED:
            extra = f"  {human_bytes(f.size_b)}" if f.type_b == "f" else f"  ({f.type_b})"
        elif f.change == REMOVED:
            extra = f"  {human_bytes(f.size_a)}" if f.type_a == "f" else f"  ({f.type_a})"
        elif f.change == MODIFIED:
            extra = f"  {_signed(f.size_b - f.size_a)}  ({', '.join(f.fields)})"
        elif f.change == SYMLINK_CHANGED:
            extra = (f"  {f.target_a.decode('utf-8', 'backslashreplace')} -> "
                     f"{f.target_b.decode('utf-8', 'backslashreplace')}")
        elif f.change in (METADATA, MTIME):
            extra = f"  ({', '.join(f.fields)})"
        print(f"{_MARK[f.change]} {path}{extra}")
    if not files and s["added"] + s["removed"] + s["modified"] + s["metadata"] + s["mtime_only"]:
        print(f"(the list of paths: imgstore diff {d.a} {d.b} --files)")


@app.command()
def diff(
    a: Annotated[str, typer.Argument(help="Old generation: web@41, web@-1, 41 (with --profile), an id prefix.")],
    b: Annotated[str, typer.Argument(help="New generation; without a profile it takes A's (diff web@41 42).")],
    files: Annotated[bool, typer.Option("--files", help="List every changed path.")] = False,
    profile: Annotated[Optional[str], typer.Option("--profile", "-p", help="Profile for bare numbers.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """What changed between two generations: files, metadata, symlinks, kernel and boot parameters, packages.

    Reads only the two manifests and each side's var/lib/dpkg/status.

    Examples: imgstore diff web@-1 web@latest ; imgstore diff web@41 42 --files ; imgstore diff web@41 web@42 --json
    """
    from . import diff as diff_mod

    d = diff_mod.diff(open_store(), a, b, profile)
    if json_out:
        emit_json(d)
    else:
        _render_diff(d, files)


@app.command()
def export(
    gen: Annotated[str, typer.Argument(help="Generation: web@42, web@latest, web@-1 or an id prefix.")],
    out: Annotated[Path, typer.Argument(help="Output: FILE.tar.zst (or .tar), FILE.sqfs, or a new directory.")],
    fmt: Annotated[Optional[str], typer.Option(
        "--format", "-f", help="tar, squashfs or dir (default: from OUT: .tar.zst, .tzst or .tar: tar; "
        ".sqfs or .squashfs: squashfs; anything else: dir).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    profile: Annotated[Optional[str], typer.Option("--profile", "-p", help="Profile for a bare number.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Write a generation as a reproducible pax tar (zstd), a squashfs image, or a directory tree.

    The output appears whole or not at all; an existing file is kept unless --force.

    Examples: imgstore export web@42 /srv/web-42.tar.zst ; imgstore export web@latest web.sqfs ;
    imgstore export web@42 /tmp/web-42
    """
    from . import archive

    store = open_store()
    with progress_bar("export") as bar:
        res = archive.export(store, gen, out, fmt, force, bar, profile)
    for w in [] if json_out else res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if json_out:
        emit_json(res)
    else:
        print(f"exported {res.generation} ({res.gen_id[:12]}) as {res.format} to {res.out}: {res.entries:,} entries, "
              f"{human_bytes(res.bytes)} in {res.seconds:.2f} s")


@app.command("import")
def import_cmd(
    file: Annotated[Path, typer.Argument(help="A .tar.zst or .tar (imgstore export, or tar --format=pax).")],
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile of the new generation.")],
    message: Annotated[str, typer.Option("--message", "-m", help="What this is [default: import FILE].")] = "",
    kernel: Annotated[Optional[Path], typer.Option(help="Kernel image to use instead of the tree's.")] = None,
    initrd: Annotated[Optional[Path], typer.Option(help="Initrd to use instead of the tree's.")] = None,
    no_kernel: Annotated[bool, typer.Option("--no-kernel", help="Import without kernel and initrd.")] = False,
    no_wait: NoWait = False,
    json_out: JsonOpt = False,
) -> None:
    """Create a generation from a tar archive, exactly as commit would from the same tree.

    Every member is checked before anything is written: '..', absolute paths and paths through a
    non-directory are refused (exit code 6).

    Example: imgstore import /srv/web-42.tar.zst --profile web -m "restored from the DR site"
    """
    from . import archive

    store = open_store()
    with progress_bar("import") as bar:
        res = archive.import_archive(store, file, profile, message, kernel, initrd, no_kernel, bar, not no_wait)
    if json_out:
        emit_json(res)
        return
    c = res.commit
    g = c.generation
    for s in c.skipped_sockets:
        print(f"warning: skipped socket {s}", file=sys.stderr)
    if not c.created:
        print(f"nothing changed: {file} is identical to {g.ref} ({g.short}); no generation created")
        return
    print(f"imported {g.ref} {g.short} from {file}: {res.members:,} members, {c.files:,} files, "
          f"{human_bytes(c.bytes)}; stored {human_bytes(g.new_bytes)} new, in {res.seconds:.2f} s")
    if g.kernel is None:
        print("note: this generation has no kernel (imported with --no-kernel)")
