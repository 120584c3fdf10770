//! Kernel programs of the egress enforcer.
//!
//! - `egress_cgroup` (cgroup_skb egress): the verdict for every packet a socket below the
//!   enforced cgroup sends, whatever its network namespace.
//! - `ingress_cgroup` (cgroup_skb ingress): records flows started from outside, so that a
//!   server in the cgroup always gets its replies out.
//! - `egress_tc` / `ingress_tc` (TC classifiers): the same two jobs for traffic no local
//!   socket sends, e.g. pod traffic forwarded by the node under kubenet.
//! - `from_workload_tc` (TC ingress on the node's end of a link to workloads, e.g. a pod's
//!   veth): `egress_tc`'s decision for what the workload sends, which also refuses sources
//!   the workload does not own; `ingress_tc` serves the link's other direction. This sees
//!   frames that packet sockets write, which no cgroup program sees.
//!
//! Both attach kinds share one decision path (`verdict`); only the header offset differs.
#![no_std]
#![no_main]

mod dns;
mod maps;
mod packet;
mod report;
mod route;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{cgroup_skb, classifier},
    programs::{SkBuffContext, TcContext},
};

use crate::packet::{L3Start, tc_l3_start};

/// cgroup_skb return values.
const CGROUP_PASS: i32 = 1;
const CGROUP_DROP: i32 = 0;

#[cgroup_skb(egress)]
pub fn egress_cgroup(ctx: SkBuffContext) -> i32 {
    // cgroup_skb data starts at the IP header.
    if verdict::egress(&ctx, L3Start::at(0), false) {
        CGROUP_PASS
    } else {
        CGROUP_DROP
    }
}

#[cgroup_skb(ingress)]
pub fn ingress_cgroup(ctx: SkBuffContext) -> i32 {
    verdict::ingress(&ctx, L3Start::at(0));
    CGROUP_PASS
}

#[classifier]
pub fn egress_tc(ctx: TcContext) -> i32 {
    // Not IP (ARP, LLDP, ...): not ours to decide.
    let Some(l3) = tc_l3_start(&ctx) else {
        return TC_ACT_OK;
    };
    if verdict::egress(&ctx, l3, false) {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

#[classifier]
pub fn from_workload_tc(ctx: TcContext) -> i32 {
    // Not IP: the node routes none of it (ARP is answered, not forwarded).
    let Some(l3) = tc_l3_start(&ctx) else {
        return TC_ACT_OK;
    };
    if verdict::egress(&ctx, l3, true) {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

#[classifier]
pub fn ingress_tc(ctx: TcContext) -> i32 {
    if let Some(l3) = tc_l3_start(&ctx) {
        verdict::ingress(&ctx, l3);
    }
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
