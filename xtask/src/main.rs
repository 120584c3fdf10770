//! Developer tasks. `cargo xtask build-ebpf` builds the kernel object exactly as
//! `egress-agent/build.rs` (aya-build) does, and copies it to `target/ebpf/egress` for
//! inspection with `bpftool`, `llvm-objdump` or `readelf`. `cargo xtask bench [ARGS]` runs
//! the benchmark harness, `benches/run.sh [ARGS]` (see BENCHMARKS.md), and
//! `cargo xtask kernel-matrix [ARGS]` the kernel matrix, `scripts/kernel-matrix.sh [ARGS]`.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};

/// The flags aya-build 0.2.0 passes, so that this build and the embedded one are the same.
const RUSTFLAGS: &str = "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn build_ebpf() -> anyhow::Result<()> {
    let root = workspace_root();
    let status = Command::new("rustup")
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--package",
            "egress-ebpf",
        ])
        .args(["--bins", "--release", "--target", "bpfel-unknown-none"])
        .args(["-Z", "build-std=core"])
        .current_dir(&root)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env("CARGO_ENCODED_RUSTFLAGS", RUSTFLAGS)
        .status()
        .context("running cargo +nightly (is the nightly toolchain installed?)")?;
    if !status.success() {
        bail!("building egress-ebpf failed ({status})");
    }
    let built = root.join("target/bpfel-unknown-none/release/egress");
    let out_dir = root.join("target/ebpf");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out = out_dir.join("egress");
    fs::copy(&built, &out)
        .with_context(|| format!("copying {} to {}", built.display(), out.display()))?;
    println!("{}", out.display());
    Ok(())
}

/// Runs the workspace's script `path` with `args`; its exit status becomes ours.
fn run_script(path: &str, args: Vec<String>) -> anyhow::Result<()> {
    let script = workspace_root().join(path);
    let status = Command::new("bash")
        .arg(&script)
        .args(&args)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut args = env::args().skip(1);
    let task = args.next();
    let result = match task.as_deref() {
        Some("build-ebpf") => build_ebpf(),
        Some("bench") => run_script("benches/run.sh", args.collect()),
        Some("kernel-matrix") => run_script("scripts/kernel-matrix.sh", args.collect()),
        _ => {
            eprintln!(
                "usage: cargo xtask build-ebpf\n       \
                 cargo xtask bench [--quick] [benches/run.sh options]\n       \
                 cargo xtask kernel-matrix [scripts/kernel-matrix.sh options]"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
