//! Marks a build whose root-only tests cannot run (see `unprivileged_tests`).

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

fn main() {
    unprivileged_tests();
}
