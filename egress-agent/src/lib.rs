//! The egress enforcer's agent: compiles a policy into the kernel maps, attaches the kernel
//! programs and reports what they deny.
pub mod adopt;
pub mod cgroup;
pub mod compile;
pub mod control;
pub mod dns;
pub mod events;
pub mod http;
pub mod loader;
pub mod metrics;
pub mod pin;
pub mod policy;
pub mod presets;
pub mod reload;
pub mod run;
pub mod statfs;
pub mod status;
