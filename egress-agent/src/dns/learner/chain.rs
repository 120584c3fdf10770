//! CNAME chains: the names an answer's addresses may be learned through.
use crate::dns::wire::{Name, Response};

/// CNAME links followed from the question name; longer chains are cut (and counted).
pub(super) const MAX_CHAIN: usize = 16;

/// The question name and every name a CNAME chain from it reaches, into `chain` (as offsets
/// in the message; names compare without regard to case).
pub(crate) fn cname_chain(msg: &Response<'_>, chain: &mut Vec<usize>) {
    chain.clear();
    chain.push(msg.question().offset());
    if !msg.has_cname() {
        return;
    }
    for _ in 0..MAX_CHAIN {
        let before = chain.len();
        for r in msg.answers() {
            if let Some(target) = r.cname()
                && on_chain(msg, chain, &r.owner)
                && !on_chain(msg, chain, &target)
            {
                chain.push(target.offset());
            }
        }
        if chain.len() == before {
            break;
        }
    }
}

pub(crate) fn on_chain(msg: &Response<'_>, chain: &[usize], name: &Name<'_>) -> bool {
    chain.iter().any(|at| msg.name_at(*at).eq_ignore_case(name))
}
