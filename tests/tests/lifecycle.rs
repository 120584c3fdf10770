//! The agent's life on a node: pinned state outlives the process. A `kill -9` leaves the
//! node enforcing (and learning from DNS in the kernel), a restart takes the state over, an
//! upgrade to another binary leaves no window, `status` reads the pins while an agent runs
//! and while none does, and `uninstall` leaves nothing behind.
//!
//! Clients loop new connections through every step: an allowed destination must never
//! fail and a denied one must never pass.
use std::{
    ffi::OsString,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::PermissionsExt as _,
    thread,
    time::{Duration, Instant},
};

use egress_tests::{
    Agent, PinDir, REMOTE_V4_A, REMOTE_V4_B, SERVER_V4, Server, TempFile, TestCgroup, Topology,
    agent_bin, assert_ok, assert_timeout, attached_programs,
    attack::start_agent_in,
    dns::{BackgroundProbe, DnsServer, Lookup, Record, connect_loop, resolve_connect},
    probe_tcp, require_root, start_pinned_agent,
};
use serde_json::{Value, json};

const HTTPS: u16 = 443;
const TTL: u32 = 300;
const APP: &str = "app.example.com";
const APP_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
/// Resolved only while no agent runs: the kernel alone learns it.
const FRESH: &str = "fresh.example.com";
const FRESH_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 12);
/// The longest the looping clients run; the tests stop them when done.
const LOOP: Duration = Duration::from_secs(300);
const LOOP_INTERVAL: Duration = Duration::from_millis(100);
/// Generous for an allowed connect on a loaded machine; short for a denied one, which
/// always takes all of it.
const ALLOWED_TIMEOUT: Duration = Duration::from_millis(3000);
const DENIED_TIMEOUT: Duration = Duration::from_millis(300);
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(30);
const KEEP: [&str; 2] = ["--on-exit", "keep"];

/// Allows `REMOTE_V4_A` and the two names on HTTPS, learning from dnsmasq; `dns_extra`
/// goes into the `dns` section.
fn policy_text(dns_extra: &str) -> String {
    format!(
        "mode: enforce\nallow:\n  - cidr: {REMOTE_V4_A}/32\n    ports: [HTTPS:443]\n  - fqdn: {APP}\n    ports: [HTTPS:443]\n  - fqdn: {FRESH}\n    ports: [HTTPS:443]\ndns:\n  resolvers: [{SERVER_V4}]\n{dns_extra}"
    )
}

/// The namespaces, dnsmasq, echo servers on every server address, and a cgroup.
struct World {
    _servers: Vec<Server>,
    _dns: DnsServer,
    cgroup: TestCgroup,
    topo: Topology,
}

impl World {
    fn new() -> World {
        let topo = Topology::new();
        for addr in [APP_V4, FRESH_V4] {
            topo.add_remote(addr);
        }
        let dns = DnsServer::start(
            &topo.server,
            TTL,
            &[
                Record::Host(APP, APP_V4.into()),
                Record::Host(FRESH, FRESH_V4.into()),
            ],
        );
        let servers = vec![Server::tcp(
            &topo.server,
            None,
            IpAddr::from(Ipv6Addr::UNSPECIFIED),
            HTTPS,
        )];
        World {
            _servers: servers,
            _dns: dns,
            cgroup: TestCgroup::new(),
            topo,
        }
    }

    fn resolve_ok(&self, name: &str, what: &str) {
        let resolved = resolve_connect(
            &self.topo.client,
            Some(&self.cgroup),
            Lookup::a(name, SERVER_V4),
            HTTPS,
        );
        assert_ok(&resolved.result, what);
    }

    /// An allowed and a denied client looping new connections from the cgroup.
    fn loops(&self) -> (BackgroundProbe, BackgroundProbe) {
        let cg = Some(&self.cgroup);
        let allowed = connect_loop(
            &self.topo.client,
            cg,
            REMOTE_V4_A,
            HTTPS,
            LOOP,
            LOOP_INTERVAL,
            ALLOWED_TIMEOUT,
        );
        let denied = connect_loop(
            &self.topo.client,
            cg,
            REMOTE_V4_B,
            HTTPS,
            LOOP,
            LOOP_INTERVAL,
            DENIED_TIMEOUT,
        );
        allowed.line(0);
        denied.line(0);
        (allowed, denied)
    }
}

