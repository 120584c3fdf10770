//! What the BPF_PROG_TEST_RUN verdict tests share: the test policy loaded into an enforcer,
//! and the kit's crafted frames. Each test file uses a part of it.
#![allow(dead_code)]

use egress_agent::{
    compile::{compile, settings},
    loader::Enforcer,
    policy::{Mode, parse},
};

pub const PASS: u32 = 1;
pub const DROP: u32 = 0;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

pub const POLICY: &str = "
allow:
  - cidr: 203.0.113.0/24
    ports: [HTTPS:443, UDP:123]
  - cidr: 203.0.113.128/25
    ports: [TCP:8080]
  - cidr: 2001:db8:2::/48
    ports: [TCP:443]
  - cidr: 198.51.100.200
  - fqdn: app.example.com
    ports: [TCP:443]
";

pub fn enforcer(mode: Mode) -> Enforcer {
    let policy = parse(POLICY, "verdict-test.yaml").expect("test policy parses");
    let mut e = Enforcer::load_for_test_run(&settings(mode, &policy.dns), policy.dns.max_ips)
        .expect("kernel object loads");
    e.write_policy(&compile(&policy).expect("test policy compiles"))
        .expect("maps accept the policy");
    e
}

pub fn run(e: &Enforcer, program: &'static str, frame: &[u8]) -> u32 {
    e.test_run(program, frame, 1)
        .expect("test run")
        .return_value
}

pub use egress_test_support::frame::*;

pub fn ip(s: &str) -> std::net::IpAddr {
    s.parse().expect("address literal")
}
