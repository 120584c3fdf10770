//! The `aks-global` preset end to end, as the Azure article "Control egress traffic for
//! cluster nodes in Azure Kubernetes Service (AKS)" expects it: the real agent enforces a
//! policy of a few lines (the preset for region `eastus`, the API server, the cluster's
//! CIDRs) on a test cgroup, and a DNS server in the server namespace (dnsmasq) answers
//! the article's names, and names the preset must not allow, each with an address of its
//! own where echo servers listen.
//!
//! Names pass only on their table's ports once resolved through the trusted resolver;
//! another region's `*.hcp` name, the zone's apex, names of no table and names of an
//! optional group the policy leaves out are dropped. With the kubelet's kubeconfig naming
//! the cluster's API server, another API server of the region is dropped too. The Azure
//! platform addresses (168.63.129.16, 169.254.169.254) are real addresses outside the
//! test's namespaces, so they are never sent to: `check` and `presets show` must list them.
//!
//! Like `dns.rs`, every test ends by checking that exactly the expected flows were
//! reported (a first SYN lost to a name learned too late would be one more), and the
//! agent's DNS counters.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;

use egress_tests::dns::{DnsCounters, Lookup, Record, Resolved};
use egress_tests::world::{Setup, World, assert_connects, assert_resolved_but_dropped};
use egress_tests::{
    SERVER_V4, SERVER_V6, TempFile, agent_bin, assert_eperm, assert_ok, assert_timeout,
    require_root, tcp, udp,
};

const LOCATION: &str = "eastus";

const HTTPS: u16 = 443;
const HTTP: u16 = 80;
const SSH: u16 = 22;
/// The tunnel ports of `*.hcp`/`*.tun` and the API server, besides 443 and 22.
const TUNNEL_TCP: u16 = 9000;
const TUNNEL_UDP: u16 = 1194;
const NTP: u16 = 123;
/// A port no rule of the policy names: the kubelet's, reached inside the cluster.
const KUBELET: u16 = 10250;
/// Another port no rule names, for UDP inside the cluster (VXLAN).
const VXLAN: u16 = 4789;
/// Every port a TCP echo server listens on, on every address of the server namespace.
const TCP_PORTS: [u16; 6] = [HTTPS, HTTP, SSH, TUNNEL_TCP, NTP, KUBELET];

/// TTL of dnsmasq's answers: far shorter than the test, so that the connections made
/// after it are allowed by `dns.min_ttl`, as on a node behind a resolver with short TTLs.
const TTL: u32 = 1;
/// The policy's floor under [`TTL`]: longer than any test.
const MIN_TTL: u32 = 600;

/// The cluster's API server (`api_server`): TCP 443, 22, 9000 and UDP 1194 only.
const API_SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
/// `cluster_cidrs`: every port. Neither holds a name's address, the API server, the
/// remotes of the topology nor the veth addresses (198.51.100.0/24, where the resolver
/// is), so everything else in the tests is decided by the preset and `api_server`.
const CLUSTER_CIDR_V4: &str = "203.0.113.128/25";
const CLUSTER_CIDR_V6: &str = "2001:db8:3::/64";
/// A pod, node or service inside the cluster CIDRs.
const IN_CLUSTER_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 200);
const IN_CLUSTER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 0x200);
/// The address just below [`CLUSTER_CIDR_V4`].
const OUTSIDE_CLUSTER_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 127);

/// An allowed name of the `aks-global` table (for `eastus`) and its own address.
struct Name {
    name: &'static str,
    v4: Ipv4Addr,
    /// The table's ports, as the agent prints them.
    ports: &'static str,
}

const TUNNEL_PORTS: &str = "TCP:22 TCP:443 TCP:9000 UDP:1194";
const HTTPS_ONLY: &str = "TCP:443";

