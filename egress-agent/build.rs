//! Builds the kernel programs (egress-ebpf) for bpfel-unknown-none with the nightly
//! toolchain and bpf-linker, so that `cargo build` yields an agent with the object embedded,
//! and embeds the commit the agent is built from (`EGRESS_COMMIT`).
use std::process::Command;

use anyhow::{Context as _, anyhow};

/// `git ARGS` in the agent's directory: its output, if it succeeds.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// The checked-out commit (12 hex digits); the build runs again when it changes.
fn git_commit() -> Option<String> {
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watched.extend(git(&["rev-parse", "--symbolic-full-name", "HEAD"]));
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", &name])
            && std::path::Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    Some(commit)
}

/// `EGRESS_COMMIT` for `--version` and `/metrics`: as given in the environment (an image
/// build, whose context has no `.git`), else the checked-out commit, else `unknown`.
fn embed_commit() {
    println!("cargo:rerun-if-env-changed=EGRESS_COMMIT");
    let commit = std::env::var("EGRESS_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=EGRESS_COMMIT={}", commit.trim());
}

/// Sets `unprivileged_tests` when the tests that need root cannot run: built without root,
/// outside CI. Those tests are then `#[ignore]`d with a reason, so that `cargo test`
/// counts them as ignored rather than passed; with `CI=true` they run, and fail without root.
fn unprivileged_tests() {
    use std::os::unix::fs::MetadataExt as _;
    println!("cargo::rustc-check-cfg=cfg(unprivileged_tests)");
    println!("cargo:rerun-if-env-changed=CI");
    let ci = std::env::var("CI").as_deref() == Ok("true");
    // /proc/self belongs to the process's effective user.
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !root && !ci {
        println!("cargo:rustc-cfg=unprivileged_tests");
    }
}

fn main() -> anyhow::Result<()> {
    embed_commit();
    unprivileged_tests();
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "egress-ebpf")
        .ok_or_else(|| anyhow!("egress-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("egress-ebpf manifest has no parent directory"))?;
    // aya-build passes every line the inner cargo prints on to cargo as a warning, which
    // cargo replays on every build, even a warm one: some 46 `warning: … Compiling` lines
    // that read as problems. Quiet, the inner cargo prints only real warnings and errors.
    // SAFETY: the build script has no other threads yet; aya-build starts its own later.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
