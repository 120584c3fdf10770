//! Links to workloads (`--workload-interface`): the node's ends of the pods' links, which
//! get the TC programs facing the workload (`LinkSide::Workload`) as soon as they appear,
//! so that what a pod writes with a packet socket, which no cgroup program sees, is decided
//! too. The kernel's link table is watched over rtnetlink; a pod's veth is created before
//! any of its processes runs, and attached within milliseconds of its creation.
use std::{
    collections::HashMap,
    ffi::CStr,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::Context as _;
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    lifecycle,
    loader::{Enforcer, LinkSide},
};

/// The longest interface name Linux allows (`IFNAMSIZ` less the NUL).
const MAX_NAME: usize = 15;

/// Interface names to guard: exact names, or prefixes ending in `*` (`azv*`, `lxc*`,
/// `cali*`, `veth*`).
#[derive(Debug, Clone, Default)]
pub struct InterfacePatterns(Vec<String>);

impl InterfacePatterns {
    pub fn parse(patterns: &[String]) -> anyhow::Result<Self> {
        for p in patterns {
            let name = p.strip_suffix('*').unwrap_or(p);
            let valid = !name.is_empty()
                && name.len() <= MAX_NAME
                && !name.contains(['*', '/', ':'])
                && !name.chars().any(char::is_whitespace);
            anyhow::ensure!(
                valid,
                "--workload-interface {p:?}: not an interface name or a prefix of one followed \
                 by `*` (1 to {MAX_NAME} characters, no `/`, `:` or spaces)"
            );
        }
        Ok(Self(patterns.to_vec()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == p,
        })
    }
}

impl std::fmt::Display for InterfacePatterns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// A change in the link table.
#[derive(Debug, PartialEq, Eq)]
enum LinkChange {
    /// A link appeared or changed (renamed, brought up, ...).
    Present {
        index: u32,
        name: String,
    },
    Removed {
        index: u32,
    },
    /// Notifications were lost (the socket's buffer overflowed): list the links afresh.
    Resync,
}

/// The node's ends of links to workloads, attached, and the watch that finds new ones.
pub struct WorkloadLinks {
    patterns: InterfacePatterns,
    /// Attached links by interface index, with the name they had then (pins are named by
    /// it, and a link may be renamed since).
    attached: HashMap<u32, String>,
    watch: AsyncFd<OwnedFd>,
}

impl WorkloadLinks {
    /// Starts watching the link table, then attaches to every matching link there is: in
    /// that order, so that a link created in between is not missed.
    pub fn start(patterns: InterfacePatterns, enforcer: &mut Enforcer) -> anyhow::Result<Self> {
        let watch = open_watch().context("watching the network interfaces (rtnetlink)")?;
        let mut links = WorkloadLinks {
            patterns,
            attached: HashMap::new(),
            watch,
        };
        for (index, name) in interfaces().context("listing the network interfaces")? {
            if links.patterns.matches(&name) {
                enforcer
                    .attach_interface(&name, LinkSide::Workload)
                    .with_context(|| format!("attaching to workload interface {name}"))?;
                links.attached.insert(index, name);
            }
        }
        Ok(links)
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.values().map(String::as_str)
    }

    /// Waits for the link table to change, and attaches to new matching links and forgets
    /// removed ones. A link that cannot be attached is logged as an error and left: its
    /// workload's packet sockets are then decided by nothing but the cgroup programs.
    pub async fn follow(&mut self, enforcer: &mut Enforcer) -> anyhow::Result<()> {
        let changes = self.next_changes().await?;
        for change in changes {
            match change {
                LinkChange::Present { index, name } => self.present(index, name, enforcer),
                LinkChange::Removed { index } => self.removed(index, enforcer)?,
                LinkChange::Resync => self.resync(enforcer)?,
            }
        }
        Ok(())
    }

