//! Rebuild when bpf-linker changes: it is what turns the crate into a BPF object.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => println!("cargo:warning=bpf-linker not found: {e}"),
    }
}
