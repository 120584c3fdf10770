//! `egress-agent`: the command line.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Parser, Subcommand};
use egress_agent::{
    compile::compile,
    dns::resolvers,
    explain::{self, Proto},
    kubeconfig::{self, DEFAULT_KUBECONFIG, KubeletApiServer},
    metrics, origins,
    pin::{DEFAULT_PIN_ROOT, PinRoot},
    podinfo::DEFAULT_POD_LOGS,
    policy::{
        self, Mode, Policy,
        presets::{PRESETS, Params},
    },
    run::{OnExit, RunOptions, run},
    status, suggest,
};

#[derive(Parser)]
#[command(version = metrics::VERSION, about = "eBPF egress enforcer for Kubernetes nodes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the kernel programs, fill the maps from the policy and enforce it until
    /// SIGTERM/SIGINT, printing denied (or audited) packets as JSON lines on stdout.
    Run {
        /// The policy file (YAML).
        #[arg(long, env = "EGRESS_CONFIG")]
        config: PathBuf,
        /// Overrides the policy's `mode`.
        #[arg(long, env = "EGRESS_MODE", value_enum)]
        mode: Option<Mode>,
        /// The cgroup v2 directory to enforce; default: the root of the host's cgroup2 mount.
        #[arg(long, env = "EGRESS_CGROUP")]
        cgroup: Option<PathBuf>,
        /// Also enforce traffic leaving this interface (TC), e.g. forwarded pod traffic.
        #[arg(long = "interface")]
        interfaces: Vec<String>,
        /// The node's ends of the links to workloads (a pod's veth: `azv*` under Azure CNI,
        /// `cali*` under Calico; the bridge `cbr0` under kubenet): an interface name, or a
        /// prefix followed by `*`. The node's routes must lead each pod's address to it.
        /// Present and future matches get the TC programs facing the workload, which decide
        /// what packet sockets send too. The variable takes a comma-separated list.
        #[arg(
            long = "workload-interface",
            value_name = "NAME|PREFIX*",
            env = "EGRESS_WORKLOAD_INTERFACES",
            value_delimiter = ','
        )]
        workload_interfaces: Vec<String>,
        /// Where to serve /metrics (Prometheus), /healthz and /readyz; port 0 picks a free one.
        #[arg(long, env = "EGRESS_LISTEN", default_value = "127.0.0.1:9977")]
        listen: SocketAddr,
        /// Where maps and links are pinned (in bpffs; mounted on the parent if missing). A
        /// starting agent takes over what a previous one left here without a gap.
        #[arg(long, env = "EGRESS_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        /// `keep` leaves the programs enforcing when the agent stops or crashes (for a
        /// DaemonSet: an upgrade or a crash never opens the node); `detach` removes every
        /// attachment and pin on SIGTERM/SIGINT.
        #[arg(long, env = "EGRESS_ON_EXIT", value_enum, default_value_t = OnExit::Detach)]
        on_exit: OnExit,
        #[command(flatten)]
        kubeconfig: KubeconfigArg,
        /// The root of the kubelet's log layout (`pods/<namespace>_<pod>_<uid>/`,
        /// `containers/<pod>_<namespace>_<container>-<id>.log`): it names the namespace,
        /// pod and container of a pod's events.
        #[arg(long, env = "EGRESS_POD_LOGS", default_value = DEFAULT_POD_LOGS)]
        pod_logs: PathBuf,
        /// Also print each address learned from a DNS answer as a `learned` event on stdout
        /// (name, address, TTL, ports): an audit trail of what DNS opened, one line an
        /// address, so off by default.
        #[arg(long, env = "EGRESS_LEARNED_EVENTS")]
        learned_events: bool,
    },
    /// Print what the pinned state enforces (mode, attachments, rule counts, learned
    /// addresses with their names and remaining TTL), whether or not an agent runs.
    Status {
        /// Where the agent pinned its maps and links: the `--pin-root` it runs with.
        #[arg(long, env = "EGRESS_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        /// Also every CIDR and name entry in the maps, with its ports and the policy entry
        /// it comes from, and what passes whatever the policy says.
        #[arg(long)]
        rules: bool,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        kubeconfig: KubeconfigArg,
    },
    /// Say whether a new connection to ADDR PORT would pass the live (pinned) maps, by
    /// which rule or learned name, or why not.
    Explain {
        addr: IpAddr,
        /// The destination port (ignored for ICMP).
        #[arg(default_value_t = 0)]
        port: u16,
        #[arg(long, value_enum, default_value_t = Proto::Tcp)]
        proto: Proto,
        #[arg(long, env = "EGRESS_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        kubeconfig: KubeconfigArg,
    },
    /// Remove every attachment and pin a stopped agent left (`--on-exit keep`).
    Uninstall {
        /// Where the agent pinned its maps and links: the `--pin-root` it ran with.
        #[arg(long, env = "EGRESS_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
    },
    /// Validate a policy and print its effective rules, one per line.
    Check {
        /// The policy file (YAML).
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        kubeconfig: KubeconfigArg,
    },
    /// Print a policy (YAML) that would have allowed every flow in audit or deny events:
    /// one rule per name with the ports seen, wildcards for enough siblings under a zone
    /// its owner alone fills, a /32 or /128 for an address reached without a name.
    Suggest {
        /// Event logs (the agent's stdout; `kubectl logs --prefix` prefixes are fine);
        /// `-` for standard input.
        #[arg(long, required = true, num_args = 1..)]
        events: Vec<PathBuf>,
        /// Distinct sibling names under one zone that become a wildcard; 0: never.
        #[arg(long, default_value_t = 3)]
        wildcard_min: usize,
        /// Leave out the flows this preset allows, and name it in the suggestion.
        #[arg(long, conflicts_with = "policy")]
        with_presets: Option<String>,
        /// The cluster's Azure region, for `--with-presets`.
        #[arg(long, requires = "with_presets")]
        location: Option<String>,
        /// Leave out the flows this policy already allows: the suggestion is what to add.
        #[arg(long)]
        policy: Option<PathBuf>,
    },
    /// List the built-in presets (name, parameters, description), one per line.
    Presets {
        #[command(subcommand)]
        command: Option<PresetsCommand>,
    },
}

