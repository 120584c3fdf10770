//! Conversions between the agent's addresses and the maps' 16-byte [`Addr`].
use core::net::{IpAddr, Ipv6Addr};

use crate::Addr;

/// The map key of an address (IPv4 as IPv4-mapped).
pub fn to_key(addr: IpAddr) -> Addr {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address as written in events: IPv4-mapped addresses as plain IPv4.
pub fn display_addr(addr: &Addr) -> IpAddr {
    let v6 = Ipv6Addr::from(*addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v4_mapped;

    #[test]
    fn ipv4_mapped_addresses_display_as_ipv4() {
        assert_eq!(
            display_addr(&v4_mapped([203, 0, 113, 9])).to_string(),
            "203.0.113.9"
        );
        let v6: Ipv6Addr = "2001:db8::9".parse().expect("literal");
        assert_eq!(display_addr(&v6.octets()).to_string(), "2001:db8::9");
    }
}
