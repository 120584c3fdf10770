//! Handing the ring buffers (events, DNS answers) to the tasks that read them.
use std::os::fd::AsFd as _;

use aya::{
    maps::{Map, MapData, RingBuf},
    sys::SyscallError,
};
use egress_common::{DNS_EVENTS, EVENTS};

use super::{Enforcer, LoadError, map_err};

impl Enforcer {
    /// Takes the ring buffer of answers the kernel learned from.
    pub fn take_dns_events(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        self.take_ring(DNS_EVENTS)
    }

    /// Takes the event ring buffer, for the task that reads it.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        self.take_ring(EVENTS)
    }

    /// The predecessor's ring buffer of answers, when this enforcer replaced it (see
    /// `Pinned::old_dns_events`); to be drained once `retire_predecessors` has detached
    /// the programs that wrote to it.
    pub fn take_old_dns_events(&mut self) -> Result<Option<RingBuf<MapData>>, LoadError> {
        let Some(old) = self.pinned.as_mut().and_then(|p| p.old_dns_events.take()) else {
            return Ok(None);
        };
        RingBuf::try_from(Map::RingBuf(old))
            .map(Some)
            .map_err(map_err(DNS_EVENTS))
    }

    /// Takes a ring buffer out of the object, for the task that reads it. If it replaces a
    /// pinned one, a second handle stays here: `retire_predecessors` pins it in the old
    /// one's place.
    fn take_ring(&mut self, name: &'static str) -> Result<RingBuf<MapData>, LoadError> {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(LoadError::MissingMap(name))?;
        let ring = RingBuf::try_from(map).map_err(map_err(name))?;
        if let Some(pinned) = &mut self.pinned
            && pinned.replaced.contains(&name)
        {
            let fd = ring
                .as_fd()
                .try_clone_to_owned()
                .map_err(|io_error| LoadError::Map {
                    what: format!("duplicating the fd of {name}"),
                    source: SyscallError {
                        call: "fcntl(F_DUPFD_CLOEXEC)",
                        io_error,
                    }
                    .into(),
                })?;
            let handle = MapData::from_fd(fd).map_err(map_err(name))?;
            pinned.taken.push((name, handle));
        }
        Ok(ring)
    }
}
