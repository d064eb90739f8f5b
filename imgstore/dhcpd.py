"""Import node lists from ISC dhcpd.conf, and export them for ISC dhcpd or dnsmasq.

Reading goes through a small tokenizer (words, quoted strings, `{ } ; ,`, `#` comments) and a brace
parser that builds a tree of statements and blocks; only `host` blocks are interpreted, wherever they
are nested (group, subnet, shared-network, pool, ...). Everything else in the file is skipped, but its
braces and semicolons must balance, so a damaged file is refused rather than half-read.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .errors import Conflict, UsageError
from .mac import ACCEPTED_FORMS, MacAddress, validate_ip, validate_node_name

# A DNS name, for `fixed-address` and `next-server` values that are not IP literals. A last label of
# only digits is refused so that a mistyped address (10.0.1.300) is not taken for a host name.
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?")
_ALL_DIGITS = re.compile("[0-9]+")

# dhcpd allows octets of one hex digit (0:1e:c9:2:3:4); MacAddress.parse accepts only two.
_DHCPD_MAC = re.compile(":".join(["([0-9A-Fa-f]{1,2})"] * 6))

# dnsmasq reads each dhcp-host field by its shape: something inet_aton takes is an address, digits with
# an optional unit are a lease time, so a node with such a name would silently not get its name.
_DNSMASQ_LEASE_TIME = re.compile("[0-9]+[smhdwSMHDW]?")
_INET_ATON_PART = "(?:0[xX][0-9A-Fa-f]*|[0-9]+)"
_DNSMASQ_ADDRESS = re.compile(rf"{_INET_ATON_PART}(?:\.{_INET_ATON_PART}){{0,3}}")
_DNSMASQ_KEYWORDS = {"infinite", "ignore"}

# dhcpd reads a host declaration name as dot-separated identifiers; a node name that is not of that
# shape (a label starting with '_' or '-', a trailing dot) gets a name derived from its MAC instead.
# Only option host-name carries the node name, so the import reads it back either way.
_ISC_LABEL = "[A-Za-z0-9][A-Za-z0-9_-]*"
_ISC_HOST_DECL = re.compile(rf"{_ISC_LABEL}(?:\.{_ISC_LABEL})*")

_PUNCT = "{};,"
_WORD_END = set(_PUNCT) | {'"', "#", " ", "\t", "\r", "\n", "\v", "\f"}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b"}


@dataclass(frozen=True)
class HostEntry:
    """One PXE node as a DHCP server knows it. `ip` is normalised if it is an IP literal; a
    `fixed-address` given as a host name is kept as written."""

    name: str
    mac: MacAddress
    ip: str | None = None

    def __post_init__(self) -> None:
        validate_node_name(self.name)
        if not isinstance(self.mac, MacAddress):
            raise UsageError(
                f"HostEntry {self.name}: mac {self.mac!r} is not a MacAddress",
                "build it with MacAddress.parse()",
            )
        if self.ip is not None:
            # Frozen dataclass: normalising in place is the documented way to fix up a field.
            object.__setattr__(self, "ip", _address_or_name(self.ip, f"host {self.name}"))


@dataclass(frozen=True)
class _Token:
    kind: str  # "word", "string", or the punctuation character itself
    text: str
    line: int


@dataclass
class _Statement:
    words: list[_Token]
    line: int
    body: list[_Statement] | None = None  # None for `...;`, a list for `... { ... }`


def _address_or_name(text: str, where: str) -> str:
    try:
        address: str = validate_ip(text)
    except UsageError:
        pass
    else:
        return address
    last_label = text.rstrip(".").rsplit(".", 1)[-1]
    if len(text) <= 253 and _DNS_NAME.fullmatch(text) and not _ALL_DIGITS.fullmatch(last_label):
        return text
    raise UsageError(
        f"{where}: {text!r} is neither an IP address nor a host name",
        "use an address like 10.0.1.3 or a DNS name like www1.example.com",
    )


def _tokens(text: str, source: str) -> Iterator[_Token]:
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c in " \t\r\v\f":
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in _PUNCT:
            yield _Token(c, c, line)
            i += 1
        elif c == '"':
            start_line, i, chars = line, i + 1, []
            while True:
                if i >= n:
                    raise UsageError(
                        f"{source}:{start_line}: string is never closed; expected '\"'",
                        "close the quoted string on the line it starts",
                    )
                c = text[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n:
                    i += 1
                    c = _ESCAPES.get(text[i], text[i])
                if text[i] == "\n":
                    line += 1
                chars.append(c)
                i += 1
            yield _Token("string", "".join(chars), start_line)
        else:
            start = i
            while i < n and text[i] not in _WORD_END:
                i += 1
            yield _Token("word", text[start:i], line)


def _parse_tree(text: str, source: str) -> list[_Statement]:
    """Group tokens into statements. Iterative, so that a file of thousands of nested braces is a
    syntax question, not a RecursionError."""
    root: list[_Statement] = []
    stack: list[tuple[list[_Statement], _Statement | None]] = [(root, None)]
    words: list[_Token] = []
    for tok in _tokens(text, source):
        body, opener = stack[-1]
        if tok.kind == "{":
            block = _Statement(words, words[0].line if words else tok.line, body=[])
            body.append(block)
            assert block.body is not None
            stack.append((block.body, block))
            words = []
        elif tok.kind == "}":
            if opener is None:
                raise UsageError(
                    f"{source}:{tok.line}: '}}' closes no open block",
                    "remove the extra '}' or add the '{' it belongs to",
                )
            if words:
                raise UsageError(
                    f"{source}:{words[-1].line}: expected ';' after {_shown(words)} before '}}'",
                    "end every statement with ';'",
                )
            stack.pop()
        elif tok.kind == ";":
            if words:
                body.append(_Statement(words, words[0].line))
            words = []
        else:
            words.append(tok)
    if words:
        raise UsageError(
            f"{source}:{words[-1].line}: expected ';' after {_shown(words)} at end of file",
            "end every statement with ';'",
        )
    if len(stack) > 1:
        opener = stack[-1][1]
        assert opener is not None
        raise UsageError(
            f"{source}:{opener.line}: block {_shown(opener.words)} {{ is never closed; expected '}}'",
            "add the missing '}'",
        )
    return root


def _shown(words: Sequence[_Token]) -> str:
    text = " ".join(f'"{w.text}"' if w.kind == "string" else w.text for w in words)
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _keyword(words: Sequence[_Token], *expected: str) -> bool:
    return len(words) >= len(expected) and all(
        w.kind == "word" and w.text.lower() == e for w, e in zip(words, expected, strict=False)
    )


def _walk(stmts: list[_Statement]) -> Iterator[_Statement]:
    pending = list(reversed(stmts))
    while pending:
        s = pending.pop()
        yield s
        if s.body is not None and not _keyword(s.words, "host"):
            pending.extend(reversed(s.body))


def _dhcpd_mac(tok: _Token, source: str, host: str) -> MacAddress:
    m = _DHCPD_MAC.fullmatch(tok.text) if tok.kind == "word" else None
    text = ":".join(g.zfill(2) for g in m.groups()) if m else tok.text
    try:
        return MacAddress.parse(text)
    except UsageError as exc:
        raise UsageError(
            f"{source}:{tok.line}: host {host}: {exc.message}", exc.hint or ACCEPTED_FORMS
        ) from None


def _host(block: _Statement, source: str, warnings: list[str]) -> tuple[HostEntry, int] | None:
    where = f"{source}:{block.line}"
    if len(block.words) != 2 or block.words[1].kind not in ("word", "string"):
        raise UsageError(
            f"{where}: expected 'host NAME {{', got {_shown(block.words)}",
            "give each host block exactly one name",
        )
    decl_name = block.words[1].text
    # The name is still unchecked here and may hold control characters; messages stay one line.
    shown = decl_name if _ISC_HOST_DECL.fullmatch(decl_name) else repr(decl_name)
    assert block.body is not None
    mac: MacAddress | None = None
    ip: str | None = None
    host_name: str | None = None
    for s in block.body:
        w, line = s.words, s.line
        if s.body is not None:
            continue
        if _keyword(w, "hardware"):
            if len(w) != 3 or w[2].kind != "word":
                raise UsageError(
                    f"{source}:{line}: expected 'hardware ethernet MAC;', got {_shown(w)}",
                    "write one MAC address and end the statement with ';'",
                )
            if w[1].text.lower() != "ethernet":
                warnings.append(
                    f"{source}:{line}: host {shown}: hardware type {w[1].text!r} ignored; "
                    "PXE nodes boot over ethernet"
                )
                continue
            mac = _dhcpd_mac(w[2], source, shown)
        elif _keyword(w, "fixed-address"):
            values = w[1::2]
            commas = w[2::2]
            well_formed = len(w) % 2 == 0 and all(c.kind == "," for c in commas)
            if not well_formed or any(v.kind != "word" for v in values):
                raise UsageError(
                    f"{source}:{line}: expected 'fixed-address ADDRESS[, ADDRESS...];', got {_shown(w)}",
                    "separate several addresses with ',' and end the statement with ';'",
                )
            ip = _address_or_name(values[0].text, f"{source}:{line}: host {shown}")
            if len(values) > 1:
                warnings.append(
                    f"{source}:{line}: host {shown}: only the first fixed-address "
                    f"{ip} is used; {len(values) - 1} more ignored"
                )
        elif _keyword(w, "option", "host-name"):
            if len(w) != 3 or w[2].kind not in ("string", "word"):
                raise UsageError(
                    f"{source}:{line}: expected 'option host-name \"NAME\";', got {_shown(w)}",
                    "quote the name and end the statement with ';'",
                )
            host_name = w[2].text
    if mac is None:
        warnings.append(f"{where}: host {shown} has no 'hardware ethernet' statement; skipped")
        return None
    name = host_name if host_name is not None else decl_name
    try:
        validate_node_name(name)
    except UsageError as exc:
        # Valid dhcpd syntax, just not a name we can use as a node: the rest of the file still imports.
        warnings.append(f"{where}: host {shown}: {exc.message}; skipped ({exc.hint})")
        return None
    return HostEntry(name, mac, ip), block.line


def parse_dhcpd(text: str, source: str = "dhcpd.conf") -> tuple[list[HostEntry], list[str]]:
    """Return the host entries of an ISC dhcpd.conf, in file order, and warnings about skipped parts.

    Raises UsageError (naming source:line) for a syntax error or a bad MAC address, and Conflict when
    two hosts share a MAC address or a node name.
    """
    warnings: list[str] = []
    hosts: list[HostEntry] = []
    lines: list[int] = []
    for s in _walk(_parse_tree(text, source)):
        if _keyword(s.words, "include"):
            warnings.append(f"{source}:{s.line}: {_shown(s.words)} not followed; import that file too")
        elif _keyword(s.words, "host"):
            if s.body is None:
                raise UsageError(
                    f"{source}:{s.line}: expected '{{' after {_shown(s.words)}",
                    "declare hosts as 'host NAME { ... }'",
                )
            found = _host(s, source, warnings)
            if found is not None:
                hosts.append(found[0])
                lines.append(found[1])
    _check_unique(hosts, [f"{source}:{n}" for n in lines])
    return hosts, warnings


def _check_unique(hosts: Sequence[HostEntry], where: Sequence[str] | None = None) -> None:
    places = list(where) if where is not None else [f"entry {i + 1}" for i in range(len(hosts))]
    by_mac: dict[MacAddress, int] = {}
    by_name: dict[str, int] = {}
    for i, h in enumerate(hosts):
        if h.mac in by_mac:
            j = by_mac[h.mac]
            raise Conflict(
                f"{places[i]}: MAC address {h.mac} of {h.name} is already used by {hosts[j].name} "
                f"at {places[j]}",
                "each node needs its own MAC address; remove or correct one of the two",
            )
        if h.name in by_name:
            j = by_name[h.name]
            raise Conflict(
                f"{places[i]}: node name {h.name} ({h.mac}) is already used for {hosts[j].mac} "
                f"at {places[j]}",
                "give each node its own name (option host-name) or remove one of the two",
            )
        by_mac[h.mac] = i
        by_name[h.name] = i


def export_dhcpd(hosts: Sequence[HostEntry], next_server: str, filename: str = "pxelinux.0") -> str:
    """A `group { ... }` for the operator to include from dhcpd.conf: every node boots `filename` from
    the TFTP server `next_server`."""
    _check_unique(hosts)
    server = _address_or_name(next_server, "next-server")
    if _ip_version(server) == 6:
        raise UsageError(
            f"next-server {server} is an IPv6 address; PXELINUX boots over DHCPv4",
            "give the IPv4 address of the TFTP server",
        )
    # The BOOTP `file` field is 128 bytes with its terminating NUL; the string is also written between
    # quotes, so quotes, backslashes and control characters would break out of it.
    if not filename or len(filename) > 127 or any(not (" " <= c <= "~") or c in '"\\' for c in filename):
        raise UsageError(
            f"invalid boot file name {filename!r}",
            "use 1-127 printable ASCII characters without quotes or backslashes, like pxelinux.0",
        )
    out = [
        f"# Generated by imgstore: PXE boot for {len(hosts)} node(s).",
        '# Include it from dhcpd.conf with: include "/path/to/this/file";',
        "group {",
        f"  next-server {server};",
        f'  filename "{filename}";',
    ]
    for h in hosts:
        if h.ip is not None and _ip_version(h.ip) == 6:
            raise UsageError(
                f"host {h.name} has the IPv6 address {h.ip}; PXELINUX boots over DHCPv4",
                "give the node an IPv4 address",
            )
        out.append("")
        decl = h.name if _ISC_HOST_DECL.fullmatch(h.name) else "node-" + h.mac.octets.hex()
        out.append(f"  host {decl} {{")
        out.append(f"    hardware ethernet {h.mac};")
        if h.ip is not None:
            out.append(f"    fixed-address {h.ip};")
        out.append(f'    option host-name "{h.name}";')
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def export_dnsmasq(hosts: Sequence[HostEntry]) -> str:
    """`dhcp-host=MAC[,IP],NAME` lines for dnsmasq, one per node."""
    _check_unique(hosts)
    out = [
        f"# Generated by imgstore: static DHCP entries for {len(hosts)} PXE node(s).",
        "# Put it in /etc/dnsmasq.d/ or include it with conf-file=/path/to/this/file.",
    ]
    for h in hosts:
        if (
            h.name.lower() in _DNSMASQ_KEYWORDS
            or _DNSMASQ_LEASE_TIME.fullmatch(h.name)
            or _DNSMASQ_ADDRESS.fullmatch(h.name)
        ):
            raise UsageError(
                f"node name {h.name} would be read by dnsmasq as an address, lease time or keyword",
                "rename the node, e.g. with a letter in front, and avoid the names 'infinite' and 'ignore'",
            )
        fields = [str(h.mac)]
        if h.ip is not None:
            version = _ip_version(h.ip)
            if version is None:
                # dnsmasq would take a non-address here for the node's host name, not look it up.
                raise UsageError(
                    f"host {h.name}: fixed address {h.ip} is a host name; dnsmasq needs an IP address here",
                    "replace it with the node's IP address",
                )
            fields.append(f"[{h.ip}]" if version == 6 else h.ip)
        fields.append(h.name)
        out.append("dhcp-host=" + ",".join(fields))
    return "\n".join(out) + "\n"


def _ip_version(text: str) -> int | None:
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return None
