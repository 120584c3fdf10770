#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into seeds/dns_answer/ and seeds/dns_wire/.

A dns_answer input is a DNS-over-TCP stream: messages, each after its 2-byte big-endian
length. A dns_wire input is one message.
"""
import ipaddress
import pathlib
import struct

A, CNAME, SOA, TXT, AAAA, OPT, CSYNC, HTTPS = 1, 5, 6, 16, 28, 41, 62, 65
RESPONSE = 0x8180  # QR, RD, RA
UPDATE = 5 << 11  # the opcode


def name(n):
    return b"".join(bytes([len(l)]) + l.encode() for l in n.split(".")) + b"\0"


def pointer(offset):
    return struct.pack(">H", 0xC000 | offset)


def rr(owner, rtype, ttl, rdata):
    return owner + struct.pack(">HHIH", rtype, 1, ttl, len(rdata)) + rdata


def message(qname, records, msg_id=0x1234, qtype=A):
    header = struct.pack(">HHHHHH", msg_id, RESPONSE, 1, len(records), 0, 0)
    return header + name(qname) + struct.pack(">HH", qtype, 1) + b"".join(records)


def a(owner, ip, ttl=300):
    return rr(owner, A, ttl, ipaddress.IPv4Address(ip).packed)


def aaaa(owner, ip, ttl=300):
    return rr(owner, AAAA, ttl, ipaddress.IPv6Address(ip).packed)


def stream(*messages):
    return b"".join(struct.pack(">H", len(m)) + m for m in messages)


Q = pointer(12)  # the question name

# app.example.com CNAME edge.example.net CNAME edge2.example.net A/AAAA, and one record
# off the chain. Offsets: the question name is at 12 (33 bytes of header and question),
# the first CNAME's data at 45.
cname_chain = message(
    "app.example.com",
    [
        rr(Q, CNAME, 300, name("edge.example.net")),
        rr(pointer(45), CNAME, 300, b"\x05edge2" + pointer(50)),
        a(pointer(75), "203.0.113.8"),
        aaaa(pointer(75), "2001:db8::8"),
        a(name("evil.example.org"), "203.0.113.66"),
    ],
)

# Bigger than a UDP answer without EDNS: many addresses and a long TXT record.
tcp_sized = message(
    "api.hcp.eastus.example.net",
    [a(Q, f"203.0.113.{i}", ttl=60 + i) for i in range(1, 41)]
    + [rr(Q, TXT, 300, b"".join(bytes([255]) + b"t" * 255 for _ in range(4)))],
)

SEEDS = {
    "a": stream(message("app.example.com", [a(Q, "203.0.113.7")])),
    "aaaa": stream(
        message("x.hcp.eastus.example.net", [aaaa(Q, "2001:db8::7")], qtype=AAAA)
    ),
    "cname_chain": stream(cname_chain),
    "tcp_sized": stream(tcp_sized),
    "unmatched": stream(message("hcp.eastus.example.net", [a(Q, "203.0.113.9")])),
    # Several answers in turn: more addresses than a name may have, an address shared by
    # two names, short TTLs that expire between answers, a name no rule allows.
    "sequence": stream(
        message("app.example.com", [a(Q, f"203.0.113.{i}", ttl=10 * i) for i in range(1, 5)]),
        message("ntp.example.org", [a(Q, "203.0.113.4", ttl=10)]),
        message("Api.HCP.eastus.example.net", [a(Q, "203.0.113.4", ttl=30)]),
        message("other.example.com", [a(Q, "203.0.113.5")]),
        message("y.hcp.eastus.example.net", [aaaa(Q, "2001:db8::4", ttl=600)]),
    ),
    # An address of two names: app's claim is evicted (max_ips_per_name is 3) while ntp's
    # holds, then ntp's expires.
    "evicted_claim": stream(
        message("app.example.com", [a(Q, "203.0.113.2", ttl=600)]),
        message("ntp.example.org", [a(Q, "203.0.113.2", ttl=10)]),
        message("app.example.com", [a(Q, f"203.0.113.{i}", ttl=600) for i in (1, 3, 4)]),
        b"",
    ),
    # More addresses in all than the learner keeps (max_ips is 5).
    "over_max_ips": stream(
        message("app.example.com", [a(Q, f"203.0.113.{i}", ttl=600) for i in range(1, 4)]),
        message("ntp.example.org", [a(Q, f"203.0.113.{i}", ttl=300) for i in range(11, 14)]),
        message("z.hcp.eastus.example.net", [a(Q, "203.0.113.21", ttl=60)]),
    ),
}



def sections(qname, answers, authority=(), additional=(), flags=RESPONSE):
    counts = (1, len(answers), len(authority), len(additional))
    header = struct.pack(">HHHHHH", 0x1234, flags, *counts)
    records = b"".join(answers) + b"".join(authority) + b"".join(additional)
    return header + name(qname) + struct.pack(">HH", A, 1) + records


def opt(rdata):
    """EDNS: owned by the root, the class the UDP payload size, the TTL extended flags."""
    return b"\0" + struct.pack(">HHIH", OPT, 1232, 0, len(rdata)) + rdata


EXAMPLE_COM = pointer(16)  # "example.com" in the question "app.example.com"

# One message each, for dns_wire: some of the above, and the record types whose data the
# decoder checks (EDNS client subnet, HTTPS parameters, SOA and CSYNC), and an UPDATE's
# empty record data.
WIRE_SEEDS = {
    "a": message("app.example.com", [a(Q, "203.0.113.7")]),
    "cname_chain": cname_chain,
    "tcp_sized": tcp_sized,
    "edns_subnet": sections(
        "app.example.com",
        [a(Q, "203.0.113.7")],
        additional=[opt(struct.pack(">HH", 8, 7) + bytes([0, 1, 24, 0, 203, 0, 113]))],
    ),
    "https": sections(
        "app.example.com",
        [
            rr(
                Q,
                HTTPS,
                300,
                struct.pack(">H", 1)
                + b"\0"
                + struct.pack(">HH", 1, 3)
                + b"\x02h2"
                + struct.pack(">HHH", 3, 2, 443)
                + struct.pack(">HH", 4, 4)
                + ipaddress.IPv4Address("203.0.113.7").packed,
            )
        ],
    ),
    "soa_csync": sections(
        "app.example.com",
        [],
        authority=[
            rr(
                EXAMPLE_COM,
                SOA,
                300,
                b"\x02ns" + EXAMPLE_COM + b"\x0ahostmaster" + EXAMPLE_COM + bytes(20),
            ),
            rr(EXAMPLE_COM, CSYNC, 300, struct.pack(">IH", 7, 3) + bytes([0, 1, 0x40])),
        ],
    ),
    "update_empty": sections("app.example.com", [rr(Q, A, 0, b"")], flags=RESPONSE | UPDATE),
}

here = pathlib.Path(__file__).parent
for target, seeds in (("dns_answer", SEEDS), ("dns_wire", WIRE_SEEDS)):
    out = here / target
    out.mkdir(exist_ok=True)
    for seed, data in seeds.items():
        (out / seed).write_bytes(data)
