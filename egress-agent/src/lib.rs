//! The egress enforcer's agent: compiles a policy into the kernel maps, attaches the kernel
//! programs and reports what they deny.
pub mod adopt;
pub mod cgroup;
pub mod classify;
pub mod compile;
pub mod control;
pub mod denials;
pub mod dns;
pub mod events;
pub mod explain;
pub mod kubeconfig;
pub mod loader;
pub mod metrics;
pub mod origins;
pub mod pin;
pub mod pinned;
pub mod plural;
pub mod podinfo;
pub mod policy;
pub mod presets;
pub mod reason;
pub mod record;
pub mod reload;
pub mod run;
pub mod statfs;
pub mod status;
pub mod workloads;