    fn present(&mut self, index: u32, name: String, enforcer: &mut Enforcer) {
        if self.attached.contains_key(&index) || !self.patterns.matches(&name) {
            return;
        }
        match enforcer.attach_interface(&name, LinkSide::Workload) {
            Ok(()) => {
                log::info!("attached to workload interface {name}");
                lifecycle::emit("workload_attached", serde_json::json!({"interface": name}));
                self.attached.insert(index, name);
            }
            // Gone again, or renamed, before the attach: nothing to guard.
            Err(_) if interface_index(&name) != Some(index) => {
                log::debug!("workload interface {name} went before it could be attached");
            }
            Err(e) => log::error!(
                "attaching to workload interface {name}: {:#}; what its workload writes with \
                 packet sockets is not decided",
                anyhow::Error::from(e)
            ),
        }
    }

    fn removed(&mut self, index: u32, enforcer: &mut Enforcer) -> anyhow::Result<()> {
        if let Some(name) = self.attached.remove(&index) {
            enforcer
                .forget_interface(&name)
                .with_context(|| format!("removing the pins of workload interface {name}"))?;
            log::debug!("workload interface {name} is gone");
        }
        Ok(())
    }

    fn resync(&mut self, enforcer: &mut Enforcer) -> anyhow::Result<()> {
        log::warn!("missed network interface changes; listing the interfaces afresh");
        let present: HashMap<u32, String> = interfaces()
            .context("listing the network interfaces")?
            .into_iter()
            .collect();
        let gone: Vec<u32> = self
            .attached
            .keys()
            .filter(|index| !present.contains_key(index))
            .copied()
            .collect();
        for index in gone {
            self.removed(index, enforcer)?;
        }
        for (index, name) in present {
            self.present(index, name, enforcer);
        }
        Ok(())
    }

    async fn next_changes(&mut self) -> io::Result<Vec<LinkChange>> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut guard = self.watch.readable().await?;
            // SAFETY: a read into a buffer of the length passed.
            let n = unsafe {
                libc::recv(
                    guard.get_inner().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            if n >= 0 {
                return Ok(parse_messages(&buf[..n as usize]));
            }
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EAGAIN) => guard.clear_ready(),
                Some(libc::EINTR) => {}
                Some(libc::ENOBUFS) => return Ok(vec![LinkChange::Resync]),
                _ => return Err(error),
            }
        }
    }
}

/// An rtnetlink socket subscribed to link changes.
fn open_watch() -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: plain socket calls on a descriptor this function owns.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        let bound = libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        );
        if bound < 0 {
            return Err(io::Error::last_os_error());
        }
        AsyncFd::register_with_interest(fd, Interest::READABLE).map_err(io::Error::from)
    }
}

/// `struct nlmsghdr` and `struct ifinfomsg`, in bytes.
const NLMSG_HEADER: usize = 16;
const IFINFO: usize = 16;
/// `struct rtattr`'s header.
const RTA_HEADER: usize = 4;

/// The link changes in one rtnetlink datagram; anything else in it is skipped.
fn parse_messages(mut buf: &[u8]) -> Vec<LinkChange> {
    let mut changes = Vec::new();
    while buf.len() >= NLMSG_HEADER {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < NLMSG_HEADER || len > buf.len() {
            break;
        }
        let body = &buf[NLMSG_HEADER..len];
        if body.len() >= IFINFO {
            let index = i32::from_ne_bytes([body[4], body[5], body[6], body[7]]) as u32;
            match kind {
                libc::RTM_NEWLINK => {
                    if let Some(name) = link_name(&body[IFINFO..]) {
                        changes.push(LinkChange::Present { index, name });
                    }
                }
                libc::RTM_DELLINK => changes.push(LinkChange::Removed { index }),
                _ => {}
            }
        }
        buf = &buf[align4(len).min(buf.len())..];
    }
    changes
}

