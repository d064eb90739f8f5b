"""Deploy commands: rollout, rollback, pin, status, history, sync, materialize, adopt, and node management."""

# No `from __future__ import annotations` here: typer would eval every annotation of every command as a string
# on each start (15 ms of every command, docs/benchmarks.md).

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import cli_fast
from .cli import JsonOpt, NoWait, app
from .cli_common import console, emit_json, open_store, when
from .errors import UsageError

node_app = typer.Typer(help="Manage nodes: machines known by name and MAC.", no_args_is_help=True)
app.add_typer(node_app, name="node")

DryRun = Annotated[bool, typer.Option("--dry-run", help="Show the plan; write nothing.")]
ProfileOpt = Annotated[Optional[str], typer.Option("--profile", "-p", help="Profile [default: the only one in use].")]


def _profile_name(store: Any, given: str | None) -> str:
    if given:
        store.profile(given)
        return given
    from . import generations

    with store.engine.connect() as conn:
        used = generations.profiles(conn)
    if len(used) == 1:
        return str(used[0])
    raise UsageError("several profiles have generations" if used else "no profile has generations yet",
                     "pass --profile NAME")


def _show_change(ch: Any, json_out: bool) -> None:
    from . import audit

    one_node = ch.nodes_moved[0] if ch.action in ("canary", "pin", "unpin", "rollback-node") else None
    audit.note(profile=ch.profile, node=one_node, generation=ch.to_ref,
               detail=f"{ch.action} {ch.from_ref or '-'} -> {ch.to_ref}; {len(ch.nodes_moved)} node(s); "
               f"{len(ch.written)} file(s) written")
    if json_out:
        emit_json(ch)
        return
    verb = "would move" if ch.dry_run else "moved"
    print(f"{ch.action} {ch.profile}: {ch.from_ref or '(nothing)'} -> {ch.to_ref}"
          + (" [dry run: nothing written]" if ch.dry_run else ""))
    if ch.materialized:
        print(f"  materialized {', '.join(ch.materialized)}")
    if ch.nodes_moved:
        more = len(ch.nodes_moved) - 20
        shown = ", ".join(ch.nodes_moved[:20]) + (f" and {more} more" if more > 0 else "")
        print(f"  {verb} {len(ch.nodes_moved)} node(s): {shown}")
    for w in ch.written[:50]:
        print(f"  wrote {w}")
    if len(ch.written) > 50:
        print(f"  ... and {len(ch.written) - 50} more files")


@app.command()
def rollout(
    gen: Annotated[Optional[str], typer.Argument(help="Generation [default: the profile's latest].")] = None,
    canary: Annotated[Optional[str], typer.Option("--canary", help="Only this node (name or MAC) boots GEN.")] = None,
    profile: ProfileOpt = None,
    dry_run: DryRun = False,
    no_wait: NoWait = False,
    json_out: JsonOpt = False,
) -> None:
    """Move the profile (or, with --canary, one node) to a generation on its next boot.

    Examples: imgstore rollout --canary www3 ; imgstore rollout ; imgstore rollout web@41
    """
    from . import deploy

    store = open_store()
    if canary:
        ch = deploy.canary(store, canary, gen, dry_run, not no_wait)
    else:
        ch = deploy.rollout(store, _profile_name(store, profile), gen, dry_run, not no_wait)
    _show_change(ch, json_out)


@app.command()
def rollback(
    node: Annotated[Optional[str], typer.Option("--node", help="Undo this node's pin (a canary) only.")] = None,
    to: Annotated[Optional[str], typer.Option("--to", help="Go to this generation, not the previous one.")] = None,
    profile: ProfileOpt = None,
    dry_run: DryRun = False,
    no_wait: NoWait = False,
    json_out: JsonOpt = False,
) -> None:
    """Return the profile to the generation active before; repeated, keep walking back.

    Examples: imgstore rollback ; imgstore rollback --node www3 ; imgstore rollback --to web@40
    """
    from . import deploy

    store = open_store()
    if node:
        ch = deploy.unpin(store, node, dry_run, not no_wait, kind="rollback-node")
    else:
        ch = deploy.rollback(store, _profile_name(store, profile), to, dry_run, not no_wait)
    _show_change(ch, json_out)


