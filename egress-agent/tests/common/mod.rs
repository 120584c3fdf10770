//! What the BPF_PROG_TEST_RUN test files share.

/// Whether the test may load BPF programs (root). A build without root marks these tests
/// `#[ignore]` (`build.rs`: `unprivileged_tests`), so `cargo test` reports them as ignored;
/// a build with root run without it skips with a message, except in CI (`CI=true`), where
/// skipping is a failure.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "BPF tests need root and CI=true forbids skipping them"
    );
    eprintln!("skipped: BPF_PROG_TEST_RUN needs root");
    false
}