/// Attempts each looping client makes after a step before the test goes on: the verdict
/// covers a few whole attempts on each side of every step, however slow the machine.
const ATTEMPTS_PER_STEP: usize = 3;

/// Waits until each looping client has made [`ATTEMPTS_PER_STEP`] more attempts.
fn wait_loops(allowed: &BackgroundProbe, denied: &BackgroundProbe) {
    allowed.wait_attempts(allowed.attempts() + ATTEMPTS_PER_STEP);
    denied.wait_attempts(denied.attempts() + ATTEMPTS_PER_STEP);
}

/// The looping clients' verdict: every allowed attempt connected, no denied one did. They
/// run on for a few attempts first, so that attempts follow the last step too.
fn assert_loops(allowed: &mut BackgroundProbe, denied: &mut BackgroundProbe) {
    wait_loops(allowed, denied);
    allowed.stop();
    denied.stop();
    let (_, a) = allowed.finish_line();
    let (_, d) = denied.finish_line();
    let count = |v: &Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"));
    let min = ATTEMPTS_PER_STEP as u64;
    assert!(
        count(&a, "attempts") >= min,
        "too few allowed attempts: {a}"
    );
    assert_eq!(
        count(&a, "connected"),
        count(&a, "attempts"),
        "an allowed connection failed: {a}"
    );
    assert!(count(&d, "attempts") >= min, "too few denied attempts: {d}");
    assert_eq!(count(&d, "connected"), 0, "a denied connection passed: {d}");
}

/// Polls `status` until its output contains every one of `needles`.
fn wait_status(pins: &PinDir, needles: &[&str]) -> String {
    let deadline = Instant::now() + STATUS_TIMEOUT;
    loop {
        let (ok, out) = pins.status();
        if ok && needles.iter().all(|n| out.contains(n)) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed {needles:?}:\n{out}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// The policy, a pin root, and an agent on them with `--on-exit keep`.
fn start_keeping(world: &World) -> (TempFile, PinDir, Agent) {
    let policy = TempFile::new(&policy_text(""));
    let pins = PinDir::new();
    let agent = start_pinned_agent(&agent_bin(), &policy, &world.cgroup, &pins, None, &KEEP);
    (policy, pins, agent)
}

fn kill_9(agent: &mut Agent) {
    // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet.
    assert_eq!(unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) }, 0);
    agent.wait_for_exit(Duration::from_secs(10));
}

/// The entry for `map` in a `took_over` event's `replaced_maps`; panics without one.
fn replaced_map<'a>(took_over: &'a Value, map: &str) -> &'a Value {
    took_over["replaced_maps"]
        .as_array()
        .and_then(|maps| maps.iter().find(|m| m["map"] == map))
        .unwrap_or_else(|| panic!("{map} was not replaced: {took_over}"))
}

