//! Why a packet was denied: the kernel's `REASON_*` codes, by name, as events and
//! `explain` print them.
use egress_common::{
    REASON_FORGED_DNS, REASON_FRAGMENT, REASON_ICMP_ERROR, REASON_LEARNED_EXPIRED,
    REASON_LEARNED_PORT, REASON_MALFORMED, REASON_NEIGHBOUR, REASON_NO_RULE, REASON_PORT,
    REASON_SPOOFED_SOURCE, REASON_UNKNOWN,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NoRule,
    Port,
    LearnedExpired,
    LearnedPort,
    ForgedDns,
    Fragment,
    Malformed,
    IcmpError,
    Neighbour,
    SpoofedSource,
    /// A code this agent does not know, or an event of a release that sent none.
    Unknown,
}

const ALL: [Reason; 11] = [
    Reason::NoRule,
    Reason::Port,
    Reason::LearnedExpired,
    Reason::LearnedPort,
    Reason::ForgedDns,
    Reason::Fragment,
    Reason::Malformed,
    Reason::IcmpError,
    Reason::Neighbour,
    Reason::SpoofedSource,
    Reason::Unknown,
];

impl Reason {
    pub fn from_code(code: u8) -> Self {
        ALL.into_iter()
            .find(|r| r.code() == code)
            .unwrap_or(Reason::Unknown)
    }

    pub fn code(self) -> u8 {
        match self {
            Reason::NoRule => REASON_NO_RULE,
            Reason::Port => REASON_PORT,
            Reason::LearnedExpired => REASON_LEARNED_EXPIRED,
            Reason::LearnedPort => REASON_LEARNED_PORT,
            Reason::ForgedDns => REASON_FORGED_DNS,
            Reason::Fragment => REASON_FRAGMENT,
            Reason::Malformed => REASON_MALFORMED,
            Reason::IcmpError => REASON_ICMP_ERROR,
            Reason::Neighbour => REASON_NEIGHBOUR,
            Reason::SpoofedSource => REASON_SPOOFED_SOURCE,
            Reason::Unknown => REASON_UNKNOWN,
        }
    }

    /// The `reason` field of an event and of `explain --json`.
    pub fn name(self) -> &'static str {
        match self {
            Reason::NoRule => "no_rule",
            Reason::Port => "port",
            Reason::LearnedExpired => "learned_expired",
            Reason::LearnedPort => "learned_port",
            Reason::ForgedDns => "forged_dns_answer",
            Reason::Fragment => "fragment",
            Reason::Malformed => "malformed",
            Reason::IcmpError => "icmp_error",
            Reason::Neighbour => "neighbour_scope",
            Reason::SpoofedSource => "spoofed_source",
            Reason::Unknown => "unknown",
        }
    }

    /// One sentence for people.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::NoRule => "no CIDR rule covers the address, and it is not a learned address",
            Reason::Port => "a CIDR rule covers the address, but not this protocol and port",
            Reason::LearnedExpired => {
                "the address was learned from a DNS answer, but its TTL has ended"
            }
            Reason::LearnedPort => {
                "the address was learned for names whose ports do not include this one"
            }
            Reason::ForgedDns => "a raw socket sent a message from a trusted resolver's port 53",
            Reason::Fragment => "a later fragment of a datagram whose first fragment was denied",
            Reason::Malformed => "the IP or transport header could not be read",
            Reason::IcmpError => {
                "an ICMP error about no allowed flow, to another address than the flow's \
                 remote, or longer than the kernel's own"
            }
            Reason::Neighbour => "neighbour discovery or MLD beyond the link",
            Reason::SpoofedSource => {
                "from a link to workloads, with a source the node does not route back over it"
            }
            Reason::Unknown => "no reason recorded (an older kernel program)",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn every_reason_has_its_own_code_and_name_and_round_trips() {
        let codes: HashSet<u8> = ALL.iter().map(|r| r.code()).collect();
        let names: HashSet<&str> = ALL.iter().map(|r| r.name()).collect();
        assert_eq!((codes.len(), names.len()), (ALL.len(), ALL.len()));
        for r in ALL {
            assert_eq!(Reason::from_code(r.code()), r);
        }
        assert_eq!(Reason::from_code(200), Reason::Unknown);
    }
}
