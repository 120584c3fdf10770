//! Raw-socket senders: an IPv4 packet from [`crate::packet`] goes out as it is, whatever its
//! source address, routed by the kernel ([`send_routed`]) or as an Ethernet frame out of one
//! link ([`send_frame`]). Both need `CAP_NET_RAW`.

use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

pub const ETH_HEADER: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ALL: u16 = 0x0003;

/// Sends a whole IPv4 packet, header included, routed by the kernel to `dst`.
pub fn send_routed(dst: Ipv4Addr, packet: &[u8]) -> io::Result<()> {
    // IPPROTO_RAW implies IP_HDRINCL: the kernel sends `packet` as the whole IP datagram.
    let socket = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )?;
    socket.send_to(packet, &SockAddr::from(SocketAddrV4::new(dst, 0)))?;
    Ok(())
}

/// Sends an IPv4 packet as an Ethernet frame to `dst_mac` out of `iface`, through a packet
/// socket: no routing, and no local delivery even when the destination is this host.
pub fn send_frame(iface: &str, dst_mac: [u8; 6], ip_packet: &[u8]) -> io::Result<()> {
    let address = fs::read_to_string(format!("/sys/class/net/{iface}/address"))?;
    let src_mac = parse_mac(address.trim()).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(ETH_HEADER + ip_packet.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
    frame.extend_from_slice(ip_packet);
    let (fd, addr) = packet_socket(iface, ETH_P_IP)?;
    // SAFETY: `frame` and `addr` are valid for the lengths passed.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A packet socket for `protocol` frames bound to `iface`, and its address.
pub fn packet_socket(iface: &str, protocol: u16) -> io::Result<(OwnedFd, libc::sockaddr_ll)> {
    let name = std::ffi::CString::new(iface).map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    let protocol = protocol.to_be();
    // SAFETY: plain socket creation; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = i32::try_from(index).map_err(io::Error::other)?;
    // SAFETY: `addr` is a valid sockaddr_ll of the length passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((fd, addr))
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("bad MAC address {text:?}"))?;
    <[u8; 6]>::try_from(bytes).map_err(|_| format!("bad MAC address {text:?}"))
}
