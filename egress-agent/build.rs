//! Builds the kernel programs (egress-ebpf) for bpfel-unknown-none with the nightly
//! toolchain and bpf-linker, so that `cargo build` yields an agent with the object embedded.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
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
