//! The TC programs on network interfaces: on uplinks (`--interface`) and on the node's ends
//! of links to workloads (`--workload-interface`). TCX links from kernel 6.6, netlink
//! filters on a clsact qdisc before.
use std::time::Instant;

use aya::programs::{SchedClassifier, TcAttachType, links::FdLink, tc};

use super::{
    EGRESS_TC, Enforcer, FROM_WORKLOAD_TC, INGRESS_TC, LoadError, load::log_loaded, pin, prog_err,
    program,
};

/// A TC link's attach point, as its pin names it: `tc-eth0-ingress` on an uplink,
/// `workload-azv1234-ingress` on a link to workloads.
fn tc_point(side: LinkSide, interface: &str, direction: &str) -> String {
    let kind = match side {
        LinkSide::Uplink => "tc",
        LinkSide::Workload => "workload",
    };
    format!("{kind}-{interface}-{direction}")
}

/// Which way an interface faces, which decides the TC programs on its two hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkSide {
    /// A link off the node (`--interface`): what leaves by it is decided (`egress_tc`),
    /// what arrives is learned from (`ingress_tc`).
    Uplink,
    /// The node's end of a link to workloads (`--workload-interface`, a pod's veth): what
    /// arrives was sent by a workload, packet sockets included, and is decided with its
    /// source checked (`from_workload_tc`); what leaves goes to the workload
    /// (`ingress_tc`).
    Workload,
}

impl LinkSide {
    /// The program on the interface's ingress hook, and the one on its egress hook.
    fn programs(self) -> [(&'static str, TcAttachType, &'static str); 2] {
        let arriving = match self {
            LinkSide::Uplink => INGRESS_TC,
            LinkSide::Workload => FROM_WORKLOAD_TC,
        };
        let leaving = match self {
            LinkSide::Uplink => EGRESS_TC,
            LinkSide::Workload => INGRESS_TC,
        };
        [
            (arriving, TcAttachType::Ingress, "ingress"),
            (leaving, TcAttachType::Egress, "egress"),
        ]
    }
}

impl Enforcer {
    /// Loads the TC programs an interface on `side` needs, once each.
    pub fn load_tc(&mut self, side: LinkSide) -> Result<(), LoadError> {
        for (name, _, _) in side.programs() {
            let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
            if prog.fd().is_err() {
                let started = Instant::now();
                prog.load().map_err(prog_err(format!("loading {name}")))?;
                log_loaded(name, started, prog.info());
            }
        }
        Ok(())
    }

    /// Attaches the TC programs to an interface that faces `side`: TCX on kernels >= 6.6, a
    /// clsact qdisc with netlink filters before that (the qdisc is created if missing and
    /// left in place). With a pin root, TCX links are pinned like cgroup links. Netlink
    /// filters are not links: they cannot be pinned, and end with the agent (logged when it
    /// starts).
    pub fn attach_interface(&mut self, interface: &str, side: LinkSide) -> Result<(), LoadError> {
        self.load_tc(side)?;
        if let Err(e) = tc::qdisc_add_clsact(interface) {
            log::debug!(
                "clsact qdisc on {interface}: {e} (TCX needs none; an existing one is reused)"
            );
        }
        for (name, attach_type, direction) in side.programs() {
            let what = || format!("attaching {name} to {interface}");
            let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
            let id = prog
                .attach(interface, attach_type)
                .map_err(prog_err(what()))?;
            if let Some(pinned) = &mut self.pinned {
                let link = prog.take_link(id).map_err(prog_err(what()))?;
                // Only a netlink filter has a priority.
                if link.priority().is_ok() {
                    if pinned.netlink_filters.is_empty() {
                        log::warn!(
                            "the TC programs are netlink filters on this kernel (no TCX before \
                             6.6): they end with this agent, also with --on-exit keep"
                        );
                    }
                    pinned.netlink_filters.push((interface.to_owned(), link));
                } else {
                    let link = FdLink::try_from(link).map_err(|source| LoadError::Link {
                        what: what(),
                        source,
                    })?;
                    self.pin_link(link, &tc_point(side, interface, direction))?;
                }
            }
        }
        Ok(())
    }

    /// Forgets a link to workloads that is gone: its TCX links went with it, and their pins
    /// would otherwise pile up as workloads come and go.
    pub fn forget_interface(&mut self, interface: &str) -> Result<(), LoadError> {
        let Some(pinned) = &mut self.pinned else {
            return Ok(());
        };
        let points = ["ingress", "egress"]
            .map(|direction| tc_point(LinkSide::Workload, interface, direction));
        let (gone, kept) = std::mem::take(&mut pinned.links)
            .into_iter()
            .partition(|(path, _)| {
                pin::link_point(path).is_some_and(|p| points.iter().any(|point| point == p))
            });
        pinned.links = kept;
        pinned.netlink_filters.retain(|(name, _)| name != interface);
        for (path, link) in gone {
            link.unpin()
                .map_err(|error| LoadError::PinRoot(pin::PinError::Io { path, error }))?;
        }
        Ok(())
    }
}
