"""Node identity: MAC addresses, node names and IP addresses, validated once at the edge.

Every one of these ends up in a file name (PXELINUX per-MAC files, per-node state) or in a config file
we generate (dhcpd, dnsmasq). Validation is therefore a whitelist: a value that passes can only ever
mean itself, as a path component and as a config token.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .errors import UsageError

ACCEPTED_FORMS = "aa:bb:cc:dd:ee:ff, AA-BB-CC-DD-EE-FF, aabb.ccdd.eeff or aabbccddeeff"

# Explicit ASCII classes and fullmatch throughout: `\d`/`\w` match non-ASCII digits and letters, and `$`
# also matches before a trailing newline, either of which would let a hostile value through.
_HEX2 = "[0-9A-Fa-f]{2}"
_HEX4 = "[0-9A-Fa-f]{4}"
_MAC_FORMS = (
    re.compile(":".join([f"({_HEX2})"] * 6)),
    re.compile("-".join([f"({_HEX2})"] * 6)),
    re.compile(r"\.".join([f"({_HEX4})"] * 3)),
    re.compile(f"({_HEX4})" * 3),
)
_NORMALISED = re.compile(":".join(["[0-9a-f]{2}"] * 6))

# Only ASCII whitespace is stripped: str.strip() would also eat \x1c-\x1f and Unicode separators,
# silently accepting values no operator typed on purpose.
_ASCII_WS = " \t\r\n\v\f"

_NODE_NAME = re.compile("[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
NODE_NAME_RULE = (
    "use 1-63 characters of letters, digits, '.', '_' and '-', starting with a letter or digit, without '..'"
)


def _show(text: str) -> str:
    """Quote a user value for a one-line message: repr escapes newlines and NULs, long values are cut."""
    return repr(text) if len(text) <= 64 else repr(text[:61]) + "..."


@dataclass(frozen=True, order=True)
class MacAddress:
    """An Ethernet address of a node's NIC, always in the form aa:bb:cc:dd:ee:ff.

    Build one with MacAddress.parse(); the constructor only accepts the normalised form, so that a
    MacAddress in hand is always valid and two equal addresses always compare (and hash) equal.
    """

    value: str

    def __post_init__(self) -> None:
        if not isinstance(self.value, str) or not _NORMALISED.fullmatch(self.value):
            raise UsageError(
                f"MacAddress({self.value!r}) is not in the normalised form aa:bb:cc:dd:ee:ff",
                "build it with MacAddress.parse(), which accepts " + ACCEPTED_FORMS,
            )
        first = int(self.value[:2], 16)
        if first & 0x01:
            raise UsageError(
                f"MAC address {self.value} is a multicast or broadcast address (group bit set); "
                "a node's NIC always has a unicast address",
                "check the address for a typo; the first octet of a NIC's address is even",
            )
        if self.value == "00:00:00:00:00:00":
            raise UsageError(
                "MAC address 00:00:00:00:00:00 is not a real NIC address",
                "use the address printed on the node's NIC or in its boot log",
            )

    @classmethod
    def parse(cls, text: str) -> MacAddress:
        """Accept aa:bb:cc:dd:ee:ff, AA-BB-CC-DD-EE-FF, aabb.ccdd.eeff or aabbccddeeff (any case)."""
        stripped = text.strip(_ASCII_WS)
        for form in _MAC_FORMS:
            m = form.fullmatch(stripped)
            if m:
                digits = "".join(m.groups()).lower()
                return cls(":".join(digits[i : i + 2] for i in range(0, 12, 2)))
        raise UsageError(f"invalid MAC address {_show(text)}", "use one of " + ACCEPTED_FORMS)

    @classmethod
    def from_bytes(cls, octets: bytes) -> MacAddress:
        if len(octets) != 6:
            raise UsageError(f"a MAC address has 6 octets, not {len(octets)}", "pass exactly 6 bytes")
        return cls(octets.hex(":"))

    @property
    def octets(self) -> bytes:
        return bytes.fromhex(self.value.replace(":", ""))

    @property
    def pxelinux_name(self) -> str:
        """The per-MAC file name PXELINUX tries under pxelinux.cfg/: ARP hardware type 01, then the
        address in lowercase hex joined by dashes."""
        return "01-" + self.value.replace(":", "-")

    def __str__(self) -> str:
        return self.value


def validate_node_name(name: str) -> str:
    """Return `name` unchanged if it is a safe node name, else raise UsageError.

    The first character is never '.', so a valid name is never '.', '..' or a hidden/temp file, and it
    holds no '/', whitespace or control character: as a path component it can only name itself.
    """
    if not isinstance(name, str) or not _NODE_NAME.fullmatch(name) or ".." in name:
        shown = _show(name) if isinstance(name, str) else repr(name)
        raise UsageError(f"invalid node name {shown}", NODE_NAME_RULE)
    return name


def validate_ip(text: str) -> str:
    """Return the normalised form of an IPv4 or IPv6 address, else raise UsageError."""
    stripped = text.strip(_ASCII_WS)
    # An IPv6 zone (fe80::1%eth0) only means something on one host's interface; a fixed address handed
    # out over DHCP never has one, and the zone text would otherwise flow unchecked into config files.
    if "%" not in stripped:
        try:
            return str(ipaddress.ip_address(stripped))
        except ValueError:
            pass
    raise UsageError(
        f"invalid IP address {_show(text)}",
        "use an IPv4 address like 10.0.1.3 or an IPv6 address like fd00::3, without a zone suffix",
    )