/// Where the cluster's API server name is found when the policy does not give it.
#[derive(clap::Args)]
struct KubeconfigArg {
    /// The kubelet's kubeconfig: its `server:` names the cluster's API server, which the
    /// cloud presets then allow instead of every API server in the region. Missing: the
    /// regional wildcard stays, with a warning.
    #[arg(long, env = "EGRESS_KUBECONFIG", default_value = DEFAULT_KUBECONFIG)]
    kubeconfig: PathBuf,
}

impl KubeconfigArg {
    /// The API server name in the kubeconfig; a file that cannot be used is a warning.
    fn api_server(&self) -> Option<KubeletApiServer> {
        kubeconfig::api_server(&self.kubeconfig)
            .inspect_err(|e| {
                eprintln!("egress-agent: warning: {e}: its API server name is not used")
            })
            .ok()
            .flatten()
    }
}

#[derive(Subcommand)]
enum PresetsCommand {
    /// List the built-in presets, as `egress-agent presets` does.
    List,
    /// Print the rules a preset adds to a policy, one per line, as `check` prints them.
    Show {
        /// The preset, as listed by `egress-agent presets`.
        name: String,
        /// The cluster's Azure region, e.g. `eastus`.
        #[arg(long)]
        location: Option<String>,
        /// The cluster's API server name (or address), as `api_server` in a policy: the
        /// cloud presets allow that name instead of every API server in the region.
        #[arg(long)]
        api_server: Option<String>,
        #[command(flatten)]
        kubeconfig: KubeconfigArg,
    },
}

