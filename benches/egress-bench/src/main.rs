//! `egress-bench`: the Rust half of the benchmark harness (`benches/run.sh` is the other).
//!
//! ```text
//! egress-bench verdict [--sizes ...] [--repeat 1000000] [--flows 20000] [--trials 3] [--entries hosts]
//! egress-bench addresses N
//! egress-bench serve ADDR FIRST_PORT PORTS
//! egress-bench conn-rate ADDR FIRST_PORT PORTS [--seconds 5] [--threads 2] [--timeout-ms 1000] [--cgroup DIR]
//! egress-bench dns-serve ADDR PORT
//! egress-bench dns-flood SERVER PORT [--names 4096] [--zones 1000] [--rate 0] [--count N] [--seconds 5] [--window 256] [--cgroup DIR]
//! egress-bench learn [--names 4096] [--zones 1000] [--rounds 3]
//! egress-bench udp-flood ADDR PORT [--seconds 5] [--threads NCPU] [--payload 64]
//! egress-bench udp-sink ADDR PORT [--threads 1]
//! ```
use std::{net::IpAddr, path::PathBuf, process::ExitCode, str::FromStr, time::Duration};

use anyhow::{Context as _, Result, anyhow, bail};

mod addrs;
mod conn;
mod dns;
mod frames;
mod harness;
mod learn;
mod udp;
mod verdict;

const USAGE: &str = "usage:
  egress-bench verdict [--sizes 10,1000,65536,100000,1000000] [--repeat 1000000] [--flows 20000]
                       [--trials 3] [--entries hosts|prefixes]
      per-packet cost of the egress program (BPF_PROG_TEST_RUN), as Markdown tables;
      --entries prefixes: IPv6 /127s (the CIDRS trie) instead of single addresses (HOSTS)
  egress-bench addresses N
      the N allowed IPv6 addresses every benchmark uses, the traffic target last
  egress-bench serve ADDR FIRST_PORT PORTS
      accept (and reset) TCP connections on PORTS ports from FIRST_PORT, until killed
  egress-bench conn-rate ADDR FIRST_PORT PORTS [--seconds 5] [--threads 2] [--timeout-ms 1000] [--cgroup DIR]
      open TCP connections for a while, each on a fresh (source, destination port) pair;
      prints one JSON line
  egress-bench dns-serve ADDR PORT
      a resolver answering AAAA queries for n<k>.z<i>.bench.test with 16 addresses each
  egress-bench dns-flood SERVER PORT [--names 4096] [--zones 1000] [--rate 0] [--count N]
                         [--seconds 5] [--window 256] [--cgroup DIR]
      queries for names n<k>.z<k % zones>.bench.test, paced (--rate per second, or 0: at
      most --window outstanding); prints one JSON line
  egress-bench learn [--names 4096] [--zones 1000] [--rounds 3]
      dns-serve's answers through the kernel program (BPF_PROG_TEST_RUN) and the agent's
      learner on the real maps: the learner's CPU time per answer, as a Markdown table
  egress-bench udp-flood ADDR PORT [--seconds 5] [--threads NCPU] [--payload 64]
      UDP datagrams of --payload bytes as fast as it goes, one connected socket per thread
      (sendmmsg); prints one JSON line
  egress-bench udp-sink ADDR PORT [--threads 1]
      receive and drop UDP datagrams on ADDR PORT (SO_REUSEPORT sockets), until killed";

/// Splits `args` into positionals and `--flag value` pairs.
struct Args {
    positional: Vec<String>,
    flags: Vec<(String, String)>,
}

impl Args {
    fn parse(args: impl Iterator<Item = String>) -> Result<Self> {
        let mut positional = Vec::new();
        let mut flags = Vec::new();
        let mut args = args;
        while let Some(a) = args.next() {
            if let Some(name) = a.strip_prefix("--") {
                let value = args
                    .next()
                    .ok_or_else(|| anyhow!("--{name} needs a value"))?;
                flags.push((name.to_owned(), value));
            } else {
                positional.push(a);
            }
        }
        Ok(Self { positional, flags })
    }

    fn flag<T: FromStr>(&mut self, name: &str, default: T) -> Result<T> {
        match self.flags.iter().position(|(n, _)| n == name) {
            Some(i) => {
                let (_, v) = self.flags.remove(i);
                v.parse().map_err(|_| anyhow!("bad --{name} {v:?}"))
            }
            None => Ok(default),
        }
    }

    fn positional<T: FromStr>(&self, i: usize, what: &str) -> Result<T> {
        let v = self
            .positional
            .get(i)
            .ok_or_else(|| anyhow!("missing {what}"))?;
        v.parse().map_err(|_| anyhow!("bad {what} {v:?}"))
    }

    /// Refuses anything not consumed.
    fn done(&self, positionals: usize) -> Result<()> {
        if let Some((n, _)) = self.flags.first() {
            bail!("unknown flag --{n}");
        }
        if self.positional.len() != positionals {
            bail!(
                "expected {positionals} arguments, got {}",
                self.positional.len()
            );
        }
        Ok(())
    }
}

