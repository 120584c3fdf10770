//! The TC programs on network interfaces (`--interface`): TCX links from kernel 6.6,
//! netlink filters on a clsact qdisc before.
use std::time::Instant;

use aya::programs::{SchedClassifier, TcAttachType, links::FdLink, tc};

use super::{EGRESS_TC, Enforcer, INGRESS_TC, LoadError, log_loaded, prog_err, program};

impl Enforcer {
    /// Loads the TC programs, once.
    pub fn load_tc(&mut self) -> Result<(), LoadError> {
        for name in [EGRESS_TC, INGRESS_TC] {
            let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
            if prog.fd().is_err() {
                let started = Instant::now();
                prog.load().map_err(prog_err(format!("loading {name}")))?;
                log_loaded(name, started, prog.info());
            }
        }
        Ok(())
    }

    /// Attaches the TC programs to an interface: TCX on kernels >= 6.6, a clsact qdisc with
    /// netlink filters before that (the qdisc is created if missing and left in place).
    /// With a pin root, TCX links are pinned like cgroup links. Netlink filters are not
    /// links: they cannot be pinned, and end with the enforcer (logged when it starts).
    pub fn attach_interface(&mut self, interface: &str) -> Result<(), LoadError> {
        self.load_tc()?;
        if let Err(e) = tc::qdisc_add_clsact(interface) {
            log::debug!(
                "clsact qdisc on {interface}: {e} (TCX needs none; an existing one is reused)"
            );
        }
        for (name, attach_type, direction) in [
            (INGRESS_TC, TcAttachType::Ingress, "ingress"),
            (EGRESS_TC, TcAttachType::Egress, "egress"),
        ] {
            let what = || format!("attaching {name} to {interface}");
            let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
            let id = prog
                .attach(interface, attach_type)
                .map_err(prog_err(what()))?;
            if self.pinned.is_none() {
                continue;
            }
            let link = prog.take_link(id).map_err(prog_err(what()))?;
            if <&FdLink>::try_from(&link).is_err() {
                // Converting it would drop it without detaching it: it would outlive the
                // agent, enforcing its last policy, and a successor would add its own.
                log::warn!(
                    "{name} on {interface} is a netlink filter (no TCX before kernel 6.6): \
                     it ends with this agent and is not kept by --on-exit keep"
                );
                self.netlink_filters.push(link);
                continue;
            }
            let link = FdLink::try_from(link).map_err(|source| LoadError::Link {
                what: what(),
                source,
            })?;
            self.pin_link(link, &format!("tc-{interface}-{direction}"))?;
        }
        Ok(())
    }
}
