"""MAC addresses, node names and IP addresses: everything that reaches a file name or a config file."""

from __future__ import annotations

import os.path
from pathlib import PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imgstore.errors import UsageError
from imgstore.mac import MacAddress, validate_ip, validate_node_name

NORMAL = "00:1e:c9:2a:3b:4c"

ACCEPTED = [
    "00:1e:c9:2a:3b:4c",
    "00:1E:C9:2A:3B:4C",
    "00:1e:C9:2a:3B:4c",
    "00-1e-c9-2a-3b-4c",
    "00-1E-C9-2A-3B-4C",
    "001e.c92a.3b4c",
    "001E.C92A.3B4C",
    "001ec92a3b4c",
    "001EC92A3B4C",
    "  00:1e:c9:2a:3b:4c  ",
    "\t00-1E-C9-2A-3B-4C\n",
    "001e.c92a.3b4c\r\n",
    "\n001ec92a3b4c\n",
]

REFUSED = [
    "",
    " ",
    "\n",
    "00:1e:c9:2a:3b",  # five octets
    "00:1e:c9:2a:3b:4c:5d",  # seven octets
    "00:1e:c9:2a:3b:4",  # short last octet
    "0:1e:c9:2a:3b:4c",  # single-digit octet (dhcpd allows it, the CLI does not)
    "000:1e:c9:2a:3b:4c",
    "00:1e:c9:2a:3b:4g",  # non-hex
    "zz:zz:zz:zz:zz:zz",
    "00:1e:c9-2a:3b:4c",  # mixed separators
    "00-1e-c9-2a-3b:4c",
    "001e.c92a-3b4c",
    "001e:c92a:3b4c",  # Cisco grouping with colons
    "001ec.92a3b.4c",  # dots in the wrong places
    "00.1e.c9.2a.3b.4c",
    "00:1e:c9:2a:3b:4c:",  # trailing separator
    ":00:1e:c9:2a:3b:4c",
    "00::1e:c9:2a:3b:4c",
    "00 1e c9 2a 3b 4c",
    "001ec92a3b4",  # 11 digits
    "001ec92a3b4c0",  # 13 digits
    "0x001ec92a3b4c",
    "../001ec92a3b4c",
    "001ec92a3b4c/..",
    "00/1e/c9/2a/3b/4c",
    "00:1e:c9:2a:3b:4c/../../etc/passwd",
    "00:1e:c9\n2a:3b:4c",  # newline inside
    "00:1e:c9:2a:3b:4c\n00:1e:c9:2a:3b:4d",
    "00:1e:c9:2a:3b:4c\x00",  # NUL is not whitespace
    "\x0000:1e:c9:2a:3b:4c",
    "\x1c00:1e:c9:2a:3b:4c",  # str.strip() would eat this one
    "00:1e:c9:2a:3b:4c\u2028",
    "\uff10\uff10:1e:c9:2a:3b:4c",  # fullwidth digits
    "\u0660\u0660:1e:c9:2a:3b:4c",  # Arabic-Indic digits
    "00_1e_c9_2a_3b_4c",
    "00:1e:c9:2a:3b:4c\t#comment",
]