/// The ids of the programs on the cgroup.
fn program_ids(world: &World) -> Vec<u64> {
    attached_programs(world.cgroup.path())
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn kill_9_keeps_enforcing_and_a_restart_takes_over() {
    if !require_root() {
        return;
    }
    let world = World::new();
    let (policy, pins, mut first) = start_keeping(&world);
    world.resolve_ok(APP, "app while the first agent runs");
    first.wait_learned(APP, APP_V4);
    let up = wait_status(&pins, &["agent      running", APP, &APP_V4.to_string()]);
    assert!(up.contains("mode       enforce"), "{up}");
    let cgroup = world.cgroup.path().display().to_string();
    assert!(
        up.contains(&format!("attached   cgroup {cgroup} (egress)")),
        "{up}"
    );
    assert!(
        up.contains(&format!("attached   cgroup {cgroup} (ingress)")),
        "{up}"
    );
    assert!(
        up.contains("1 CIDR entry") && up.contains("trusted resolvers: 198.51.100.2"),
        "{up}"
    );

    let (mut allowed, mut denied) = world.loops();
    wait_loops(&allowed, &denied);
    kill_9(&mut first);
    let programs = program_ids(&world);
    assert_eq!(programs.len(), 2, "programs after kill -9");

    // No agent: the pinned programs enforce, and the kernel learns from DNS alone.
    let down = wait_status(&pins, &["not running", APP]);
    assert!(down.contains("mode       enforce"), "{down}");
    world.resolve_ok(FRESH, "a name first resolved while no agent runs");
    world.resolve_ok(APP, "app while no agent runs");
    assert_timeout(
        &probe_tcp(&world.topo.client, Some(&world.cgroup), REMOTE_V4_B, HTTPS),
        "a denied address while no agent runs",
    );
    let down = wait_status(&pins, &[&FRESH_V4.to_string()]);
    assert!(down.contains("(names not recorded yet)"), "{down}");

    // A new agent takes over: new programs replace the old ones, what the kernel learned
    // meanwhile gets its name from the answer queued in the ring buffer.
    let mut second = start_pinned_agent(&agent_bin(), &policy, &world.cgroup, &pins, None, &KEEP);
    second.wait_for_named("took_over", TAKEOVER_TIMEOUT);
    second.wait_learned(FRESH, FRESH_V4);
    let after = program_ids(&world);
    assert_eq!(after.len(), 2, "programs after the takeover: {after:?}");
    assert!(
        after.iter().all(|id| !programs.contains(id)),
        "the old programs are still attached: {programs:?} -> {after:?}"
    );
    wait_status(&pins, &["agent      running", APP, FRESH]);
    assert_loops(&mut allowed, &mut denied);

    // `--on-exit keep` on SIGTERM too; then `uninstall` removes everything.
    assert!(second.terminate().success());
    assert_eq!(
        program_ids(&world),
        after,
        "programs after SIGTERM with keep"
    );
    let (ok, out) = pins.uninstall();
    assert!(ok, "{out}");
    assert!(
        out.contains("detached cgroup-") && out.contains("removed"),
        "{out}"
    );
    assert!(program_ids(&world).is_empty(), "programs after uninstall");
    assert!(!pins.root().exists(), "pins after uninstall");
    let (ok, out) = pins.status();
    assert!(!ok && out.contains("nothing is pinned"), "{out}");
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn an_upgrade_to_another_binary_leaves_no_window() {
    if !require_root() {
        return;
    }
    let world = World::new();
    let (policy, pins, mut old) = start_keeping(&world);
    world.resolve_ok(APP, "app before the upgrade");
    old.wait_learned(APP, APP_V4);
    wait_status(&pins, &[APP]);
    let (mut allowed, mut denied) = world.loops();
    // The learned address, held by a client that resolved it before the upgrade.
    let mut learned = connect_loop(
        &world.topo.client,
        Some(&world.cgroup),
        APP_V4,
        HTTPS,
        LOOP,
        LOOP_INTERVAL,
        ALLOWED_TIMEOUT,
    );
    learned.line(0);

    // The new version: another binary, and a policy whose learned-address map has
    // another size, so that map is replaced and its entries carried over. It starts while
    // the old agent runs, waits for it, and takes over the moment it exits.
    let new_bin = TempBinary(
        std::env::temp_dir().join(format!("egress-agent-upgrade-{}", std::process::id())),
    );
    fs::copy(agent_bin(), &new_bin.0).expect("copy the agent binary");
    fs::set_permissions(&new_bin.0, fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::write(policy.path(), policy_text("  max_ips: 4096\n")).expect("write the new policy");
    let mut cmd = std::process::Command::new(&new_bin.0);
    cmd.args(egress_tests::run_args(&policy, &world.cgroup, &pins))
        .args(KEEP)
        .env("RUST_LOG", "info,egress_agent=debug");
    let new = Agent::spawn_command(cmd);
    new.wait_for_named("waiting_for_pins", TAKEOVER_TIMEOUT);
    assert!(old.terminate().success());
    let took_over = new.wait_for_named("took_over", TAKEOVER_TIMEOUT);
    assert_eq!(
        replaced_map(&took_over, "LEARNED")["carried"],
        1,
        "{took_over}"
    );
    assert_eq!(program_ids(&world).len(), 2, "programs after the upgrade");
    assert_loops(&mut allowed, &mut denied);
    learned.stop();
    let (_, held) = learned.finish_line();
    assert_eq!(
        held["connected"], held["attempts"],
        "a connection to the learned address failed across the upgrade: {held}"
    );
}

/// A copied binary, removed on drop.
struct TempBinary(std::path::PathBuf);

impl Drop for TempBinary {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn the_default_exit_detaches_and_removes_every_pin() {
    if !require_root() {
        return;
    }
    let world = World::new();
    let policy = TempFile::new(&policy_text(""));
    let pins = PinDir::new();
    let mut agent = start_pinned_agent(&agent_bin(), &policy, &world.cgroup, &pins, None, &[]);
    assert_ok(
        &probe_tcp(&world.topo.client, Some(&world.cgroup), REMOTE_V4_A, HTTPS),
        "allowed while the agent runs",
    );
    assert_eq!(program_ids(&world).len(), 2);
    let (ok, out) = pins.uninstall();
    assert!(
        !ok && out.contains("another egress-agent holds"),
        "uninstall must refuse while an agent runs: {out}"
    );
    assert!(agent.terminate().success());
    assert!(program_ids(&world).is_empty(), "programs after SIGTERM");
    assert!(!pins.root().exists(), "pins after SIGTERM");
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn a_pinned_layout_of_another_version_is_replaced_without_a_gap() {
    if !require_root() {
        return;
    }
    let world = World::new();
    let (policy, pins, mut old) = start_keeping(&world);
    assert!(old.terminate().success());
    let programs = program_ids(&world);
    // What an older release left: its state under another layout version's directory.
    let versions: Vec<_> = fs::read_dir(pins.root())
        .expect("the pin root")
        .map(|e| e.expect("an entry").path())
        .collect();
    let [current] = versions.as_slice() else {
        panic!("one version directory expected: {versions:?}");
    };
    let older = pins.root().join("v0");
    fs::rename(current, &older).expect("rename the version directory");

    let (mut allowed, mut denied) = world.loops();
    let new = start_pinned_agent(&agent_bin(), &policy, &world.cgroup, &pins, None, &KEEP);
    let replaced = new.wait_for_named("replaced_layout", TAKEOVER_TIMEOUT);
    assert_eq!(replaced["versions"], json!([older]), "{replaced}");
    assert_eq!(replaced["attachments_replaced"], 2, "{replaced}");
    assert_loops(&mut allowed, &mut denied);
    let after = program_ids(&world);
    assert_eq!(after.len(), 2, "programs after the replacement: {after:?}");
    assert!(
        after.iter().all(|id| !programs.contains(id)),
        "the older version's programs are still attached: {programs:?} -> {after:?}"
    );
    assert!(!older.exists(), "the older version's pins are still there");
    assert!(current.exists());
}

/// The size of the ring buffer pinned at `path`, as `bpftool map show` lists it.
fn ring_size(path: &std::path::Path) -> u64 {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(path)
        .output()
        .expect("cannot run bpftool");
    assert!(out.status.success(), "bpftool map show {}", path.display());
    let map: Value = serde_json::from_slice(&out.stdout).expect("bpftool printed JSON");
    assert_eq!(map["type"], "ringbuf", "{map}");
    map["max_entries"].as_u64().expect("max_entries")
}

/// A release that resized the DNS answer ring buffer left its ring pinned: the agent
/// replaces it, reads what it holds (nothing here: its programs never had it), pins its own
/// in its place, although the task that reads the ring owns it by then, and learns through
/// its own.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn a_dns_ring_buffer_of_another_size_is_replaced_and_read() {
    if !require_root() {
        return;
    }
    let world = World::new();
    let (policy, pins, mut old) = start_keeping(&world);
    assert!(old.terminate().success());
    let versions: Vec<_> = fs::read_dir(pins.root())
        .expect("the pin root")
        .map(|e| e.expect("an entry").path())
        .collect();
    let [version] = versions.as_slice() else {
        panic!("one version directory expected: {versions:?}");
    };
    let ring = version.join("maps/DNS_EVENTS");
    const OTHER_SIZE: u64 = 8 << 20;
    assert_ne!(ring_size(&ring), OTHER_SIZE);
    fs::remove_file(&ring).expect("unpin the ring buffer");
    let created = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&ring)
        .args(["type", "ringbuf", "key", "0", "value", "0", "entries"])
        .arg(OTHER_SIZE.to_string())
        .args(["name", "DNS_EVENTS"])
        .status()
        .expect("cannot run bpftool");
    assert!(created.success(), "bpftool map create");

    let (mut allowed, mut denied) = world.loops();
    let new = start_pinned_agent(&agent_bin(), &policy, &world.cgroup, &pins, None, &KEEP);
    let took_over = new.wait_for_named("took_over", TAKEOVER_TIMEOUT);
    replaced_map(&took_over, "DNS_EVENTS");
    let read = new.wait_for_named("replaced_dns_ring_read", TAKEOVER_TIMEOUT);
    assert_eq!(read["answers"], 0, "{read}");
    assert_ne!(ring_size(&ring), OTHER_SIZE, "the replacement is pinned");
    world.resolve_ok(APP, "app after the replacement");
    new.wait_learned(APP, APP_V4);
    assert_loops(&mut allowed, &mut denied);
}

/// `uninstall` with entries in `links/` that are not the agent's (a map someone pinned
/// there, a directory): it detaches the programs and removes the maps all the same, leaves
/// those entries where they are, names each, and fails. Once they are gone, it finishes.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn uninstall_removes_all_it_owns_and_names_what_it_leaves() {
    if !require_root() {
        return;
    }
    let policy = TempFile::new(&format!(
        "mode: enforce\nallow:\n  - cidr: {REMOTE_V4_A}/32\n"
    ));
    let cgroup = TestCgroup::new();
    let pins = PinDir::new();
    let mut agent = start_pinned_agent(&agent_bin(), &policy, &cgroup, &pins, None, &KEEP);
    assert!(agent.terminate().success());
    assert_eq!(attached_programs(cgroup.path()).len(), 2, "kept attached");
    let links = fs::read_dir(pins.root())
        .expect("the pin root")
        .map(|entry| entry.expect("an entry").path().join("links"))
        .find(|dir| dir.is_dir())
        .expect("a links directory");
    let (stray_map, stray_dir) = (links.join("someone-elses-map"), links.join("a-directory"));
    let pinned = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&stray_map)
        .args(["type", "array", "key", "4", "value", "4", "entries", "1"])
        .args(["name", "stray"])
        .status()
        .expect("cannot run bpftool");
    assert!(pinned.success(), "bpftool map create");
    fs::create_dir(&stray_dir).expect("create a directory");

    let (ok, out) = pins.uninstall();
    assert!(!ok, "uninstall must fail while it leaves something: {out}");
    assert_eq!(out.matches("detached cgroup-").count(), 2, "{out}");
    for stray in [&stray_map, &stray_dir] {
        let line = format!("left {}: not a link pin of egress-agent", stray.display());
        assert!(out.contains(&line), "no {line:?} in:\n{out}");
        assert!(stray.exists(), "{} was removed", stray.display());
    }
    assert!(out.contains("entries left under"), "{out}");
    assert!(
        attached_programs(cgroup.path()).is_empty(),
        "programs after uninstall"
    );
    let maps = links.with_file_name("maps");
    assert!(!maps.exists(), "{} after uninstall", maps.display());

    fs::remove_file(&stray_map).expect("unpin the stray map");
    fs::remove_dir(&stray_dir).expect("remove the stray directory");
    let (ok, out) = pins.uninstall();
    assert!(ok && out.contains("removed"), "{out}");
    assert!(!pins.root().exists(), "pins after the second uninstall");
}

/// Agents A and B with `on_exit`, on one pin root: A enforcing, B started while A runs,
/// waiting for A's lock. Returns the policy, the pin root, A, B and A's programs.
fn a_and_b_waiting(world: &World, on_exit: &[&str]) -> (TempFile, PinDir, Agent, Agent, Vec<u64>) {
    let policy = TempFile::new(&policy_text(""));
    let pins = PinDir::new();
    let a = start_pinned_agent(&agent_bin(), &policy, &world.cgroup, &pins, None, on_exit);
    let programs = program_ids(world);
    let mut cmd = std::process::Command::new(agent_bin());
    cmd.args(egress_tests::run_args(&policy, &world.cgroup, &pins))
        .args(on_exit)
        .env("RUST_LOG", "info,egress_agent=debug");
    let b = Agent::spawn_command(cmd);
    b.wait_for_named("waiting_for_pins", TAKEOVER_TIMEOUT);
    (policy, pins, a, b, programs)
}

/// B's programs, and no others, are on the cgroup, pinned, and `status` says B runs.
fn assert_b_enforces(world: &World, pins: &PinDir, a_programs: &[u64]) {
    let programs = program_ids(world);
    assert_eq!(
        programs.len(),
        2,
        "programs after the handover: {programs:?}"
    );
    assert!(
        programs.iter().all(|id| !a_programs.contains(id)),
        "A's programs are still attached: {a_programs:?} -> {programs:?}"
    );
    let cgroup = world.cgroup.path().display().to_string();
    wait_status(
        pins,
        &[
            "agent      running",
            &format!("attached   cgroup {cgroup} (egress)"),
            &format!("attached   cgroup {cgroup} (ingress)"),
            "1 CIDR entry",
        ],
    );
}

/// With `--on-exit keep` A leaves its state enforcing and B takes it over: no connection
/// sees a gap.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn a_handover_with_keep_leaves_no_gap() {
    if !require_root() {
        return;
    }
    let world = World::new();
    let (_policy, pins, mut a, b, a_programs) = a_and_b_waiting(&world, &KEEP);
    let (mut allowed, mut denied) = world.loops();
    assert!(a.terminate().success());
    b.wait_for_named("took_over", TAKEOVER_TIMEOUT);
    let attached = b.wait_for_named("attached", TAKEOVER_TIMEOUT);
    assert_eq!(attached["mode"], "enforce", "{attached}");
    assert_b_enforces(&world, &pins, &a_programs);
    assert_loops(&mut allowed, &mut denied);
}