/// `mcr.microsoft.com` answers through a CNAME chain, like the real one.
const MCR: Name = Name {
    name: "mcr.microsoft.com",
    v4: Ipv4Addr::new(203, 0, 113, 31),
    ports: HTTPS_ONLY,
};
const MCR_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x31);
const MCR_CNAME: &str = "mcr-microsoft-com.a-0016.a-msedge.net";
const MCR_EDGE: &str = "a-0016.a-msedge.net";
/// `*.hcp.<location>.azmk8s.io`: the API server's name, with the tunnel's ports.
const HCP: Name = Name {
    name: "abc.hcp.eastus.azmk8s.io",
    v4: Ipv4Addr::new(203, 0, 113, 41),
    ports: TUNNEL_PORTS,
};
const TUN: Name = Name {
    name: "abc.tun.eastus.azmk8s.io",
    v4: Ipv4Addr::new(203, 0, 113, 42),
    ports: TUNNEL_PORTS,
};
const NTP_UBUNTU: Name = Name {
    name: "ntp.ubuntu.com",
    v4: Ipv4Addr::new(203, 0, 113, 43),
    ports: "UDP:123",
};
/// The table's other HTTPS names (and an instance of each wildcard among them).
const HTTPS_NAMES: [Name; 6] = [
    Name {
        name: "eastus.data.mcr.microsoft.com",
        v4: Ipv4Addr::new(203, 0, 113, 32),
        ports: HTTPS_ONLY,
    },
    Name {
        name: "abc.cdn.mscr.io",
        v4: Ipv4Addr::new(203, 0, 113, 33),
        ports: HTTPS_ONLY,
    },
    Name {
        name: "management.azure.com",
        v4: Ipv4Addr::new(203, 0, 113, 34),
        ports: HTTPS_ONLY,
    },
    Name {
        name: "login.microsoftonline.com",
        v4: Ipv4Addr::new(203, 0, 113, 35),
        ports: HTTPS_ONLY,
    },
    Name {
        name: "packages.microsoft.com",
        v4: Ipv4Addr::new(203, 0, 113, 36),
        ports: HTTPS_ONLY,
    },
    Name {
        name: "acs-mirror.azureedge.net",
        v4: Ipv4Addr::new(203, 0, 113, 37),
        ports: HTTPS_ONLY,
    },
];

/// Another API server of the cluster's region, and its address: allowed by the regional
/// wildcard, dropped once the kubelet's kubeconfig names the cluster's own.
const OTHER_HCP: (&str, Ipv4Addr) = (
    "attacker.hcp.eastus.azmk8s.io",
    Ipv4Addr::new(203, 0, 113, 44),
);

/// Names the policy must not allow, each with its own address, and the port a node
/// would use for it.
const DROPPED: [(&str, Ipv4Addr, u16); 4] = [
    // Another region's API server.
    (
        "abc.hcp.westus.azmk8s.io",
        Ipv4Addr::new(203, 0, 113, 51),
        HTTPS,
    ),
    // The zone's apex: `*.zone` never matches `zone` itself.
    (
        "hcp.eastus.azmk8s.io",
        Ipv4Addr::new(203, 0, 113, 52),
        HTTPS,
    ),
    // No table's name.
    ("evil.example.com", Ipv4Addr::new(203, 0, 113, 53), HTTPS),
    // Only in the optional `ubuntu-updates` group (HTTP), which the policy leaves out.
    ("security.ubuntu.com", Ipv4Addr::new(203, 0, 113, 54), HTTP),
];