@app.command()
def pin(
    node: Annotated[str, typer.Argument(help="Node name or MAC.")],
    gen: Annotated[str, typer.Argument(help="Generation to boot from now on.")],
    dry_run: DryRun = False,
    no_wait: NoWait = False,
    json_out: JsonOpt = False,
) -> None:
    """Pin a node to a generation, whatever its profile does.

    Example: imgstore pin www3 web@41
    """
    from . import deploy

    _show_change(deploy.pin(open_store(), node, gen, dry_run, not no_wait), json_out)


@app.command()
def unpin(
    node: Annotated[str, typer.Argument(help="Node name or MAC.")],
    dry_run: DryRun = False,
    no_wait: NoWait = False,
    json_out: JsonOpt = False,
) -> None:
    """Let a pinned node follow its profile's active generation again.

    Example: imgstore unpin www3
    """
    from . import deploy

    _show_change(deploy.unpin(open_store(), node, dry_run, not no_wait), json_out)


@app.command()
def status(
    chroot: Annotated[Optional[Path], typer.Argument(help="Show what changed in this chroot since the "
                                                     "profile's latest generation.")] = None,
    profile: Annotated[Optional[str], typer.Option("--profile", "-p", help="With no CHROOT: the profile's "
                                                   "configured chroot.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Without arguments: per profile its active generation; per node pinned and effective generation;
    drift (exit code 8 when something on disk differs from the database).

    With CHROOT or --profile: what changed in the chroot since the profile's latest generation.

    Examples: imgstore status ; imgstore status /srv/chroots/web -p web
    """
    store = open_store()
    if chroot is not None or profile is not None:
        from .cli_watch import show_chroot_status

        show_chroot_status(store, profile, chroot, json_out)
        return
    from . import status as status_mod

    st = status_mod.status(store, store.profiles())
    if json_out:
        emit_json(st)
    else:
        from rich.table import Table

        t = Table(box=None, header_style="bold", title_justify="left")
        for col in ("profile", "active", "root link"):
            t.add_column(col)
        for p in st.profiles:
            t.add_row(p["profile"], p["active"] or "-", p["root_link"])
        console().print(t)
        if st.nodes:
            t = Table(box=None, header_style="bold")
            for col in ("node", "mac", "ip", "profile", "pinned", "boots"):
                t.add_column(col)
            for n in st.nodes:
                t.add_row(n["name"], n["mac"], n["ip"] or "-", n["profile"], n["pinned"] or "-", n["effective"] or "-")
            console().print(t)
        for d in st.drift:
            print(f"drift: {d.kind}: {d.path}: {d.detail} (fix: {d.fix})")
        if not st.drift:
            print("no drift: every link and boot file matches the database")
    if st.drift:
        raise typer.Exit(8)


@app.command()
def history(
    profile: Annotated[Optional[str], typer.Option("--profile", "-p")] = None,
    node: Annotated[Optional[str], typer.Option("--node")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Every activation: when, who, from -> to, which nodes.

    Example: imgstore history --profile web
    """
    from . import deploy

    store = open_store()
    with store.engine.connect() as conn:
        rows = deploy.history(conn, profile, node)
    if json_out:
        emit_json(rows)
        return
    from rich.table import Table

    t = Table(box=None, header_style="bold")
    for col in ("when", "who", "action", "profile", "from", "to", "nodes"):
        t.add_column(col)
    for r in rows:
        ns = r["nodes"]
        t.add_row(when(r["at"]), f"{r['user']}@{r['host']}", r["kind"], r["profile"], r["from"] or "-", r["to"] or "-",
                  r["node"] or (f"{len(ns)} node(s)" if ns else "-"))
    console().print(t)


@app.command()
def sync(dry_run: DryRun = False, no_wait: NoWait = False, json_out: JsonOpt = False) -> None:
    """Rewrite every root link, TFTP file and per-MAC config from the database (repairs drift).

    Example: imgstore sync
    """
    from . import deploy

    store = open_store()
    written = deploy.sync(store, store.profiles(), dry_run, not no_wait)
    from . import audit

    audit.note(detail=f"{len(written)} path(s) repaired")
    if json_out:
        emit_json({"dry_run": dry_run, "paths": written})
        return
    for w in written:
        print(("would check " if dry_run else "repaired ") + w)
    if not written:
        print("nothing to repair")


@app.command()
def materialize(
    gen: Annotated[str, typer.Argument(help="Generation reference.")],
    no_wait: NoWait = False,
    json_out: JsonOpt = False,
) -> None:
    """Lay a generation out read-only at <store>/<id>-<profile>-rootfs (rollout does this itself).

    Example: imgstore materialize web@42
    """
    cli_fast.materialize(gen, no_wait, json_out)


@app.command()
def adopt(
    directory: Annotated[Path, typer.Argument(help="An existing hand-managed root, e.g. /netboot/root.")],
    profile: Annotated[str, typer.Option("--profile", "-p")] = "web",
    message: Annotated[str, typer.Option("--message", "-m")] = "adopted",
    kernel: Annotated[Optional[Path], typer.Option(help="Kernel the fleet boots today.")] = None,
    initrd: Annotated[Optional[Path], typer.Option(help="Initrd the fleet boots today.")] = None,
    no_wait: NoWait = False,
    json_out: JsonOpt = False,
) -> None:
    """Turn an existing root directory into a first generation and put the managed symlink in its place.

    The original directory is kept, renamed to DIR.pre-imgstore, so nothing is lost and running nodes
    keep their NFS handles. Example: imgstore adopt /netboot/root --profile web
    """
    from . import adopt as adopt_mod

    res = adopt_mod.adopt(open_store(), directory, profile, message, kernel, initrd, not no_wait)
    from . import audit

    audit.note(profile=profile, generation=res["generation"], detail=f"adopted {directory}")
    if json_out:
        emit_json(res)
    else:
        print(f"adopted {directory} as {res['generation']}; the original is at {res['kept']}; "
              f"{directory} -> {res['target']}")


def parse_duration(text: str) -> float:
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise UsageError(f"--older-than {text!r} is not a duration", "write it like 30d, 12h, 90m or 3600s")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


@app.command()
def gc(
    keep: Annotated[int, typer.Option("--keep", help="Always keep the last N generations of each profile.")] = 3,
    older_than: Annotated[Optional[str], typer.Option("--older-than", help="Only remove generations older "
                                                      "than this (30d, 12h, ...).")] = None,
    dry_run: DryRun = False,
    force: Annotated[bool, typer.Option("--force", help="Run even if objects are missing.")] = False,
    no_wait: NoWait = False,
    json_out: JsonOpt = False,
) -> None:
    """Remove generations nothing needs: their trees, TFTP files and objects; print what was freed.

    Kept: every profile's active generation and its rollback target, every node's pinned and effective
    generation, and the last --keep generations of each profile.

    Example: imgstore gc --keep 5 --older-than 30d --dry-run
    """
    from . import gc as gc_mod
    from .cli_common import human_bytes

    if keep < 0:
        raise UsageError("--keep must be 0 or more", "e.g. --keep 3")
    age = parse_duration(older_than) if older_than else None
    res = gc_mod.gc(open_store(), keep, age, dry_run, force, not no_wait)
    from . import audit

    audit.note(detail=f"removed {', '.join(res.removed) or 'nothing'}; freed {res.bytes_freed} bytes")
    if json_out:
        emit_json(res)
        return
    if dry_run:
        print(f"would remove {len(res.removed)} generation(s): {', '.join(res.removed) or '-'}")
    else:
        print(f"removed {len(res.removed)} generation(s): {', '.join(res.removed) or '-'}; "
              f"{res.objects:,} objects, {res.packs_rewritten} pack(s) rewritten; freed {human_bytes(res.bytes_freed)}")
    print(f"kept {len(res.kept)}: {', '.join(res.kept) or '-'}")


# -- nodes ----------------------------------------------------------------------------------------
def _node_change(store: Any, profile: str) -> list[str]:
    """After a node is added or changed, write its per-MAC file if its profile has something active.
    The caller holds the store lock."""
    from . import deploy

    return deploy.sync(store, [store.profile(profile)], locked=True)


@node_app.command("add")
def node_add(
    name: Annotated[str, typer.Argument(help="Node name (a hostname label).")],
    mac: Annotated[str, typer.Option("--mac", help="aa:bb:cc:dd:ee:ff, AA-BB-CC-DD-EE-FF or aabb.ccdd.eeff")],
    profile: Annotated[str, typer.Option("--profile", "-p")],
    ip: Annotated[Optional[str], typer.Option("--ip")] = None,
    no_wait: NoWait = False,
    json_out: JsonOpt = False,
) -> None:
    """Add a node.

    Example: imgstore node add www3 --mac 00:E0:81:2F:64:6C --ip 10.0.1.3 --profile web
    """
    from . import nodes
    from .locking import store_lock

    store = open_store()
    store.profile(profile)
    with store_lock(store.root, "node add", not no_wait):
        with store.engine.begin() as conn:
            n = nodes.add(conn, name, mac, ip, profile)
        written = _node_change(store, profile)
    from . import audit

    audit.note(profile=profile, node=n.name, detail=f"{n.mac} {n.ip or ''}")
    if json_out:
        emit_json({**n.as_dict(), "written": written})
    else:
        print(f"added node {n.name} {n.mac} ({n.ip or 'no ip'}) to {profile}"
              + (f"; wrote {', '.join(written)}" if written else ""))


@node_app.command("list")
def node_list(
    profile: Annotated[Optional[str], typer.Option("--profile", "-p")] = None, json_out: JsonOpt = False
) -> None:
    """List nodes.

    Example: imgstore node list --profile web
    """
    from . import nodes

    store = open_store()
    with store.engine.connect() as conn:
        ns = nodes.list_(conn, profile)
    if json_out:
        emit_json([n.as_dict() for n in ns])
        return
    from rich.table import Table

    t = Table(box=None, header_style="bold")
    for col in ("node", "mac", "ip", "profile", "pxelinux file"):
        t.add_column(col)
    for n in ns:
        t.add_row(n.name, str(n.mac), n.ip or "-", n.profile, n.mac.pxelinux_name)
    console().print(t)


@node_app.command("show")
def node_show(node: Annotated[str, typer.Argument(help="Name or MAC.")], json_out: JsonOpt = False) -> None:
    """Show one node and what it boots.

    Example: imgstore node show www3
    """
    from . import deploy, generations, nodes

    store = open_store()
    with store.engine.connect() as conn:
        n = nodes.get(conn, node)
        eff = deploy.effective(conn, n, deploy.active(conn, n.profile))
        pinned = generations.by_pk(conn, n.pinned).ref if n.pinned is not None else None
    d = {**n.as_dict(), "pinned": pinned, "effective": eff.ref if eff else None}
    if json_out:
        emit_json(d)
    else:
        for k, v in d.items():
            print(f"{k:<14} {v if v is not None else '-'}")


@node_app.command("edit")
def node_edit(
    node: Annotated[str, typer.Argument(help="Name or MAC.")],
    mac: Annotated[Optional[str], typer.Option("--mac")] = None,
    ip: Annotated[Optional[str], typer.Option("--ip", help="New IP ('' clears it).")] = None,
    profile: Annotated[Optional[str], typer.Option("--profile", "-p")] = None,
    no_wait: NoWait = False,
) -> None:
    """Change a node's MAC, IP or profile (a new MAC moves its per-MAC file).

    Example: imgstore node edit www3 --mac 00:e0:81:2f:64:6d
    """
    from . import nodes, pxelinux
    from .locking import store_lock

    store = open_store()
    if profile:
        store.profile(profile)
    with store_lock(store.root, "node edit", not no_wait):
        with store.engine.begin() as conn:
            old = nodes.get(conn, node)
            new = nodes.edit(conn, old, mac, ip, profile)
        if old.mac != new.mac or old.profile != new.profile:
            stale = store.profile(old.profile).tftp_root / pxelinux.mac_file(old.mac)
            if os.path.lexists(stale):
                stale.unlink()
        _node_change(store, new.profile)
    from . import audit

    audit.note(profile=new.profile, node=new.name, detail=f"{old.mac} -> {new.mac}, {old.ip} -> {new.ip}")
    print(f"node {new.name}: {new.mac} {new.ip or '-'} {new.profile}")


@node_app.command("rm")
def node_rm(node: Annotated[str, typer.Argument(help="Name or MAC.")], no_wait: NoWait = False) -> None:
    """Remove a node and its per-MAC file (it falls back to pxelinux.cfg/default).

    Example: imgstore node rm www3
    """
    from . import nodes, pxelinux
    from .locking import store_lock

    store = open_store()
    with store_lock(store.root, "node rm", not no_wait):
        with store.engine.begin() as conn:
            n = nodes.get(conn, node)
            nodes.remove(conn, n)
        f = store.profile(n.profile).tftp_root / pxelinux.mac_file(n.mac)
        if os.path.lexists(f):
            f.unlink()
    from . import audit

    audit.note(profile=n.profile, node=n.name, detail=str(n.mac))
    print(f"removed node {n.name} ({n.mac})")


@node_app.command("import-dhcpd")
def node_import(
    conf: Annotated[Path, typer.Argument(help="An ISC dhcpd.conf with host blocks.")],
    profile: Annotated[str, typer.Option("--profile", "-p")],
    dry_run: DryRun = False,
    no_wait: NoWait = False,
    json_out: JsonOpt = False,
) -> None:
    """Adopt an existing fleet's host entries (hardware ethernet, fixed-address, host-name).

    Example: imgstore node import-dhcpd /etc/dhcp/dhcpd.conf --profile web
    """
    from . import dhcpd, nodes
    from .errors import NotFound
    from .locking import store_lock

    store = open_store()
    store.profile(profile)
    try:
        text = conf.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise NotFound(f"{conf} does not exist", "give the path of dhcpd.conf") from None
    hosts, warnings = dhcpd.parse_dhcpd(text, os.fspath(conf))
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not dry_run:
        with store_lock(store.root, "node import-dhcpd", not no_wait):
            with store.engine.begin() as conn:
                for h in hosts:  # all or nothing: one transaction
                    nodes.add(conn, h.name, str(h.mac), h.ip, profile)
            _node_change(store, profile)
    if json_out:
        emit_json({"dry_run": dry_run, "nodes": [{"name": h.name, "mac": str(h.mac), "ip": h.ip} for h in hosts]})
    else:
        print(f"{'would import' if dry_run else 'imported'} {len(hosts)} node(s) into {profile}: "
              + ", ".join(h.name for h in hosts))


def _hosts(profile: str | None) -> list[Any]:
    from . import dhcpd, nodes

    store = open_store()
    with store.engine.connect() as conn:
        return [dhcpd.HostEntry(n.name, n.mac, n.ip) for n in nodes.list_(conn, profile)]


@node_app.command("export-dhcpd")
def node_export_dhcpd(
    next_server: Annotated[str, typer.Option("--next-server", help="The TFTP server's address.")],
    profile: Annotated[Optional[str], typer.Option("--profile", "-p")] = None,
) -> None:
    """Print an ISC dhcpd group block (next-server, filename "pxelinux.0", host entries) to include.

    Example: imgstore node export-dhcpd --next-server 10.0.0.1 > /etc/dhcp/imgstore-hosts.conf
    """
    from . import dhcpd

    sys.stdout.write(dhcpd.export_dhcpd(_hosts(profile), next_server))


@node_app.command("export-dnsmasq")
def node_export_dnsmasq(profile: Annotated[Optional[str], typer.Option("--profile", "-p")] = None) -> None:
    """Print dnsmasq dhcp-host lines for every node.

    Example: imgstore node export-dnsmasq > /etc/dnsmasq.d/imgstore-hosts.conf
    """
    from . import dhcpd

    sys.stdout.write(dhcpd.export_dnsmasq(_hosts(profile)))
