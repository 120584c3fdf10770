//! The egress enforcer's agent: compiles a policy into the kernel maps, attaches the kernel
//! programs and reports what they deny.
//!
//! Modules import only from the layers below them, or from one listed before them in their
//! own layer, so none imports another that imports it back:
//!
//! 1. `kubeconfig`, `policy` (the file, with its `presets`), and small pieces every layer
//!    may use: `sys` (clocks, memory), `statfs`, `cgroup`, `podinfo`, `plural`, `reason`,
//!    `classify`, `lifecycle` (the agent's own events on stdout).
//! 2. `port_sets`, `dns::names` (the name table), `compile` (policy → map contents and the
//!    kernel's `Settings`).
//! 3. `dns` (answers, the learner and `LearnedStore`, resolvers, the names asked for).
//! 4. `pin`, `record` (the policy recorded beside the maps), `kernel_log` (the programs'
//!    aya-log diagnostics), `loader` (the kernel programs and maps; `KernelState`), then `workloads`, `pinned`, `adopt`.
//! 5. `metrics`, `reload`, `denials`, `events`, `http`.
//! 6. `control` (the task that owns the kernel state).
//! 7. `run`, and the other commands: `origins`, `status`, `explain`, `suggest`; `main.rs`
//!    (the command line) on top.
pub mod adopt;
mod cgroup;
mod classify;
pub mod compile;
mod control;
mod denials;
pub mod dns;
pub mod events;
pub mod explain;
mod http;
mod kernel_log;
pub mod kubeconfig;
mod lifecycle;
pub mod loader;
pub mod metrics;
pub mod origins;
pub mod pin;
mod pinned;
mod plural;
pub mod podinfo;
pub mod policy;
mod port_sets;
pub mod reason;
mod record;
mod reload;
pub mod run;
mod statfs;
pub mod status;
pub mod suggest;
pub mod sys;
mod workloads;
