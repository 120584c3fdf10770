//! `cidrs_from`: the agent enforces a plain list of prefixes, applies an edit of the list
//! as it applies an edit of the policy, and refuses a bad line (naming the file and the
//! line) without changing what runs. `status --rules` and `explain` name a list's prefixes
//! by its file only while the file is the one applied, which the recorded hash tells.
use std::{
    fs,
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use egress_tests::{
    ATTACH_TIMEOUT, Agent, PinDir, ProbeResult, REMOTE_V4_A, REMOTE_V4_B, REMOTE_V6_A, REMOTE_V6_B,
    Server, TempFile, TestCgroup, Topology, agent_bin, assert_ok, assert_timeout, http_get,
    probe_tcp, require_root, start_agent, start_pinned_agent,
};
use serde_json::Value;

const HTTPS: u16 = 443;
const RELOAD_TIMEOUT: Duration = Duration::from_secs(15);

/// The list file beside a policy file, removed on drop.
struct ListFile(PathBuf);

impl ListFile {
    fn beside(policy: &TempFile) -> ListFile {
        ListFile(policy.path().with_extension("txt"))
    }

    fn name(&self) -> String {
        self.0
            .file_name()
            .expect("a file name")
            .to_string_lossy()
            .into_owned()
    }

    /// Replaces the list as an editor does: a new file renamed over the old one.
    fn replace(&self, contents: &str) {
        let next = self.0.with_extension("next");
        fs::write(&next, contents).expect("write the new list");
        fs::rename(&next, &self.0).expect("rename it over the old one");
    }
}

impl Drop for ListFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Servers on `a` and `b` (HTTPS), and an agent on a cgroup of its own enforcing a policy
/// that allows HTTPS to the prefixes of a list beside it, which holds `first`. Fields drop
/// in order: the agent first.
struct Enforced {
    agent: Agent,
    list: ListFile,
    policy: TempFile,
    cgroup: TestCgroup,
    _servers: [Server; 2],
    topo: Topology,
}

impl Enforced {
    fn start(a: IpAddr, b: IpAddr, first: &str) -> Enforced {
        let topo = Topology::new();
        let servers = [
            Server::tcp(&topo.server, None, a, HTTPS),
            Server::tcp(&topo.server, None, b, HTTPS),
        ];
        let cgroup = TestCgroup::new();
        // The policy names the list by a path relative to its own directory.
        let policy = TempFile::new("mode: enforce\nallow: []\n");
        let list = ListFile::beside(&policy);
        list.replace(first);
        fs::write(policy.path(), policy_of(&list)).expect("write the policy");
        let agent = start_agent(&policy, &cgroup, None);
        Enforced {
            agent,
            list,
            policy,
            cgroup,
            _servers: servers,
            topo,
        }
    }

    /// A TCP connection from the client in the enforced cgroup.
    fn connect(&self, addr: IpAddr, port: u16) -> ProbeResult {
        probe_tcp(&self.topo.client, Some(&self.cgroup), addr, port)
    }
}

fn list_of(addr: impl std::fmt::Display) -> String {
    format!("# allowed hosts\n{addr}\n\n")
}

/// A policy allowing HTTPS to the prefixes of `list`, named relative to the policy.
fn policy_of(list: &ListFile) -> String {
    format!(
        "mode: enforce\nallow:\n  - cidrs_from: {}\n    ports: [HTTPS:443]\n",
        list.name()
    )
}

/// The policy's hash as the README says to compute it: `{ cat POLICY; sha256sum LIST; } |
/// sha256sum`, in the policy's directory.
fn policy_hash(policy: &TempFile, list: &ListFile) -> String {
    let dir = policy.path().parent().expect("a directory");
    let out = Command::new("sh")
        .current_dir(dir)
        .args(["-c", "{ cat \"$1\"; sha256sum \"$2\"; } | sha256sum", "sh"])
        .arg(policy.path().file_name().expect("a file name"))
        .arg(list.name())
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum failed");
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    text.split_whitespace().next().expect("a hash").to_owned()
}

/// Waits until `/metrics` gives `hash` as the running policy's (published once a second).
fn wait_for_hash(metrics: &str, hash: &str) {
    let sample = format!("egress_policy_info{{sha256=\"{hash}\"}} 1");
    let deadline = Instant::now() + RELOAD_TIMEOUT;
    loop {
        let (_, body) = http_get(metrics, "/metrics");
        if body.contains(&sample) {
            return;
        }
        assert!(Instant::now() < deadline, "no {sample} in:\n{body}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `egress-agent ARGS... --json --pin-root`, which must succeed.
fn agent_json(pins: &PinDir, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = pins.command(&all);
    assert!(
        out.status.success(),
        "egress-agent {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn a_list_is_enforced_its_edits_reload_and_a_bad_line_changes_nothing() {
    if !require_root() {
        return;
    }
    let (a, b) = (IpAddr::V4(REMOTE_V4_A), IpAddr::V4(REMOTE_V4_B));
    let world = Enforced::start(a, b, &list_of(a));
    let (agent, list, policy) = (&world.agent, &world.list, &world.policy);
    let metrics = agent.metrics_addr();
    wait_for_hash(&metrics, &policy_hash(policy, list));
    assert_ok(&world.connect(a, HTTPS), "a, on the list");
    assert_timeout(&world.connect(b, HTTPS), "b, off the list");

    list.replace(&list_of(b));
    agent.wait_for_named("policy_reloaded", RELOAD_TIMEOUT);
    // The policy file is the same, the list is not: so is the hash.
    let edited = policy_hash(policy, list);
    wait_for_hash(&metrics, &edited);
    assert_ok(&world.connect(b, HTTPS), "b, on the edited list");
    assert_timeout(&world.connect(a, HTTPS), "a, off the edited list");

    // Line 4 has host bits set: the list is refused, what runs stays.
    list.replace(&format!("{}203.0.113.21/24\n", list_of(a)));
    let rejected = agent.wait_for_named("policy_reload_rejected", RELOAD_TIMEOUT);
    let rejected = rejected["error"].as_str().expect("the error").to_owned();
    let at = format!(
        "{}:4: `203.0.113.21/24`: host bits are set",
        list.0.display()
    );
    assert!(rejected.contains(&at), "{rejected}");
    assert!(rejected.contains("allow[0] (cidrs_from"), "{rejected}");
    assert_ok(&world.connect(b, HTTPS), "b after the refused list");
    assert_timeout(&world.connect(a, HTTPS), "a after the refused list");
    wait_for_hash(&metrics, &edited);
}

/// Once the list file differs from the one applied (here, the agent gone and the pinned
/// programs enforcing), `status --rules` and `explain` do not name the prefixes by the file
/// as it is now: they name the list as applied and say that its file changed.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn status_and_explain_read_a_list_only_while_its_file_is_the_one_applied() {
    if !require_root() {
        return;
    }
    let (a, b) = (REMOTE_V4_A, REMOTE_V4_B);
    let cgroup = TestCgroup::new();
    let pins = PinDir::new();
    let policy = TempFile::new("mode: enforce\nallow: []\n");
    let list = ListFile::beside(&policy);
    list.replace(&list_of(a));
    fs::write(policy.path(), policy_of(&list)).expect("write the policy");
    let applied = policy_hash(&policy, &list);
    let mut agent = start_pinned_agent(
        &agent_bin(),
        &policy,
        &cgroup,
        &pins,
        None,
        &["--on-exit", "keep"],
    );
    let origin = format!("allow[0] (cidrs_from {})", list.name());
    // The policy is recorded before the agent says it is attached.
    agent.wait_for_named("attached", ATTACH_TIMEOUT);
    let rules = agent_json(&pins, &["status", "--rules"])["maps"]["rules"].clone();
    assert_eq!(rules["sha256"], applied.as_str(), "{rules}");
    assert_eq!(
        rules["cidrs"][0]["from"]["own"][0],
        origin.as_str(),
        "{rules}"
    );
    let status = agent.terminate();
    assert!(status.success(), "the agent exited with {status}");

    list.replace(&list_of(b));
    let rules = &agent_json(&pins, &["status", "--rules"])["maps"]["rules"];
    assert_eq!(
        rules["sha256"],
        applied.as_str(),
        "the hash applied: {rules}"
    );
    let changed = rules["changed_lists"][0].as_str().unwrap_or_default();
    assert!(
        changed.starts_with(&origin) && changed.contains("changed since"),
        "{rules}"
    );
    let entry = &rules["cidrs"][0];
    assert_eq!(entry["target"], format!("{a}/32").as_str(), "{rules}");
    assert!(
        entry["from"]
            .get("own")
            .is_some_and(|own| own == &Value::Array(vec![])),
        "{rules}"
    );
    assert_eq!(
        entry["from"]["changed_lists"][0],
        origin.as_str(),
        "{rules}"
    );
    let text = pins.command(&["status", "--rules"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!(
            "# {origin} as applied; its file does not match the hash recorded, so not read"
        )),
        "{text}"
    );
    let explained = agent_json(&pins, &["explain", &a.to_string(), "443"]);
    assert_eq!(explained["verdict"], "allowed", "{explained}");
    assert!(
        explained["because"][0]
            .as_str()
            .is_some_and(|line| line.ends_with(&format!(
                "# {origin} as applied; its file does not match the hash recorded, so not read"
            ))),
        "{explained}"
    );

    // The file as applied again: read again.
    list.replace(&list_of(a));
    let rules = &agent_json(&pins, &["status", "--rules"])["maps"]["rules"];
    assert!(rules.get("changed_lists").is_none(), "{rules}");
    assert_eq!(
        rules["cidrs"][0]["from"]["own"][0],
        origin.as_str(),
        "{rules}"
    );
}

/// `HOSTS` is sized for the policy the agent starts with. A reload that brings more single
/// addresses than it has room for puts the rest in `CIDRS`, where they are enforced all the
/// same: the last address of a list of 1,101 passes after a start with one (room: 1,024).
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn single_addresses_beyond_the_room_a_start_gave_them_are_enforced() {
    if !require_root() {
        return;
    }
    let (a, b) = (IpAddr::V6(REMOTE_V6_A), IpAddr::V6(REMOTE_V6_B));
    let world = Enforced::start(a, b, &list_of(REMOTE_V4_A));
    assert_timeout(&world.connect(a, HTTPS), "a, off the list");

    // 1,100 addresses below `a` (2001:db8:1::/64 sorts before 2001:db8:2::10), so `a` is
    // past HOSTS' 1,024 entries.
    let mut long: String = (1..=1100u16)
        .map(|n| format!("{}\n", Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, n)))
        .collect();
    long.push_str(&format!("{a}\n"));
    world.list.replace(&long);
    let reloaded = world
        .agent
        .wait_for_named("policy_reloaded", RELOAD_TIMEOUT);
    assert_eq!(reloaded["cidr_entries"], 1101, "{reloaded}");
    assert_ok(
        &world.connect(a, HTTPS),
        "a, on the list, beyond HOSTS' room",
    );
    // Its entry carries the list's ports only: nothing listens on 8443, so a connection
    // the policy let through would be reset, not left unanswered.
    assert_timeout(
        &world.connect(a, 8443),
        "a, on a port the list does not allow",
    );
    assert_timeout(&world.connect(b, HTTPS), "b, off the list");
}
