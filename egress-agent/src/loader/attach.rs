//! Attaching the cgroup programs, and pinning the links.
use std::{fs::File, os::unix::fs::MetadataExt as _, path::Path};

use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, links::FdLink};

use super::{EGRESS_CGROUP, Enforcer, INGRESS_CGROUP, LoadError, prog_err, program};

impl Enforcer {
    /// Attaches the egress verdict and the ingress flow recorder to a cgroup v2 directory:
    /// every socket of every process below it is covered, whatever its network namespace.
    pub fn attach_cgroup(&mut self, path: &Path) -> Result<(), LoadError> {
        let cgroup_err = |source| LoadError::Cgroup {
            path: path.display().to_string(),
            source,
        };
        let cgroup = File::open(path).map_err(cgroup_err)?;
        let inode = cgroup.metadata().map_err(cgroup_err)?.ino();
        for (name, attach_type, direction) in [
            (INGRESS_CGROUP, CgroupSkbAttachType::Ingress, "ingress"),
            (EGRESS_CGROUP, CgroupSkbAttachType::Egress, "egress"),
        ] {
            let what = || format!("attaching {name} to {}", path.display());
            let prog: &mut CgroupSkb = program(&mut self.ebpf, name)?;
            // Links (kernel >= 5.7) are always multi-attach; `Single` is the only mode the
            // kernel accepts for them and leaves other programs on the cgroup alone.
            let id = prog
                .attach(&cgroup, attach_type, CgroupAttachMode::Single)
                .map_err(prog_err(what()))?;
            if self.pinned.is_some() {
                let link = prog.take_link(id).map_err(prog_err(what()))?;
                let link = FdLink::try_from(link).map_err(|source| LoadError::Link {
                    what: what(),
                    source,
                })?;
                self.pin_link(link, &format!("cgroup-{inode}-{direction}"))?;
            }
        }
        Ok(())
    }

    /// Pins a link this enforcer attached, beside any its predecessor left.
    pub(super) fn pin_link(&mut self, link: FdLink, point: &str) -> Result<(), LoadError> {
        let Some(pinned) = &mut self.pinned else {
            return Ok(());
        };
        let id = link
            .info()
            .map_err(|source| LoadError::Link {
                what: format!("reading the link of {point}"),
                source,
            })?
            .id();
        let path = pinned.root.link_path(point, id);
        let link = link.pin(&path).map_err(|source| LoadError::Pin {
            what: path.display().to_string(),
            source,
        })?;
        pinned.links.push((path, link));
        Ok(())
    }
}
