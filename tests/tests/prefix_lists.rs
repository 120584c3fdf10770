//! `cidrs_from`: the agent enforces a plain list of prefixes, applies an edit of the list
//! as it applies an edit of the policy, and refuses a bad line (naming the file and the
//! line) without changing what runs.
use std::{
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use egress_tests::{
    Agent, REMOTE_V4_A, REMOTE_V4_B, Server, TempFile, TestCgroup, Topology, assert_ok,
    assert_timeout, probe_tcp, require_root, start_agent,
};

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

/// Waits until `count` stderr lines of the agent contain `needle`; returns the last.
fn wait_for_nth(agent: &Agent, needle: &str, count: usize) -> String {
    let deadline = Instant::now() + RELOAD_TIMEOUT;
    loop {
        let lines: Vec<String> = agent
            .stderr_lines()
            .into_iter()
            .filter(|line| line.contains(needle))
            .collect();
        if lines.len() >= count {
            return lines[count - 1].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {count} lines containing {needle:?}:\n{}",
            agent.stderr_lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn list_of(addr: Ipv4Addr) -> String {
    format!("# allowed hosts\n{addr}\n\n")
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
    let (a, b) = (REMOTE_V4_A, REMOTE_V4_B);
    let topo = Topology::new();
    let _servers = [
        Server::tcp(&topo.server, None, a, HTTPS),
        Server::tcp(&topo.server, None, b, HTTPS),
    ];
    let cgroup = TestCgroup::new();
    let cg = Some(&cgroup);
    // The policy names the list by a path relative to its own directory.
    let policy = TempFile::new("mode: enforce\nallow: []\n");
    let list = ListFile::beside(&policy);
    list.replace(&list_of(a));
    fs::write(
        policy.path(),
        format!(
            "mode: enforce\nallow:\n  - cidrs_from: {}\n    ports: [HTTPS:443]\n",
            list.name()
        ),
    )
    .expect("write the policy");
    let agent = start_agent(&policy, &cgroup, None);
    assert_ok(&probe_tcp(&topo.client, cg, a, HTTPS), "a, on the list");
    assert_timeout(&probe_tcp(&topo.client, cg, b, HTTPS), "b, off the list");

    list.replace(&list_of(b));
    wait_for_nth(&agent, "a list file changed", 1);
    wait_for_nth(&agent, "policy reloaded", 1);
    assert_ok(
        &probe_tcp(&topo.client, cg, b, HTTPS),
        "b, on the edited list",
    );
    assert_timeout(
        &probe_tcp(&topo.client, cg, a, HTTPS),
        "a, off the edited list",
    );

    // Line 4 has host bits set: the list is refused, what runs stays.
    list.replace(&format!("{}203.0.113.21/24\n", list_of(a)));
    let rejected = wait_for_nth(&agent, "policy reload rejected", 1);
    let at = format!(
        "{}:4: `203.0.113.21/24`: host bits are set",
        list.0.display()
    );
    assert!(rejected.contains(&at), "{rejected}");
    assert!(rejected.contains("allow[0] (cidrs_from"), "{rejected}");
    assert_ok(
        &probe_tcp(&topo.client, cg, b, HTTPS),
        "b after the refused list",
    );
    assert_timeout(
        &probe_tcp(&topo.client, cg, a, HTTPS),
        "a after the refused list",
    );
}