GROUP = [
    "ff:ff:ff:ff:ff:ff",  # broadcast
    "FF-FF-FF-FF-FF-FF",
    "01:00:5e:00:00:fb",  # IPv4 multicast (mDNS)
    "33:33:00:00:00:01",  # IPv6 multicast
    "01:80:c2:00:00:00",  # STP
    "0100.5e00.00fb",
    "03:00:00:00:00:00",
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_accepted_forms_normalise(text: str) -> None:
    mac = MacAddress.parse(text)
    assert mac.value == NORMAL
    assert str(mac) == NORMAL
    assert mac == MacAddress(NORMAL)
    assert hash(mac) == hash(MacAddress(NORMAL))


@pytest.mark.parametrize("text", REFUSED)
def test_refused_forms(text: str) -> None:
    with pytest.raises(UsageError) as exc:
        MacAddress.parse(text)
    message = str(exc.value)
    assert "\n" not in message and "\x00" not in message
    assert repr(text)[:40] in message or repr(text)[:20] in message
    assert "aa:bb:cc:dd:ee:ff" in message and "aabb.ccdd.eeff" in message and "aabbccddeeff" in message
    assert exc.value.exit_code == 2


@pytest.mark.parametrize("text", GROUP)
def test_multicast_and_broadcast_refused(text: str) -> None:
    with pytest.raises(UsageError, match="multicast or broadcast"):
        MacAddress.parse(text)


@pytest.mark.parametrize("text", ["00:00:00:00:00:00", "0000.0000.0000", "000000000000"])
def test_all_zero_refused(text: str) -> None:
    with pytest.raises(UsageError, match="00:00:00:00:00:00"):
        MacAddress.parse(text)


def test_locally_administered_unicast_is_fine() -> None:
    # qemu/libvirt NICs (52:54:00:...) and other locally administered addresses are real node NICs.
    assert MacAddress.parse("52:54:00:12:34:56").value == "52:54:00:12:34:56"
    assert MacAddress.parse("02:00:00:00:00:01").value == "02:00:00:00:00:01"


def test_very_long_value_is_shortened_in_message() -> None:
    with pytest.raises(UsageError) as exc:
        MacAddress.parse("a" * 10_000)
    assert len(str(exc.value)) < 300


def test_pxelinux_name() -> None:
    mac = MacAddress.parse("00-1E-C9-2A-3B-4C")
    assert mac.pxelinux_name == "01-00-1e-c9-2a-3b-4c"


def test_octets_and_from_bytes() -> None:
    mac = MacAddress.parse(NORMAL)
    assert mac.octets == bytes([0x00, 0x1E, 0xC9, 0x2A, 0x3B, 0x4C])
    assert MacAddress.from_bytes(mac.octets) == mac
    with pytest.raises(UsageError, match="6 octets"):
        MacAddress.from_bytes(b"\x00\x01")


@pytest.mark.parametrize(
    "value", ["00:1E:C9:2A:3B:4C", "001ec92a3b4c", " 00:1e:c9:2a:3b:4c", "ff:ff:ff:ff:ff:ff"]
)
def test_constructor_only_takes_valid_normalised_form(value: str) -> None:
    with pytest.raises(UsageError):
        MacAddress(value)


def test_frozen_and_ordered() -> None:
    a = MacAddress.parse("00:00:00:00:00:02")
    b = MacAddress.parse("00:00:00:00:01:00")
    assert sorted([b, a]) == [a, b]
    with pytest.raises(AttributeError):
        a.value = "00:00:00:00:00:04"  # type: ignore[misc]


def _forms(octets: bytes) -> list[str]:
    h = octets.hex()
    pairs = [h[i : i + 2] for i in range(0, 12, 2)]
    quads = [h[i : i + 4] for i in range(0, 12, 4)]
    forms = [":".join(pairs), "-".join(pairs), ".".join(quads), h]
    return forms + [f.upper() for f in forms] + [f" \t{f}\r\n" for f in forms]


unicast = st.binary(min_size=6, max_size=6).map(lambda b: bytes([b[0] & 0xFE]) + b[1:])


@given(unicast.filter(lambda b: b != bytes(6)))
def test_property_every_form_round_trips(octets: bytes) -> None:
    expected = octets.hex(":")
    for form in _forms(octets):
        mac = MacAddress.parse(form)
        assert mac.value == expected
        assert mac.octets == octets
        assert MacAddress.parse(str(mac)) == mac
        assert mac.pxelinux_name == "01-" + octets.hex("-")


@given(st.binary(min_size=6, max_size=6).map(lambda b: bytes([b[0] | 0x01]) + b[1:]))
def test_property_group_bit_always_refused(octets: bytes) -> None:
    for form in _forms(octets):
        with pytest.raises(UsageError):
            MacAddress.parse(form)


@given(st.text(max_size=40))
def test_property_any_text_is_refused_or_safe(text: str) -> None:
    try:
        mac = MacAddress.parse(text)
    except UsageError as exc:
        assert "\n" not in str(exc)
        return
    assert PurePosixPath(mac.pxelinux_name).parts == (mac.pxelinux_name,)
    assert all(c in "0123456789abcdef-" for c in mac.pxelinux_name)
    assert len(mac.pxelinux_name) == 20


# --- node names -------------------------------------------------------------------------------------

VALID_NAMES = ["www1", "WWW10", "a", "7", "node-01", "node_01", "www1.example.com", "www1.", "a-", "x" * 63]

INVALID_NAMES = [
    "",
    ".",
    "..",
    "../x",
    "../../etc/passwd",
    "a/b",
    "/abs",
    "a/",
    "a..b",
    "www1..",
    ".hidden",
    ".imgstore-tmp-x",
    "-rf",
    "_x",
    "a b",
    " a",
    "a ",
    "a\n",
    "a\nb",
    "\n",
    "a\x00",
    "a\x00b",
    "a\tb",
    "a\rb",
    "a\x1bb",
    "a\\b",
    "a:b",
    "a*",
    "x" * 64,
    "ww\u00e9",  # non-ASCII letter
    "\uff41",  # fullwidth a
    "\u0661",  # Arabic-Indic one
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_node_names(name: str) -> None:
    assert validate_node_name(name) is name


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_node_names(name: str) -> None:
    with pytest.raises(UsageError) as exc:
        validate_node_name(name)
    message = str(exc.value)
    assert "\n" not in message and "\x00" not in message
    assert "1-63 characters" in message
    assert repr(name)[:30] in message


def _is_only_itself(name: str) -> bool:
    base = "/srv/imgstore/nodes"
    joined = os.path.join(base, name)
    return (
        os.path.normpath(joined) == joined
        and os.path.dirname(joined) == base
        and os.path.basename(joined) == name
        and PurePosixPath(name).parts == (name,)
    )


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names_are_a_single_path_component(name: str) -> None:
    assert _is_only_itself(name)


@given(st.text(alphabet=st.sampled_from("ab1./\\-_ \n\x00.."), max_size=12) | st.text(max_size=12))
def test_property_accepted_names_act_only_as_themselves(name: str) -> None:
    try:
        validate_node_name(name)
    except UsageError:
        return
    assert "/" not in name and "\x00" not in name and ".." not in name
    assert not name.startswith(".") and not name.startswith("-")
    assert name.isascii() and name.isprintable() and " " not in name
    assert PurePosixPath(name).parts == (name,)
    assert os.path.basename(os.path.join("/srv/nodes", name)) == name
    assert os.path.normpath(os.path.join("/srv/nodes", name)).startswith("/srv/nodes/")


# --- IP addresses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("10.0.1.3", "10.0.1.3"),
        (" 10.0.1.3\n", "10.0.1.3"),
        ("FD00::0003", "fd00::3"),
        ("fd00:0:0:0:0:0:0:3", "fd00::3"),
        ("::ffff:10.0.0.1", "::ffff:a00:1"),
        ("::1", "::1"),
    ],
)
def test_valid_ip(text: str, normal: str) -> None:
    assert validate_ip(text) == normal


@pytest.mark.parametrize(
    "text",
    [
        "",
        "10.0.1.256",
        "010.0.1.3",  # leading zeros: octal to inet_aton, decimal to others
        "10.0.1",
        "10.0.1.3.4",
        "10.0.1.3/24",
        "fe80::1%eth0",
        "fe80::1%../x",
        "www1",
        "10.0.1.3\n10.0.1.4",
        "10.0.1.3;",
        "\u0661\u0660.0.0.1",
        "0x0a.0.0.1",
    ],
)
def test_invalid_ip(text: str) -> None:
    with pytest.raises(UsageError) as exc:
        validate_ip(text)
    assert "\n" not in str(exc.value)
    assert repr(text)[:20] in str(exc.value)