/// `IFLA_IFNAME` among a link message's attributes.
fn link_name(mut attrs: &[u8]) -> Option<String> {
    while attrs.len() >= RTA_HEADER {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < RTA_HEADER || len > attrs.len() {
            return None;
        }
        if kind == libc::IFLA_IFNAME {
            let value = &attrs[RTA_HEADER..len];
            let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
            return String::from_utf8(value[..end].to_vec()).ok();
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    None
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Every interface of the agent's network namespace, by index.
fn interfaces() -> io::Result<Vec<(u32, String)>> {
    // SAFETY: the list if_nameindex returns is read up to its zero entry, then freed once.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(io::Error::last_os_error());
        }
        let mut found = Vec::new();
        let mut entry = list;
        while (*entry).if_index != 0 {
            let name = CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            found.push(((*entry).if_index, name));
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
        Ok(found)
    }
}

/// The index of the interface named `name` now, if there is one.
pub fn interface_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated string, which if_nametoindex only reads.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(p: &[&str]) -> anyhow::Result<InterfacePatterns> {
        InterfacePatterns::parse(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn patterns_match_names_and_prefixes() {
        let p = patterns(&["azv*", "cbr0"]).unwrap();
        assert!(p.matches("azv1a2b3c"));
        assert!(p.matches("azv"));
        assert!(p.matches("cbr0"));
        assert!(!p.matches("cbr01"));
        assert!(!p.matches("eth0"));
        assert!(!patterns(&[]).unwrap().matches("eth0"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "*",
            "",
            "a*b*",
            "a*b",
            "eth/0",
            "a very long name*",
            "lxc 1",
        ] {
            let e = patterns(&[bad]).expect_err(bad);
            assert!(e.to_string().contains("--workload-interface"), "{e}");
        }
    }

    /// An RTM_NEWLINK for `name` at `index`, with an attribute before the name, as the
    /// kernel sends them.
    fn newlink(kind: u16, index: i32, name: Option<&str>) -> Vec<u8> {
        let mut attrs = Vec::new();
        // IFLA_MTU (4), 4 bytes of value.
        attrs.extend_from_slice(&8u16.to_ne_bytes());
        attrs.extend_from_slice(&4u16.to_ne_bytes());
        attrs.extend_from_slice(&1500u32.to_ne_bytes());
        if let Some(name) = name {
            let len = RTA_HEADER + name.len() + 1;
            attrs.extend_from_slice(&(len as u16).to_ne_bytes());
            attrs.extend_from_slice(&libc::IFLA_IFNAME.to_ne_bytes());
            attrs.extend_from_slice(name.as_bytes());
            attrs.push(0);
            attrs.resize(align4(attrs.len()), 0);
        }
        let len = NLMSG_HEADER + IFINFO + attrs.len();
        let mut msg = Vec::new();
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&[0; 4]);
        msg.extend_from_slice(&index.to_ne_bytes());
        msg.extend_from_slice(&[0; 8]);
        msg.extend_from_slice(&attrs);
        msg
    }

    #[test]
    fn link_messages_are_read() {
        let mut buf = newlink(libc::RTM_NEWLINK, 7, Some("azv12345"));
        buf.extend(newlink(libc::RTM_DELLINK, 5, Some("lxc1")));
        buf.extend(newlink(libc::RTM_NEWADDR, 9, Some("eth0")));
        buf.extend(newlink(libc::RTM_NEWLINK, 8, None));
        assert_eq!(
            parse_messages(&buf),
            [
                LinkChange::Present {
                    index: 7,
                    name: "azv12345".into()
                },
                LinkChange::Removed { index: 5 },
            ]
        );
    }

    #[test]
    fn truncated_messages_end_the_parse() {
        let buf = newlink(libc::RTM_NEWLINK, 7, Some("azv12345"));
        assert!(parse_messages(&buf[..buf.len() - 1]).is_empty());
        assert!(parse_messages(&buf[..10]).is_empty());
    }
}
