"""The command line: each command parses its arguments, calls one library function and renders the result.

No SQL and no file-system work here. Errors from the library (ImgstoreError) become one line on stderr
and the error's exit code; docs/exit-codes.md lists them.
"""

# No `from __future__ import annotations` here: typer would eval every annotation of every command as a string
# on each start (15 ms of every command, docs/benchmarks.md).

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__, cli_fast
from .cli_common import console, emit_json, human_bytes, open_store, progress_bar, shown, state, when
from .errors import UsageError
from .scan import DEFAULT_EXCLUDES

app = typer.Typer(
    name="imgstore",
    help="Immutable, content-addressed generations of network-booted root filesystems, "
    "with atomic PXE rollout and rollback.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[commit] exclude" and "[default: ...]" must show as written
)
profile_app = typer.Typer(help="List and show profiles (profiles/*.toml in the store).", no_args_is_help=True)
app.add_typer(profile_app, name="profile")


JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
NoWait = Annotated[bool, typer.Option("--no-wait", help="Exit with code 7 instead of waiting for the store lock.")]


def _version(value: bool) -> None:
    if value:
        print(f"imgstore {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    root: Annotated[
        Path | None,
        typer.Option("--root", "-R", envvar="IMGSTORE_ROOT", help="The store folder [default: /var/lib/imgstore]."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    state.root = root


# ---------------------------------------------------------------------------------------------------
@app.command()
def init(
    database: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL of the database, e.g. postgresql+psycopg://imgstore@db/imgstore "
                     "[default: SQLite in the store]"),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a store (with the example profiles web and hadoop).

    Example: imgstore --root /var/lib/imgstore init
    """
    from .store import Store, default_root

    store = state.store = Store.init(state.root or default_root(), database)
    if json_out:
        emit_json({"root": store.root, "database": store.database_url})
    else:
        print(f"initialised store {store.root} (database {store.database_url.split('://')[0]}, "
              f"profiles in {store.profiles_dir})")


_EXCLUDES_HELP = "Default excludes (per profile: [commit] exclude, default_excludes): " + ", ".join(DEFAULT_EXCLUDES)


@app.command(help=f"""Snapshot a chroot as the profile's next generation.

Walks the tree without following symlinks or crossing mounts (skipped mounts are reported), stores new
content once, and records kernel and initrd from the chroot's /boot. An unchanged tree creates nothing.

{_EXCLUDES_HELP}

Example: imgstore commit /srv/chroots/web --profile web -m "php security update"
""")
def commit(
    chroot: Annotated[Path | None, typer.Argument(help="The chroot [default: the profile's commit.chroot].")] = None,
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile name (profiles/NAME.toml).")] = "web",
    message: Annotated[str, typer.Option("--message", "-m", help="What changed.")] = "",
    kernel: Annotated[Path | None, typer.Option(help="Kernel image to use instead of the chroot's.")] = None,
    initrd: Annotated[Path | None, typer.Option(help="Initrd to use instead of the chroot's.")] = None,
    no_kernel: Annotated[bool, typer.Option("--no-kernel", help="Commit without kernel and initrd.")] = False,
    no_wait: NoWait = False,
    json_out: JsonOpt = False,
) -> None:
    cli_fast.commit(chroot, profile, message, kernel, initrd, no_kernel, no_wait, json_out)


@app.command("generations")
def generations_cmd(
    profile: Annotated[str | None, typer.Option("--profile", "-p", help="Only this profile.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """List generations: number, id, date, message, files, size, bytes newly stored.

    Example: imgstore generations --profile web
    """
    from . import generations as gens

    store = open_store()
    if profile:
        store.profile(profile)
    with store.engine.connect() as conn:
        rows = gens.list_(conn, profile)
    if json_out:
        emit_json([g.as_dict() for g in rows])
        return
    from rich.table import Table

    t = Table(title=None, box=None, header_style="bold")
    for col in ("generation", "id", "date", "by", "files", "size", "new", "debian", "pkgs", "kernel", "message"):
        t.add_column(col, justify="right" if col in ("files", "size", "new", "pkgs") else "left")
    for g in rows:
        t.add_row(g.ref, g.short, when(g.created), f"{g.user}@{g.host}", f"{g.files:,}", human_bytes(g.size),
                  human_bytes(g.new_bytes), g.meta.get("debian_version", "-"), str(g.meta.get("packages", "-")),
                  g.meta.get("kernel_version") or (g.kernel_name or "-"), g.message)
    if not rows:
        print("no generations yet; create one with: imgstore commit CHROOT --profile NAME")
        return
    console().print(t)


def resolve(ref: str, profile: str | None = None) -> tuple[Any, Any]:
    from . import generations as gens

    store = open_store()
    with store.engine.connect() as conn:
        return store, gens.resolve(conn, ref, profile)


@app.command()
def show(
    ref: Annotated[str, typer.Argument(help="Generation: 42, web@42, web@latest, web@-1 or an id prefix.")],
    profile: Annotated[str | None, typer.Option("--profile", "-p")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Everything known about one generation.

    Example: imgstore show web@latest
    """
    _store, g = resolve(ref, profile)
    if json_out:
        emit_json(g.as_dict())
        return
    rows = [
        ("generation", g.ref), ("id", g.gen_id), ("created", f"{when(g.created)} by {g.user}@{g.host}"),
        ("message", g.message), ("source", g.source), ("files", f"{g.files:,}"), ("size", human_bytes(g.size)),
        ("newly stored", human_bytes(g.new_bytes)), ("manifest", g.manifest),
        ("kernel", f"{g.kernel_name} {g.kernel}" if g.kernel else "-"),
        ("initrd", f"{g.initrd_name} {g.initrd}" if g.initrd else "-"), ("boot append", g.append),
    ] + [(k.replace("_", " "), str(v)) for k, v in sorted(g.meta.items())]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


@app.command()
def ls(
    ref: Annotated[str, typer.Argument(help="Generation reference.")],
    path: Annotated[str, typer.Argument(help="Path inside the generation.")] = "/",
    json_out: JsonOpt = False,
) -> None:
    """List a directory of a generation (like ls -l).

    Example: imgstore ls web@42 /etc
    """
    import stat as st

    from . import browse

    store, g = resolve(ref)
    items = browse.listdir(store, g, path)
    if json_out:
        emit_json([{"path": e.path, "type": e.type, "mode": f"{e.mode:04o}", "uid": e.uid, "gid": e.gid,
                    "size": e.size, "mtime_ns": e.mtime_ns, "digest": e.digest or None,
                    "target": e.target or None} for e in items])
        return
    kinds = {"f": st.S_IFREG, "d": st.S_IFDIR, "l": st.S_IFLNK, "h": st.S_IFREG, "c": st.S_IFCHR,
             "b": st.S_IFBLK, "p": st.S_IFIFO}
    for e in items:
        name = shown(e.path.rsplit(b"/", 1)[-1])
        arrow = {"l": " -> ", "h": " => "}.get(e.type)
        extra = f"{arrow}{shown(e.target)}" if arrow else ""
        size = f"{e.rdev[0]},{e.rdev[1]}" if e.type in "cb" else str(e.size)
        print(f"{st.filemode(kinds[e.type] | e.mode)} {e.uid:>5} {e.gid:>5} {size:>10} "
              f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(e.mtime_ns / 1e9))} {name!s}{extra}")


@app.command()
def cat(
    ref: Annotated[str, typer.Argument(help="Generation reference.")],
    path: Annotated[str, typer.Argument(help="File inside the generation.")],
) -> None:
    """Print a file of a generation to stdout.

    Example: imgstore cat web@42 /etc/fstab
    """
    from . import browse

    store, g = resolve(ref)
    out = sys.stdout.buffer
    for chunk in browse.read_file(store, g, path):
        out.write(chunk)
    out.flush()


@app.command()
def checkout(
    ref: Annotated[str, typer.Argument(help="Generation reference.")],
    dest: Annotated[Path, typer.Argument(help="New or empty directory to create the tree in.")],
    json_out: JsonOpt = False,
) -> None:
    """Recreate a generation's tree exactly (owners, modes, xattrs, hardlinks, devices, sparse files).

    Example: imgstore checkout web@42 /tmp/web-42
    """
    from . import browse

    store, g = resolve(ref)
    from . import audit

    audit.note(profile=g.profile, generation=g.ref, detail=f"into {dest}")
    t0 = time.monotonic()
    with progress_bar("checkout") as bar:
        res = browse.checkout(store, g, dest, bar)
    if json_out:
        emit_json({"generation": g.ref, "dest": dest, **res._asdict()})
    else:
        print(f"checked out {g.ref} into {dest}: {res.entries:,} entries, {human_bytes(res.bytes)} "
              f"in {time.monotonic() - t0:.2f} s")


@app.command()
def verify(
    repair: Annotated[bool, typer.Option("--repair", help="Mend what can be mended (see above).")] = False,
    no_wait: NoWait = False,
    json_out: JsonOpt = False,
) -> None:
    """Re-hash every object, manifest and materialized tree; report what is missing or damaged and which
    generations need it.

    --repair: damaged objects are quarantined (and stored again from a materialized tree that still holds
    the content), materialized trees and TFTP files changed in place are restored from the objects, temp
    files are removed. Then the store is verified again.

    Exit code 0 when the store is clean, 6 when something is missing or damaged.

    Example: imgstore verify ; imgstore verify --repair
    """
    from . import verify as verify_mod
    from .locking import store_lock
    from .store import Store

    store = open_store()
    repaired: list[str] = []
    if repair:
        with store_lock(store.root, "verify --repair", not no_wait):
            repaired = verify_mod.verify(store, repair=True).repaired
            from . import audit

            audit.note(detail="; ".join(repaired) or "nothing to repair")
            store = Store.open(store.root)  # fresh view of packs and objects after the repair
            rep = verify_mod.verify(store)
            rep.repaired = repaired
    else:
        rep = verify_mod.verify(store)
    if json_out:
        emit_json(rep)
    else:
        for r in rep.repaired:
            print(f"repaired: {r}")
        for p in rep.problems:
            users = f"; needed by {', '.join(p.generations)}" if p.generations else "; needed by no generation"
            print(f"temp: {p.what} ({p.detail})" if p.kind == "temp" else f"{p.kind}: {p.detail}{users}")
        bad = sum(p.kind != "temp" for p in rep.problems)
        verdict = "OK" if rep.ok else f"{bad} problem(s)"
        print(f"checked {rep.objects:,} objects in {rep.packs} packs and loose files, {rep.trees} materialized "
              f"trees, {rep.generations} generations in {rep.seconds:.2f} s: {verdict}")
        if not rep.ok:
            print("next: imgstore verify --repair; content no copy holds any more comes back by committing a chroot "
                  "that has it; generations that stay damaged can be dropped with imgstore gc --force", file=sys.stderr)
    if not rep.ok:
        raise typer.Exit(6)


@app.command()
def log(
    profile: Annotated[str | None, typer.Option("--profile", "-p", help="Only this profile.")] = None,
    node: Annotated[str | None, typer.Option("--node", help="Only this node.")] = None,
    since: Annotated[str | None, typer.Option(help="From this time: 2026-11-01, '2026-11-01 03:00' or 7d.")] = None,
    until: Annotated[str | None, typer.Option(help="Up to this time (same forms).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the last N events.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """The audit trail: every commit, rollout, rollback, pin, gc and repair, with who, where and the result.

    Example: imgstore log --node www3 --since 7d
    """
    from . import audit

    store = open_store()
    with store.engine.connect() as conn:
        rows = audit.query(conn, profile, node, _when(since, "--since"), _when(until, "--until"), limit)
    if json_out:
        emit_json(rows)
        return
    from rich.table import Table

    t = Table(box=None, header_style="bold")
    for col in ("when", "who", "command", "profile", "node", "generation", "result", "detail"):
        t.add_column(col)
    for r in rows:
        t.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"])), f"{r['user']}@{r['host']}",
                  r["command"], r["profile"] or "-", r["node"] or "-", r["generation"] or "-", r["result"],
                  r["detail"] or r["argv"])
    console().print(t)


def _when(text: str | None, opt: str) -> float | None:
    import datetime as dt
    import re

    if text is None:
        return None
    m = re.fullmatch(r"(\d+)([mhdw])", text.strip())
    if m:
        return time.time() - int(m.group(1)) * {"m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    try:
        return dt.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise UsageError(
            f"{opt} {text!r} is not a time", "write it like 2026-11-01, '2026-11-01 03:00' or 7d"
        ) from None


@profile_app.command("list")
def profile_list(json_out: JsonOpt = False) -> None:
    """List the store's profiles.

    Example: imgstore profile list
    """
    store = open_store()
    profs = store.profiles()
    if json_out:
        emit_json([p.as_dict() for p in profs])
        return
    from rich.table import Table

    t = Table(box=None, header_style="bold")
    for col in ("profile", "root link", "tftp root", "default", "description"):
        t.add_column(col)
    for p in profs:
        t.add_row(p.name, str(p.root_link), str(p.tftp_root), "yes" if p.serve_default else "no", p.description)
    console().print(t)


@profile_app.command("show")
def profile_show(name: Annotated[str, typer.Argument(help="Profile name.")], json_out: JsonOpt = False) -> None:
    """Show every setting of a profile, defaults included.

    Example: imgstore profile show web
    """
    p = open_store().profile(name)
    if json_out:
        emit_json(p.as_dict())
        return
    for k, v in p.as_dict().items():
        print(f"{k:<15} {v}")
