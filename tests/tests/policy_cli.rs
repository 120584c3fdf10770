//! What the policy commands print for the mistakes operators make: `presets show` and
//! `check` run as the real binary, their output and exit status checked. Nothing here needs
//! root or touches the kernel.
use std::{
    io::Read,
    os::unix::process::ExitStatusExt,
    process::{Command, Output, Stdio},
};

use egress_tests::{TempFile, agent_bin};

/// Runs `egress-agent ARGS...` to completion.
fn agent(args: &[&str]) -> Output {
    Command::new(agent_bin())
        .args(args)
        .output()
        .expect("cannot run egress-agent")
}

/// The error line of a command that must fail.
#[track_caller]
fn refused(args: &[&str]) -> String {
    let out = agent(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?} printed rules");
    stderr
}

/// The stdout of a command that must succeed.
#[track_caller]
fn printed(args: &[&str]) -> String {
    let out = agent(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const NO_KUBECONFIG: &str = "/nonexistent/kubelet/kubeconfig";

#[test]
fn presets_show_refuses_a_location_that_is_no_region_of_its_cloud() {
    for (args, want) in [
        (
            ["aks-global", "--location", "eastsu"],
            "egress-agent: command line: presets[0] (aks-global): location `eastsu` is not a region of Azure (global); did you mean `eastus`?\n",
        ),
        (
            ["aks-china", "--location", "eastus"],
            "egress-agent: command line: presets[0] (aks-china): location `eastus` is a region of Azure (global), not of Azure China 21Vianet; use the `aks-global` preset there, or a region of Azure China 21Vianet: chinaeast, chinaeast2, chinaeast3, chinanorth, chinanorth2, chinanorth3\n",
        ),
    ] {
        let mut full = vec!["presets", "show"];
        full.extend(args);
        assert_eq!(refused(&full), want);
    }
    let mars = refused(&["presets", "show", "aks-global", "--location", "mars"]);
    assert!(
        mars.starts_with("egress-agent: command line: presets[0] (aks-global): location `mars` is not a region of Azure (global); expected one of: australiacentral, "),
        "{mars}"
    );
}

#[test]
fn presets_list_is_the_bare_presets_command() {
    let list = printed(&["presets", "list"]);
    assert_eq!(list, printed(&["presets"]));
    assert!(list.starts_with("aks-global "), "{list}");
    assert!(!list.contains("dev-spaces"), "{list}");
}

/// The shape of the kubeconfig AKS writes for the kubelet.
fn kubeconfig(server: &str) -> TempFile {
    TempFile::new(&format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: localcluster\n  cluster:\n    certificate-authority: /etc/kubernetes/certs/ca.crt\n    server: {server}\ncurrent-context: localclustercontext\n"
    ))
}

const API_SERVER: &str = "myaks-dns-4f1e2d3c.hcp.eastus.azmk8s.io";

/// `presets show aks-global --location eastus` with the kubeconfig at `kubeconfig`.
fn show_aks_global_eastus(kubeconfig: &str) -> String {
    printed(&[
        "presets",
        "show",
        "aks-global",
        "--location",
        "eastus",
        "--kubeconfig",
        kubeconfig,
    ])
}

#[test]
fn the_kubelets_api_server_replaces_the_regional_wildcard() {
    let kube = kubeconfig(&format!("https://{API_SERVER}:443"));
    let kube_path = kube.path().to_str().expect("temp paths are UTF-8");
    let shown = show_aks_global_eastus(kube_path);
    let mut lines = shown.lines();
    assert_eq!(
        lines.next(),
        Some(
            format!("# note: presets[0] (aks-global): allows the cluster's own API server `{API_SERVER}` (from the kubelet's kubeconfig {kube_path}) in place of `*.hcp.eastus.azmk8s.io`")
                .as_str()
        )
    );
    assert!(
        lines.next().is_some_and(
            |l| l.starts_with(&format!("{API_SERVER} TCP:22 TCP:443 TCP:9000 UDP:1194 "))
        ),
        "{shown}"
    );
    assert!(!shown.lines().any(|l| l.starts_with("*.hcp.")), "{shown}");

    // `check` does the same for a policy, and `api_server` as a name wins over the file.
    let policy = TempFile::new(
        "presets: [{name: aks-global, location: eastus}]\napi_server: mine.hcp.eastus.azmk8s.io\n",
    );
    let policy_path = policy.path().to_str().expect("temp paths are UTF-8");
    let checked = printed(&["check", "--config", policy_path, "--kubeconfig", kube_path]);
    assert!(
        checked.contains("# note: presets[0] (aks-global): allows the cluster's own API server `mine.hcp.eastus.azmk8s.io` (from `api_server`) in place of `*.hcp.eastus.azmk8s.io`"),
        "{checked}"
    );
    assert!(!checked.contains(API_SERVER), "{checked}");
}

#[test]
fn without_a_kubeconfig_the_wildcard_stays_with_a_warning() {
    let shown = show_aks_global_eastus(NO_KUBECONFIG);
    assert!(
        shown.starts_with("# warning: presets[0] (aks-global): `*.hcp.eastus.azmk8s.io` admits every AKS API server in eastus"),
        "{shown}"
    );
    assert!(
        shown.contains("\n*.hcp.eastus.azmk8s.io TCP:22 TCP:443 TCP:9000 UDP:1194 "),
        "{shown}"
    );
}

#[test]
fn check_refuses_a_wildcard_over_a_public_suffix_and_warns_for_a_shared_zone() {
    let broad = TempFile::new("allow:\n  - fqdn: \"*.com\"\n");
    let path = broad.path().to_str().expect("temp paths are UTF-8");
    let message = refused(&["check", "--config", path]);
    assert!(
        message.contains(&format!("{path}: line 2: allow[0] (fqdn *.com): `*.com` admits every domain anyone registers under `com`, a public suffix")),
        "{message}"
    );
    let shared =
        TempFile::new("allow:\n  - fqdn: \"*.azurewebsites.net\"\n    ports: [HTTPS:443]\n");
    let path = shared.path().to_str().expect("temp paths are UTF-8");
    let checked = printed(&["check", "--config", path]);
    assert!(
        checked.contains("# warning: allow[0] (fqdn *.azurewebsites.net): `*.azurewebsites.net` admits every name anyone creates under `azurewebsites.net`"),
        "{checked}"
    );
}

#[test]
fn check_names_every_mistake_with_its_line_and_fix() {
    let policy = TempFile::new(
        "mode: audit
allow:
  - cidr: 203.0.113.0/24
    ports: [HTTPS: 443]
  - fqdn: example.com
    ports: [TCP:-1]
presets:
  - {name: aks-global, location: eastsu}
",
    );
    let path = policy.path().to_str().expect("temp paths are UTF-8");
    assert_eq!(
        refused(&["check", "--config", path, "--kubeconfig", NO_KUBECONFIG]),
        format!(
            "egress-agent: {path}: line 3: allow[0] (cidr 203.0.113.0/24): ports item `HTTPS: 443` is a mapping to YAML, because of the space after the colon; write `HTTPS:443`
{path}: line 5: allow[1] (fqdn example.com): `TCP:-1`: `-1` is not a port number; ports run from 1 to 65535
{path}: line 8: presets[0] (aks-global): location `eastsu` is not a region of Azure (global); did you mean `eastus`?
"
        )
    );
    let star = TempFile::new("allow:\n  - fqdn: *.microsoft.com\n    ports: [HTTPS:443]\n");
    let path = star.path().to_str().expect("temp paths are UTF-8");
    assert_eq!(
        refused(&["check", "--config", path]),
        format!(
            "egress-agent: {path}: line 2: allow[0] (fqdn: *.microsoft.com): a value that starts with `*` must be quoted, or YAML reads it as an alias; write fqdn: \"*.microsoft.com\"\n"
        )
    );
}

#[test]
fn a_reader_that_stops_early_ends_the_listing_without_a_panic() {
    let (reader, writer) = std::io::pipe().expect("cannot make a pipe");
    drop(reader);
    let mut child = Command::new(agent_bin())
        .args(["presets", "show", "aks-global", "--location", "eastus"])
        .args(["--kubeconfig", NO_KUBECONFIG])
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run egress-agent");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr is piped")
        .read_to_string(&mut stderr)
        .expect("cannot read stderr");
    let status = child.wait().expect("cannot wait for egress-agent");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "{status:?}: {stderr}");
}