/// With the default `--on-exit detach` A removes its state, the pin root included, while it
/// still holds the lock; B, which waited on that root, starts afresh on a new one.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn a_handover_with_detach_starts_afresh() {
    if !require_root() {
        return;
    }
    let world = World::new();
    let (_policy, pins, mut a, b, a_programs) = a_and_b_waiting(&world, &[]);
    assert!(a.terminate().success());
    let attached = b.wait_for_named("attached", TAKEOVER_TIMEOUT);
    assert_eq!(attached["mode"], "enforce", "{attached}");
    assert!(b.has_event("starting_afresh"), "{:?}", b.events());
    assert!(!b.has_event("took_over"), "B took over a state A removed");
    assert_b_enforces(&world, &pins, &a_programs);
    assert_ok(
        &probe_tcp(&world.topo.client, Some(&world.cgroup), REMOTE_V4_A, HTTPS),
        "allowed after the handover",
    );
    assert_timeout(
        &probe_tcp(&world.topo.client, Some(&world.cgroup), REMOTE_V4_B, HTTPS),
        "denied after the handover",
    );
}

/// `args` with the value after `flag` replaced by `value`.
fn with_arg(mut args: Vec<OsString>, flag: &str, value: impl Into<OsString>) -> Vec<OsString> {
    let at = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[at + 1] = value.into();
    args
}