fn sizes(text: &str) -> Result<Vec<usize>> {
    text.split(',')
        .map(|s| s.trim().parse().with_context(|| format!("bad size {s:?}")))
        .collect()
}

fn main_inner() -> Result<()> {
    let mut argv = std::env::args().skip(1);
    let command = argv.next().ok_or_else(|| anyhow!("no command"))?;
    let mut args = Args::parse(argv)?;
    match command.as_str() {
        "verdict" => {
            let opts = verdict::Options {
                sizes: sizes(&args.flag("sizes", "10,1000,65536,100000,1000000".to_owned())?)?,
                repeat: args.flag("repeat", 1_000_000)?,
                flows: args.flag("flows", 20_000)?,
                trials: args.flag("trials", 3)?,
                prefixes: match args.flag("entries", "hosts".to_owned())?.as_str() {
                    "hosts" => false,
                    "prefixes" => true,
                    other => bail!("--entries: hosts or prefixes, not {other:?}"),
                },
            };
            args.done(0)?;
            verdict::run(&opts)
        }
        "addresses" => {
            args.done(1)?;
            let n: usize = args.positional(0, "N")?;
            let mut out = String::with_capacity(n * 26);
            for a in addrs::v6_list(n) {
                out.push_str(&a.to_string());
                out.push('\n');
            }
            print!("{out}");
            Ok(())
        }
        "serve" => {
            args.done(3)?;
            conn::serve(
                args.positional::<IpAddr>(0, "ADDR")?,
                args.positional(1, "FIRST_PORT")?,
                args.positional(2, "PORTS")?,
            )
        }
        "conn-rate" => {
            let opts = conn::RateOptions {
                addr: args.positional(0, "ADDR")?,
                first_port: args.positional(1, "FIRST_PORT")?,
                ports: args.positional(2, "PORTS")?,
                seconds: args.flag("seconds", 5.0)?,
                threads: args.flag("threads", 2)?,
                timeout: Duration::from_millis(args.flag("timeout-ms", 1000)?),
                cgroup: match args.flag("cgroup", String::new())? {
                    s if s.is_empty() => None,
                    s => Some(PathBuf::from(s)),
                },
            };
            args.done(3)?;
            if opts.ports == 0 || u32::from(opts.first_port) + u32::from(opts.ports) > 65_536 {
                bail!("bad port range");
            }
            if !(opts.seconds > 0.0 && opts.seconds <= 600.0) {
                bail!("--seconds must be in (0, 600]");
            }
            conn::rate(&opts)
        }
        "dns-serve" => {
            args.done(2)?;
            dns::serve(
                args.positional::<IpAddr>(0, "ADDR")?,
                args.positional(1, "PORT")?,
            )
        }
        "dns-flood" => {
            let opts = dns::FloodOptions {
                server: std::net::SocketAddr::new(
                    args.positional::<IpAddr>(0, "SERVER")?,
                    args.positional(1, "PORT")?,
                ),
                names: args.flag("names", 4096)?,
                zones: args.flag("zones", 1000)?,
                rate: args.flag("rate", 0)?,
                count: args.flag("count", u64::MAX)?,
                seconds: args.flag("seconds", 5.0)?,
                window: args.flag("window", 256)?,
                cgroup: match args.flag("cgroup", String::new())? {
                    s if s.is_empty() => None,
                    s => Some(PathBuf::from(s)),
                },
            };
            args.done(2)?;
            if !(opts.seconds > 0.0 && opts.seconds <= 600.0) {
                bail!("--seconds must be in (0, 600]");
            }
            dns::flood(&opts)
        }
        "learn" => {
            let opts = learn::Options {
                names: args.flag("names", 4096)?,
                zones: args.flag("zones", 1000)?,
                rounds: args.flag("rounds", 3)?,
            };
            args.done(0)?;
            learn::run(&opts)
        }
        "udp-flood" => {
            let opts = udp::FloodOptions {
                dst: std::net::SocketAddr::new(
                    args.positional::<IpAddr>(0, "ADDR")?,
                    args.positional(1, "PORT")?,
                ),
                seconds: args.flag("seconds", 5.0)?,
                threads: args.flag(
                    "threads",
                    std::thread::available_parallelism()
                        .map_or(1, |n| u16::try_from(n.get()).unwrap_or(u16::MAX)),
                )?,
                payload: args.flag("payload", 64)?,
            };
            args.done(2)?;
            if !(opts.seconds > 0.0 && opts.seconds <= 600.0) {
                bail!("--seconds must be in (0, 600]");
            }
            udp::check_payload(opts.payload)?;
            if opts.threads == 0 {
                bail!("--threads must be at least 1");
            }
            udp::flood(&opts)
        }
        "udp-sink" => {
            let threads = args.flag("threads", 1)?;
            args.done(2)?;
            udp::sink(
                std::net::SocketAddr::new(
                    args.positional::<IpAddr>(0, "ADDR")?,
                    args.positional(1, "PORT")?,
                ),
                threads,
            )
        }
        other => bail!("unknown command {other:?}"),
    }
}

fn main() -> ExitCode {
    match main_inner() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egress-bench: {e:#}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
