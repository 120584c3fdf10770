#!/usr/bin/env python3
"""Writes the seed inputs of the dns_answer fuzz target into seeds/dns_answer/.

Each input is a DNS-over-TCP stream: messages, each after its 2-byte big-endian length.
"""
import ipaddress
import pathlib
import struct

A, CNAME, TXT, AAAA = 1, 5, 16, 28
RESPONSE = 0x8180  # QR, RD, RA


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

out = pathlib.Path(__file__).parent / "dns_answer"
out.mkdir(exist_ok=True)
for seed, data in SEEDS.items():
    (out / seed).write_bytes(data)
