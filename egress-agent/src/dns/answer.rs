//! The DNS answers the kernel sends up (`DNS_EVENTS`), as the learner reads them.
use std::mem::offset_of;

use egress_common::{Addr, DNS_EVENT_HEADER, DNS_MAX_LEARNED, DNS_MAX_PAYLOAD, DnsEvent};

/// A `DNS_EVENTS` record as the learner reads it, borrowed from the ring buffer: a record
/// is up to 2 KiB and a flood brings tens of thousands a second, so nothing is copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsAnswer<'a> {
    /// What the kernel wrote into `LEARNED` from this answer (`DnsEvent::addrs`).
    pub learned: &'a [Addr],
    /// The DNS message (for TCP, without its length prefix).
    pub message: &'a [u8],
}

impl<'a> From<&'a DnsEvent> for DnsAnswer<'a> {
    fn from(event: &'a DnsEvent) -> Self {
        Self {
            learned: &event.addrs[..usize::from(event.learned).min(DNS_MAX_LEARNED)],
            message: &event.payload[..usize::from(event.len).min(DNS_MAX_PAYLOAD)],
        }
    }
}

/// Decodes one `DNS_EVENTS` record. The kernel sends the event's header and the message,
/// no more; a record of the full size with a shorter message is the previous release's
/// format (it always sent the whole buffer), found in a ring an upgrade took over. `None`
/// for any other length: shorter than the header, or not agreeing with `len`.
pub fn decode_dns(bytes: &[u8]) -> Option<DnsAnswer<'_>> {
    let header = bytes.get(..DNS_EVENT_HEADER)?;
    let u16_at = |at: usize| usize::from(u16::from_ne_bytes([header[at], header[at + 1]]));
    let len = u16_at(offset_of!(DnsEvent, len));
    let learned = u16_at(offset_of!(DnsEvent, learned)).min(DNS_MAX_LEARNED);
    let whole = bytes.len() == size_of::<DnsEvent>() && len <= DNS_MAX_PAYLOAD;
    if bytes.len() != DNS_EVENT_HEADER + len && !whole {
        return None;
    }
    let (addrs, _) = header[offset_of!(DnsEvent, addrs)..].as_chunks::<16>();
    Some(DnsAnswer {
        learned: &addrs[..learned],
        message: &bytes[DNS_EVENT_HEADER..DNS_EVENT_HEADER + len],
    })
}

#[cfg(test)]
mod tests {
    use egress_common::v4_mapped;

    use super::*;

    /// The event as the kernel sends it: its header and `msg`.
    fn dns_record(msg: &[u8]) -> (DnsEvent, Vec<u8>) {
        let mut event = DnsEvent {
            resolver: v4_mapped([198, 51, 100, 53]),
            client: v4_mapped([198, 51, 100, 1]),
            len: u16::try_from(msg.len()).expect("a short message"),
            learned: 2,
            _pad: 0,
            addrs: [[0; 16]; DNS_MAX_LEARNED],
            payload: [0; DNS_MAX_PAYLOAD],
        };
        event.addrs[0] = v4_mapped([203, 0, 113, 7]);
        event.addrs[1] = v4_mapped([203, 0, 113, 8]);
        event.payload[..msg.len()].copy_from_slice(msg);
        // SAFETY: DnsEvent is plain old data.
        let bytes = unsafe {
            core::slice::from_raw_parts((&raw const event).cast::<u8>(), size_of::<DnsEvent>())
        };
        (event, bytes[..DNS_EVENT_HEADER + msg.len()].to_vec())
    }

    #[test]
    fn dns_records_of_any_message_length_decode_whole() {
        for len in [0, 1, 300, DNS_MAX_PAYLOAD] {
            let msg: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
            let (event, record) = dns_record(&msg);
            let decoded = decode_dns(&record).expect("a record of its own length");
            assert_eq!(decoded, DnsAnswer::from(&event), "message of {len} bytes");
            assert_eq!(decoded.message, msg);
            assert_eq!(decoded.learned.len(), 2);
        }
    }

    #[test]
    fn dns_records_of_the_previous_format_decode_to_their_message() {
        let (event, record) = dns_record(b"an answer");
        let mut whole = record.clone();
        whole.resize(size_of::<DnsEvent>(), 0xaa);
        let decoded = decode_dns(&whole).expect("a whole DnsEvent");
        assert_eq!(decoded, DnsAnswer::from(&event));
        assert_eq!(decoded.message, b"an answer");
    }

    #[test]
    fn dns_records_whose_length_disagrees_are_rejected() {
        let (_, record) = dns_record(b"an answer");
        assert!(
            decode_dns(&record[..DNS_EVENT_HEADER - 1]).is_none(),
            "shorter than the header"
        );
        assert!(
            decode_dns(&record[..record.len() - 1]).is_none(),
            "a byte short"
        );
        let mut long = record.clone();
        long.push(0);
        assert!(decode_dns(&long).is_none(), "a byte over");
        let mut huge = record;
        huge.resize(size_of::<DnsEvent>() + 8, 0);
        assert!(decode_dns(&huge).is_none(), "longer than an event");
        let mut bad_len = vec![0; size_of::<DnsEvent>()];
        let at = core::mem::offset_of!(DnsEvent, len);
        bad_len[at..at + 2]
            .copy_from_slice(&u16::try_from(DNS_MAX_PAYLOAD + 1).unwrap().to_ne_bytes());
        assert!(decode_dns(&bad_len).is_none(), "a length past the payload");
    }
}