/// Runs the agent with `args` (detach, the default), which must fail; returns its stderr.
fn failed_start(args: &[OsString]) -> String {
    let mut agent = Agent::spawn(&agent_bin(), args);
    let status = agent.wait_for_exit(TAKEOVER_TIMEOUT);
    let stderr = agent.stderr_lines().join("\n");
    assert!(!status.success(), "the start did not fail:\n{stderr}");
    stderr
}

/// An empty directory of a test's own, removed when the test ends, also when it fails.
struct RemovedOnDrop(std::path::PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

/// Each bad input fails the start before anything is attached, or undoes what was: nothing
/// on the cgroup, nothing pinned, and the error names the input, each OS error once.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn a_failed_start_leaves_nothing_attached_or_pinned() {
    if !require_root() {
        return;
    }
    let policy = TempFile::new(&policy_text(""));
    let cgroup = TestCgroup::new();
    let pins = PinDir::new();
    let args = || egress_tests::run_args(&policy, &cgroup, &pins);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let in_use = taken.local_addr().expect("its address").to_string();
    let not_cgroup = RemovedOnDrop(
        std::env::temp_dir().join(format!("egress-not-a-cgroup-{}", std::process::id())),
    );
    let not_cgroup = &not_cgroup.0;
    fs::create_dir_all(not_cgroup).expect("create a directory");
    let not_dir = TempFile::new("");
    let unusable = not_dir.path().join("egress-enforcer");
    let mut missing_interface = args();
    missing_interface.extend(["--interface".into(), "no-such-if0".into()]);
    let cases = [
        (
            missing_interface,
            "--interface no-such-if0: no such network interface".to_string(),
        ),
        (
            with_arg(args(), "--cgroup", not_cgroup),
            format!(
                "--cgroup {}: not a cgroup v2 directory",
                not_cgroup.display()
            ),
        ),
        (
            with_arg(args(), "--listen", &in_use),
            format!("listening on {in_use}: Address already in use"),
        ),
        (
            with_arg(args(), "--pin-root", &unusable),
            format!(
                "--pin-root {}: {}: Not a directory (os error 20)",
                unusable.display(),
                not_dir.path().display()
            ),
        ),
    ];
    for (args, error) in cases {
        let stderr = failed_start(&args);
        let what = format!("{args:?}:\n{stderr}");
        assert!(
            attached_programs(cgroup.path()).is_empty(),
            "programs left attached by {what}"
        );
        assert!(!pins.root().exists(), "pins left by {what}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.contains(&error), "no {error:?} in the error of {what}");
        assert!(
            last.matches("os error").count() <= 1,
            "an OS error printed twice: {what}"
        );
    }
}

/// B waits for A (`--on-exit keep`) with an interface that is gone by the time it takes
/// over, so its start fails after attaching to the cgroup: B detaches its own programs and
/// removes its pins, and A's state goes on enforcing as before, without a gap.
/// An agent B that waits for the running agent's pin lock, with an interface that is gone
/// once it gets it: B fails after writing the policy. B runs in the client's namespace,
/// where the interface was.
fn failing_successor(world: &World, policy: &TempFile, pins: &PinDir) -> Agent {
    world
        .topo
        .client
        .ip("link add egress-gone type veth peer name egress-gone-p");
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", world.topo.client.name()))
        .arg("--")
        .arg(agent_bin())
        .args(egress_tests::run_args(policy, &world.cgroup, pins))
        .args(["--interface", "egress-gone"])
        .env("RUST_LOG", "info,egress_agent=debug");
    let b = Agent::spawn_command(cmd);
    b.wait_for_named("waiting_for_pins", TAKEOVER_TIMEOUT);
    world.topo.client.ip("link del egress-gone");
    b
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn a_failed_takeover_leaves_the_predecessor_enforcing() {
    if !require_root() {
        return;
    }
    let world = World::new();
    let (policy, pins, mut a) = start_keeping(&world);
    let a_programs = program_ids(&world);
    let a_links = pins.link_pins();
    let mut b = failing_successor(&world, &policy, &pins);
    let (mut allowed, mut denied) = world.loops();
    assert!(a.terminate().success());
    let status = b.wait_for_exit(TAKEOVER_TIMEOUT);
    let stderr = b.stderr_lines().join("\n");
    assert!(!status.success(), "B did not fail:\n{stderr}");
    assert_eq!(program_ids(&world), a_programs, "A's programs, alone");
    let error = stderr.lines().last().unwrap_or_default();
    assert!(
        error.contains("egress-gone")
            && error.contains("the previous agent's pinned state")
            && error.contains("cgroup-"),
        "{error}"
    );
    wait_status(
        &pins,
        &[
            "not running: the pinned programs go on enforcing",
            "1 CIDR entry",
        ],
    );
    assert_eq!(pins.link_pins(), a_links, "B's link pins are left");
    assert_loops(&mut allowed, &mut denied);
}

/// The TC programs leave with an agent that detaches on exit: on kernels before 6.6 they
/// are netlink filters, which outlive the process that added them unless it removes them.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn tc_programs_go_with_a_detaching_agent() {
    if !require_root() {
        return;
    }
    let world = World::new();
    let policy = TempFile::new(&policy_text(""));
    let mut agent = start_agent_in(
        &world.topo.client,
        &policy,
        &world.cgroup,
        &["--interface", &world.topo.client_veth],
    );
    let veth = world.topo.client_veth.clone();
    let filters = || {
        ["ingress", "egress"].map(|hook| {
            let out = world
                .topo
                .client
                .exec(&["tc", "filter", "show", "dev", &veth, hook])
                .output()
                .expect("tc runs");
            assert!(out.status.success(), "tc filter show {hook}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    let tcx = !agent
        .stderr_lines()
        .iter()
        .any(|l| l.contains("netlink filters on this kernel"));
    assert!(
        tcx || filters().iter().all(|f| !f.is_empty()),
        "no netlink filters while the agent runs: {:?}",
        filters()
    );
    assert!(agent.terminate().success());
    assert_eq!(filters(), [String::new(), String::new()], "filters left");
}

/// Runs `bpftool` with `args`, `-j` first; its JSON output.
fn bpftool_json(args: &[&str]) -> Value {
    let out = std::process::Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("cannot run bpftool");
    assert!(out.status.success(), "bpftool {args:?}");
    serde_json::from_slice(&out.stdout).expect("bpftool printed JSON")
}

/// The keys of a pinned map, each as its bytes.
fn map_keys(path: &std::path::Path) -> Vec<Vec<u8>> {
    let path = path.to_str().expect("a UTF-8 path");
    let dump = bpftool_json(&["map", "dump", "pinned", path]);
    let bytes = |v: &Value| -> Vec<u8> {
        v.as_array()
            .expect("bytes")
            .iter()
            .map(|b| {
                let hex = b.as_str().expect("a hex byte");
                u8::from_str_radix(hex.trim_start_matches("0x"), 16).expect("hex")
            })
            .collect()
    };
    dump.as_array()
        .expect("entries")
        .iter()
        .map(|e| bytes(&e["key"]))
        .collect()
}

/// Runs `bpftool map` with `args`.
fn bpftool_map(args: &[&str]) {
    let ok = std::process::Command::new("bpftool")
        .arg("map")
        .args(args)
        .status()
        .expect("cannot run bpftool")
        .success();
    assert!(ok, "bpftool map {args:?}");
}

/// A release before `HOSTS` kept single addresses in `CIDRS` as /128s, where its programs,
/// attached until the new agent has its own, look for them: a new agent keeps them there
/// until then, also when its start fails after writing the policy (the old programs go on
/// enforcing with them), and leaves them to `HOSTS` once it has taken over.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn single_addresses_a_predecessor_kept_in_its_trie_move_to_hosts_without_a_gap() {
    if !require_root() {
        return;
    }
    let world = World::new();
    let (policy, pins, mut a) = start_keeping(&world);
    let versions: Vec<_> = fs::read_dir(pins.root())
        .expect("the pin root")
        .map(|e| e.expect("an entry").path())
        .collect();
    let [version] = versions.as_slice() else {
        panic!("one version directory expected: {versions:?}");
    };
    let (cidrs, hosts) = (version.join("maps/CIDRS"), version.join("maps/HOSTS"));
    // What such a release leaves: the host in the trie (with the value this one wrote, the
    // port set being the same), nothing in HOSTS, which its pins lack. A's programs hold
    // HOSTS: emptied, they find the host in the trie only, as such a release's would.
    let host = REMOTE_V4_A.to_ipv6_mapped().octets();
    let (cidrs_at, hosts_at) = (
        cidrs.to_str().expect("UTF-8"),
        hosts.to_str().expect("UTF-8"),
    );
    let mut lookup = vec!["map", "lookup", "pinned", hosts_at, "key", "hex"];
    let host_hex = hex(&host);
    lookup.extend(host_hex.iter().map(String::as_str));
    let value: Vec<String> = bpftool_json(&lookup)["value"]
        .as_array()
        .expect("the host's value")
        .iter()
        .map(|b| {
            b.as_str()
                .expect("a hex byte")
                .trim_start_matches("0x")
                .into()
        })
        .collect();
    let mut update = vec![
        "update", "pinned", cidrs_at, "key", "hex", "80", "00", "00", "00",
    ];
    update.extend(host_hex.iter().map(String::as_str));
    update.extend(["value", "hex"]);
    update.extend(value.iter().map(String::as_str));
    bpftool_map(&update);
    let mut delete = vec!["delete", "pinned", hosts_at, "key", "hex"];
    delete.extend(host_hex.iter().map(String::as_str));
    bpftool_map(&delete);
    fs::remove_file(&hosts).expect("unpin HOSTS");

    // B writes the policy, then fails: A's programs stay, reading the trie B left.
    let mut b = failing_successor(&world, &policy, &pins);
    let (mut allowed, mut denied) = world.loops();
    assert!(a.terminate().success());
    assert!(
        !b.wait_for_exit(TAKEOVER_TIMEOUT).success(),
        "B did not fail"
    );
    wait_loops(&allowed, &denied);

    let c = start_pinned_agent(&agent_bin(), &policy, &world.cgroup, &pins, None, &KEEP);
    c.wait_for_named("took_over", TAKEOVER_TIMEOUT);
    assert_loops(&mut allowed, &mut denied);
    let trie_hosts: Vec<_> = map_keys(&cidrs)
        .into_iter()
        .filter(|k| k[..4] == [128, 0, 0, 0])
        .collect();
    assert!(trie_hosts.is_empty(), "/128s left in CIDRS: {trie_hosts:?}");
    assert_eq!(map_keys(&hosts), vec![host.to_vec()]);
}

/// Bytes as `bpftool` takes them after `hex`, one argument each.
fn hex(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
