//! `egress-agent`: the command line.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use egress_agent::{
    compile::compile,
    metrics,
    pin::{DEFAULT_PIN_ROOT, PinRoot},
    policy::{self, Mode, Rule},
    presets::{PRESETS, Params},
    run::{OnExit, RunOptions, run},
    status,
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
        #[arg(long, env = "EGRESS_MODE")]
        mode: Option<Mode>,
        /// The cgroup v2 directory to enforce; default: the root of the host's cgroup2 mount.
        #[arg(long, env = "EGRESS_CGROUP")]
        cgroup: Option<PathBuf>,
        /// Also enforce traffic leaving this interface (TC), e.g. forwarded pod traffic.
        #[arg(long = "interface")]
        interfaces: Vec<String>,
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
    },
    /// Print what the pinned state enforces (mode, attachments, rule counts, learned
    /// addresses with their names and remaining TTL), whether or not an agent runs.
    Status {
        #[arg(long, env = "EGRESS_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
    },
    /// Remove every attachment and pin a stopped agent left (`--on-exit keep`).
    Uninstall {
        #[arg(long, env = "EGRESS_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
    },
    /// Validate a policy and print its effective rules, one per line.
    Check {
        /// The policy file (YAML).
        #[arg(long)]
        config: PathBuf,
    },
    /// List the built-in presets (name, parameters, description), one per line.
    Presets {
        #[command(subcommand)]
        command: Option<PresetsCommand>,
    },
}

#[derive(Subcommand)]
enum PresetsCommand {
    /// Print the rules a preset adds to a policy, one per line, as `check` prints them.
    Show {
        /// The preset, as listed by `egress-agent presets`.
        name: String,
        /// The cluster's Azure region, e.g. `eastus`.
        #[arg(long)]
        location: Option<String>,
        /// dev-spaces: the controller's exact name, `azds-<guid>.<location>.azds.io`.
        #[arg(long, visible_alias = "name")]
        fqdn: Option<String>,
    },
}

fn check(config: &std::path::Path) -> anyhow::Result<()> {
    let policy = policy::load(config)?;
    compile(&policy).map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
    println!("# mode: {}", policy.mode);
    print_rules(&policy.rules);
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

fn print_rules(rules: &[Rule]) {
    for line in policy::rule_lines(rules) {
        println!("{line}");
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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Presets { command: None } => {
            list_presets();
            Ok(())
        }
        Command::Presets {
            command:
                Some(PresetsCommand::Show {
                    name,
                    location,
                    fqdn,
                }),
        } => policy::preset_rules(&name, Params { location, fqdn })
            .map(|rules| print_rules(&rules))
            .map_err(anyhow::Error::from),
        Command::Status { pin_root } => {
            status::report(&PinRoot::new(pin_root)).map(|report| print!("{report}"))
        }
        Command::Uninstall { pin_root } => uninstall(pin_root),
        Command::Run {
            config,
            mode,
            cgroup,
            interfaces,
            listen,
            pin_root,
            on_exit,
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
                    listen,
                    pin_root,
                    on_exit,
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
