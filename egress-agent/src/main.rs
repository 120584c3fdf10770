//! `egress-agent`: the command line.
use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use egress_agent::{
    compile::compile,
    policy::{self, Mode},
    run::{RunOptions, run},
};

#[derive(Parser)]
#[command(version, about = "eBPF egress enforcer for Kubernetes nodes")]
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
    },
    /// Validate a policy and print its effective rules, one per line.
    Check {
        /// The policy file (YAML).
        #[arg(long)]
        config: PathBuf,
    },
}

fn check(config: &std::path::Path) -> anyhow::Result<()> {
    let policy = policy::load(config)?;
    compile(&policy).map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
    println!("# mode: {}", policy.mode);
    for rule in &policy.rules {
        println!("{rule}");
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Run {
            config,
            mode,
            cgroup,
            interfaces,
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
