"""Reading ISC dhcpd.conf host blocks and writing dhcpd/dnsmasq snippets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imgstore.dhcpd import HostEntry, export_dhcpd, export_dnsmasq, parse_dhcpd
from imgstore.errors import Conflict, UsageError
from imgstore.mac import MacAddress

# A diskless web cluster as it is really configured: global options, a subnet with a dynamic pool for
# the office, the PXE nodes in a group that sets next-server and filename, names coming from either
# the host declaration or option host-name, comments everywhere, statements crammed on one line.
WEB_CLUSTER = """\
# dhcpd.conf -- web farm, rack B
# Managed by hand; ask ops before changing.

ddns-update-style none;
default-lease-time 600; max-lease-time 7200;   # two statements, one line
authoritative;
option domain-name "web.example.com";
option domain-name-servers 10.0.0.2, 10.0.0.3;
log-facility local7;

subnet 10.0.0.0 netmask 255.255.255.0 {
  option routers 10.0.0.1;
  range 10.0.0.100 10.0.0.200;   # office laptops
  pool {
    range 10.0.0.210 10.0.0.220;
    deny unknown-clients;
  }
}

subnet 10.0.1.0 netmask 255.255.255.0 {
  option routers 10.0.1.1;
  option broadcast-address 10.0.1.255;

  group {
    next-server 10.0.1.1;            # the TFTP server
    filename "pxelinux.0";
    option root-path "10.0.1.1:/srv/nfsroot/current";  # a '#' or '{' in a "string {#" is not syntax

    host www1 {
      hardware ethernet 00:1e:c9:2a:3b:01;
      fixed-address 10.0.1.1;
    }
    host www2 { hardware ethernet 00:1E:C9:2A:3B:02; fixed-address 10.0.1.2; }
    host www3 {
      hardware ethernet 00:1e:c9:2a:3b:03;   # replaced NIC 2023-04
      fixed-address 10.0.1.3;
      option host-name "www3";
    }
    host node-b04 {
      # named after its rack slot; the node calls itself www4
      option host-name "www4";
      hardware ethernet
        00:1e:c9:2a:3b:04;
      fixed-address
        10.0.1.4;
    }
    host www5 { hardware ethernet 0:1e:c9:2a:3b:5; fixed-address 10.0.1.5; }  # dhcpd allows 1-digit octets
    host www6 {
      hardware ethernet 00:1e:c9:2a:3b:06; fixed-address www6.web.example.com;
    }
    host www7 { hardware ethernet 00:1e:c9:2a:3b:07; }
    host www8 {
      hardware ethernet 00:1e:c9:2a:3b:08;
      fixed-address 10.0.1.8, 10.0.2.8;
    }
    host www9 {
      hardware ethernet 00:1e:c9:2a:3b:09;
      fixed-address 10.0.1.9;
      option host-name "www9";
    }
    # www10 came last, after the rack was extended
    host www10 {
      hardware ethernet 00:1e:c9:2a:3b:0a;
      fixed-address 10.0.1.10;
    }
  }

  host printer {   # no hardware line yet: skipped with a warning
    fixed-address 10.0.1.250;
  }
}
"""


def _line_of(fragment: str) -> int:
    return next(n for n, line in enumerate(WEB_CLUSTER.splitlines(), 1) if fragment in line)


def test_web_cluster() -> None:
    hosts, warnings = parse_dhcpd(WEB_CLUSTER, "rackb.conf")
    assert [h.name for h in hosts] == [f"www{i}" for i in range(1, 11)]
    assert [str(h.mac) for h in hosts] == [f"00:1e:c9:2a:3b:{i:02x}" for i in range(1, 11)]
    ips = {h.name: h.ip for h in hosts}
    assert ips["www1"] == "10.0.1.1"
    assert ips["www4"] == "10.0.1.4"
    assert ips["www5"] == "10.0.1.5"
    assert ips["www6"] == "www6.web.example.com"  # a host name is kept as given
    assert ips["www7"] is None
    assert ips["www8"] == "10.0.1.8"
    assert ips["www10"] == "10.0.1.10"
    assert len(warnings) == 2
    assert warnings[0].startswith(f"rackb.conf:{_line_of('10.0.1.8, 10.0.2.8')}: host www8: only the first")
    assert warnings[1].startswith(f"rackb.conf:{_line_of('host printer')}: host printer has no 'hardware")
    assert all("\n" not in w for w in warnings)


def test_web_cluster_with_crlf_line_endings() -> None:
    hosts, warnings = parse_dhcpd(WEB_CLUSTER.replace("\n", "\r\n"))
    assert len(hosts) == 10 and len(warnings) == 2


def test_host_name_option_overrides_declaration_name() -> None:
    hosts, _ = parse_dhcpd('host a { option host-name "b"; hardware ethernet 00:00:00:00:00:01; }')
    assert hosts == [HostEntry("b", MacAddress.parse("00:00:00:00:00:01"))]


def test_host_outside_any_block_and_deeply_nested() -> None:
    text = "host top { hardware ethernet 02:00:00:00:00:01; }\n"
    text += "shared-network net { subnet 10.9.0.0 netmask 255.255.0.0 { group { group { pool { "
    text += "host deep { hardware ethernet 02:00:00:00:00:02; fixed-address 10.9.0.2; } } } } } }\n"
    hosts, _ = parse_dhcpd(text)
    assert [(h.name, h.ip) for h in hosts] == [("top", None), ("deep", "10.9.0.2")]


def test_ten_thousand_nested_groups_are_not_a_recursion_error() -> None:
    depth = 10_000
    text = "group {\n" * depth + "host x { hardware ethernet 02:00:00:00:00:01; }\n" + "}\n" * depth
    hosts, _ = parse_dhcpd(text)
    assert [h.name for h in hosts] == ["x"]
    with pytest.raises(UsageError, match=r"dhcpd.conf:10000: block 'group' \{ is never closed"):
        parse_dhcpd("group {\n" * depth)


def test_keywords_are_case_insensitive_and_everything_else_ignored() -> None:
    text = """
    class "pxeclients" { match if substring (option vendor-class-identifier, 0, 9) = "PXEClient"; }
    if exists user-class and option user-class = "iPXE" { filename "boot.ipxe"; }
    else { filename "undionly.kpxe"; }
    HOST web { HARDWARE ETHERNET 02:00:00:00:00:01; Fixed-Address 10.0.0.1; OPTION Host-Name "web"; }
    on commit { set clip = binary-to-ascii(10, 8, ".", leased-address); }
    """
    hosts, warnings = parse_dhcpd(text)
    assert hosts == [HostEntry("web", MacAddress.parse("02:00:00:00:00:01"), "10.0.0.1")]
    assert warnings == []


def test_hash_inside_string_is_not_a_comment_and_escapes() -> None:
    text = 'host a { option host-name "w\\"x#y"; hardware ethernet 02:00:00:00:00:01; }\n'
    text += 'host b { option host-name "www#2"; hardware ethernet 02:00:00:00:00:02; }  # real comment {'
    hosts, warnings = parse_dhcpd(text)
    assert hosts == []
    assert len(warnings) == 2 and all("invalid node name" in w for w in warnings)
    assert "'w\"x#y'" in warnings[0]


def test_host_name_with_escaped_string_that_is_valid() -> None:
    hosts, _ = parse_dhcpd('host a { option host-name "w\\ww1"; hardware ethernet 02:00:00:00:00:01; }')
    assert hosts[0].name == "www1"


def test_other_hardware_types_and_include_warn() -> None:
    text = """
    include "/etc/dhcp/more-hosts.conf";
    host tr { hardware token-ring 02:00:00:00:00:01; }
    host e { hardware ethernet 02:00:00:00:00:02; }
    """
    hosts, warnings = parse_dhcpd(text, "x.conf")
    assert [h.name for h in hosts] == ["e"]
    assert warnings[0].startswith("x.conf:2:") and "more-hosts.conf" in warnings[0]
    assert warnings[1].startswith("x.conf:3:") and "token-ring" in warnings[1]
    assert warnings[2].startswith("x.conf:3:") and "no 'hardware ethernet'" in warnings[2]


@pytest.mark.parametrize(
    "host_name",
    ["../x", "a/b", ".", "..", "a\nb", "a b", "-rf", "a\x00b", "x" * 64, "..\\x", "/etc/passwd"],
)
def test_names_trying_path_injection_are_skipped_with_a_one_line_warning(host_name: str) -> None:
    quoted = host_name.replace("\\", "\\\\").replace('"', '\\"')
    text = f'host ok {{ hardware ethernet 02:00:00:00:00:01; }}\nhost evil {{ option host-name "{quoted}";\n'
    text += "hardware ethernet 02:00:00:00:00:02; }\n"
    hosts, warnings = parse_dhcpd(text, "in.conf")
    assert [h.name for h in hosts] == ["ok"]
    assert len(warnings) == 1
    assert warnings[0].startswith("in.conf:2: host evil: invalid node name")
    assert "\n" not in warnings[0] and "\x00" not in warnings[0]


def test_declaration_names_with_control_characters_are_shown_escaped() -> None:
    text = 'host "a\nb" { hardware ethernet 02:00:00:00:00:01; }\nhost "c\x1b[2J" { fixed-address 1.2.3.4; }'
    hosts, warnings = parse_dhcpd(text)
    assert hosts == []
    assert len(warnings) == 2
    assert all("\n" not in w and "\x1b" not in w for w in warnings)


SYNTAX_ERRORS = [
    # (text, line, fragment of the message)
    ("group {\n  host a { hardware ethernet 02:00:00:00:00:01; }\n", 1, "never closed; expected '}'"),
    ("host a {\n  hardware ethernet 02:00:00:00:00:01;\n", 1, "never closed"),
    ("host a { hardware ethernet 02:00:00:00:00:01; }\n}\n", 2, "'}' closes no open block"),
    ("}", 1, "closes no open block"),
    ("host a {\n  hardware ethernet 02:00:00:00:00:01\n}\n", 2, "expected ';'"),
    ("host a {\n  hardware ethernet 02:00:00:00:00:01;\n  fixed-address 10.0.0.1\n}", 3, "expected ';'"),
    ("ddns-update-style none", 1, "expected ';' after 'ddns-update-style none' at end of file"),
    ('option domain-name "x;\n\n', 1, "string is never closed"),
    ("host a {\n  hardware ethernet 02:00:00:00:00:zz;\n}", 2, "invalid MAC address '02:00:00:00:00:zz'"),
    ("host a {\n  hardware ethernet 02:00:00:00:00;\n}", 2, "invalid MAC address"),
    ("host a {\n  hardware ethernet ../../x;\n}", 2, "invalid MAC address"),
    ("host a {\n\n hardware ethernet ff:ff:ff:ff:ff:ff; }", 3, "multicast or broadcast"),
    ("host a {\n  hardware ethernet 00:00:00:00:00:00;\n}", 2, "not a real NIC address"),
    (
        "host a {\n  hardware ethernet 02:00:00:00:00:01 02:00:00:00:00:02;\n}",
        2,
        "expected 'hardware ethernet",
    ),
    ("host a { hardware ethernet; }", 1, "expected 'hardware ethernet MAC;'"),
    (
        "host a { hardware ethernet 02:00:00:00:00:01; fixed-address 10.0.0.1,; }",
        1,
        "expected 'fixed-address",
    ),
    ("host a { hardware ethernet 02:00:00:00:00:01; fixed-address; }", 1, "expected 'fixed-address"),
    ("host a { hardware ethernet 02:00:00:00:00:01; fixed-address 10.0.0.1 10.0.0.2; }", 1, "fixed-address"),
    ("host a {\n hardware ethernet 02:00:00:00:00:01;\n fixed-address 10.0.1.300; }", 3, "neither an IP"),
    ('host a { hardware ethernet 02:00:00:00:00:01; fixed-address "10.0.0.1"; }', 1, "fixed-address"),
    ("host a { hardware ethernet 02:00:00:00:00:01; option host-name; }", 1, "option host-name"),
    ("host { hardware ethernet 02:00:00:00:00:01; }", 1, "expected 'host NAME {'"),
    ("host a b { hardware ethernet 02:00:00:00:00:01; }", 1, "expected 'host NAME {'"),
    ("\n\nhost a;\n", 3, "expected '{' after 'host a'"),
]


@pytest.mark.parametrize(("text", "line", "fragment"), SYNTAX_ERRORS)
def test_syntax_errors_name_source_line_and_what_was_expected(text: str, line: int, fragment: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse_dhcpd(text, "/etc/dhcp/dhcpd.conf")
    message = str(exc.value)
    assert message.startswith(f"/etc/dhcp/dhcpd.conf:{line}: "), message
    assert fragment in message, message
    assert "\n" not in message


def test_duplicate_mac_is_a_conflict_naming_both_lines() -> None:
    text = (
        "host a { hardware ethernet 02:00:00:00:00:01; }\n\nhost b { hardware ethernet 02-00-00-00-00-01; }\n"
    )
    with pytest.raises(Conflict) as exc:
        parse_dhcpd(text, "d.conf")
    message = str(exc.value)
    assert "d.conf:3" in message and "d.conf:1" in message and "02:00:00:00:00:01" in message
    assert exc.value.exit_code == 8


def test_duplicate_node_name_is_a_conflict() -> None:
    text = "host a { hardware ethernet 02:00:00:00:00:01; }\nhost b { hardware ethernet 02:00:00:00:00:02;"
    text += ' option host-name "a"; }'
    with pytest.raises(Conflict, match=r"d.conf:2: node name a .* at d.conf:1"):
        parse_dhcpd(text, "d.conf")


def test_empty_and_comment_only_files() -> None:
    assert parse_dhcpd("") == ([], [])
    assert parse_dhcpd("# nothing here\n   \n# {\n") == ([], [])
    assert parse_dhcpd(";;;\n{ }") == ([], [])


# --- HostEntry ---------------------------------------------------------------------------------------


def test_host_entry_validates_and_normalises() -> None:
    mac = MacAddress.parse("02:00:00:00:00:01")
    assert HostEntry("www1", mac, "FD00::0001").ip == "fd00::1"
    assert HostEntry("www1", mac, "www1.example.com").ip == "www1.example.com"
    with pytest.raises(UsageError, match="invalid node name"):
        HostEntry("../www1", mac)
    with pytest.raises(UsageError, match="neither an IP address nor a host name"):
        HostEntry("www1", mac, "10.0.0.1; evil")
    with pytest.raises(UsageError, match="not a MacAddress"):
        HostEntry("www1", "02:00:00:00:00:01", None)  # type: ignore[arg-type]


# --- export ----------------------------------------------------------------------------------------


def _cluster() -> list[HostEntry]:
    return [
        HostEntry(f"www{i}", MacAddress.parse(f"00:1e:c9:2a:3b:{i:02x}"), f"10.0.1.{i}") for i in range(1, 11)
    ]


def test_export_dhcpd_text() -> None:
    text = export_dhcpd(_cluster()[:2], "10.0.1.1")
    assert text == (
        "# Generated by imgstore: PXE boot for 2 node(s).\n"
        '# Include it from dhcpd.conf with: include "/path/to/this/file";\n'
        "group {\n"
        "  next-server 10.0.1.1;\n"
        '  filename "pxelinux.0";\n'
        "\n"
        "  host www1 {\n"
        "    hardware ethernet 00:1e:c9:2a:3b:01;\n"
        "    fixed-address 10.0.1.1;\n"
        '    option host-name "www1";\n'
        "  }\n"
        "\n"
        "  host www2 {\n"
        "    hardware ethernet 00:1e:c9:2a:3b:02;\n"
        "    fixed-address 10.0.1.2;\n"
        '    option host-name "www2";\n'
        "  }\n"
        "}\n"
    )


def test_export_dhcpd_round_trips() -> None:
    hosts = _cluster()
    hosts[6] = HostEntry("www7", hosts[6].mac, None)
    hosts[5] = HostEntry("www6", hosts[5].mac, "www6.web.example.com")
    text = export_dhcpd(hosts, "tftp.web.example.com", "bios/pxelinux.0")
    assert 'filename "bios/pxelinux.0";' in text and "next-server tftp.web.example.com;" in text
    assert parse_dhcpd(text) == (hosts, [])


def test_import_export_import_of_the_web_cluster() -> None:
    hosts, _ = parse_dhcpd(WEB_CLUSTER)
    assert parse_dhcpd(export_dhcpd(hosts, "10.0.1.1")) == (hosts, [])


def test_export_dhcpd_odd_names_get_a_mac_declaration_name_and_keep_their_node_name() -> None:
    hosts = [
        HostEntry("www1.", MacAddress.parse("02:00:00:00:00:01")),
        HostEntry("a._b", MacAddress.parse("02:00:00:00:00:02")),
        HostEntry("a.-b", MacAddress.parse("02:00:00:00:00:03")),
    ]
    text = export_dhcpd(hosts, "10.0.0.1")
    assert "host node-020000000001 {" in text and 'option host-name "www1.";' in text
    assert "host node-020000000002 {" in text and "host node-020000000003 {" in text
    assert parse_dhcpd(text) == (hosts, [])


def test_export_dhcpd_refusals() -> None:
    hosts = _cluster()[:1]
    for server in ["", "10.0.0.1; evil", "tftp server", "10.0.0.300", "tftp\n"]:
        with pytest.raises(UsageError, match="neither an IP address nor a host name"):
            export_dhcpd(hosts, server)
    with pytest.raises(UsageError, match="IPv6.*DHCPv4"):
        export_dhcpd(hosts, "fd00::1")
    with pytest.raises(UsageError, match="IPv6.*DHCPv4"):
        export_dhcpd([HostEntry("v6", MacAddress.parse("02:00:00:00:00:01"), "fd00::5")], "10.0.0.1")
    for filename in ["", 'pxe"linux.0', "pxe\\linux.0", "pxelinux.0\n", "p\x00", "x" * 128, "pxé"]:
        with pytest.raises(UsageError, match="invalid boot file name"):
            export_dhcpd(hosts, "10.0.0.1", filename)
    assert 'filename "' + "x" * 127 + '";' in export_dhcpd(hosts, "10.0.0.1", "x" * 127)


def test_exports_refuse_duplicates() -> None:
    a = HostEntry("a", MacAddress.parse("02:00:00:00:00:01"))
    b = HostEntry("b", MacAddress.parse("02:00:00:00:00:01"))
    c = HostEntry("a", MacAddress.parse("02:00:00:00:00:02"))
    for bad in ([a, b], [a, c]):
        with pytest.raises(Conflict, match="entry 2"):
            export_dhcpd(bad, "10.0.0.1")
        with pytest.raises(Conflict, match="entry 2"):
            export_dnsmasq(bad)


def test_export_dnsmasq() -> None:
    hosts = _cluster()[:3]
    hosts[1] = HostEntry("www2", hosts[1].mac, None)
    hosts.append(HostEntry("v6node", MacAddress.parse("02:00:00:00:00:06"), "fd00::6"))
    text = export_dnsmasq(hosts)
    lines = text.splitlines()
    assert lines[0].startswith("# Generated by imgstore") and lines[1].startswith("#")
    assert lines[2:] == [
        "dhcp-host=00:1e:c9:2a:3b:01,10.0.1.1,www1",
        "dhcp-host=00:1e:c9:2a:3b:02,www2",
        "dhcp-host=00:1e:c9:2a:3b:03,10.0.1.3,www3",
        "dhcp-host=02:00:00:00:00:06,[fd00::6],v6node",
    ]
    assert text.endswith("\n")


def test_export_dnsmasq_refusals() -> None:
    mac = MacAddress.parse("02:00:00:00:00:01")
    with pytest.raises(UsageError, match="dnsmasq needs an IP address"):
        export_dnsmasq([HostEntry("www6", mac, "www6.example.com")])
    for name in ["1234", "12h", "10.0.0.1", "10.1", "0x0a", "infinite", "IGNORE"]:
        with pytest.raises(UsageError, match="read by dnsmasq as an address, lease time or keyword"):
            export_dnsmasq([HostEntry(name, mac)])
    assert export_dnsmasq([HostEntry("h12", mac)]).endswith("dhcp-host=02:00:00:00:00:01,h12\n")


def test_exports_of_nothing() -> None:
    assert parse_dhcpd(export_dhcpd([], "10.0.0.1")) == ([], [])
    assert export_dnsmasq([]).count("\n") == 2


# --- properties ----------------------------------------------------------------------------------

_unicast_mac = st.binary(min_size=6, max_size=6).filter(lambda b: not b[0] & 1 and b != bytes(6))
_name = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}(\.[a-z0-9][a-z0-9_-]{0,10}){0,2}\.?", fullmatch=True)
_ipv4 = st.ip_addresses(v=4).map(str)


@st.composite
def _host_lists(draw: st.DrawFn) -> list[HostEntry]:
    macs = draw(st.lists(_unicast_mac, max_size=8, unique=True))
    names = draw(st.lists(_name, min_size=len(macs), max_size=len(macs), unique=True))
    return [
        HostEntry(n, MacAddress.from_bytes(m), draw(st.none() | _ipv4))
        for n, m in zip(names, macs, strict=True)
    ]


@given(_host_lists())
def test_property_export_dhcpd_round_trips(hosts: list[HostEntry]) -> None:
    assert parse_dhcpd(export_dhcpd(hosts, "10.0.0.1")) == (hosts, [])


@given(_host_lists())
def test_property_export_dnsmasq_has_one_line_per_host(hosts: list[HostEntry]) -> None:
    try:
        text = export_dnsmasq(hosts)
    except UsageError as exc:
        assert "dnsmasq" in str(exc)
        return
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert len(lines) == len(hosts)
    for line, h in zip(lines, hosts, strict=True):
        fields = line.removeprefix("dhcp-host=").split(",")
        assert fields[0] == str(h.mac) and fields[-1] == h.name
        assert fields[1:-1] == ([h.ip] if h.ip else [])


@given(st.text(alphabet=st.sampled_from('host{};,"#\\ \n\tab0:.-'), max_size=80))
def test_property_any_text_parses_or_raises_usage_error(text: str) -> None:
    try:
        hosts, warnings = parse_dhcpd(text)
    except (UsageError, Conflict) as exc:
        assert "\n" not in str(exc)
        return
    assert all("\n" not in w for w in warnings)
    assert all(isinstance(h, HostEntry) for h in hosts)
