//! When sibling names may be written as one wildcard: enough distinct names directly below
//! one zone, and the wildcard admits names of that zone's owner only.
//!
//! The Public Suffix List decides: no wildcard at or above a public suffix (`*.com`,
//! `*.co.uk`), none at or over a suffix of its private section (`*.blob.core.windows.net`,
//! where any customer creates names), and none whose zone is not below one registrable
//! domain. The `psl` crate answers lookups but cannot list the entries below a zone, so a
//! private suffix below the zone is found through the names seen: a zone with a sibling
//! that is itself a suffix, or that lies below a longer suffix than the zone's, gets no
//! wildcard.
use std::collections::{BTreeMap, BTreeSet};

use crate::policy::{NamePattern, Reach, reach};

/// The zone each group of at least `min` distinct sibling names may be replaced with, and
/// the names it replaces.
pub fn groups<'a>(
    names: impl IntoIterator<Item = &'a str>,
    min: usize,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut by_zone: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for name in names {
        if let Some((_, zone)) = name.split_once('.') {
            by_zone
                .entry(zone.to_owned())
                .or_default()
                .insert(name.to_owned());
        }
    }
    by_zone.retain(|zone, siblings| min > 0 && siblings.len() >= min && safe(zone, siblings));
    by_zone
}

/// Whether `*.zone` admits names of the zone's owner only.
pub fn safe(zone: &str, siblings: &BTreeSet<String>) -> bool {
    if reach(&NamePattern::Wildcard(zone.to_owned())) != Reach::Owned {
        return false;
    }
    let Some(domain) = psl::domain(zone.as_bytes()) else {
        return false;
    };
    let zone_suffix = domain.suffix();
    siblings.iter().all(|name| {
        let owned = psl::domain(name.as_bytes()).is_some();
        let same_suffix = psl::suffix(name.as_bytes()) == Some(zone_suffix);
        owned && same_suffix
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zones(names: &[&str], min: usize) -> Vec<String> {
        groups(names.iter().copied(), min).into_keys().collect()
    }

    #[test]
    fn siblings_under_an_owned_zone_become_a_wildcard_at_the_threshold() {
        let names = [
            "a.cdn.example.com",
            "b.cdn.example.com",
            "c.cdn.example.com",
        ];
        assert_eq!(zones(&names, 3), ["cdn.example.com"]);
        assert!(zones(&names, 4).is_empty(), "below the threshold");
        assert!(zones(&names, 0).is_empty(), "0 turns grouping off");
        let registrable = ["www.example.org", "api.example.org", "cdn.example.org"];
        assert_eq!(zones(&registrable, 3), ["example.org"]);
    }

    #[test]
    fn never_at_a_public_suffix() {
        // Registrable domains under ICANN suffixes, and under an unknown top-level domain.
        for names in [
            ["example.com", "example.net.com", "other.com"],
            ["a.co.uk", "b.co.uk", "c.co.uk"],
            ["x.internal", "y.internal", "z.internal"],
            [
                "a.s3.amazonaws.com",
                "b.s3.amazonaws.com",
                "c.s3.amazonaws.com",
            ],
        ] {
            assert!(zones(&names, 3).is_empty(), "{names:?}");
        }
    }

    #[test]
    fn never_over_a_multi_tenant_suffix() {
        for names in [
            [
                "acct1.blob.core.windows.net",
                "acct2.blob.core.windows.net",
                "acct3.blob.core.windows.net",
            ],
            [
                "app1.azurewebsites.net",
                "app2.azurewebsites.net",
                "app3.azurewebsites.net",
            ],
            [
                "svc1.cloudapp.net",
                "svc2.cloudapp.net",
                "svc3.cloudapp.net",
            ],
            ["alice.github.io", "bob.github.io", "carol.github.io"],
            // One level up: `*.core.windows.net` would span `blob.core.windows.net`.
            [
                "blob.core.windows.net",
                "queue.core.windows.net",
                "table.core.windows.net",
            ],
        ] {
            assert!(zones(&names, 3).is_empty(), "{names:?}");
        }
    }

    #[test]
    fn below_a_private_suffix_a_tenant_owns_its_zone() {
        let names = [
            "a.mine.azurewebsites.net",
            "b.mine.azurewebsites.net",
            "c.mine.azurewebsites.net",
        ];
        assert_eq!(zones(&names, 3), ["mine.azurewebsites.net"]);
    }
}