fn check(config: &std::path::Path, kubeconfig: &KubeconfigArg) -> anyhow::Result<()> {
    let policy = policy::load(config, kubeconfig.api_server().as_ref())?;
    compile(&policy).map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
    println!("# mode: {}", policy.mode);
    let dns = &policy.dns;
    let (trusted, source) = match resolvers::trusted(dns) {
        Ok(t) => (t.addrs, t.source.to_owned()),
        Err(e) => (Vec::new(), format!("nowhere: {e:#}")),
    };
    let source = if dns.resolvers.is_none() {
        format!("{source} (the policy has no dns.resolvers: the node's resolvers are trusted)")
    } else {
        source
    };
    println!(
        "# dns: min_ttl {}s, max_ttl {}s, max_ips_per_name {}, max_ips {}",
        dns.min_ttl, dns.max_ttl, dns.max_ips_per_name, dns.max_ips
    );
    for allow in origins::implicit_allows(&trusted, &source) {
        println!("# implicit: {}  ({})", allow.what, allow.why);
    }
    print_rules(&policy);
    Ok(())
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn uninstall(root: PathBuf) -> anyhow::Result<()> {
    let pins = PinRoot::new(root);
    let Some(_lock) = pins.lock(false)? else {
        println!("nothing is pinned under {}", pins.root().display());
        return Ok(());
    };
    let removal = pins.remove_all();
    for link in &removal.detached {
        println!("detached {}", link.point);
    }
    if removal.left.is_empty() {
        println!("removed {}", pins.root().display());
        return Ok(());
    }
    for left in &removal.left {
        println!("left {left}");
    }
    anyhow::bail!(
        "{} entries left under {}, each named above",
        removal.left.len(),
        pins.root().display()
    )
}

/// The policy's notices as comments, then its rules.
fn print_rules(policy: &Policy) {
    for notice in &policy.notices {
        println!("# {notice}");
    }
    for line in policy::rule_lines(&policy.rules) {
        println!("{line}");
    }
    for list in &policy.lists {
        println!(
            "{} prefixes from {} {}  # allow[{}]",
            list.prefixes.len(),
            list.path.display(),
            list.ports,
            list.entry
        );
    }
}

fn list_presets() {
    let params: Vec<String> = PRESETS
        .iter()
        .map(|p| {
            let keys: Vec<&str> = p.params.iter().map(|k| k.key()).collect();
            if keys.is_empty() {
                "-".to_string()
            } else {
                keys.join(",")
            }
        })
        .collect();
    let name_width = PRESETS
        .iter()
        .map(|p| p.name.len())
        .max()
        .unwrap_or_default();
    let params_width = params.iter().map(String::len).max().unwrap_or_default();
    for (preset, params) in PRESETS.iter().zip(params) {
        println!(
            "{:name_width$}  {params:params_width$}  {}",
            preset.name, preset.description
        );
    }
}

/// A printing command whose reader has gone (`check … | head`) ends as `cat` would, by
/// SIGPIPE, instead of panicking in `println!`. Rust ignores SIGPIPE for every process;
/// `run` keeps it ignored, so a closed socket is an error there, not the agent's end.
fn end_quietly_on_a_closed_pipe() {
    // SAFETY: restores the default action of one signal before any thread is started.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        end_quietly_on_a_closed_pipe();
    }
    let result = match cli.command {
        Command::Check { config, kubeconfig } => check(&config, &kubeconfig),
        Command::Presets {
            command: None | Some(PresetsCommand::List),
        } => {
            list_presets();
            Ok(())
        }
        Command::Presets {
            command:
                Some(PresetsCommand::Show {
                    name,
                    location,
                    api_server,
                    kubeconfig,
                }),
        } => policy::preset_rules(
            &name,
            Params { location },
            api_server,
            kubeconfig.api_server().as_ref(),
        )
        .map(|policy| print_rules(&policy))
        .map_err(anyhow::Error::from),
        Command::Status {
            pin_root,
            rules,
            json,
            kubeconfig,
        } => status::collect(
            &PinRoot::new(pin_root),
            rules,
            kubeconfig.api_server().as_ref(),
        )
        .and_then(|s| {
            if json {
                print_json(&s)
            } else {
                status::text(&s).map(|t| print!("{t}"))
            }
        }),
        Command::Explain {
            addr,
            port,
            proto,
            pin_root,
            json,
            kubeconfig,
        } => explain::explain(
            &PinRoot::new(pin_root),
            addr,
            port,
            proto,
            kubeconfig.api_server().as_ref(),
        )
        .and_then(|e| {
            if json {
                print_json(&e)
            } else {
                explain::text(&e).map(|t| print!("{t}"))
            }
        }),
        Command::Uninstall { pin_root } => uninstall(pin_root),
        Command::Suggest {
            events,
            wildcard_min,
            with_presets,
            location,
            policy,
        } => suggest::command(&events, wildcard_min, with_presets, location, policy),
        Command::Run {
            config,
            mode,
            cgroup,
            interfaces,
            workload_interfaces,
            listen,
            pin_root,
            on_exit,
            kubeconfig,
            pod_logs,
            learned_events,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| {
                rt.block_on(run(RunOptions {
                    config,
                    mode,
                    cgroup,
                    interfaces,
                    workload_interfaces,
                    listen,
                    pin_root,
                    on_exit,
                    kubeconfig: kubeconfig.kubeconfig,
                    pod_logs,
                    learned_events,
                }))
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egress-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
