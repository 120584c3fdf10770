//! Library target so that `cargo` can check the crate; the programs live in `main.rs`.
#![no_std]