/// The whole policy: a few lines for a locked-down AKS node.
fn policy() -> String {
    format!(
        "\
mode: enforce
presets: [{{name: aks-global, location: {LOCATION}}}]
api_server: {API_SERVER}
cluster_cidrs: [\"{CLUSTER_CIDR_V4}\", \"{CLUSTER_CIDR_V6}\"]
dns:
  resolvers: [\"{SERVER_V4}\", \"{SERVER_V6}\"]
  min_ttl: {MIN_TTL}
"
    )
}

/// Every rule the preset adds for [`LOCATION`] (`rule ports`, origin), including the
/// Azure platform addresses, which the test never sends to.
fn preset_rules() -> Vec<(String, &'static str)> {
    let preset = "preset aks-global";
    let mut rules: Vec<(String, &str)> = [
        ("*.hcp.eastus.azmk8s.io", TUNNEL_PORTS),
        ("*.tun.eastus.azmk8s.io", TUNNEL_PORTS),
        ("*.cdn.mscr.io", HTTPS_ONLY),
        ("mcr.microsoft.com", HTTPS_ONLY),
        ("*.data.mcr.microsoft.com", HTTPS_ONLY),
        ("management.azure.com", HTTPS_ONLY),
        ("login.microsoftonline.com", HTTPS_ONLY),
        ("ntp.ubuntu.com", "UDP:123"),
        ("packages.microsoft.com", HTTPS_ONLY),
        ("acs-mirror.azureedge.net", HTTPS_ONLY),
    ]
    .iter()
    .map(|(name, ports)| (format!("{name} {ports}"), preset))
    .collect();
    rules.push(("168.63.129.16/32 any".into(), "azure platform"));
    rules.push(("169.254.169.254/32 TCP:80".into(), "azure platform"));
    rules
}

/// Every record dnsmasq serves: the allowed names, `mcr.microsoft.com`'s chain and
/// IPv6 address, and the names to drop.
fn records() -> Vec<Record<'static>> {
    let mut records = vec![
        Record::Cname(MCR.name, MCR_CNAME),
        Record::Cname(MCR_CNAME, MCR_EDGE),
        Record::Host(MCR_EDGE, MCR.v4.into()),
        Record::Host(MCR_EDGE, MCR_V6.into()),
    ];
    for name in [&HCP, &TUN, &NTP_UBUNTU].into_iter().chain(&HTTPS_NAMES) {
        records.push(Record::Host(name.name, name.v4.into()));
    }
    for (name, addr, _) in DROPPED {
        records.push(Record::Host(name, addr.into()));
    }
    records.push(Record::Host(OTHER_HCP.0, OTHER_HCP.1.into()));
    records
}

/// One test's world, with no kubelet's kubeconfig: the preset keeps its regional wildcard.
fn start() -> World {
    start_with_kubeconfig(None)
}

/// One test's world: the topology with every address of [`records`], the API server and
/// the cluster's hosts; TCP echo servers on [`TCP_PORTS`] of every address, UDP echo
/// servers where the tests expect UDP to pass; dnsmasq; a fresh cgroup and the agent
/// enforcing [`policy`] on it (the policy's own mode: enforce), reading `kubeconfig` as
/// the kubelet's.
fn start_with_kubeconfig(kubeconfig: Option<&str>) -> World {
    let kubeconfig = kubeconfig.map(TempFile::new);
    let kubeconfig_path = kubeconfig.as_ref().map_or(NO_KUBECONFIG.to_owned(), |k| {
        k.path().to_str().expect("temp paths are UTF-8").to_owned()
    });
    let udp_servers: [(IpAddr, u16); 5] = [
        (HCP.v4.into(), TUNNEL_UDP),
        (TUN.v4.into(), TUNNEL_UDP),
        (API_SERVER.into(), TUNNEL_UDP),
        (NTP_UBUNTU.v4.into(), NTP),
        (IN_CLUSTER_V4.into(), VXLAN),
    ];
    World::start(Setup {
        policy: &policy(),
        mode: None,
        records: &records(),
        ttl: TTL,
        remotes: &[
            API_SERVER.into(),
            IN_CLUSTER_V4.into(),
            IN_CLUSTER_V6.into(),
            OUTSIDE_CLUSTER_V4.into(),
        ],
        tcp_ports: &TCP_PORTS,
        udp: &udp_servers,
        agent_args: &["--kubeconfig", &kubeconfig_path],
        files: kubeconfig.into_iter().collect(),
    })
}

/// `resolve-connect` from the cgroup, asking dnsmasq over IPv4.
fn resolve(env: &World, name: &str, port: u16) -> Resolved {
    env.resolve(Lookup::a(name, SERVER_V4), port)
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn aks_global_allows_the_regions_names_on_their_table_ports_only() {
    if !require_root() {
        return;
    }
    let mut env = start();

    // Required names, resolved and connected to at once on their table's port.
    for name in HTTPS_NAMES.iter().chain([&MCR]) {
        assert_connects(&resolve(&env, name.name, HTTPS), name.v4, name.name);
    }
    assert_connects(
        &env.resolve(Lookup::aaaa(MCR.name, SERVER_V6), HTTPS),
        MCR_V6,
        "mcr.microsoft.com over IPv6",
    );
    // The region's API server names: 443, 22 and 9000 over TCP, 1194 over UDP.
    assert_connects(&resolve(&env, HCP.name, HTTPS), HCP.v4, HCP.name);
    assert_connects(&resolve(&env, TUN.name, SSH), TUN.v4, TUN.name);
    // ntp.ubuntu.com is allowed on UDP 123 only: the lookup teaches its address, the TCP
    // connection to the same port number is dropped, the NTP datagram passes.
    assert_resolved_but_dropped(
        &resolve(&env, NTP_UBUNTU.name, NTP),
        NTP_UBUNTU.v4,
        "ntp.ubuntu.com over TCP",
    );
    assert_ok(&env.send(NTP_UBUNTU.v4, NTP), "ntp.ubuntu.com UDP 123");

    let allowed: Vec<(&Name, IpAddr)> = HTTPS_NAMES
        .iter()
        .chain([&MCR, &HCP, &TUN, &NTP_UBUNTU])
        .map(|name| (name, IpAddr::from(name.v4)))
        .chain([(&MCR, MCR_V6.into())])
        .collect();
    for (name, addr) in &allowed {
        let learned = env.agent.wait_learned(name.name, *addr);
        assert_eq!(learned["ports"], name.ports, "{learned}");
        assert_eq!(learned["ttl"], TTL, "{learned}");
    }

    // The names that must not pass: resolved (DNS itself passes), then dropped.
    for (name, addr, port) in DROPPED {
        assert_resolved_but_dropped(&resolve(&env, name, port), addr, name);
    }

    // Seconds after the 1-second TTLs ran out, the learned addresses still pass on their
    // ports (min_ttl), and on those only.
    for (addr, port) in [(HCP.v4, SSH), (TUN.v4, HTTPS)] {
        assert_ok(&env.connect(addr, port), &format!("{addr} TCP {port}"));
    }
    for addr in [HCP.v4, TUN.v4] {
        assert_ok(
            &env.connect(addr, TUNNEL_TCP),
            &format!("{addr} TCP {TUNNEL_TCP}"),
        );
        assert_ok(
            &env.send(addr, TUNNEL_UDP),
            &format!("{addr} UDP {TUNNEL_UDP}"),
        );
    }
    assert_ok(&env.connect(MCR.v4, HTTPS), "mcr.microsoft.com again");
    assert_ok(&env.send(NTP_UBUNTU.v4, NTP), "ntp.ubuntu.com again");
    assert_timeout(&env.connect(MCR.v4, HTTP), "mcr.microsoft.com TCP 80");
    assert_timeout(
        &env.connect(MCR_V6, HTTP),
        "mcr.microsoft.com TCP 80 (IPv6)",
    );
    assert_timeout(&env.connect(HCP.v4, HTTP), "the hcp name on TCP 80");
    assert_eperm(&env.send(HCP.v4, NTP), "the hcp name on UDP 123");
    assert_eperm(
        &env.send(NTP_UBUNTU.v4, TUNNEL_UDP),
        "ntp.ubuntu.com UDP 1194",
    );

    let mut expected = vec![
        tcp(NTP_UBUNTU.v4, NTP),
        tcp(MCR.v4, HTTP),
        tcp(MCR_V6, HTTP),
        tcp(HCP.v4, HTTP),
        udp(HCP.v4, NTP),
        udp(NTP_UBUNTU.v4, TUNNEL_UDP),
    ];
    expected.extend(DROPPED.iter().map(|(_, addr, port)| tcp(*addr, *port)));
    let (_, counters) = env.finish(&expected);
    let answers = allowed.len() as u64;
    assert_eq!(
        counters,
        DnsCounters {
            answers,
            learned: answers,
            kernel_answers: answers + DROPPED.len() as u64,
            kernel_learned: answers,
            unmatched: DROPPED.len() as u64,
            ..DnsCounters::default()
        }
    );
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn aks_global_allows_the_api_server_on_the_tunnel_ports_and_the_cluster_on_all() {
    if !require_root() {
        return;
    }
    let mut env = start();

    // api_server: the article's network rules.
    for port in [HTTPS, SSH, TUNNEL_TCP] {
        assert_ok(
            &env.connect(API_SERVER, port),
            &format!("the API server on TCP {port}"),
        );
    }
    assert_ok(
        &env.send(API_SERVER, TUNNEL_UDP),
        "the API server on UDP 1194",
    );
    assert_timeout(&env.connect(API_SERVER, HTTP), "the API server on TCP 80");
    assert_eperm(&env.send(API_SERVER, NTP), "the API server on UDP 123");

    // cluster_cidrs: every port and protocol, up to the CIDR's edge.
    for port in [KUBELET, HTTP, NTP] {
        assert_ok(
            &env.connect(IN_CLUSTER_V4, port),
            &format!("inside the cluster on TCP {port}"),
        );
    }
    assert_ok(
        &env.send(IN_CLUSTER_V4, VXLAN),
        "inside the cluster on UDP 4789",
    );
    assert_ok(
        &env.connect(IN_CLUSTER_V6, KUBELET),
        "inside the cluster over IPv6",
    );
    assert_timeout(
        &env.connect(OUTSIDE_CLUSTER_V4, KUBELET),
        "just outside the cluster CIDR",
    );
    // The resolver's own address passes DNS only.
    assert_timeout(&env.connect(SERVER_V4, HTTPS), "the DNS server on TCP 443");

    let (_, counters) = env.finish(&[
        tcp(API_SERVER, HTTP),
        udp(API_SERVER, NTP),
        tcp(OUTSIDE_CLUSTER_V4, KUBELET),
        tcp(SERVER_V4, HTTPS),
    ]);
    assert_eq!(counters, DnsCounters::default());
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn the_kubelets_api_server_passes_and_another_of_the_region_does_not() {
    if !require_root() {
        return;
    }
    let mut env = start_with_kubeconfig(Some(&format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: localcluster\n  cluster:\n    server: https://{}:443\n",
        HCP.name
    )));
    // The cluster's own API server, on the tunnel's ports.
    assert_connects(&resolve(&env, HCP.name, HTTPS), HCP.v4, HCP.name);
    assert_ok(
        &env.connect(HCP.v4, TUNNEL_TCP),
        "the cluster's API server on TCP 9000",
    );
    let learned = env.agent.wait_learned(HCP.name, IpAddr::from(HCP.v4));
    assert_eq!(learned["ports"], TUNNEL_PORTS, "{learned}");
    // Another customer's API server in the same region, which `*.hcp.eastus.azmk8s.io`
    // would have let through.
    assert_resolved_but_dropped(
        &resolve(&env, OTHER_HCP.0, HTTPS),
        OTHER_HCP.1,
        "another API server of the region",
    );
    let (_, counters) = env.finish(&[tcp(OTHER_HCP.1, HTTPS)]);
    assert_eq!(counters.learned, 1, "{counters:?}");
    assert_eq!(counters.unmatched, 1, "{counters:?}");
}

/// Runs `egress-agent ARGS...`, checks it succeeded, and returns its rules (`check` and
/// `presets show` print one per line: `TARGET PORTS...  # ORIGINS`) as
/// (`TARGET PORTS...` with the ports sorted, origins), besides the lines starting with
/// `#`.
fn rules_printed_by(args: &[&str]) -> (Vec<String>, Vec<(String, String)>) {
    let out = Command::new(agent_bin())
        .args(args)
        .output()
        .expect("cannot run egress-agent");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "egress-agent {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let (comments, rules): (Vec<&str>, Vec<&str>) =
        stdout.lines().partition(|line| line.starts_with('#'));
    let rules = rules
        .iter()
        .map(|line| {
            let (rule, origins) = line
                .split_once(" # ")
                .unwrap_or_else(|| panic!("a rule without its origin: {line:?}\n{stdout}"));
            let mut words = rule.split_whitespace();
            let target = words.next().expect("a rule names its target");
            let mut ports: Vec<&str> = words.collect();
            ports.sort_unstable();
            (
                format!("{target} {}", ports.join(" ")),
                origins.trim().to_owned(),
            )
        })
        .collect();
    (comments.iter().map(|c| (*c).to_owned()).collect(), rules)
}

/// `rules` as a set, checking that no rule comes twice.
fn rule_set(rules: &[(String, String)]) -> BTreeMap<&str, &str> {
    let set: BTreeMap<&str, &str> = rules
        .iter()
        .map(|(rule, origin)| (rule.as_str(), origin.as_str()))
        .collect();
    let targets: BTreeSet<&str> = rules
        .iter()
        .map(|(rule, _)| rule.split(' ').next().unwrap_or_default())
        .collect();
    assert_eq!(targets.len(), rules.len(), "one rule per target: {rules:?}");
    set
}

/// A kubeconfig path that does not exist: the node's own, if this machine had one, must not
/// narrow the preset under test.
const NO_KUBECONFIG: &str = "/nonexistent/kubelet/kubeconfig";

/// What `check` and `presets show` say when they keep the regional API server wildcard.
fn regional_warning() -> String {
    format!(
        "# warning: presets[0] (aks-global): `*.hcp.{LOCATION}.azmk8s.io` admits every AKS API server in {LOCATION}, other customers' too; give `api_server` the cluster's API server name (`az aks show -g RG -n NAME --query fqdn`), or run where the kubelet's kubeconfig names it"
    )
}

#[test]
fn check_lists_the_preset_the_azure_platform_and_the_cluster() {
    let policy = TempFile::new(&policy());
    let path = policy.path().to_str().expect("temp paths are UTF-8");
    let (comments, rules) =
        rules_printed_by(&["check", "--config", path, "--kubeconfig", NO_KUBECONFIG]);
    assert_eq!(
        comments.first().map(String::as_str),
        Some("# mode: enforce")
    );
    // Then the effective `dns` settings and what passes whatever the policy says.
    assert!(
        comments[1].starts_with(&format!("# dns: min_ttl {MIN_TTL}s")),
        "{comments:?}"
    );
    assert!(
        comments[2].starts_with(&format!(
            "# implicit: DNS (UDP:53 TCP:53) to {SERVER_V4} {SERVER_V6}  (trusted resolvers, from dns.resolvers"
        )),
        "{comments:?}"
    );
    assert!(
        comments[3..comments.len() - 1]
            .iter()
            .all(|c| c.starts_with("# implicit: ")),
        "{comments:?}"
    );
    // Last, the policy's notices: here that the API server is not narrowed.
    assert_eq!(comments.last(), Some(&regional_warning()), "{comments:?}");
    let mut want: Vec<(String, &str)> = preset_rules();
    want.push((format!("{API_SERVER}/32 {TUNNEL_PORTS}"), "api_server"));
    want.push((format!("{CLUSTER_CIDR_V4} any"), "cluster_cidrs[0]"));
    want.push((format!("{CLUSTER_CIDR_V6} any"), "cluster_cidrs[1]"));
    let want: BTreeMap<&str, &str> = want.iter().map(|(r, o)| (r.as_str(), *o)).collect();
    assert_eq!(rule_set(&rules), want);

    // `presets show` prints exactly what the preset adds, through the same code.
    let (comments, rules) = rules_printed_by(&[
        "presets",
        "show",
        "aks-global",
        "--location",
        LOCATION,
        "--kubeconfig",
        NO_KUBECONFIG,
    ]);
    assert_eq!(comments, [regional_warning()]);
    let want = preset_rules();
    let want: BTreeMap<&str, &str> = want.iter().map(|(r, o)| (r.as_str(), *o)).collect();
    assert_eq!(rule_set(&rules), want);
}
